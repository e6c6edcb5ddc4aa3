"""Building blocks: the PFE saturation (with selectable BPDA backward), ℓ1-normalized conv,
depthwise blur and TensorFlow-style 'same' padding. All export to plain ONNX ops."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcs.training.defenses.kernels import blur_kernel


class _SaturateStraightThrough(torch.autograd.Function):
    """Forward: ternary saturation; backward: identity (BPDA straight-through)."""

    @staticmethod
    def forward(ctx, z: Tensor, c: float) -> Tensor:
        return 0.5 * (torch.sign(z - c) + torch.sign(z + c))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _SaturateTanh(torch.autograd.Function):
    """Forward: ternary saturation (exactly the served one); backward: the derivative of the
    smooth surrogate 0.5·(tanh((z−c)/τ) + tanh((z+c)/τ)) (BPDA with a temperature τ > 0).

    ``tau`` is a tensor (a graph input of the smooth twin, ``model.grad.smooth.onnx``)."""

    @staticmethod
    def forward(ctx, z: Tensor, c: float, tau: Tensor) -> Tensor:
        ctx.save_for_backward(z, tau)
        ctx.c = c
        return 0.5 * (torch.sign(z - c) + torch.sign(z + c))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        z, tau = ctx.saved_tensors
        a = torch.tanh((z - ctx.c) / tau)
        b = torch.tanh((z + ctx.c) / tau)
        return grad * (0.5 / tau) * ((1.0 - a * a) + (1.0 - b * b)), None, None


def tanh_surrogate(z: Tensor, c: float, tau: float | Tensor) -> Tensor:
    """The smooth surrogate itself, 0.5·(tanh((z−c)/τ) + tanh((z+c)/τ)) (for references)."""
    return 0.5 * (torch.tanh((z - c) / tau) + torch.tanh((z + c) / tau))


class Saturation(nn.Module):
    """s(z) = 0.5·(sign(z−c) + sign(z+c)) ∈ {−1, 0, +1} (polarizing front end).

    ``enabled`` False → identity (PFE stages 1–2). ``straight_through`` False → the true
    gradient (zero almost everywhere: plain torch ops); True → identity backward via a custom
    autograd.Function (BPDA, used by attacks, adversarial training and the gradient twin).
    ``surrogate_tau`` (a float or tensor > 0, default None) takes precedence over both: the
    forward is unchanged, the backward is the tanh surrogate's derivative at temperature τ
    (``dcs.training.export.twin.surrogate``).
    """

    def __init__(self, c: float, *, enabled: bool = True, straight_through: bool = False) -> None:
        super().__init__()
        self.c = float(c)
        self.enabled = enabled
        self.straight_through = straight_through
        self.surrogate_tau: float | Tensor | None = None

    def forward(self, z: Tensor) -> Tensor:
        if not self.enabled:
            return z
        if self.surrogate_tau is not None:
            tau = self.surrogate_tau
            tau = tau if isinstance(tau, Tensor) else torch.tensor([float(tau)], dtype=z.dtype)
            return _SaturateTanh.apply(z, self.c, tau)
        if self.straight_through:
            return _SaturateStraightThrough.apply(z, self.c)
        return 0.5 * (torch.sign(z - self.c) + torch.sign(z + self.c))

    def extra_repr(self) -> str:
        return f"c={self.c}, enabled={self.enabled}, straight_through={self.straight_through}"


class L1NormalizedConv2d(nn.Conv2d):
    """Conv2d whose output per filter is wᵀx / (‖w‖₁ + eps) (no bias), as in the PFE code."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0,
                 eps: float = 1e-12) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.eps = eps

    def normalized_weight(self) -> Tensor:
        norm = self.weight.abs().sum(dim=(1, 2, 3), keepdim=True)
        return self.weight / (norm + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalized_weight(), None, self.stride, self.padding)


class DepthwiseBlur(nn.Module):
    """k×k depthwise conv with 'same' zero padding. Fixed (a buffer: box or Gaussian) or
    learned (a parameter initialised as a box blur, BlurNet's learned filter)."""

    def __init__(self, channels: int, k: int, kind: str = "box", sigma: float | None = None, *,
                 learned: bool = False) -> None:
        super().__init__()
        init = blur_kernel(k, "box" if learned else kind, sigma)
        weight = torch.from_numpy(np.repeat(init[None, None], channels, axis=0).copy())
        self.learned = learned
        self.padding = k // 2
        self.channels = channels
        if learned:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, None, 1, self.padding, 1, self.channels)


def same_pad(size: int, k: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) for one spatial dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv_out(size: int, k: int, stride: int = 1, pad: int = 0) -> int:
    return (size + 2 * pad - k) // stride + 1


def pool_out(size: int) -> int:
    """MaxPool2d(2, ceil_mode=True) output size."""
    return math.ceil((size - 2) / 2) + 1 if size >= 2 else 1
