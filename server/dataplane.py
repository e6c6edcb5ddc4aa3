"""The data plane both APIs share: model lookup, readiness, input validation, inference, top-k.

Servicers translate protobuf to these calls and back; nothing here knows about gRPC.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dcs.server.batcher import BatcherClosed
from dcs.server.errors import InvalidInput, ModelNotFound, NotReady
from dcs.server.interceptor import current_model
from dcs.server.repository import ModelRepository, Served

#: wire dtype name -> (numpy dtype, scale to [0, 1])
DTYPES = {"FLOAT32": (np.dtype("<f4"), 1.0), "UINT8": (np.dtype("u1"), 1.0 / 255.0)}
DEFAULT_TOP_K = 5


@dataclass(slots=True)  # not frozen: a frozen init costs an object.__setattr__ per field
class TopK:
    indices: np.ndarray  # [N, k] int
    probs: np.ndarray    # [N, k] float32
    logits: np.ndarray   # [N, k] float32


class BatchScores:
    """A batch's model output, post-processed once per batch.

    In the model's worker thread everything is computed up front (``eager``): ranking, the
    [0, 1] check, the encoded classify answers and the logits bytes, over the whole batch there
    instead of per request on the event loop (bench/analysis.md). A batch computed on the event
    loop itself (a lone request, small batches) computes the ranking, the encoding and the bytes
    only when a request asks for them: a ModelInfer answer needs the bytes alone, and at one
    image the rest costs about half of what the model does (bench/analysis.md, session 8).
    ``batch[a:b]`` is one request's rows.
    """

    __slots__ = ("_encode", "_encoded", "_order", "_probs", "_ranked", "_raw", "all_in_range",
                 "in_range", "logits")

    def __init__(self, logits: np.ndarray, in_range: np.ndarray,
                 encode: Callable[[np.ndarray, np.ndarray, np.ndarray], Any] | None = None,
                 eager: bool = True) -> None:
        self.logits = logits          # [N, C] float32, as the model returned them
        self.in_range = in_range      # [N] bool: the input row was finite and within [0, 1]
        self.all_in_range = bool(in_range.all())  # a request of a clean batch skips the check
        self._encode = encode
        self._order = self._probs = self._ranked = self._encoded = None
        self._raw: bytes | None = None
        if eager:
            self._rank()
            self.encoded  # noqa: B018 - computed now, in the worker
            self.logits_raw  # noqa: B018

    def _rank(self) -> None:
        logits = self.logits
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        order = np.argsort(-p, axis=1, kind="stable")
        self._probs = np.take_along_axis(p, order, 1)
        self._ranked = np.take_along_axis(logits, order, 1)
        self._order = order

    @property
    def order(self) -> np.ndarray:
        """[N, C] class indices by descending probability (stable)."""
        if self._order is None:
            self._rank()
        return self._order

    @property
    def probs(self) -> np.ndarray:
        """[N, C] float32 probabilities in ``order``."""
        if self._order is None:
            self._rank()
        return self._probs

    @property
    def ranked_logits(self) -> np.ndarray:
        """[N, C] float32 logits in ``order``."""
        if self._order is None:
            self._rank()
        return self._ranked

    @property
    def encoded(self) -> Any:
        """What ``score_batch``'s ``encode`` made of the ranking (None without one)."""
        if self._encoded is None and self._encode is not None:
            self._encoded = self._encode(self.order, self._probs, self._ranked)
        return self._encoded

    @property
    def logits_raw(self) -> bytes:
        """``logits`` as little-endian float32 bytes, row-major (ModelInfer's raw output)."""
        if self._raw is None:
            self._raw = np.ascontiguousarray(self.logits, dtype="<f4").tobytes()
        return self._raw

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, rows: slice) -> Scored:
        start, stop, _ = rows.indices(len(self.logits))
        return Scored(self, start, stop)


class Scored:
    """One request's rows ``start:stop`` of a :class:`BatchScores`; arrays are views made on use."""

    __slots__ = ("batch", "start", "stop")

    def __init__(self, batch: BatchScores, start: int, stop: int) -> None:
        self.batch = batch
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def logits(self) -> np.ndarray:
        return self.batch.logits[self.start:self.stop]

    @property
    def all_in_range(self) -> bool:
        b = self.batch
        return b.all_in_range or bool(b.in_range[self.start:self.stop].all())

    def top(self, k: int) -> TopK:
        """The ``k`` most probable classes of every row (``k`` clipped to [1, C])."""
        b, rows = self.batch, slice(self.start, self.stop)
        k = max(1, min(int(k), b.logits.shape[1]))
        return TopK(b.order[rows, :k], b.probs[rows, :k], b.ranked_logits[rows, :k])


def _rows_in_range(x: np.ndarray) -> np.ndarray:
    """Per row of ``x``: all values finite and within [0, 1] (NaN fails both comparisons)."""
    flat = x.reshape(len(x), -1)
    if flat.min() >= 0.0 and flat.max() <= 1.0:  # the usual clean batch: two passes, no rows
        return np.ones(len(x), dtype=bool)
    return (flat.min(axis=1) >= 0.0) & (flat.max(axis=1) <= 1.0)


def score_batch(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                encode: Callable[[np.ndarray, np.ndarray, np.ndarray], Any] | None = None
                ) -> BatchScores:
    """Run the model on ``x`` and rank every row's classes; flags rows outside [0, 1] or NaN.
    ``encode(order, probs, ranked_logits)``, if given, is stored as ``encoded``. Called on the
    event loop's thread (a batch computed inline), ranking and encoding wait until a request
    asks for them.

    The model runs first: the worker picks a batch up just as the event loop is busy answering
    the previous one, and numpy's checks release the GIL, which the worker then waits to get
    back (0.85 ms per batch of 128 in bench/, 8% of its time). After the model the loop is idle.
    """
    logits = np.asarray(run(x), dtype=np.float32)
    # in a worker thread (no event loop running there) compute everything now; on the loop only
    # what the batch's requests ask for
    return BatchScores(logits, _rows_in_range(x), encode,
                       eager=asyncio._get_running_loop() is None)


class DataPlane:
    def __init__(self, repository: ModelRepository, *, max_batch: int) -> None:
        self.repository = repository
        self.max_batch = max_batch
        #: Set on SIGTERM: readiness turns false; RPCs already accepted still complete and new
        #: ones get UNAVAILABLE from ``get_model`` (gRPC core alone answers a call that arrives
        #: as its transport stops with CANCELLED, grpc/grpc#41785).
        self.draining = False

    # readiness --------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        return (not self.draining and self.repository.scanned_once
                and bool(self.repository.names()))

    def model_ready(self, name: str, version: int = 0) -> bool:
        served = self.repository.get(name)
        return (self.ready and served is not None
                and (version in (0, served.runtime.version)))

    # lookup -----------------------------------------------------------------------------------
    def get_model(self, name: str, version: int = 0) -> Served:
        """The serving package of ``name``; ``version`` 0 means whichever is serving."""
        served = self.repository.get(name)
        current_model.set(name if served is not None else "")
        if self.draining:
            raise NotReady("server is shutting down; retry on another replica")
        if not self.repository.scanned_once:
            raise NotReady("server is still loading its model repository; retry shortly")
        if served is None:
            if not name:
                raise InvalidInput("field 'model' is empty; expected one of "
                                   f"{self.repository.names()}")
            raise ModelNotFound(f"model {name!r} is not loaded; loaded models: "
                                f"{self.repository.names()}")
        if version and version != served.runtime.version:
            raise ModelNotFound(f"model {name!r} version {version} is not loaded; serving version "
                                f"{served.runtime.version} (use 0 for the serving version)")
        return served

    # validation -------------------------------------------------------------------------------
    def decode(self, served: Served, *, dtype: str, shape: Sequence[int], data: bytes,
               field: str = "images") -> np.ndarray:
        """Bytes + shape + dtype → float32 ``[N, *input_shape]``, or InvalidInput.

        FLOAT32 values are not range-checked here: :meth:`infer`'s batch worker checks them once
        per batch (``Scored.in_range``) and raises for this request alone. The accepted case
        costs a few comparisons; the messages are built only for a refused request.
        """
        want = served.runtime.input_shape
        kind = DTYPES.get(dtype)
        dims = tuple(shape)
        if len(dims) == len(want):
            dims = (1, *dims)
        if kind is None or dims[1:] != want or not 0 < dims[0] <= self.max_batch \
                or len(data) != math.prod(dims) * kind[0].itemsize:
            self._refuse(served, dtype, list(shape), data, field)
        np_dtype, scale = kind
        x = np.frombuffer(data, dtype=np_dtype).reshape(dims)
        if scale != 1.0:
            return x.astype(np.float32) * np.float32(scale)  # UINT8 is always in range
        return x  # FLOAT32: no copy; ORT (or the batch concatenation) reads the request buffer

    def _refuse(self, served: Served, dtype: str, shape: list, data: bytes, field: str) -> None:
        """Raise InvalidInput saying what is wrong with a tensor ``decode`` did not accept."""
        want = served.runtime.input_shape
        spec = f"[N, {', '.join(map(str, want))}] or [{', '.join(map(str, want))}]"
        if dtype not in DTYPES:
            raise InvalidInput(f"{field}.dtype is {dtype or 'unset'!r}; expected FLOAT32 or UINT8")
        np_dtype, _ = DTYPES[dtype]
        shape = [int(d) for d in shape]
        given = list(shape)
        if len(shape) == len(want):
            shape = [1, *shape]
        elif len(shape) != len(want) + 1:
            raise InvalidInput(f"{field}.shape {shape} has rank {len(shape)}; expected {spec} "
                               f"for model {served.runtime.name!r}")
        if any(d < 0 for d in shape):
            raise InvalidInput(f"{field}.shape {shape} has a negative dimension")
        if tuple(shape[1:]) != tuple(want):
            raise InvalidInput(f"{field}.shape {given} does not match model "
                               f"{served.runtime.name!r}: expected {spec}")
        n = shape[0]
        if n == 0:
            raise InvalidInput(f"{field}.shape {shape}: the batch is empty; send at least one image")
        if n > self.max_batch:
            raise InvalidInput(f"{field}.shape {shape}: batch of {n} exceeds the server's "
                               f"max_batch {self.max_batch}; split the request")
        expected = math.prod(shape) * np_dtype.itemsize
        raise InvalidInput(
            f"{field}.data has {len(data)} bytes; shape {shape} of {dtype} needs {expected}")

    def check_values(self, x: np.ndarray, field: str = "images") -> np.ndarray:
        """``x`` as contiguous float32 if every value is finite and in [0, 1], else InvalidInput.

        The hot path is one min and one max (NaN fails both comparisons); the detailed message
        is built only for a bad request.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        lo, hi = x.min(), x.max()
        if lo >= 0.0 and hi <= 1.0:
            return x
        finite = np.isfinite(x)
        if not finite.all():
            idx = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise InvalidInput(f"{field} contains {int((~finite).sum())} NaN/Inf value(s), "
                               f"first at index {list(idx)} ({x[idx]}); expected finite values in [0, 1]")
        raise InvalidInput(f"{field} values span [{float(lo):.4g}, {float(hi):.4g}]; expected [0, 1] "
                           f"(FLOAT32) or 0..255 (UINT8)")

    # inference --------------------------------------------------------------------------------
    async def infer(self, served: Served, x: np.ndarray, field: str = "images") -> tuple[Scored, Served]:
        """Scored model output for ``x`` and the package that computed it.

        Rows outside [0, 1] (checked in the batch worker) raise InvalidInput naming ``field``;
        their neighbours in the batch are unaffected. If a hot reload swapped the model between
        lookup and submit, the request goes to the new version (same input spec required)
        instead of failing.
        """
        try:
            scored = await served.batcher.submit(x)
        except BatcherClosed:
            current = self.repository.get(served.runtime.name)
            if current is None or current is served or \
                    current.runtime.input_shape != served.runtime.input_shape:
                raise
            served = current
            scored = await current.batcher.submit(x)
        if not scored.all_in_range:
            self.check_values(x, field)  # raises with the detailed message
            raise InvalidInput(f"{field} values are outside [0, 1]")  # unreachable in practice
        return scored, served

    def resolve_top_k(self, requested: int, served: Served) -> int:
        if requested < 0:
            raise InvalidInput(f"top_k is {requested}; expected 0 (default {DEFAULT_TOP_K}) or more")
        return min(requested or DEFAULT_TOP_K, len(served.runtime.labels))
