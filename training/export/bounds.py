"""Interval bound propagation (IBP): sound logit bounds over the ℓ∞ ball, for ``model.bounds.onnx``.

The model is traced with ``torch.fx`` down to leaf modules, and each node is re-run on intervals:

- affine leaves (``Conv2d`` and subclasses such as the ℓ1-normalized front-end conv, ``Linear``,
  depthwise blurs: any leaf whose only parameters/buffers are ``weight`` and optionally ``bias``):
  center/radius form ``c' = m(c)``, ``r' = m_{|W|, no bias}(r)``. The ℓ1-normalized conv is the
  linear map it is once the weights are fixed (normalizing ``|W|`` gives ``|W_normalized|``);
- monotone non-decreasing leaves and functions (ReLU, max-pool, zero padding, flatten, the
  polarizing saturation, identity): ``[m(lo), m(hi)]``.

Anything else raises :class:`UnsupportedBounds` (the exporter then ships no bounds graph).
The input interval is the ε-ball clipped to the input box [0, 1] (the model's domain).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

Interval = tuple[torch.Tensor, torch.Tensor]

MONOTONE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.MaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.Flatten, nn.Identity, nn.Dropout)
MONOTONE_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    F.relu, torch.relu, F.max_pool2d, torch.flatten, torch.sign, torch.clamp)


class UnsupportedBounds(Exception):
    """The model holds an op without an interval rule; the message names it."""


def _is_saturation(m: nn.Module) -> bool:
    return hasattr(m, "straight_through")


def _is_affine(m: nn.Module) -> bool:
    names = {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}
    return (isinstance(m, (nn.Conv2d, nn.Linear)) or "weight" in names) and names <= {"weight", "bias"} \
        and not list(m.children())


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (_is_saturation(m) or isinstance(m, MONOTONE_MODULES) or _is_affine(m)
                or super().is_leaf_module(m, qualname))


def _affine(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    out_c = m(center)
    abs_state = {}
    for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
        abs_state[name] = t.abs() if name == "weight" else torch.zeros_like(t)
    out_r = torch.func.functional_call(m, abs_state, (radius,))
    return out_c - out_r, out_c + out_r


def _pad_is_monotone(args: tuple, kwargs: dict) -> bool:
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else 0.0)
    return mode == "constant" and (value or 0.0) == 0.0


class IntervalModel(nn.Module):
    """``(lo, hi) -> (logits_lower, logits_upper)`` by IBP through ``model`` (eval mode)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.graph = _Tracer().trace(model)
        self.modules_by_name = dict(model.named_modules())
        self._check()

    def _check(self) -> None:
        for node in self.graph.nodes:
            if node.op == "call_module":
                m = self.modules_by_name[node.target]
                if not (_is_saturation(m) or isinstance(m, MONOTONE_MODULES) or _is_affine(m)):
                    raise UnsupportedBounds(f"no interval rule for module {node.target} ({type(m).__name__})")
            elif node.op == "call_function":
                if node.target not in (*MONOTONE_FUNCTIONS, F.pad, operator.getitem):
                    raise UnsupportedBounds(f"no interval rule for function {node.target}")
            elif node.op == "call_method" and node.target not in ("flatten", "view", "reshape", "relu"):
                raise UnsupportedBounds(f"no interval rule for method .{node.target}()")

    def forward(self, lo: torch.Tensor, hi: torch.Tensor) -> Interval:
        env: dict[str, Any] = {}

        def load(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n.name])

        def both(fn: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> Interval:
            """Apply a monotone non-decreasing ``fn`` to the interval argument ``args[0]``."""
            (a_lo, a_hi), rest = args[0], args[1:]
            return fn(a_lo, *rest, **kwargs), fn(a_hi, *rest, **kwargs)

        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = (lo, hi)
            elif node.op == "call_module":
                m = self.modules_by_name[node.target]
                (a,) = load(node.args)
                env[node.name] = _affine(m, *a) if _is_affine(m) and not _is_saturation(m) \
                    else (m(a[0]), m(a[1]))
            elif node.op == "call_function":
                args, kwargs = load(node.args), load(node.kwargs)
                if node.target is operator.getitem:
                    env[node.name] = args[0][args[1]]
                elif node.target is F.pad and not _pad_is_monotone(args, kwargs):
                    raise UnsupportedBounds("F.pad with a non-zero or non-constant mode")
                else:
                    env[node.name] = both(node.target, args, kwargs)
            elif node.op == "call_method":
                args, kwargs = load(node.args), load(node.kwargs)
                env[node.name] = both(lambda t, *r, _m=node.target, **k: getattr(t, _m)(*r, **k), args, kwargs)
            elif node.op == "output":
                return load(node.args[0])
            else:
                raise UnsupportedBounds(f"no interval rule for node {node.op} {node.target}")
        raise UnsupportedBounds("graph has no output")


def input_interval(x: torch.Tensor, eps: torch.Tensor, box: tuple[float, float] = (0.0, 1.0)) -> Interval:
    """The ℓ∞ ball of radius ``eps`` (shape [1]) around ``x``, clipped to the input box."""
    e = eps.reshape(1).abs()
    return torch.clamp(x - e, box[0], box[1]), torch.clamp(x + e, box[0], box[1])


def logit_bounds(model: nn.Module, x: torch.Tensor, eps: torch.Tensor) -> Interval:
    """Sound bounds on ``model``'s logits for every input in the ε-ball around ``x`` ∩ [0,1]."""
    with torch.no_grad():
        return IntervalModel(model)(*input_interval(x, eps))
