"""``python -m bench.run [--full] [--only NAMES]``: run the benchmarks, print one table, write
``bench/results/<date>-<host-kind>.json`` and ``bench/results/SUMMARY.md``.

Quick (default) takes a few minutes on 2 cores (``infer``, the KServe rows, ~2 of them); ``--full``
uses longer windows and bigger audits;
``--smoke`` is a seconds-long run on the digits MLP for the smoke test (writes to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import Row, Sizes, ensure_models, machine, machine_load

RESULTS = Path(__file__).resolve().parent / "results"
ANALYSIS = Path(__file__).resolve().parent / "analysis.md"


def _benches() -> dict[str, Callable]:
    from bench import adaptive_cost, audit_speed, gpu, kserve, serving, system

    return {"classify": serving.bench_classify, "infer": kserve.bench_infer,
            "batched": serving.bench_batched,
            "batching": serving.bench_batching, "audit": audit_speed.bench_audit,
            "adaptive": adaptive_cost.bench_adaptive,
            "isolation": system.bench_isolation, "memory": system.bench_memory,
            "gpu": gpu.bench_gpu}


NAMES = ("classify", "infer", "batched", "batching", "audit", "adaptive", "isolation", "memory", "gpu")


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def table(rows: list[Row]) -> str:
    head = "| bench | figure | value | reference | ratio | target | result |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        res = "n/a" if r.passed is None else ("PASS" if r.passed else "FAIL")
        unit = f" {r.unit}" if r.unit and r.value is not None else ""
        lines.append(f"| {r.bench} | {r.figure} | {_fmt(r.value)}{unit} | {_fmt(r.reference)} | "
                     f"{_fmt(r.ratio)} | {r.target or '-'} | {res} |")
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    return "\n".join(f"- **{r.bench} / {r.figure}**: {r.note}" for r in rows if r.note)


def write_summary(out: Path, info: dict, rows: list[Row], stem: str) -> None:
    """``SUMMARY.md`` (``SUMMARY-cuda.md`` for a run with GPU rows): machine line, the table,
    per-row notes, then ``bench/analysis.md``."""
    header = (f"{info['date_utc']} on `{info['host']}`: {info['cpus']} cores "
              f"({info.get('cpu_model', '?')}), provider {info['provider']}, onnxruntime "
              f"{info['onnxruntime']}, grpcio {info.get('grpcio', '?')}; {info['seconds']:.0f} s "
              f"(per bench: {info['bench_seconds']}). Raw JSON: `{stem}.json`. Re-run: "
              "`make bench` (`BENCH_ARGS=--full` for the long run).")
    shared = [f"load average {info[k]['loadavg']} {k.split('_')[1]} the run; other busy "
              "processes: " + ("; ".join(f"{b['cpu_percent']}% `{b['cmd'][:70]}`"
                                         for b in info[k].get("busy_processes", [])) or "none")
              for k in ("load_before", "load_after") if k in info]
    header += "\n\nMachine sharing: " + " / ".join(shared) + "." if shared else ""
    summary = [f"# Benchmark summary ({info['mode']} run)", "", header, "", table(rows), "",
               "## Notes per row", "", notes(rows), ""]
    if ANALYSIS.exists():
        summary += [ANALYSIS.read_text()]
    name = "SUMMARY.md" if info["provider"] == "CPUExecutionProvider" else "SUMMARY-cuda.md"
    (out / name).write_text("\n".join(summary))


def resummarize(path: Path) -> int:
    """Rebuild SUMMARY.md beside ``path`` from its JSON (after editing bench/analysis.md)."""
    data = json.loads(path.read_text())
    rows = [Row(**r) for r in data["rows"]]
    write_summary(path.parent, data["machine"], rows, path.stem)
    print(table(rows))
    return 0


def _run_benches(only: list[str], repo: Path, sizes: Sizes,
                 smoke: bool) -> tuple[list[Row], dict[str, float]]:
    """Run the benches named in ``only`` (in NAMES order); rows and seconds per bench. A bench
    that raises becomes a failed row, so one broken bench does not hide the others."""
    benches = _benches()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    for name in (n for n in NAMES if n in only):
        if smoke and name in ("audit", "adaptive"):
            rows.append(Row(name, "skipped in --smoke (needs the pfe export)", None))
            continue
        t0 = time.perf_counter()
        logging.getLogger("bench").info("running %s", name)
        try:
            rows.extend(benches[name](repo, sizes))
        except Exception as exc:  # noqa: BLE001 - one broken bench must not hide the others
            traceback.print_exc()
            rows.append(Row(name, "benchmark raised", None, target="runs", passed=False,
                            note=f"{type(exc).__name__}: {exc}"[:500]))
        timings[name] = round(time.perf_counter() - t0, 1)
    return rows, timings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--full", action="store_true", help="longer windows, bigger audits")
    p.add_argument("--smoke", action="store_true", help="seconds-long run (tests)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(NAMES)}")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--resummarize", type=Path, default=None, metavar="JSON",
                   help="only rebuild SUMMARY.md from a results JSON, run nothing")
    args = p.parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize)
    only = [n.strip() for n in args.only.split(",") if n.strip()] or list(NAMES)
    bad = sorted(set(only) - set(NAMES))
    if bad:
        p.error(f"--only: unknown {bad}; known: {','.join(NAMES)}")
    if args.full and args.smoke:
        p.error("--full and --smoke exclude each other")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    mode = "full" if args.full else "smoke" if args.smoke else "quick"
    sizes = Sizes.make(mode)
    args.out.mkdir(parents=True, exist_ok=True)  # fail before the expensive part
    info = machine()
    info["load_before"] = machine_load()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dcs-bench-") as work:
        repo = ensure_models(Path(work) / "repo", digits_copies=2, pfe=not args.smoke)
        rows, timings = _run_benches(only, repo, sizes, args.smoke)
    total = time.perf_counter() - t_start
    provider = "CUDAExecutionProvider" if any(
        r.bench == "gpu" and r.value is not None for r in rows) else "CPUExecutionProvider"
    info["load_after"] = machine_load()
    info.update(mode=mode, provider=provider, seconds=round(total, 1), bench_seconds=timings)
    text = table(rows)
    print("\n" + text + "\n\n" + notes(rows), flush=True)
    print(f"\n{mode} run: {total:.0f} s on {info['cpus']} cores, {provider}", flush=True)
    kind = f"{info['cpus']}cpu-{'cuda' if provider.startswith('CUDA') else 'cpu'}"
    stem = f"{info['date_utc'][:10]}-{kind}" + ("" if mode == "quick" else f"-{mode}")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": info, "rows": [r.to_dict() for r in rows]}, indent=2, default=str) + "\n")
    write_summary(args.out, info, rows, stem)
    failed = [r for r in rows if "benchmark raised" in r.figure]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
