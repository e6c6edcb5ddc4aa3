"""Evaluation suites: named presets as data, or loaded from a YAML/JSON file.

A ``Suite`` lists attacks (``AttackSpec``: a registry name, its parameters, an optional fixed ε
and a display label), the ε sweep, and limits the caller can impose: ``max_examples``,
``max_gradients`` and ``max_queries`` (examples sent to ``loss_grad``/``logits`` over the whole
audit, checks included; the audit refuses a suite whose worst-case cost exceeds them before it
starts, and stops if they are reached anyway).

File format (YAML or JSON), every key optional except ``attacks``::

    name: mine
    eps: [0.05, 0.1]
    headline_eps: 0.1
    max_examples: 500
    batch_size: 128
    cascade: false
    attacks:
      - {attack: fgsm}
      - {attack: pgd, params: {steps: 20, restarts: 2}, label: PGD-20}
      - {attack: rp2, eps: 1.0, params: {steps: 100}}
      - {attack: certify}          # certified accuracy from model.bounds.onnx (not an attack)
      - {attack: certify, params: {method: crown}}   # + model.crown.onnx margins (issue 27)
      - {attack: transfer, params: {source: /path/to/other/package, attack: pgd,
                                    attack_params: {steps: 20}}}
    checks: {enabled: true, large_eps: 0.5}
    adaptive: true     # default: gradient attacks run across the model's BPDA surrogate family

``adaptive`` (issue 25, ``dcs.robustness.adaptive``): for a model that declares a family of
backward surrogates (a polarizing front end), every gradient attack runs through each member
kept by a calibration run and the per-example worst case counts; ``false`` attacks through the
default (straight-through) twin only, and the ``surrogate_sensitivity`` check then warns if the
members disagree. Models without such layers are audited the same either way.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcs.robustness import certify as _certify
from dcs.robustness.attacks import REGISTRY, AttackError, build

#: Every name a suite entry may use: the attacks plus non-attack evaluators (``certify``).


def known() -> dict[str, object]:
    """Every name a suite may use: the attack registry (read live, so ``register`` works) and
    the evaluators such as ``certify``."""
    return {**REGISTRY, **_certify.EVALUATORS}


def is_evaluator(name: str) -> bool:
    """True for suite members that are not attacks (``certify``): never in the worst case."""
    return name in _certify.EVALUATORS


class SuiteError(ValueError):
    """A suite name or file that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a suite. ``eps`` None = run at every ε of the sweep; a number = only there."""

    attack: str
    params: Mapping[str, Any] = field(default_factory=dict)
    eps: float | None = None
    label: str | None = None

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        method = self.params.get("method") if self.attack == "certify" else None
        # certify with method=crown (issue 27) is "certify:crown", so both methods fit in one suite
        return f"{self.attack}:{method}" if method not in (None, "ibp") else self.attack

    def to_dict(self) -> dict:
        return {"attack": self.attack, "params": dict(self.params), "eps": self.eps, "label": self.display}


@dataclass(frozen=True)
class CheckConfig:
    """Gradient-masking checks (robustness.checks). Extra runs use at most ``max_examples``.

    tolerance: slack in accuracy units added to 1/n before a comparison warns.
    large_eps / large_eps_max_accuracy: PGD at this ε must bring accuracy to at most this value.
    more_steps_factor / more_restarts: the stronger PGD used by the "more steps" check.
    """

    enabled: bool = True
    max_examples: int = 100
    tolerance: float = 0.02
    large_eps: float = 0.5
    large_eps_max_accuracy: float = 0.1
    more_steps_factor: int = 4
    more_restarts: int = 2
    steps: int = 20

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    attacks: tuple[AttackSpec, ...]
    eps: tuple[float, ...] = (0.1,)
    headline_eps: float | None = None
    max_examples: int | None = None
    max_gradients: int | None = None
    max_queries: int | None = None
    batch_size: int = 128
    cascade: bool = False
    checks: CheckConfig = CheckConfig()
    n_images: int = 8
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not self.attacks:
            raise SuiteError(f"suite {self.name!r}: no attacks")
        for e in self.eps:
            if not 0.0 <= float(e) <= 1.0:
                raise SuiteError(f"suite {self.name!r}: eps {e!r} is outside [0, 1]")
        if not self.eps:
            raise SuiteError(f"suite {self.name!r}: eps list is empty")
        names = known()
        for spec in self.attacks:
            if spec.attack not in names:
                raise SuiteError(f"suite {self.name!r}: unknown attack {spec.attack!r}; known: {sorted(names)}")
            if "eps" in spec.params:
                raise SuiteError(f"suite {self.name!r}: attack {spec.display!r} sets eps in its params; "
                                 "give ε through the suite's eps list or the spec's eps field")
        labels = [s.display for s in self.attacks]
        if len(set(labels)) != len(labels):
            raise SuiteError(f"suite {self.name!r}: attack labels must be unique, got {labels}")
        for key in ("max_examples", "max_gradients", "max_queries"):
            v = getattr(self, key)
            if v is not None and int(v) < 1:
                raise SuiteError(f"suite {self.name!r}: {key}={v!r}, expected a positive integer or null")
        if self.batch_size < 1:
            raise SuiteError(f"suite {self.name!r}: batch_size={self.batch_size!r}, expected >= 1")

    @property
    def headline(self) -> float:
        return float(self.headline_eps) if self.headline_eps is not None else float(self.eps[len(self.eps) // 2])

    def replace(self, **changes: Any) -> Suite:
        """A copy with fields replaced (``eps`` and ``attacks`` accept lists)."""
        if "eps" in changes and changes["eps"] is not None:
            changes["eps"] = tuple(float(e) for e in changes["eps"])
            if self.headline_eps is not None and self.headline_eps not in changes["eps"]:
                changes.setdefault("headline_eps", None)
        changes = {k: v for k, v in changes.items() if v is not None or k == "headline_eps"}
        return dataclasses.replace(self, **changes)

    def jobs(self) -> list[tuple[AttackSpec, float]]:
        """(spec, ε) pairs in run order: ε-major over the sweep, then fixed-ε attacks."""
        out = [(s, float(e)) for e in self.eps for s in self.attacks if s.eps is None]
        out += [(s, float(s.eps)) for s in self.attacks if s.eps is not None]
        return out

    def estimate_cost(self, n: int, surrogates: int = 1) -> tuple[int, int]:
        """Worst-case (gradients, queries) in examples for ``n`` inputs, checks included.

        ``surrogates``: members of the model's BPDA surrogate family the gradient attacks run
        through (``dcs.robustness.adaptive``): every member's gradients count, plus the
        calibration run (``checks.steps``-step PGD per member on the check subset)."""
        n = min(n, self.max_examples or n)
        grads = queries = n  # clean pass
        k = max(1, int(surrogates)) if self.adaptive else 1
        if int(surrogates) > 1:
            m = min(n, self.checks.max_examples)
            grads += int(surrogates) * m * self.checks.steps
            queries += int(surrogates) * 2 * m
        for spec, eps in self.jobs():
            params = {k: v for k, v in spec.params.items() if k != "source"}
            if is_evaluator(spec.attack):
                try:
                    c = _certify.build(eps=eps, **params)
                except AttackError as exc:
                    raise SuiteError(f"suite {self.name!r}: {spec.display!r}: {exc}") from None
                grads += c.gradient_cost(n)
                queries += c.query_cost(n)
                continue
            if REGISTRY[spec.attack].capabilities.needs_source:
                inner = spec.params.get("attack", "pgd")
                try:
                    if isinstance(inner, str):
                        a = build(inner, eps=eps, **dict(spec.params.get("attack_params") or {}))
                    elif isinstance(inner, Mapping):
                        a = build(str(inner["attack"]), eps=eps, **dict(inner.get("params") or {}))
                    else:
                        a = inner
                except (AttackError, KeyError) as exc:
                    raise SuiteError(f"suite {self.name!r}: transfer {spec.display!r}: {exc}") from None
                grads += a.gradient_cost(n)  # spent on the source oracle
                queries += 3 * n
                continue
            try:
                a = build(spec.attack, eps=eps, **params)
            except AttackError as exc:
                raise SuiteError(f"suite {self.name!r}: attack {spec.display!r}: {exc}") from None
            mult = k if a.capabilities.needs_gradients and a.surrogate is None else 1
            grads += mult * a.gradient_cost(n)
            queries += mult * a.query_cost(n)
        if self.checks.enabled:
            m = min(n, self.checks.max_examples)
            c = self.checks
            steps = c.steps
            grads += m * (steps + steps + steps * c.more_steps_factor * c.more_restarts)
            queries += m * (12 + 2 * c.more_restarts) + 3 * m * len(self.eps)
        return grads, queries

    def to_dict(self) -> dict:
        return {"name": self.name, "eps": list(self.eps), "headline_eps": self.headline,
                "attacks": [s.to_dict() for s in self.attacks], "max_examples": self.max_examples,
                "max_gradients": self.max_gradients, "max_queries": self.max_queries,
                "batch_size": self.batch_size, "cascade": self.cascade,
                "checks": self.checks.to_dict(), "n_images": self.n_images, "adaptive": self.adaptive}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, default_name: str = "custom") -> Suite:
        if not isinstance(d, Mapping):
            raise SuiteError(f"suite: expected a mapping at the top level, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise SuiteError(f"suite: unknown key(s) {bad}; known: {sorted(known)}")
        raw_attacks = d.get("attacks")
        if not isinstance(raw_attacks, list) or not raw_attacks:
            raise SuiteError("suite: 'attacks' must be a non-empty list of {attack, params, eps, label}")
        specs = []
        for i, a in enumerate(raw_attacks):
            if isinstance(a, str):
                a = {"attack": a}
            if not isinstance(a, Mapping) or "attack" not in a:
                raise SuiteError(f"suite: attacks[{i}] = {a!r}, expected a mapping with an 'attack' key")
            extra = sorted(set(a) - {"attack", "params", "eps", "label"})
            if extra:
                raise SuiteError(f"suite: attacks[{i}] has unknown key(s) {extra}")
            specs.append(AttackSpec(attack=str(a["attack"]), params=dict(a.get("params") or {}),
                                    eps=None if a.get("eps") is None else float(a["eps"]),
                                    label=a.get("label")))
        checks = d.get("checks", {})
        if isinstance(checks, bool):
            checks = {"enabled": checks}
        try:
            check_cfg = CheckConfig(**checks)
        except TypeError as exc:
            raise SuiteError(f"suite: bad 'checks' entry ({exc})") from None
        kw = {k: v for k, v in d.items() if k not in ("attacks", "checks")}
        if "eps" in kw:
            kw["eps"] = tuple(float(e) for e in kw["eps"])
        kw.setdefault("name", default_name)
        return cls(attacks=tuple(specs), checks=check_cfg, **kw)


def _s(attack: str, label: str | None = None, eps: float | None = None, **params: Any) -> AttackSpec:
    return AttackSpec(attack=attack, params=params, eps=eps, label=label)


# ``certify`` (robustness.certify) is in "standard" and "paper" but not in "quick": it is cheap
# (per ε one bounds pass ≈ 2–3 forward passes, plus one probe pass for polarizing models), but
# "quick" is the server's default, is run on packages without a bounds graph, and its check set
# is a fixed contract (tests/test_checks.py); add {attack: certify} to a quick-like suite instead.
PRESETS: dict[str, Suite] = {
    # Minutes on CPU for small models; the server's default.
    "quick": Suite(
        name="quick", eps=(0.05, 0.1, 0.2, 0.3), headline_eps=0.1,
        attacks=(_s("fgsm", "FGSM"), _s("bim", "BIM", steps=10), _s("pgd", "PGD", steps=10),
                 _s("apgd-ce", "APGD-CE", steps=20), _s("square", "Square", n_queries=200),
                 _s("noise", "Noise")),
        checks=CheckConfig(steps=10, more_steps_factor=2, more_restarts=2, max_examples=100)),
    "standard": Suite(
        name="standard", eps=(0.02, 0.05, 0.1, 0.2, 0.3), headline_eps=0.1,
        attacks=(_s("fgsm", "FGSM"), _s("bim", "BIM", steps=20),
                 _s("pgd", "PGD", steps=40, restarts=2), _s("apgd-ce", "APGD-CE", steps=100),
                 _s("apgd-dlr", "APGD-DLR", steps=100), _s("square", "Square", n_queries=1000),
                 _s("noise", "Noise"), _s("rp2", "RP2", eps=1.0, steps=100), _s("certify", "Certified")),
        checks=CheckConfig(steps=20, max_examples=200)),
    # The polarizing-front-end paper's protocol (DESIGN §8): PGD 100 steps, step ε/10,
    # 20 restarts, ε sweep 0..0.38 by 0.02; plus RP2 with BlurNet's published settings.
    "paper": Suite(
        name="paper", eps=tuple(round(0.02 * i, 2) for i in range(1, 20)), headline_eps=0.1,
        attacks=(_s("fgsm", "FGSM"), _s("bim", "BIM", steps=100, step_size=None),
                 _s("pgd", "PGD", steps=100, restarts=20),
                 _s("apgd-ce", "APGD-CE", steps=100), _s("square", "Square", n_queries=5000),
                 _s("noise", "Noise"), _s("rp2", "RP2", eps=1.0, steps=300, lam=0.02, lr=0.1),
                 _s("certify", "Certified")),
        checks=CheckConfig(steps=100, max_examples=200)),
}


def load_suite(path: str | Path) -> Suite:
    """Read a suite from ``.yaml``/``.yml``/``.json``. Raises SuiteError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read suite file ({exc.strerror})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise different types
        raise SuiteError(f"{path}: not valid {path.suffix.lstrip('.') or 'json'} ({exc})") from None
    try:
        return Suite.from_dict(data, default_name=path.stem)
    except SuiteError as exc:
        raise SuiteError(f"{path}: {exc}") from None


def get_suite(suite: Suite | str) -> Suite:
    """A ``Suite`` as is, a preset name, or a path to a suite file."""
    if isinstance(suite, Suite):
        return suite
    if suite in PRESETS:
        return PRESETS[suite]
    if Path(suite).suffix.lower() in (".yaml", ".yml", ".json"):
        return load_suite(suite)
    raise SuiteError(f"unknown suite {suite!r}: expected one of {sorted(PRESETS)} or a .yaml/.json file")
