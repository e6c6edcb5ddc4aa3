"""Start real servers for tests (reused by the client and deploy tests).

- ``start_server_process(repo, *flags, env=None)``: ``python -m dcs.server`` in a child process on
  free loopback ports (a ``--port``/``--metrics-port``/``--audit-port`` in ``flags`` wins; with
  ``--tls-cert`` the readiness probe uses TLS with that cert as CA) with torch blocked (``tests.torchless.BLOCK_TORCH``); waits for health
  SERVING (or not, ``wait_ready=False``). ``ServerProcess.stop()`` sends SIGTERM, waits, and
  raises if the child ever imported torch. Also usable as a context manager.
- ``InProcessServer(repo, **config_overrides)``: a ``dcs.server.app.Server`` on 127.0.0.1:0 whose
  asyncio loop runs in a background thread; use ``.target`` with ordinary sync grpc channels,
  ``.call(coro_fn)`` to run something on the server's loop, ``.stop()``.
- ``free_port()``, ``wait_for_health(target, service="", timeout=...)``,
  ``scrape_metrics(port) -> {name: [Sample]}`` (parsed with prometheus_client.parser).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.torchless import BLOCK_TORCH

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# The child imports the server with torch made unimportable, and reports any torch module at exit.
_CHILD = (
    "import sys, atexit\n"
    + BLOCK_TORCH +
    "def _report():\n"
    "    bad = sorted(m for m, v in sys.modules.items() if m.split('.')[0] == 'torch' and v is not None)\n"
    "    sys.stderr.write('DCS_TORCH_MODULES=%s\\n' % ','.join(bad)); sys.stderr.flush()\n"
    "atexit.register(_report)\n"
    "from dcs.server.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_health(target: str, service: str = "", timeout: float = 30.0,
                    want: int = health_pb2.HealthCheckResponse.SERVING,
                    proc: subprocess.Popen | None = None, ca_file: str | Path | None = None) -> None:
    """Poll grpc.health.v1 Check until ``service`` reports ``want`` (TLS when ``ca_file``)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(ca_file).read_bytes()))
               if ca_file else grpc.insecure_channel(target))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0).status
                if status == want:
                    return
                last = status
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(0.05)
    raise TimeoutError(f"health of {service!r} at {target} is {last}, wanted {want}, after {timeout} s")


def scrape_metrics(port: int, timeout: float = 5.0) -> dict[str, list]:
    """GET /metrics and parse it; returns {family name: [Sample, ...]}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    return {fam.name: list(fam.samples) for fam in text_string_to_metric_families(text)}


def sample_value(families: dict[str, list], sample_name: str, **labels: str) -> float:
    """Sum of samples called ``sample_name`` whose labels include ``labels``."""
    total = 0.0
    for samples in families.values():
        for s in samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    audit_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)
    #: a temporary folder the helper made for logs and state; removed once the child has ended
    #: (its log stays readable through ``logs()``)
    owned_dir: Path | None = None
    _final_logs: str | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def audit_target(self) -> str:
        return f"{HOST}:{self.audit_port or self.port}"

    def logs(self) -> str:
        if self._final_logs is not None:
            return self._final_logs
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _release(self) -> None:
        """Keep the log in memory and remove the helper's own temporary folder (child ended)."""
        if self.owned_dir is not None and self.proc.poll() is not None:
            self._final_logs = self.logs()
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            self.owned_dir = None

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0, check_torch: bool = True) -> int:
        """Signal the child and wait; returns its exit code. Kills it after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                self._release()
                raise TimeoutError(f"server did not stop within {timeout} s; logs:\n{self.logs()[-3000:]}")
        self._release()
        if check_torch:
            logs = self.logs()
            for line in logs.splitlines():
                if line.startswith("DCS_TORCH_MODULES=") and line.split("=", 1)[1].strip():
                    raise AssertionError(f"server process imported torch: {line}")
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._release()


def start_server_process(repo: str | Path, *flags: str, env: dict[str, str] | None = None,
                         metrics: bool = True, audit_port: bool = False,
                         state_dir: str | Path | None = None, wait_ready: bool = True,
                         timeout: float = 60.0, log_dir: str | Path | None = None) -> ServerProcess:
    """Run ``python -m dcs.server --repo REPO`` on free loopback ports (torch blocked)."""
    port, mport = free_port(), (free_port() if metrics else 0)
    aport = free_port() if audit_port else 0
    owned = None if log_dir else Path(tempfile.mkdtemp(prefix="dcs-server-"))
    log_dir = Path(log_dir) if log_dir else owned
    state_dir = Path(state_dir) if state_dir else log_dir / "state"
    args = ["--repo", str(repo), "--host", HOST, "--port", str(port), "--metrics-port", str(mport),
            "--audit-port", str(aport), "--state-dir", str(state_dir), "--grace-period-s", "10",
            "--poll-interval-s", "0", "--intra-op-threads", "1", *flags]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    child_env = {k: v for k, v in child_env.items() if not k.startswith("DCS_")}
    child_env.update(env or {})
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=child_env,
                                stdout=log, stderr=subprocess.STDOUT)
    given = _last_flags(flags)  # a flag repeated in ``flags`` wins (argparse keeps the last)
    sp = ServerProcess(proc, int(given.get("--port", port)), int(given.get("--metrics-port", mport)),
                       int(given.get("--audit-port", aport)), log_path, args, owned)
    if wait_ready:
        try:
            wait_for_health(sp.target, timeout=timeout, proc=proc, ca_file=given.get("--tls-cert"))
        except Exception:  # noqa: BLE001 - any failure: kill the child, show its log
            sp.__exit__()
            raise RuntimeError(f"server did not become healthy; logs:\n{sp.logs()[-4000:]}") from None
    return sp


def _last_flags(flags: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, flag in enumerate(flags[:-1]):
        if flag.startswith("--"):
            out[flag] = flags[i + 1]
    return out


class InProcessServer:
    """A real grpc.aio Server on 127.0.0.1 with its event loop in a background thread."""

    def __init__(self, repo: str | Path, *, scan: bool = True, metrics_http: bool = False,
                 **overrides: Any) -> None:
        from dcs.server.config import ServerConfig

        state = overrides.pop("state_dir", None)
        #: the state folder this helper made (removed by ``stop``); None when the test gave one
        self.owned_state = None if state else Path(tempfile.mkdtemp(prefix="dcs-state-"))
        state = state or self.owned_state
        defaults = {"host": HOST, "port": 0, "metrics_port": 0, "audit_port": 0,
                    "poll_interval_s": 0, "grace_period_s": 5, "intra_op_threads": 1,
                    "state_dir": Path(state)}
        defaults.update(overrides)
        self.config = ServerConfig(repo=Path(repo), **defaults)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dcs-test-server",
                                        daemon=True)
        self._thread.start()
        from dcs.server.app import Server

        self.server = self.call(lambda: _make(Server, self.config))
        self.call(lambda: self.server.start(scan=scan))
        self.metrics_port = self.server.start_metrics_on_free_port() if metrics_http else None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"{HOST}:{self.server.port}"

    @property
    def audit_target(self) -> str:
        return f"{HOST}:{self.server.audit_port or self.server.port}"

    def call(self, fn, timeout: float = 60.0):
        """Run ``fn()`` (a coroutine function) on the server's loop and return its result."""
        async def runner():
            return await fn()
        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)

    def reload(self) -> None:
        self.call(self.server.reload)

    def stop(self, grace: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(lambda: self.server.stop(grace), timeout=grace + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()
            if self.owned_state is not None:
                shutil.rmtree(self.owned_state, ignore_errors=True)

    def __enter__(self) -> InProcessServer:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _make(cls, config):
    return cls(config)


def task_niceness(pid: int | str = "self") -> dict[int, int]:
    """Niceness of every thread of process ``pid`` by thread id (Linux: field 19 of
    ``/proc/<pid>/task/<tid>/stat``)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out
