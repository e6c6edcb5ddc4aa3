"""Run directories: file names, atomic JSON writes and ``load_trained`` for the exporter."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcs.robustness.manifest import atomic_write_json, atomic_write_text  # noqa: F401 - used as runs.*

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CURVE_FILE = "curve.png"


class RunError(Exception):
    """A run directory is missing files or holds inconsistent content."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class TrainedRun:
    """A finished run: ``model`` (eval mode, CPU; a pfe model has its saturation enabled with
    the exact, non-BPDA backward), the resolved ``config`` dict, labels and shapes, and the
    ``defense`` dict for the manifest (defense spec + adversarial training + pfe stages)."""

    model: Any
    config: dict
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    dataset: str
    defense: dict


def defense_record(config: dict) -> dict:
    """What a manifest should say about the defense (hyperparameters included)."""
    record = dict(config["defense"])
    record["adversarial_training"] = config["adv"] if config["adv"].get("enabled") else None
    if record["kind"] == "pfe":
        record["pfe_stages"] = config["pfe_stages"]
    return record


def load_trained(run_dir: str | Path) -> TrainedRun:
    """Rebuild the model of a finished run from ``final.pt``; raises RunError."""
    import torch

    from dcs.training.config import TrainConfig
    from dcs.training.models import build_model, configure_pfe_stage

    run_dir = Path(run_dir)
    final = run_dir / FINAL_FILE
    if not final.is_file():
        raise RunError(f"{final}: not found (did the run finish?)")
    blob = torch.load(final, map_location="cpu", weights_only=False)
    config = blob["config"]
    data = config["data"]
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k != "data"})
    shape = tuple(int(v) for v in data["input_shape"])
    model = build_model(cfg.arch, cfg.defense, shape, len(data["class_names"]))
    model.load_state_dict(blob["state_dict"])
    configure_pfe_stage(model, 3)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return TrainedRun(model=model, config=config, class_names=tuple(data["class_names"]), input_shape=shape,
                      dataset=cfg.dataset, defense=defense_record(config))
