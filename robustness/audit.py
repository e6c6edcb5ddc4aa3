"""``audit``: run a suite against an oracle and return a ``Report`` (the server reuses this).

Determinism: every example gets, per (attack, ε) job, its own generator
``numpy.random.default_rng([seed, i, g])`` (i = the job's index in ``Suite.jobs()``, g = the
example's global index, ``example_ids``; checks use ``[seed, 1000 + k, g]``), wrapped in an
``ExampleRNG``. An example's numbers therefore depend on the seed, the job and its own index
only, not on its batch or the other examples: a shard (``example_ids`` = its slice of the test
set) reproduces the unsharded per-example results (``dcs.robustness.shard``). No global RNG is
touched. ``Report.outcomes`` carries the per-example outcomes a merge needs.

Budget: ``suite.max_gradients`` / ``suite.max_queries`` (examples through ``loss_grad`` /
``logits``, checks included). The audit refuses a suite whose worst-case cost exceeds them before
it starts (``AuditBudgetExceeded``) and stops with the same error if they run out anyway.
``should_stop()`` is polled before every batch; when it returns True the audit raises
``AuditCancelled``.

Certification: suite entries named ``certify`` (``dcs.robustness.certify``) are not attacks. Each runs
as a job per ε like an attack (progress, budget, cancel), but its numbers go to the report's
``certified`` section and never into ``results``, the worst case or the headline. A package
without ``model.bounds.onnx`` gives a ``certified`` section with status "skipped" and a reason.
When certify ran, the check ``certified_le_empirical`` is added (even with checks disabled).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dcs.robustness import adaptive as AD
from dcs.robustness import certify as CE
from dcs.robustness import checks as C
from dcs.robustness.attacks import REGISTRY, Budget, BudgetExceeded, Stopped, build
from dcs.robustness.attacks.errors import AttackError
from dcs.robustness.attacks.rng import ExampleRNG
from dcs.robustness.check_runs import run_checks
from dcs.robustness.metrics import attack_metrics, l2_dissimilarity
from dcs.robustness.oracle import has_gradients
from dcs.robustness.report.schema import Report
from dcs.robustness.suites import (
    PRESETS,
    AttackSpec,
    CheckConfig,
    Suite,
    SuiteError,
    get_suite,
    is_evaluator,
)

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "AttackSpec", "AuditBudgetExceeded", "AuditCancelled", "AuditError", "CheckConfig",
           "ProgressEvent", "Report", "Suite", "audit", "get_suite"]

N_SPECTRUM = 32  # adversarial examples kept per job at the headline ε (for spectra and grids)


class AuditError(Exception):
    """An audit that cannot run or finish; the message names the reason."""


class AuditCancelled(AuditError):
    """``should_stop()`` returned True."""


class AuditBudgetExceeded(AuditError):
    """The suite's gradient or query budget is (or would be) exceeded."""


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of an audit. Units are examples attacked (over all jobs, checks included).

    robust_accuracy_so_far: worst case at ``eps`` over the attacks finished so far at that ε,
    or None before the first one finishes. eta_s: None until a unit is done. The last event of
    a finished audit has ``attack == "done"``, ``eps`` = the headline ε, ``units_done ==
    units_total`` and ``eta_s == 0``.
    """

    attack: str
    eps: float
    examples_done: int
    examples_total: int
    units_done: int
    units_total: int
    robust_accuracy_so_far: float | None
    eta_s: float | None
    gradients_used: int


def _resolve_source(spec_params: Mapping[str, Any], sources: Mapping[str, Any] | None):
    src = spec_params.get("source")
    if src is None:
        raise AuditError("transfer attack needs params.source (a package path or a key of sources=)")
    if not isinstance(src, (str, Path)):
        return src
    if sources and str(src) in sources:
        return sources[str(src)]
    from dcs.robustness.package import load_package

    return load_package(src)


def _inner_attack(spec_params: Mapping[str, Any], eps: float):
    """Transfer's inner attack from a suite entry: a name, {attack, params} or an Attack."""
    inner = spec_params.get("attack", "pgd")
    if isinstance(inner, str):
        return build(inner, eps=eps, **dict(spec_params.get("attack_params") or {}))
    if isinstance(inner, Mapping):
        return build(str(inner["attack"]), eps=eps, **dict(inner.get("params") or {}))
    return inner


def _validate(oracle: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    shape = tuple(oracle.input_shape)
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != shape:
        raise AuditError(f"x has shape {list(x.shape)}, expected [N, {', '.join(map(str, shape))}]")
    if not np.issubdtype(x.dtype, np.floating):
        raise AuditError(f"x has dtype {x.dtype}, expected float32 in [0, 1]")
    if y.ndim != 1 or len(y) != len(x):
        raise AuditError(f"y has shape {list(y.shape)}, expected [{len(x)}]")
    if not np.issubdtype(y.dtype, np.integer):
        raise AuditError(f"y has dtype {y.dtype}, expected integer labels")
    if len(x) == 0:
        raise AuditError("no examples to audit")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise AuditError("x must be finite and in [0, 1]")
    if y.min() < 0 or y.max() >= oracle.num_classes:
        raise AuditError(f"labels must be in [0, {oracle.num_classes - 1}], got [{y.min()}, {y.max()}]")
    return np.ascontiguousarray(x, np.float32), y.astype(np.int64)


def audit(oracle: Any, x: np.ndarray, y: np.ndarray, suite: Suite | str, *, seed: int,
          progress: Callable[[ProgressEvent], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          package_info: dict | None = None,
          sources: Mapping[str, Any] | None = None,
          class_names: list[str] | None = None,
          example_ids: np.ndarray | None = None) -> Report:
    """Run ``suite`` (a Suite, preset name or suite file) on ``oracle`` and return a Report.

    ``example_ids``: the global index of each row of ``x`` (default ``0..N-1``); it keys the
    per-example random streams and selects the check subset (global index < checks.max_examples).
    """
    try:
        suite = get_suite(suite)
    except SuiteError as exc:
        raise AuditError(str(exc)) from None
    x, y = _validate(oracle, x, y)
    gids = np.arange(len(x)) if example_ids is None else np.asarray(example_ids, np.int64).reshape(-1)
    if len(gids) != len(x) or len(np.unique(gids)) != len(gids) or (len(gids) and gids.min() < 0):
        raise AuditError(f"example_ids: expected {len(x)} distinct non-negative indices")
    if suite.max_examples is not None:
        x, y, gids = x[: suite.max_examples], y[: suite.max_examples], gids[: suite.max_examples]
    n = len(x)
    plan = AD.AdaptivePlan(oracle, suite, has_gradients(oracle))  # BPDA surrogate family (issue 25)
    est_g, est_q = suite.estimate_cost(n, len(plan.members))
    if suite.max_gradients is not None and est_g > suite.max_gradients:
        raise AuditBudgetExceeded(f"suite {suite.name!r} may need {est_g} gradient examples for {n} inputs; "
                                  f"budget is {suite.max_gradients}")
    if suite.max_queries is not None and est_q > suite.max_queries:
        raise AuditBudgetExceeded(f"suite {suite.name!r} may need {est_q} query examples for {n} inputs; "
                                  f"budget is {suite.max_queries}")
    grads_ok = has_gradients(oracle)
    jobs = suite.jobs()
    for spec, _ in jobs:
        if is_evaluator(spec.attack):
            continue
        if REGISTRY[spec.attack].capabilities.needs_gradients and not grads_ok:
            raise AuditError(f"attack {spec.display!r} needs loss_grad but the oracle offers logits only")
    if package_info is None and callable(getattr(oracle, "describe", None)):
        package_info = oracle.describe()
    budget = Budget(suite.max_gradients, suite.max_queries)
    cfg = suite.checks
    chk = np.flatnonzero(gids < cfg.max_examples) if cfg.enabled else np.arange(0)
    m_checks = len(chk)
    check_units = 0
    if cfg.enabled:
        noise_in_suite = any(s.attack == "noise" and s.eps is None for s in suite.attacks)
        check_units = m_checks * ((3 if grads_ok else 0) + (0 if noise_in_suite else len(suite.eps)))
    cal_rows = np.flatnonzero(gids < cfg.max_examples) if plan else np.arange(0)
    units_total = n * len(jobs) + check_units + plan.calibration_units(len(cal_rows))
    t0 = time.perf_counter()
    state = {"units": 0}
    worst: dict[float, np.ndarray] = {}
    worst_labels: dict[float, list[str]] = {}

    def emit(label: str, eps: float, done: int, total: int) -> None:
        if progress is None:
            return
        units = min(state["units"] + done, units_total)
        el = time.perf_counter() - t0
        eta = el / units * (units_total - units) if units else None
        ra = float(worst[eps].mean()) if eps in worst else None
        progress(ProgressEvent(attack=label, eps=float(eps), examples_done=int(done), examples_total=int(total),
                               units_done=int(units), units_total=int(units_total), robust_accuracy_so_far=ra,
                               eta_s=eta, gradients_used=int(budget.gradients)))

    attack_oracle = AD.maybe_eot(oracle)  # EOT for a randomized model (none is, today)

    def run_attack(attack, xs, ys, rng, label, eps, target=None, src_oracle=attack_oracle, units=True):
        try:
            res = attack.run(src_oracle, xs, ys, rng=rng, target=target, budget=budget,
                             should_stop=should_stop,
                             on_batch=lambda d, t: emit(label, eps, d, t))
        except Stopped as exc:
            raise AuditCancelled(f"audit cancelled during {label} at ε={eps:g}: {exc}") from None
        except BudgetExceeded as exc:
            raise AuditBudgetExceeded(f"{label} at ε={eps:g}: {exc}") from None
        state["units"] += len(xs) if units else 0  # later surrogate members: survivors of the first
        return res

    try:
        budget.spend(queries=n)
    except BudgetExceeded as exc:
        raise AuditBudgetExceeded(f"clean pass: {exc}") from None
    clean_logits = np.concatenate([oracle.logits(x[i:i + suite.batch_size]) for i in range(0, n, suite.batch_size)])
    clean_pred = clean_logits.argmax(1)
    correct = clean_pred == y
    clean_acc = float(correct.mean())
    headline_eps = suite.headline
    plan.calibrate(build("pgd", eps=headline_eps, steps=cfg.steps, batch_size=suite.batch_size),
                   x[cal_rows], y[cal_rows], correct[cal_rows], gids[cal_rows], seed, run_attack)
    results: list[dict[str, Any]] = []
    samples: dict[tuple[str, float], dict[str, np.ndarray]] = {}
    k_img = min(n, max(suite.n_images, N_SPECTRUM))
    certs: list[tuple[str, CE.CertifyResult]] = []
    outcomes: dict[str, Any] = {"example_ids": gids.copy(), "y": y.copy(), "clean_pred": clean_pred.copy(),
                                "results": [], "checks": {}}

    for i, (spec, eps) in enumerate(jobs):
        rng = ExampleRNG.for_examples([seed, i], gids)
        params = dict(spec.params)
        if is_evaluator(spec.attack):
            certs.append((spec.display, _run_certify(oracle, x, y, spec, eps, suite, budget, should_stop,
                                                     lambda d, t, lab=spec.display, e=eps: emit(lab, e, d, t))))
            state["units"] += n
            continue
        cls = REGISTRY[spec.attack]
        if cls.capabilities.needs_source:
            params["source"] = _resolve_source(params, sources)
            try:
                params["attack"] = _inner_attack(params, eps)
            except (AttackError, KeyError) as exc:
                raise AuditError(f"attack {spec.display!r}: bad inner attack ({exc})") from None
            params.pop("attack_params", None)
        target = None
        if params.get("targeted") and not cls.capabilities.targeted:
            raise AuditError(f"attack {spec.display!r}: {spec.attack} has no targeted variant")
        if params.get("targeted"):
            target = (y + 1 + rng.integers(0, oracle.num_classes - 1, size=n)) % oracle.num_classes
        try:
            attack = build(spec.attack, **{"batch_size": suite.batch_size, **params, "eps": eps})
        except AttackError as exc:
            raise AuditError(f"attack {spec.display!r}: {exc}") from None
        idx = np.arange(n)
        on_survivors = suite.cascade and spec.eps is None and eps in worst
        if on_survivors:
            idx = np.flatnonzero(worst[eps])
        tally = None
        if len(idx):
            if plan.applies(attack):
                res, tally = plan.run(attack, x, y, target, idx, rng, seed, i, gids, run_attack, spec.display,
                                      eps, spec.eps is None)
            else:
                res = run_attack(attack, x[idx], y[idx], rng.rows(idx), spec.display, eps,
                                 target[idx] if target is not None else None)
                plan.record(spec.display, eps, idx, res.success & (y[idx] == clean_pred[idx]), spec.eps is None)
            adv_pred = clean_pred.copy()
            adv_pred[idx] = res.pred
            x_adv = x.copy()
            x_adv[idx] = res.x_adv
            q, g, wall = res.queries, res.gradients, res.wall_s
        else:
            adv_pred, x_adv, q, g, wall = clean_pred.copy(), x.copy(), 0, 0, 0.0
        state["units"] += n - len(idx)  # cascade: examples skipped count as done
        met = attack_metrics(x, y, clean_pred, x_adv, adv_pred, target)
        outcomes["results"].append({"adv_pred": adv_pred, "l2": l2_dissimilarity(x, x_adv), "target": target,
                                    "attacked": idx, "queries": int(q), "gradients": int(g)})
        rmask = correct & (adv_pred == y)
        if spec.eps is None:
            worst[eps] = worst.get(eps, correct) & rmask
            worst_labels.setdefault(eps, []).append(spec.display)
        results.append({
            "attack": spec.attack, "label": spec.display, "eps": float(eps),
            "fixed_eps": spec.eps is not None, "on_survivors": bool(on_survivors),
            "targeted": bool(params.get("targeted", False)), "params": attack.params(),
            "seed": [int(seed), i], **met.to_dict(),
            "robust_accuracy": float(rmask.mean()) if not on_survivors else float(worst[eps].mean()),
            "examples_attacked": len(idx), "queries": int(q), "gradients": int(g), "wall_s": float(wall),
        } | ({"surrogates": tally} if tally is not None else {}))
        if abs(eps - headline_eps) < 1e-9 or spec.eps is not None:
            samples[(spec.display, float(eps))] = {"x_adv": x_adv[:k_img].copy(), "pred": adv_pred[:k_img].copy()}
        log.info("%s ε=%g robust accuracy %.3f (%d gradients, %d queries, %.1fs)",
                 spec.display, eps, results[-1]["robust_accuracy"], g, q, wall)

    worst_case = [{"eps": float(e), "robust_accuracy": float(worst[e].mean()), "attacks": worst_labels[e],
                   "robust_mask": [int(v) for v in worst[e]], **plan.broken_by(e, correct)} for e in sorted(worst)]
    head = next((w for w in worst_case if abs(w["eps"] - headline_eps) < 1e-9), None)
    headline = {"eps": headline_eps, "robust_accuracy": head["robust_accuracy"] if head else None}

    check_results = run_checks(oracle, x[chk], y[chk], suite, results, seed, grads_ok,
                                run_attack, gids[chk], outcomes["checks"], plan.best) if cfg.enabled else []
    if plan:
        check_results.append(plan.check(cfg.tolerance))
    outcomes["check_rows"] = chk
    outcomes["certify"] = certs
    certified = None
    if any(is_evaluator(s.attack) for s in suite.attacks):
        manifest = getattr(oracle, "manifest", None)
        bounds_meta = manifest.get("bounds") if isinstance(manifest, Mapping) else None
        method = bounds_meta.get("method") if isinstance(bounds_meta, Mapping) else None
        certified = CE.section(certs, worst_case, results, method)
        check_results.append(C.check_certified_le_empirical(certified, results, worst_case))
    state["units"] = units_total - n
    emit("done", headline_eps, n, n)
    report = Report(
        seed=int(seed), suite=suite.to_dict(), package=dict(package_info or {}), n_examples=n,
        clean_accuracy=clean_acc, results=results, worst_case=worst_case, headline=headline,
        checks=[c.to_dict() for c in check_results],
        totals={"gradients": int(budget.gradients), "queries": int(budget.queries),
                "wall_s": time.perf_counter() - t0},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        class_names=list(class_names) if class_names is not None else None,
        seeds={"audit": int(seed), "jobs": "numpy.random.default_rng([seed, job_index, example_index])",
               "checks": "numpy.random.default_rng([seed, 1000 + k, example_index])"},
        x_samples=x[:k_img].copy(), y_samples=y[:k_img].copy(), clean_pred_samples=clean_pred[:k_img].copy(),
        samples=samples, certified=certified, outcomes=outcomes, adaptive=plan.section(),
    )
    return report


def _run_certify(oracle, x, y, spec: AttackSpec, eps: float, suite: Suite, budget: Budget, should_stop,
                 on_batch) -> CE.CertifyResult:
    try:
        cert = CE.build(eps=eps, **{"batch_size": suite.batch_size, **dict(spec.params)})
    except AttackError as exc:
        raise AuditError(f"{spec.display!r}: {exc}") from None
    try:
        res = cert.run(oracle, x, y, budget=budget, should_stop=should_stop, on_batch=on_batch)
    except Stopped as exc:
        raise AuditCancelled(f"audit cancelled during {spec.display} at ε={eps:g}: {exc}") from None
    except BudgetExceeded as exc:
        raise AuditBudgetExceeded(f"{spec.display} at ε={eps:g}: {exc}") from None
    if res.status == "ok":
        log.info("%s ε=%g certified accuracy %.3f%s (%d queries, %.1fs)", spec.display, eps,
                 res.certified_accuracy or 0.0,
                 "" if res.unstable_fraction is None else f", unstable activations {res.unstable_fraction:.4f}",
                 res.queries, res.wall_s)
    else:
        log.info("%s ε=%g skipped: %s", spec.display, eps, res.reason)
    return res
