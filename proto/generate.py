"""Regenerate (or check) the protobuf/gRPC stubs: ``python -m proto.generate [--check]``.

Stubs are generated from the repository root with ``-I .`` so the generated code imports its
siblings as ``from proto import ..._pb2`` and works for ``server`` and ``clients`` alike.
``--check`` regenerates into a temporary folder and fails if any committed stub differs.
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SOURCES = ("classifier.proto", "grpc_predict_v2.proto")


def outputs_for(source: str) -> list[str]:
    stem = source.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_root: Path) -> None:
    """Run protoc for every source, writing under ``out_root/proto``."""
    import importlib.resources

    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    (out_root / "proto").mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}",
                f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", f"proto/{source}"]
        rc = protoc.main(args)
        if rc != 0:
            raise SystemExit(f"protoc failed on proto/{source} (exit {rc})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed stubs differ from freshly generated ones")
    args = parser.parse_args(argv)
    if not args.check:
        generate(ROOT)
        print(f"generated stubs for {', '.join(SOURCES)} in {PROTO_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for source in SOURCES:
            for name in outputs_for(source):
                fresh, committed = Path(tmp) / "proto" / name, PROTO_DIR / name
                if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                    stale.append(name)
        if stale:
            print(f"stale or missing generated stubs: {', '.join(stale)}; run `make proto`",
                  file=sys.stderr)
            return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
