"""Defended models: ``build_model(arch, defense, input_shape, num_classes)`` and helpers."""
from __future__ import annotations

from torch import nn

from dcs.training.config import ARCHS, DefenseSpec
from dcs.training.models.layers import DepthwiseBlur, L1NormalizedConv2d, Saturation
from dcs.training.models.nets import BACKBONES, DefendedNet, PolarizingFrontEnd

__all__ = [
    "DefendedNet",
    "L1NormalizedConv2d",
    "Saturation",
    "build_model",
    "configure_pfe_stage",
    "saturation_modules",
    "set_bpda",
]

DEFAULT_C = 0.25


def build_model(arch: str, defense: DefenseSpec, input_shape: tuple[int, int, int], num_classes: int) -> DefendedNet:
    """A fresh model (uses the global torch RNG for initialisation). Raises ValueError on an
    unknown arch/defense or a non-positive shape."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    c, h, w = (int(v) for v in input_shape)
    if min(c, h, w) < 1 or num_classes < 2:
        raise ValueError(f"bad input_shape {input_shape} or num_classes {num_classes}")
    defense.validate()
    builder, conv1_ch = BACKBONES[arch]
    kind = defense.kind
    input_blur = front_end = post = None
    in_ch = c
    if kind == "blur_input":
        input_blur = DepthwiseBlur(c, defense.blur_kernel, defense.blur_type, defense.blur_sigma)
    elif kind == "blur_conv1":
        post = DepthwiseBlur(conv1_ch, defense.blur_kernel, defense.blur_type, defense.blur_sigma)
    elif kind == "learned_blur":
        post = DepthwiseBlur(conv1_ch, defense.blur_kernel, learned=True)
    elif kind == "pfe":
        cval = defense.pfe_c if defense.pfe_c is not None else DEFAULT_C
        front_end = PolarizingFrontEnd(c, defense.pfe_filters, defense.pfe_kernel, cval)
        in_ch = defense.pfe_filters
    return DefendedNet(builder(in_ch, (h, w), num_classes, post), input_blur=input_blur, front_end=front_end)


def saturation_modules(model: nn.Module) -> dict[str, Saturation]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Saturation)}


def set_bpda(model: nn.Module, enabled: bool) -> list[str]:
    """Set ``straight_through`` on every Saturation; return their module names."""
    mods = saturation_modules(model)
    for m in mods.values():
        m.straight_through = enabled
    return list(mods)


def configure_pfe_stage(model: DefendedNet, stage: int) -> None:
    """Stages 1–2: saturation off, front end trainable; stage 3: saturation on, front end frozen."""
    if model.front_end is None:
        return
    model.front_end.saturation.enabled = stage >= 3
    for p in model.front_end.parameters():
        p.requires_grad_(stage < 3)
