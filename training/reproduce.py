"""Reproduce the papers' tables: train → export → evaluate every row, cached, into ``results/<preset>/``.

    python -m dcs.training.reproduce --preset quick|full|FILE.json [--out results] [--work runs/reproduce]
                                 [--only ROW_OR_PREFIX ...]

Rows, settings and their reductions relative to the papers are data (``dcs.training.reproduce_presets``);
the train and export steps are ``dcs.training.reproduce_steps``, the evaluations
``dcs.training.reproduce_eval``, the tables and figures ``dcs.training.reproduce_report``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcs.robustness.manifest import atomic_write_json, atomic_write_text
from dcs.training.reproduce_eval import eval_a_step, eval_b_step
from dcs.training.reproduce_steps import Steps, export_step, train_step

log = logging.getLogger(__name__)


class ReproduceError(Exception):
    """A preset or argument that cannot be used; the message names it."""


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
