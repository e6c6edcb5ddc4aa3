"""``dcsctl``: command line for the defended-classifier service (thin layer over ``Client``).

    dcsctl [--target HOST:PORT] [--tls [--ca FILE]] [--token-file F] COMMAND ...

    classify --model M [--top-k K] [--json] INPUT...    PNG/JPEG, .npy/.npz or directories
    models [--json]
    audit --model M [--suite quick] (--dataset NAME [--limit N] | --examples FILE.npz) [--out DIR]
    report JOB [--out DIR] [--json]
    cancel JOB
    audits [--state STATE] [--limit N]

The target also comes from env ``DCS_TARGET``, the audit bearer token from ``--token-file`` or
env ``DCS_AUDIT_TOKEN``. Results go to stdout; notes (image conversions, retries), the progress
bar and errors go to stderr. Every error is one line ``dcsctl: error: ...`` with a non-zero exit:
1 = the server refused or failed, 2 = bad command line or input, 130 = interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dcs.robustness.manifest import atomic_write_text

PROG = "dcsctl"
DEFAULT_TARGET = "127.0.0.1:8001"
EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger("dcs.clients.cli")


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


# ---------------------------------------------------------------------------------------------
# Output helpers


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain aligned columns (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(r[i]) for r in cells[1:]) and len(cells) > 1
               for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if num else c.ljust(w)
                               for c, w, num in zip(r, widths, numeric)).rstrip())
    return "\n".join(lines)


def _is_num(text: str) -> bool:
    try:
        float(text.rstrip("%"))
        return True
    except ValueError:
        return text in ("-", "")


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def headline_table(report: dict[str, Any]) -> str:
    """Clean, per-attack and worst-case robust accuracy from a report.json dict: one row per
    attack, one column per ε (``*`` marks the headline ε; fixed-ε attacks such as RP2 get a
    ``fixed`` column)."""
    pkg = report.get("package") or {}
    suite = report.get("suite") or {}
    head = report.get("headline") or {}
    name = pkg.get("name", "model")
    ver = f" v{pkg['version']}" if "version" in pkg else ""
    sha = str(pkg.get("sha256", ""))[:12]
    lines = [f"{name}{ver}" + (f" (sha256 {sha}...)" if sha else "")
             + f", suite {suite.get('name', '?')}, {report.get('n_examples', '?')} examples"
             + f", seed {report.get('seed', '?')}",
             f"clean accuracy: {_pct(report.get('clean_accuracy'))}"]
    results = report.get("results", [])
    eps_list = sorted({round(float(r["eps"]), 9) for r in results if not r.get("fixed_eps")}
                      | {round(float(w["eps"]), 9) for w in report.get("worst_case", [])})
    head_eps = round(float(head["eps"]), 9) if head.get("eps") is not None else None
    has_fixed = any(r.get("fixed_eps") for r in results)
    columns = [f"eps={e:g}" + ("*" if e == head_eps else "") for e in eps_list]
    columns += ["fixed"] if has_fixed else []
    rows: dict[str, list[str]] = {}
    for r in results:
        label = str(r.get("label") or r.get("attack"))
        row = rows.setdefault(label, ["-"] * len(columns))
        col = len(columns) - 1 if r.get("fixed_eps") else eps_list.index(round(float(r["eps"]), 9))
        row[col] = _pct(r.get("robust_accuracy"))
    worst = ["-"] * len(columns)
    for w in report.get("worst_case", []):
        worst[eps_list.index(round(float(w["eps"]), 9))] = _pct(w.get("robust_accuracy"))
    table = [[label, *cells] for label, cells in rows.items()] + [["worst case", *worst]]
    lines.append(format_table(["robust accuracy", *columns], table))
    if head:
        lines.append(f"headline (*): worst-case robust accuracy "
                     f"{_pct(head.get('robust_accuracy'))} at eps {head.get('eps', 0):g}")
    for c in report.get("checks", []):
        if c.get("status") == "warn":
            lines.append(f"check {c.get('name')}: WARN {c.get('detail', '')}")
    return "\n".join(lines)


def _prepare_out(out: Path | None) -> None:
    """Fail before the expensive part: the output folder must be creatable and writable."""
    if out is None:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out}: folder is not writable")


def _save_report(client, job: str, report: dict[str, Any], out: Path) -> list[Path]:
    paths = [out / "report.json"]
    atomic_write_text(paths[0], json.dumps(report, indent=2, sort_keys=True) + "\n")
    html = client.report_html(job)
    if html:
        paths.append(out / "report.html")
        atomic_write_text(paths[1], html)
    return paths


# ---------------------------------------------------------------------------------------------
# Commands


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get("DCS_AUDIT_TOKEN", "").strip() or None


def _make_client(args: argparse.Namespace):
    from dcs.clients.client import Client, TLSConfig

    if (args.ca or args.cert or args.key or args.server_name) and not args.tls:
        raise UsageError("--ca/--cert/--key/--server-name need --tls")
    for flag in ("ca", "cert", "key"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise UsageError(f"--{flag} {path}: no such file")
    tls = (TLSConfig(args.ca, args.cert, args.key, args.server_name) if args.tls else False)
    if args.timeout <= 0:
        raise UsageError(f"--timeout is {args.timeout}; expected > 0")
    if args.retries < 0:
        raise UsageError(f"--retries is {args.retries}; expected >= 0")
    return Client(args.target, tls=tls, token=_read_token(args), timeout_s=args.timeout,
                  retries=args.retries, round_robin=args.round_robin,
                  audit_target=args.audit_target)


def cmd_classify(args: argparse.Namespace) -> int:
    from dcs.clients.images import load_inputs, to_model_input

    if args.top_k < 0:
        raise UsageError(f"--top-k is {args.top_k}; expected >= 0")
    sources = load_inputs(args.inputs)  # read files before any call
    with _make_client(args) as client:
        info = client.model(args.model, args.version)
        batch = to_model_input(sources, info.input.shape if info.input else info.input_shape,
                               stretch=args.stretch)
        preds = client.classify(batch.x, args.model, args.version, args.top_k)
    if args.json:
        ref = preds[0].model if preds else info.ref
        _out(json.dumps({
            "model": {"name": ref.name, "version": ref.version, "sha256": ref.sha256,
                      "provider": ref.provider},
            "notes": list(batch.notes),
            "predictions": [{"input": name, "label": p.label, "index": p.index,
                             "probability": p.probability,
                             "top": [{"index": s.index, "label": s.label,
                                      "probability": s.probability, "logit": s.logit}
                                     for s in p.top]}
                            for name, p in zip(batch.names, preds)]}, indent=2))
        return EXIT_OK
    rows = [[name, p.label, f"{p.probability:.4f}",
             ", ".join(f"{s.label}:{s.probability:.3f}" for s in p.top[1:])]
            for name, p in zip(batch.names, preds)]
    _out(format_table(["input", "label", "prob", "next"], rows))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    with _make_client(args) as client:
        models = client.models()
    if args.json:
        _out(json.dumps([{"name": m.name, "version": m.version, "sha256": m.sha256,
                          "provider": m.ref.provider, "input_shape": list(m.input_shape),
                          "labels": list(m.labels), "dataset": m.dataset, "defense": m.defense,
                          "ready": m.ready} for m in models], indent=2))
        return EXIT_OK
    rows = [[m.name, m.version, "x".join(str(v) for v in m.input_shape), len(m.labels),
             m.dataset or "-", m.defense or "-", "yes" if m.ready else "no", m.sha256[:12],
             m.ref.provider] for m in models]
    _out(format_table(["model", "version", "input", "classes", "dataset", "defense", "ready",
                       "sha256", "provider"], rows))
    return EXIT_OK


def _parse_attack(text: str) -> tuple[str, dict[str, Any]]:
    name, _, params = text.partition(":")
    if not name:
        raise UsageError(f"--attack {text!r}: missing attack name")
    if not params:
        return name, {}
    try:
        value = json.loads(params)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--attack {text!r}: parameters are not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--attack {text!r}: parameters must be a JSON object")
    return name, value


def _progress_bar(quiet: bool):
    from tqdm import tqdm

    return tqdm(total=1000, unit="‰", file=sys.stderr, disable=quiet, dynamic_ncols=True,
                bar_format="{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")


def cmd_audit(args: argparse.Namespace) -> int:
    from dcs.clients.results import AuditState

    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit is {args.limit}; expected a positive number of examples")
    attacks = [_parse_attack(a) for a in args.attacks or ()]
    _prepare_out(args.out)
    with _make_client(args) as client:
        kwargs: dict[str, Any] = {}
        if args.examples is not None:
            from dcs.clients.images import load_file, to_model_input

            src = load_file(args.examples)
            if src.labels is None:
                raise UsageError(f"--examples {args.examples}: no labels; expected an .npz with "
                                 f"x (images) and y (labels)")
            info = client.model(args.model, args.version)
            batch = to_model_input([src], info.input.shape if info.input else info.input_shape)
            kwargs.update(examples=batch.x, labels=batch.labels)
        else:
            kwargs.update(dataset=args.dataset, split=args.split)
        job = client.start_audit(args.model, version=args.version, suite=args.suite,
                                 attacks=attacks or None, eps=args.eps, limit=args.limit,
                                 seed=args.seed, **kwargs)
        sys.stderr.write(f"{PROG}: audit job {job} started\n")
        if args.detach:
            _out(job)
            return EXIT_OK
        try:
            bar = _progress_bar(args.quiet)
            with bar:
                for ev in client.watch(job):
                    bar.n = round(1000 * min(max(ev.fraction, 0.0), 1.0))
                    if ev.attack:
                        bar.set_description_str(f"{ev.attack} eps={ev.eps:g} ", refresh=False)
                    post = {"examples": f"{ev.examples_done}/{ev.examples_total}"}
                    if ev.robust_accuracy is not None:
                        post["robust"] = f"{100 * ev.robust_accuracy:.1f}%"
                    post["state"] = ev.state.value.lower()
                    bar.set_postfix(post, refresh=False)
                    bar.refresh()
        except KeyboardInterrupt:
            sys.stderr.write(f"\n{PROG}: stopped watching; job {job} keeps running on the server "
                             f"({PROG} cancel {job} stops it)\n")
            return EXIT_INTERRUPTED
        status = client.audit(job)
        if status.state is not AuditState.SUCCEEDED:
            why = f": {status.error}" if status.error else ""
            raise _JobEnded(f"audit job {job} ended {status.state.value}{why}")
        report = client.report(job)
        saved = _save_report(client, job, report, args.out) if args.out else []
    _print_report(report, args.json)
    for path in saved:
        sys.stderr.write(f"{PROG}: wrote {path}\n")
    return EXIT_OK


class _JobEnded(Exception):
    """The audit finished in a state other than SUCCEEDED (exit 1)."""


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _out(json.dumps(report, indent=2, sort_keys=True))
    else:
        _out(headline_table(report))


def cmd_report(args: argparse.Namespace) -> int:
    _prepare_out(args.out)
    with _make_client(args) as client:
        report = client.report(args.job)
        saved = _save_report(client, args.job, report, args.out) if args.out else []
    _print_report(report, args.json)
    for path in saved:
        sys.stderr.write(f"{PROG}: wrote {path}\n")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _make_client(args) as client:
        status = client.cancel(args.job)
    _out(f"{status.job_id} {status.state.value}")
    return EXIT_OK


def cmd_audits(args: argparse.Namespace) -> int:
    from dcs.clients.results import AuditState

    state = None
    if args.state:
        try:
            state = AuditState(args.state.upper())
        except ValueError:
            raise UsageError(f"--state {args.state!r}; expected one of "
                             f"{[s.value.lower() for s in AuditState if s.value != 'UNSPECIFIED']}"
                             ) from None
    with _make_client(args) as client:
        jobs = client.audits(limit=args.limit, state=state)
    if args.json:
        _out(json.dumps([{"job_id": j.job_id, "state": j.state.value, "model": j.model.name,
                          "version": j.model.version, "suite": j.suite,
                          "clean_accuracy": j.clean_accuracy, "robust_accuracy": j.robust_accuracy,
                          "created_unix_s": j.created_unix_s, "error": j.error} for j in jobs],
                        indent=2))
        return EXIT_OK
    rows = [[j.job_id, j.state.value.lower(), f"{j.model.name} v{j.model.version}", j.suite,
             f"{100 * j.progress.fraction:.0f}%", _pct(j.clean_accuracy), _pct(j.robust_accuracy)]
            for j in jobs]
    _out(format_table(["job", "state", "model", "suite", "done", "clean", "robust"], rows))
    return EXIT_OK


COMMANDS = {"classify": cmd_classify, "models": cmd_models, "audit": cmd_audit,
            "report": cmd_report, "cancel": cmd_cancel, "audits": cmd_audits}


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: note: {record.getMessage()}"


@contextlib.contextmanager
def _logging_to_stderr(quiet: bool) -> Iterator[None]:
    """Send the library's notes to stderr for one command; the caller's logging is restored
    afterwards (main() may run in-process, e.g. from tests or another program)."""
    root = logging.getLogger("dcs.clients")
    saved = (root.handlers[:], root.level, root.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        root.propagate = saved[2]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (never raises for expected failures)."""
    from dcs.clients.errors import ClientError
    from dcs.clients.images import ImageError

    def fail(message: str, code: int) -> int:
        sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
        return code

    try:
        try:
            args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        except SystemExit as exc:  # --help
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
        with _logging_to_stderr(args.quiet):
            return COMMANDS[args.command](args)
    except UsageError as exc:
        return fail(str(exc), EXIT_USAGE)
    except ImageError as exc:
        return fail(str(exc), EXIT_USAGE)
    except ClientError as exc:
        return fail(str(exc), EXIT_SERVER)
    except _JobEnded as exc:
        return fail(str(exc), EXIT_SERVER)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:
        return fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), EXIT_SERVER)


if __name__ == "__main__":
    sys.exit(main())
