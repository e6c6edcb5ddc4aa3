"""The attack runs behind the gradient-masking checks (``dcs.robustness.checks``) and the checks
computed from their per-example predictions: PGD at a large ε, PGD with more steps and restarts,
and random noise at each ε of the suite, on the audit's check subset.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dcs.robustness import checks as C
from dcs.robustness.attacks import build
from dcs.robustness.attacks.rng import ExampleRNG
from dcs.robustness.suites import Suite


def run_checks(oracle, x, y, suite: Suite, rows, seed, grads_ok, run_attack, ids=None,
                record: dict | None = None, surrogate: str | None = None) -> list[C.CheckResult]:
    """The extra check runs on ``x`` (global indices ``ids``), then ``checks_from_predictions``.
    ``surrogate``: the BPDA surrogate the check PGD runs use (adaptive audits: the strongest).

    ``record`` receives each run's per-example predictions (keys as in ``checks_from_predictions``).
    """
    cfg = suite.checks
    m = len(x)
    ids = np.arange(m) if ids is None else ids
    bs = suite.batch_size
    preds: dict[str, np.ndarray] = {}

    def rng(k: int) -> ExampleRNG:
        return ExampleRNG.for_examples([seed, k], ids)

    if grads_ok and m:
        a = build("pgd", eps=cfg.large_eps, steps=cfg.steps, batch_size=bs, surrogate=surrogate)
        preds["large_eps"] = run_attack(a, x, y, rng(1000), "check:large-eps", cfg.large_eps).pred
        e = suite.headline
        a = build("pgd", eps=e, steps=cfg.steps, batch_size=bs, surrogate=surrogate)
        preds["pgd"] = run_attack(a, x, y, rng(1001), "check:pgd", e).pred
        a = build("pgd", eps=e, steps=cfg.steps * cfg.more_steps_factor, restarts=cfg.more_restarts, batch_size=bs,
                  surrogate=surrogate)
        preds["pgd_more"] = run_attack(a, x, y, rng(1002), "check:pgd-more", e).pred
    if not any(s.attack == "noise" and s.eps is None for s in suite.attacks) and m:
        for k, e in enumerate(suite.eps):
            a = build("noise", eps=e, batch_size=bs)
            preds[f"noise:{k}"] = run_attack(a, x, y, rng(1100 + k), "check:noise", e).pred
    if record is not None:
        record.update(preds)
    return checks_from_predictions(suite, rows, y, preds)


def checks_from_predictions(suite: Suite, rows, y: np.ndarray, preds: Mapping[str, np.ndarray]
                            ) -> list[C.CheckResult]:
    """The masking checks from report rows and the check runs' per-example predictions on the check
    subset (labels ``y``): keys ``large_eps``, ``pgd``, ``pgd_more`` (absent without gradients) and
    ``noise:<k>`` (k = index in ``suite.eps``; absent when the suite has its own noise entry).
    Pure, so ``dcs.robustness.shard`` recomputes a sharded run's checks exactly."""
    cfg = suite.checks
    tol = cfg.tolerance
    m = len(y)
    out = [C.check_iterative_vs_single_step(rows, tol), C.check_score_only_vs_white_box(rows, tol),
           C.check_monotone_in_eps(rows, tol)]

    def acc(key: str) -> float:
        return float(np.mean(np.asarray(preds[key]) == y))

    what = f"{cfg.steps}×1 → {cfg.steps * cfg.more_steps_factor}×{cfg.more_restarts} steps×restarts"
    large = acc("large_eps") if "large_eps" in preds else None
    base = (acc("pgd"), m) if "pgd" in preds else None
    more = (acc("pgd_more"), m) if "pgd_more" in preds else None
    out.append(C.check_large_eps(cfg.large_eps if large is not None else None, large, cfg.large_eps_max_accuracy))
    noise = {float(e): (acc(f"noise:{k}"), m) for k, e in enumerate(suite.eps) if f"noise:{k}" in preds}
    out.append(C.check_noise_vs_attacks(rows, noise, tol))
    out.append(C.check_more_steps(suite.headline if base else None, base, more, tol, what))
    return out
