"""``dcs.server.batcher.Batcher`` on its own: batch forming (with and without overlap), inline compute,
failure isolation, close.

The runtime is a stand-in with a controllable ``run`` (the real ORT path is covered by the server
tests); everything else (queue, worker thread, metrics) is the real code.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from dcs.server.batcher import Batcher, BatcherClosed
from dcs.server.dataplane import score_batch
from dcs.server.errors import QueueFull
from dcs.server.metrics import ServerMetrics
from dcs.server.priority import lower_thread_priority, thread_niceness


class FakeRuntime:
    name, version = "fake", 1

    def __init__(self, seconds: float = 0.0, fail_on: float | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[int] = []
        self.threads: list[str] = []
        self.elapsed = 0.0  # virtual compute time: ``clock`` for tests whose rule reads the cost

    def clock(self) -> float:
        return self.elapsed

    def run(self, x: np.ndarray) -> np.ndarray:
        self.elapsed += self.seconds
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


@pytest.mark.parametrize("overlap", [False, True])
def test_requests_that_arrive_during_a_compute_ride_together_next(overlap):
    rt = FakeRuntime(seconds=0.1)

    async def main():
        b = _batcher(rt, overlap=overlap)
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


def test_a_lone_client_is_served_on_the_loop_but_company_goes_to_the_worker():
    """``inline_lone_ms``: a request whose batch and the batch before each held one request runs
    on the event loop (nobody else waits for it); a batch of two goes to the worker even though
    it is as cheap; 0 disables; a model slower than the limit stays in the worker."""
    async def main(rt, lone_ms):  # compute cost read from the runtime's virtual clock: a
        b = _batcher(rt, inline_lone_ms=lone_ms, compute_clock=rt.clock)  # preemption can't move it
        b.start()
        for i in range(3):
            await b.submit(_x(i))  # one at a time: a lone client
        await asyncio.gather(b.submit(_x(3)), b.submit(_x(4)))  # company
        await b.close()

    main_thread = threading.current_thread().name
    rt = FakeRuntime()
    asyncio.run(main(rt, 1.0))
    assert rt.batches == [1, 1, 1, 2]
    # 1st: cost unknown, no history; 2nd and 3rd: lone; 4th: company.
    assert [t == main_thread for t in rt.threads] == [False, True, True, False]
    for rt, lone_ms in ((FakeRuntime(), 0.0), (FakeRuntime(seconds=0.01), 1.0)):
        asyncio.run(main(rt, lone_ms))
        assert all(t.startswith("ort-fake") for t in rt.threads), (lone_ms, rt.threads)

    async def unbatched(rt):  # --max-batch 1 under load: batches of one, but others wait
        b = _batcher(rt, max_batch=1, inline_lone_ms=1.0, compute_clock=rt.clock)
        b.start()
        await b.submit(_x(0))
        await asyncio.gather(*(b.submit(_x(i)) for i in range(1, 6)))
        await b.close()

    rt = FakeRuntime()
    asyncio.run(unbatched(rt))
    assert rt.batches == [1] * 6 and all(t.startswith("ort-fake") for t in rt.threads[1:])


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


def test_score_batch_ranks_like_a_softmax_sort_and_flags_bad_rows():
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 3, 3), dtype=np.float32)
    x[1, 0, 0, 0] = np.nan
    x[3, 0, 2, 2] = 1.01
    x[4, 0, 1, 1] = -1e-6
    w = rng.normal(size=(9, 7)).astype(np.float32)
    logits = np.nan_to_num(x.reshape(6, -1)) @ w
    logits[5] = [0, 2, 2, -1, 2, 0, 0]  # ties keep class order
    scored = score_batch(lambda _: logits, x)
    assert scored.in_range.tolist() == [True, False, True, False, False, True]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for i in range(6):
        want = sorted(range(7), key=lambda j: (-p[i, j], j))
        assert scored.order[i].tolist() == want
        assert scored.probs[i] == pytest.approx(p[i, want], abs=1e-6)
        assert scored.ranked_logits[i] == pytest.approx(logits[i, want])
    assert scored.order[5, :3].tolist() == [1, 2, 4]
    assert not scored.all_in_range
    clean = score_batch(lambda _: logits, np.clip(np.nan_to_num(x), 0.0, 1.0))
    assert clean.all_in_range and clean.in_range.tolist() == [True] * 6
    top = scored[2:4].top(3)  # one request's rows: views of the batch
    assert top.indices.shape == (2, 3) and top.indices.tolist() == scored.order[2:4, :3].tolist()
    assert scored[:].top(99).indices.shape == (6, 7) and scored[:].top(0).indices.shape == (6, 1)
    assert scored.encoded is None  # nothing to encode with


def test_process_runs_once_per_batch_and_each_caller_gets_its_rows():
    rt = FakeRuntime(seconds=0.05)
    calls: list[int] = []

    def process(x):
        calls.append(len(x))
        return score_batch(rt.run, x)

    async def main():
        b = _batcher(rt, process=process)
        b.start()
        first = asyncio.ensure_future(b.submit(_x(0.1)))
        await asyncio.sleep(0.02)
        rest = [asyncio.ensure_future(b.submit(np.full((2, 2), 0.1 * i, np.float32)))
                for i in range(2, 5)]
        out = await asyncio.gather(first, *rest)
        await b.close()
        return out

    out = asyncio.run(main())
    assert calls == [1, 6]  # the three later requests (2 rows each) share one batch
    assert [len(o) for o in out] == [1, 2, 2, 2]
    for i, o in zip([1, 2, 3, 4], out):
        assert o.logits == pytest.approx(np.full((len(o), 2), 0.2 * i, np.float32))


def test_window_applies_under_load_only():
    """A lone request after a batch of one goes at once; after a batch of several the next batch
    waits (up to ``max_queue_delay``) for company."""
    rt = FakeRuntime()

    async def main():
        b = _batcher(rt, max_queue_delay_ms=1000.0)
        b.start()
        await asyncio.gather(b.submit(_x(0)), b.submit(_x(0.5)))  # no history: the window
        start = time.perf_counter()
        await b.submit(_x(1))          # previous batch held two: the window applies...
        first = time.perf_counter() - start
        start = time.perf_counter()
        await b.submit(_x(2))          # ...but this one follows a batch of one: no window
        lone = time.perf_counter() - start
        pair = [asyncio.ensure_future(b.submit(_x(i))) for i in (3, 4)]
        await asyncio.gather(*pair)    # (queued together: one batch of two)
        late = asyncio.ensure_future(b.submit(_x(5)))
        await asyncio.sleep(0.1)       # under load now: batch [5] waits for company...
        await asyncio.gather(late, b.submit(_x(6)))  # ...and takes 6 along
        await b.close()
        return first, lone

    first, lone = asyncio.run(main())
    assert first >= 0.9 and lone < 0.5, (first, lone)  # the 1 s window, then none
    assert rt.batches == [2, 1, 1, 2, 2]


def test_queue_depth_gauge_reads_the_live_queue_at_scrape_time():
    rt = FakeRuntime(seconds=0.2)
    registry = CollectorRegistry()

    def depth():
        return registry.get_sample_value("dcs_queue_depth_requests", {"model": rt.name})

    async def main():
        b = Batcher(rt, metrics=ServerMetrics(registry), max_batch=1, max_queue_delay_ms=0.0,
                    max_queue=64)
        b.start()
        futs = [asyncio.ensure_future(b.submit(_x(i))) for i in range(4)]
        await asyncio.sleep(0.05)  # [0] computes, [1] waits in the worker's queue, [2], [3] queue
        during = depth(), b.depth
        await asyncio.gather(*futs)
        after = depth()
        await b.close()
        return during, after

    during, after = asyncio.run(main())
    assert during == (2.0, 2) and after == 0.0


@pytest.mark.parametrize("overlap, expected", [(False, [2, 2]), (True, [2, 1, 1])])
def test_without_overlap_the_window_starts_once_the_model_is_free(overlap, expected):
    """Batch [0, 1] computes 0.1 s from t≈60 ms. A arrives at 100 ms, B at 190 ms. Without
    overlap A's batch opens its 60 ms window when the model is free (≈160 ms), so B joins it;
    with overlap A's window ran out during the compute and A leaves alone at ≈160 ms."""
    rt = FakeRuntime(seconds=0.1)

    async def main():
        b = _batcher(rt, max_queue_delay_ms=60.0, overlap=overlap)
        b.start()
        first = [asyncio.ensure_future(b.submit(_x(i))) for i in (0, 1)]
        await asyncio.sleep(0.1)
        a = asyncio.ensure_future(b.submit(_x(2)))
        await asyncio.sleep(0.09)
        late = asyncio.ensure_future(b.submit(_x(3)))
        out = await asyncio.gather(*first, a, late)
        await b.close()
        return out

    out = asyncio.run(main())
    assert rt.batches == expected
    assert [float(o[0, 0]) for o in out] == [0.0, 2.0, 4.0, 6.0]


class _TimedRuntime(FakeRuntime):
    """FakeRuntime that records when each batch started and ended (perf_counter)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.spans: list[tuple[float, float]] = []

    def run(self, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = super().run(x)
        self.spans.append((start, time.perf_counter()))
        return out


@pytest.mark.parametrize("overlap", [False, True])
def test_a_full_batch_waits_in_the_worker_not_for_the_event_loop(overlap):
    """Batch [0, 1] computes 0.2 s; the full batch [2, 3] queued behind it is dispatched ahead,
    so it starts the moment the first ends although the event loop is blocked from 0.05 s to
    0.45 s. The partial batch [4] after it waits for a free model, as before."""
    rt = _TimedRuntime(seconds=0.2)

    async def main():
        b = _batcher(rt, max_batch=2, overlap=overlap)
        b.start()
        futs = [asyncio.ensure_future(b.submit(np.full((2, 2), v, np.float32))) for v in (0, 2)]
        futs.append(asyncio.ensure_future(b.submit(_x(4))))
        await asyncio.sleep(0.05)
        # one batch runs, one waits in the worker; [4] is queued (with overlap: collecting)
        assert b.depth == (0 if overlap else 1)
        blocked = time.perf_counter()
        time.sleep(0.4)  # noqa: ASYNC251 - the loop is busy elsewhere while the first batch ends
        out = await asyncio.gather(*futs)
        await b.close()
        return blocked, out

    blocked, out = asyncio.run(main())
    assert rt.batches == [2, 2, 1]
    (_, end0), (start1, end1), (start2, _) = rt.spans
    assert start1 - end0 < 0.05 and start1 < blocked + 0.4  # started while the loop was blocked
    assert start2 >= end1  # never two batches on the model at once
    assert [float(o[0, 0]) for o in out] == [0.0, 4.0, 8.0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_the_worker_thread_lowers_its_own_priority():
    """``niceness``: the worker adds it to its own niceness (capped at 19); the caller's thread
    (the event loop's) keeps its own."""
    seen: list[int | None] = []

    class Recording(FakeRuntime):
        def run(self, x):
            seen.append(thread_niceness())
            return super().run(x)

    base = thread_niceness()

    async def main(niceness):
        b = _batcher(Recording(), niceness=niceness)
        b.start()
        await b.submit(_x(1))
        await b.close()

    for niceness in (0, 5, 40):
        asyncio.run(main(niceness))
    assert seen == [base, min(19, base + 5), 19] and thread_niceness() == base


def test_lower_thread_priority_refuses_nothing_and_changes_only_its_thread():
    assert lower_thread_priority(0) is None and lower_thread_priority(-3) is None
    if not sys.platform.startswith("linux"):
        assert lower_thread_priority(5) is None
        return
    base = thread_niceness()
    got: list = []
    t = threading.Thread(target=lambda: got.extend([lower_thread_priority(3), thread_niceness()]))
    t.start()
    t.join(timeout=10)
    assert got == [min(19, base + 3)] * 2 and thread_niceness() == base
