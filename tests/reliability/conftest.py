"""Reliability and security suite (issue 11): shared fixtures, a real server process per module,
and the stress figures every test records (written as JSON when ``DCS_STRESS_OUT`` is set;
``scripts/stress_summary.py`` turns them into ``results/stress/``).

Everything talks to 127.0.0.1 only; every loop is bounded in count and time.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.server_helpers import start_server_process

MODEL = "digits-mlp"
TOKEN = "rel-t0ken-4f9c2a7e1b"  # only ever sent by these tests; grepped for in server logs
AUTH = [("authorization", f"Bearer {TOKEN}")]


class Stats:
    """Figures for the stress summary: cases tried, requests served, codes, RSS, recovery."""

    def __init__(self) -> None:
        self.cases: Counter = Counter()        # fuzz cases per RPC
        self.codes: Counter = Counter()        # status code name -> count, over the whole suite
        self.sections: dict[str, dict] = {}    # per test: free-form figures
        self.max_rss_kib = 0

    def code(self, name: str, n: int = 1) -> None:
        self.codes[name] += n

    def rss(self, kib: int) -> None:
        self.max_rss_kib = max(self.max_rss_kib, int(kib))

    def section(self, name: str, **figures) -> None:
        self.sections.setdefault(name, {}).update(figures)

    def to_dict(self) -> dict:
        return {"cases": dict(self.cases), "cases_total": sum(self.cases.values()),
                "codes": dict(self.codes), "requests_total": sum(self.codes.values()),
                "requests_ok": self.codes.get("OK", 0), "max_rss_kib": self.max_rss_kib,
                "sections": self.sections}


_STATS = Stats()


@pytest.fixture(scope="session")
def stats() -> Stats:
    return _STATS


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("DCS_STRESS_OUT")
    if out and (_STATS.cases or _STATS.codes or _STATS.sections):
        data = _STATS.to_dict()
        data.update(exitstatus=int(exitstatus), finished_unix_s=time.time(),
                    tests_collected=session.testscollected, tests_failed=session.testsfailed)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def proc_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in KiB, from /proc (no psutil needed)."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


@pytest.fixture(scope="session")
def base_repo(tmp_path_factory) -> Path:
    """One trained digits package (training it costs seconds on a busy machine: do it once)."""
    from dcs.robustness.testing import digits_package

    repo = tmp_path_factory.mktemp("rel-repo")
    digits_package(repo, name=MODEL, version=1)
    return repo


@pytest.fixture
def repo_copy(base_repo, tmp_path) -> Path:
    """A private copy of the repository that a test may damage."""
    dst = tmp_path / "repo"
    shutil.copytree(base_repo, dst)
    return dst


@pytest.fixture(scope="session")
def reference(base_repo):
    """In-process ORT session over the same package: the answers the server must give."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(base_repo / MODEL / "1" / "model.onnx"), so,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def code_name(exc: grpc.RpcError) -> str:
    return exc.code().name


def checked_call(fn, request, stats: Stats | None = None, **kw) -> tuple[str, object]:
    """Call a unary RPC; returns (code name, response or details)."""
    try:
        resp = fn(request, **kw)
    except grpc.RpcError as exc:
        if stats is not None:
            stats.code(exc.code().name)
        return exc.code().name, exc.details()
    if stats is not None:
        stats.code("OK")
    return "OK", resp


def start_proc(repo: Path, *flags: str, tmp: Path, token: bool = True, **kw):
    """A real ``python -m dcs.server`` child on loopback (torch blocked), audit token from the env."""
    env = {"DCS_AUDIT_TOKEN": TOKEN} if token else {}
    env.update(kw.pop("env", {}) or {})
    log_dir = tmp / f"logs-{time.monotonic_ns()}"
    log_dir.mkdir(parents=True)
    return start_server_process(repo, *flags, env=env, log_dir=log_dir, **kw)


def assert_no_tracebacks(logs: str) -> None:
    bad = [line for line in logs.splitlines()
           if "Traceback" in line or "unhandled error" in line or "Unexpected" in line]
    assert not bad, "server log shows Python exceptions:\n" + "\n".join(bad[:20]) + \
        "\n---\n" + logs[-4000:]


def assert_no_token(logs: str) -> None:
    assert TOKEN not in logs, "the audit token appears in the server log"


_CAN_MOUNT: list[bool] = []


def can_private_mount() -> bool:
    """Root with ``unshare`` and mount rights: a server child may get its own tmpfs (in its own
    mount namespace, so no trace is left behind). Probed once by mounting one."""
    import shutil as _sh
    import subprocess as sp
    import tempfile

    if not _CAN_MOUNT:
        ok = hasattr(os, "geteuid") and os.geteuid() == 0 and _sh.which("unshare") is not None
        if ok:
            with tempfile.TemporaryDirectory() as d:
                try:
                    ok = sp.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 f'mount -t tmpfs -o size=64k dcs-probe "{d}"'],
                                check=False, capture_output=True, timeout=20).returncode == 0
                except (OSError, sp.SubprocessError):
                    ok = False
        _CAN_MOUNT.append(ok)
    return _CAN_MOUNT[0]


def start_proc_with_tmpfs(repo: Path, state_dir: Path, *flags: str, tmp: Path, size_kib: int = 1024,
                          read_only: bool = False):
    """``start_proc`` with ``state_dir`` on a private tmpfs of ``size_kib`` (its own mount
    namespace: the mount disappears with the process). The test reaches the tmpfs through
    ``/proc/<pid>/root``. Needs root (``can_private_mount``)."""
    import subprocess as sp

    from tests import server_helpers as h

    state_dir.mkdir(parents=True, exist_ok=True)
    script = (f'mount -t tmpfs -o size={int(size_kib)}k,mode=0755 dcs-test-state "$0" || exit 97; '
              + ('mount -o remount,ro "$0" || exit 98; ' if read_only else "")
              + 'exec "$@"')
    real_popen = sp.Popen

    def popen(cmd, *a, **kw):
        return real_popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                           str(state_dir), *cmd], *a, **kw)

    h.subprocess.Popen = popen  # only for the one call below
    try:
        return start_proc(repo, *flags, tmp=tmp, state_dir=state_dir)
    finally:
        h.subprocess.Popen = real_popen


def in_child_ns(proc, path: Path) -> Path:
    """``path`` as the child sees it (inside its private mount namespace)."""
    return Path(f"/proc/{proc.proc.pid}/root") / Path(path).resolve().relative_to("/")


HEAVY = "heavy-mlp"


@pytest.fixture(scope="session")
def heavy_repo(tmp_path_factory) -> Path:
    """A wide MLP with random weights (no training): ONNX Runtime, not Python, is the
    bottleneck, as with a real CNN. Used by the overload test."""
    from dcs.robustness.testing import MLPWeights, build_mlp_package

    rng = np.random.default_rng(0)
    d, h, k = 64, 16384, 10
    w = MLPWeights(w1=(rng.standard_normal((d, h)) / 8).astype(np.float32),
                   b1=np.zeros(h, np.float32),
                   w2=(rng.standard_normal((h, k)) / 128).astype(np.float32),
                   b2=np.zeros(k, np.float32))
    repo = tmp_path_factory.mktemp("heavy-repo")
    build_mlp_package(repo, HEAVY, 1, w, (1, 8, 8), [str(i) for i in range(k)])
    return repo
