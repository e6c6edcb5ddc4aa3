"""Gradient-masking checks: each fires on a model built to mask gradients, none on the baseline."""
from __future__ import annotations

import pytest

from dcs.robustness import checks as C
from dcs.robustness.attacks.toy_oracles import (
    ArrayOracle,
    FoldedInput,
    QuantizedInput,
    ShatteredGradient,
    StochasticGradient,
    fold,
)
from dcs.robustness.audit import audit
from dcs.robustness.suites import get_suite
from dcs.robustness.testing import fit_mlp, load_digits_nchw

N = 200


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, xte, yte = load_digits_nchw()
    return xtr, ytr, xte[:N], yte[:N], fit_mlp(xtr, ytr, 10)


def statuses(report) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report.checks}


def test_baseline_is_quiet(digits):
    _, _, x, y, w = digits
    rep = audit(ArrayOracle(w, 10, (1, 8, 8)), x, y, "quick", seed=0)
    assert set(statuses(rep)) == set(C.CHECK_NAMES)
    assert all(s == "pass" for s in statuses(rep).values()), rep.checks


def masking_oracle(kind, digits):
    xtr, ytr, _, _, w = digits
    if kind == "quantized":
        return QuantizedInput(w, 10, (1, 8, 8), levels=5)
    if kind == "stochastic":
        return StochasticGradient(w, 10, (1, 8, 8), noise=3.0, seed=0)
    if kind == "shattered":
        return ShatteredGradient(w, 10, (1, 8, 8))
    if kind == "folded":
        return FoldedInput(fit_mlp(fold(xtr, 0.4), ytr, 10), 10, (1, 8, 8), period=0.4)
    raise AssertionError(kind)


# Which masking model trips which check (each check appears at least once).
FIRES = [
    ("quantized", "score_only_vs_white_box"),
    ("quantized", "large_eps_accuracy"),
    ("quantized", "noise_vs_attacks"),
    ("stochastic", "more_steps_change_little"),
    ("shattered", "iterative_vs_single_step"),
    ("folded", "monotone_in_eps"),
]


def test_every_check_has_a_masking_model():
    assert {name for _, name in FIRES} == set(C.CHECK_NAMES)


@pytest.mark.parametrize("kind", sorted({k for k, _ in FIRES}))
def test_checks_fire_on_masking_models(kind, digits):
    _, _, x, y, _ = digits
    suite = get_suite("quick")
    if kind == "folded":  # a whole fold period (0.4) must be inside the sweep
        suite = suite.replace(eps=(0.1, 0.2, 0.3, 0.4))
    rep = audit(masking_oracle(kind, digits), x, y, suite, seed=0)
    st = statuses(rep)
    for k, name in FIRES:
        if k == kind:
            assert st[name] == "warn", (kind, name, rep.checks)


ROWS_OK = [
    {"attack": "fgsm", "label": "FGSM", "eps": 0.1, "robust_accuracy": 0.5, "n": 100},
    {"attack": "pgd", "label": "PGD", "eps": 0.1, "robust_accuracy": 0.3, "n": 100},
    {"attack": "square", "label": "Square", "eps": 0.1, "robust_accuracy": 0.4, "n": 100},
    {"attack": "noise", "label": "Noise", "eps": 0.1, "robust_accuracy": 0.9, "n": 100},
    {"attack": "fgsm", "label": "FGSM", "eps": 0.2, "robust_accuracy": 0.2, "n": 100},
    {"attack": "pgd", "label": "PGD", "eps": 0.2, "robust_accuracy": 0.0, "n": 100},
]


def _with(rows, label, eps, acc):
    return [dict(r, robust_accuracy=acc) if (r["label"], r["eps"]) == (label, eps) else r for r in rows]


def test_pure_checks_pass_and_warn_on_hand_made_rows():
    assert C.check_iterative_vs_single_step(ROWS_OK).status == "pass"
    assert C.check_iterative_vs_single_step(_with(ROWS_OK, "PGD", 0.1, 0.6)).status == "warn"
    assert C.check_score_only_vs_white_box(ROWS_OK).status == "pass"
    assert C.check_score_only_vs_white_box(_with(ROWS_OK, "Square", 0.1, 0.1)).status == "warn"
    assert C.check_monotone_in_eps(ROWS_OK).status == "pass"
    assert C.check_monotone_in_eps(_with(ROWS_OK, "FGSM", 0.2, 0.7)).status == "warn"
    assert C.check_noise_vs_attacks(ROWS_OK).status == "pass"
    assert C.check_noise_vs_attacks(_with(ROWS_OK, "Noise", 0.1, 0.2)).status == "warn"
    assert C.check_large_eps(0.5, 0.0).status == "pass"
    assert C.check_large_eps(0.5, 0.4).status == "warn"
    assert C.check_more_steps(0.1, (0.5, 100), (0.49, 100)).status == "pass"
    assert C.check_more_steps(0.1, (0.5, 100), (0.3, 100)).status == "warn"
    # tolerance: one example out of 100 plus 0.02 is not a warning
    assert C.check_iterative_vs_single_step(_with(ROWS_OK, "PGD", 0.1, 0.52)).status == "pass"


def test_checks_skip_without_data():
    only_pgd = [r for r in ROWS_OK if r["attack"] == "pgd"][:1]
    assert C.check_iterative_vs_single_step(only_pgd).status == "skip"
    assert C.check_score_only_vs_white_box(only_pgd).status == "skip"
    assert C.check_monotone_in_eps(only_pgd).status == "skip"
    assert C.check_noise_vs_attacks(only_pgd).status == "skip"
    assert C.check_large_eps(None, None).status == "skip"
    assert C.check_more_steps(None, None, None).status == "skip"
    with pytest.raises(ValueError):
        C.CheckResult("x", "fail", "")


def test_score_only_oracle_gets_skips_not_errors(digits):
    from dcs.robustness.oracle import ScoreOnlyView
    from dcs.robustness.suites import AttackSpec, Suite

    _, _, x, y, w = digits
    suite = Suite(name="bb", eps=(0.1, 0.2), attacks=(AttackSpec("square", {"n_queries": 50}),
                                                       AttackSpec("noise")))
    rep = audit(ScoreOnlyView(ArrayOracle(w, 10, (1, 8, 8))), x[:50], y[:50], suite, seed=0)
    st = statuses(rep)
    assert st["large_eps_accuracy"] == "skip" and st["more_steps_change_little"] == "skip"
