"""The public audit API: suites, progress, cancellation, budgets, reproducibility, torch-free."""
from __future__ import annotations

import json
import textwrap

import pytest

from dcs.robustness.attacks.toy_oracles import ArrayOracle
from dcs.robustness.audit import (
    AuditBudgetExceeded,
    AuditCancelled,
    AuditError,
    ProgressEvent,
    audit,
)
from dcs.robustness.report import strip_nondeterministic
from dcs.robustness.suites import PRESETS, AttackSpec, Suite, SuiteError, get_suite, load_suite
from dcs.robustness.testing import fit_mlp, load_digits_nchw
from tests.torchless import run_without_torch


@pytest.fixture(scope="module")
def setup():
    xtr, ytr, xte, yte = load_digits_nchw()
    return ArrayOracle(fit_mlp(xtr, ytr, 10), 10, (1, 8, 8)), xte[:100], yte[:100]


def test_same_seed_same_numbers(setup):
    oracle, x, y = setup
    a = audit(oracle, x, y, "quick", seed=5).to_dict()
    b = audit(oracle, x, y, "quick", seed=5).to_dict()
    assert strip_nondeterministic(a) == strip_nondeterministic(b)
    c = audit(oracle, x, y, "quick", seed=6).to_dict()
    assert strip_nondeterministic(a) != strip_nondeterministic(c)
    assert a["seed"] == 5 and a["schema_version"] == "1.0"
    json.dumps(a)  # serialisable


def test_report_contents(setup):
    oracle, x, y = setup
    rep = audit(oracle, x, y, "quick", seed=0, package_info={"name": "m", "sha256": "abc"})
    d = rep.to_dict()
    assert d["package"]["sha256"] == "abc"
    suite = PRESETS["quick"]
    assert len(d["results"]) == len(suite.eps) * len(suite.attacks)
    for w in d["worst_case"]:
        per = [r["robust_accuracy"] for r in d["results"] if r["eps"] == w["eps"]]
        assert w["robust_accuracy"] <= min(per) + 1e-12
        assert len(w["robust_mask"]) == len(x)
    assert d["headline"]["eps"] == suite.headline
    for r in d["results"]:
        assert r["robust_accuracy"] <= d["clean_accuracy"]
        assert r["gradients"] >= 0 and r["queries"] > 0


def test_progress_events_and_cancel(setup):
    oracle, x, y = setup
    events: list[ProgressEvent] = []
    audit(oracle, x, y, "quick", seed=0, progress=events.append)
    assert events and all(isinstance(e, ProgressEvent) for e in events)
    units = [e.units_done for e in events]
    assert units == sorted(units) and units[-1] == events[-1].units_total
    assert events[-1].gradients_used > 0
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(AuditCancelled):
        audit(oracle, x, y, "quick", seed=0, should_stop=stop)


def test_limits_examples_and_budget(setup):
    oracle, x, y = setup
    rep = audit(oracle, x, y, get_suite("quick").replace(max_examples=20), seed=0)
    assert rep.n_examples == 20
    with pytest.raises(AuditBudgetExceeded):
        audit(oracle, x, y, get_suite("quick").replace(max_gradients=1000), seed=0)
    g, q = get_suite("quick").estimate_cost(len(x))
    rep = audit(oracle, x, y, get_suite("quick").replace(max_gradients=g, max_queries=q), seed=0)
    assert rep.totals["gradients"] <= g and rep.totals["queries"] <= q


def test_bad_inputs_are_named(setup):
    oracle, x, y = setup
    with pytest.raises(AuditError, match="shape"):
        audit(oracle, x[:, 0], y, "quick", seed=0)
    with pytest.raises(AuditError, match="unknown suite"):
        audit(oracle, x, y, "nope", seed=0)
    with pytest.raises(AuditError, match=r"\[0, 1\]"):
        audit(oracle, x * 2, y, "quick", seed=0)


def test_cascade_and_transfer(setup, tmp_path):
    oracle, x, y = setup
    from dcs.robustness.testing import digits_package

    src_dir, _ = digits_package(tmp_path, name="src", seed=4)
    suite = Suite(name="c", eps=(0.1,), cascade=True, attacks=(
        AttackSpec("fgsm"), AttackSpec("pgd", {"steps": 5}),
        AttackSpec("transfer", {"source": str(src_dir)}, label="transfer")))
    d = audit(oracle, x, y, suite, seed=0).to_dict()
    pgd = next(r for r in d["results"] if r["attack"] == "pgd")
    fgsm = next(r for r in d["results"] if r["attack"] == "fgsm")
    assert pgd["on_survivors"] and pgd["examples_attacked"] == round(fgsm["robust_accuracy"] * len(x))
    assert d["worst_case"][0]["robust_accuracy"] == d["results"][-1]["robust_accuracy"]


def test_suite_files(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent("""
        eps: [0.05, 0.1]
        max_examples: 10
        attacks:
          - fgsm
          - {attack: pgd, params: {steps: 3}, label: PGD-3}
          - {attack: rp2, eps: 1.0, params: {steps: 2}}
        checks: false
    """))
    s = load_suite(p)
    assert s.name == "s" and s.eps == (0.05, 0.1) and not s.checks.enabled
    assert [j[1] for j in s.jobs()] == [0.05, 0.05, 0.1, 0.1, 1.0]
    j = tmp_path / "s.json"
    j.write_text(json.dumps(s.to_dict()))
    assert get_suite(str(j)).to_dict() == s.to_dict()
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"attacks": [{"attack": "pgdx"}]}))
    with pytest.raises(SuiteError, match="pgdx"):
        load_suite(bad)
    bad.write_text(json.dumps({"attacks": ["pgd"], "epz": [0.1]}))
    with pytest.raises(SuiteError, match="epz"):
        load_suite(bad)
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.estimate_cost(10)[0] > 0


def test_robustness_imports_without_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import dcs.robustness, dcs.robustness.attacks, dcs.robustness.audit, dcs.robustness.checks
        import dcs.robustness.metrics, dcs.robustness.suites, dcs.robustness.report
        import dcs.robustness.report.plots, dcs.robustness.report.html
        import dcs.robustness.package, dcs.robustness.attacks.toy_oracles
        import dcs.training.commands.evaluate, dcs.training.commands.compare
        from dcs.robustness.attacks.toy_oracles import ArrayOracle
        from dcs.robustness.testing import fit_mlp  # (sklearn's digits would pull scipy's torch probe)
        from dcs.robustness.report import write_report
        rng = np.random.default_rng(0)
        x = rng.random((40, 1, 8, 8), dtype=np.float32)
        y = (x.reshape(40, -1).mean(1) > 0.5).astype(np.int64) + 2 * (x[:, 0, 0, 0] > 0.5)
        o = ArrayOracle(fit_mlp(x, y, 4, steps=50), 4, (1, 8, 8))
        rep = dcs.robustness.audit.audit(o, x, y, "quick", seed=0)
        write_report(rep, {str(tmp_path)!r})
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr


def test_attack_params_may_set_batch_size_but_not_eps():
    import numpy as np

    from dcs.robustness.suites import CheckConfig

    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8), dtype=np.float32)
    y = (x.reshape(20, -1).mean(1) > 0.5).astype(np.int64)
    oracle = ArrayOracle(fit_mlp(x, y, 2, steps=20), 2, (1, 8, 8))
    suite = Suite(name="bs", attacks=(AttackSpec("pgd", {"steps": 3, "batch_size": 7}),),
                  eps=(0.1,), checks=CheckConfig(enabled=False))
    assert audit(oracle, x, y, suite, seed=0).to_dict()["results"][0]["n"] == 20
    with pytest.raises(SuiteError, match="eps"):
        Suite(name="e", attacks=(AttackSpec("pgd", {"eps": 0.5}),), eps=(0.1,))
