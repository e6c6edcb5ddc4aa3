"""Small numpy oracles for tests, benchmarks and the gradient-masking checks' self-tests.

``ArrayOracle`` wraps any object with numpy ``logits``/``loss_grad`` (e.g.
``dcs.robustness.testing.MLPWeights``). The others are deliberately *gradient-masking* models built on
such a network; their ``loss_grad`` returns the true gradient of what they compute (or, for
``StochasticGradient``, an unbiased but very noisy one), which is exactly what an attacker without
BPDA/EOT sees:

* ``QuantizedInput``: pixels rounded to ``levels`` values before the network. The true gradient
  is zero almost everywhere (a hard-threshold front end attacked without BPDA).
* ``StochasticGradient``: each gradient has Gaussian noise ``noise``× its mean magnitude added
  (a randomized defense attacked without EOT).
* ``ShatteredGradient``: front end t(x) = x + a·sin(ωx)/ω with ω = 32π (a period of 1/16, the
  digits' grey-level spacing); informative gradient on the data grid, sign-flipped between grid
  points, so single steps from the clean point work and small iterative steps oscillate.
* ``FoldedInput``: front end t(x) = triangle wave of period ``period``; the network is trained on
  t(x) by the caller. Perturbations of a whole period are invisible, so accuracy under FGSM
  rises again with ε.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class ArrayOracle:
    """Oracle over a numpy model with ``logits(x)`` and ``loss_grad(x, y)``."""

    def __init__(self, model: Any, num_classes: int, input_shape: tuple[int, ...]) -> None:
        self.model = model
        self.num_classes = int(num_classes)
        self.input_shape = tuple(input_shape)
        self.bounds = (0.0, 1.0)

    def _front(self, x: np.ndarray) -> np.ndarray:
        return x

    def _front_grad(self, x: np.ndarray) -> np.ndarray:
        return np.ones_like(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.logits(self._front(x)), np.float32)

    def loss_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lg, g = self.model.loss_grad(self._front(x), y)
        return np.asarray(lg, np.float32), (g * self._front_grad(x)).astype(np.float32)


class QuantizedInput(ArrayOracle):
    def __init__(self, model, num_classes, input_shape, levels: int = 5) -> None:
        super().__init__(model, num_classes, input_shape)
        self.levels = levels

    def _front(self, x):
        return np.round(x * (self.levels - 1)) / (self.levels - 1)

    def _front_grad(self, x):
        return np.zeros_like(x)


class StochasticGradient(ArrayOracle):
    def __init__(self, model, num_classes, input_shape, noise: float = 3.0, seed: int = 0) -> None:
        super().__init__(model, num_classes, input_shape)
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def loss_grad(self, x, y):
        lg, g = super().loss_grad(x, y)
        scale = np.abs(g).reshape(len(g), -1).mean(1).reshape((-1,) + (1,) * (g.ndim - 1))
        return lg, (g + self.noise * scale * self.rng.standard_normal(g.shape)).astype(np.float32)


class ShatteredGradient(ArrayOracle):
    def __init__(self, model, num_classes, input_shape, amplitude: float = 3.0,
                 omega: float = 32 * np.pi) -> None:
        super().__init__(model, num_classes, input_shape)
        self.a, self.w = amplitude, omega

    def _front(self, x):
        return x + self.a * np.sin(self.w * x) / self.w

    def _front_grad(self, x):
        return 1.0 + self.a * np.cos(self.w * x)


def fold(x: np.ndarray, period: float) -> np.ndarray:
    """Triangle wave in [0, 1] with the given period (t(0) = 1)."""
    return np.abs(((x / (period / 2)) % 2) - 1)


class FoldedInput(ArrayOracle):
    """``model`` must be trained on ``fold(x, period)``."""

    def __init__(self, model, num_classes, input_shape, period: float = 0.4) -> None:
        super().__init__(model, num_classes, input_shape)
        self.period = period

    def _front(self, x):
        return fold(x, self.period)

    def _front_grad(self, x):
        return np.where(((x / (self.period / 2)) % 2) < 1, -1.0, 1.0) / (self.period / 2)
