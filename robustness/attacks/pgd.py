"""BIM and PGD: iterated signed-gradient steps projected onto the ℓ∞ ball.

BIM: Kurakin et al. 2017 (https://arxiv.org/abs/1607.02533), starts at x.
PGD: Madry et al. 2018 (https://arxiv.org/abs/1706.06083), uniform random start in the ball,
``restarts`` independent runs; per example the first adversarial iterate of any restart is kept,
else the highest-loss iterate over all restarts (the "per-example best restart").
Restarts run only on examples not yet fooled.

Threat model: white-box ℓ∞. Parameters (defaults): eps 0.1 (pixel units in [0,1]); steps 10;
step_size None → 2.5·ε/steps (absolute pixel units otherwise); restarts 1 (PGD only);
random_start True (PGD) / False (BIM); targeted False; batch_size 128.
Cost per example: restarts·steps gradients, restarts + 2 logits queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dcs.robustness.attacks.base import Attack, AttackError, Capabilities, cross_entropy


@dataclass(frozen=True)
class PGD(Attack):
    """Projected gradient descent, ℓ∞, with random start and restarts (see module docstring)."""

    name: ClassVar[str] = "pgd"
    capabilities: ClassVar[Capabilities] = Capabilities(targeted=True)

    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.restarts < 1:
            raise AttackError(f"{self.name}: steps={self.steps}, restarts={self.restarts}; both must be >= 1")
        if self.step_size is not None and self.step_size <= 0:
            raise AttackError(f"{self.name}: step_size={self.step_size!r}, expected > 0 or None")

    @property
    def alpha(self) -> float:
        return float(self.step_size) if self.step_size is not None else 2.5 * float(self.eps) / self.steps

    def gradient_cost(self, n: int) -> int:
        return n * self.steps * self.restarts

    def query_cost(self, n: int) -> int:
        return n * (self.restarts + 2)

    def _perturb(self, oracle, x, y, target, rng, track) -> None:
        eps, alpha = float(self.eps), self.alpha
        best_loss = np.full(len(x), -np.inf)
        for _ in range(self.restarts):
            start = rng.uniform(-eps, eps, size=x.shape).astype(np.float32) if self.random_start else None
            idx = track.active
            if not len(idx):
                return
            x0 = x[idx]
            tgt_all = target[idx] if target is not None else None
            xa = self._project(x0, x0 + start[idx]) if start is not None else x0.copy()
            for _step in range(self.steps):
                tgt = tgt_all
                stop, g = self._loss_grad_offer(oracle, track, idx, xa, y[idx], tgt, best_loss)
                alive = ~stop
                if not alive.all():  # drop examples whose record is now frozen
                    idx, x0, xa, g = idx[alive], x0[alive], xa[alive], g[alive]
                    tgt_all = tgt_all[alive] if tgt_all is not None else None
                    if not len(idx):
                        break
                xa = self._project(x0, xa + alpha * np.sign(g))
            else:
                lg = oracle.logits(xa)
                loss = cross_entropy(lg, y[idx]) if tgt_all is None else -cross_entropy(lg, tgt_all)
                better = loss > best_loss[idx]
                track.offer(idx, xa, lg, keep=better)
                best_loss[idx] = np.maximum(best_loss[idx], loss)

    def _loss_grad_offer(self, oracle, track, idx, xa, y, tgt, best_loss):
        lg, loss, g = self._loss_grad(oracle, xa, y, tgt)
        better = loss > best_loss[idx]
        stop = track.offer(idx, xa, lg, keep=better)
        best_loss[idx] = np.maximum(best_loss[idx], loss)
        return stop, g


@dataclass(frozen=True)
class BIM(PGD):
    """Basic iterative method: PGD without random start and with a single run."""

    name: ClassVar[str] = "bim"
    capabilities: ClassVar[Capabilities] = Capabilities(targeted=True)

    random_start: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restarts != 1 or self.random_start:
            raise AttackError("bim: restarts must be 1 and random_start False (use pgd)")
