"""Random-noise control: x + ε·s with independent random signs s ∈ {−1, +1} (corners of the ball).

Not an attack; gradient-masking checks compare it with the real attacks (noise of the same ε must
be weaker). Parameters (defaults): eps 0.1; samples 1 (independent draws; any that fools counts);
batch_size 128. Cost: samples + 2 logits queries per example, no gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dcs.robustness.attacks.base import Attack, AttackError, Capabilities


@dataclass(frozen=True)
class RandomNoise(Attack):
    """Uniformly random ±ε sign noise (see module docstring)."""

    name: ClassVar[str] = "noise"
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_gradients=False, iterative=False, control=True)

    samples: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 1:
            raise AttackError(f"noise: samples={self.samples}, expected >= 1")

    def query_cost(self, n: int) -> int:
        return n * (self.samples + 2)

    def _perturb(self, oracle, x, y, target, rng, track) -> None:
        for _ in range(self.samples):
            s = rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32)
            idx = track.active
            if not len(idx):
                return
            xn = self._project(x[idx], x[idx] + float(self.eps) * s[idx])
            track.offer(idx, xn, oracle.logits(xn))
