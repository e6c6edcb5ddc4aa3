"""Per-model dynamic batching.

Requests (already validated, float32 ``[n, *input_shape]``) wait in a bounded queue; one worker
per model takes the first, keeps taking more until ``max_batch`` examples or ``max_queue_delay``
has passed, runs the concatenation once in an executor and hands each caller its own slice.
A full queue is ``QueueFull`` (RESOURCE_EXHAUSTED) at once, never a wait. If a batch fails,
its requests are retried one by one so a single bad request cannot fail its neighbours.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from server.errors import NotReady, QueueFull
from server.metrics import ServerMetrics
from server.runtime import ModelRuntime

log = logging.getLogger(__name__)


class BatcherClosed(NotReady):
    """This batcher was replaced (hot reload) or is stopping; the data plane retries once."""


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return len(self.x)


class Batcher:
    def __init__(self, runtime: ModelRuntime, *, max_batch: int, max_queue_delay_ms: float,
                 max_queue: int, executor: Executor, metrics: ServerMetrics) -> None:
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue = max_queue
        self._executor = executor
        self._metrics = metrics
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task | None = None
        self._closing = False
        self._carry: _Item | None = None
        self._taken: list[_Item] = []  # out of the queue, not yet answered
        self._name = runtime.name

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self._name}")

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Logits for ``x``; raises QueueFull when ``max_queue`` requests are already waiting."""
        if self._closing:
            raise BatcherClosed(f"model {self._name!r} version {self.runtime.version} is being "
                                "unloaded; retry")
        item = _Item(x, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFull(
                f"queue for model {self._name!r} is full ({self.max_queue} requests waiting, "
                f"--max-queue={self.max_queue}); retry with backoff") from None
        self._metrics.queue_depth.labels(self._name).set(self._queue.qsize())
        return await item.future

    async def close(self, timeout: float = 60.0) -> None:
        """Stop taking requests, answer the queued and in-progress ones (bounded), then stop.

        Anything still unanswered after ``timeout`` fails with BatcherClosed (never hangs).
        """
        self._closing = True
        if self._task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._queue.qsize() or self._carry is not None or self._taken) \
                and not self._task.done() and loop.time() < deadline:
            await asyncio.sleep(0.005)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        leftovers = list(self._taken) + ([self._carry] if self._carry else [])
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for it in leftovers:
            _set(it.future, exc=BatcherClosed(
                f"model {self._name!r} version {self.runtime.version} was unloaded; retry"))

    async def _next_batch(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        items, total = [first], first.n
        self._taken = items  # the same list: close() sees every item taken so far
        deadline = loop.time() + self.max_delay_s
        while total < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if total + item.n > self.max_batch:
                self._carry = item
                break
            items.append(item)
            total += item.n
        return items

    async def _loop(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batcher for %s: unexpected error; continuing", self._name)

    async def _step(self) -> None:
        try:
            await self._run_batch()
        except asyncio.CancelledError:
            raise  # close() answers what was taken
        except Exception as exc:
            for it in self._taken:  # nobody waits forever
                _set(it.future, exc=exc)
            self._taken = []
            raise
        self._taken = []

    async def _run_batch(self) -> None:
        loop = asyncio.get_running_loop()
        items = await self._next_batch()
        self._metrics.queue_depth.labels(self._name).set(self._queue.qsize())
        live = [it for it in items if not it.future.done()]  # caller may have gone away
        if not live:
            return
        now = time.perf_counter()
        for it in live:
            self._metrics.queue_seconds.labels(self._name).observe(now - it.enqueued)
        x = live[0].x if len(live) == 1 else np.concatenate([it.x for it in live])
        self._metrics.batch_size.labels(self._name).observe(len(x))
        start = time.perf_counter()
        try:
            logits = await loop.run_in_executor(self._executor, self.runtime.run, x)
        except Exception as exc:  # noqa: BLE001 - isolate below
            if len(live) == 1:
                _set(live[0].future, exc=exc)
                return
            log.warning("batch of %d for %s failed (%s); retrying one by one",
                        len(live), self._name, exc)
            for it in live:
                try:
                    out = await loop.run_in_executor(self._executor, self.runtime.run, it.x)
                except Exception as one:  # noqa: BLE001
                    _set(it.future, exc=one)
                else:
                    _set(it.future, result=out)
            return
        finally:
            self._metrics.compute_seconds.labels(self._name).observe(time.perf_counter() - start)
        offset = 0
        for it in live:
            _set(it.future, result=logits[offset:offset + it.n])
            offset += it.n


def _set(future: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
