"""Adaptive attacks across a model's family of BPDA surrogates (issue 25; DESIGN §4).

A model with a non-differentiable layer (the polarizing saturation) has no true gradient to
attack; every gradient attack goes through a *backward surrogate* (BPDA). Which surrogate is
strongest depends on the model: straight-through won on a fully trained PFE, a tanh surrogate with
a small temperature won by ~10 points on a briefly trained one. So an audit's number must hold
against the best member of the family the package declares (``oracle.surrogates``, from the
manifest's ``gradient.surrogates``), not one of them.

How the audit (``dcs.robustness.audit``) uses this module, for an oracle that declares at least
two surrogates and a suite with ``adaptive`` on (every preset):

1. **Calibration** (:func:`calibrate`): PGD (the checks' step count) at the headline ε through
   every member on the check subset (global example index < ``checks.max_examples``), each
   member with the same per-example random starts. Members are ranked by robust accuracy
   (strongest first); walking down the ranking, a member is kept only if it breaks a
   calibration example that no stronger kept member broke (greedy cover; the strongest is
   always kept). Members that never win are dropped, and the report's ``adaptive`` section
   lists what was tried, each member's accuracy and what was kept.
2. **Every gradient attack** (FGSM, BIM, PGD, APGD-CE/DLR, RP2, ...) of the suite runs through
   the *default* member first (the first declared: straight-through, the package's
   ``model.grad.onnx``, the papers' protocol) with the job's own random stream, so that run is
   bit for bit the non-adaptive one, then through each kept member on the examples no earlier
   member broke (:func:`run_members`; AutoAttack's cascade on survivors). Every row of an
   adaptive audit is therefore at most the straight-through-only row, example by example:
   calibration ranks with PGD, and a member that wins for PGD can lose for FGSM (measured on
   MNIST-5k: FGSM through tanh τ=0.02 left 30% where straight-through left 24%), so the default
   is never dropped. The extra cost is the kept members on the survivors only. The row's numbers are that worst case;
   the row carries ``surrogates`` (per member: examples attacked, broken, gradients) and the
   report's ``worst_case`` entries carry ``broken_by`` (per example: ``"<attack label> @
   <surrogate>"`` of the first job that broke it, or null).
3. **The check** ``surrogate_sensitivity`` (:func:`check_surrogate_sensitivity`) compares the
   members' calibration accuracies.

A spec that pins a member (``params: {surrogate: ...}``) runs through that one only. A suite
with ``adaptive: false`` attacks through the oracle's default twin (straight-through) as before,
but calibration and the check still run, so such an audit of a PFE warns. Oracles without a
family (every package without BPDA layers, and packages exported before issue 25) are audited
exactly as before: no calibration, no check, no ``adaptive`` section.

Randomized models: an oracle whose ``randomized`` attribute is true is attacked with EOT
(:class:`EOTView`: ``loss_grad`` averaged over ``eot_samples`` draws). No package exported
here is randomized; the hook is there for one that is.

Shards: calibration uses the check subset, which lives in the shard holding the first global
indices; a shard without it keeps every member (never weaker, only slower), so a sharded
adaptive audit is a valid worst case but need not equal the unsharded one bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dcs.robustness.attacks.base import Attack, AttackResult
from dcs.robustness.checks import PASS, SKIP, WARN, CheckResult
from dcs.robustness.oracle import surrogates as declared_surrogates

CHECK_NAME = "surrogate_sensitivity"
EOT_SAMPLES = 8


def family(oracle: Any) -> tuple[str, ...]:
    """The declared surrogates when there is a choice to make (two or more), else ()."""
    names = declared_surrogates(oracle)
    return names if len(names) >= 2 else ()


class EOTView:
    """Expectation over transformation for a randomized oracle: ``loss_grad`` averaged over
    ``samples`` calls (logits of the first). Deterministic oracles are never wrapped."""

    def __init__(self, oracle: Any, samples: int = EOT_SAMPLES) -> None:
        self._oracle = oracle
        self.samples = int(samples)
        self.num_classes = oracle.num_classes
        self.input_shape = tuple(oracle.input_shape)
        self.bounds = tuple(getattr(oracle, "bounds", (0.0, 1.0)))
        self.surrogates = declared_surrogates(oracle)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._oracle.logits(x)

    def loss_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lg, g = self._oracle.loss_grad(x, y)
        g = g.astype(np.float64)
        for _ in range(self.samples - 1):
            g += self._oracle.loss_grad(x, y)[1]
        return lg, (g / self.samples).astype(np.float32)

    def with_surrogate(self, name: str) -> EOTView:
        return EOTView(self._oracle.with_surrogate(name), self.samples)


def maybe_eot(oracle: Any, samples: int = EOT_SAMPLES) -> Any:
    """``EOTView(oracle)`` when the oracle says it is randomized, else the oracle itself."""
    return EOTView(oracle, samples) if getattr(oracle, "randomized", False) else oracle


@dataclass
class Calibration:
    """What calibration tried and kept (``to_dict`` goes into the report's ``adaptive``)."""

    members: tuple[str, ...]
    kept: tuple[str, ...]
    attack: str
    eps: float
    n: int
    robust_accuracy: dict[str, float] = field(default_factory=dict)
    wins: dict[str, int] = field(default_factory=dict)
    gradients: int = 0
    robust: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per member, bool [n]

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(m for m in self.members if m not in self.kept)

    @property
    def best(self) -> str:
        return self.kept[0]

    def to_dict(self) -> dict[str, Any]:
        return {"members": list(self.members), "kept": list(self.kept), "dropped": list(self.dropped),
                "attack": self.attack, "eps": self.eps, "n": self.n,
                "robust_accuracy": dict(self.robust_accuracy), "wins": dict(self.wins),
                "gradients": int(self.gradients)}


RunFn = Callable[..., Any]  # (attack, x, y, rng, label, eps, target=None) -> AttackResult


def calibrate(members: Sequence[str], attack: Attack, x: np.ndarray, y: np.ndarray,
              clean_correct: np.ndarray, make_rng: Callable[[], Any], run: RunFn) -> Calibration:
    """Run ``attack`` through every member on ``x`` (same random starts: ``make_rng()`` per
    member) and keep the members that win (module docstring, step 1)."""
    members = tuple(members)
    robust: dict[str, np.ndarray] = {}
    grads = 0
    for name in members:
        if len(x):
            res = run(attack.with_params(surrogate=name), x, y, make_rng(), f"calibrate:{name}",
                      float(attack.eps))
            robust[name] = clean_correct & (res.pred == y)
            grads += int(res.gradients)
        else:
            robust[name] = np.zeros(0, bool)
    order = sorted(members, key=lambda m: (int(robust[m].sum()), members.index(m)))
    broken = np.zeros(len(x), bool)
    kept: list[str] = []
    wins: dict[str, int] = {}
    for name in order:
        new = clean_correct & ~robust[name] & ~broken
        wins[name] = int(new.sum())
        if not kept or new.any() or not len(x):
            kept.append(name)
            broken |= clean_correct & ~robust[name]
    n = len(x)
    return Calibration(members=members, kept=tuple(kept), attack=attack.name, eps=float(attack.eps), n=n,
                       robust_accuracy={m: float(robust[m].mean()) if n else float("nan") for m in members},
                       wins=wins, gradients=grads, robust=robust)


def run_members(attack: Attack, members: Sequence[str], x: np.ndarray, y: np.ndarray,
                target: np.ndarray | None, make_rng: Callable[[int, np.ndarray], Any], run: RunFn,
                label: str, eps: float):
    """``attack`` through each member in turn, later members on the survivors only.

    ``make_rng(k, rows)``: the random generators for member ``k`` and the row indices attacked.
    Returns ``(result, by, tally)``: an AttackResult-like object with the per-example worst case
    (``x_adv``, ``logits``, ``pred``, ``success``, summed ``queries``/``gradients``/``wall_s``), the
    member that broke each example (or None) and per-member counts for the report.
    """
    n = len(x)
    x_adv = x.copy()
    logits: np.ndarray | None = None
    success = np.zeros(n, bool)
    by: list[str | None] = [None] * n
    tally: list[dict[str, Any]] = []
    q = g = 0
    wall = 0.0
    todo = np.arange(n)
    for k, name in enumerate(members):
        if not len(todo):
            tally.append({"surrogate": name, "examples_attacked": 0, "broken": 0, "gradients": 0})
            continue
        res = run(attack.with_params(surrogate=name), x[todo], y[todo], make_rng(k, todo), label, eps,
                  target[todo] if target is not None else None)
        if logits is None:
            logits = np.empty((n, res.logits.shape[1]), np.float32)
            logits[todo] = res.logits
            x_adv[todo] = res.x_adv
        won = todo[res.success]
        x_adv[won] = res.x_adv[res.success]
        logits[won] = res.logits[res.success]
        success[won] = True
        for i in won:
            by[int(i)] = name
        q, g, wall = q + res.queries, g + res.gradients, wall + res.wall_s
        tally.append({"surrogate": name, "examples_attacked": len(todo), "broken": len(won),
                      "gradients": int(res.gradients)})
        todo = todo[~res.success]
    if logits is None:
        logits = np.zeros((n, 0), np.float32)
    return AttackResult(x_adv, logits, success, q, g, wall), by, tally


def broken_by(labels_by_job: Sequence[tuple[str, np.ndarray, Sequence[str | None]]], n: int) -> list[str | None]:
    """Per example, ``"<label> @ <surrogate>"`` of the first job that broke it (``"<label>"`` for a
    job without surrogates; None: robust). Entries: (label, rows, member per row: name, "" or None)."""
    out: list[str | None] = [None] * n
    for label, rows, members in labels_by_job:
        for i, m in zip(rows, members):
            if m is not None and out[int(i)] is None:
                out[int(i)] = f"{label} @ {m}" if m else label
    return out


def check_surrogate_sensitivity(cal: Calibration | None, adaptive: bool, tolerance: float,
                                used: Sequence[str] = ()) -> CheckResult:
    """Warn when the surrogates disagree by more than the sample's noise and the headline did
    not take the strongest of them.

    Noise: the best and worst member are compared on the same examples; of the examples exactly
    one of them broke (b + c discordant pairs), a difference above 2·sqrt(b + c) (McNemar, ~95%)
    and above ``tolerance`` + 1/n is a disagreement. An adaptive audit's headline is the
    per-example worst case over the kept members (at most the minimum member's accuracy), so it
    passes and says so; an audit through one surrogate only warns.
    """
    if cal is None or cal.n == 0:
        return CheckResult(CHECK_NAME, SKIP, "no surrogate family, or no calibration examples")
    acc = cal.robust_accuracy
    best = min(cal.members, key=lambda m: acc[m])
    worst = max(cal.members, key=lambda m: acc[m])
    b = int((cal.robust[worst] & ~cal.robust[best]).sum())
    c = int((cal.robust[best] & ~cal.robust[worst]).sum())
    spread = acc[worst] - acc[best]
    noise = max(tolerance + 1.0 / cal.n, 2.0 * math.sqrt(b + c) / cal.n)
    table = ", ".join(f"{m} {100 * acc[m]:.1f}%" for m in cal.members)
    what = f"{cal.attack} at ε={cal.eps:g} on {cal.n} examples: {table}"
    if spread <= noise:
        return CheckResult(CHECK_NAME, PASS, f"surrogates agree within noise ({100 * spread:.1f} ≤ "
                                             f"{100 * noise:.1f} points; {what})")
    if adaptive:
        return CheckResult(CHECK_NAME, PASS,
                           f"surrogates disagree ({100 * spread:.1f} > {100 * noise:.1f} points; {what}); "
                           f"the headline is the per-example worst case over {', '.join(used or cal.kept)} "
                           f"(at most the minimum, {best} {100 * acc[best]:.1f}%)")
    return CheckResult(CHECK_NAME, WARN,
                       f"surrogates disagree ({100 * spread:.1f} > {100 * noise:.1f} points; {what}) but this "
                       f"audit attacked through one surrogate only: its numbers overstate robustness; "
                       f"the strongest member is {best}: re-run with the adaptive suite (adaptive: true)")


class AdaptivePlan:
    """The audit's adaptive state for one oracle and suite (the glue ``audit`` calls).

    ``members``: the declared family (empty: nothing adaptive happens and every method is a
    no-op). After :meth:`calibrate`, ``used`` is what gradient attacks run through: the kept
    members if the suite is adaptive, else nothing (the oracle's default twin).
    """

    def __init__(self, oracle: Any, suite: Any, grads_ok: bool) -> None:
        self.members = family(oracle) if grads_ok else ()
        self.adaptive = bool(getattr(suite, "adaptive", True))
        self.cal: Calibration | None = None
        self.used: tuple[str, ...] = ()
        self.randomized = bool(getattr(oracle, "randomized", False))
        self._jobs: dict[float, list[tuple[str, np.ndarray, list[str | None]]]] = {}
        self._ran = False  # some gradient attack ran through the used members

    def __bool__(self) -> bool:
        return bool(self.members)

    def calibration_units(self, m: int) -> int:
        return len(self.members) * m if self.members else 0

    def calibrate(self, attack: Attack, x, y, correct, rows_ids, seed: int, run: RunFn) -> None:
        from dcs.robustness.attacks.rng import ExampleRNG

        if not self.members:
            return
        self.cal = calibrate(self.members, attack, x, y, correct,
                             lambda: ExampleRNG.for_examples([seed, 2000], rows_ids), run)
        # no calibration examples (a shard without the check subset): keep every member
        kept = self.cal.kept if self.cal.n else self.members
        default = self.members[0]
        self.used = (default, *(m for m in kept if m != default)) if self.adaptive else ()

    @property
    def best(self) -> str | None:
        """The member the checks' PGD runs use (the strongest kept one), or None."""
        return self.cal.kept[0] if self.used and self.cal is not None else None

    def applies(self, attack: Attack) -> bool:
        caps = attack.capabilities
        return bool(self.used) and caps.needs_gradients and not caps.needs_source and attack.surrogate is None

    def run(self, attack: Attack, x, y, target, idx, rng, seed: int, job: int, gids, run: RunFn,
            label: str, eps: float, swept: bool):
        """``attack`` on rows ``idx`` through the used members; returns (result, tally)."""
        from dcs.robustness.attacks.rng import ExampleRNG

        def make_rng(k: int, rows: np.ndarray):
            if k == 0:
                return rng.rows(idx[rows])
            return ExampleRNG.for_examples([seed, job, 3000 + k], gids[idx[rows]])

        self._ran = True
        calls = iter(range(len(self.used)))

        def run_k(*args, **kw):  # progress units: a job counts its examples once (first member)
            return run(*args, units=next(calls) == 0, **kw)

        res, by, tally = run_members(attack, self.used, x[idx], y[idx],
                                     target[idx] if target is not None else None, make_rng, run_k, label, eps)
        if swept:
            self._jobs.setdefault(float(eps), []).append((label, idx, by))
        return res, tally

    def record(self, label: str, eps: float, idx: np.ndarray, success: np.ndarray, swept: bool) -> None:
        """A job that ran without surrogates (score-only, noise, pinned): its breaks count in
        ``broken_by`` under its label alone."""
        if swept and self.used:
            self._jobs.setdefault(float(eps), []).append((label, idx, ["" if s else None for s in success]))

    def broken_by(self, eps: float, correct: np.ndarray) -> dict[str, Any]:
        """``{"broken_by": [...]}`` for a worst-case entry (empty when nothing adaptive ran);
        examples the model misclassifies clean are null."""
        if not self.used:
            return {}
        out = broken_by(self._jobs.get(float(eps), []), len(correct))
        return {"broken_by": [b if ok else None for b, ok in zip(out, correct)]}

    def check(self, tolerance: float) -> CheckResult | None:
        if not self.members:
            return None
        return check_surrogate_sensitivity(self.cal, self._ran, tolerance, self.used)

    def section(self) -> dict[str, Any] | None:
        """The report's ``adaptive`` section (None for an oracle without a family)."""
        if not self.members:
            return None
        return {"members": list(self.members), "adaptive": self.adaptive, "used": list(self.used),
                "eot": self.randomized, "calibration": self.cal.to_dict() if self.cal else None,
                "note": ("gradient attacks ran through every used member, later members on the "
                         "survivors; worst_case[].broken_by names the attack and surrogate that broke "
                         "each input" if self.used else
                         "not adaptive: gradient attacks used the default twin only")}
