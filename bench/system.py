"""Whole-server benchmarks: classify latency while an audit runs (5) and memory growth (6)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import grpc
import numpy as np

from bench.common import PFE, Row, Sizes, fmnist_test
from bench.procs import load, real_server
from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc

log = logging.getLogger("bench.system")
TOKEN = "bench-token-not-secret"
AUTH = [("authorization", f"Bearer {TOKEN}")]


def _start_audit(target: str, package: Path, shape: tuple[int, ...], n: int,
                 steps: int) -> tuple[str, str]:
    """StartAudit: PGD on ``n`` uploaded images at a tiny ε (nothing is fooled, so it runs every
    step). Returns (job_id, state name once it is RUNNING or final)."""
    x = (fmnist_test(n) if tuple(shape) == (1, 28, 28)
         else np.random.default_rng(0).random((n, *shape), dtype=np.float32))
    # labels = the model's own predictions: every example is attacked (none starts misclassified)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1).astype(np.int64)
    model = package.parent.name
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
    import psutil

    def cpu(proc) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    with real_server(repo, "--audit-threads", "1", env=env) as sp:
        ps = psutil.Process(sp.proc.pid)
        c0 = cpu(ps)
        idle = load(sp.target, concurrency=8, duration=sizes.duration_s, warmup=sizes.warmup_s,
                    **kw)
        try:
            job_id, state = _start_audit(sp.target, repo / sizes.model / "1", sizes.shape, 256,
                                         sizes.isolation_audit_steps)
        except grpc.RpcError as exc:
            return [Row("isolation", "classify p99 N=8, audit running vs idle", None, idle["p99_ms"],
                        None, "<= 2.0x", None, "ms",
                        f"StartAudit failed: {exc.code().name} {exc.details()}; not measured")]
        c1 = cpu(ps)
        busy = load(sp.target, concurrency=8, duration=sizes.duration_s, warmup=sizes.warmup_s,
                    **kw)
        c2 = cpu(ps)
        after = _audit_state(sp.target, job_id, cancel=True)
        # what-if: the same audit work in a separate process (not a thread of the server)
        sep = _with_separate_audit(repo / sizes.model / "1", sp.target, sizes, kw)
    ran = after["state"] == "RUNNING"
    r = busy["p99_ms"] / idle["p99_ms"]
    span = sizes.duration_s + sizes.warmup_s
    note = (f"audit {job_id[:8]} {state}->{after['state']} over the window; server CPU "
            f"{(c2 - c1) / span:.2f} cores busy vs {(c1 - c0) / span:.2f} idle; req/s {busy['rps']:.0f} vs {idle['rps']:.0f} idle; p50 "
            f"{busy['p50_ms']:.2f} vs {idle['p50_ms']:.2f} ms")
    if not ran:
        note = (f"audit was not running for the whole window ({after['error'][:200]})! "
                + note)
    return [Row("isolation", "classify p99 N=8, audit running vs idle", busy["p99_ms"],
                idle["p99_ms"], r, "<= 2.0x", (r <= 2.0) if ran else False, "ms", note,
                extra={"idle": idle, "busy": busy, "audit": after}),
            Row("isolation", "what-if: same audit work in a separate process", sep["p99_ms"],
                idle["p99_ms"], sep["p99_ms"] / idle["p99_ms"], "", None, "ms",
                f"bench.audit_worker computed {sep['gradients']} gradients in the window; req/s "
                f"{sep['rps']:.0f}; p50 {sep['p50_ms']:.2f} ms", extra={"load": sep})]


def _with_separate_audit(package: Path, target: str, sizes: Sizes, kw: dict) -> dict:
    import os
    import subprocess
    import sys

    from bench.common import ROOT
    from bench.procs import CHILD_ENV

    secs = sizes.duration_s + sizes.warmup_s + 1.0
    proc = subprocess.Popen([sys.executable, "-m", "bench.audit_worker", str(package), str(secs)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, **CHILD_ENV})
    try:
        proc.stdout.readline()  # READY
        out = load(target, concurrency=8, duration=sizes.duration_s, warmup=sizes.warmup_s, **kw)
        text, _ = proc.communicate(timeout=secs + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    out["gradients"] = int((text.decode().strip().splitlines() or ["0"])[-1] or 0)
    return out


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
