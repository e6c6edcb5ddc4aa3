"""Closed-loop gRPC load generator, run as its own process (``python -m bench.loadgen``).

N coroutines on one ``grpc.aio`` channel each send ``Classify`` back to back (a new request as
soon as the previous answer arrives) for ``--duration`` seconds after ``--warmup`` seconds, or
until ``--max-requests``. The request message is serialized once and reused (raw bytes in the
``Tensor``, never repeated floats). Prints one JSON line: requests, images, errors, seconds and
the latency of every measured request (seconds).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
import numpy as np

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc


def build_request(model: str, shape: list[int], batch: int, top_k: int, dtype: str,
                  seed: int = 0) -> cpb.ClassifyRequest:
    rng = np.random.default_rng(seed)
    full = [batch, *shape]
    if dtype == "uint8":
        data = rng.integers(0, 256, size=full, dtype=np.uint8).tobytes()
        dt = cpb.UINT8
    else:
        data = rng.random(full, dtype=np.float32).tobytes()
        dt = cpb.FLOAT32
    return cpb.ClassifyRequest(model=model, images=cpb.Tensor(dtype=dt, shape=full, data=data),
                               top_k=top_k)


async def run(args: argparse.Namespace) -> dict:
    request = build_request(args.model, args.shape, args.batch, args.top_k, args.dtype)
    opts = [("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(args.target, options=opts) for _ in range(args.channels)]
    stubs = [cpb_grpc.ClassifierStub(ch) for ch in channels]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 10)
    lat: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start_measure = t0 + args.warmup
    # by count: bounded by --timeout-total instead of the window
    end = start_measure + (args.duration if args.max_requests <= 0 else args.timeout_total)
    budget = {"left": args.max_requests if args.max_requests > 0 else -1}

    async def worker(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while True:
            now = time.perf_counter()
            if loop.time() >= end:
                return
            if budget["left"] == 0:
                return
            if budget["left"] > 0:
                budget["left"] -= 1
            try:
                await stub.Classify(request, timeout=args.timeout)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                if len(errors) and sum(errors.values()) > 1000:
                    return
                continue
            done = time.perf_counter()
            t = loop.time()
            if args.max_requests > 0 or start_measure <= t <= end:
                lat.append(done - now)

    m0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    wall = time.perf_counter() - m0
    for ch in channels:
        await ch.close()
    seconds = wall if args.max_requests > 0 else args.duration
    return {"requests": len(lat), "images": len(lat) * args.batch, "errors": errors,
            "seconds": seconds, "latencies_s": [round(v, 7) for v in lat]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--model", default="pfe")
    p.add_argument("--shape", type=lambda s: [int(v) for v in s.split(",")], default=[1, 28, 28])
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--max-requests", type=int, default=0, help="stop after this many (0: by time)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--dtype", choices=("float32", "uint8"), default="float32")
    p.add_argument("--timeout", type=float, default=30.0, help="per-RPC deadline, seconds")
    p.add_argument("--timeout-total", type=float, default=300.0,
                   help="with --max-requests: stop after this many seconds anyway")
    args = p.parse_args(argv)
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    out = asyncio.run(run(args))
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
