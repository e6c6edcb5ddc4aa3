"""Certified training (issue 27): IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020).

Loss per batch, at training progress p (epochs into the certified phase)::

    κ(p)·CE(logits, y) + (1 − κ(p))·CE(−m(p), y)

where m is a lower bound on the margins logit_y − logit_j over the ℓ∞ ball of radius ε(p)
∩ [0, 1] (``dcs.training.export.crown``; m_y = 0), so CE(−m, y) bounds the worst-case
cross-entropy from above.

- ``ibp``: m = interval bound with the last layer elided (the specification folded into the last
  Linear layer, as Gowal et al. do);
- ``crown-ibp``: m = β(p)·m_CROWN-IBP + (1 − β(p))·m_IBP, β from 1 to 0 over the ramp
  (CROWN-IBP's "1 → 0" schedule); m_CROWN-IBP is the full backward linear-relaxation bound with
  interval intermediate bounds (``MarginBounds`` with no stop; itself ≥ m_IBP).

Schedules (both papers): ``warmup`` epochs of natural training (ε = 0, κ = 1), then ε ramps
linearly from 0 to ``eps`` and κ from 1 to ``kappa`` over ``ramp`` epochs (per batch), then both
hold. Defaults: warm-up 10% and ramp 50% of the certified phase.

Which epochs are the certified phase: all of them, except for the polarizing front end, whose
stages 1–2 train the front end with its own regularizers and whose stage 3 (front end frozen,
saturation on) trains the classifier: the certified loss runs in stage 3 only. Bounds through
the saturation are intervals: s is constant wherever [z − ε, z + ε] excludes ±c (its filters are
ℓ1-normalized, so z moves by at most ε). ``cert_pfe_margin`` > 0 adds, in stage 2, the hinge
``mean(relu(ε_t − | |z| − c |))`` (ε_t = the training ε) that pushes activations out of that band:
an *unstable-activation* penalty whose effect on certified accuracy is measured in results/tableD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcs.training.export.bounds import input_interval
from dcs.training.export.crown import MarginBounds, margin_spec

METHODS = ("none", "ibp", "crown-ibp")


@dataclass(frozen=True)
class Schedule:
    """ε, κ and β at a point of the certified phase (see the module docstring)."""

    eps: float
    warmup: float
    ramp: float
    kappa_end: float

    def ramp_fraction(self, progress: float) -> float:
        if progress < self.warmup:
            return 0.0
        if self.ramp <= 0:
            return 1.0
        return min(1.0, (progress - self.warmup) / self.ramp)

    def at(self, progress: float) -> tuple[float, float, float]:
        """(ε, κ, β) after ``progress`` epochs of the certified phase."""
        f = self.ramp_fraction(progress)
        return self.eps * f, 1.0 - f * (1.0 - self.kappa_end), 1.0 - f


def schedule_for(cfg, phase_epochs: int) -> Schedule:
    """The resolved config's schedule over a certified phase of ``phase_epochs`` epochs."""
    warmup = cfg.cert_warmup if cfg.cert_warmup is not None else round(0.1 * phase_epochs, 3)
    ramp = cfg.cert_ramp if cfg.cert_ramp is not None else round(0.5 * phase_epochs, 3)
    return Schedule(float(cfg.cert_eps), float(warmup), float(ramp), float(cfg.cert_kappa))


class CertifiedLoss:
    """Builds the bounds module once per model; ``__call__`` gives (robust CE, margins)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        if method not in METHODS[1:]:
            raise ValueError(f"certified method must be one of {', '.join(METHODS[1:])}, got {method!r}")
        self.method = method
        self.bounds = MarginBounds(model)
        self.last_is_linear = bool(self.bounds.steps) and isinstance(self.bounds.steps[-1].module, nn.Linear)

    def margins(self, x: Tensor, y: Tensor, logits: Tensor, eps: float, beta: float) -> Tensor:
        lo, hi = input_interval(x, torch.tensor([eps], dtype=x.dtype, device=x.device))
        spec = margin_spec(y, logits.shape[1], logits.dtype)
        ibp = self.bounds(lo, hi, spec, stop=1 if self.last_is_linear else 0)
        if self.method == "ibp" or beta <= 0:
            return ibp
        crown = self.bounds(lo, hi, spec, stop=None, concretize_all=False)
        return beta * crown + (1.0 - beta) * ibp

    def __call__(self, x: Tensor, y: Tensor, logits: Tensor, eps: float, beta: float) -> tuple[Tensor, Tensor]:
        m = self.margins(x, y, logits, eps, beta)
        return F.cross_entropy(-m, y), m


def unstable_penalty(z: Tensor, c: float, eps: float) -> Tensor:
    """mean relu(ε − | |z| − c |): activations whose saturation an ε-perturbation can flip."""
    return F.relu(eps - (z.abs() - c).abs()).mean()


def phase(cfg) -> tuple[int, int]:
    """(first epoch, length) of the certified phase: stage 3 for pfe, else the whole run."""
    if cfg.defense.kind == "pfe":
        s1, s2, s3 = cfg.pfe_stages
        return s1 + s2, s3
    return 0, int(cfg.epochs)


def batch_terms(cert: CertifiedLoss, model: nn.Module, cfg, x: Tensor, y: Tensor,
                probe: dict[str, Tensor], progress: float):
    """(loss(ce), extra regularizer) for one batch ``progress`` epochs into the run.

    ``loss(ce)`` mixes the natural cross-entropy with the bound's; the extra term is the pfe
    stage-2 unstable-activation hinge (0 unless ``cert_pfe_margin`` > 0).
    """
    start, length = phase(cfg)
    extra = probe["logits"].new_zeros(())
    if cfg.defense.kind == "pfe" and cfg.cert_pfe_margin > 0 and "z" in probe:
        s1, s2, _ = cfg.pfe_stages
        if s1 <= progress < s1 + s2:
            extra = cfg.cert_pfe_margin * unstable_penalty(probe["z"], float(cfg.defense.pfe_c), float(cfg.cert_eps))
    p = progress - start
    if p < 0:
        return (lambda ce: ce), extra
    eps, kappa, beta = schedule_for(cfg, length).at(p)
    if eps <= 0:
        return (lambda ce: ce), extra
    robust, _ = cert(x, y, probe["logits"], eps, beta)
    return (lambda ce: kappa * ce + (1.0 - kappa) * robust), extra


def ibp_init(model: nn.Module) -> list[str]:
    """Shi et al. 2021 ("Fast certified robust training with short warmup") initialization: every
    Conv2d/Linear weight ~ N(0, (√(2π)/fan_in)²), biases 0, so that interval widths neither explode
    nor vanish through the layers at the start of training. The ℓ1-normalized front-end conv is left
    alone (its scale is normalized away). Returns the names of the layers re-initialized."""
    import math

    from dcs.training.models.layers import L1NormalizedConv2d

    done = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, L1NormalizedConv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
                if m.bias is not None:
                    m.bias.zero_()
                done.append(name)
    return done
