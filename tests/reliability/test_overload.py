"""Overload: bounded load from several client processes against a real server process. No crash,
memory bounded, excess gets RESOURCE_EXHAUSTED quickly, every accepted answer is correct (each
client checks against its own ONNX Runtime session), and latency recovers after the load stops.

``test_overload_short`` (default run) is a few seconds; ``test_overload_30s`` is ``make stress``.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from tests.reliability.conftest import HEAVY, assert_no_tracebacks, proc_rss_kib, start_proc
from tests.server_helpers import ROOT, sample_value, scrape_metrics

#: Codes an overloaded server may answer with. DEADLINE_EXCEEDED would mean a request waited
#: 10 s instead of being refused: not allowed.
ALLOWED = {"OK", "RESOURCE_EXHAUSTED"}


def _p50(stub, req, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        stub.Classify(req, timeout=10)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_overload(repo, tmp_path, stats, *, seconds: float, procs: int, concurrency: int,
                 label: str) -> dict:
    srv = start_proc(repo, "--max-queue", "64", "--max-batch", "32", tmp=tmp_path)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    req = cpb.ClassifyRequest(model=HEAVY, images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape,
                                                             data=x.tobytes()))
    rss_samples: list[int] = []
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = cpb_grpc.ClassifierStub(ch)
            _p50(stub, req, 20)  # warm up
            baseline = _p50(stub, req, 40)
            rss_before = proc_rss_kib(srv.proc.pid)[0]
            model = str(repo / HEAVY / "1" / "model.onnx")
            clients = [subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.load_client", srv.target, str(seconds),
                 str(concurrency), str(seed), model, HEAVY],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for seed in range(procs)]
            stop = threading.Event()

            def sample_rss():
                while not stop.wait(0.25):
                    rss_samples.append(proc_rss_kib(srv.proc.pid)[0])

            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            results = []
            try:
                for c in clients:
                    out, err = c.communicate(timeout=seconds + 120)
                    assert c.returncode == 0, err[-3000:]
                    results.append(json.loads(out.strip().splitlines()[-1]))
            finally:
                stop.set()
                sampler.join(timeout=5)
                for c in clients:
                    if c.poll() is None:
                        c.kill()
                        c.wait(timeout=10)
            assert srv.proc.poll() is None, "server died under load:\n" + srv.logs()[-3000:]
            # Recovery: windows of sequential requests until the median is back near baseline.
            t_end = time.monotonic()
            recovered_after = None
            windows = []
            for _ in range(300):
                w = _p50(stub, req, 10)
                windows.append(w)
                if w <= 2 * baseline + 0.002:
                    recovered_after = time.monotonic() - t_end
                    break
                if time.monotonic() - t_end > 30:
                    break
            final = _p50(stub, req, 40)
            fam = scrape_metrics(srv.metrics_port)
            rss_after, hwm = proc_rss_kib(srv.proc.pid)
    finally:
        code = srv.stop()
    codes: dict[str, int] = {}
    wrong = 0
    for r in results:
        wrong += r["wrong"]
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    lat = {}
    for code_name in ("OK", "RESOURCE_EXHAUSTED"):
        ps = [r["latency"][code_name] for r in results if code_name in r["latency"]]
        if ps:
            lat[code_name] = {"p50_ms": round(1000 * max(p["p50"] for p in ps), 2),
                              "p99_ms": round(1000 * max(p["p99"] for p in ps), 2),
                              "max_ms": round(1000 * max(p["max"] for p in ps), 2)}
    for k, v in codes.items():
        stats.code(k, v)
    stats.rss(hwm)
    figures = {
        "seconds": seconds, "client_processes": procs, "concurrent_streams": procs * concurrency,
        "requests": sum(codes.values()), "codes": codes, "wrong_answers": wrong,
        "served_per_s": round(codes.get("OK", 0) / seconds, 1), "latency": lat,
        "baseline_p50_ms": round(1000 * baseline, 3), "after_p50_ms": round(1000 * final, 3),
        "recovery_s": None if recovered_after is None else round(recovered_after, 3),
        "rss_before_kib": rss_before, "rss_peak_kib": max(rss_samples + [rss_after]),
        "rss_after_kib": rss_after, "vm_hwm_kib": hwm,
        "server_rejected_metric": sample_value(fam, "dcs_requests_total", method="Classify",
                                               code="RESOURCE_EXHAUSTED"),
        "server_exit_code": code,
    }
    stats.section(label, **figures)
    # --- the properties ---
    assert code == 0
    assert wrong == 0, figures
    assert set(codes) <= ALLOWED, figures
    assert codes.get("OK", 0) > 0
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, f"no excess was refused: {figures}"
    # Refused fast, not queued: a refusal takes a fraction of what a served request waits.
    # (Absolute figures on a 2-core machine shared with the clients are CPU-starved; the
    # server itself refuses at submit without waiting.)
    assert lat["RESOURCE_EXHAUSTED"]["p50_ms"] < 0.5 * lat["OK"]["p50_ms"], figures
    assert lat["RESOURCE_EXHAUSTED"]["p99_ms"] < 1000, figures
    # Every refusal the clients saw is one the server counted: the bounded queue, not transport.
    assert figures["server_rejected_metric"] == codes["RESOURCE_EXHAUSTED"], figures
    assert figures["rss_peak_kib"] - rss_before < 256 * 1024, figures  # memory bounded
    assert recovered_after is not None and recovered_after < 10, (figures, windows[-5:])
    assert final <= 2 * baseline + 0.002, figures
    assert_no_tracebacks(srv.logs())
    return figures


def test_overload_short(heavy_repo, tmp_path, stats):
    run_overload(heavy_repo, tmp_path, stats, seconds=4, procs=2, concurrency=60, label="overload 4 s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_overload_30s(heavy_repo, tmp_path, stats):
    run_overload(heavy_repo, tmp_path, stats, seconds=30, procs=3, concurrency=100,
                 label="overload 30 s")
