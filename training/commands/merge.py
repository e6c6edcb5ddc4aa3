"""``dcs merge``: combine shard reports (``dcs evaluate --shard I/N``) into the unsharded report.

    dcs merge SHARD_REPORT [SHARD_REPORT ...] --out DIR

Each SHARD_REPORT is a shard's report.json or a folder holding one. All N shards of one run
(same package sha256, suite, seed, dataset and example count) must be given, each once; the
merged report.json/report.html in ``--out`` has the same numbers, per-example worst case,
headline and check results as an unsharded ``dcs evaluate`` with the same seed
(``dcs.robustness.shard``). The HTML of a merged report has no adversarial example images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge shard reports into one report.json + report.html",
                       description=__doc__.splitlines()[0])
    p.add_argument("shards", nargs="+", metavar="SHARD_REPORT",
                   help="shard report.json files, or folders holding report.json")
    p.add_argument("--out", required=True, help="output folder for the merged report.json + report.html")
    p.set_defaults(run=run)


def _load(arg: str) -> tuple[str, dict]:
    from dcs.robustness.report import JSON_NAME, load_report
    from dcs.training.cli import CLIError

    path = Path(arg)
    if path.is_dir():
        path = path / JSON_NAME
    if not path.is_file():
        raise CLIError(f"{path}: no such shard report")
    try:
        return str(path), load_report(path)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from dcs.robustness.report import write_report
    from dcs.robustness.shard import ShardError, merge_shards
    from dcs.training.cli import CLIError
    from dcs.training.commands.evaluate import _check_writable, _summary

    out = Path(args.out)
    docs = [_load(a) for a in args.shards]
    seen: dict[str, str] = {}
    for (path, _), arg in zip(docs, args.shards):
        key = str(Path(path).resolve())
        if key in seen:
            raise CLIError(f"{arg}: the same shard report is given twice (also as {seen[key]})")
        seen[key] = arg
    try:
        rep = merge_shards(docs)
    except ShardError as exc:
        raise CLIError(str(exc)) from None
    except (KeyError, TypeError, IndexError) as exc:
        raise CLIError(f"malformed shard report ({type(exc).__name__}: {exc})") from None
    _check_writable(out)
    j, h = write_report(rep, out)
    sys.stdout.write(f"merged {len(docs)} shards\n")
    _summary(rep, [str(j), str(h)])
    return 0
