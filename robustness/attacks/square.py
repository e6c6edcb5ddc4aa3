"""Square attack, ℓ∞ (Andriushchenko et al. 2020, https://arxiv.org/abs/1912.00049). Score-only.

Uses ``logits`` only (it runs through ``ScoreOnlyView``, so it works on oracles without
``loss_grad``). Starts from vertical stripes of ±ε, then per iteration proposes, for each still
unfooled example, a random square window (side from the p schedule) filled with a new ±ε value
per channel, and keeps it when the margin loss decreases.

Parameters (defaults): eps 0.1; n_queries 1000 (logits queries per example, including the first
one, i.e. iterations = n_queries − 1); p_init 0.05 (fraction of pixels changed at the start,
halved on the paper's schedule); targeted False (margin to the target); batch_size 128.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dcs.robustness.attacks.base import Attack, AttackError, Capabilities, margin


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """The paper's piecewise-constant schedule, rescaled to 10,000 iterations."""
    it = int(it / max(n_iters, 1) * 10000)
    for bound, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32),
                       (500, 16), (200, 8), (50, 4), (10, 2)):
        if it > bound:
            return p_init / div
    return p_init


@dataclass(frozen=True)
class Square(Attack):
    """Score-only random search over square windows (see module docstring)."""

    name: ClassVar[str] = "square"
    capabilities: ClassVar[Capabilities] = Capabilities(
        targeted=True, needs_gradients=False, score_only=True)

    n_queries: int = 1000
    p_init: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_queries < 1:
            raise AttackError(f"square: n_queries={self.n_queries}, expected >= 1")
        if not 0.0 < self.p_init <= 1.0:
            raise AttackError(f"square: p_init={self.p_init}, expected in (0, 1]")

    def query_cost(self, n: int) -> int:
        return n * (self.n_queries + 2)

    def _perturb(self, oracle, x, y, target, rng, track) -> None:
        eps = float(self.eps)
        n, c, h, w = x.shape
        stripes = rng.choice([-eps, eps], size=(n, c, 1, w)).astype(np.float32)
        idx = track.active
        xb = self._project(x[idx], x[idx] + stripes[idx])
        lg = oracle.logits(xb)
        tgt = target[idx] if target is not None else None
        loss = margin(lg, y[idx], tgt)
        ok = track.offer(idx, xb, lg)
        rows, cols = np.arange(h), np.arange(w)
        n_iters = self.n_queries - 1
        for it in range(n_iters):
            # Draw for the whole batch every iteration (stream independent of early stopping).
            p = p_selection(self.p_init, it, n_iters)
            s = round(float(np.sqrt(p * h * w)))
            s = min(max(s, 1), max(min(h, w) - 1, 1))
            ch = rng.integers(0, h - s + 1, size=n)
            cw = rng.integers(0, w - s + 1, size=n)
            vals = rng.choice([-eps, eps], size=(n, c, 1, 1)).astype(np.float32)
            keep = ~ok
            idx, xb, loss = idx[keep], xb[keep], loss[keep]
            tgt = tgt[keep] if tgt is not None else None
            if not len(idx):
                return
            win = (((rows[None, :] >= ch[idx, None]) & (rows[None, :] < ch[idx, None] + s))[:, :, None]
                   & ((cols[None, :] >= cw[idx, None]) & (cols[None, :] < cw[idx, None] + s))[:, None, :])
            win = win[:, None]
            x0 = x[idx]
            cand = self._project(x0, np.where(win, x0 + vals[idx], xb))
            lg = oracle.logits(cand)
            new_loss = margin(lg, y[idx], tgt)
            better = new_loss < loss
            ok = track.offer(idx, cand, lg, keep=better)
            xb = np.where(better.reshape(-1, 1, 1, 1), cand, xb)
            loss = np.where(better, new_loss, loss)
