"""Typed, frozen run configuration: defense spec, adversarial-training spec and train config.

Defaults are the papers' values (DESIGN.md §8). ``TrainConfig.from_dict`` accepts the flat or
nested keys written by ``to_dict`` and validates everything, raising ``ConfigError``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

ARCHS = ("pfe_cnn", "lisa_cnn")
DEFENSES = ("none", "blur_input", "blur_conv1", "learned_blur", "tv", "pfe", "advtrain")
BLUR_TYPES = ("box", "gaussian")
BLUR_KERNELS = (3, 5, 7)
DEVICES = ("cpu", "cuda", "auto")
PFE_RAMPS = ("batch", "epoch", "none")
CERTIFIED = ("none", "ibp", "crown-ibp")  # dcs.training.certified.METHODS


STRAIGHT_THROUGH = "straight-through"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""


def surrogate_tau(name: str) -> float | None:
    """``straight-through`` → None; ``tanh:TAU`` → TAU (> 0). The names are the package's
    ``gradient.surrogates`` member names. Anything else is a ``ConfigError``."""
    if name == STRAIGHT_THROUGH:
        return None
    kind, _, value = str(name).partition(":")
    try:
        tau = float(value) if kind == "tanh" else float("nan")
    except ValueError:
        tau = float("nan")
    if not tau > 0 or tau == float("inf"):
        raise ConfigError(f"adv_surrogate must be '{STRAIGHT_THROUGH}' or 'tanh:TAU' with TAU > 0, got {name!r}")
    return tau


@dataclass(frozen=True)
class DefenseSpec:
    """Which defense a model carries, with every hyperparameter.

    kind: none | blur_input | blur_conv1 | learned_blur | tv | pfe | advtrain (advtrain = no
    architectural change; the trainer runs PGD adversarial training, see ``AdvTrainSpec``).
    blur_*: kernel size (3/5/7) and type (box, or gaussian with sigma; None → OpenCV's rule
    0.3·((k−1)/2 − 1) + 0.8). alpha: L∞ weight for learned_blur (BlurNet table: 1e-5 for 3x3,
    0.1 for 5x5/7x7; default 0.1). tv_alpha: TV weight (BlurNet 1e-4).
    pfe_*: front-end filters/kernel, jump c (None → 0.5 for MNIST-like, 0.25 otherwise),
    sigma1 0.35, sigma2 0.15, pfe_lambda (λ, 1.0) and pfe_ramp: how λ grows over each
    regularized stage — "epoch" (authors' code: λ·e/E, a step per epoch), "batch" (the same line
    evaluated per batch; equal at epoch starts, and non-zero in 1-epoch stages; default) or
    "none" (constant λ).
    """

    kind: str = "none"
    blur_kernel: int = 5
    blur_type: str = "box"
    blur_sigma: float | None = None
    alpha: float = 0.1
    tv_alpha: float = 1e-4
    pfe_filters: int = 25
    pfe_kernel: int = 5
    pfe_c: float | None = None
    pfe_sigma1: float = 0.35
    pfe_sigma2: float = 0.15
    pfe_lambda: float = 1.0
    pfe_ramp: str = "batch"

    def validate(self) -> DefenseSpec:
        _choice("defense", self.kind, DEFENSES)
        _choice("blur_type", self.blur_type, BLUR_TYPES)
        _choice("blur_kernel", self.blur_kernel, BLUR_KERNELS)
        _choice("pfe_ramp", self.pfe_ramp, PFE_RAMPS)
        for name in ("alpha", "tv_alpha", "pfe_lambda"):
            _nonneg(name, getattr(self, name))
        for name in ("pfe_sigma1", "pfe_sigma2"):
            _positive(name, getattr(self, name))
        if self.blur_sigma is not None:
            _positive("blur_sigma", self.blur_sigma)
        if self.pfe_c is not None and not 0 < self.pfe_c < 1:
            raise ConfigError(f"pfe_c must be in (0, 1), got {self.pfe_c}")
        _positive("pfe_filters", self.pfe_filters)
        if self.pfe_kernel < 1 or self.pfe_kernel % 2 == 0:
            raise ConfigError(f"pfe_kernel must be a positive odd integer, got {self.pfe_kernel}")
        return self


@dataclass(frozen=True)
class AdvTrainSpec:
    """Madry PGD adversarial training (ℓ∞): train on PGD examples only.

    eps None → 0.3 for MNIST-like data, 0.1 otherwise (the polarizing paper's ε);
    steps 40 and step_size None → 2.5·eps/steps (Madry et al.); random start in the ε-ball.
    eps_warmup: epochs over which ε (and the step) grow linearly from 0 to eps, per batch; 0 = off.
    Large-ε training from scratch (MNIST ε=0.3) can sit at chance without it.
    surrogate: the saturation's backward the training attack differentiates through (PFE only):
    ``straight-through`` (BPDA identity, default) or ``tanh:TAU`` (the smooth surrogate at
    temperature TAU, the same family the package's audit searches; issue 25).
    """

    enabled: bool = False
    eps: float | None = None
    steps: int = 40
    step_size: float | None = None
    random_start: bool = True
    eps_warmup: float = 0.0
    surrogate: str = STRAIGHT_THROUGH

    def eps_at(self, progress: float) -> tuple[float, float]:
        """(ε, step size) after ``progress`` epochs of training (resolved spec)."""
        scale = min(1.0, progress / self.eps_warmup) if self.eps_warmup > 0 else 1.0
        return float(self.eps) * scale, float(self.step_size) * scale

    def validate(self) -> AdvTrainSpec:
        if self.eps is not None and not 0 <= self.eps <= 1:
            raise ConfigError(f"adv_eps must be in [0, 1], got {self.eps}")
        if not self.eps_warmup >= 0:
            raise ConfigError(f"adv_eps_warmup must be >= 0 epochs, got {self.eps_warmup}")
        _positive("adv_steps", self.steps)
        if self.step_size is not None:
            _positive("adv_step_size", self.step_size)
        surrogate_tau(self.surrogate)
        return self


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; written to ``config.json`` resolved (no None left for c/eps/...)."""

    dataset: str = "fmnist"
    data_dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    image_size: int | None = None
    val_fraction: float = 0.0
    arch: str = "pfe_cnn"
    defense: DefenseSpec = field(default_factory=DefenseSpec)
    adv: AdvTrainSpec = field(default_factory=AdvTrainSpec)
    epochs: int | None = None
    pfe_stages: tuple[int, int, int] | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    checkpoint_every: int = 200
    # certified training (dcs.training.certified): method, training ε (None → 0.4 MNIST-like,
    # 0.15 otherwise), warm-up / ramp epochs (None → 10% / 50% of the certified phase), final κ,
    # and the PFE stage-2 unstable-activation hinge weight (0 = off)
    certified: str = "none"
    cert_eps: float | None = None
    cert_warmup: float | None = None
    cert_ramp: float | None = None
    cert_kappa: float = 0.5
    cert_pfe_margin: float = 0.0
    cert_init: str = "ibp"  # "ibp": Shi et al. 2021 initialization for certified runs; "default": torch's
    cert_clip: float = 10.0  # gradient-norm clip in certified runs (0 = off)

    def validate(self) -> TrainConfig:
        _choice("arch", self.arch, ARCHS)
        _choice("certified", self.certified, CERTIFIED)
        if self.cert_eps is not None and not 0 <= self.cert_eps <= 1:
            raise ConfigError(f"cert_eps must be in [0, 1], got {self.cert_eps}")
        for name in ("cert_warmup", "cert_ramp"):
            if getattr(self, name) is not None:
                _nonneg(name, getattr(self, name))
        if not 0 <= self.cert_kappa <= 1:
            raise ConfigError(f"cert_kappa must be in [0, 1], got {self.cert_kappa}")
        _nonneg("cert_pfe_margin", self.cert_pfe_margin)
        _choice("cert_init", self.cert_init, ("ibp", "default"))
        _nonneg("cert_clip", self.cert_clip)
        if self.certified != "none" and (self.adv.enabled or self.defense.kind == "advtrain"):
            raise ConfigError("certified training and adversarial training cannot be combined")
        if self.adv.surrogate != STRAIGHT_THROUGH and self.defense.kind != "pfe":
            raise ConfigError(f"adv_surrogate {self.adv.surrogate!r} only applies to --defense pfe "
                              "(the saturation is the only layer with a surrogate backward)")
        _choice("device", self.device, DEVICES)
        self.defense.validate()
        self.adv.validate()
        for name in ("limit_train", "limit_test", "image_size", "epochs", "threads"):
            v = getattr(self, name)
            if v is not None:
                _positive(name, v)
        _positive("batch_size", self.batch_size)
        _positive("lr", self.lr)
        _nonneg("weight_decay", self.weight_decay)
        _positive("lr_gamma", self.lr_gamma)
        _positive("checkpoint_every", self.checkpoint_every)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.pfe_stages is not None:
            if len(self.pfe_stages) != 3 or any(s < 0 for s in self.pfe_stages) or sum(self.pfe_stages) < 1:
                raise ConfigError(f"pfe_stages must be three non-negative epoch counts (sum ≥ 1), got {self.pfe_stages}")
            if self.defense.kind != "pfe":
                raise ConfigError("pfe_stages only applies to --defense pfe")
            if self.epochs is not None and self.epochs != sum(self.pfe_stages):
                raise ConfigError(f"epochs ({self.epochs}) must equal the sum of pfe_stages {self.pfe_stages}")
        if self.lr_milestones is not None and any(m < 1 for m in self.lr_milestones):
            raise ConfigError(f"lr_milestones must be epochs >= 1, got {self.lr_milestones}")
        return self

    @property
    def adversarial(self) -> bool:
        return self.adv.enabled or self.defense.kind == "advtrain"

    def resolved(self) -> TrainConfig:
        """Fill dataset- and length-dependent defaults (documented on the fields)."""
        self.validate()
        mnist_like = self.dataset.startswith("mnist")
        d = self.defense
        if d.pfe_c is None:
            d = replace(d, pfe_c=0.5 if mnist_like else 0.25)
        epochs, stages = self.epochs, self.pfe_stages
        if d.kind == "pfe":
            if stages is None:
                n = epochs or 60
                stages = (n // 3, n // 3, n - 2 * (n // 3))
            epochs = sum(stages)
        elif epochs is None:
            epochs = 10
        milestones = self.lr_milestones
        if milestones is None:  # the polarizing paper: lr/10 for the last sixth of training
            milestones = (round(epochs * 5 / 6),) if epochs >= 6 else ()
        adv = self.adv
        if self.adversarial:
            eps = adv.eps if adv.eps is not None else (0.3 if mnist_like else 0.1)
            adv = replace(adv, enabled=True, eps=eps,
                          step_size=adv.step_size if adv.step_size is not None else 2.5 * eps / adv.steps)
        cert_eps = self.cert_eps
        if cert_eps is None and self.certified != "none":
            cert_eps = 0.4 if mnist_like else 0.15
        return replace(self, defense=d, adv=adv, epochs=epochs, pfe_stages=stages,
                       lr_milestones=tuple(milestones), cert_eps=cert_eps).validate()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("pfe_stages", "lr_milestones"):
            if out[k] is not None:
                out[k] = list(out[k])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from nested (``defense: {...}``, ``adv: {...}``) or flat prefixed keys
        (``defense``=kind, ``blur_kernel``, ``pfe_c``, ``adv_eps``, ...). Unknown keys are errors."""
        data = dict(data)
        top = {f.name for f in fields(cls)} - {"defense", "adv"}
        dfields = {f.name for f in fields(DefenseSpec)}
        afields = {f.name for f in fields(AdvTrainSpec)}
        dvals, avals, tvals = {}, {}, {}
        dval = data.pop("defense", None)
        if isinstance(dval, Mapping):
            dvals.update(dval)
        elif dval is not None:
            dvals["kind"] = dval
        aval = data.pop("adv", None)
        if isinstance(aval, Mapping):
            avals.update(aval)
        for key, value in data.items():
            k = key.replace("-", "_")
            if k in top:
                tvals[k] = value
            elif k in dfields and k != "kind":
                dvals[k] = value
            elif k.startswith("adv_") and k[4:] in afields:
                avals[k[4:]] = value
            elif k == "adv_train":
                avals["enabled"] = value
            else:
                raise ConfigError(f"unknown config key {key!r}")
        for name, vals, allowed in (("defense", dvals, dfields), ("adv", avals, afields)):
            bad = set(vals) - allowed
            if bad:
                raise ConfigError(f"unknown {name} keys {sorted(bad)}")
        for k in ("pfe_stages", "lr_milestones"):
            if isinstance(tvals.get(k), (list, tuple)):
                tvals[k] = tuple(int(v) for v in tvals[k])
        dvals, avals, tvals = (_coerce(DefenseSpec, dvals), _coerce(AdvTrainSpec, avals),
                               _coerce(cls, tvals))
        try:
            return cls(defense=DefenseSpec(**dvals), adv=AdvTrainSpec(**avals), **tvals).validate()
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Numeric strings (YAML reads ``1e-3`` as a string) → the field's int/float type."""
    types = {f.name: str(f.type) for f in fields(cls)}
    out = dict(values)
    for k, v in values.items():
        t = types.get(k, "")
        if not isinstance(v, str) or not ("float" in t or "int" in t):
            continue
        try:
            out[k] = float(v) if "float" in t else int(v)
        except ValueError:
            raise ConfigError(f"{k} must be a number, got {v!r}") from None
    return out


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def _nonneg(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
