"""``server.batcher.Batcher`` on its own: pipelining, inline compute, failure isolation, close.

The runtime is a stand-in with a controllable ``run`` (the real ORT path is covered by the server
tests); everything else (queue, worker thread, metrics) is the real code.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.batcher import Batcher, BatcherClosed
from server.errors import QueueFull
from server.metrics import ServerMetrics


class FakeRuntime:
    name, version = "fake", 1

    def __init__(self, seconds: float = 0.0, fail_on: float | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[int] = []
        self.threads: list[str] = []

    def run(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        self.threads.append(threading.current_thread().name)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ValueError("poisoned example")
        time.sleep(self.seconds)
        return x.reshape(len(x), -1)[:, :2] * 2.0  # "logits" that identify the input


def _batcher(runtime, **kw) -> Batcher:
    opts = {"max_batch": 8, "max_queue_delay_ms": 0.0, "max_queue": 64, **kw}
    return Batcher(runtime, metrics=ServerMetrics(CollectorRegistry()), **opts)


def _x(value: float) -> np.ndarray:
    return np.full((1, 2), value, np.float32)


def test_next_batch_fills_while_the_previous_one_computes():
    rt = FakeRuntime(seconds=0.1)

    async def main():
        b = _batcher(rt)
        b.start()
        first = asyncio.ensure_future(b.submit(_x(0)))
        await asyncio.sleep(0.03)  # batch [0] is computing now
        rest = [asyncio.ensure_future(b.submit(_x(i))) for i in range(1, 6)]
        out = await asyncio.gather(first, *rest)
        await b.close()
        return out

    out = asyncio.run(main())
    assert rt.batches == [1, 5]  # no delay window, yet the 5 late arrivals rode together
    assert [float(o[0, 0]) for o in out] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]  # each its own answer


def test_tiny_batches_run_inline_once_their_cost_is_known():
    rt = FakeRuntime()

    async def main(inline_ms):
        b = _batcher(rt, inline_compute_ms=inline_ms)
        b.start()
        for i in range(3):
            await b.submit(_x(i))
        await b.close()

    asyncio.run(main(5.0))
    main_thread = threading.current_thread().name
    assert rt.threads[0].startswith("ort-fake")  # unknown cost: worker thread
    assert rt.threads[1:] == [main_thread, main_thread]
    rt.threads.clear()
    asyncio.run(main(0.0))  # disabled: always the worker
    assert all(t.startswith("ort-fake") for t in rt.threads)


def test_a_bad_example_fails_alone_and_a_full_queue_refuses_at_once():
    rt = FakeRuntime(fail_on=2.0)

    async def run(max_queue):
        b = _batcher(rt, max_queue=max_queue, max_queue_delay_ms=20.0)
        b.start()
        futs = [asyncio.ensure_future(b.submit(_x(i))) for i in range(4)]
        out = await asyncio.gather(*futs, return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(run(64))
    assert rt.batches[0] == 4  # batched together, then retried one by one
    assert isinstance(out[2], ValueError) and "poisoned" in str(out[2])
    assert [float(out[i][0, 0]) for i in (0, 1, 3)] == [0.0, 2.0, 6.0]
    out = asyncio.run(run(2))  # all four arrive before the worker takes any
    assert [type(o).__name__ for o in out].count("QueueFull") == 2
    assert all(isinstance(o, (np.ndarray, QueueFull, ValueError)) for o in out)
    assert "--max-queue=2" in str(next(o for o in out if isinstance(o, QueueFull)))


def test_close_answers_queued_requests_and_refuses_new_ones():
    rt = FakeRuntime(seconds=0.02)

    async def main():
        b = _batcher(rt)
        b.start()
        futs = [asyncio.ensure_future(b.submit(_x(i))) for i in range(12)]
        await asyncio.sleep(0)
        await b.close(timeout=5)
        with pytest.raises(BatcherClosed):
            await b.submit(_x(0))
        return await asyncio.gather(*futs, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, np.ndarray) for r in results)  # drained, not dropped
    assert sum(rt.batches) == 12 and max(rt.batches) <= 8
