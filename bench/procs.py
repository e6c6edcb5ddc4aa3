"""Processes: the real server (``tests.server_helpers``), the echo reference, load generators."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import ROOT, percentiles
from tests.server_helpers import HOST, free_port, scrape_metrics, start_server_process

CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@contextmanager
def real_server(repo: Path, *flags: str, env: dict[str, str] | None = None,
                log_dir: Path | None = None, device: str = "cpu") -> Iterator:
    """``python -m dcs.server --device DEVICE`` on free loopback ports (1 intra-op thread unless
    ``flags`` say). The device is explicit so a CPU figure stays CPU on a machine with a GPU."""
    sp = start_server_process(repo, "--log-level", "warning", "--device", device, *flags, env=env,
                              log_dir=log_dir, timeout=90)
    try:
        yield sp
    finally:
        try:
            sp.stop(timeout=20, check_torch=False)
        except Exception:  # noqa: BLE001 - never leave a child behind
            sp.__exit__()


@contextmanager
def echo_server(*flags: str, device: str = "cpu") -> Iterator[str]:
    """``bench.echo_server`` on a free loopback port (``flags``: e.g. ``--batching``; ``device``
    is where ``--model`` runs)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.echo_server", "--port", str(port),
                             "--device", device, *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **CHILD_ENV})
    try:
        line = proc.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"echo server did not start: {line!r}")
        yield f"{HOST}:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def warm(target: str, concurrency: int, **kw) -> None:
    """Open the channel and run each server path once before measuring (max(50, 4N) requests)."""
    load(target, concurrency=concurrency, duration=0, warmup=0,
         max_requests=max(50, 4 * concurrency), **kw)


def load(target: str, *, concurrency: int, duration: float, warmup: float, batch: int = 1,
         model: str = "pfe", shape: tuple[int, ...] = (1, 28, 28), top_k: int = 5,
         dtype: str = "float32", processes: int = 1, max_requests: int = 0,
         channels: int = 1, keep_latencies: bool = False, api: str = "classify",
         class_count: int = 0) -> dict:
    """Closed loop from ``processes`` load-generator processes; merged requests/s and latencies.

    ``api``: "classify" (``bench.loadgen``: Classify, request serialized once) or one of
    ``bench.loadgen_kserve``'s (``infer-aio``, ``infer-sync``: tritonclient ModelInfer with
    ``class_count``; ``client``: the project's ``Client.classify``)."""
    per = [concurrency // processes + (1 if i < concurrency % processes else 0)
           for i in range(processes)]
    reqs = [max_requests // processes + (1 if i < max_requests % processes else 0)
            for i in range(processes)] if max_requests else [0] * processes
    cmds = []
    for c, mr in zip(per, reqs):
        if c < 1:
            continue
        common = ["--target", target, "--model", model, "--shape", ",".join(map(str, shape)),
                  "--batch", str(batch), "--concurrency", str(c), "--duration", str(duration),
                  "--warmup", str(0 if max_requests else warmup), "--max-requests", str(mr),
                  "--top-k", str(top_k), "--dtype", dtype]
        if api == "classify":
            cmds.append([sys.executable, "-m", "bench.loadgen", *common,
                         "--channels", str(channels)])
        else:
            cmds.append([sys.executable, "-m", "bench.loadgen_kserve", "--api", api, *common,
                         "--class-count", str(class_count)])
    limit = (duration + warmup) * 3 + 60 if not max_requests else 600
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, **CHILD_ENV}) for c in cmds]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"load generator failed ({p.returncode}): {err.decode()[-2000:]}")
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    lat = [v for o in outs for v in o["latencies_s"]]
    seconds = max(o["seconds"] for o in outs)
    errors: dict[str, int] = {}
    for o in outs:
        for k, v in o["errors"].items():
            errors[k] = errors.get(k, 0) + v
    requests = sum(o["requests"] for o in outs)
    return {"requests": requests, "images": requests * batch, "seconds": seconds,
            "rps": requests / seconds, "ips": requests * batch / seconds, "errors": errors,
            **percentiles(lat), **({"latencies_s": lat} if keep_latencies else {})}


def batch_stats(metrics_port: int, model: str) -> dict[str, float]:
    """Executed batches and their mean size from the server's Prometheus histogram."""
    fam = scrape_metrics(metrics_port)
    total = count = 0.0
    for samples in fam.values():
        for s in samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "dcs_batch_size_examples_sum":
                total += s.value
            elif s.name == "dcs_batch_size_examples_count":
                count += s.value
    return {"batches": count, "examples": total, "mean_batch": (total / count) if count else 0.0}
