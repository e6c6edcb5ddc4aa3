"""The cached steps of ``dcs reproduce`` (``dcs.training.reproduce``): train and export, each in a
folder named by the sha256 of everything it depends on, plus the record of what ran (steps.json).

A step is done once its final file exists (``train/<row>-<key>/final.pt``,
``repo/<row>-<twin>-<key>/1/manifest.json``); a killed training step resumes from its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcs.robustness.manifest import atomic_write_json

log = logging.getLogger(__name__)

CODE_VERSION = 1  # bump to invalidate every cached step after a change of the pipeline itself
#: Training options left out of the cache key while off (0/False), so that adding one keeps
#: existing cached runs valid: (config section, field).
OFF_OPTIONS = (("adv", "eps_warmup", 0.0), ("adv", "surrogate", "straight-through"))


def config_hash(obj: Any) -> str:
    """12 hex digits of the sha256 of ``obj`` as canonical JSON: a step's cache key."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Steps:
    """What each step did this time (ran / cached) and how long it took; written to steps.json."""

    records: list[dict] = field(default_factory=list)

    def add(self, kind: str, row: str, key: str, cached: bool, seconds: float, path: str) -> None:
        """Record a step; a step that ran leaves ``<path>.step.json`` beside its output, so a cached
        step still reports how long it took when it ran (``compute_seconds``)."""
        stamp = Path(str(path).rstrip("/") + ".step.json")
        if cached:
            try:
                compute = json.loads(stamp.read_text())["seconds"]
            except (OSError, ValueError, KeyError):
                compute = None
        else:
            compute = round(seconds, 2)
            atomic_write_json(stamp, {"step": kind, "row": row, "key": key, "seconds": compute})
        self.records.append({"step": kind, "row": row, "key": key, "cached": cached,
                             "seconds": round(seconds, 2), "compute_seconds": compute, "path": path})
        log.info("%s %s: %s (%.1fs) %s", kind, row, "cached" if cached else "done", seconds, path)


# ----------------------------------------------------------------------------------------------- train
def resolved_train_config(row: dict, seed: int, threads: int):
    from dcs.training.config import TrainConfig

    values = {"seed": seed, **row["train"]}
    cfg = TrainConfig.from_dict(values).resolved()
    from dataclasses import replace

    return replace(cfg, threads=threads)


def train_key(cfg) -> str:
    """The cache key of a resolved TrainConfig: thread count aside, and options added after a run
    (at their defaults) left out, so that adding an option does not invalidate cached runs."""
    cdict = cfg.to_dict()
    cdict.pop("threads")
    for section, name, default in OFF_OPTIONS:
        if cdict[section].get(name) in (None, default):
            cdict[section].pop(name, None)
    if cdict.get("certified", "none") == "none":  # likewise certified training's (issue 27) options
        for name in [k for k in cdict if k == "certified" or k.startswith("cert_")]:
            cdict.pop(name)
    return config_hash({"train": cdict, "code": CODE_VERSION})


def train_step(row: dict, preset: dict, work: Path, steps: Steps, data_cache: dict) -> tuple[Path, str]:
    """Train (or reuse) the row's run; for a PFE row also snapshot z after every stage."""
    from dcs.training import runs
    from dcs.training.trainer import train

    cfg = resolved_train_config(row, preset["seed"], preset["threads"])
    key = train_key(cfg)
    out = work / "train" / f"{row['id']}-{key}"
    t0 = time.perf_counter()
    snaps = out / "stages.npz"
    need_snaps = cfg.defense.kind == "pfe"
    if (out / runs.FINAL_FILE).is_file() and (snaps.is_file() or not need_snaps):
        steps.add("train", row["id"], key, True, 0.0, str(out))
        return out, key
    data = load_data(cfg.dataset, cfg.limit_train, cfg.limit_test, data_cache)
    if not need_snaps:
        train(cfg, data, out, resume=_resume(out), progress=False)
    else:
        _train_pfe_with_snapshots(cfg, data, out)
    steps.add("train", row["id"], key, False, time.perf_counter() - t0, str(out))
    return out, key


def _resume(out: Path) -> bool:
    """Resume from the checkpoint if there is one; a run killed before its first checkpoint left
    only config.json/metrics, which are removed so the run starts afresh."""
    from dcs.training import runs

    if (out / runs.CHECKPOINT_FILE).is_file():
        return True
    for name in (runs.CONFIG_FILE, runs.METRICS_JSON, runs.METRICS_CSV):
        (out / name).unlink(missing_ok=True)
    return False


def load_data(name: str, limit_train, limit_test, cache: dict):
    from dcs.data import load_dataset

    k = (name, limit_train, limit_test)
    if k not in cache:
        cache[k] = load_dataset(name, None, limit_train=limit_train, limit_test=limit_test)
    return cache[k]


def _probe_z(model, x: np.ndarray, n_max: int = 200) -> np.ndarray:
    import torch

    with torch.no_grad():
        z = model.probe(torch.from_numpy(x[:n_max]))["z"]
    z = z.numpy().ravel()
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(z, size=min(len(z), 200_000), replace=False)).astype(np.float32)


def _train_pfe_with_snapshots(cfg, data, out: Path) -> None:
    """Train a PFE run stage by stage (``stop_after_batches`` at each stage boundary, then resume),
    saving the front-end activations z on test images at init and after every stage (stages.npz)."""
    import torch

    from dcs.training import runs
    from dcs.training.models import build_model, configure_pfe_stage
    from dcs.training.seeding import seed_everything
    from dcs.training.trainer import train

    n_batches = (len(data.x_train) + cfg.batch_size - 1) // cfg.batch_size
    bounds, acc = [], 0
    for k, e in enumerate(cfg.pfe_stages):
        acc += e * n_batches
        bounds.append((k + 1, acc, e))
    part = out / "stages.partial.npz"
    snaps: dict[str, np.ndarray] = dict(np.load(part)) if part.is_file() else {}
    x_probe = data.x_test[:200]
    if "init" not in snaps:
        seed_everything(cfg.seed)  # the same initialisation the trainer draws
        model = build_model(cfg.arch, cfg.defense, data.input_shape, data.num_classes)
        configure_pfe_stage(model, 1)
        model.eval()
        snaps["init"] = _probe_z(model, x_probe)
    for stage, stop, epochs in bounds:
        name = f"stage{stage}"
        if name in snaps or epochs == 0 or stage == 3:
            continue
        out.mkdir(parents=True, exist_ok=True)
        res = train(cfg, data, out, resume=_resume(out), stop_after_batches=stop,
                    progress=False)
        if not res.stopped_early:
            break
        ckpt = torch.load(out / runs.CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model = build_model(cfg.arch, cfg.defense, data.input_shape, data.num_classes)
        configure_pfe_stage(model, stage)
        model.load_state_dict(ckpt["model"])
        model.eval()
        snaps[name] = _probe_z(model, x_probe)
        np.savez(part, **snaps)
    if not (out / runs.FINAL_FILE).is_file():
        train(cfg, data, out, resume=_resume(out), progress=False)
    run = runs.load_trained(out)
    snaps["final"] = _probe_z(run.model, x_probe)
    snaps["c"] = np.asarray([cfg.defense.pfe_c], np.float32)
    np.savez(out / "stages.npz", **snaps)
    part.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- export
def export_step(row: dict, run_dir: Path, train_key: str, twin: str, work: Path, steps: Steps) -> tuple[Path, str]:
    from dcs.robustness.manifest import MANIFEST_FILE
    from dcs.training.export.exporter import export_run

    twin = "bpda" if twin == "bpda-st" else twin  # same package, audited through straight-through only
    key = config_hash({"train": train_key, "twin": twin, "code": CODE_VERSION})
    name = f"{row['id']}-{twin}-{key}"
    path = work / "repo" / name / "1"
    t0 = time.perf_counter()
    if (path / MANIFEST_FILE).is_file():
        steps.add(f"export:{twin}", row["id"], key, True, 0.0, str(path))
        return path, key
    export_run(run_dir, work / "repo", name, version=1, force=True, twin_gradient=twin)
    steps.add(f"export:{twin}", row["id"], key, False, time.perf_counter() - t0, str(path))
    return path, key
