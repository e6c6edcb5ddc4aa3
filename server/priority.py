"""Thread priorities: the event loop first, then model workers, then audits.

Every request passes through the one event-loop thread, so when the cores are short (the load
generator on the same 2 cores in ``bench/``; a CPU-limited container) a model worker or an audit
that takes the loop's core stalls every request in flight, while a worker that waits only lets
its next batch grow. Worker and audit threads therefore lower their own scheduling priority on
start (Linux niceness is per thread; threads they create, such as ONNX Runtime's intra-op pool,
inherit it). In a container the niceness orders the server's own threads; other pods are
separate cgroups and are not affected. Raising niceness needs no privilege.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

#: The highest niceness Linux allows.
MAX_NICENESS = 19


def lower_thread_priority(increment: int) -> int | None:
    """Add ``increment`` to the calling thread's niceness (capped at 19); returns the new value,
    or None where per-thread niceness is not available (not Linux) or the call failed."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        new = min(MAX_NICENESS, now + increment)
        os.setpriority(os.PRIO_PROCESS, tid, new)
    except OSError as exc:  # e.g. a seccomp profile that forbids setpriority
        log.warning("could not lower the priority of thread %s (%s); it runs at the loop's",
                    threading.current_thread().name, exc)
        return None
    return new


def thread_niceness() -> int | None:
    """The calling thread's niceness (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
