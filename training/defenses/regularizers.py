"""Regularizer values (scalars, differentiable) for BlurNet and polarizing front ends."""
from __future__ import annotations

import torch
from torch import Tensor


def linf_depthwise_penalty(weight: Tensor, alpha: float) -> Tensor:
    """BlurNet: α/K Σ_j ‖W_dw[:,:,j]‖∞ for a depthwise weight [K, 1, kh, kw] (K channels)."""
    k = weight.shape[0]
    return alpha / k * weight.reshape(k, -1).abs().amax(dim=1).sum()


def tv_penalty(feature_maps: Tensor, alpha: float) -> Tensor:
    """BlurNet: α_TV/(N·K) Σ_n Σ_k TV(F[n,k]) with anisotropic
    TV(x) = Σ |x[i+1,j] − x[i,j]| + |x[i,j+1] − x[i,j]|, for maps [N, K, H, W]."""
    n, k = feature_maps.shape[:2]
    dh = (feature_maps[:, :, 1:, :] - feature_maps[:, :, :-1, :]).abs().sum()
    dw = (feature_maps[:, :, :, 1:] - feature_maps[:, :, :, :-1]).abs().sum()
    return alpha / (n * k) * (dh + dw)


def pfe_b1(z: Tensor, sigma1: float) -> Tensor:
    """Stage-1 regularizer mean B1(z) = mean exp(−z²/2σ₁²) over all activations."""
    return torch.exp(-z.square() / (2 * sigma1 ** 2)).mean()


def pfe_b2(z: Tensor, c: float, sigma2: float) -> Tensor:
    """Stage-2 regularizer mean B2(z) = mean [exp(−(z−c)²/2σ₂²) + exp(−(z+c)²/2σ₂²)]."""
    s = 2 * sigma2 ** 2
    return (torch.exp(-(z - c).square() / s) + torch.exp(-(z + c).square() / s)).mean()


def pfe_lambda(epoch_in_stage: float, stage_epochs: int, lam: float, ramp: str = "epoch") -> float:
    """λ for a (possibly fractional) epoch within a stage. "epoch": the authors' λ·⌊e⌋/E;
    "batch": λ·e/E with fractional e; "none": constant λ."""
    if ramp == "none":
        return lam
    if stage_epochs <= 0:
        return 0.0
    e = int(epoch_in_stage) if ramp == "epoch" else epoch_in_stage
    return lam * e / stage_epochs
