"""The oracle protocol: the only way the attack engine talks to a model.

An oracle takes and returns numpy arrays. Inputs are float32 ``[N, C, H, W]`` in ``bounds``;
labels are int64 ``[N]``. ``loss_grad`` returns the logits and the gradient of the summed
cross-entropy loss with respect to the input (per example, so the sum and the mean differ only by
a scale the sign-based attacks ignore; ours is the per-example gradient of CE).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ScoreOracle(Protocol):
    """A model that answers with logits only (what a score-based attacker sees)."""

    num_classes: int
    input_shape: tuple[int, ...]
    bounds: tuple[float, float]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[N, K]`` float32 for inputs ``[N, *input_shape]`` float32."""
        ...


@runtime_checkable
class GradientOracle(ScoreOracle, Protocol):
    """A model that also answers with the input gradient of the cross-entropy loss."""

    def loss_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits [N, K], d CE(logits_i, y_i) / d x_i [N, *input_shape])``."""
        ...


class ScoreOnlyView:
    """Wraps an oracle so that only ``logits`` is reachable (for score-based attacks)."""

    def __init__(self, oracle: ScoreOracle) -> None:
        self._oracle = oracle
        self.num_classes = oracle.num_classes
        self.input_shape = tuple(oracle.input_shape)
        self.bounds = tuple(oracle.bounds)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._oracle.logits(x)


def has_gradients(oracle: object) -> bool:
    """True when the oracle offers ``loss_grad``."""
    return callable(getattr(oracle, "loss_grad", None))


def surrogates(oracle: object) -> tuple[str, ...]:
    """The gradient surrogates an oracle declares for its BPDA layers (``oracle.surrogates``;
    empty when it declares none). Each member is reached with ``oracle.with_surrogate(name)``,
    a view with the same ``logits`` and that member's ``loss_grad``."""
    names = getattr(oracle, "surrogates", None)
    return tuple(str(n) for n in names) if names else ()


def surrogate_view(oracle: object, name: str):
    """``oracle.with_surrogate(name)``; ValueError naming the declared members otherwise."""
    declared = surrogates(oracle)
    if name not in declared:
        raise ValueError(f"gradient surrogate {name!r} is not declared by this model "
                         f"(declared: {list(declared) or 'none'})")
    return oracle.with_surrogate(name)
