"""``dcs reproduce --preset quick|full [--out results/] [--only ROW ...]``: train, export and evaluate
every row of the papers' tables (cached; an interrupted run resumes). See ``dcs.training.reproduce``."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="reproduce the papers' tables (train → export → evaluate, cached)",
                              description=__doc__.splitlines()[0])
    from dcs.training.reproduce import add_arguments

    add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dcs.training.reproduce import run as _run

    return _run(args)
