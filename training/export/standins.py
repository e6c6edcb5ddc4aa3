"""Small stand-in models covering every op of the real model families (for export tests).

They mirror ``dcs.training.models``' contract (``probe(x)``, ``first_layer_weight()``, saturation
modules with ``straight_through`` / ``enabled``) without depending on it: strided 'same'
convolution (asymmetric pad), strided symmetric-padding convolution (needs ``output_padding``
in the backward), valid convolution, depthwise blur, an L1-normalized convolution computed from
its weight in ``forward``, a sign saturation with a straight-through backward, max-pool, ReLU,
flatten and linear layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _StraightThroughSat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, c: float) -> torch.Tensor:  # type: ignore[override]
        return 0.5 * (torch.sign(z - c) + torch.sign(z + c))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class Saturation(nn.Module):
    """Ternary saturation ``0.5 (sign(z-c) + sign(z+c))``; BPDA identity backward when asked."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = float(c)
        self.straight_through = False
        self.enabled = True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return z
        if self.straight_through:
            return _StraightThroughSat.apply(z, self.c)
        return 0.5 * (torch.sign(z - self.c) + torch.sign(z + self.c))


class L1Conv(nn.Conv2d):
    """Per-filter ``z = w^T x / (||w||_1 + 1e-12)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / (self.weight.abs().sum(dim=(1, 2, 3), keepdim=True) + 1e-12)
        return F.conv2d(x, w, None, self.stride, self.padding)


class StandinPFE(nn.Module):
    """Polarizing front end + small classifier; input ``[N,1,16,16]``."""

    def __init__(self, num_classes: int = 10, c: float = 0.2) -> None:
        super().__init__()
        self.front = L1Conv(1, 4, 5, padding=2, bias=False)
        self.sat = Saturation(c)
        self.conv1 = nn.Conv2d(4, 6, 5)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sat(self.front(x))
        h = F.relu(F.max_pool2d(self.conv1(h), 2))
        h = F.relu(F.max_pool2d(self.conv2(h), 2))
        return self.fc2(F.relu(self.fc1(torch.flatten(h, 1))))

    def probe(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.front(x)
        return {"features": self.sat(z), "z": z}

    def first_layer_weight(self) -> torch.Tensor:
        return self.front.weight


class StandinLISA(nn.Module):
    """LISA-CNN-like: 'same' strided conv, optional depthwise blur, valid convs; ``[N,3,16,16]``."""

    def __init__(self, num_classes: int = 5, blur: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 4, stride=2)
        self.blur = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False) if blur else nn.Identity()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)  # 8 -> 4: needs output_padding
        self.conv3 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, num_classes)

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(F.pad(x, (1, 2, 1, 2)))  # TF 'same' for k=4, s=2 on even sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blur(F.relu(self._first(x)))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.fc(torch.flatten(h, 1))

    def probe(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self._first(x)}

    def first_layer_weight(self) -> torch.Tensor:
        return self.conv1.weight
