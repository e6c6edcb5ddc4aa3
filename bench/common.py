"""Shared pieces: result rows, the run context (models, sizes), subprocess helpers, statistics."""
from __future__ import annotations

import gzip
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcs.robustness.sessions import CPU, CUDA

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
PFE = "pfe"          # Fashion-MNIST-shaped pfe_cnn (1x28x28), random weights
POLAR = "polarizing"  # the same pfe_cnn behind a polarizing front end (the demo's second model)
DIGITS = "digits"    # digits MLP (1x8x8), trained in a second


@dataclass
class Row:
    """One line of the results table. ``passed`` is None when there is no target (info only)."""

    bench: str
    figure: str
    value: float | None
    reference: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    unit: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sizes:
    """Durations and counts; quick (default) keeps the whole run under 3 min on 2 cores."""

    full: bool
    duration_s: float        # per closed-loop measurement
    warmup_s: float
    concurrencies: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    audit_examples: int
    pgd_steps: int
    pgd_restarts: int
    apgd_examples: int
    apgd_steps: int
    square_examples: int
    square_queries: int
    memory_requests: int
    isolation_audit_steps: int
    mode: str = "quick"
    model: str = PFE                      # served model the serving benchmarks load
    shape: tuple[int, ...] = (1, 28, 28)
    device: str = "cpu"                   # server --device and the reference's ORT provider
    attack_batch: int = 128               # examples per attack batch, both engines
    #: ModelInfer rows (bench.kserve): (label, served model) pairs and concurrencies
    infer_models: tuple[tuple[str, str], ...] = (("baseline", PFE), ("polarizing", POLAR))
    infer_concurrencies: tuple[int, ...] = (1, 8, 64)
    client_concurrencies: tuple[int, ...] = (8, 64)  # Classify through dcs.clients.Client

    @classmethod
    def make(cls, mode: str) -> Sizes:
        if mode == "full":
            return cls(True, 10.0, 1.0, (1, 8, 64), (1, 8, 32, 64, 128), 1000, 20, 2,
                       1000, 100, 1000, 1000, 10_000, 10_000, mode)
        if mode == "smoke":  # seconds: keeps the harness from rotting (tests/test_bench_smoke.py)
            return cls(False, 0.3, 0.1, (8,), (16,), 64, 2, 1, 16, 2, 16, 5, 200, 50, mode,
                       DIGITS, (1, 8, 8), infer_models=(("digits", DIGITS),),
                       infer_concurrencies=(1, 8), client_concurrencies=(8,))
        return cls(False, 3.0, 0.5, (1, 8, 64), (16, 64, 128), 1000, 10, 1,
                   200, 20, 200, 200, 10_000, 5000, mode)


#: ORT provider of each server ``--device`` the benchmarks run on.
PROVIDERS = {"cpu": CPU, "cuda": CUDA}


def cache_dir() -> Path:
    d = Path(os.environ.get("DCS_BENCH_CACHE") or Path(tempfile.gettempdir()) / "dcs-bench-models")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run_py(code: str, timeout: float = 300) -> None:
    """Run a snippet in a fresh interpreter (keeps torch out of this process)."""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=timeout,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def ensure_models(repo: Path, *, digits_copies: int = 1, pfe: bool = True) -> Path:
    """Model repository with ``pfe`` v1 (exported pfe_cnn), ``polarizing`` v1 (pfe_cnn behind a
    polarizing front end) and ``digits`` (+ ``digits2``...).

    Packages are built once into ``cache_dir()`` (the pfe_cnn export takes ~15 s) and copied.
    """
    import shutil

    cache = cache_dir() / "repo-v1"
    if pfe and not (cache / PFE / "1" / "model.grad.onnx").exists():
        log.info("exporting pfe_cnn (1x28x28) into %s (cached for later runs)", cache)
        _run_py("from dcs.training.export.fixtures import export_untrained\n"
                f"export_untrained({str(cache)!r}, {PFE!r}, arch='pfe_cnn', defense='none', "
                "input_shape=(1, 28, 28), num_classes=10, seed=0, version=1, force=True)\n")
    if pfe and not (cache / POLAR / "1" / "model.onnx").exists():
        log.info("exporting pfe_cnn with a polarizing front end into %s", cache)
        _run_py("from dcs.training.export.fixtures import export_untrained\n"
                f"export_untrained({str(cache)!r}, {POLAR!r}, arch='pfe_cnn', defense='pfe', "
                "input_shape=(1, 28, 28), num_classes=10, seed=0, version=1, force=True)\n")
    names = [DIGITS] + [f"{DIGITS}{i}" for i in range(2, digits_copies + 1)]
    missing = [n for n in names if not (cache / n / "1" / "model.onnx").exists()]
    if missing:
        _run_py("from dcs.robustness.testing import digits_package\n"
                f"for n in {missing!r}: digits_package({str(cache)!r}, n, 1)\n")
    repo.mkdir(parents=True, exist_ok=True)
    for name in ((PFE, POLAR) if pfe else ()) + tuple(names):
        if not (repo / name).exists():
            shutil.copytree(cache / name, repo / name)
    return repo


def fmnist_test(n: int) -> np.ndarray:
    """First ``n`` Fashion-MNIST test images as float32 [n,1,28,28] in [0,1] (random if absent)."""
    path = FMNIST_DIR / "t10k-images-idx3-ubyte.gz"
    if path.exists():
        with gzip.open(path, "rb") as f:
            raw = np.frombuffer(f.read(), np.uint8, offset=16)
        x = raw.reshape(-1, 1, 28, 28)[:n].astype(np.float32) / 255.0
        if len(x) == n:
            return x
    return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


def percentiles(lat_s: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(lat_s, dtype=np.float64) * 1e3
    if not a.size:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
    }
    try:
        import grpc

        info["grpcio"] = grpc.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return info


def machine_load() -> dict[str, Any]:
    """Load average and other processes using CPU now: the 2-core machine may be shared."""
    out: dict[str, Any] = {"loadavg": [round(v, 2) for v in os.getloadavg()]}
    try:
        import psutil

        me = os.getpid()
        procs = list(psutil.process_iter(["pid", "ppid", "name", "cmdline"]))
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(0.5)
        busy = []
        for p in procs:
            try:
                pct = p.cpu_percent(None)
            except psutil.Error:
                continue
            if pct >= 10 and p.pid != me and p.info["ppid"] != me:
                cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:120]
                busy.append({"pid": p.pid, "cpu_percent": round(pct), "cmd": cmd})
        out["busy_processes"] = sorted(busy, key=lambda b: -b["cpu_percent"])[:8]
    except ImportError:  # pragma: no cover
        pass
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or np.isnan(a) or np.isnan(b):
        return None
    return float(a) / float(b)
