"""Evaluation steps of ``dcs reproduce``: Table A (the audit engine on each package) and Tables
B and C (RP2 and PGD per target class, and transfer of the baseline's examples), each cached like
the other steps (``dcs.training.reproduce_steps``) under ``eval/<row>-<key>/summary.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dcs.robustness.manifest import atomic_write_json
from dcs.training.reproduce_steps import CODE_VERSION, Steps, config_hash, load_data


def _open(path: Path, threads: int):
    from dcs.robustness.package import SessionOptions, load_package

    return load_package(path, SessionOptions(device="cpu", intra_op_threads=threads))


# ------------------------------------------------------------------------------------------- table A
def table_a_suite(settings: dict, dataset: str, batch_size: int):
    from dcs.robustness.suites import AttackSpec, CheckConfig, Suite

    eps = tuple(float(e) for e in settings["eps"][dataset])
    head = float(settings["headline"][dataset])
    p = settings["pgd_paper"]
    attacks = [
        AttackSpec("fgsm", dict(settings["fgsm"]), label="FGSM"),
        AttackSpec("bim", dict(settings["bim"]), label="BIM"),
        AttackSpec("pgd", dict(settings["pgd_sweep"]), label="PGD"),
        AttackSpec("apgd-ce", dict(settings["apgd_ce"]), label="APGD-CE"),
        AttackSpec("apgd-dlr", dict(settings["apgd_dlr"]), label="APGD-DLR"),
        AttackSpec("square", dict(settings["square"]), label="Square"),
        AttackSpec("noise", {}, label="Noise"),
        AttackSpec("pgd", {"steps": p["steps"], "restarts": p["restarts"], "step_size": p["step_ratio"] * head},
                   eps=head, label="PGD (paper)"),
    ]
    if settings.get("certify"):
        attacks.append(AttackSpec("certify", {}, label="Certified"))
    return Suite(name=f"reproduce-{dataset}", attacks=tuple(attacks), eps=eps, headline_eps=head,
                 batch_size=batch_size, checks=CheckConfig(**settings["checks"]))


def summarize_a(report) -> dict:
    """Clean, per-attack and worst-case robust accuracy at the headline ε, the ε curves, checks."""
    head = report.headline["eps"]
    out = report.outcomes
    y, clean_pred = out["y"], out["clean_pred"]
    correct = clean_pred == y
    worst = correct.copy()
    cols: dict[str, float] = {}
    for r, o in zip(report.results, out["results"]):
        if abs(r["eps"] - head) > 1e-9:
            continue
        robust = correct & (o["adv_pred"] == y)
        cols[r["label"]] = float(robust.mean())
        if r["label"] != "Noise":
            worst &= robust
    curves: dict[str, list] = {}
    for r in report.results:
        if not r["fixed_eps"]:
            curves.setdefault(r["label"], []).append([r["eps"], r["robust_accuracy"]])
    curves["worst case"] = [[w["eps"], w["robust_accuracy"]] for w in report.worst_case]
    d = report.to_dict()
    return {"clean": float(report.clean_accuracy), "headline_eps": head, "columns": cols,
            "worst_case": float(worst.mean()), "curves": curves, "n": int(report.n_examples),
            "checks": [{"name": c["name"], "status": c["status"], "detail": c["detail"]} for c in d["checks"]],
            "certified": d.get("certified"), "package": d.get("package"), "adaptive": d.get("adaptive")}


def eval_a_step(row: dict, twin: str, pkg_path: Path, export_key: str, preset: dict, work: Path,
                steps: Steps, data_cache: dict) -> dict:
    from dcs.robustness.audit import audit
    from dcs.robustness.report import write_report

    ds = row["dataset"]
    settings = preset["table_a"]
    suite = table_a_suite(settings, ds, preset["batch_size_eval"])
    if twin == "bpda-st":  # the pre-issue-25 protocol: straight-through only
        suite = suite.replace(adaptive=False)
    n = int(settings["n_examples"])
    key = config_hash({"pkg": export_key, "suite": suite.to_dict(), "n": n, "seed": preset["seed"],
                       "code": CODE_VERSION})
    out = work / "eval" / f"{row['id']}-{twin}-{key}"
    t0 = time.perf_counter()
    if (out / "summary.json").is_file():
        steps.add(f"eval:A:{twin}", row["id"], key, True, 0.0, str(out))
        return json.loads((out / "summary.json").read_text())
    data = load_data(ds, None, n, data_cache)
    pkg = _open(pkg_path, preset["threads"])
    rep = audit(pkg, data.x_test[:n], data.y_test[:n], suite, seed=preset["seed"], package_info=pkg.describe(),
                class_names=list(data.class_names))
    out.mkdir(parents=True, exist_ok=True)
    write_report(rep, out, oracle=pkg)
    summary = {**summarize_a(rep), "suite": suite.to_dict(), "twin": twin, "row": row["id"]}
    atomic_write_json(out / "summary.json", summary)
    steps.add(f"eval:A:{twin}", row["id"], key, False, time.perf_counter() - t0, str(out))
    return summary


# ----------------------------------------------------------------------------------------- tables B, C
def _targeted(attack, oracle, x, y, targets, seed: int, job: int):
    """Run ``attack`` once per target class t on the examples with y != t; per t: (idx, x_adv, pred)."""
    from dcs.robustness.attacks.rng import ExampleRNG

    out = {}
    for t in targets:
        idx = np.flatnonzero(y != t)
        tgt = np.full(len(idx), t, np.int64)
        rng = ExampleRNG.for_examples([seed, job, int(t)], idx)
        res = attack.run(oracle, x[idx], y[idx], rng=rng, target=tgt)
        out[int(t)] = (idx, res.x_adv, res.logits.argmax(1))
    return out


def targeted_asr(y: np.ndarray, clean_pred: np.ndarray, per_target: dict, x: np.ndarray) -> dict:
    """BlurNet's numbers over target classes: ASR_t = among examples correctly classified with
    y != t, the fraction now classified as t; average and worst (max) over t; mean L2 dissimilarity
    ‖x−x_adv‖₂/‖x_adv‖₂ over the successful examples (None when none succeeded)."""
    from dcs.robustness.metrics import l2_dissimilarity

    asr, l2s = {}, []
    for t, (idx, x_adv, pred) in per_target.items():
        ok = clean_pred[idx] == y[idx]
        if not ok.any():
            continue
        hit = ok & (pred == t)
        asr[int(t)] = float(np.mean(pred[ok] == t))
        if hit.any():
            l2s.append(l2_dissimilarity(x[idx][hit], x_adv[hit]))
    vals = list(asr.values())
    return {"avg": float(np.mean(vals)) if vals else None, "worst": float(np.max(vals)) if vals else None,
            "per_target": asr, "l2": float(np.concatenate(l2s).mean()) if l2s else None}


def _attacks_b(settings: dict, batch: int):
    from dcs.robustness.attacks import build

    rp2 = build("rp2", eps=1.0, batch_size=batch, targeted=True, **settings["rp2"])
    pgd = build("pgd", eps=float(settings["eps_pgd"]), batch_size=batch, targeted=True, **settings["pgd"])
    return rp2, pgd


def eval_b_step(row: dict, pkg_path: Path, export_key: str, preset: dict, work: Path, steps: Steps,
                data_cache: dict, source: dict | None) -> dict:
    """White-box RP2 and PGD per target class; transfer of the baseline's examples (``source``:
    the baseline's eval folder; None for the baseline itself, which crafts them)."""
    settings = preset["table_b"]
    n = int(settings["n_examples"])
    key = config_hash({"pkg": export_key, "settings": settings, "n": n, "seed": preset["seed"],
                       "source": None if source is None else source["key"], "code": CODE_VERSION})
    out = work / "eval" / f"{row['id']}-{key}"
    t0 = time.perf_counter()
    if (out / "summary.json").is_file():
        steps.add("eval:B", row["id"], key, True, 0.0, str(out))
        return json.loads((out / "summary.json").read_text())
    data = load_data(row["dataset"], None, n, data_cache)
    x, y = data.x_test[:n], data.y_test[:n]
    pkg = _open(pkg_path, preset["threads"])
    clean_pred = np.concatenate([pkg.logits(x[i:i + 256]) for i in range(0, n, 256)]).argmax(1)
    rp2, pgd = _attacks_b(settings, preset["batch_size_eval"])
    targets = [int(t) for t in settings["targets"] if t < pkg.num_classes]
    res_rp2 = _targeted(rp2, pkg, x, y, targets, preset["seed"], 1)
    res_pgd = _targeted(pgd, pkg, x, y, targets, preset["seed"], 2)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"row": row["id"], "key": key, "n": n, "clean": float(np.mean(clean_pred == y)),
               "rp2": targeted_asr(y, clean_pred, res_rp2, x), "pgd": targeted_asr(y, clean_pred, res_pgd, x),
               "targets": targets, "rp2_params": rp2.params(), "pgd_params": pgd.params()}
    if source is None:  # the baseline: keep its adversarial examples for the transfer table
        np.savez_compressed(out / "transfer.npz", **{f"{a}_{t}": v[1] for a, r in (("rp2", res_rp2), ("pgd", res_pgd))
                                                     for t, v in r.items()})
        summary["transfer"] = {"rp2": summary["rp2"], "pgd": summary["pgd"], "note": "white-box (source model)"}
    else:
        blob = np.load(Path(source["path"]) / "transfer.npz")
        tr = {}
        for a in ("rp2", "pgd"):
            per = {}
            for t in targets:
                idx = np.flatnonzero(y != t)
                xa = blob[f"{a}_{t}"]
                per[t] = (idx, xa, np.concatenate([pkg.logits(xa[i:i + 256]) for i in range(0, len(xa), 256)]).argmax(1))
            tr[a] = targeted_asr(y, clean_pred, per, x)
        summary["transfer"] = tr
    # spectra inputs: clean vs PGD (first target) images and first-layer maps
    t0_ = targets[0]
    idx, xa, _ = res_pgd[t0_]
    k = min(32, len(idx))
    spec = {"x": x[idx[:k]], "x_adv": xa[:k]}
    if pkg.has_probe:
        spec["feat"] = pkg.probe(spec["x"])["features"]
        spec["feat_adv"] = pkg.probe(spec["x_adv"])["features"]
        spec["weights"] = pkg.probe(spec["x"][:1])["weights"]
    np.savez_compressed(out / "spectra.npz", **spec)
    atomic_write_json(out / "summary.json", summary)
    steps.add("eval:B", row["id"], key, False, time.perf_counter() - t0, str(out))
    return summary
