"""APGD-CE and APGD-DLR (Croce & Hein 2020, https://arxiv.org/abs/2003.01690), ℓ∞.

Step size starts at 2ε and is halved per example at checkpoints when (1) the loss increased in at
most ρ=0.75 of the steps since the last checkpoint, or (2) the step size was not reduced at the
last checkpoint and the best loss did not improve since; on halving, the iterate restarts from the
best point. Checkpoints: first after ⌈0.22·steps⌉ iterations, then each period shrinks by 0.03·steps
down to 0.06·steps. Momentum α=0.75. Random start inside the ball. ``restarts`` extra runs only
on examples not yet fooled. Per example the first adversarial iterate is kept, else the best-loss one.

APGD-DLR maximises the difference-of-logits ratio −(z_y − max_{j≠y} z_j)/(z_π1 − z_π3). Our oracle
exposes only cross-entropy gradients, and ∇(z_a − z_b) = ∇CE(·, b) − ∇CE(·, a) exactly, so each
DLR step costs three ``loss_grad`` calls (labels y, the best other class, and π3). Needs K ≥ 3.

Parameters (defaults): eps 0.1; steps 100; restarts 1; rho 0.75; momentum 0.75; targeted (CE only)
False; batch_size 128. Cost per example: restarts·(steps+1) gradients (×3 for DLR).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dcs.robustness.attacks.base import Attack, AttackError, Capabilities


def dlr_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    n = np.arange(len(z))
    srt = np.sort(z, axis=1)
    other = z.copy()
    other[n, y] = -np.inf
    return -(z[n, y] - other.max(1)) / (srt[:, -1] - srt[:, -3] + 1e-12)


@dataclass(frozen=True)
class APGDCE(Attack):
    """Auto-PGD on cross-entropy (targeted: on −CE(target))."""

    name: ClassVar[str] = "apgd-ce"
    capabilities: ClassVar[Capabilities] = Capabilities(targeted=True)

    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    momentum: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.restarts < 1:
            raise AttackError(f"{self.name}: steps={self.steps}, restarts={self.restarts}; both must be >= 1")

    def _grad_calls(self) -> int:
        return 1

    def gradient_cost(self, n: int) -> int:
        return n * (self.steps + 1) * self.restarts * self._grad_calls()

    def query_cost(self, n: int) -> int:
        return 2 * n

    # loss to maximise, its gradient and the logits
    def _objective(self, oracle, x, y, tgt):
        lg, loss, g = self._loss_grad(oracle, x, y, tgt)
        return lg, loss, g

    def _perturb(self, oracle, x, y, target, rng, track) -> None:
        eps = float(self.eps)
        n_iter = self.steps
        n2 = max(int(np.ceil(0.22 * n_iter)), 1)
        n_min = max(int(np.ceil(0.06 * n_iter)), 1)
        decr = max(int(np.ceil(0.03 * n_iter)), 1)
        for _ in range(self.restarts):
            t = rng.uniform(-1.0, 1.0, size=x.shape)
            idx = track.active
            if not len(idx):
                return
            x0 = x[idx]
            tgt = target[idx] if target is not None else None
            yy = y[idx]
            m = len(idx)
            scale = np.abs(t[idx]).reshape(m, -1).max(1).reshape((m,) + (1,) * (x.ndim - 1)) + 1e-12
            xa = self._project(x0, x0 + eps * t[idx] / scale)
            lg, loss, g = self._objective(oracle, xa, yy, tgt)
            ok = track.offer(idx, xa, lg)
            best_loss, x_best, g_best = loss.copy(), xa.copy(), g.copy()
            eta = np.full((m,) + (1,) * (x.ndim - 1), 2.0 * eps, np.float32)
            x_old = xa.copy()
            prev_loss = loss.copy()
            n_up = np.zeros(m, int)
            reduced_last = np.ones(m, bool)
            best_at_ck = best_loss.copy()
            k, since = n2, 0
            for i in range(n_iter):
                keep = ~ok
                if not keep.all():
                    (idx, x0, yy, xa, x_old, g, best_loss, x_best, g_best, eta, prev_loss, n_up,
                     reduced_last, best_at_ck) = (a[keep] for a in (
                        idx, x0, yy, xa, x_old, g, best_loss, x_best, g_best, eta, prev_loss, n_up,
                        reduced_last, best_at_ck))
                    tgt = tgt[keep] if tgt is not None else None
                    if not len(idx):
                        break
                a = self.momentum if i > 0 else 1.0
                z = self._project(x0, xa + eta * np.sign(g))
                x_new = self._project(x0, xa + a * (z - xa) + (1.0 - a) * (xa - x_old))
                x_old, xa = xa, x_new
                lg, loss, g = self._objective(oracle, xa, yy, tgt)
                better = loss > best_loss
                ok = track.offer(idx, xa, lg, keep=better)
                n_up += loss > prev_loss
                prev_loss = loss
                x_best[better], g_best[better], best_loss[better] = xa[better], g[better], loss[better]
                since += 1
                if since == k:
                    osc = n_up <= self.rho * k
                    no_impr = (~reduced_last) & (best_at_ck >= best_loss)
                    red = osc | no_impr
                    reduced_last = red
                    best_at_ck = best_loss.copy()
                    eta[red] /= 2.0
                    xa[red], g[red] = x_best[red], g_best[red]
                    n_up[:] = 0
                    since = 0
                    k = max(k - decr, n_min)


@dataclass(frozen=True)
class APGDDLR(APGDCE):
    """Auto-PGD on the DLR loss (untargeted); gradient recovered from three CE gradients."""

    name: ClassVar[str] = "apgd-dlr"
    capabilities: ClassVar[Capabilities] = Capabilities(targeted=False)

    def _grad_calls(self) -> int:
        return 3

    def _objective(self, oracle, x, y, tgt):
        if oracle.num_classes < 3:
            raise AttackError("apgd-dlr needs at least 3 classes")
        lg, g_y = oracle.loss_grad(x, y)
        z = lg.astype(np.float64)
        n = np.arange(len(z))
        other = z.copy()
        other[n, y] = -np.inf
        j = other.argmax(1)
        order = np.argsort(-z, axis=1)
        p1, p3 = order[:, 0], order[:, 2]
        _, g_j = oracle.loss_grad(x, j)
        _, g_3 = oracle.loss_grad(x, p3)
        g_p1 = np.where((p1 == y).reshape((-1,) + (1,) * (x.ndim - 1)), g_y, g_j)
        u = z[n, y] - z[n, j]
        v = z[n, p1] - z[n, p3] + 1e-12
        du = (g_j - g_y).astype(np.float64)   # ∇(z_y - z_j)
        dv = (g_3 - g_p1).astype(np.float64)  # ∇(z_π1 - z_π3)
        sh = (-1,) + (1,) * (x.ndim - 1)
        grad = -(du * v.reshape(sh) - u.reshape(sh) * dv) / (v.reshape(sh) ** 2)
        return lg, -u / v, grad.astype(np.float32)
