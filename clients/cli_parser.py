"""The ``dcsctl`` command line: arguments only (``dcs.clients.cli`` runs the commands)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

PROG = "dcsctl"
DEFAULT_TARGET = "127.0.0.1:8001"


class UsageError(Exception):
    """A bad command line or input file: exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Client for the defended-classifier inference service.")
    p.add_argument("--target", default=os.environ.get("DCS_TARGET", DEFAULT_TARGET),
                   help="server address HOST:PORT, or dns:///HOST:PORT with --round-robin "
                        "(env DCS_TARGET; default %(default)s)")
    p.add_argument("--audit-target", default=os.environ.get("DCS_AUDIT_TARGET"),
                   help="address of the audit service when it has its own port (default: --target)")
    p.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
    p.add_argument("--ca", type=Path, help="CA certificate (PEM) to verify the server with")
    p.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", type=Path, help="client private key (PEM) for mutual TLS")
    p.add_argument("--server-name", help="name to verify the server certificate against")
    p.add_argument("--token-file", type=Path,
                   help="file holding the audit bearer token (else env DCS_AUDIT_TOKEN)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, s (default 10)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries on UNAVAILABLE for idempotent calls (default 3)")
    p.add_argument("--round-robin", action="store_true",
                   help="spread requests over every address the target resolves to")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes or progress bar")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("classify", help="classify images (PNG/JPEG, .npy/.npz, directories)")
    c.add_argument("inputs", nargs="+", metavar="INPUT")
    c.add_argument("--model", required=True)
    c.add_argument("--version", type=int, default=0, help="0 = the serving version")
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--stretch", action="store_true",
                   help="resize even when the aspect ratio differs from the model's")

    m = sub.add_parser("models", help="list served models")
    m.add_argument("--json", action="store_true")

    a = sub.add_parser("audit", help="run a robustness audit with a live progress bar")
    a.add_argument("--model", required=True)
    a.add_argument("--version", type=int, default=0)
    a.add_argument("--suite", default="quick", help="preset: quick | standard | paper")
    a.add_argument("--attack", action="append", dest="attacks", metavar="NAME[:JSON]",
                   help="explicit attack (repeatable), e.g. pgd or 'pgd:{\"steps\": 10}'")
    a.add_argument("--eps", type=float, action="append", help="ε to sweep (repeatable)")
    data = a.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", help="dataset split the server offers (--datasets)")
    data.add_argument("--examples", type=Path, metavar="FILE.npz",
                      help="uploaded examples: x [N, C, H, W] (or images) and y labels")
    a.add_argument("--split", default="test")
    a.add_argument("--limit", type=int, help="at most N examples")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", type=Path, help="folder for report.json (and report.html)")
    a.add_argument("--json", action="store_true", help="print report.json instead of the table")
    a.add_argument("--detach", action="store_true", help="print the job id and return")

    r = sub.add_parser("report", help="fetch a finished job's report")
    r.add_argument("job")
    r.add_argument("--out", type=Path, help="folder for report.json (and report.html)")
    r.add_argument("--json", action="store_true", help="print report.json instead of the table")

    k = sub.add_parser("cancel", help="cancel an audit job")
    k.add_argument("job")

    s = sub.add_parser("audits", help="list audit jobs, newest first")
    s.add_argument("--state", help="filter: queued, running, succeeded, failed, cancelled, "
                                   "interrupted")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--json", action="store_true")
    return p
