"""Torch PGD (Madry et al. 2018, ℓ∞, random start) for adversarial training."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcs.training.config import STRAIGHT_THROUGH, surrogate_tau
from dcs.training.models import saturation_modules


def pgd_linf(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float,
             random_start: bool = True, generator: torch.Generator | None = None,
             surrogate: str = STRAIGHT_THROUGH) -> Tensor:
    """Untargeted ℓ∞ PGD maximizing cross-entropy; returns x_adv in the ε-ball ∩ [0,1].

    Saturation layers (their true gradient is zero) use a BPDA backward during the attack:
    ``straight-through`` (identity) or ``tanh:TAU`` (the smooth surrogate's derivative), and are
    restored afterwards. Model parameters get no gradients.
    """
    if eps <= 0 or steps <= 0:
        return x.detach()
    tau = surrogate_tau(surrogate)
    sats = saturation_modules(model)
    saved = {n: (m.straight_through, m.surrogate_tau) for n, m in sats.items()}
    for m in sats.values():
        m.straight_through, m.surrogate_tau = True, tau
    was_training = model.training
    model.eval()
    try:
        x = x.detach()
        if random_start:
            noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
            delta = (noise * 2 - 1) * eps
        else:
            delta = torch.zeros_like(x)
        x_adv = (x + delta).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        return x_adv.detach()
    finally:
        model.train(was_training)
        for n, m in sats.items():
            m.straight_through, m.surrogate_tau = saved[n]
