"""Certified robust accuracy from interval logit bounds (issue 13; torch-free).

Attacks give an *upper* bound on robust accuracy; ``certify`` gives a *lower* bound that no
attack can break, from the package's bounds twin ``model.bounds.onnx`` (``pkg.logit_bounds(x, ε)
-> (lo, hi)``: sound interval bounds on every logit over the ℓ∞ ball of radius ε around x,
clipped to [0, 1]; interval bound propagation, see ``training/export/bounds.py``).

Certification rule
------------------
An example (x, y) is *certified* at ε when its true-class lower bound beats every other class's
upper bound::

    margin_lower = lo[y] − max_{j≠y} hi[j] > tol,   tol = margin_tol · max(1, max_j |lo_j|, |hi_j|)

``tol`` (default 1e-5, relative) absorbs the float32 disagreement between the bounds graph and
``model.onnx`` (the soundness tests allow 1e-5), so a certified example cannot be "broken" by
rounding alone. These are *plain interval margins*: the bounds graph exports logit intervals
only, not a margin lower bound with the last linear layer folded into the class difference
(the tighter variant issue 13 mentions). When a package adds such an output, use it here; until
then the margins are looser than they could be, never unsound. At ε = 0 the bounds equal the
logits, so certified accuracy equals clean accuracy (up to examples whose top-2 logit gap is
within ``tol``).

Unstable front-end activations (polarizing models)
--------------------------------------------------
For a polarizing front end, the probe's ``z`` holds the ℓ1-normalized first-layer activations
before saturation s(z) = ½(sign(z−c) + sign(z+c)). By Hölder, ``|wᵀe|/‖w‖₁ ≤ ‖e‖∞ ≤ ε``, so z moves
by at most ε and s(z) can change only where ``| |z| − c | ≤ ε``: the *unstable* activations. Their
fraction (over examples × filters × positions) is reported per ε; it is non-decreasing in ε. The
threshold c comes from the manifest's ``defense.pfe_c`` (or ``defense.params.pfe_c``); an
exported package with ``pfe_c: null`` was built with the model builder's default
(``DEFAULT_PFE_C`` = ``dcs.training.models.DEFAULT_C`` = 0.25), which is used and reported as such.

``certify`` is *not an attack*: it never enters the per-example worst case or the headline robust
accuracy. ``dcs.robustness.audit`` runs it for suite entries named ``certify`` and puts its numbers in
the report's ``certified`` section, next to the attacks' empirical robust accuracy: the true
robust accuracy lies in [certified, empirical].

Methods (issue 27)
------------------
``method="ibp"`` (default) uses the interval margins above. ``method="crown"`` also runs the
package's ``model.crown.onnx`` (``pkg.margin_bounds(x, y, ε) -> [N, K]`` lower bounds on
logit_y − logit_j from a backward linear relaxation, ``training/export/crown.py``) and takes, per
class j, the larger of the CROWN and the interval lower bound, so a CROWN-certified set always
contains the IBP-certified one (same ``tol``, computed from the interval bounds). A package
exported before issue 27 has no crown graph: ``method="crown"`` is then *skipped* with a reason
naming the missing file (no silent fallback to IBP; re-export the package to get it).
A crown pass is charged ``CROWN_QUERY_COST`` queries per example (its backward sweep carries K
specification rows: about ten forward passes for ten classes).

Cost: per ε, one pass through the bounds graph (about 2–3 forward passes) and, for polarizing
models, one probe pass, for every example. Both count as queries against a suite's budget.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from dcs.robustness.attacks.base import AttackError, Budget, Capabilities, Stopped

NAME = "certify"
#: training.models.DEFAULT_C: the saturation threshold a pfe model is built with when
#: ``pfe_c`` is null (a torch-free copy; tests/test_certify.py checks they agree).
DEFAULT_PFE_C = 0.25
METHODS = ("ibp", "crown")
#: queries charged per example for one pass through ``model.crown.onnx``
CROWN_QUERY_COST = 10


class CertifyError(AttackError):
    """Bad certify parameters."""


@dataclass
class CertifyResult:
    """Outcome of one certification at one ε. Arrays are per example, in input order.

    status: "ok" or "skipped" (then ``reason`` says why and the arrays are empty).
    certified: bool [N]. margin_lower: float64 [N], lo[y] − max_{j≠y} hi[j].
    unstable_fraction: fraction of front-end activations with | |z| − c | ≤ ε (polarizing
    models), else None. activations: how many activations that fraction is over.
    queries: examples sent to ``logit_bounds`` plus ``probe``.
    """

    eps: float
    status: str
    reason: str | None = None
    certified: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    margin_lower: np.ndarray = field(default_factory=lambda: np.zeros(0))
    unstable_fraction: float | None = None
    activations: int = 0
    threshold: float | None = None
    threshold_source: str | None = None
    queries: int = 0
    wall_s: float = 0.0
    method: str = "ibp"

    @property
    def certified_accuracy(self) -> float | None:
        return float(self.certified.mean()) if self.status == "ok" and len(self.certified) else None


def _graph_unavailable(oracle: Any, call: str, flag: str, missing: str, prefix: str = "") -> str | None:
    """None when ``oracle`` has the callable ``call`` and ``flag`` set, else why not
    (``missing``: what the package then lacks, with the user's way out)."""
    if not callable(getattr(oracle, call, None)):
        return f"{prefix}the oracle ({type(oracle).__name__}) has no {call}"
    if not getattr(oracle, flag, False):
        path = getattr(oracle, "path", None)
        where = f" at {path}" if path is not None else ""
        return f"{prefix}the package{where} has no {missing}"
    return None


def bounds_unavailable(oracle: Any) -> str | None:
    """None when ``oracle`` offers sound logit bounds, else the reason it does not."""
    return _graph_unavailable(oracle, "logit_bounds", "has_bounds", "model.bounds.onnx (exported without "
                              "bounds, or loaded with load_bounds=False)")


def crown_unavailable(oracle: Any) -> str | None:
    """None when ``oracle`` offers CROWN margin bounds, else the reason it does not."""
    return _graph_unavailable(oracle, "margin_bounds", "has_crown", "model.crown.onnx (exported before "
                              "issue 27 or without bounds); re-export it, or use method=ibp",
                              prefix="method=crown: ")


def saturation_threshold(oracle: Any) -> tuple[float | None, str | None]:
    """(c, source) of a polarizing front end from the oracle's manifest; (None, None) otherwise."""
    manifest = getattr(oracle, "manifest", None)
    if not isinstance(manifest, Mapping):
        return None, None
    defense = manifest.get("defense") or {}
    if not isinstance(defense, Mapping) or defense.get("kind") != "pfe":
        return None, None
    params = defense.get("params") if isinstance(defense.get("params"), Mapping) else {}
    for where, src in (("defense.pfe_c", defense), ("defense.params.pfe_c", params)):
        if src.get("pfe_c") is not None:
            return float(src["pfe_c"]), f"manifest {where}"
    return DEFAULT_PFE_C, "manifest pfe_c is null: the model builder's default"


def margins(lo: np.ndarray, hi: np.ndarray, y: np.ndarray) -> np.ndarray:
    """lo[y] − max_{j≠y} hi[j] per example (float64)."""
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64).copy()
    n = np.arange(len(y))
    hi[n, y] = -np.inf
    return lo[n, y] - hi.max(1)


def best_margins(lo: np.ndarray, hi: np.ndarray, y: np.ndarray, crown: np.ndarray) -> np.ndarray:
    """min_{j≠y} max(crown[j], lo[y] − hi[j]) per example: the tighter of the CROWN and the
    interval lower bound for each class, then the worst class (float64)."""
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    n = np.arange(len(y))
    per_class = np.maximum(np.asarray(crown, np.float64), lo[n, y][:, None] - hi)
    per_class[n, y] = np.inf
    return per_class.min(1)


def certified_mask(lo: np.ndarray, hi: np.ndarray, y: np.ndarray, margin_tol: float = 1e-5) -> np.ndarray:
    """True where the interval margin exceeds ``margin_tol`` · max(1, largest |bound|)."""
    scale = np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)).max(1).astype(np.float64))
    return margins(lo, hi, y) > margin_tol * scale


def unstable_count(z: np.ndarray, c: float, eps: float) -> int:
    """Activations whose saturation s(z) may flip under an ℓ∞ perturbation of size ε."""
    return int(np.count_nonzero(np.abs(np.abs(np.asarray(z, np.float64)) - c) <= eps))


@dataclass(frozen=True)
class Certify:
    """Certified robust accuracy at one ε from the package's interval logit bounds.

    Not an attack (no adversarial examples; never part of the worst case). Threat model: ℓ∞ ball
    of radius ``eps`` ∩ [0, 1], the same as the attacks'.

    eps: ℓ∞ radius in [0, 1] pixel units (default 0.1). batch_size: examples per bounds call
    (default 128). margin_tol: relative slack for the certified margin (default 1e-5, see the
    module docstring). unstable: also compute the polarizing front end's unstable-activation
    fraction when the oracle has a probe with ``z`` (default True). c: saturation threshold
    override (default None: from the manifest).

    Inputs: x float32 [N, *input_shape] in [0, 1], y int [N].
    """

    name: ClassVar[str] = NAME
    capabilities: ClassVar[Capabilities] = Capabilities(needs_gradients=False, iterative=False)

    eps: float = 0.1
    batch_size: int = 128
    margin_tol: float = 1e-5
    unstable: bool = True
    c: float | None = None
    method: str = "ibp"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CertifyError(f"{self.name}: method={self.method!r}, expected one of {', '.join(METHODS)}")
        if not 0.0 <= float(self.eps) <= 1.0:
            raise CertifyError(f"{self.name}: eps={self.eps!r}, expected a number in [0, 1]")
        if int(self.batch_size) < 1:
            raise CertifyError(f"{self.name}: batch_size={self.batch_size!r}, expected >= 1")
        if not 0.0 <= float(self.margin_tol) < 1.0:
            raise CertifyError(f"{self.name}: margin_tol={self.margin_tol!r}, expected in [0, 1)")
        if self.c is not None and not 0.0 < float(self.c) < 1.0:
            raise CertifyError(f"{self.name}: c={self.c!r}, expected in (0, 1) or null")

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def gradient_cost(self, n: int) -> int:
        return 0

    def query_cost(self, n: int) -> int:
        """Worst case: one bounds pass and one probe pass per example (+ a crown pass)."""
        return 2 * n + (CROWN_QUERY_COST * n if self.method == "crown" else 0)

    def run(self, oracle: Any, x: np.ndarray, y: np.ndarray, *, budget: Budget | None = None,
            should_stop: Callable[[], bool] | None = None,
            on_batch: Callable[[int, int], None] | None = None) -> CertifyResult:
        """Certify ``x``/``y``. A package without bounds → ``status="skipped"`` with a reason.

        ``should_stop()`` is polled before each batch (raises ``Stopped``); the budget is charged
        one query per example per bounds or probe pass (raises ``BudgetExceeded``);
        ``on_batch(done, total)`` after each batch.
        """
        eps = float(self.eps)
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if len(x) != len(y):
            raise CertifyError(f"{self.name}: {len(x)} inputs but {len(y)} labels")
        reason = bounds_unavailable(oracle)
        if reason is None and self.method == "crown":
            reason = crown_unavailable(oracle)
        if reason is not None:
            if on_batch is not None:
                on_batch(len(x), len(x))
            return CertifyResult(eps=eps, status="skipped", reason=reason, method=self.method)
        c, c_src = (float(self.c), "suite parameter c") if self.c is not None else saturation_threshold(oracle)
        use_probe = bool(self.unstable and c is not None and getattr(oracle, "has_probe", False))
        start = time.perf_counter()
        cert = np.zeros(len(x), bool)
        marg = np.zeros(len(x))
        unstable = total = queries = 0
        for lo_i in range(0, len(x), int(self.batch_size)):
            if should_stop is not None and should_stop():
                raise Stopped(f"{self.name}: stopped after {lo_i} of {len(x)} examples")
            sl = slice(lo_i, lo_i + int(self.batch_size))
            xb, yb = x[sl], y[sl]
            crown = self.method == "crown"
            if budget is not None:
                budget.spend(queries=len(xb) * ((2 if use_probe else 1) + (CROWN_QUERY_COST if crown else 0)))
            lo, hi = oracle.logit_bounds(xb, eps)
            lo, hi = np.asarray(lo), np.asarray(hi)
            queries += len(xb)
            if crown:
                m_crown = np.asarray(oracle.margin_bounds(xb, yb, eps), np.float64)
                queries += CROWN_QUERY_COST * len(xb)
                marg[sl] = best_margins(lo, hi, yb, m_crown)
                scale = np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)).max(1).astype(np.float64))
                cert[sl] = marg[sl] > float(self.margin_tol) * scale
            else:
                marg[sl] = margins(lo, hi, yb)
                cert[sl] = certified_mask(lo, hi, yb, float(self.margin_tol))
            if use_probe:
                z = oracle.probe(xb).get("z")
                queries += len(xb)
                if z is not None:
                    unstable += unstable_count(z, c, eps)
                    total += int(np.size(z))
            if on_batch is not None:
                on_batch(min(lo_i + int(self.batch_size), len(x)), len(x))
        frac = unstable / total if total else None
        return CertifyResult(eps=eps, status="ok", certified=cert, margin_lower=marg,
                             unstable_fraction=frac, activations=total,
                             threshold=c if total else None, threshold_source=c_src if total else None,
                             queries=queries, wall_s=time.perf_counter() - start, method=self.method)


def build(**params: Any) -> Certify:
    """A fresh ``Certify``; unknown parameters raise CertifyError naming them."""
    known = {f.name for f in dataclasses.fields(Certify)}
    bad = sorted(set(params) - known)
    if bad:
        raise CertifyError(f"{NAME}: unknown parameter(s) {bad}; known: {sorted(known)}")
    return Certify(**params)


#: Non-attack suite members, by name (suites accept these next to ``dcs.robustness.attacks.REGISTRY``).
EVALUATORS: dict[str, type] = {NAME: Certify}


def section(results: list[tuple[str, CertifyResult]], worst_case: list[Mapping[str, Any]],
            rows: list[Mapping[str, Any]], method: str | None) -> dict[str, Any]:
    """The report's ``certified`` section from per-ε results (see ``dcs.robustness.report.schema``)."""
    wc = {round(float(w["eps"]), 9): w for w in worst_case}
    per_eps = []
    skipped = [r for _, r in results if r.status != "ok"]
    for label, r in sorted(results, key=lambda t: t[1].eps):
        if r.status != "ok":
            continue
        key = round(r.eps, 9)
        w = wc.get(key)
        attack_accs = [float(x["robust_accuracy"]) for x in rows if round(float(x["eps"]), 9) == key]
        empirical = float(w["robust_accuracy"]) if w is not None else (min(attack_accs) if attack_accs else None)
        cert = r.certified_accuracy
        per_eps.append({
            "eps": r.eps, "label": label, "method": r.method, "n": len(r.certified), "certified_accuracy": cert,
            "empirical_robust_accuracy": empirical,
            "interval": [cert, empirical] if empirical is not None else [cert, None],
            "gap": None if empirical is None else empirical - cert,
            "unstable_fraction": r.unstable_fraction, "activations": r.activations,
            "mean_margin_lower": float(np.mean(r.margin_lower)) if len(r.margin_lower) else None,
            "certified_mask": [int(v) for v in r.certified],
            "queries": r.queries, "wall_s": r.wall_s,
        })
    first = next((r for _, r in results if r.status == "ok" and r.threshold is not None), None)
    methods = sorted({r.method for _, r in results if r.status == "ok"})
    return {
        "status": "ok" if per_eps else "skipped",
        "reason": skipped[0].reason if skipped and not per_eps else None,
        "method": method,
        "margin": "interval" if methods in ([], ["ibp"]) else "interval+crown",
        "margin_note": "ibp: lo[y] − max_{j≠y} hi[j] from plain logit intervals; crown: per class the "
                       "larger of that and model.crown.onnx's margin lower bound (issue 27)",
        "methods": methods,
        "skipped": [{"method": r.method, "eps": r.eps, "reason": r.reason} for r in skipped],
        "pfe_c": first.threshold if first else None,
        "pfe_c_source": first.threshold_source if first else None,
        "per_eps": per_eps,
    }
