"""Fixed low-pass kernels for BlurNet's blur layers."""
from __future__ import annotations

import numpy as np


def gaussian_sigma(k: int) -> float:
    """OpenCV's default sigma for a k×k Gaussian: 0.3·((k−1)/2 − 1) + 0.8."""
    return 0.3 * ((k - 1) * 0.5 - 1) + 0.8


def blur_kernel(k: int, kind: str = "box", sigma: float | None = None) -> np.ndarray:
    """A normalized (sums to 1) k×k float32 kernel: box (all 1/k²) or separable Gaussian."""
    if kind == "box":
        return np.full((k, k), 1.0 / (k * k), np.float32)
    if kind == "gaussian":
        s = sigma if sigma is not None else gaussian_sigma(k)
        t = np.arange(k, dtype=np.float64) - (k - 1) / 2
        g = np.exp(-t ** 2 / (2 * s ** 2))
        g2 = np.outer(g, g)
        return (g2 / g2.sum()).astype(np.float32)
    raise ValueError(f"unknown blur kind {kind!r}")
