"""One load-generating client process: ``python -m tests.reliability.load_client TARGET SECONDS
CONCURRENCY SEED MODEL_ONNX MODEL_NAME``. Keeps CONCURRENCY Classify calls in flight (grpc.aio, loopback
only) for SECONDS, checks every OK answer against its own ONNX Runtime session and prints one
JSON line: counts by status code, wrong answers, latency percentiles by code."""
from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


async def main(target: str, seconds: float, concurrency: int, seed: int, model_path: str,
               model_name: str) -> dict:
    import grpc
    import onnxruntime as ort

    from dcs.proto import classifier_pb2 as cpb
    from dcs.proto import classifier_pb2_grpc as cpb_grpc
    from dcs.robustness.testing import load_digits_nchw

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    _, _, x, _ = load_digits_nchw()
    want_top = sess.run(None, {in_name: x})[0].argmax(1)
    codes: dict[str, int] = {}
    lat: dict[str, list[float]] = {}
    wrong = 0
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(4)]
    stubs = [cpb_grpc.ClassifierStub(ch) for ch in channels]
    end = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal wrong
        stub = stubs[w % len(stubs)]
        local = np.random.default_rng(seed * 1000 + w)
        backoff = 0.005
        for _ in range(1_000_000):  # bounded; the clock ends it first
            if time.monotonic() >= end:
                return
            # Batches of 8..32 images of a wide model: ONNX Runtime in the server, not the
            # clients' Python, is what saturates on a small shared machine.
            n = int(local.integers(8, 33))
            i = int(local.integers(0, len(x) - n))
            req = cpb.ClassifyRequest(model=model_name, top_k=10, images=cpb.Tensor(
                dtype=cpb.FLOAT32, shape=[n, 1, 8, 8], data=x[i:i + n].tobytes()))
            t0 = time.perf_counter()
            try:
                resp = await stub.Classify(req, timeout=10)
                code = "OK"
                if [p.top[0].index for p in resp.predictions] != want_top[i:i + n].tolist():
                    wrong += 1
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            dt = time.perf_counter() - t0
            codes[code] = codes.get(code, 0) + 1
            lat.setdefault(code, []).append(dt)
            if code == "RESOURCE_EXHAUSTED":  # exponential backoff with jitter, as gRPC retries
                backoff = min(0.2, backoff * 2)
                await asyncio.sleep(backoff * (0.5 + float(local.random())))
            else:
                backoff = 0.005

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    for ch in channels:
        await ch.close()
    return {"codes": codes, "wrong": wrong,
            "latency": {c: {"n": len(v), "p50": _pct(v, 50), "p99": _pct(v, 99), "max": max(v)}
                        for c, v in lat.items()}}


if __name__ == "__main__":
    target, seconds, conc, seed, model, name = sys.argv[1:7]
    out = asyncio.run(main(target, float(seconds), int(conc), int(seed), model, name))
    print(json.dumps(out), flush=True)
