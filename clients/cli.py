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

from dcs.clients.cli_parser import PROG, UsageError, build_parser
from dcs.clients.render import format_table, headline_table, percent
from dcs.robustness.manifest import atomic_write_text

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger("dcs.clients.cli")


# ---------------------------------------------------------------------------------------------
# Output helpers


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


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
             f"{100 * j.progress.fraction:.0f}%", percent(j.clean_accuracy), percent(j.robust_accuracy)]
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
