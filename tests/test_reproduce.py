"""``dcs.training.reproduce``: the train → export → evaluate pipeline behind ``dcs reproduce``.

The fast test runs the ``tiny`` preset (8x8 digits, 1 epoch, 12 examples) for a polarizing row
(both gradient twins) and the BlurNet baseline (Tables B and C), then runs it again and checks
that every step comes from the cache. The slow test runs the ``quick`` preset end to end.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from dcs.training.reproduce import ReproduceError, load_preset, reproduce, select_rows
from dcs.training.reproduce_presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_presets_are_data_and_rows_select():
    quick, full = load_preset("quick"), load_preset("full")
    ids = [r["id"] for r in quick["rows"]]
    assert ids == [r["id"] for r in full["rows"]]  # same rows, same pipeline
    assert {"A-fmnist-none", "A-fmnist-advtrain", "A-fmnist-pfe", "A-mnist5k-pfe", "B-baseline",
            "B-learned-3", "B-tv-1e-05"} <= set(ids)
    pfe = next(r for r in quick["rows"] if r["id"] == "A-fmnist-pfe")
    assert pfe["twins"] == ["bpda", "bpda-st", "exact"]  # adaptive, straight-through only (issue 25), no BPDA
    alphas = {r["id"]: r["train"]["alpha"] for r in quick["rows"] if r["id"].startswith("B-learned")}
    assert alphas == {"B-learned-3": 1e-5, "B-learned-5": 0.1, "B-learned-7": 0.1}
    assert full["table_a"]["pgd_paper"] == {"steps": 100, "restarts": 20, "step_ratio": 0.1}
    json.dumps(full)  # presets are JSON data
    assert [r["id"] for r in select_rows(quick, ["B-tv"])] == ["B-baseline", "B-tv-0.0001", "B-tv-1e-05"]
    with pytest.raises(ReproduceError, match="no such row"):
        select_rows(quick, ["Z-nothing"])


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_committed_results_keep_their_training_cache_keys(preset: str):
    """Options added since results/<preset>/ was made (ε warm-up, certified training, the
    adversarial-training surrogate) must not change the key of a row that does not use them."""
    from dcs.training.reproduce_steps import resolved_train_config, train_key

    p = PRESETS[preset]()
    steps = json.loads((REPO / "results" / preset / "steps.json").read_text())["steps"]
    committed = {s["row"]: s["key"] for s in steps if s["step"] == "train"}
    fresh = {r["id"]: train_key(resolved_train_config(r, p["seed"], p["threads"])) for r in p["rows"]}
    assert committed and {k: fresh[k] for k in committed} == committed


def test_tiny_pipeline_writes_results_and_caches(tmp_path: Path):
    preset = load_preset("tiny")
    only = ["A-digits-pfe", "B-baseline"]
    res = reproduce(preset, tmp_path / "results", tmp_path / "work", only)
    out = tmp_path / "results" / "tiny"
    assert res.out == out
    kinds = sorted(s["step"] for s in res.steps)
    assert kinds == sorted(["train", "export:bpda", "export:exact", "eval:A:bpda", "eval:A:exact",
                            "train", "export:bpda", "eval:B"])
    assert not any(s["cached"] for s in res.steps)
    # tables, configs, sha256s
    tables = json.loads((out / "tables.json").read_text())
    grads = {r["gradient"] for r in tables["table_a"]}
    assert grads == {"with BPDA, adaptive", "without BPDA (true zero gradient)"}
    for r in tables["table_a"]:
        assert 0 <= r["worst_case"] <= min(r[c] for c in ("FGSM", "BIM", "PGD (paper)", "APGD-CE")) <= r["clean"]
        assert r["checks"]  # gradient-masking checks ran
    (b,) = tables["table_b"]
    assert b["rp2"]["avg"] is not None and b["transfer"]["rp2"]["avg"] is not None
    md = (out / "tables.md").read_text()
    assert "Table A" in md and "Table B" in md and "Table C" in md and "without BPDA" in md
    for name in ("preset.json", "A-digits-pfe.train.json", "A-digits-pfe.bpda.suite.json", "B-baseline.train.json"):
        assert (out / "configs" / name).is_file(), name
    packages = json.loads((out / "packages.json").read_text())
    assert set(packages) == {"A-digits-pfe:bpda", "A-digits-pfe:exact", "B-baseline"}
    for rec in packages.values():
        assert all(len(h) == 64 for h in rec["files"].values())
    exact = packages["A-digits-pfe:exact"]["gradient"]
    assert exact["kind"] == "exact" and exact["masked_layers"]
    assert packages["A-digits-pfe:bpda"]["gradient"]["kind"] == "bpda"
    # same model graph, different twins
    assert packages["A-digits-pfe:exact"]["files"]["model.onnx"] == packages["A-digits-pfe:bpda"]["files"]["model.onnx"]
    assert packages["A-digits-pfe:exact"]["files"]["model.grad.onnx"] != packages["A-digits-pfe:bpda"]["files"]["model.grad.onnx"]
    figs = {p.name for p in (out / "figures").iterdir()}
    assert {"accuracy_vs_eps_digits.png", "polarization_digits.png", "spectra_B-baseline.png",
            "filters_A-digits-pfe.png", "certified_vs_empirical_digits.png"} <= figs
    # second run: every step reused, same numbers
    again = reproduce(preset, tmp_path / "results", tmp_path / "work", only)
    assert len(again.steps) == len(res.steps) and all(s["cached"] for s in again.steps)
    assert json.loads((out / "tables.json").read_text())["table_a"] == tables["table_a"]
    steps = json.loads((out / "steps.json").read_text())
    assert all(s["cached"] for s in steps["steps"])
    assert all(s["compute_seconds"] is not None for s in steps["steps"])
    # an interrupted evaluation (no summary.json yet) is redone, and only it
    ev = next(s for s in res.steps if s["step"] == "eval:A:exact")
    (Path(ev["path"]) / "summary.json").unlink()
    third = reproduce(preset, tmp_path / "results", tmp_path / "work", only)
    assert [s["step"] for s in third.steps if not s["cached"]] == ["eval:A:exact"]
    assert json.loads((out / "tables.json").read_text())["table_a"] == tables["table_a"]


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path: Path):
    """The committed results/quick come from this run (about 15 min on 2 idle cores)."""
    res = reproduce(load_preset("quick"), tmp_path / "results", tmp_path / "work")
    tables = json.loads((res.out / "tables.json").read_text())
    assert len(tables["table_a"]) == 8 and len(tables["table_b"]) == 11
    by = {(r["row"], r["twin"]): r for r in tables["table_a"]}
    # without BPDA the front end looks (falsely) more robust than with BPDA
    for ds in ("fmnist", "mnist5k"):
        assert by[(f"A-{ds}-pfe", "exact")]["worst_case"] >= by[(f"A-{ds}-pfe", "bpda")]["worst_case"]
        assert by[(f"A-{ds}-none", "bpda")]["clean"] > 0.7
