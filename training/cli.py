"""``dcs``: the offline command line (train, export, verify, evaluate, compare, reproduce).

Each subcommand lives in ``training/commands/<name>.py`` and exposes ``add_parser(subparsers)``
and ``run(args) -> int``. Subcommands import torch lazily, so ``dcs evaluate`` works without it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMANDS = ("train", "export", "verify", "evaluate", "compare", "merge", "reproduce")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcs", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dcs.training.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dcs.training.commands.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except CLIError as exc:
        print(f"dcs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dcs {args.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``dcs`` entry point: ``main()``, then a torchrun worker ends through ``exit_worker``."""
    code = main()
    distributed = sys.modules.get("dcs.training.distributed")  # loaded only by a train run (torch)
    if distributed is not None and distributed.group_was_initialized():
        distributed.exit_worker(code)
    return code


if __name__ == "__main__":
    # Run through the package module so commands and this entry point share one CLIError class.
    from dcs.training.cli import console_main as _console_main

    sys.exit(_console_main())
