"""A package view that stops an audit between two model calls (cancel, shutdown)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dcs.robustness.attacks import Stopped


class StoppableOracle:
    """Delegates to a package but checks ``should_stop`` before every model call.

    The engine polls ``should_stop`` between batches only; checking here as well makes cancel
    and shutdown take effect within one oracle call. It raises the engine's ``Stopped``, which
    ``dcs.robustness.audit.audit`` turns into ``AuditCancelled``. ``on_call`` runs before each
    call (the server's liveness heartbeat).
    """

    def __init__(self, inner: Any, should_stop: Callable[[], bool],
                 on_call: Callable[[], None] | None = None) -> None:
        self._inner = inner
        self._should_stop = should_stop
        self._on_call = on_call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self) -> None:
        if self._should_stop():
            raise Stopped("audit stopped between two model calls")
        if self._on_call is not None:
            self._on_call()

    def logits(self, x: np.ndarray) -> np.ndarray:
        self._check()
        return self._inner.logits(x)

    def loss_grad(self, x: np.ndarray, y: np.ndarray):
        self._check()
        return self._inner.loss_grad(x, y)

    def logit_bounds(self, x: np.ndarray, eps: float):
        self._check()
        return self._inner.logit_bounds(x, eps)

    def with_surrogate(self, name: str) -> StoppableOracle:
        """A surrogate member's view (adaptive audits), checked like the package itself."""
        return StoppableOracle(self._inner.with_surrogate(name), self._should_stop, self._on_call)

    def probe(self, x: np.ndarray):
        self._check()
        return self._inner.probe(x)
