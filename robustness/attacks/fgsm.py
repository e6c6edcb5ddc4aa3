"""FGSM: one signed-gradient step (Goodfellow et al. 2015, https://arxiv.org/abs/1412.6572).

Threat model: white-box ℓ∞, ε in [0,1] pixel units. Untargeted (raise CE(y)) or targeted
(lower CE(target)). Cost: 1 gradient and 2 logits queries per example.
Inputs float32 [N, C, H, W] in [0,1]; output in the ε-ball ∩ [0,1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dcs.robustness.attacks.base import Attack, Capabilities


@dataclass(frozen=True)
class FGSM(Attack):
    """x_adv = clip(x + ε·sign(∇ₓ loss)). Parameters: eps (default 0.1), targeted, batch_size."""

    name: ClassVar[str] = "fgsm"
    capabilities: ClassVar[Capabilities] = Capabilities(targeted=True, iterative=False)

    def gradient_cost(self, n: int) -> int:
        return n

    def query_cost(self, n: int) -> int:
        return 3 * n

    def _perturb(self, oracle, x, y, target, rng, track) -> None:
        idx = track.active
        tgt = target[idx] if target is not None else None
        _, _, g = self._loss_grad(oracle, x[idx], y[idx], tgt)
        x1 = self._project(x[idx], x[idx] + self.eps * np.sign(g))
        track.offer(idx, x1, oracle.logits(x1))
