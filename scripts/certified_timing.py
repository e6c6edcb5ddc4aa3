"""Per-epoch cost of plain vs IBP vs CROWN-IBP training steps, measured back to back in one
process (so every method sees the same machine load), 1 torch thread.

An epoch's cost is estimated as (mean seconds per optimizer step) x (steps per epoch) for the
MNIST-5k training set (4,000 images) and a 60,000-image Fashion-MNIST epoch, batch 64.
Writes results/tableD/timing.json and prints a Markdown table.

Usage: python scripts/certified_timing.py [OUT_JSON] [STEPS]
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dcs.training.certified import CertifiedLoss
from dcs.training.config import DefenseSpec
from dcs.training.models import build_model, configure_pfe_stage


def step_seconds(defense: str, method: str, steps: int, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = build_model("pfe_cnn", DefenseSpec(kind=defense, pfe_c=0.5 if defense == "pfe" else None), (1, 28, 28), 10)
    configure_pfe_stage(model, 3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = CertifiedLoss(model, method) if method != "plain" else None
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        loss = ce if loss_fn is None else 0.5 * ce + 0.5 * loss_fn(x, y, logits, 0.1, 1.0)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step builds the bounds module's buffers: not counted
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path("results/tableD/timing.json")
    steps = int(argv[1]) if len(argv) > 1 else 10
    torch.set_num_threads(1)
    rows = []
    for defense in ("none", "pfe"):
        for method in ("plain", "ibp", "crown-ibp"):
            s = step_seconds(defense, method, steps)
            rows.append({"model": "cnn" if defense == "none" else "pfe", "method": method, "step_s": s,
                         "epoch_s_mnist5k": s * 63, "epoch_s_fmnist60k": s * 938})
    meta = {"threads": 1, "batch": 64, "steps": steps, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "note": "CROWN-IBP with beta = 1 (the ramp); after the "
            "ramp beta = 0 and a CROWN-IBP step costs what an IBP step does"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| model | method | s / step | s / epoch MNIST-5k (63 steps) | s / epoch F-MNIST 60k (938 steps) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['step_s']:.3f} | {r['epoch_s_mnist5k']:.0f} | "
              f"{r['epoch_s_fmnist60k']:.0f} |" for r in rows]
    sys.stdout.write("\n".join(lines) + f"\n\nload average during the run: {meta['load_average']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
