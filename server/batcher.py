"""Per-model dynamic batching.

Requests (already decoded, float32 ``[n, *input_shape]``) wait in a bounded queue; one worker
per model takes the first, keeps taking more until ``max_batch`` examples or ``max_queue_delay``
has passed (the window applies under load only: after a batch of a single request the next one
is dispatched at once, so a lone client never waits for company), runs the concatenation once
in an executor through ``process`` (the runtime's ``run`` by default; the server passes
``dataplane.score_batch`` so ranking and value checks are vectorized per batch off the event
loop) and hands each caller its own slice of the result. By default the next batch starts
collecting once the running one is done, so under load its window adds to what queued during
the compute and batches come out about twice as big (bench: 22 vs 11 at 64 clients: fewer
batches for a loop-bound server). With ``overlap`` the next batch fills while the running one
computes and goes the moment the model is free (``max_inflight`` batches run at once, 1 by
default): the choice for a model whose compute, not the event loop, is the limit. In both modes
a batch that cannot grow any more (``max_batch`` examples, or the next request does not fit) is
dispatched at once, one ahead of the running ones: it waits in the worker thread's queue and
starts the moment the model is free, without a round trip through the event loop, which is busy
answering the batch just done at that moment (bench ``batched``, batches of 128: with
``dataplane.score_batch`` checking values after the model, the worker thread is busy 100% of
the time instead of 91%). Batches whose expected compute is tiny run on the event loop thread
(``inline_compute_ms``), and so does a lone client's request (``inline_lone_ms``: its batch and
the one before each held a single request and nothing else is queued or computing, so nobody
waits for the loop); the rest in the executor, whose thread runs below the event loop's
priority (``niceness``, ``dcs.server.priority``).
A full queue is ``QueueFull`` (RESOURCE_EXHAUSTED) at once, never a wait. If a batch fails, its
requests are retried one by one so a single bad request cannot fail its neighbours.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dcs.server.errors import NotReady, QueueFull
from dcs.server.metrics import ServerMetrics
from dcs.server.priority import lower_thread_priority
from dcs.server.runtime import ModelRuntime

log = logging.getLogger(__name__)


class BatcherClosed(NotReady):
    """This batcher was replaced (hot reload) or is stopping; the data plane retries once."""


class _Item:
    """One request in the queue: its examples, the caller's future and when it arrived."""

    __slots__ = ("enqueued", "future", "n", "x")

    def __init__(self, x: np.ndarray, future: asyncio.Future) -> None:
        self.x = x
        self.future = future
        self.n = len(x)
        self.enqueued = time.perf_counter()


class Batcher:
    def __init__(self, runtime: ModelRuntime, *, max_batch: int, max_queue_delay_ms: float,
                 max_queue: int, metrics: ServerMetrics, max_inflight: int = 1,
                 inline_compute_ms: float = 0.0, overlap: bool = False,
                 process: Callable[[np.ndarray], Any] | None = None, niceness: int = 0,
                 inline_lone_ms: float = 0.0,
                 compute_clock: Callable[[], float] = time.perf_counter) -> None:
        self.runtime = runtime
        #: times each batch's compute (the cost the inline rules compare); tests pass a fake one
        self._compute_clock = compute_clock
        self.overlap = overlap
        #: batch -> result sliceable by rows (``result[a:b]``); runs in the worker thread
        self._process = process or runtime.run
        self.inline_s = inline_compute_ms / 1000.0
        self.inline_lone_s = inline_lone_ms / 1000.0
        self._per_example_s: float | None = None  # moving average of ORT seconds per example
        self.max_batch = max_batch
        self.max_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue = max_queue
        # One dedicated worker per in-flight batch: a shared pool hands consecutive batches to
        # different threads, which cost 25% of N=64 throughput in bench/ (2.7k vs 3.5k req/s).
        # ``niceness``: the worker lowers its own priority below the event loop's (server.priority).
        self._executor = ThreadPoolExecutor(max_workers=max_inflight,
                                            thread_name_prefix=f"ort-{runtime.name}",
                                            initializer=lower_thread_priority,
                                            initargs=(niceness,))
        # A plain deque (the loop thread is its only user) woken through ``_arrived``: an
        # asyncio.Queue costs a few µs of bookkeeping per put and get on the classify path.
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued = 0  # examples in ``_queue``
        # ``submit`` wakes the collecting batch once this many examples are queued: 1 while it
        # waits for a first request, what would fill the batch during its window, never while
        # it waits for a free slot. One wake-up per batch instead of one per request.
        self._wake_at: float = math.inf
        self.max_inflight = max_inflight
        # set by submit (``_wake_at`` examples queued) and when a batch is done
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._carry: _Item | None = None
        # Requests in the previous batch: > 1 means there is load worth waiting for. With no
        # history yet the first batch uses the configured window, as the operator asked.
        self._last_items = 2
        self._taken: list[_Item] = []  # out of the queue, batch still being collected
        self._running: dict[asyncio.Task, list[_Item]] = {}  # dispatched batches
        self._name = runtime.name
        # Metric children, resolved once (``labels()`` takes a lock and builds a key per call).
        # read at scrape time (the newest batcher of a model wins), not updated per request
        metrics.queue_depth.labels(self._name).set_function(self._queue.__len__)
        self._m_queue = metrics.queue_seconds.labels(self._name)
        self._m_compute = metrics.compute_seconds.labels(self._name)
        self._m_batch = metrics.batch_size.labels(self._name)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self._name}")

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, x: np.ndarray) -> Any:
        """``process`` output for ``x``'s rows (logits by default).

        Raises QueueFull when ``max_queue`` requests are already waiting."""
        if self._closing:
            raise BatcherClosed(f"model {self._name!r} version {self.runtime.version} is being "
                                "unloaded; retry")
        if 0 < self.max_queue <= len(self._queue):
            raise QueueFull(
                f"queue for model {self._name!r} is full ({self.max_queue} requests waiting, "
                f"--max-queue={self.max_queue}); retry with backoff")
        item = _Item(x, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._queued += item.n
        if self._queued >= self._wake_at:
            self._arrived.set()
        return await item.future

    async def close(self, timeout: float = 60.0) -> None:
        """Stop taking requests, answer the queued and in-progress ones (bounded), then stop.

        Anything still unanswered after ``timeout`` fails with BatcherClosed (never hangs).
        """
        self._closing = True
        if self._task is None:
            self._executor.shutdown(wait=False)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._queue or self._carry is not None or self._taken or self._running) \
                and not self._task.done() and loop.time() < deadline:
            await asyncio.sleep(0.005)
        self._task.cancel()
        running = list(self._running)
        for t in running:
            t.cancel()
        await asyncio.gather(self._task, *running, return_exceptions=True)
        leftovers = list(self._taken) + ([self._carry] if self._carry else [])
        for items in self._running.values():
            leftovers += items
        leftovers += self._queue
        self._queue.clear()
        self._queued = 0
        for it in leftovers:
            _set(it.future, exc=BatcherClosed(
                f"model {self._name!r} version {self.runtime.version} was unloaded; retry"))
        self._executor.shutdown(wait=False)

    def _take(self, items: list[_Item], total: int, item: _Item) -> int | None:
        """Add ``item`` to the batch; None (and keep it for the next batch) if it does not fit."""
        if total + item.n > self.max_batch:
            self._carry = item
            return None
        items.append(item)
        return total + item.n

    async def _next_batch(self) -> tuple[list[_Item], bool]:
        """The next batch and whether it is lone (see ``inline``): wait up to ``max_queue_delay`` for company (only if the previous batch
        held more than one request), then, if the previous batch still computes (``overlap``),
        keep collecting until it is done. A batch that cannot grow any more goes at once, one
        ahead of the running ones: it waits in the worker's queue, not for the event loop."""
        loop = asyncio.get_running_loop()
        first = self._carry if self._carry is not None else await self._first()
        self._carry = None
        items, total = [first], first.n
        self._taken = items  # the same list: close() sees every item taken so far
        # Wait for company only under load: after a batch of one request (a lone client, an
        # idle model) the next goes at once instead of paying the whole window for nothing.
        deadline = loop.time() + (self.max_delay_s if self._last_items > 1 else 0.0)
        total = self._drain(items, total)
        while total < self.max_batch and self._carry is None and loop.time() < deadline:
            await self._arrival(deadline, self.max_batch - total)
            total = self._drain(items, total)
        while len(self._running) >= self.max_inflight and not self._may_go_ahead(total):
            await self._arrival(None, self.max_batch - total)  # a batch done, or enough queued
            total = self._drain(items, total)  # what arrived while the previous batch computed
        # a lone client: one request now and in the batch before, nothing queued or computing
        lone = (len(items) == 1 and self._last_items == 1 and not self._queue
                and not self._running)
        self._last_items = len(items)
        return items, lone

    def _may_go_ahead(self, total: int) -> bool:
        """May this batch be dispatched while ``max_inflight`` batches run? Only when it is
        full (or its next request does not fit), runs in the worker, and none is ahead yet."""
        return ((total >= self.max_batch or self._carry is not None)
                and len(self._running) <= self.max_inflight and not self.inline(total))

    async def _done_or_full(self, task: asyncio.Task) -> None:
        """Wait until ``task`` is done or a full batch is queued that may go ahead."""
        while not task.done() and (self._queued < self.max_batch
                                   or len(self._running) > self.max_inflight):
            await self._arrival(None, self.max_batch)

    def _drain(self, items: list[_Item], total: int) -> int:
        """Move queued requests into the batch until it is full (or one does not fit)."""
        while total < self.max_batch and self._carry is None and self._queue:
            got = self._take(items, total, self._pop())
            if got is None:
                break
            total = got
        return total

    def _pop(self) -> _Item:
        item = self._queue.popleft()
        self._queued -= item.n
        return item

    async def _arrival(self, deadline: float | None, examples: int) -> None:
        """Wait until ``examples`` more examples are queued or the loop clock reaches ``deadline``
        (None: no deadline).

        One event and one timer per wait instead of ``wait_for(queue.get())``, which builds a
        task and a timeout per request (``bench.profile_server``)."""
        arrived = self._arrived
        arrived.clear()
        self._wake_at = examples
        timer = None if deadline is None else \
            asyncio.get_running_loop().call_at(deadline, arrived.set)
        try:
            await arrived.wait()
        finally:
            if timer is not None:
                timer.cancel()
            self._wake_at = math.inf

    async def _first(self) -> _Item:
        """The oldest queued request, waiting for one to arrive if the queue is empty."""
        while not self._queue:
            await self._arrival(None, 1)
        return self._pop()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # cancelled by close(), which answers what was taken
            items, lone = await self._next_batch()
            self._taken = []
            task = loop.create_task(self._run_batch(items, lone))
            self._running[task] = items
            task.add_done_callback(self._batch_done)
            if not self.overlap:
                # the next batch collects once this one is done, or at once when a full batch
                # queued meanwhile: that one goes to the worker's queue, ready when it is free
                await self._done_or_full(task)

    def _batch_done(self, task: asyncio.Task) -> None:
        items = self._running.pop(task, [])
        self._arrived.set()  # wakes the loop if it waits for a free worker
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("batcher for %s: unexpected error", self._name, exc_info=exc)
            for it in items:  # nobody waits forever
                _set(it.future, exc=exc)

    def inline(self, n: int, lone: bool = False) -> bool:
        """Run a batch of ``n`` on the event loop thread? Only when its expected ORT time is
        under ``inline_compute_ms`` (for small models the hand-off to a worker thread and back
        costs more than the compute, bench/analysis.md) or, for a ``lone`` request (a single
        client: nobody else waits for the loop), under ``inline_lone_ms``. Unknown cost (no
        batch yet) → worker."""
        per = self._per_example_s
        if per is None:
            return False
        cost = per * n  # a limit of 0 is off, even for a batch whose measured cost is 0
        return (0 < self.inline_s and cost <= self.inline_s) or (
            lone and 0 < self.inline_lone_s and cost <= self.inline_lone_s)

    def _timed_run(self, x: np.ndarray) -> tuple[Any, float]:
        start = self._compute_clock()
        out = self._process(x)
        return out, self._compute_clock() - start

    async def _run_batch(self, items: list[_Item], lone: bool = False) -> None:
        loop = asyncio.get_running_loop()
        live = [it for it in items if not it.future.done()]  # caller may have gone away
        if not live:
            return
        now = time.perf_counter()
        for it in live:
            self._m_queue.observe(now - it.enqueued)
        x = live[0].x if len(live) == 1 else np.concatenate([it.x for it in live])
        self._m_batch.observe(len(x))
        try:
            if self.inline(len(x), lone):
                out, seconds = self._timed_run(x)
            else:
                out, seconds = await loop.run_in_executor(self._executor, self._timed_run, x)
        except Exception as exc:  # noqa: BLE001 - isolate below
            if len(live) == 1:
                _set(live[0].future, exc=exc)
                return
            log.warning("batch of %d for %s failed (%s); retrying one by one",
                        len(live), self._name, exc)
            for it in live:
                try:
                    out = await loop.run_in_executor(self._executor, self._process, it.x)
                except Exception as one:  # noqa: BLE001
                    _set(it.future, exc=one)
                else:
                    _set(it.future, result=out)
            return
        self._m_compute.observe(seconds)
        per = seconds / len(x)
        self._per_example_s = per if self._per_example_s is None else 0.8 * self._per_example_s + 0.2 * per
        offset = 0
        for it in live:
            _set(it.future, result=out[offset:offset + it.n])
            offset += it.n


def _set(future: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
