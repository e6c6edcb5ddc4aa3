"""Server configuration: one frozen ``ServerConfig``; defaults < config file < ``DCS_*`` env < flags.

Every option is declared once in ``OPTIONS`` (name, type, default, help); the argparse flags
(``--max-batch``), the env vars (``DCS_MAX_BATCH``) and the file keys (``max_batch`` or
``max-batch`` in YAML/TOML) are derived from it. ``--config FILE`` / ``DCS_CONFIG`` picks the
file. ``load_config(argv, environ)`` parses at the edge and returns a validated ServerConfig.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "DCS_"
DEVICES = ("auto", "cuda", "cpu")
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
MiB = 1 << 20


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option, the value and the rule."""


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _csv(text: Any) -> tuple[str, ...]:
    if isinstance(text, (list, tuple)):
        items = [str(t) for t in text]
    else:
        items = str(text).split(",")
    return tuple(s.strip() for s in items if s.strip())


def _opt_path(text: Any) -> Path | None:
    return Path(str(text)) if text not in (None, "") else None


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("repo", _opt_path, None, "model repository: <repo>/<name>/<version>/ (required)"),
    Option("host", str, "0.0.0.0", "address to bind (gRPC, audit and metrics ports)"),
    Option("port", int, 8001, "gRPC port (Classifier, inference, health, reflection, audits)"),
    Option("metrics_port", int, 8002, "Prometheus /metrics HTTP port; 0 disables"),
    Option("audit_port", int, 0, "separate port for the Audit service; 0 = the main port"),
    Option("device", str, "auto", "ONNX Runtime device", choices=DEVICES),
    Option("intra_op_threads", int, 0, "ORT intra-op threads per classify session; 0 = ORT decides"),
    Option("max_batch", int, 32, "largest dynamic batch (examples); larger requests are refused"),
    Option("max_queue_delay_ms", float, 2.0, "longest wait to fill a batch, milliseconds; applied "
           "under load only (after a batch of one request the next goes at once)"),
    Option("max_queue", int, 256, "requests waiting per model before RESOURCE_EXHAUSTED"),
    Option("inline_compute_ms", float, 0.0,
           "run a batch on the event-loop thread when its measured ORT time is below this, ms "
           "(a thread hand-off costs more than tiny models compute); 0 = always a worker thread"),
    Option("inline_lone_ms", float, 1.0,
           "a request that arrives alone (it and the one before it each made a batch of one, and "
           "nothing else is queued or computing) runs on the event-loop thread when its measured "
           "ORT time is below this, ms: nobody else waits for the loop (bench: one client 11-19 "
           "percent more req/s); 0 = never"),
    Option("batch_overlap", str, "off",
           "on: collect the next batch while one computes and send it the moment the model is "
           "free (for models whose compute is the limit, e.g. on a GPU); off: start collecting "
           "once the batch is done, which makes bigger batches when the event loop is the limit",
           choices=("off", "on")),
    Option("worker_niceness", int, 10,
           "niceness added to each model's worker thread (Linux): when cores are short the "
           "event loop, which every request passes, keeps its core (bench: 7-14 percent more classify "
           "req/s at 64 clients on 2 cores); 0 = same priority as the loop"),
    Option("max_message_bytes", int, 16 * MiB, "largest gRPC message accepted or sent, bytes"),
    Option("tls_cert", _opt_path, None, "PEM certificate chain; with --tls-key enables TLS"),
    Option("tls_key", _opt_path, None, "PEM private key for --tls-cert"),
    Option("audit_token_file", _opt_path, None,
           "file holding the bearer token for audit methods (or env DCS_AUDIT_TOKEN)"),
    Option("audit_token", str, None, "bearer token for audit methods (env only)", secret=True),
    Option("state_dir", Path, Path("./.state"), "audit job database and reports"),
    Option("datasets", _csv, (), "named dataset splits audits may use, comma separated"),
    Option("data_dir", _opt_path, None, "root folder for the named datasets (loader default if unset)"),
    Option("grace_period_s", float, 20.0, "SIGTERM drain time for in-flight RPCs, seconds"),
    Option("poll_interval_s", float, 10.0, "repository rescan interval, seconds; 0 = SIGHUP only"),
    Option("max_concurrent_audits", int, 1, "audit jobs running at once; more are refused"),
    Option("max_audit_examples", int, 1000, "examples per audit job"),
    Option("max_audit_gradients", int, 5_000_000, "per-example gradient evaluations per audit job"),
    Option("max_audit_queries", int, 50_000_000,
           "per-example model queries (logits) per audit job; bounds score-only attacks"),
    Option("audit_threads", int, 1, "ORT intra-op threads per audit job session"),
    Option("audit_niceness", int, 19,
           "niceness added to audit threads (Linux; capped at 19): audits are background work "
           "that yields the CPU to classify; 0 = same priority as the event loop"),
    Option("event_loop", str, "asyncio", "event loop: asyncio (the loop gRPC tests grpc.aio on), "
           "uvloop (libuv; more classify throughput in bench/, less tested with grpc.aio), or "
           "auto = uvloop when installed", choices=EVENT_LOOPS),
    Option("log_level", str, "info", "logging level", choices=LOG_LEVELS),
)
_BY_NAME = {o.name: o for o in OPTIONS}
#: Options that can only come from the environment (secrets never on a command line).
ENV_ONLY = frozenset({"audit_token"})


@dataclass(frozen=True)
class ServerConfig:
    repo: Path
    host: str = "0.0.0.0"
    port: int = 8001
    metrics_port: int = 8002
    audit_port: int = 0
    device: str = "auto"
    intra_op_threads: int = 0
    max_batch: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256
    inline_compute_ms: float = 0.0
    inline_lone_ms: float = 1.0
    batch_overlap: str = "off"
    worker_niceness: int = 10
    max_message_bytes: int = 16 * MiB
    tls_cert: Path | None = None
    tls_key: Path | None = None
    audit_token_file: Path | None = None
    audit_token: str | None = dataclasses.field(default=None, repr=False)
    state_dir: Path = Path("./.state")
    datasets: tuple[str, ...] = ()
    data_dir: Path | None = None
    grace_period_s: float = 20.0
    poll_interval_s: float = 10.0
    max_concurrent_audits: int = 1
    max_audit_examples: int = 1000
    max_audit_gradients: int = 5_000_000
    max_audit_queries: int = 50_000_000
    audit_threads: int = 1
    audit_niceness: int = 19
    event_loop: str = "asyncio"
    log_level: str = "info"
    config_file: Path | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            opt = _BY_NAME.get(name)
            where = f" (from {self.sources.get(name, 'default')})" if self.sources else ""
            label = opt.flag if opt else name
            return ConfigError(f"{label}={getattr(self, name)!r}{where}: {rule}")

        if self.repo is None:
            raise ConfigError("--repo is required (or DCS_REPO, or repo: in the config file)")
        if not Path(self.repo).is_dir():
            raise bad("repo", "must be an existing directory")
        for name in ("port",):
            if not 0 <= getattr(self, name) <= 65535:
                raise bad(name, "expected 0..65535 (0 = pick a free port)")
        for name in ("metrics_port", "audit_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise bad(name, "expected 0..65535 (0 disables / shares the main port)")
        for name in ("max_batch", "max_queue", "max_concurrent_audits", "max_audit_examples",
                     "max_audit_gradients", "max_audit_queries", "audit_threads"):
            if getattr(self, name) < 1:
                raise bad(name, "expected an integer >= 1")
        ports = {"port": self.port, "metrics_port": self.metrics_port, "audit_port": self.audit_port}
        for a, b in (("port", "metrics_port"), ("port", "audit_port"), ("metrics_port", "audit_port")):
            if ports[a] and ports[a] == ports[b]:
                raise bad(b, f"must differ from --{a.replace('_', '-')}={ports[a]}")
        for name in ("worker_niceness", "audit_niceness"):
            if not 0 <= getattr(self, name) <= 19:
                raise bad(name, "expected 0..19 (added to the thread's niceness, capped at 19)")
        if self.intra_op_threads < 0:
            raise bad("intra_op_threads", "expected >= 0 (0 = ORT decides)")
        if self.max_message_bytes < 1024:
            raise bad("max_message_bytes", "expected >= 1024 bytes")
        for name in ("max_queue_delay_ms", "inline_compute_ms", "inline_lone_ms", "grace_period_s",
                     "poll_interval_s"):
            if not getattr(self, name) >= 0:
                raise bad(name, "expected a number >= 0")
        if self.device not in DEVICES:
            raise bad("device", f"expected one of {', '.join(DEVICES)}")
        if self.log_level not in LOG_LEVELS:
            raise bad("log_level", f"expected one of {', '.join(LOG_LEVELS)}")
        if self.event_loop not in EVENT_LOOPS:
            raise bad("event_loop", f"expected one of {', '.join(EVENT_LOOPS)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise bad("tls_cert" if self.tls_cert is None else "tls_key",
                      "--tls-cert and --tls-key must be given together")
        for name in ("tls_cert", "tls_key", "audit_token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise bad(name, "file does not exist")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def resolved_audit_token(self) -> str | None:
        """The audit bearer token: DCS_AUDIT_TOKEN wins over --audit-token-file."""
        if self.audit_token:
            return self.audit_token.strip()
        if self.audit_token_file is not None:
            token = Path(self.audit_token_file).read_text().strip()
            return token or None
        return None

    def describe(self) -> dict[str, Any]:
        """The effective configuration with each value's source; secrets redacted."""
        out: dict[str, Any] = {}
        for opt in OPTIONS:
            value = getattr(self, opt.name)
            if opt.secret:
                value = "<set>" if value else None
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[opt.name] = {"value": value, "source": self.sources.get(opt.name, "default")}
        out["config_file"] = {"value": str(self.config_file) if self.config_file else None,
                              "source": self.sources.get("config_file", "default")}
        return out

    def log(self, logger: logging.Logger) -> None:
        logger.info("effective configuration (defaults < file < env < flags): %s",
                    json.dumps(self.describe(), sort_keys=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcs-server",
        description="Defended-classifier inference server (gRPC: classifier.v1, KServe v2, "
                    "health, reflection; Prometheus metrics). Every flag also reads DCS_<FLAG>.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help="YAML or TOML file (env DCS_CONFIG)")
    for opt in OPTIONS:
        if opt.name in ENV_ONLY:
            continue
        kwargs: dict[str, Any] = {"help": f"{opt.help} [env {opt.env}; default {opt.default!r}]"}
        if opt.choices:
            kwargs["choices"] = opt.choices
        parser.add_argument(opt.flag, dest=opt.name, **kwargs)
    return parser


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--config={str(path)!r}: cannot read ({exc.strerror})") from None
    try:
        if Path(path).suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - yaml/toml raise their own types
        raise ConfigError(f"--config={str(path)!r}: not valid YAML/TOML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config={str(path)!r}: expected a mapping of option: value")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _BY_NAME:
            raise ConfigError(f"--config={str(path)!r}: unknown option {key!r}; expected one of "
                              f"{', '.join(o.name for o in OPTIONS)}")
        out[name] = value
    return out


def _coerce(opt: Option, raw: Any, source: str) -> Any:
    if raw is None:
        return None
    try:
        return opt.parse(raw)
    except (TypeError, ValueError) as exc:
        shown = "<redacted>" if opt.secret else repr(raw)
        raise ConfigError(f"{opt.flag}={shown} (from {source}): {exc}") from None


def load_config(argv: Sequence[str] | None = None,
                environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Merge defaults < file < env < flags into a validated ServerConfig. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    sources: dict[str, str] = {}

    config_path = args.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG") or None
    if config_path:
        sources["config_file"] = "flag" if "config" in (argv or []) else "env"
        for name, raw in read_config_file(Path(config_path)).items():
            if name in ENV_ONLY:
                raise ConfigError(f"{name} may only come from the environment ({_BY_NAME[name].env})")
            values[name] = _coerce(_BY_NAME[name], raw, f"file {config_path}")
            sources[name] = "file"
    for opt in OPTIONS:
        if opt.env in environ:
            values[opt.name] = _coerce(opt, environ[opt.env], f"env {opt.env}")
            sources[opt.name] = "env"
    for name, raw in args.items():
        values[name] = _coerce(_BY_NAME[name], raw, "flag")
        sources[name] = "flag"
    for opt in OPTIONS:
        if opt.choices and values[opt.name] is not None:
            values[opt.name] = str(values[opt.name]).lower()
    return ServerConfig(**values, config_file=Path(config_path) if config_path else None,
                        sources=sources)
