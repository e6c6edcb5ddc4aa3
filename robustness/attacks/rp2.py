"""RP2, Robust Physical Perturbations (Eykholt et al. 2018, https://arxiv.org/abs/1707.08945).

The perturbation δ lives only inside a mask M (rectangular "stickers" or a user mask) and is
optimised with Adam in expectation over random transformations T (translations, small rotations,
brightness scaling):

    untargeted: minimise  −E_T CE(f(T(clip(x + M⊙δ))), y) + λ‖M⊙δ‖₂
    targeted:   minimise   E_T CE(f(T(clip(x + M⊙δ))), t) + λ‖M⊙δ‖₂

δ starts uniform in [−ε, ε] and is kept in [−ε, ε] (ε = 1 means unbounded inside the mask, as
published). Success is judged on the untransformed image. Pixels outside the mask never change
(the base class enforces it on every output).

Parameters (defaults): eps 1.0 (ℓ∞ cap inside the mask); mask None (bool [H,W] or [C,H,W]; when
given it replaces ``stickers``); stickers two rectangles as (top, left, height, width) fractions of
the image; steps 100; lr 0.1 (Adam); lam 0.02 (λ); n_transforms 4 (samples of T per step, each one
gradient call); max_shift 0.1 (fraction of the side); max_rotation 10 (degrees);
brightness (0.8, 1.2); targeted False; batch_size 128.
Cost per example: steps·n_transforms gradients and steps + 2 logits queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dcs.robustness.attacks.base import Attack, AttackError, Capabilities

DEFAULT_STICKERS = ((0.15, 0.15, 0.2, 0.7), (0.65, 0.15, 0.2, 0.7))


def sticker_mask(shape: tuple[int, int], stickers) -> np.ndarray:
    """Boolean [H, W] mask from (top, left, height, width) rectangles in fractions of the side."""
    h, w = shape
    m = np.zeros((h, w), bool)
    for top, left, hh, ww in stickers:
        r0, c0 = round(top * h), round(left * w)
        r1, c1 = max(round((top + hh) * h), r0 + 1), max(round((left + ww) * w), c0 + 1)
        m[max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)] = True
    return m


def _sample_maps(rng, n: int, h: int, w: int, max_shift: float, max_rot: float):
    """Nearest-neighbour source index [n, H*W] and validity for random shift+rotation."""
    ang = np.deg2rad(rng.uniform(-max_rot, max_rot, size=n))
    dy = rng.uniform(-max_shift, max_shift, size=n) * h
    dx = rng.uniform(-max_shift, max_shift, size=n) * w
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yo = (ii.reshape(1, -1) - cy - dy[:, None])
    xo = (jj.reshape(1, -1) - cx - dx[:, None])
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    ys = np.rint(cos * yo + sin * xo + cy).astype(int)
    xs = np.rint(-sin * yo + cos * xo + cx).astype(int)
    valid = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    src = np.where(valid, ys * w + xs, 0)
    return src, valid


@dataclass(frozen=True)
class RP2(Attack):
    """Masked, expectation-over-transformation attack with Adam (see module docstring)."""

    name: ClassVar[str] = "rp2"
    capabilities: ClassVar[Capabilities] = Capabilities(norm="mask", targeted=True)

    eps: float = 1.0
    mask: Any = None
    stickers: tuple = DEFAULT_STICKERS
    steps: int = 100
    lr: float = 0.1
    lam: float = 0.02
    n_transforms: int = 4
    max_shift: float = 0.1
    max_rotation: float = 10.0
    brightness: tuple = (0.8, 1.2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.n_transforms < 1:
            raise AttackError(f"rp2: steps={self.steps}, n_transforms={self.n_transforms}; both must be >= 1")
        if self.lr <= 0 or self.lam < 0:
            raise AttackError(f"rp2: lr={self.lr} must be > 0 and lam={self.lam} >= 0")

    def gradient_cost(self, n: int) -> int:
        return n * self.steps * self.n_transforms

    def query_cost(self, n: int) -> int:
        return n * (self.steps + 2)

    def _mask(self, x: np.ndarray) -> np.ndarray:
        _, c, h, w = x.shape
        if self.mask is not None:
            m = np.asarray(self.mask, bool)
            if m.shape not in ((h, w), (c, h, w), (1, h, w)):
                raise AttackError(f"rp2: mask shape {list(m.shape)}, expected [{h}, {w}] or [{c}, {h}, {w}]")
        else:
            m = sticker_mask((h, w), self.stickers)
        return np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), (1, c, h, w))

    def _transform(self, xa, rng, n_all, idx):
        """Apply random T to xa [m,...]; returns (T(xa), backward function)."""
        m, c, h, w = xa.shape
        src, valid = _sample_maps(rng, n_all, h, w, self.max_shift, self.max_rotation)
        b = rng.uniform(self.brightness[0], self.brightness[1], size=n_all)
        src, valid, b = src[idx], valid[idx], b[idx].reshape(-1, 1, 1, 1)
        flat = xa.reshape(m, c, h * w)
        warped = np.take_along_axis(flat, np.broadcast_to(src[:, None, :], (m, c, h * w)), axis=2)
        warped = (warped * valid[:, None, :]).reshape(m, c, h, w)
        raw = b * warped
        out = np.clip(raw, 0.0, 1.0).astype(np.float32)

        def backward(g_out):
            g = (g_out * ((raw > 0) & (raw < 1)) * b).reshape(m, c, h * w) * valid[:, None, :]
            g_in = np.zeros((m, c, h * w), np.float64)
            n_i = np.arange(m)[:, None, None]
            c_i = np.arange(c)[None, :, None]
            np.add.at(g_in, (n_i, c_i, np.broadcast_to(src[:, None, :], (m, c, h * w))), g)
            return g_in.reshape(m, c, h, w)

        return out, backward

    def _perturb(self, oracle, x, y, target, rng, track) -> None:
        eps = float(self.eps)
        mask = self._mask(x).astype(np.float32)
        n = len(x)
        delta = rng.uniform(-eps, eps, size=x.shape).astype(np.float64)
        m1, m2 = np.zeros_like(delta), np.zeros_like(delta)
        b1, b2, tiny = 0.9, 0.999, 1e-8
        lab = target if target is not None else y
        sign = 1.0 if target is not None else -1.0  # targeted: descend CE(t); untargeted: ascend CE(y)
        for step in range(1, self.steps + 1):
            idx = track.active
            if not len(idx):
                return
            raw = x[idx] + mask * delta[idx]
            xa = np.clip(raw, 0.0, 1.0).astype(np.float32)
            g_x = np.zeros(xa.shape, np.float64)
            for _ in range(self.n_transforms):
                xt, back = self._transform(xa, rng, n, idx)
                _, g = oracle.loss_grad(xt, lab[idx])
                g_x += back(g.astype(np.float64))
            g_x /= self.n_transforms
            md = mask * delta[idx]
            norm = np.sqrt((md.reshape(len(idx), -1) ** 2).sum(1)).reshape(-1, 1, 1, 1) + 1e-12
            grad = sign * g_x * ((raw > 0) & (raw < 1)) * mask + self.lam * mask * md / norm
            m1[idx] = b1 * m1[idx] + (1 - b1) * grad
            m2[idx] = b2 * m2[idx] + (1 - b2) * grad ** 2
            mh = m1[idx] / (1 - b1 ** step)
            vh = m2[idx] / (1 - b2 ** step)
            delta[idx] = np.clip(delta[idx] - self.lr * mh / (np.sqrt(vh) + tiny), -eps, eps)
            xa = self._project(x[idx], x[idx] + mask * delta[idx], mask.astype(bool))
            track.offer(idx, xa, oracle.logits(xa))
