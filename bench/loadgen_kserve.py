"""Closed-loop load from the clients people actually use, run as its own process
(``python -m bench.loadgen_kserve --api API``). Same JSON line as ``bench.loadgen``.

- ``infer-aio``: ``tritonclient.grpc.aio``, N coroutines on one client, each calling
  ``ModelInfer`` (``InferenceServerClient.infer``) back to back and reading the logits with
  ``as_numpy``, as a Triton/KServe user does: the client builds every request message itself.
- ``infer-sync``: ``tritonclient.grpc``, N threads, one client each (the sync client is not
  meant to be shared between threads).
- ``client``: the project's own ``dcs.clients.client.Client`` (``classify``), N threads on one
  client, instead of ``bench.loadgen``'s request serialized once.

tritonclient defines the same ``inference.*`` protobuf symbols as ``dcs.proto``, so this module
never imports ``dcs.proto.grpc_predict_v2_pb2`` (and ``bench.loadgen`` never imports tritonclient).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time

import numpy as np

INPUT_NAME, LOGITS_NAME = "x", "logits"  # dcs.robustness.manifest's names, without importing it
GRPC_OPTS = [("grpc.max_receive_message_length", 64 << 20),
             ("grpc.max_send_message_length", 64 << 20)]


def _images(args: argparse.Namespace) -> np.ndarray:
    rng = np.random.default_rng(0)
    full = [args.batch, *args.shape]
    if args.dtype == "uint8":
        return rng.integers(0, 256, size=full, dtype=np.uint8)
    return rng.random(full, dtype=np.float32)


class _Window:
    """The measured window and request budget shared by every caller (coroutines or threads)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.t0 = time.perf_counter()
        self.start = self.t0 + args.warmup
        self.by_count = args.max_requests > 0
        self.end = self.start + (args.timeout_total if self.by_count else args.duration)
        self.left = args.max_requests if self.by_count else -1
        self.lat: list[float] = []
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()

    def go(self) -> bool:
        with self.lock:  # threads share the budget: two must not both take its last request
            if time.perf_counter() >= self.end or self.left == 0:
                return False
            if self.left > 0:
                self.left -= 1
            return True

    def done(self, began: float) -> None:
        now = time.perf_counter()
        if self.by_count or self.start <= now <= self.end:
            self.lat.append(now - began)

    def error(self, name: str) -> bool:
        with self.lock:
            self.errors[name] = self.errors.get(name, 0) + 1
            return sum(self.errors.values()) <= 1000


def _triton_inputs(tc, x: np.ndarray, args: argparse.Namespace):
    inp = tc.InferInput(INPUT_NAME, list(x.shape), "UINT8" if args.dtype == "uint8" else "FP32")
    inp.set_data_from_numpy(x)
    outputs = [tc.InferRequestedOutput(LOGITS_NAME, class_count=args.class_count)]
    return [inp], outputs


async def _run_aio(args: argparse.Namespace, w: _Window) -> None:
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as tca

    inputs, outputs = _triton_inputs(tc, _images(args), args)
    client = tca.InferenceServerClient(args.target, channel_args=GRPC_OPTS)
    output = LOGITS_NAME

    async def worker() -> None:
        while w.go():
            began = time.perf_counter()
            try:
                result = await client.infer(args.model, inputs, outputs=outputs,
                                            client_timeout=args.timeout)
                result.as_numpy(output)
            except tc.InferenceServerException as exc:
                if not w.error(str(exc.status())):
                    return
                continue
            w.done(began)

    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        await client.close()


def _run_threads(args: argparse.Namespace, w: _Window) -> None:
    if args.api == "infer-sync":
        import tritonclient.grpc as tc

        x = _images(args)

        def make_call():
            client = tc.InferenceServerClient(args.target, channel_args=GRPC_OPTS)
            inputs, outputs = _triton_inputs(tc, x, args)

            def call() -> None:
                client.infer(args.model, inputs, outputs=outputs, client_timeout=args.timeout)\
                    .as_numpy(LOGITS_NAME)
            return call, client.close, tc.InferenceServerException
    else:
        from dcs.clients.client import Client
        from dcs.clients.errors import ClientError

        x = _images(args)
        shared = Client(args.target, timeout_s=args.timeout, retries=0)
        # batch_size given: no GetModel first (which the echo does not answer); a user's client
        # asks it once and caches it, so the steady state is the same
        n = len(x)

        def make_call():
            def call() -> None:
                shared.classify(x, args.model, top_k=args.top_k, batch_size=n)
            return call, (lambda: None), ClientError

    def worker(call, close, error_type) -> None:
        try:
            while w.go():
                began = time.perf_counter()
                try:
                    call()
                except error_type as exc:
                    if not w.error(type(exc).__name__):
                        return
                    continue
                w.done(began)
        finally:
            close()

    calls = [make_call() for _ in range(args.concurrency)]
    threads = [threading.Thread(target=worker, args=c, daemon=True) for c in calls]
    w.t0 = time.perf_counter()
    w.start = w.t0 + args.warmup
    w.end = w.start + (args.timeout_total if w.by_count else args.duration)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if args.api == "client":
        shared.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--api", choices=("infer-aio", "infer-sync", "client"), required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--model", default="pfe")
    p.add_argument("--shape", type=lambda s: [int(v) for v in s.split(",")], default=[1, 28, 28])
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--max-requests", type=int, default=0, help="stop after this many (0: by time)")
    p.add_argument("--top-k", type=int, default=5, help="client: classes per image")
    p.add_argument("--class-count", type=int, default=0,
                   help="infer-*: the classification extension's class_count (0: raw logits)")
    p.add_argument("--dtype", choices=("float32", "uint8"), default="float32")
    p.add_argument("--timeout", type=float, default=30.0, help="per-RPC deadline, seconds")
    p.add_argument("--timeout-total", type=float, default=300.0,
                   help="with --max-requests: stop after this many seconds anyway")
    args = p.parse_args(argv)
    if args.max_requests > 0:
        args.warmup = 0.0
    w = _Window(args)
    m0 = time.perf_counter()
    if args.api == "infer-aio":
        asyncio.run(_run_aio(args, w))
    else:
        _run_threads(args, w)
    wall = time.perf_counter() - m0
    out = {"requests": len(w.lat), "images": len(w.lat) * args.batch, "errors": w.errors,
           "seconds": wall if w.by_count else args.duration,
           "latencies_s": [round(v, 7) for v in w.lat]}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
