"""Audit speed (4): the engine on the ORT gradient twin vs torchattacks on the same torch model.

Model: the exported ``pfe`` package (pfe_cnn, 1x28x28, random weights, seed 0) and an identical
torch copy built by ``dcs.training.export.fixtures.build_untrained`` with the same seed (logits are
checked equal). Data: the first N Fashion-MNIST test images, labelled with the model's own clean
prediction (clean accuracy 100%, so robust accuracy measures the attack alone). Same ε, steps,
step size, random start, restarts (torchattacks: one run per restart on examples not yet
fooled), batch (``sizes.attack_batch``: 128, 1000 on a GPU) and one thread on both sides (ORT
intra-op 1, ``torch.set_num_threads(1)``).
With ``sizes.device == "cuda"`` both sides run on the GPU (ORT's CUDA provider, torch on cuda).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from bench.common import PFE, Row, Sizes, fmnist_test

log = logging.getLogger("bench.audit")
EPS = 0.02


def _torch_model(device: str):
    import torch

    from dcs.training.export.fixtures import build_untrained

    torch.set_num_threads(1)
    model, _ = build_untrained("pfe_cnn", "none", (1, 28, 28), 10, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(device)


def _predict(model, x):
    """Labels of the torch model on a torch batch, as numpy (synchronises a GPU)."""
    import torch

    with torch.no_grad():
        return model(x).argmax(1).cpu().numpy()


def _device(model) -> str:
    return str(next(model.parameters()).device)


def _torch_pgd(model, x: np.ndarray, y: np.ndarray, eps: float, alpha: float, steps: int,
               restarts: int, seed: int, batch: int) -> tuple[np.ndarray, float]:
    """torchattacks.PGD, ``restarts`` runs on survivors; returns (robust mask, seconds)."""
    import torch
    import torchattacks

    torch.manual_seed(seed)
    atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    dev = _device(model)
    robust = np.ones(len(x), bool)
    t0 = time.perf_counter()
    for _ in range(restarts):
        idx = np.flatnonzero(robust)
        for lo in range(0, len(idx), batch):
            sl = idx[lo:lo + batch]
            xt, yt = torch.from_numpy(x[sl]).to(dev), torch.from_numpy(y[sl]).to(dev)
            robust[sl] = _predict(model, atk(xt, yt)) == y[sl]
    return robust, time.perf_counter() - t0


def _torch_other(model, name: str, x: np.ndarray, y: np.ndarray, batch: int,
                 **kw) -> tuple[float, float]:
    import torch
    import torchattacks

    atk = getattr(torchattacks, name)(model, **kw)
    dev = _device(model)
    robust = np.ones(len(x), bool)
    t0 = time.perf_counter()
    for lo in range(0, len(x), batch):
        sl = slice(lo, lo + batch)
        xt, yt = torch.from_numpy(x[sl]).to(dev), torch.from_numpy(y[sl]).to(dev)
        robust[sl] = _predict(model, atk(xt, yt)) == y[sl]
    return float(robust.mean()), time.perf_counter() - t0


def bench_audit(repo: Path, sizes: Sizes) -> list[Row]:
    import torch

    from dcs.robustness.attacks import build
    from dcs.robustness.package import SessionOptions, load_package

    pkg = load_package(repo / PFE / "1", SessionOptions(device=sizes.device, intra_op_threads=1,
                                                        load_bounds=False, load_probe=False))
    model = _torch_model(sizes.device)
    n = sizes.audit_examples
    x = fmnist_test(n)
    y = pkg.logits(x).argmax(1).astype(np.int64)
    with torch.no_grad():
        ref_logits = model(torch.from_numpy(x[:256]).to(sizes.device)).cpu().numpy()
    diff = float(np.abs(ref_logits - pkg.logits(x[:256])).max())
    if diff > (1e-3 if sizes.device == "cpu" else 5e-2):  # cuDNN and cuBLAS may use TF32
        raise RuntimeError(f"torch copy and model.onnx disagree (max |Δlogit| {diff:.2g})")
    steps, restarts = sizes.pgd_steps, sizes.pgd_restarts
    alpha = 2.5 * EPS / steps
    batch = sizes.attack_batch
    params = {"eps": EPS, "steps": steps, "step_size": alpha, "restarts": restarts,
              "batch_size": batch}

    # ours: shipped engine (early stop on fooled examples) and like-for-like (every step)
    # Each side runs twice, alternately, and keeps its faster run (the machine may be shared;
    # both runs are seeded alike, so the results are identical and only the time differs).
    ours = ours_all = None
    ref_s = float("inf")
    for _ in range(2):
        r = build("pgd", **params).run(pkg, x, y, rng=np.random.default_rng(0))
        ours = r if ours is None or r.wall_s < ours.wall_s else ours
        ref_robust, s = _torch_pgd(model, x, y, EPS, alpha, steps, restarts, seed=0, batch=batch)
        ref_s = min(ref_s, s)
    ours_all = build("pgd", early_stop=False, **params).run(pkg, x, y, rng=np.random.default_rng(0))
    _, ref_all_s = _torch_pgd(model, x, y, EPS, alpha, steps, restarts, seed=0, batch=batch)
    ref_s = min(ref_s, ref_all_s)
    our_acc = 100.0 * float((~ours.success).mean())
    ref_acc = 100.0 * float(ref_robust.mean())
    speed = ref_s / ours.wall_s
    cfg = (f"ε={EPS}, {steps} steps, α={alpha:.4f}, {restarts} restart(s), {n} examples, "
           f"batch {batch}, "
           + ("1 thread" if sizes.device == "cpu" else f"{pkg.provider} vs torch {sizes.device}"))
    rows = [
        Row("audit", "PGD examples/s, engine on ORT twin vs torchattacks", n / ours.wall_s,
            n / ref_s, speed, ">= 1.5x", speed >= 1.5, "ex/s",
            f"{cfg}; {ours.gradients} vs {n * steps * restarts}(max) gradients; "
            f"|Δlogit| torch vs onnx {diff:.1e}",
            extra={"ours_s": ours.wall_s, "ref_s": ref_s, "ours_gradients": ours.gradients}),
        Row("audit", "PGD robust accuracy, engine vs torchattacks (points)", our_acc, ref_acc,
            None, "<= ref + 0.5", our_acc <= ref_acc + 0.5, "%", cfg),
        Row("audit", "PGD gradient-examples/s, every step (no early stop)",
            ours_all.gradients / ours_all.wall_s, n * steps * restarts / ref_s,
            (ours_all.gradients / ours_all.wall_s) / (n * steps * restarts / ref_s), "", None,
            "grad/s", f"like-for-like per-gradient speed; robust acc "
            f"{100.0 * float((~ours_all.success).mean()):.1f}%"),
    ]
    # APGD-CE and Square throughput (examples/s), torchattacks on the same examples for reference
    na = sizes.apgd_examples
    apgd = build("apgd-ce", eps=EPS, steps=sizes.apgd_steps, batch_size=batch).run(
        pkg, x[:na], y[:na], rng=np.random.default_rng(0))
    ta_acc, ta_s = _torch_other(model, "APGD", x[:na], y[:na], batch, eps=EPS,
                                steps=sizes.apgd_steps,
                                n_restarts=1, loss="ce", seed=0)
    rows.append(Row("audit", f"APGD-CE examples/s ({sizes.apgd_steps} steps)", na / apgd.wall_s,
                    na / ta_s, ta_s / apgd.wall_s, "", None, "ex/s",
                    f"robust acc {100 * float((~apgd.success).mean()):.1f}% vs torchattacks "
                    f"{100 * ta_acc:.1f}%; {na} examples"))
    nsq = sizes.square_examples
    sq = build("square", eps=EPS, n_queries=sizes.square_queries, batch_size=batch).run(
        pkg, x[:nsq], y[:nsq], rng=np.random.default_rng(0))
    ta_acc, ta_s = _torch_other(model, "Square", x[:nsq], y[:nsq], batch, eps=EPS,
                                n_queries=sizes.square_queries, n_restarts=1, p_init=0.05, seed=0)
    rows.append(Row("audit", f"Square examples/s ({sizes.square_queries} queries)",
                    nsq / sq.wall_s, nsq / ta_s, ta_s / sq.wall_s, "", None, "ex/s",
                    f"robust acc {100 * float((~sq.success).mean()):.1f}% vs torchattacks "
                    f"{100 * ta_acc:.1f}%; {nsq} examples"))
    return rows
