"""Certified audits (issue 13): certify from model.bounds.onnx next to the attacks.

Every report these tests produce goes through ``audited()``, which fails the test when certified
accuracy exceeds any attack's robust accuracy at some ε (or an attack broke a certified example).
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dcs.robustness import checks as C
from dcs.robustness.attacks import REGISTRY, BudgetExceeded, Stopped
from dcs.robustness.attacks.toy_oracles import ArrayOracle
from dcs.robustness.audit import AuditBudgetExceeded, audit
from dcs.robustness.certify import (
    DEFAULT_PFE_C,
    Certify,
    bounds_unavailable,
    certified_mask,
    margins,
)
from dcs.robustness.package import SessionOptions, load_package
from dcs.robustness.report import comparison_table, write_report
from dcs.robustness.report.plots import certified_vs_empirical
from dcs.robustness.suites import PRESETS, AttackSpec, CheckConfig, Suite, SuiteError, known
from dcs.robustness.testing import digits_package, load_digits_nchw

CPU = SessionOptions(device="cpu", intra_op_threads=1)
N = 60


def audited(oracle, x, y, suite, **kw):
    """``audit`` plus the consistency invariant on its report (the issue's "on every report")."""
    rep = audit(oracle, x, y, suite, seed=kw.pop("seed", 0), **kw)
    d = rep.to_dict()
    bad = C.certified_violations(d["certified"], d["results"], d["worst_case"])
    assert not bad, bad
    if d["certified"] is not None:
        check = next(c for c in d["checks"] if c["name"] == C.CERTIFIED_CHECK)
        assert check["status"] in ("pass", "skip"), check
    return rep


def suite(*attacks: AttackSpec, eps=(0.0, 0.01, 0.03, 0.1), checks=False) -> Suite:
    return Suite(name="cert", attacks=attacks, eps=tuple(eps), headline_eps=eps[min(1, len(eps) - 1)],
                 checks=CheckConfig(enabled=checks, steps=5, more_steps_factor=2, max_examples=20))


ATTACKS = (AttackSpec("fgsm", label="FGSM"), AttackSpec("pgd", {"steps": 10}, label="PGD"),
           AttackSpec("square", {"n_queries": 50}, label="Square"), AttackSpec("noise", label="Noise"))


@pytest.fixture(scope="module")
def digits():
    _, _, x, y = load_digits_nchw()
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A trained digits MLP with a hand-built IBP twin (torch-free, ~1 s)."""
    path, _ = digits_package(tmp_path_factory.mktemp("mlp"), name="digits-ibp", bounds=True)
    return load_package(path, CPU)


@pytest.fixture(scope="module")
def no_bounds(digits_repo):
    return load_package(digits_repo / "digits-mlp" / "1", CPU)


@pytest.fixture(scope="module")
def pfe(tmp_path_factory):
    """A real exported polarizing-front-end package (random weights) and inputs labelled by it."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from dcs.training.export.fixtures import export_untrained

    repo = tmp_path_factory.mktemp("pfe-repo")
    res = export_untrained(repo, "pfe", arch="pfe_cnn", defense="pfe", input_shape=(1, 16, 16),
                           num_classes=10, seed=0)
    pkg = load_package(res.path, CPU)
    x = np.random.default_rng(0).random((24, 1, 16, 16), dtype=np.float32)
    return repo, pkg, x, pkg.logits(x).argmax(1)


# -- registry, presets, margins ------------------------------------------------------------------
def test_certify_is_a_suite_member_but_not_an_attack():
    assert "certify" in known() and "certify" not in REGISTRY
    for name in ("standard", "paper"):
        assert any(s.attack == "certify" for s in PRESETS[name].attacks), name
    assert not any(s.attack == "certify" for s in PRESETS["quick"].attacks)
    g, q = suite(AttackSpec("certify")).estimate_cost(10)
    assert g == 10 and q == 10 + 4 * 2 * 10  # clean pass + (bounds + probe) per ε
    with pytest.raises(SuiteError, match="margin_tolx"):
        suite(AttackSpec("certify", {"margin_tolx": 1})).estimate_cost(10)


def test_margin_rule_is_strict_and_uses_every_other_class():
    lo = np.array([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    hi = np.array([[3.0, 1.9, 0.5], [3.0, 1.0, 0.5]])
    y = np.array([0, 0])
    np.testing.assert_allclose(margins(lo, hi, y), [0.1, 0.0])
    assert certified_mask(lo, hi, y).tolist() == [True, False]  # a tie is not certified


# -- engine: a trained model with nontrivial certified accuracy ------------------------------------
def test_certified_never_exceeds_any_attack_and_equals_clean_at_eps0(mlp, digits, tmp_path):
    x, y = digits
    events = []
    s = suite(*ATTACKS, AttackSpec("certify", label="Certified"), checks=True)
    rep = audited(mlp, x, y, s, progress=events.append)
    d = rep.to_dict()
    cert = d["certified"]
    assert cert["status"] == "ok" and cert["method"] == "ibp" and cert["margin"] == "interval"
    by_eps = {c["eps"]: c for c in cert["per_eps"]}
    assert sorted(by_eps) == [0.0, 0.01, 0.03, 0.1]
    assert by_eps[0.0]["certified_accuracy"] == pytest.approx(d["clean_accuracy"])
    accs = [by_eps[e]["certified_accuracy"] for e in sorted(by_eps)]
    assert accs == sorted(accs, reverse=True) and 0 < accs[1] < 1  # nontrivial, shrinks with ε
    for r in d["results"]:  # the invariant, spelled out
        assert by_eps[r["eps"]]["certified_accuracy"] <= r["robust_accuracy"], r["label"]
    for c in cert["per_eps"]:
        assert c["interval"] == [c["certified_accuracy"], c["empirical_robust_accuracy"]]
        assert c["unstable_fraction"] is None  # not a polarizing model
    # certify is not an attack: not in results, worst case or headline
    assert all(r["attack"] != "certify" for r in d["results"])
    assert all("Certified" not in w["attacks"] for w in d["worst_case"])
    check = next(c for c in d["checks"] if c["name"] == C.CERTIFIED_CHECK)
    assert check["status"] == "pass"
    # progress: certify streams per batch like an attack, units stay monotone
    cert_ev = [e for e in events if e.attack == "Certified"]
    assert {e.eps for e in cert_ev} == set(by_eps) and all(e.examples_total == N for e in cert_ev)
    units = [e.units_done for e in events]
    assert units == sorted(units) and events[-1].units_done == events[-1].units_total
    # the strongest adversarial examples the engine found lie inside the bounds
    for (label, e), smp in rep.samples.items():
        k = len(smp["x_adv"])
        lo, hi = mlp.logit_bounds(x[:k], e)
        z = mlp.logits(smp["x_adv"])
        assert (z >= lo - 1e-5).all() and (z <= hi + 1e-5).all(), label
    # reports: JSON section, HTML interval + figure, Markdown column
    js, html = write_report(rep, tmp_path / "r")
    assert json.loads(js.read_text())["certified"]["per_eps"][1]["certified_accuracy"] == accs[1]
    text = html.read_text()
    assert "Certified robustness" in text and "fig-certified_vs_empirical" in text
    table = comparison_table([d, audited(mlp, x, y, suite(*ATTACKS)).to_dict()], eps=0.01)
    header, _, row_cert, row_plain = table.splitlines()[2:6]
    assert header.endswith("| certified |") and row_cert.endswith(f"| {100 * accs[1]:.1f} |")
    assert row_plain.endswith("| — |")
    png = certified_vs_empirical([d, json.loads(js.read_text())], labels=["a", "b"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_unsound_bounds_are_caught_by_the_check(mlp, digits):
    """Bounds that ignore ε (zero width) certify examples the attacks break: the check warns."""

    class IgnoresEps:
        def __init__(self, inner):
            self._inner = inner
            self.has_bounds = True

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def logit_bounds(self, x, eps):
            return self._inner.logit_bounds(x, 0.0)

    x, y = digits
    d = audit(IgnoresEps(mlp), x, y, suite(*ATTACKS, AttackSpec("certify")), seed=0).to_dict()
    bad = C.certified_violations(d["certified"], d["results"], d["worst_case"])
    assert bad and any("broken by an attack" in b for b in bad)
    check = next(c for c in d["checks"] if c["name"] == C.CERTIFIED_CHECK)
    assert check["status"] == "warn" and "unsound" in check["detail"]


def test_budget_and_cancel_cover_certify(mlp, digits):
    x, y = digits
    c = Certify(eps=0.01, batch_size=16)
    with pytest.raises(Stopped):
        c.run(mlp, x, y, should_stop=lambda: True)
    from dcs.robustness.attacks import Budget

    with pytest.raises(BudgetExceeded):
        c.run(mlp, x, y, budget=Budget(max_queries=20))
    s = suite(AttackSpec("certify"), eps=(0.01,))
    _, q = s.estimate_cost(N)
    with pytest.raises(AuditBudgetExceeded):
        audit(mlp, x, y, s.replace(max_queries=q - 1), seed=0)
    done = []
    res = c.run(mlp, x, y, on_batch=lambda a, b: done.append((a, b)))
    assert done == [(16, N), (32, N), (48, N), (N, N)] and res.queries == N


# -- skip with a reason -------------------------------------------------------------------------
def test_package_without_bounds_is_skipped_with_a_reason(no_bounds, digits, tmp_path):
    x, y = digits
    assert not no_bounds.has_bounds and "model.bounds.onnx" in bounds_unavailable(no_bounds)
    rep = audited(no_bounds, x, y, suite(AttackSpec("fgsm"), AttackSpec("certify")))
    cert = rep.to_dict()["certified"]
    assert cert["status"] == "skipped" and "model.bounds.onnx" in cert["reason"] and cert["per_eps"] == []
    check = next(c for c in rep.checks if c["name"] == C.CERTIFIED_CHECK)
    assert check["status"] == "skip" and "model.bounds.onnx" in check["detail"]
    _, html = write_report(rep, tmp_path)
    assert "certify skipped" in html.read_text()
    assert "| certified |" not in comparison_table([rep.to_dict()])
    # an oracle with no bounds method at all (a plain score oracle) is skipped too
    from dcs.robustness.testing import fit_mlp

    w = fit_mlp(x, y, 10, steps=20)
    cert = audited(ArrayOracle(w, 10, (1, 8, 8)), x, y, suite(AttackSpec("certify"))).to_dict()["certified"]
    assert cert["status"] == "skipped" and "no logit_bounds" in cert["reason"]


# -- polarizing front end -------------------------------------------------------------------------
def test_pfe_unstable_fraction_and_certified_at_eps0(pfe):
    from dcs.training.models import DEFAULT_C

    _, pkg, x, y = pfe
    assert pkg.manifest["defense"]["kind"] == "pfe" and DEFAULT_PFE_C == DEFAULT_C
    eps = (0.0, 0.002, 0.01, 0.05)
    rep = audited(pkg, x, y, suite(AttackSpec("fgsm"), AttackSpec("pgd", {"steps": 5}),
                                   AttackSpec("certify"), eps=eps))
    cert = rep.to_dict()["certified"]
    assert cert["pfe_c"] == pytest.approx(pkg.manifest["defense"]["pfe_c"] or DEFAULT_C)
    fr = [c["unstable_fraction"] for c in cert["per_eps"]]
    assert all(0.0 <= f <= 1.0 for f in fr) and all(a < b for a, b in itertools.pairwise(fr)), fr
    z = pkg.probe(x)["z"]
    want = np.mean(np.abs(np.abs(z.astype(np.float64)) - cert["pfe_c"]) <= 0.01)
    assert fr[2] == pytest.approx(want)
    assert cert["per_eps"][0]["certified_accuracy"] == pytest.approx(rep.clean_accuracy) == 1.0
    for (label, e), smp in rep.samples.items():  # the engine's adversarial examples: inside
        lo, hi = pkg.logit_bounds(x[:len(smp["x_adv"])], e)
        z = pkg.logits(smp["x_adv"])
        assert (z >= lo - 1e-5).all() and (z <= hi + 1e-5).all(), label


# -- the real server ------------------------------------------------------------------------------
def test_certify_through_the_server_streams_progress_and_reports(pfe, tmp_path):
    import grpc

    from dcs.proto import classifier_pb2 as cpb
    from dcs.proto import classifier_pb2_grpc as cpb_grpc
    from tests.server_helpers import start_server_process

    repo, _, x, y = pfe
    token = tmp_path / "token"
    token.write_text("cert-token\n")
    auth = [("authorization", "Bearer cert-token")]
    with start_server_process(repo, "--audit-token-file", str(token), metrics=False) as sp:
        with grpc.insecure_channel(sp.audit_target) as ch:
            stub = cpb_grpc.AuditStub(ch)
            start = stub.StartAudit(cpb.StartAuditRequest(
                model="pfe", seed=3, eps=[0.002, 0.01],
                attacks=[cpb.AttackSpec(name="fgsm"), cpb.AttackSpec(name="certify")],
                examples=cpb.UploadedExamples(
                    images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape, data=x.tobytes()),
                    labels=y.tolist())), metadata=auth, timeout=10)
            events = list(stub.WatchAudit(cpb.WatchAuditRequest(job_id=start.job_id), metadata=auth,
                                          timeout=60))
            assert events[-1].state == cpb.SUCCEEDED, events[-1].message
            cert_ev = [e for e in events if e.state == cpb.RUNNING and e.progress.attack == "certify"]
            assert cert_ev and {round(e.progress.eps, 6) for e in cert_ev} <= {0.002, 0.01}
            fractions = [e.progress.fraction for e in events if e.state == cpb.RUNNING and e.progress.attack]
            assert fractions == sorted(fractions)
            job = stub.GetAudit(cpb.GetAuditRequest(job_id=start.job_id, include_report=True,
                                                    include_html=True), metadata=auth, timeout=10)
        sp.stop()
    report = json.loads(job.report_json)
    cert = report["certified"]
    assert cert["status"] == "ok" and [c["eps"] for c in cert["per_eps"]] == pytest.approx([0.002, 0.01])
    assert all(0 <= c["unstable_fraction"] <= 1 for c in cert["per_eps"])
    assert not C.certified_violations(cert, report["results"], report["worst_case"])
    assert all(r["attack"] == "fgsm" for r in report["results"])
    assert "Certified robustness" in job.report_html
