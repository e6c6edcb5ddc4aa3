"""The two backbones and the wrapper that adds input blur / polarizing front end.

``pfe_cnn`` (polarizing paper's post-front-end net): conv 32 k5 → maxpool2 → ReLU → conv 64 k5 →
maxpool2 → ReLU → FC 100 → ReLU → FC K. Per spatial axis: 'valid' convolutions as in the paper
when the side is ≥ 16 (28x28 → 64·4·4 = 1024 features), otherwise padding 2 ('same') so small
inputs (8x8 digits: 64·2·2) work. Max-pools use ceil_mode so odd sides never vanish.

``lisa_cnn`` (RP2/BlurNet victim): conv 64 8x8 s2 TF-'same' → ReLU → conv 128 6x6 s2 valid →
ReLU → conv 128 5x5 valid → ReLU → flatten → dense K (32x32x3 → 512 features). A 'valid' conv
whose input side is smaller than its kernel gets the least symmetric zero padding that yields
one output (documented deviation for small inputs only).

Both split into ``stem`` (conv1 [+ blur]: the first-layer feature maps) and ``body`` (the rest).
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from dcs.training.models.layers import (
    DepthwiseBlur,
    L1NormalizedConv2d,
    Saturation,
    conv_out,
    pool_out,
    same_pad,
)


class Backbone(nn.Module):
    """stem (first conv, optional depthwise blur after it) then body."""

    def __init__(self, conv1: nn.Module, post_conv1: nn.Module | None, body: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv1
        self.post_conv1 = post_conv1
        self.body = body

    def stem(self, x: Tensor) -> Tensor:
        f = self.conv1(x)
        return self.post_conv1(f) if self.post_conv1 is not None else f

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.stem(x))

    def first_conv(self) -> nn.Conv2d:
        return self.conv1[-1] if isinstance(self.conv1, nn.Sequential) else self.conv1


def _valid_pad(size: int, k: int) -> int:
    return 0 if size >= k else math.ceil((k - size) / 2)


def pfe_cnn(in_ch: int, hw: tuple[int, int], k: int, blur: DepthwiseBlur | None = None) -> Backbone:
    pads = tuple(0 if s >= 16 else 2 for s in hw)
    conv1 = nn.Conv2d(in_ch, 32, 5, padding=pads)
    sizes = [pool_out(conv_out(s, 5, 1, p)) for s, p in zip(hw, pads)]
    sizes = [pool_out(conv_out(s, 5, 1, p)) for s, p in zip(sizes, pads)]
    body = nn.Sequential(
        nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(),
        nn.Conv2d(32, 64, 5, padding=pads), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * sizes[0] * sizes[1], 100), nn.ReLU(), nn.Linear(100, k))
    return Backbone(conv1, blur, body)


def lisa_cnn(in_ch: int, hw: tuple[int, int], k: int, blur: DepthwiseBlur | None = None) -> Backbone:
    (pt, pb), (pl, pr) = same_pad(hw[0], 8, 2), same_pad(hw[1], 8, 2)
    conv1 = nn.Sequential(nn.ZeroPad2d((pl, pr, pt, pb)), nn.Conv2d(in_ch, 64, 8, stride=2))
    s1 = [math.ceil(s / 2) for s in hw]
    p2 = tuple(_valid_pad(s, 6) for s in s1)
    s2 = [conv_out(s, 6, 2, p) for s, p in zip(s1, p2)]
    p3 = tuple(_valid_pad(s, 5) for s in s2)
    s3 = [conv_out(s, 5, 1, p) for s, p in zip(s2, p3)]
    body = nn.Sequential(
        nn.ReLU(), nn.Conv2d(64, 128, 6, stride=2, padding=p2), nn.ReLU(),
        nn.Conv2d(128, 128, 5, padding=p3), nn.ReLU(), nn.Flatten(), nn.Linear(128 * s3[0] * s3[1], k))
    return Backbone(conv1, blur, body)


BACKBONES = {"pfe_cnn": (pfe_cnn, 32), "lisa_cnn": (lisa_cnn, 64)}  # builder, conv1 channels


class PolarizingFrontEnd(nn.Module):
    """ℓ1-normalized conv (C→filters, k×k, stride 1, 'same', no bias) then Saturation(c)."""

    def __init__(self, in_ch: int, filters: int, k: int, c: float) -> None:
        super().__init__()
        self.conv = L1NormalizedConv2d(in_ch, filters, k, padding=k // 2)
        self.saturation = Saturation(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.saturation(self.conv(x))


class DefendedNet(nn.Module):
    """[input blur] → [polarizing front end] → backbone. Input float32 [N,C,H,W] in [0,1]
    (no normalization: the papers use none); output logits [N,K]."""

    def __init__(self, backbone: Backbone, *, input_blur: DepthwiseBlur | None = None,
                 front_end: PolarizingFrontEnd | None = None) -> None:
        super().__init__()
        self.input_blur = input_blur
        self.front_end = front_end
        self.backbone = backbone

    def _pre(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.input_blur is not None:
            x = self.input_blur(x)
        if self.front_end is None:
            return x, None
        z = self.front_end.conv(x)
        return self.front_end.saturation(z), z

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self._pre(x)[0])

    def probe(self, x: Tensor) -> dict[str, Tensor]:
        """``features``: first-layer maps (conv1 [+ blur]) or, with a front end, its (saturated
        when enabled) output; ``z``: normalized pre-saturation activations (pfe only); ``logits``."""
        h, z = self._pre(x)
        f = self.backbone.stem(h)
        out = {"features": h if z is not None else f, "logits": self.backbone.body(f)}
        if z is not None:
            out["z"] = z
        return out

    def first_layer_weight(self) -> Tensor:
        """[K,C,kh,kw]: the front end's effective ℓ1-normalized filters (pfe) or conv1's weight."""
        if self.front_end is not None:
            return self.front_end.conv.normalized_weight()
        return self.backbone.first_conv().weight
