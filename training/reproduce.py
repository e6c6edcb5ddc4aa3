"""Reproduce the papers' tables: train → export → evaluate every row, cached, into ``results/<preset>/``.

    python -m dcs.training.reproduce --preset quick|full|FILE.json [--out results] [--work runs/reproduce]
                                 [--only ROW_OR_PREFIX ...]

Rows, settings and their reductions relative to the papers are data (``dcs.training.reproduce_presets``).
Every step is cached under ``--work`` in a folder named by the sha256 of everything it depends on
(its config plus the keys of the steps it uses), and is done once its final file exists:
``train/<row>-<key>/final.pt``, ``repo/<row>-<twin>-<key>/1/manifest.json``,
``eval/<row>-<key>/summary.json``. A killed reproduction resumes: finished steps are reused, a
half-trained run resumes from its checkpoint. ``results/<preset>/steps.json`` records, per step,
whether it ran or came from the cache.

Outputs (``results/<preset>/``): ``tables.md`` + ``tables.json`` (Tables A, B, C), ``figures/*.png``,
``configs/`` (the preset, each row's resolved training config, each evaluation's suite),
``packages.json`` (sha256 of every ONNX file attacked), ``reports/*.json`` (full audit reports).

Evaluation uses the ONNX packages through ONNX Runtime (what is served is what is attacked):
Table A with ``dcs.robustness.audit.audit``; Tables B and C with the RP2 and PGD attacks run per
target class (``Attack.run``), transfer examples crafted on the baseline package.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcs.robustness.manifest import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CODE_VERSION = 1  # bump to invalidate every cached step after a change of the pipeline itself
#: Training options left out of the cache key while off (0/False), so that adding one keeps
#: existing cached runs valid: (config section, field).
OFF_OPTIONS = (("adv", "eps_warmup", 0.0), ("adv", "surrogate", "straight-through"))


class ReproduceError(Exception):
    """A preset or argument that cannot be used; the message names it."""


def config_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_preset(name_or_path: str) -> dict[str, Any]:
    from dcs.training.reproduce_presets import PRESETS, get_preset

    if name_or_path in PRESETS:
        return get_preset(name_or_path)
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        return json.loads(p.read_text())
    raise ReproduceError(f"--preset {name_or_path!r}: expected one of {', '.join(PRESETS)} or a preset .json file")


def select_rows(preset: dict, only: Sequence[str] | None) -> list[dict]:
    rows = preset["rows"]
    if not only:
        return rows
    picked = [r for r in rows if any(r["id"] == o or r["id"].startswith(o) for o in only)]
    missing = [o for o in only if not any(r["id"] == o or r["id"].startswith(o) for r in rows)]
    if missing:
        raise ReproduceError(f"--only {missing}: no such row; rows are {[r['id'] for r in rows]}")
    # Table C needs Table B's baseline as the transfer source.
    if any(r["table"] == "B" for r in picked) and not any(r["id"] == "B-baseline" for r in picked):
        picked = [r for r in rows if r["id"] == "B-baseline"] + picked
    return picked


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
    data = _data(cfg.dataset, cfg.limit_train, cfg.limit_test, data_cache)
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


def _data(name: str, limit_train, limit_test, cache: dict):
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


def _open(path: Path, threads: int):
    from dcs.robustness.package import SessionOptions, load_package

    return load_package(path, SessionOptions(device="cpu", intra_op_threads=threads))


# ------------------------------------------------------------------------------------------- table A
def table_a_suite(settings: dict, dataset: str, batch_size: int):
    from dcs.robustness.suites import AttackSpec, CheckConfig, Suite

    eps = tuple(float(e) for e in settings["eps"][dataset])
    head = float(settings["headline"][dataset])
    p = settings["pgd_paper"]
    attacks = [
        AttackSpec("fgsm", dict(settings["fgsm"]), label="FGSM"),
        AttackSpec("bim", dict(settings["bim"]), label="BIM"),
        AttackSpec("pgd", dict(settings["pgd_sweep"]), label="PGD"),
        AttackSpec("apgd-ce", dict(settings["apgd_ce"]), label="APGD-CE"),
        AttackSpec("apgd-dlr", dict(settings["apgd_dlr"]), label="APGD-DLR"),
        AttackSpec("square", dict(settings["square"]), label="Square"),
        AttackSpec("noise", {}, label="Noise"),
        AttackSpec("pgd", {"steps": p["steps"], "restarts": p["restarts"], "step_size": p["step_ratio"] * head},
                   eps=head, label="PGD (paper)"),
    ]
    if settings.get("certify"):
        attacks.append(AttackSpec("certify", {}, label="Certified"))
    return Suite(name=f"reproduce-{dataset}", attacks=tuple(attacks), eps=eps, headline_eps=head,
                 batch_size=batch_size, checks=CheckConfig(**settings["checks"]))


COLUMNS_A = ("FGSM", "BIM", "PGD (paper)", "APGD-CE", "APGD-DLR", "Square")


def summarize_a(report) -> dict:
    """Clean, per-attack and worst-case robust accuracy at the headline ε, the ε curves, checks."""
    head = report.headline["eps"]
    out = report.outcomes
    y, clean_pred = out["y"], out["clean_pred"]
    correct = clean_pred == y
    worst = correct.copy()
    cols: dict[str, float] = {}
    for r, o in zip(report.results, out["results"]):
        if abs(r["eps"] - head) > 1e-9:
            continue
        robust = correct & (o["adv_pred"] == y)
        cols[r["label"]] = float(robust.mean())
        if r["label"] != "Noise":
            worst &= robust
    curves: dict[str, list] = {}
    for r in report.results:
        if not r["fixed_eps"]:
            curves.setdefault(r["label"], []).append([r["eps"], r["robust_accuracy"]])
    curves["worst case"] = [[w["eps"], w["robust_accuracy"]] for w in report.worst_case]
    d = report.to_dict()
    return {"clean": float(report.clean_accuracy), "headline_eps": head, "columns": cols,
            "worst_case": float(worst.mean()), "curves": curves, "n": int(report.n_examples),
            "checks": [{"name": c["name"], "status": c["status"], "detail": c["detail"]} for c in d["checks"]],
            "certified": d.get("certified"), "package": d.get("package"), "adaptive": d.get("adaptive")}


def eval_a_step(row: dict, twin: str, pkg_path: Path, export_key: str, preset: dict, work: Path,
                steps: Steps, data_cache: dict) -> dict:
    from dcs.robustness.audit import audit
    from dcs.robustness.report import write_report

    ds = row["dataset"]
    settings = preset["table_a"]
    suite = table_a_suite(settings, ds, preset["batch_size_eval"])
    if twin == "bpda-st":  # the pre-issue-25 protocol: straight-through only
        suite = suite.replace(adaptive=False)
    n = int(settings["n_examples"])
    key = config_hash({"pkg": export_key, "suite": suite.to_dict(), "n": n, "seed": preset["seed"],
                       "code": CODE_VERSION})
    out = work / "eval" / f"{row['id']}-{twin}-{key}"
    t0 = time.perf_counter()
    if (out / "summary.json").is_file():
        steps.add(f"eval:A:{twin}", row["id"], key, True, 0.0, str(out))
        return json.loads((out / "summary.json").read_text())
    data = _data(ds, None, n, data_cache)
    pkg = _open(pkg_path, preset["threads"])
    rep = audit(pkg, data.x_test[:n], data.y_test[:n], suite, seed=preset["seed"], package_info=pkg.describe(),
                class_names=list(data.class_names))
    out.mkdir(parents=True, exist_ok=True)
    write_report(rep, out, oracle=pkg)
    summary = {**summarize_a(rep), "suite": suite.to_dict(), "twin": twin, "row": row["id"]}
    atomic_write_json(out / "summary.json", summary)
    steps.add(f"eval:A:{twin}", row["id"], key, False, time.perf_counter() - t0, str(out))
    return summary


# ----------------------------------------------------------------------------------------- tables B, C
def _targeted(attack, oracle, x, y, targets, seed: int, job: int):
    """Run ``attack`` once per target class t on the examples with y != t; per t: (idx, x_adv, pred)."""
    from dcs.robustness.attacks.base import ExampleRNG

    out = {}
    for t in targets:
        idx = np.flatnonzero(y != t)
        tgt = np.full(len(idx), t, np.int64)
        rng = ExampleRNG.for_examples([seed, job, int(t)], idx)
        res = attack.run(oracle, x[idx], y[idx], rng=rng, target=tgt)
        out[int(t)] = (idx, res.x_adv, res.logits.argmax(1))
    return out


def targeted_asr(y: np.ndarray, clean_pred: np.ndarray, per_target: dict, x: np.ndarray) -> dict:
    """BlurNet's numbers over target classes: ASR_t = among examples correctly classified with
    y != t, the fraction now classified as t; average and worst (max) over t; mean L2 dissimilarity
    ‖x−x_adv‖₂/‖x_adv‖₂ over the successful examples (None when none succeeded)."""
    from dcs.robustness.metrics import l2_dissimilarity

    asr, l2s = {}, []
    for t, (idx, x_adv, pred) in per_target.items():
        ok = clean_pred[idx] == y[idx]
        if not ok.any():
            continue
        hit = ok & (pred == t)
        asr[int(t)] = float(np.mean(pred[ok] == t))
        if hit.any():
            l2s.append(l2_dissimilarity(x[idx][hit], x_adv[hit]))
    vals = list(asr.values())
    return {"avg": float(np.mean(vals)) if vals else None, "worst": float(np.max(vals)) if vals else None,
            "per_target": asr, "l2": float(np.concatenate(l2s).mean()) if l2s else None}


def _attacks_b(settings: dict, batch: int):
    from dcs.robustness.attacks import build

    rp2 = build("rp2", eps=1.0, batch_size=batch, targeted=True, **settings["rp2"])
    pgd = build("pgd", eps=float(settings["eps_pgd"]), batch_size=batch, targeted=True, **settings["pgd"])
    return rp2, pgd


def eval_b_step(row: dict, pkg_path: Path, export_key: str, preset: dict, work: Path, steps: Steps,
                data_cache: dict, source: dict | None) -> dict:
    """White-box RP2 and PGD per target class; transfer of the baseline's examples (``source``:
    the baseline's eval folder; None for the baseline itself, which crafts them)."""
    settings = preset["table_b"]
    n = int(settings["n_examples"])
    key = config_hash({"pkg": export_key, "settings": settings, "n": n, "seed": preset["seed"],
                       "source": None if source is None else source["key"], "code": CODE_VERSION})
    out = work / "eval" / f"{row['id']}-{key}"
    t0 = time.perf_counter()
    if (out / "summary.json").is_file():
        steps.add("eval:B", row["id"], key, True, 0.0, str(out))
        return json.loads((out / "summary.json").read_text())
    data = _data(row["dataset"], None, n, data_cache)
    x, y = data.x_test[:n], data.y_test[:n]
    pkg = _open(pkg_path, preset["threads"])
    clean_pred = np.concatenate([pkg.logits(x[i:i + 256]) for i in range(0, n, 256)]).argmax(1)
    rp2, pgd = _attacks_b(settings, preset["batch_size_eval"])
    targets = [int(t) for t in settings["targets"] if t < pkg.num_classes]
    res_rp2 = _targeted(rp2, pkg, x, y, targets, preset["seed"], 1)
    res_pgd = _targeted(pgd, pkg, x, y, targets, preset["seed"], 2)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"row": row["id"], "key": key, "n": n, "clean": float(np.mean(clean_pred == y)),
               "rp2": targeted_asr(y, clean_pred, res_rp2, x), "pgd": targeted_asr(y, clean_pred, res_pgd, x),
               "targets": targets, "rp2_params": rp2.params(), "pgd_params": pgd.params()}
    if source is None:  # the baseline: keep its adversarial examples for the transfer table
        np.savez_compressed(out / "transfer.npz", **{f"{a}_{t}": v[1] for a, r in (("rp2", res_rp2), ("pgd", res_pgd))
                                                     for t, v in r.items()})
        summary["transfer"] = {"rp2": summary["rp2"], "pgd": summary["pgd"], "note": "white-box (source model)"}
    else:
        blob = np.load(Path(source["path"]) / "transfer.npz")
        tr = {}
        for a in ("rp2", "pgd"):
            per = {}
            for t in targets:
                idx = np.flatnonzero(y != t)
                xa = blob[f"{a}_{t}"]
                per[t] = (idx, xa, np.concatenate([pkg.logits(xa[i:i + 256]) for i in range(0, len(xa), 256)]).argmax(1))
            tr[a] = targeted_asr(y, clean_pred, per, x)
        summary["transfer"] = tr
    # spectra inputs: clean vs PGD (first target) images and first-layer maps
    t0_ = targets[0]
    idx, xa, _ = res_pgd[t0_]
    k = min(32, len(idx))
    spec = {"x": x[idx[:k]], "x_adv": xa[:k]}
    if pkg.has_probe:
        spec["feat"] = pkg.probe(spec["x"])["features"]
        spec["feat_adv"] = pkg.probe(spec["x_adv"])["features"]
        spec["weights"] = pkg.probe(spec["x"][:1])["weights"]
    np.savez_compressed(out / "spectra.npz", **spec)
    atomic_write_json(out / "summary.json", summary)
    steps.add("eval:B", row["id"], key, False, time.perf_counter() - t0, str(out))
    return summary


# ---------------------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class ReproduceResult:
    out: Path
    tables_md: Path
    steps: list[dict]


def reproduce(preset: dict, out_root: str | Path = "results", work: str | Path = "runs/reproduce",
              only: Sequence[str] | None = None) -> ReproduceResult:
    """Run every (selected) row of ``preset``; write ``<out_root>/<preset name>/``."""
    from dcs.training.seeding import set_threads

    rows = select_rows(preset, only)
    out = Path(out_root) / preset["name"]
    work = Path(work) / preset["name"]
    for d in (out, out / "configs", out / "figures", out / "reports", work):
        d.mkdir(parents=True, exist_ok=True)
    set_threads(preset["threads"])
    atomic_write_json(out / "configs" / "preset.json", preset)
    steps = Steps()
    data_cache: dict = {}
    t_start = time.perf_counter()
    results: dict[str, Any] = {"A": {}, "B": {}, "train": {}, "packages": {}}
    baseline_src = None
    ordered = sorted(rows, key=lambda r: (r["table"], r["id"] != "B-baseline"))
    for row in ordered:
        run_dir, tkey = train_step(row, preset, work, steps, data_cache)
        cfg = json.loads((run_dir / "config.json").read_text())
        atomic_write_json(out / "configs" / f"{row['id']}.train.json", cfg)
        summ = json.loads((run_dir / "summary.json").read_text())
        results["train"][row["id"]] = {"final_test_acc": summ["final_test_acc"], "epochs": summ["epochs"],
                                       "run_dir": str(run_dir), "key": tkey}
        if (run_dir / "stages.npz").is_file():
            results["train"][row["id"]]["stages"] = str(run_dir / "stages.npz")
        if row["table"] == "A":
            results["A"][row["id"]] = {}
            for twin in row.get("twins", ["bpda"]):
                pkg_path, ekey = export_step(row, run_dir, tkey, twin, work, steps)
                results["packages"][f"{row['id']}:{twin}"] = _package_record(pkg_path)
                s = eval_a_step(row, twin, pkg_path, ekey, preset, work, steps, data_cache)
                results["A"][row["id"]][twin] = s
                atomic_write_json(out / "configs" / f"{row['id']}.{twin}.suite.json", s["suite"])
                _copy_report(Path(s["package"]["path"]), row, twin, work, out)
        else:
            pkg_path, ekey = export_step(row, run_dir, tkey, "bpda", work, steps)
            results["packages"][row["id"]] = _package_record(pkg_path)
            s = eval_b_step(row, pkg_path, ekey, preset, work, steps, data_cache, baseline_src)
            if row["id"] == "B-baseline":
                baseline_src = {"key": s["key"], "path": str(_eval_dir(work, row, s["key"]))}
            s["spectra"] = str(_eval_dir(work, row, s["key"]) / "spectra.npz")
            results["B"][row["id"]] = s
    atomic_write_json(out / "configs" / "table_b.json", preset["table_b"])
    atomic_write_json(out / "packages.json", results["packages"])
    from dcs.training.reproduce_report import write_figures, write_tables

    md = write_tables(preset, rows, results, out)
    write_figures(preset, rows, results, out)
    total = time.perf_counter() - t_start
    atomic_write_json(out / "steps.json", {
        "total_seconds": round(total, 1),
        "compute_seconds": round(sum(r["compute_seconds"] or 0 for r in steps.records), 1),
        "note": "seconds: this invocation (0 when cached); compute_seconds: when the step ran",
        "steps": steps.records})
    log.info("reproduce %s: %d steps (%d cached) in %.0fs → %s", preset["name"], len(steps.records),
             sum(r["cached"] for r in steps.records), total, out)
    return ReproduceResult(out=out, tables_md=md, steps=steps.records)


def _eval_dir(work: Path, row: dict, key: str) -> Path:
    return work / "eval" / f"{row['id']}-{key}"


def _copy_report(_pkg: Path, row: dict, twin: str, work: Path, out: Path) -> None:
    """Copy the audit's report.json (smaller than the HTML) into results/<preset>/reports/."""
    cands = sorted((p for p in (work / "eval").glob(f"{row['id']}-{twin}-*/report.json")
                    if p.parent.name.rsplit("-", 1)[0] == f"{row['id']}-{twin}"),  # not bpda-st for bpda
                   key=lambda p: p.stat().st_mtime)
    if cands:
        atomic_write_text(out / "reports" / f"{row['id']}.{twin}.json", cands[-1].read_text())


def _package_record(path: Path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    return {"name": m["name"], "version": m["version"], "gradient": m["gradient"],
            "files": {f: e["sha256"] for f, e in m["files"].items()},
            "manifest_sha256": hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()}


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="quick | full | tiny | a preset .json (results/<p>/configs/preset.json)")
    p.add_argument("--out", default="results", help="results root (default results/)")
    p.add_argument("--work", default="runs/reproduce", help="cache of runs, packages and evaluations")
    p.add_argument("--only", nargs="+", default=None, metavar="ROW",
                   help="rows (ids or id prefixes, e.g. A-fmnist B-) to run; tables cover these rows only")


def run(args: argparse.Namespace) -> int:
    from dcs.training.cli import CLIError

    try:
        preset = load_preset(args.preset)
        select_rows(preset, args.only)  # fail before the expensive part
    except ReproduceError as exc:
        raise CLIError(str(exc)) from None
    res = reproduce(preset, args.out, args.work, args.only)
    ran = sum(not s["cached"] for s in res.steps)
    print(f"dcs reproduce: {preset['name']}: {len(res.steps)} steps ({ran} ran, {len(res.steps) - ran} cached); "
          f"tables in {res.tables_md}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from dcs.training.cli import CLIError

    p = argparse.ArgumentParser(prog="python -m dcs.training.reproduce", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except CLIError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
