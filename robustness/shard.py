"""Sharded evaluation: split a test set into ``n`` shards and merge shard reports exactly.

Shard semantics (``dcs evaluate --shard i/n``): after ``--limit``, the test set has ``N``
examples; shard ``i`` (0 ≤ i < n ≤ N) is the contiguous range ``[⌊i·N/n⌋, ⌊(i+1)·N/n⌋)`` of
global example indices. The shards partition ``0..N-1``.

Exactness: ``dcs.robustness.audit`` draws every example's random numbers from
``default_rng([seed, job, global_index])`` (``ExampleRNG``), targets included, so a shard computes
for each of its examples exactly what the unsharded run computes for it (given an oracle whose
per-example output does not depend on the batch it came in, true of the ONNX packages here).
A shard report carries, besides its own (shard-local) numbers, a ``shard`` section: the shard,
its example indices, the dataset and the per-example outcomes: labels, clean predictions, and per
result row the adversarial predictions, L2 dissimilarities and targets; per-row query/gradient
counts stay in the rows and are summed (each example's count does not depend on its batch).

Checks: the extra check runs (large-ε PGD, PGD with more steps, noise) run on the examples whose
global index is below ``checks.max_examples``; each shard runs them on its part of that subset
and records the per-example predictions. ``merge_shards`` recomputes every metric, the
per-example worst case, the headline and all checks from the merged per-example data, so the
merged report equals the unsharded one (``strip_nondeterministic``; only ``created_at`` and
``wall_s`` differ; ``wall_s`` is the sum over shards). The check lines printed in a shard report
are about that shard alone.

Certify (``dcs.robustness.certify``): each shard certifies its examples and records per ε the
per-example certified flags and margin lower bounds and its unstable-activation count;
``merge_shards`` rebuilds the ``certified`` section with ``certify.section`` and re-runs the
``certified_le_empirical`` check on the merged data.

Not reproduced: the HTML's example images/spectra in a merged report (shards keep no
adversarial images, so the merged report.html has tables and accuracy plots only).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from dcs.robustness import checks as C
from dcs.robustness.metrics import metrics_from_outcomes
from dcs.robustness.report.schema import Report

_SHARD_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


class ShardError(ValueError):
    """A bad shard spec or a set of shard reports that cannot be merged; one-line message."""


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' → (i, n) with 0 ≤ i < n."""
    m = _SHARD_RE.match(str(text))
    if not m:
        raise ShardError(f"--shard {text!r}: expected I/N such as 0/4 (shard I of N, counting from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ShardError(f"--shard {text!r}: N must be at least 1")
    if not 0 <= i < n:
        raise ShardError(f"--shard {text!r}: I must satisfy 0 <= I < N (I={i}, N={n})")
    return i, n


def shard_range(index: int, count: int, n_total: int) -> tuple[int, int]:
    """Half-open range of global example indices of shard ``index`` of ``count`` over ``n_total``."""
    if count > n_total:
        raise ShardError(f"--shard {index}/{count}: only {n_total} examples, so at most {n_total} shards")
    return index * n_total // count, (index + 1) * n_total // count


def _ints(a) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]


def shard_section(report: Report, index: int, count: int, n_total: int, dataset: str) -> dict[str, Any]:
    """The JSON ``shard`` section for a report made by ``audit(..., example_ids=...)``."""
    o = report.outcomes
    if o is None:
        raise ShardError("the report carries no per-example outcomes")
    chk = np.asarray(o.get("check_rows", np.arange(0)), np.int64)
    return {
        "index": int(index), "count": int(count), "n_total": int(n_total), "dataset": str(dataset),
        "example_indices": _ints(o["example_ids"]),
        "outcomes": {
            "y": _ints(o["y"]), "clean_pred": _ints(o["clean_pred"]),
            "results": [{"adv_pred": _ints(r["adv_pred"]), "l2": [float(v) for v in r["l2"]],
                         "target": None if r["target"] is None else _ints(r["target"])}
                        for r in o["results"]],
            "checks": {"example_indices": _ints(np.asarray(o["example_ids"])[chk]),
                       "preds": {k: _ints(v) for k, v in o["checks"].items()}},
            "certify": [_certify_outcome(label, r) for label, r in o.get("certify", [])],
        },
    }


def _certify_outcome(label: str, r) -> dict[str, Any]:
    frac, act = r.unstable_fraction, int(r.activations)
    return {"label": label, "eps": float(r.eps), "status": r.status, "reason": r.reason,
            "certified": _ints(r.certified), "margin_lower": [float(v) for v in r.margin_lower],
            "unstable": None if frac is None else round(frac * act), "activations": act,
            "threshold": r.threshold, "threshold_source": r.threshold_source,
            "queries": int(r.queries), "wall_s": float(r.wall_s)}


def _same(docs: Sequence[tuple[str, Mapping]], what: str, get) -> None:
    first_path, first = docs[0]
    want = get(first)
    for path, d in docs[1:]:
        if get(d) != want:
            raise ShardError(f"{path} and {first_path} have different {what}; shards must come from one run")


def merge_shards(docs: Sequence[tuple[str, Mapping]]) -> Report:
    """Merge shard report dicts ``[(path, dict)]`` into the unsharded run's ``Report``."""
    from dcs.robustness.check_runs import checks_from_predictions
    from dcs.robustness.suites import Suite

    if not docs:
        raise ShardError("no shard reports given")
    for path, d in docs:
        if not isinstance(d.get("shard"), Mapping):
            raise ShardError(f"{path}: not a shard report (no 'shard' section; write it with dcs evaluate --shard)")
    _same(docs, "package sha256", lambda d: (d["package"].get("sha256"), d["package"].get("grad_sha256")))
    _same(docs, "package name/version", lambda d: (d["package"].get("name"), d["package"].get("version")))
    _same(docs, "suites", lambda d: d["suite"])
    _same(docs, "seeds", lambda d: d["seed"])
    _same(docs, "datasets", lambda d: d["shard"]["dataset"])
    _same(docs, "example counts (n_total)", lambda d: d["shard"]["n_total"])
    _same(docs, "shard counts", lambda d: d["shard"]["count"])
    _same(docs, "schema versions", lambda d: d.get("schema_version"))
    _same(docs, "class names", lambda d: d.get("class_names"))
    _same(docs, "result rows", lambda d: [(r["label"], r["eps"]) for r in d["results"]])
    count, n_total = int(docs[0][1]["shard"]["count"]), int(docs[0][1]["shard"]["n_total"])
    by_index: dict[int, str] = {}
    owner = np.full(n_total, -1)
    for k, (path, d) in enumerate(docs):
        i = int(d["shard"]["index"])
        if i in by_index:
            raise ShardError(f"overlapping shards: {by_index[i]} and {path} are both shard {i}/{count}")
        by_index[i] = path
        ids = np.asarray(d["shard"]["example_indices"], np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= n_total):
            raise ShardError(f"{path}: example indices outside 0..{n_total - 1}")
        clash = ids[owner[ids] >= 0] if len(ids) else ids
        if len(clash):
            raise ShardError(f"overlapping shards: {docs[owner[clash[0]]][0]} and {path} both hold example {clash[0]}")
        owner[ids] = k
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ShardError(f"missing shard(s) {', '.join(f'{i}/{count}' for i in missing)}: "
                         f"got {len(by_index)} of {count}")
    if (owner < 0).any():
        raise ShardError(f"missing examples: {int((owner < 0).sum())} of {n_total} (first {int(np.argmax(owner < 0))}) "
                         "are in no shard")
    docs = sorted(docs, key=lambda pd: int(pd[1]["shard"]["index"]))
    first = docs[0][1]
    suite = Suite.from_dict(first["suite"])

    def gather(get, dtype) -> np.ndarray:
        out = np.zeros(n_total, dtype)
        for _, d in docs:
            out[np.asarray(d["shard"]["example_indices"], np.int64)] = np.asarray(get(d), dtype)
        return out

    def oc(d: Mapping) -> Mapping:
        return d["shard"]["outcomes"]

    y = gather(lambda d: oc(d)["y"], np.int64)
    clean_pred = gather(lambda d: oc(d)["clean_pred"], np.int64)
    correct = clean_pred == y
    worst: dict[float, np.ndarray] = {}
    worst_labels: dict[float, list[str]] = {}
    results = []
    for j, row0 in enumerate(first["results"]):
        eps = float(row0["eps"])
        adv_pred = gather(lambda d, j=j: oc(d)["results"][j]["adv_pred"], np.int64)
        l2 = gather(lambda d, j=j: oc(d)["results"][j]["l2"], np.float64)
        target = None
        if oc(first)["results"][j]["target"] is not None:
            target = gather(lambda d, j=j: oc(d)["results"][j]["target"], np.int64)
        met = metrics_from_outcomes(y, clean_pred, adv_pred, l2, target)
        rmask = correct & (adv_pred == y)
        if not row0["fixed_eps"]:
            worst[eps] = worst.get(eps, correct) & rmask
            worst_labels.setdefault(eps, []).append(row0["label"])
        row = dict(row0)
        row.update(met.to_dict())
        row["robust_accuracy"] = float(rmask.mean()) if not row0["on_survivors"] else float(worst[eps].mean())
        for key in ("examples_attacked", "queries", "gradients"):
            row[key] = int(sum(d["results"][j][key] for _, d in docs))
        row["wall_s"] = float(sum(d["results"][j]["wall_s"] for _, d in docs))
        results.append(row)
    worst_case = [{"eps": float(e), "robust_accuracy": float(worst[e].mean()), "attacks": worst_labels[e],
                   "robust_mask": [int(v) for v in worst[e]]} for e in sorted(worst)]
    headline_eps = first["headline"]["eps"]
    head = next((w for w in worst_case if abs(w["eps"] - headline_eps) < 1e-9), None)
    headline = {"eps": headline_eps, "robust_accuracy": head["robust_accuracy"] if head else None}
    checks: list[dict] = []
    if suite.checks.enabled:
        chk_ids = np.sort(np.concatenate([np.asarray(oc(d)["checks"]["example_indices"], np.int64)
                                          for _, d in docs]))
        pos = {int(g): k for k, g in enumerate(chk_ids)}
        preds: dict[str, np.ndarray] = {}
        for path, d in docs:
            ids = oc(d)["checks"]["example_indices"]
            if not ids:
                continue
            for key, vals in oc(d)["checks"]["preds"].items():
                arr = preds.setdefault(key, np.full(len(chk_ids), -1, np.int64))
                arr[[pos[int(g)] for g in ids]] = vals
        incomplete = [k for k, v in preds.items() if (v < 0).any()]
        if incomplete:
            raise ShardError(f"check runs {incomplete} are missing from some shards")
        checks = [c.to_dict() for c in checks_from_predictions(suite, results, y[chk_ids], preds)]
    certified = None
    if first.get("certified") is not None:
        certified = _merge_certified(docs, gather, worst_case, results)
        checks.append(C.check_certified_le_empirical(certified, results, worst_case).to_dict())
    totals = {k: int(sum(d["totals"][k] for _, d in docs)) for k in ("gradients", "queries")}
    totals["wall_s"] = float(sum(d["totals"]["wall_s"] for _, d in docs))
    return Report(
        seed=int(first["seed"]), suite=first["suite"], package=dict(first["package"]), n_examples=n_total,
        clean_accuracy=float(correct.mean()), results=results, worst_case=worst_case, headline=headline,
        checks=checks, totals=totals, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        class_names=first.get("class_names"), seeds=dict(first.get("seeds") or {}),
        schema_version=first.get("schema_version"), certified=certified,
    )


def _merge_certified(docs, gather, worst_case, results) -> dict[str, Any]:
    """The ``certified`` section from the shards' per-example certify outcomes (``certify.section``)."""
    from dcs.robustness import certify as CE

    first = docs[0][1]
    certs = []
    for j, c0 in enumerate(first["shard"]["outcomes"]["certify"]):
        parts = [d["shard"]["outcomes"]["certify"][j] for _, d in docs]
        status = {p["status"] for p in parts}
        if len(status) > 1:
            raise ShardError(f"certify at ε={c0['eps']:g} ran on some shards and was skipped on others")
        if status != {"ok"}:
            certs.append((c0["label"], CE.CertifyResult(eps=c0["eps"], status=c0["status"], reason=c0["reason"])))
            continue
        act = sum(p["activations"] for p in parts)
        unstable = sum(p["unstable"] or 0 for p in parts)
        with_c = next((p for p in parts if p["threshold"] is not None), None)
        certs.append((c0["label"], CE.CertifyResult(
            eps=c0["eps"], status="ok",
            certified=gather(lambda d, j=j: d["shard"]["outcomes"]["certify"][j]["certified"], bool),
            margin_lower=gather(lambda d, j=j: d["shard"]["outcomes"]["certify"][j]["margin_lower"], np.float64),
            unstable_fraction=unstable / act if act else None, activations=act,
            threshold=with_c["threshold"] if act and with_c else None,
            threshold_source=with_c["threshold_source"] if act and with_c else None,
            queries=sum(p["queries"] for p in parts), wall_s=sum(p["wall_s"] for p in parts))))
    return CE.section(certs, worst_case, results, first["certified"].get("method"))
