"""Backward linear-relaxation (CROWN-style) lower bounds on logit margins, for ``model.crown.onnx``.

For an input x with label y, the *margins* are m_j = logit_y − logit_j (j = 0..K−1; m_y = 0).
An example is certified when every m_j with j ≠ y has a positive lower bound over the ℓ∞ ball
of radius ε around x clipped to [0, 1]. Bounding the margins directly (the specification matrix
C = e_y − e_j of Zhang et al. 2020 folded into the last layer) is much tighter than subtracting
independent logit intervals.

Algorithm (one forward and one backward sweep over the model's fx chain):

1. Forward: interval bounds (IBP, ``training/export/bounds.py``) on the output of every node.
2. Backward from the margins: keep a linear lower bound ``C·f(x) ≥ Λ·h_k + c`` on the margins in
   terms of the output ``h_k`` of node k, starting with Λ = C at the logits. Each node is replaced
   by a linear relaxation over its input interval:

   - affine layers (Conv2d incl. the ℓ1-normalized front-end conv, depthwise blurs, Linear):
     exact, Λ ← Λ·W (a transposed convolution), c += Λ·b;
   - ReLU with pre-activation bounds [l, u]: upper line u/(u−l)·(z−l) on unstable neurons, lower
     line z or 0 (the adaptive choice of CROWN: slope 1 when u > −l);
   - max-pool (2x2, stride 2): lower bound y ≥ x_j for j the argmax of the lower bounds in its
     window (ties: their average); upper bound y ≤ x_j when that j is unique and dominates
     (l_j ≥ u_i for every other i in the window), else the constant max_i u_i;
   - zero padding, flatten/view, identity: exact (crop / reshape);
   - the polarizing saturation s(z) = ½(sign(z−c) + sign(z+c)), a staircase with steps at ±c
     (``_back_saturation``): a constant where [l, u] holds no step (exact: a stable activation
     cannot change); on an interval holding a step, either the constant s(l) (lower) / s(u)
     (upper) or a line through the far corner, anchored at (u, s(u⁻)) for the lower bound with
     the smallest slope that keeps it under every inner corner (l, s(l⁻)), (p, s(p⁻)) of the
     staircase, symmetrically for the upper bound; per activation the one with the larger
     (lower) / smaller (upper) mean over [l, u] is kept (CROWN's adaptive choice, as for
     ReLU's lower line). The slope carries how z depends on the input, so the sweep goes on
     to the front-end convolution and the input instead of stopping at the saturation's
     interval ([−1, 1] for an activation that straddles both steps);
   - anything else that is monotone (sign, clamp): the sweep stops there and the remaining
     bound is concretized on that node's interval.

3. At *every* node k the current linear bound is concretized on h_k's interval,
   ``c + Σ Λ⁺·l_k + Λ⁻·u_k``, and the margin lower bound is the elementwise maximum over all k.
   Each is sound, so the maximum is; k = the logits gives exactly the interval margin
   lo_y − hi_j, k = the last hidden layer gives IBP with the last layer elided (Gowal et al.
   2018), k = the input gives the full backward bound. Hence the result is never looser than the
   interval margin of ``model.bounds.onnx``.

Intermediate (pre-activation) bounds are the interval ones (this is the CROWN-IBP bound of
Zhang et al. 2020, which is also what CROWN-IBP training optimizes); full CROWN would refine
every hidden layer's bounds with its own backward sweep, too costly on CPU for conv nets.

Everything is plain torch (differentiable: the certified-training loss in
``dcs.training.certified`` uses it) and exports to ONNX with the route of the other graphs.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from dcs.training.export.bounds import (
    MONOTONE_FUNCTIONS,
    MONOTONE_MODULES,
    UnsupportedBounds,
    _affine,
    _is_affine,
    _is_saturation,
    _pad_is_monotone,
    _Tracer,
    input_interval,
)
from dcs.training.models.layers import DepthwiseBlur, L1NormalizedConv2d

_RESHAPE_METHODS = ("flatten", "view", "reshape")


@dataclass(frozen=True)
class _Step:
    """One node of the chain: ``kind`` in affine | relu | maxpool | reshape | pad | identity |
    monotone (concretize and stop); ``fn`` computes the node's interval from its input's."""

    name: str
    kind: str
    module: nn.Module | None
    fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    pad: tuple[int, int, int, int] | None = None  # (left, right, top, bottom)


def _relu_like(target: Any) -> bool:
    return target in (F.relu, torch.relu, "relu")


def _check_pool(m: Any) -> None:
    k, s = getattr(m, "kernel_size", None), getattr(m, "stride", None)
    pad, dil = getattr(m, "padding", 0), getattr(m, "dilation", 1)
    norm = (lambda v: (v, v) if isinstance(v, int) else tuple(v))
    if norm(k) != (2, 2) or norm(s) != (2, 2) or norm(pad) != (0, 0) or norm(dil) != (1, 1):
        raise UnsupportedBounds(f"max-pool {m}: the linear relaxation handles 2x2 stride-2 pools only")


class MarginBounds(nn.Module):
    """``(lo, hi, C) -> lower bounds on C·logits`` over the box [lo, hi] (model in eval mode).

    ``C``: [N, S, K] specification rows. ``stop``: how many nodes from the output the backward
    sweep may cross (None: all, i.e. CROWN-IBP; 1 for a model ending in Linear: IBP with the
    last layer elided). Raises :class:`UnsupportedBounds` at construction for a model whose
    graph is not a chain of supported nodes.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        graph = _Tracer().trace(model)
        mods = dict(model.named_modules())
        steps: list[_Step] = []
        prev: fx.Node | None = None
        for node in graph.nodes:
            if node.op == "placeholder":
                if prev is not None:
                    raise UnsupportedBounds("model has more than one input")
                prev = node
                continue
            if node.op == "output":
                if node.args[0] is not prev:
                    raise UnsupportedBounds("model output is not the end of a chain")
                break
            inputs = node.all_input_nodes
            if len(inputs) != 1 or inputs[0] is not prev or node.args[0] is not prev:
                raise UnsupportedBounds(f"node {node.name} is not a chain link (inputs {inputs})")
            steps.append(self._step(node, mods))
            prev = node
        self.steps = steps

    @staticmethod
    def _step(node: fx.Node, mods: dict[str, nn.Module]) -> _Step:
        if node.op == "call_module":
            m = mods[node.target]
            both = (lambda lo, hi, _m=m: (_m(lo), _m(hi)))
            if _is_saturation(m):
                return _Step(node.name, "saturation" if getattr(m, "enabled", True) else "identity", m, both)
            if isinstance(m, (nn.Identity, nn.Dropout)):
                return _Step(node.name, "identity", m, both)
            if isinstance(m, nn.ReLU):
                return _Step(node.name, "relu", m, both)
            if isinstance(m, nn.MaxPool2d):
                _check_pool(m)
                return _Step(node.name, "maxpool", m, both)
            if isinstance(m, nn.Flatten):
                return _Step(node.name, "reshape", m, both)
            if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
                if float(getattr(m, "value", 0.0)) != 0.0:
                    raise UnsupportedBounds(f"{node.target}: non-zero constant padding")
                return _Step(node.name, "pad", m, both, pad=tuple(int(p) for p in m.padding))
            if _is_affine(m):
                if not isinstance(m, (nn.Conv2d, nn.Linear, DepthwiseBlur)):
                    raise UnsupportedBounds(f"no linear rule for affine module {node.target} ({type(m).__name__})")
                if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                    raise UnsupportedBounds(f"{node.target}: padding_mode {m.padding_mode}")
                return _Step(node.name, "affine", m, lambda lo, hi, _m=m: _affine(_m, lo, hi))
            if isinstance(m, MONOTONE_MODULES):
                return _Step(node.name, "monotone", m, both)
            raise UnsupportedBounds(f"no linear rule for module {node.target} ({type(m).__name__})")
        if node.op in ("call_function", "call_method"):
            args, kwargs = node.args[1:], dict(node.kwargs)
            target = node.target

            def both(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
                call = (lambda t: getattr(t, target)(*args, **kwargs)) if node.op == "call_method" \
                    else (lambda t: target(t, *args, **kwargs))
                return call(lo), call(hi)

            if _relu_like(target):
                return _Step(node.name, "relu", None, both)
            if target in (torch.flatten, *_RESHAPE_METHODS):
                return _Step(node.name, "reshape", None, both)
            if target is F.pad:
                if not _pad_is_monotone(node.args, kwargs) or len(node.args[1]) != 4:
                    raise UnsupportedBounds("F.pad: only 2-d zero padding has a linear rule")
                return _Step(node.name, "pad", None, both, pad=tuple(int(p) for p in node.args[1]))
            if target is F.max_pool2d:
                raise UnsupportedBounds("functional max_pool2d: use nn.MaxPool2d")
            if target in MONOTONE_FUNCTIONS and target is not operator.getitem:
                return _Step(node.name, "monotone", None, both)
        raise UnsupportedBounds(f"no linear rule for node {node.op} {node.target}")

    # -- backward rules: Λ [N, S, *out] -> Λ [N, S, *in], constant [N, S] ------------------

    @staticmethod
    def _conv_params(m: nn.Module) -> tuple[Tensor, tuple, tuple, tuple, int]:
        if isinstance(m, DepthwiseBlur):
            return m.weight, (1, 1), (m.padding, m.padding), (1, 1), m.channels
        w = m.normalized_weight() if isinstance(m, L1NormalizedConv2d) else m.weight
        return w, m.stride, m.padding, m.dilation, m.groups

    def _back_affine(self, m: nn.Module, lam: Tensor, in_shape: torch.Size) -> tuple[Tensor, Tensor]:
        n, s = lam.shape[0], lam.shape[1]
        zero = torch.zeros((1, *in_shape[1:]), dtype=lam.dtype, device=lam.device)
        offset = m(zero)  # the affine map's constant term, [1, *out]
        const = (lam * offset.unsqueeze(1)).flatten(2).sum(-1)
        if isinstance(m, nn.Linear):
            return lam @ m.weight, const
        w, stride, pad, dil, groups = self._conv_params(m)
        out_hw = lam.shape[-2:]
        out_pad = []
        for d in range(2):
            k = int(w.shape[2 + d])
            natural = (int(out_hw[d]) - 1) * stride[d] - 2 * pad[d] + dil[d] * (k - 1) + 1
            out_pad.append(int(in_shape[2 + d]) - natural)
        flat = lam.reshape(-1, *lam.shape[2:])
        back = F.conv_transpose2d(flat, w, None, stride, pad, tuple(out_pad), groups, dil)
        return back.reshape(n, s, *back.shape[1:]), const

    @staticmethod
    def _back_relu(lam: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
        unstable = (lo < 0) & (hi > 0)
        denom = torch.where(unstable, hi - lo, torch.ones_like(hi))
        up_slope = torch.where(unstable, hi / denom, (lo >= 0).to(hi.dtype))
        up_icpt = torch.where(unstable, -lo * hi / denom, torch.zeros_like(hi))
        low_slope = torch.where(unstable, (hi > -lo).to(hi.dtype), (lo >= 0).to(hi.dtype))
        neg = lam.clamp(max=0)
        back = torch.where(lam >= 0, lam * low_slope, lam * up_slope)
        return back, (neg * up_icpt).flatten(2).sum(-1)

    @staticmethod
    def _back_maxpool(lam: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = lo.shape
        ph, pw = h % 2, w % 2  # ceil_mode windows past the edge: pad with -inf (never chosen)
        neg_inf = torch.finfo(lo.dtype).min
        lo_p = F.pad(lo, (0, pw, 0, ph), value=neg_inf)
        hi_p = F.pad(hi, (0, pw, 0, ph), value=neg_inf)
        h2, w2 = (h + ph) // 2, (w + pw) // 2
        lw = lo_p.reshape(n, c, h2, 2, w2, 2)
        hw = hi_p.reshape(n, c, h2, 2, w2, 2)
        lmax = lw.amax(dim=(3, 5), keepdim=True)
        hit = (lw == lmax).to(lo.dtype)
        count = hit.sum(dim=(3, 5), keepdim=True)
        weight = hit / count  # convex weights on the argmax(es) of the lower bounds
        # dominance: the unique argmax's lower bound beats every other upper bound in the window
        others_hi = torch.where(hit > 0, torch.full_like(hw, neg_inf), hw).amax(dim=(3, 5), keepdim=True)
        dominated = (count == 1) & (lmax >= others_hi)
        umax = hw.amax(dim=(3, 5), keepdim=True)
        lam6 = lam.reshape(lam.shape[0], lam.shape[1], c, h2, 1, w2, 1)
        dom = dominated.unsqueeze(1)
        neg = lam6.clamp(max=0)
        # Λ ≥ 0: y ≥ Σ w·x; Λ < 0: y ≤ x_j where dominated (w one-hot), else y ≤ max u (a constant)
        back = torch.where(dom, lam6, lam6.clamp(min=0)) * weight.unsqueeze(1)
        umax1 = umax.unsqueeze(1)
        const = (neg * torch.where(dom, torch.zeros_like(umax1), umax1)).flatten(2).sum(-1)
        back = back.reshape(lam.shape[0], lam.shape[1], c, h + ph, w + pw)[..., :h, :w]
        return back, const

    @staticmethod
    def _saturation_lines(lo: Tensor, hi: Tensor, s_lo: Tensor, s_hi: Tensor, c: float
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Linear bounds a_l·z + b_l ≤ s(z) ≤ a_u·z + b_u on [lo, hi] for s = ½(sign(z−c) + sign(z+c)),
        given the saturation's output interval [s_lo, s_hi] = [s(lo), s(hi)] (the forward sweep's).

        s is non-decreasing, so s(z⁻) ≤ s(z) ≤ s(z⁺); g(z) = s(z⁻) (steps taken at z > ∓c) and
        h(z) = s(z⁺) (steps taken at z ≥ ∓c) are the envelopes the lines bound. Every division
        has a safe denominator, so the gradient (certified training) is finite everywhere.
        """
        def g(z: Tensor) -> Tensor:
            return (z > -c).to(z.dtype) + (z > c).to(z.dtype) - 1.0

        def h(z: Tensor) -> Tensor:
            return (z >= -c).to(z.dtype) + (z >= c).to(z.dtype) - 1.0

        width = hi - lo
        wide = width > 0
        one = torch.ones_like(lo)
        zero = torch.zeros_like(lo)

        def slope(num: Tensor, den: Tensor, valid: Tensor) -> Tensor:
            return torch.where(valid, num / torch.where(valid, den, one), zero)

        g_hi, h_lo = g(hi), h(lo)
        inner = [((lo < p) & (p < hi), p, v_before, v_after) for p, v_before, v_after in ((-c, -1.0, 0.0), (c, 0.0, 1.0))]
        a_l = slope(g_hi - g(lo), width, wide)
        a_u = slope(h(hi) - h_lo, width, wide)
        for valid, p, v_before, v_after in inner:
            a_l = torch.maximum(a_l, slope(g_hi - v_before, hi - p, valid))
            a_u = torch.maximum(a_u, slope(v_after - h_lo, p - lo, valid))
        # keep the line only where its mean over [lo, hi] beats the constant
        lower_line = wide & (g_hi - 0.5 * a_l * width > s_lo)
        upper_line = wide & (h_lo + 0.5 * a_u * width < s_hi)
        a_l = torch.where(lower_line, a_l, zero)
        b_l = torch.where(lower_line, g_hi - a_l * hi, s_lo)
        a_u = torch.where(upper_line, a_u, zero)
        b_u = torch.where(upper_line, h_lo - a_u * lo, s_hi)
        return a_l, b_l, a_u, b_u

    def _back_saturation(self, m: nn.Module, lam: Tensor, lo: Tensor, hi: Tensor, s_lo: Tensor, s_hi: Tensor
                         ) -> tuple[Tensor, Tensor]:
        a_l, b_l, a_u, b_u = (t.unsqueeze(1) for t in self._saturation_lines(lo, hi, s_lo, s_hi, float(m.c)))
        pos, neg = lam.clamp(min=0), lam.clamp(max=0)
        return pos * a_l + neg * a_u, (pos * b_l + neg * b_u).flatten(2).sum(-1)

    # -- the sweep ----------------------------------------------------------------------------

    def forward(self, lo: Tensor, hi: Tensor, spec: Tensor, stop: int | None = None,
                concretize_all: bool = True) -> Tensor:
        """Lower bounds [N, S] on spec·logits. ``concretize_all`` False concretizes only at the
        logits and where the sweep ends (training: the intermediate maxima cost elementwise
        passes over the largest tensors)."""
        intervals = [(lo, hi)]
        for step in self.steps:
            intervals.append(step.fn(*intervals[-1]))

        def concretize(lam: Tensor, const: Tensor, k: int) -> Tensor:
            l_k, u_k = intervals[k]
            l_k, u_k = l_k.unsqueeze(1), u_k.unsqueeze(1)
            return const + (lam.clamp(min=0) * l_k + lam.clamp(max=0) * u_k).flatten(2).sum(-1)

        lam = spec
        const = torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
        best = concretize(lam, const, len(self.steps))
        crossed = 0
        for k in range(len(self.steps) - 1, -1, -1):
            if stop is not None and crossed >= stop:
                break
            step = self.steps[k]
            in_lo, in_hi = intervals[k]
            if step.kind == "monotone":
                break
            if step.kind == "affine":
                lam, c = self._back_affine(step.module, lam, in_lo.shape)
                const = const + c
            elif step.kind == "relu":
                lam, c = self._back_relu(lam, in_lo, in_hi)
                const = const + c
            elif step.kind == "maxpool":
                lam, c = self._back_maxpool(lam, in_lo, in_hi)
                const = const + c
            elif step.kind == "saturation":
                if not concretize_all:  # never looser than stopping at the saturation's interval
                    best = torch.maximum(best, concretize(lam, const, k + 1))
                lam, c = self._back_saturation(step.module, lam, in_lo, in_hi, *intervals[k + 1])
                const = const + c
            elif step.kind == "reshape":
                lam = lam.reshape(lam.shape[0], lam.shape[1], *in_lo.shape[1:])
            elif step.kind == "pad":
                left, _, top, _ = step.pad
                lam = lam[..., top:top + in_lo.shape[2], left:left + in_lo.shape[3]]
            crossed += 1
            if concretize_all:
                best = torch.maximum(best, concretize(lam, const, k))
            last = k
        if not concretize_all and crossed:
            best = torch.maximum(best, concretize(lam, const, last))
        return best


def margin_spec(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """C [N, K, K] with rows e_y − e_j (row y is zero): C·logits = the margins."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def margin_lower_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor | float,
                        stop: int | None = None, bounds: MarginBounds | None = None) -> Tensor:
    """Lower bounds [N, K] on logit_y − logit_j over the ε-ball ∩ [0, 1] (0 at j = y)."""
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(1)
    mb = bounds if bounds is not None else MarginBounds(model)
    lo, hi = input_interval(x, eps_t)
    k = int(model(x[:1]).shape[1]) if bounds is None else None
    spec = margin_spec(y, k if k is not None else _num_classes(mb, x))
    return mb(lo, hi, spec, stop)


def _num_classes(mb: MarginBounds, x: Tensor) -> int:
    with torch.no_grad():
        return int(mb.model(x[:1]).shape[1])


def trace_crown(model: nn.Module, example: Tensor) -> fx.GraphModule:
    """``(x, y, eps [1]) -> margins_lower [N, K]`` as a plain aten graph (the twins' route)."""
    from dcs.training.export.twin import _inference, _trace

    mb = MarginBounds(model)  # raises UnsupportedBounds before any tracing
    with _inference(model), torch.no_grad():
        k = int(model(example[:1]).shape[1])
    with _inference(model):
        def crown(x: Tensor, y: Tensor, eps: Tensor) -> Tensor:
            with torch.no_grad():
                lo, hi = input_interval(x, eps)
                return mb(lo, hi, margin_spec(y, k))
        return _trace(crown, example, torch.zeros(len(example), dtype=torch.long), torch.tensor([0.05]))
