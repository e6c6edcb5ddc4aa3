"""``dcs compare REPORT.json [...]``: a Markdown table across reports, in the papers' style."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="Markdown comparison table across report.json files",
                       description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", metavar="REPORT", help="report.json files (or folders holding one)")
    p.add_argument("--eps", type=float, default=None, help="ε column to show (default: the shared headline ε)")
    p.add_argument("--out", default=None, help="also write the table to this .md file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dcs.robustness.report import comparison_table, load_report
    from dcs.training.cli import CLIError

    reports = []
    for r in args.reports:
        path = Path(r)
        if path.is_dir():
            path = path / "report.json"
        try:
            reports.append(load_report(path))
        except FileNotFoundError:
            raise CLIError(f"{path}: no such report") from None
        except ValueError as exc:  # includes json.JSONDecodeError
            raise CLIError(f"{path}: {exc}") from None
    try:
        table = comparison_table(reports, args.eps)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.out:
        Path(args.out).write_text(table)
    sys.stdout.write(table)
    return 0
