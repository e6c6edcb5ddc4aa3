"""Trace a model, its gradient twin and its probe into plain aten graphs ready for ONNX export.

Route (DESIGN.md section 3): ``make_fx(..., tracing_mode="symbolic")`` over a function that runs
the model and ``torch.autograd.grad`` of the summed cross-entropy, with core-aten decompositions
plus two of our own: ``convolution_backward`` becomes a transposed convolution (``output_padding``
recovers the input size lost by strided convolutions) and ``max_pool2d_with_indices_backward``
becomes a ``scatter_add`` on the pooling indices. Parameters are closed over and land in the graph
as constants, so the result is a self-contained ``fx.GraphModule`` with inputs ``(x, y)``.

Non-differentiable layers (the polarizing saturation) must have their straight-through
(BPDA) backward switched on before tracing: see :func:`bpda`. Their smooth surrogates (issue 25)
are traced once, with the temperature as a graph input: see :func:`trace_twin_smooth`.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _conv_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed,
                   output_padding, groups, output_mask):
    """``convolution_backward`` as a transposed convolution (input grad) and a sum (bias grad)."""
    if transposed:
        raise NotImplementedError("backward of a transposed convolution is not supported")
    nd = weight.dim() - 2
    grad_in = grad_w = grad_b = None
    if output_mask[0]:
        out_pad = []
        for d in range(nd):
            size_in, size_out = int(inp.shape[2 + d]), int(grad_out.shape[2 + d])
            k = int(weight.shape[2 + d])
            natural = (size_out - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k - 1) + 1
            out_pad.append(size_in - natural)
        grad_in = aten.convolution.default(grad_out, weight, None, list(stride), list(padding),
                                           list(dilation), True, out_pad, groups)
    if output_mask[1]:
        raise NotImplementedError("the twin differentiates w.r.t. the input only, not the weights")
    if output_mask[2]:
        grad_b = aten.sum.dim_IntList(grad_out, [0, *range(2, 2 + nd)])
    return grad_in, grad_w, grad_b


def _maxpool2d_backward(grad_out, inp, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """Route each pooled gradient to its argmax (flat per-plane index), like torch does."""
    n, c = grad_out.shape[0], grad_out.shape[1]
    h, w = inp.shape[2], inp.shape[3]
    flat = aten.new_zeros.default(inp, [n, c, h * w])
    src = aten.view.default(grad_out, [n, c, -1])
    idx = aten.view.default(indices, [n, c, -1])
    return aten.view.default(aten.scatter_add.default(flat, 2, idx, src), [n, c, h, w])


def decomposition_table() -> dict:
    """Core-aten decompositions plus our ONNX-friendly backward decompositions."""
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _conv_backward
    table[aten.max_pool2d_with_indices_backward.default] = _maxpool2d_backward
    return table


def saturation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with a ``straight_through`` switch that are active (``enabled`` not False)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "straight_through") and getattr(m, "enabled", True)]


@contextlib.contextmanager
def bpda(model: nn.Module, enabled: bool = True) -> Iterator[list[str]]:
    """Switch every active saturation to its straight-through backward; restore on exit.

    Yields the names of the layers whose gradient is BPDA rather than exact.
    """
    mods = saturation_modules(model)
    before = [m.straight_through for _, m in mods]
    try:
        for _, m in mods:
            m.straight_through = bool(enabled)
        yield [name for name, _ in mods] if enabled else []
    finally:
        for (_, m), old in zip(mods, before):
            m.straight_through = old


#: Temperatures of the tanh surrogate family exported with every package that has BPDA layers
#: (with straight-through, five members). 0.1..0.01 covers what won on the models measured in
#: issue 25 (a briefly trained PFE: τ=0.01; a fully trained one: straight-through).
SURROGATE_TAUS = (0.1, 0.05, 0.02, 0.01)


def surrogate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Active saturations that support a smooth backward (``surrogate_tau``)."""
    return [(name, m) for name, m in saturation_modules(model) if hasattr(m, "surrogate_tau")]


@contextlib.contextmanager
def surrogate(model: nn.Module, tau: float | torch.Tensor | None) -> Iterator[list[str]]:
    """Give every active saturation the tanh surrogate's backward at temperature ``tau`` (None:
    leave them as they are); restore on exit. Yields the names of the layers changed."""
    mods = surrogate_modules(model)
    before = [m.surrogate_tau for _, m in mods]
    try:
        for _, m in mods:
            m.surrogate_tau = tau
        yield [name for name, _ in mods] if tau is not None else []
    finally:
        for (_, m), old in zip(mods, before):
            m.surrogate_tau = old


def reference_loss_grad(model: nn.Module, x: torch.Tensor,
                        y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch autograd ground truth: ``(logits, d sum_i CE(logits_i, y_i) / dx)``."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y.long(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return logits.detach(), grad.detach()


def _trace(fn: Callable[..., Any], *args: torch.Tensor) -> torch.fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="symbolic", decomposition_table=decomposition_table(),
                 _allow_non_fake_inputs=True)(*args)
    gm.eval()
    return gm


def _frozen(model: nn.Module) -> list[torch.nn.Parameter]:
    """Stop parameters from requiring grad (so only the input is differentiated)."""
    changed = [p for p in model.parameters() if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    return changed


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    changed = _frozen(model)
    model.eval()
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)
        model.train(was_training)


def trace_forward(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``x -> logits`` as an aten graph (eval mode, parameters as constants)."""
    with _inference(model):
        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(x)
        return _trace(forward, example)


def trace_twin(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``(x, y) -> (logits, d CE_sum / dx)`` as an aten graph with no autograd left in it.

    Saturation layers keep whatever ``straight_through`` setting they have: wrap the call in
    :func:`bpda` to trace the BPDA gradient.
    """
    example_y = torch.zeros(example.shape[0], dtype=torch.long)
    with _inference(model):
        def twin(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return reference_loss_grad(model, x, y)
        return _trace(twin, example, example_y)


def trace_twin_smooth(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``(x, y, tau [1]) -> (logits, d CE_sum / dx)`` with every saturation's backward the tanh
    surrogate's derivative at temperature ``tau`` (a graph input, > 0); forward unchanged.

    One graph for the whole tanh family rather than one per member: the package grows by one
    twin, not by one per temperature, and the engine can try any τ > 0 without a re-export.
    Straight-through (τ → 0 is not its limit) stays the plain twin ``model.grad.onnx``.
    """
    example_y = torch.zeros(example.shape[0], dtype=torch.long)
    with _inference(model):
        def twin(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with surrogate(model, tau):
                return reference_loss_grad(model, x, y)
        return _trace(twin, example, example_y, torch.tensor([0.05]))


def trace_probe(model: nn.Module, example: torch.Tensor) -> tuple[torch.fx.GraphModule, list[str]]:
    """``x -> (features, [z,] weights)`` from ``model.probe`` and ``model.first_layer_weight``.

    Returns the graph and its output names. ``weights`` is the first-layer filter bank (a
    constant of the graph, the same for every input).
    """
    with _inference(model), torch.no_grad():
        keys = [k for k in ("features", "z") if k in model.probe(example[:1])]
    names = [*keys, "weights"]
    with _inference(model):
        def probe(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                out = model.probe(x)
                weight = model.first_layer_weight().detach()
                return (*(out[k] for k in keys), weight * 1.0)
        return _trace(probe, example), names


def trace_bounds(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``(x, eps [1]) -> (logits_lower, logits_upper)``: interval bounds over the ε-ball ∩ [0,1]."""
    from dcs.training.export.bounds import IntervalModel, input_interval

    interval = IntervalModel(model)  # raises UnsupportedBounds before any tracing
    with _inference(model):
        def bounds(x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                return interval(*input_interval(x, eps))
        return _trace(bounds, example, torch.tensor([0.05]))
