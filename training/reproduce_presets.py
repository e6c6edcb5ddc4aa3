"""Reproduction presets as named data (``dcs reproduce --preset NAME``).

A preset is a plain JSON-able mapping (so ``results/<preset>/preset.json`` is the exact input and
``dcs reproduce --preset results/<preset>/preset.json`` regenerates every number from it):

* ``rows``: one entry per table row: ``id``, ``table`` ("A" or "B"), ``label``, ``train`` (flat
  ``TrainConfig`` keys, see ``training/config.py``) and, for Table A, ``twins`` (the gradient
  twins to attack: "bpda" and, for the polarizing front end, also "exact" = "without BPDA").
* ``table_a``: per dataset the ε sweep and headline ε; the attack settings (steps, restarts,
  queries) and the number of test examples attacked.
* ``table_b``: examples, target classes, RP2 and ℓ∞-PGD settings (white-box and transfer).
* ``reduced``: what the preset reduces relative to the papers, one sentence each (copied into
  ``results/<preset>/README.md``).

Defaults that are not listed come from ``TrainConfig`` (the papers' values, DESIGN.md §8).
"""
from __future__ import annotations

import copy
from typing import Any

#: BlurNet's L∞ weights per learned kernel size (its table): 3x3 1e-5, 5x5 0.1, 7x7 0.1.
BLURNET_ALPHA = {3: 1e-5, 5: 0.1, 7: 0.1}
EPS = {"fmnist": 0.1, "mnist5k": 0.3}


def _table_a_rows(datasets: dict[str, dict], *, epochs: dict[str, dict], adv: dict[str, dict],
                  pfe: dict[str, dict]) -> list[dict]:
    rows = []
    for ds, common in datasets.items():
        name = "Fashion-MNIST" if ds == "fmnist" else ("MNIST-5k" if ds == "mnist5k" else ds)
        rows.append({"id": f"A-{ds}-none", "table": "A", "dataset": ds, "label": f"{name}: no defense",
                     "twins": ["bpda"], "train": {**common, "defense": "none", **epochs[ds]}})
        rows.append({"id": f"A-{ds}-advtrain", "table": "A", "dataset": ds,
                     "label": f"{name}: PGD adversarial training", "twins": ["bpda"],
                     "train": {**common, "defense": "advtrain", **adv[ds]}})
        rows.append({"id": f"A-{ds}-pfe", "table": "A", "dataset": ds, "label": f"{name}: polarizing front end",
                     "twins": ["bpda", "bpda-st", "exact"], "train": {**common, "defense": "pfe", **pfe[ds]}})
    return rows


def _table_b_rows(common: dict) -> list[dict]:
    base = {**common, "arch": "lisa_cnn"}
    spec: list[tuple[str, str, dict]] = [("baseline", "baseline (no blur)", {"defense": "none"})]
    spec += [(f"blur-input-{k}", f"fixed {k}x{k} blur on input", {"defense": "blur_input", "blur_kernel": k})
             for k in (3, 5)]
    spec += [(f"blur-conv1-{k}", f"fixed {k}x{k} blur after conv1", {"defense": "blur_conv1", "blur_kernel": k})
             for k in (3, 5, 7)]
    spec += [(f"learned-{k}", f"learned {k}x{k} depthwise, L∞ α={BLURNET_ALPHA[k]:g}",
              {"defense": "learned_blur", "blur_kernel": k, "alpha": BLURNET_ALPHA[k]}) for k in (3, 5, 7)]
    spec += [(f"tv-{a:g}", f"TV regularizer α={a:g}", {"defense": "tv", "tv_alpha": a}) for a in (1e-4, 1e-5)]
    return [{"id": f"B-{rid}", "table": "B", "dataset": common["dataset"], "label": label,
             "train": {**base, **extra}} for rid, label, extra in spec]


def _quick() -> dict[str, Any]:
    fm = {"dataset": "fmnist", "limit_train": 6000, "limit_test": 2000}
    mn = {"dataset": "mnist5k"}
    rows = _table_a_rows(
        {"fmnist": fm, "mnist5k": mn},
        epochs={"fmnist": {"epochs": 3}, "mnist5k": {"epochs": 5}},
        adv={"fmnist": {"epochs": 3, "adv_steps": 7}, "mnist5k": {"epochs": 5, "adv_steps": 7}},
        pfe={"fmnist": {"pfe_stages": [2, 2, 1], "pfe_lambda": 5.0},
             "mnist5k": {"pfe_stages": [3, 3, 2], "pfe_lambda": 5.0}})
    rows += _table_b_rows({**fm, "epochs": 3})
    return {
        "name": "quick",
        "description": "same pipeline as 'full' with reduced data, epochs and attack budgets (< 15 min on 2 idle cores)",
        "seed": 0, "threads": 2, "batch_size_eval": 128,
        "rows": rows,
        "table_a": {
            "n_examples": 100,
            "eps": {"fmnist": [0.05, 0.1, 0.2, 0.3], "mnist5k": [0.1, 0.2, 0.3, 0.4]},
            "headline": dict(EPS),
            "fgsm": {}, "bim": {"steps": 10},
            "pgd_sweep": {"steps": 10, "restarts": 1},
            "pgd_paper": {"steps": 20, "restarts": 2, "step_ratio": 0.1},
            "apgd_ce": {"steps": 20}, "apgd_dlr": {"steps": 20}, "square": {"n_queries": 200},
            "certify": True,
            "checks": {"steps": 10, "more_steps_factor": 2, "more_restarts": 2, "max_examples": 50},
        },
        "table_b": {
            "n_examples": 50, "targets": list(range(10)), "eps_pgd": 0.1,
            "rp2": {"steps": 30, "lr": 0.1, "lam": 0.02, "n_transforms": 1},
            "pgd": {"steps": 10},
        },
        "reduced": [
            "Fashion-MNIST: the first 6,000 training images (paper 60,000) and 2,000 test images for the training log.",
            ("Epochs: no defense / adversarial training 3 (F-MNIST) or 5 (MNIST-5k) (paper 60); PFE stages 2+2+1 "
            "(F-MNIST) and 3+3+2 (MNIST-5k) epochs (paper 20+20+20); BlurNet rows 3 epochs."),
            ("PFE regularizer weight λ=5 (paper 1): too few steps for λ=1 to polarize the front end "
            "(training/RESULTS.md)."),
            "Adversarial training: PGD with 7 steps, step 2.5ε/7 (Madry 40 steps).",
            ("Table A: 100 test examples; PGD(paper) 20 steps of ε/10 with 2 restarts (paper 100 steps, 20 restarts); "
            "sweep attacks 10–20 steps; Square 200 queries; 4 ε values per curve (paper 0..0.38 by 0.02)."),
            ("Table B/C: 50 test examples per target class; RP2 30 Adam steps with 1 transform sample per step "
            "(published 300–1000 steps); PGD 10 steps."),
        ],
    }


def _full() -> dict[str, Any]:
    fm = {"dataset": "fmnist"}
    mn = {"dataset": "mnist5k"}
    rows = _table_a_rows(
        {"fmnist": fm, "mnist5k": mn},
        epochs={"fmnist": {"epochs": 20}, "mnist5k": {"epochs": 30}},
        adv={"fmnist": {"epochs": 12, "adv_steps": 10},
             "mnist5k": {"epochs": 20, "adv_steps": 10, "adv_eps_warmup": 5}},
        pfe={"fmnist": {"pfe_stages": [20, 20, 20]}, "mnist5k": {"pfe_stages": [20, 20, 20]}})
    rows += _table_b_rows({**fm, "epochs": 5})
    return {
        "name": "full",
        "description": ("full Fashion-MNIST / MNIST-5k training at reduced epochs and paper-strength attacks; "
                        "about 2 h on 2 idle CPU cores; reductions listed in 'reduced'"),
        "seed": 0, "threads": 2, "batch_size_eval": 128,
        "rows": rows,
        "table_a": {
            "n_examples": 300,
            "eps": {"fmnist": [0.02, 0.06, 0.1, 0.14, 0.2, 0.3], "mnist5k": [0.06, 0.14, 0.22, 0.3, 0.38]},
            "headline": dict(EPS),
            "fgsm": {}, "bim": {"steps": 50},
            "pgd_sweep": {"steps": 20, "restarts": 1},
            "pgd_paper": {"steps": 100, "restarts": 20, "step_ratio": 0.1},
            "apgd_ce": {"steps": 50}, "apgd_dlr": {"steps": 50}, "square": {"n_queries": 500},
            "certify": True,
            "checks": {"steps": 20, "more_steps_factor": 4, "more_restarts": 2, "max_examples": 100},
        },
        "table_b": {
            "n_examples": 100, "targets": list(range(10)), "eps_pgd": 0.1,
            "rp2": {"steps": 100, "lr": 0.1, "lam": 0.02, "n_transforms": 1},
            "pgd": {"steps": 20},
        },
        "reduced": [
            ("Epochs: no defense 20 (F-MNIST) / 30 (MNIST-5k) (paper 60); PFE the paper's 20+20+20 with λ=1; "
            "lr/10 for the last sixth of each run as in the paper."),
            ("Adversarial training: 12 epochs of 10-step PGD on F-MNIST, 20 epochs of 10-step PGD on MNIST-5k "
            "(ε ramped from 0 over the first 5 epochs: without it training at ε=0.3 sat at chance) "
            "(Madry: 40 steps, the paper 60 epochs): the published schedule alone would take about a day on 2 cores."),
            ("Table A: 300 test examples (paper 10,000); PGD(paper) as published (100 steps of ε/10, 20 restarts, "
            "per-example best) at the headline ε; sweeps with BIM-50, PGD-20, APGD-CE/DLR-50 and Square-500 over "
            "6 (F-MNIST) / 5 (MNIST-5k) ε values instead of the paper's 19."),
            ("Table B/C: BlurNet rows trained 5 epochs on Fashion-MNIST (BlurNet trains "
            "LISA-CNN on LISA); 100 test examples, every target class; RP2 100 Adam steps with 1 transform sample "
            "(published 300–1000); PGD 20 steps."),
        ],
    }


def _tiny() -> dict[str, Any]:
    """The fast test's configuration: 8x8 digits, 1 epoch, a handful of examples."""
    dg = {"dataset": "digits", "limit_train": 200, "batch_size": 32}
    rows = [
        {"id": "A-digits-none", "table": "A", "dataset": "digits", "label": "digits: no defense",
         "twins": ["bpda"], "train": {**dg, "defense": "none", "epochs": 1}},
        {"id": "A-digits-pfe", "table": "A", "dataset": "digits", "label": "digits: polarizing front end",
         "twins": ["bpda", "exact"], "train": {**dg, "defense": "pfe", "pfe_stages": [1, 0, 0], "pfe_filters": 4}},
        {"id": "B-baseline", "table": "B", "dataset": "digits", "label": "baseline (no blur)",
         "train": {**dg, "arch": "lisa_cnn", "defense": "none", "epochs": 1}},
        {"id": "B-blur-conv1-3", "table": "B", "dataset": "digits", "label": "fixed 3x3 blur after conv1",
         "train": {**dg, "arch": "lisa_cnn", "defense": "blur_conv1", "blur_kernel": 3, "epochs": 1}},
    ]
    return {
        "name": "tiny", "description": "test configuration (8x8 digits)", "seed": 0, "threads": 1,
        "batch_size_eval": 64, "rows": rows,
        "table_a": {"n_examples": 12, "eps": {"digits": [0.1, 0.3]}, "headline": {"digits": 0.1},
                    "fgsm": {}, "bim": {"steps": 2}, "pgd_sweep": {"steps": 2, "restarts": 1},
                    "pgd_paper": {"steps": 2, "restarts": 1, "step_ratio": 0.1}, "apgd_ce": {"steps": 2},
                    "apgd_dlr": {"steps": 2}, "square": {"n_queries": 5}, "certify": True,
                    "checks": {"steps": 2, "more_steps_factor": 1, "more_restarts": 1, "max_examples": 6}},
        "table_b": {"n_examples": 12, "targets": [0, 1], "eps_pgd": 0.1,
                    "rp2": {"steps": 2, "lr": 0.1, "lam": 0.02, "n_transforms": 1}, "pgd": {"steps": 2}},
        "reduced": ["everything: this is a plumbing test, not a reproduction"],
    }


PRESETS = {"quick": _quick, "full": _full, "tiny": _tiny}


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name`` (KeyError when unknown)."""
    return copy.deepcopy(PRESETS[name]())
