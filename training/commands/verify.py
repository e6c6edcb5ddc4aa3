"""``dcs verify PACKAGE_DIR [--run RUN_DIR]``: print a check table; non-zero exit on failure."""
from __future__ import annotations

import argparse

from dcs.training.cli import CLIError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check a model package (twin vs model, vs torch)")
    p.add_argument("package_dir", metavar="PACKAGE_DIR", help="<repo>/<name>/<version>")
    p.add_argument("--run", dest="run_dir", default=None,
                   help="training run to compare against (torch logits and autograd gradient)")
    p.add_argument("--batch", type=int, default=7, help="random inputs per check (default 7)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dcs.training.export.verify import format_table, verify_package

    if not Path(args.package_dir).is_dir():
        raise CLIError(f"{args.package_dir}: not a directory")
    if args.run_dir is not None and not Path(args.run_dir).is_dir():
        raise CLIError(f"--run {args.run_dir}: not a directory")
    if args.batch < 1:
        raise CLIError(f"--batch must be >= 1, got {args.batch}")
    checks = verify_package(args.package_dir, args.run_dir, batch=args.batch, seed=args.seed)
    print(format_table(checks))
    return 0 if all(c.ok for c in checks) else 1
