"""The ``Report`` object returned by ``dcs.robustness.audit.audit`` and its versioned JSON form.

report.json schema (``schema_version`` "1.0"): top-level keys
``schema_version, created_at, seed, seeds, package, suite, n_examples, class_names,
clean_accuracy, headline, results, worst_case, checks, totals, certified``.

* ``results``: one entry per (attack, ε): ``attack`` (registry name), ``label``, ``eps``,
  ``fixed_eps`` (bool), ``on_survivors`` (cascade mode), ``targeted``, ``params``, ``seed``
  (the job's seed words), ``n``, ``clean_accuracy``, ``robust_accuracy``,
  ``attack_success_rate``, ``mean_l2_dissimilarity``, ``queries``, ``gradients``, ``wall_s``.
* ``worst_case``: per swept ε: ``eps``, ``robust_accuracy`` (robust to every attack),
  ``attacks`` (labels included), ``robust_mask`` (per-example 0/1, input order).
* ``headline``: ``{"eps", "robust_accuracy"}``, the worst case at the suite's headline ε.
* ``checks``: ``[{"name", "status": pass|warn|skip, "detail"}]``.
* ``totals``: ``gradients``, ``queries`` (examples), ``wall_s``.
* ``certified`` (added in 1.0 without a version bump: readers treat a missing key as null): null
  when the suite has no ``certify`` entry, else ``status`` ("ok" | "skipped"), ``reason`` (why it
  was skipped, else null), ``method`` (the manifest's bounds method, "ibp"), ``margin``
  ("interval": plain logit-interval margins) and ``margin_note``, ``pfe_c`` / ``pfe_c_source``
  (saturation threshold used for the unstable fraction, or null), and ``per_eps``: one entry per
  certified ε with ``eps``, ``label``, ``n``, ``certified_accuracy``,
  ``empirical_robust_accuracy`` (the worst case over attacks at that ε, else the lowest attack
  row at that ε, else null), ``interval`` ([certified, empirical]: the true robust accuracy lies
  inside), ``gap``, ``unstable_fraction`` (polarizing models: fraction of front-end activations
  within ε of ±c; else null), ``activations``, ``mean_margin_lower``, ``certified_mask``
  (per-example 0/1), ``queries``, ``wall_s``. Certification never enters ``results``,
  ``worst_case`` or ``headline``.
* ``adaptive`` (only for models that declare BPDA surrogates, ``dcs.robustness.adaptive``):
  ``members``, ``adaptive`` (the suite's switch), ``used`` (members the gradient attacks ran
  through), ``eot``, ``calibration`` (``members``, ``kept``, ``dropped``, ``attack``, ``eps``,
  ``n``, ``robust_accuracy`` and ``wins`` per member, ``gradients``) and ``note``; then result
  rows of gradient attacks carry ``surrogates`` (per member: examples attacked, broken,
  gradients) and ``worst_case`` entries ``broken_by`` (per example "<attack> @ <surrogate>").
* ``shard`` (only in shard reports, ``dcs evaluate --shard i/n``; see ``dcs.robustness.shard``):
  ``index``, ``count``, ``n_total``, ``dataset``, ``example_indices`` and the per-example
  ``outcomes`` that ``dcs merge`` combines into the unsharded report.
Everything except ``created_at`` and the ``wall_s`` fields is identical for a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = "1.0"
NONDETERMINISTIC_KEYS = ("created_at", "wall_s")


@dataclass
class Report:
    seed: int
    suite: dict[str, Any]
    package: dict[str, Any]
    n_examples: int
    clean_accuracy: float
    results: list[dict[str, Any]]
    worst_case: list[dict[str, Any]]
    headline: dict[str, Any]
    checks: list[dict[str, Any]]
    totals: dict[str, Any]
    created_at: str
    class_names: list[str] | None = None
    seeds: dict[str, Any] = field(default_factory=dict)
    # Not serialised: a few clean/adversarial examples for the HTML plots.
    x_samples: np.ndarray | None = None
    y_samples: np.ndarray | None = None
    clean_pred_samples: np.ndarray | None = None
    samples: dict[tuple[str, float], dict[str, np.ndarray]] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION
    certified: dict[str, Any] | None = None
    # Not serialised: per-example outcomes from ``audit`` (what ``dcs.robustness.shard`` keeps).
    outcomes: dict[str, Any] | None = None
    # Serialised only when set: a shard report's ``shard`` section (``dcs evaluate --shard``).
    shard: dict[str, Any] | None = None
    # Serialised only when set: the adaptive (BPDA surrogate family) section.
    adaptive: dict[str, Any] | None = None

    def result(self, label: str, eps: float) -> dict[str, Any] | None:
        for r in self.results:
            if r["label"] == label and abs(r["eps"] - eps) < 1e-9:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "created_at": self.created_at,
            "seed": self.seed, "seeds": self.seeds, "package": self.package, "suite": self.suite,
            "n_examples": self.n_examples, "class_names": self.class_names,
            "clean_accuracy": self.clean_accuracy, "headline": self.headline,
            "results": self.results, "worst_case": self.worst_case, "checks": self.checks,
            "totals": self.totals, "certified": self.certified,
        } | ({"shard": self.shard} if self.shard is not None else {}) \
          | ({"adaptive": self.adaptive} if self.adaptive is not None else {})


def strip_nondeterministic(d: Any) -> Any:
    """The report dict without timestamps and timings (for reproducibility comparisons)."""
    if isinstance(d, dict):
        return {k: strip_nondeterministic(v) for k, v in d.items() if k not in NONDETERMINISTIC_KEYS}
    if isinstance(d, list):
        return [strip_nondeterministic(v) for v in d]
    return d
