"""``dcs export RUN_DIR --repo MODEL_REPO --name NAME``: a trained run → a model package."""
from __future__ import annotations

import argparse
import logging

from dcs.training.cli import CLIError

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained run as a model package (ONNX + gradient twin)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="finished training run (holds final.pt)")
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--name", required=True, help="model name (letters, digits, '_', '-', '.')")
    p.add_argument("--version", type=int, default=None, help="version number (default: next free)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.add_argument("--twin-gradient", choices=("bpda", "exact"), default="bpda",
                   help="saturation backward in model.grad.onnx: bpda (straight-through, default) or exact "
                        "(true zero gradient: a masked twin for 'without BPDA' evaluations)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dcs.training.export.exporter import export_run
    from dcs.training.export.package_writer import ExportError

    if not Path(args.run_dir).is_dir():
        raise CLIError(f"{args.run_dir}: not a directory")
    try:
        result = export_run(args.run_dir, args.repo, args.name, version=args.version,
                            opset=args.opset, force=args.force,
                            twin_gradient=args.twin_gradient)
    except ExportError as exc:
        raise CLIError(str(exc)) from None
    sizes = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in result.sizes.items())
    print(f"exported {result.path} in {result.seconds:.1f}s; gradient {result.gradient['kind']}"
          f"{' ' + str(result.gradient['bpda_layers']) if result.gradient['bpda_layers'] else ''}; {sizes}")
    return 0
