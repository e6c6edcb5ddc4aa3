"""Fixed batch shapes for sessions whose kernels re-plan when the input shape changes.

ONNX Runtime's CUDA provider sets up its cuDNN convolutions again whenever a session sees an
input shape other than the last one: on an H200 that cost 4 ms per call with heuristic search
and 23 ms with the default exhaustive search, against 0.15-0.3 ms for the model itself
(``bench/analysis.md``, GPU section). Dynamic batches (1..max_batch requests) and attacks that
drop fooled examples change the batch size on almost every call. Padding every call up to the
largest batch the session has seen keeps the shape fixed after the first calls; on a GPU the
padded rows cost far less than a re-plan. CPU sessions are not padded: there, rows cost time.
"""
from __future__ import annotations

import numpy as np

#: Largest batch padded to: a call above it runs at its own size and does not raise the mark, so
#: one big call (a whole test split, say) does not make every later call that big.
MAX_STATIC_BATCH = 1024


class BatchPadder:
    """Pads batches up to a high-water mark (the largest batch seen, at most ``limit``)."""

    __slots__ = ("enabled", "limit", "mark")

    def __init__(self, enabled: bool, limit: int = MAX_STATIC_BATCH) -> None:
        self.enabled = bool(enabled)
        self.limit = int(limit)
        self.mark = 0

    def size_for(self, n: int) -> int:
        """Rows to run a batch of ``n`` with (``n`` itself when disabled or above the limit)."""
        if not self.enabled or n > self.limit:
            return n
        self.mark = max(self.mark, n)
        return self.mark


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``size`` rows (``a`` itself if already that long)."""
    if len(a) >= size:
        return a
    out = np.zeros((size, *a.shape[1:]), dtype=a.dtype)
    out[:len(a)] = a
    return out
