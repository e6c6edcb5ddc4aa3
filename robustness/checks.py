"""Gradient-masking sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness";
DESIGN §4). Each returns ``CheckResult(name, status, detail)`` with status "pass", "warn" or
"skip"; they run on every audit and go into report.json.

Documented flags (what a "warn" means and what to do):

* ``iterative_vs_single_step``: an iterative attack (BIM/PGD/APGD) left *more* accuracy than
  FGSM at the same ε. Iterative attacks include FGSM's step as a special case; when they do worse
  the gradient is likely masked or the step size is wrong. Try BPDA / more steps.
* ``score_only_vs_white_box``: the score-only Square attack beat every white-box attack. A model
  whose gradients are informative should fall faster to gradients than to random search;
  gradients are probably obfuscated (shattered, zero or stochastic).
* ``monotone_in_eps``: some attack's accuracy went *up* as ε grew. The ε-balls are nested, so a
  working attack cannot do worse at larger ε.
* ``large_eps_accuracy``: PGD at a large ε (default 0.5, where an ℓ∞ attacker can turn every
  image into flat grey) leaves accuracy above ``large_eps_max_accuracy``. Unbounded attacks
  should reach ~0; if not, the attack is not reaching the model's decision boundary.
* ``noise_vs_attacks``: random ±ε noise hurt accuracy more than the gradient attacks.
* ``more_steps_change_little``: PGD with ``more_steps_factor``× steps and ``more_restarts``
  restarts lowered accuracy by more than the tolerance: the suite's attacks have not converged,
  so the reported numbers overstate robustness.

For models that declare a family of BPDA backward surrogates (``dcs.robustness.adaptive``):

* ``surrogate_sensitivity``: PGD through each member of the family on the check subset; the
  members' robust accuracies differ by more than the sample's noise (McNemar: 2·sqrt of the
  discordant pairs, and at least tolerance + 1/n). It warns only when the audit attacked through
  one surrogate (``adaptive: false`` or a pinned ``surrogate``): its numbers overstate robustness,
  re-run adaptive. On an adaptive audit it passes and says that the headline is the per-example
  worst case over the kept members. Not in ``CHECK_NAMES``: absent for every other model.

Consistency (not a masking check; added whenever a suite includes ``certify``):

* ``certified_le_empirical`` (status ``warn``, detail starting "bounds are unsound"; the
  status set stays pass/warn/skip): certified robust accuracy (``dcs.robustness.certify``)
  exceeds the robust accuracy of some attack at the same ε, or an example certified at ε was
  broken by an attack (not in the worst-case robust mask). Certified examples provably have no
  adversarial example in the ε-ball, so this is never a weak attack: the bounds graph
  (``model.bounds.onnx``) is unsound or does not belong to the served model. Do not trust the
  certified numbers; re-export and run the bounds soundness tests.

The comparison functions are pure (``rows`` are report result entries); ``dcs.robustness.audit``
performs the extra runs (large ε, noise, more steps) and passes their numbers in.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise

PASS, WARN, SKIP = "pass", "warn", "skip"

SINGLE_STEP = ("fgsm",)
ITERATIVE_WHITE_BOX = ("bim", "pgd", "apgd-ce", "apgd-dlr")
WHITE_BOX = SINGLE_STEP + ITERATIVE_WHITE_BOX
SCORE_ONLY = ("square",)
CONTROL = ("noise",)

#: Consistency check run when a suite includes ``certify`` (not one of the masking CHECK_NAMES).
CERTIFIED_CHECK = "certified_le_empirical"

CHECK_NAMES = ("iterative_vs_single_step", "score_only_vs_white_box", "monotone_in_eps",
               "large_eps_accuracy", "noise_vs_attacks", "more_steps_change_little")


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    detail: str

    def __post_init__(self) -> None:
        if self.status not in (PASS, WARN, SKIP):
            raise ValueError(f"CheckResult.status={self.status!r}, expected pass/warn/skip")

    def to_dict(self) -> dict:
        return asdict(self)


def _tol(tolerance: float, n: int) -> float:
    return tolerance + (1.0 / n if n else 0.0)


def _swept(rows: Iterable[Mapping]) -> list[Mapping]:
    return [r for r in rows if not r.get("fixed_eps") and not r.get("on_survivors")]


def _by_eps(rows: Iterable[Mapping], attacks: Sequence[str]) -> dict[float, list[Mapping]]:
    out: dict[float, list[Mapping]] = {}
    for r in _swept(rows):
        if r["attack"] in attacks:
            out.setdefault(float(r["eps"]), []).append(r)
    return out


def check_iterative_vs_single_step(rows: Sequence[Mapping], tolerance: float = 0.02) -> CheckResult:
    name = CHECK_NAMES[0]
    single, iters = _by_eps(rows, SINGLE_STEP), _by_eps(rows, ITERATIVE_WHITE_BOX)
    common = sorted(set(single) & set(iters))
    if not common:
        return CheckResult(name, SKIP, "needs FGSM and an iterative attack at a common ε")
    bad = []
    for e in common:
        s = min(r["robust_accuracy"] for r in single[e])
        for r in iters[e]:
            if r["robust_accuracy"] > s + _tol(tolerance, r["n"]):
                bad.append(f"{r['label']} {r['robust_accuracy']:.3f} > FGSM {s:.3f} at ε={e:g}")
    if bad:
        return CheckResult(name, WARN, "iterative attack weaker than single-step: " + "; ".join(bad))
    return CheckResult(name, PASS, f"iterative attacks at least as strong as FGSM at ε in {common}")


def check_score_only_vs_white_box(rows: Sequence[Mapping], tolerance: float = 0.02) -> CheckResult:
    name = CHECK_NAMES[1]
    score, white = _by_eps(rows, SCORE_ONLY), _by_eps(rows, WHITE_BOX)
    common = sorted(set(score) & set(white))
    if not common:
        return CheckResult(name, SKIP, "needs Square and a white-box attack at a common ε")
    bad = []
    for e in common:
        w = min(r["robust_accuracy"] for r in white[e])
        for r in score[e]:
            if r["robust_accuracy"] < w - _tol(tolerance, r["n"]):
                bad.append(f"{r['label']} {r['robust_accuracy']:.3f} < best white-box {w:.3f} at ε={e:g}")
    if bad:
        return CheckResult(name, WARN, "score-only attack stronger than white-box: " + "; ".join(bad))
    return CheckResult(name, PASS, f"white-box attacks at least as strong as Square at ε in {common}")


def check_monotone_in_eps(rows: Sequence[Mapping], tolerance: float = 0.02) -> CheckResult:
    name = CHECK_NAMES[2]
    series: dict[str, list[tuple[float, float, int]]] = {}
    for r in _swept(rows):
        series.setdefault(r["label"], []).append((float(r["eps"]), r["robust_accuracy"], r["n"]))
    bad = []
    for label, pts in series.items():
        pts.sort()
        for (e0, a0, _), (e1, a1, n) in pairwise(pts):
            if a1 > a0 + _tol(tolerance, n):
                bad.append(f"{label} {a0:.3f} at ε={e0:g} → {a1:.3f} at ε={e1:g}")
    if not any(len(p) > 1 for p in series.values()):
        return CheckResult(name, SKIP, "needs an attack at two or more ε")
    if bad:
        return CheckResult(name, WARN, "accuracy increases with ε: " + "; ".join(bad))
    return CheckResult(name, PASS, "accuracy is non-increasing in ε for every attack")


def check_large_eps(eps: float | None, accuracy: float | None, max_accuracy: float = 0.1) -> CheckResult:
    name = CHECK_NAMES[3]
    if eps is None or accuracy is None:
        return CheckResult(name, SKIP, "the oracle has no gradients (PGD not run)")
    if accuracy > max_accuracy:
        return CheckResult(name, WARN, f"PGD at ε={eps:g} leaves accuracy {accuracy:.3f} > {max_accuracy:g}; "
                                        "an unbounded attack should reach ~0")
    return CheckResult(name, PASS, f"PGD at ε={eps:g} brings accuracy to {accuracy:.3f} (≤ {max_accuracy:g})")


def check_noise_vs_attacks(rows: Sequence[Mapping], noise: Mapping[float, tuple[float, int]] | None = None,
                           tolerance: float = 0.02) -> CheckResult:
    """``noise`` maps ε → (accuracy, n) for noise runs made outside the suite (optional)."""
    name = CHECK_NAMES[4]
    attacks = _by_eps(rows, WHITE_BOX + SCORE_ONLY)
    noise_acc = {e: min(r["robust_accuracy"] for r in rs) for e, rs in _by_eps(rows, CONTROL).items()}
    noise_n = {e: rs[0]["n"] for e, rs in _by_eps(rows, CONTROL).items()}
    for e, (a, n) in (noise or {}).items():
        noise_acc.setdefault(float(e), a)
        noise_n.setdefault(float(e), n)
    common = sorted(set(attacks) & set(noise_acc))
    if not common:
        return CheckResult(name, SKIP, "needs random noise and an attack at a common ε")
    bad = []
    for e in common:
        weakest = max(attacks[e], key=lambda r: r["robust_accuracy"])
        if noise_acc[e] < weakest["robust_accuracy"] - _tol(tolerance, noise_n[e]):
            bad.append(f"noise {noise_acc[e]:.3f} < {weakest['label']} {weakest['robust_accuracy']:.3f} at ε={e:g}")
    if bad:
        return CheckResult(name, WARN, "random noise stronger than an attack: " + "; ".join(bad))
    return CheckResult(name, PASS, f"every attack beats random noise at ε in {common}")


def check_more_steps(eps: float | None, base: tuple[float, int] | None, more: tuple[float, int] | None,
                     tolerance: float = 0.02, what: str = "") -> CheckResult:
    name = CHECK_NAMES[5]
    if eps is None or base is None or more is None:
        return CheckResult(name, SKIP, "the oracle has no gradients (PGD not run)")
    (a0, n), (a1, _) = base, more
    if a1 < a0 - _tol(tolerance, n):
        return CheckResult(name, WARN, f"stronger PGD ({what}) lowers accuracy {a0:.3f} → {a1:.3f} at ε={eps:g}: "
                                        "attacks have not converged")
    return CheckResult(name, PASS, f"stronger PGD ({what}) changes accuracy {a0:.3f} → {a1:.3f} at ε={eps:g}")


def certified_violations(certified: Mapping | None, rows: Sequence[Mapping],
                         worst_case: Sequence[Mapping] = ()) -> list[str]:
    """Every way the ``certified`` report section contradicts the attack results (empty = consistent).

    At each certified ε: certified accuracy must not exceed any attack's robust accuracy at that ε
    (fixed-ε and cascade rows included), and every certified example must be in the worst-case
    robust mask (no attack broke it).
    """
    if not certified or certified.get("status") != "ok":
        return []
    bad = []
    wc = {round(float(w["eps"]), 9): w for w in worst_case}
    for c in certified.get("per_eps", []):
        e, cert = round(float(c["eps"]), 9), c.get("certified_accuracy")
        if cert is None:
            continue
        for r in rows:
            if round(float(r["eps"]), 9) == e and cert > float(r["robust_accuracy"]) + 1e-12:
                bad.append(f"certified {cert:.3f} > {r['label']} {float(r['robust_accuracy']):.3f} at ε={e:g}")
        w = wc.get(e)
        mask = c.get("certified_mask")
        if w is not None and mask is not None and w.get("robust_mask") is not None:
            broken = [i for i, (m, rm) in enumerate(zip(mask, w["robust_mask"])) if m and not rm]
            if broken:
                bad.append(f"{len(broken)} certified example(s) broken by an attack at ε={e:g} "
                           f"(indices {broken[:5]}{'…' if len(broken) > 5 else ''})")
    return bad


def check_certified_le_empirical(certified: Mapping | None, rows: Sequence[Mapping],
                                 worst_case: Sequence[Mapping] = ()) -> CheckResult:
    """``warn`` when certified accuracy exceeds an attack's robust accuracy (a bounds bug)."""
    name = CERTIFIED_CHECK
    if not certified:
        return CheckResult(name, SKIP, "the suite has no certify entry")
    if certified.get("status") != "ok":
        return CheckResult(name, SKIP, f"certify skipped: {certified.get('reason')}")
    bad = certified_violations(certified, rows, worst_case)
    if bad:
        return CheckResult(name, WARN, "bounds are unsound (certified beats an attack): " + "; ".join(bad))
    eps = [c["eps"] for c in certified.get("per_eps", [])]
    compared = sorted({float(r["eps"]) for r in rows} & {float(e) for e in eps})
    if not compared:
        return CheckResult(name, PASS, "no attack ran at a certified ε (nothing to compare)")
    return CheckResult(name, PASS, f"certified ≤ every attack's robust accuracy at ε in {compared}")
