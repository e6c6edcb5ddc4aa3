"""Whole-server benchmarks: classify latency while an audit runs (5) and memory growth (6)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import grpc
import numpy as np

from bench.common import DIGITS, PFE, Row, Sizes, fmnist_test
from bench.procs import load, real_server
from proto import classifier_pb2 as cpb
from proto import classifier_pb2_grpc as cpb_grpc

log = logging.getLogger("bench.system")
TOKEN = "bench-token-not-secret"
AUTH = [("authorization", f"Bearer {TOKEN}")]


def _start_audit(target: str, model: str, shape: tuple[int, ...], n: int,
                 steps: int) -> tuple[str, str]:
    """StartAudit: PGD on ``n`` uploaded images at a tiny ε (nothing is fooled, so it runs every
    step). Returns (job_id, state name once it is RUNNING or final)."""
    x = (fmnist_test(n) if tuple(shape) == (1, 28, 28)
         else np.random.default_rng(0).random((n, *shape), dtype=np.float32))
    y = np.zeros(n, dtype=np.int64)
    with grpc.insecure_channel(target) as ch:
        stub = cpb_grpc.AuditStub(ch)
        resp = stub.StartAudit(cpb.StartAuditRequest(
            model=model, attacks=[cpb.AttackSpec(name="pgd", params_json=json.dumps(
                {"steps": steps, "restarts": 1}))], eps=[0.001],
            examples=cpb.UploadedExamples(images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape,
                                                            data=x.tobytes()),
                                          labels=y.tolist()), seed=0), metadata=AUTH, timeout=30)
        deadline = time.monotonic() + 30
        state = resp.state
        while time.monotonic() < deadline:
            state = stub.GetAudit(cpb.GetAuditRequest(job_id=resp.job_id), metadata=AUTH,
                                  timeout=10).state
            if state != cpb.QUEUED:
                break
            time.sleep(0.05)
        return resp.job_id, cpb.AuditState.Name(state)


def _audit_state(target: str, job_id: str, cancel: bool = False) -> dict:
    with grpc.insecure_channel(target) as ch:
        stub = cpb_grpc.AuditStub(ch)
        job = stub.GetAudit(cpb.GetAuditRequest(job_id=job_id), metadata=AUTH, timeout=10)
        out = {"state": cpb.AuditState.Name(job.state),
               "gradients": job.progress.gradient_evaluations,
               "examples_done": job.progress.examples_done, "error": job.error}
        if cancel and job.state in (cpb.QUEUED, cpb.RUNNING):
            stub.CancelAudit(cpb.CancelAuditRequest(job_id=job_id), metadata=AUTH, timeout=10)
    return out


def bench_isolation(repo: Path, sizes: Sizes) -> list[Row]:
    env = {"DCS_AUDIT_TOKEN": TOKEN}
    kw = {"model": sizes.model, "shape": sizes.shape}
    with real_server(repo, "--audit-threads", "1", env=env) as sp:
        idle = load(sp.target, concurrency=8, duration=sizes.duration_s, warmup=sizes.warmup_s,
                    **kw)
        try:
            job_id, state = _start_audit(sp.target, sizes.model, sizes.shape, 256,
                                         sizes.isolation_audit_steps)
        except grpc.RpcError as exc:
            return [Row("isolation", "classify p99 N=8, audit running vs idle", None, idle["p99_ms"],
                        None, "<= 2.0x", None, "ms",
                        f"StartAudit failed: {exc.code().name} {exc.details()}; not measured")]
        busy = load(sp.target, concurrency=8, duration=sizes.duration_s, warmup=sizes.warmup_s,
                    **kw)
        after = _audit_state(sp.target, job_id, cancel=True)
    ran = after["state"] == "RUNNING"
    r = busy["p99_ms"] / idle["p99_ms"]
    note = (f"audit {job_id[:8]} {state}->{after['state']}, {after['gradients']} gradients during "
            f"the window; req/s {busy['rps']:.0f} vs {idle['rps']:.0f} idle; p50 "
            f"{busy['p50_ms']:.2f} vs {idle['p50_ms']:.2f} ms")
    if not ran:
        note = (f"audit was not running for the whole window ({after['error'][:200]})! "
                + note)
    return [Row("isolation", "classify p99 N=8, audit running vs idle", busy["p99_ms"],
                idle["p99_ms"], r, "<= 2.0x", (r <= 2.0) if ran else False, "ms", note,
                extra={"idle": idle, "busy": busy, "audit": after})]


def bench_memory(repo: Path, sizes: Sizes) -> list[Row]:
    import psutil

    models = [(d.name, (1, 28, 28) if d.name == PFE else (1, 8, 8))
              for d in sorted(repo.iterdir()) if d.is_dir()]
    with real_server(repo) as sp:
        proc = psutil.Process(sp.proc.pid)
        time.sleep(0.5)
        rss_loaded = proc.memory_info().rss
        per = sizes.memory_requests // len(models)
        done = 0
        for i, (name, shape) in enumerate(models):
            n = per + (sizes.memory_requests - per * len(models) if i == 0 else 0)
            out = load(sp.target, concurrency=8, duration=0, warmup=0, max_requests=n, model=name,
                       shape=shape)
            done += out["requests"]
        rss_after = proc.memory_info().rss
    growth = rss_after / rss_loaded
    return [Row("memory", f"server RSS after {done} requests vs after loading {len(models)} models",
                rss_after / 2**20, rss_loaded / 2**20, growth, "<= 1.05x", growth <= 1.05, "MiB",
                "models: " + ", ".join(m for m, _ in models) + "; N=8 closed loop",
                extra={"requests": done})]
