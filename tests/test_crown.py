"""Issue 27: CROWN margin bounds (training/export/crown.py), certify(method=crown) and certified
training (training/certified.py).

Soundness is checked on every model family (undefended CNN, the blur variants, the polarizing
front end, the LISA CNN): random points in the ball, corners and the strongest PGD point (on the
margin, through the straight-through saturation) never fall below the margin lower bounds, and
the CROWN bound is never looser than the interval margin, per example and per class.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dcs.robustness import checks as C
from dcs.robustness.audit import audit
from dcs.robustness.certify import CROWN_QUERY_COST, Certify, CertifyError, best_margins, margins
from dcs.robustness.package import SessionOptions, load_package
from dcs.robustness.suites import AttackSpec, CheckConfig, Suite
from dcs.robustness.testing import digits_package, load_digits_nchw
from dcs.training.export.bounds import UnsupportedBounds, logit_bounds
from dcs.training.export.crown import MarginBounds, margin_lower_bounds, margin_spec
from dcs.training.export.fixtures import build_untrained, export_untrained
from dcs.training.models import set_bpda

CPU = SessionOptions(device="cpu", intra_op_threads=1)
TOL = 1e-4

FAMILIES = [
    ("pfe_cnn", "none", (1, 12, 12)),
    ("pfe_cnn", "blur_input", (1, 12, 12)),
    ("pfe_cnn", "blur_conv1", (1, 12, 12)),
    ("pfe_cnn", "learned_blur", (1, 12, 12)),
    ("pfe_cnn", "pfe", (1, 12, 12)),
    ("pfe_cnn", "none", (1, 9, 9)),  # odd sides: ceil-mode pooling windows past the edge
    ("lisa_cnn", "none", (3, 16, 16)),
    ("lisa_cnn", "blur_conv1", (3, 16, 16)),
]


def _margins(model, x, y):
    z = model(x)
    return z.gather(1, y[:, None]) - z


def _pgd_on_margin(model, x, y, eps, steps=20):
    """Per class j, PGD minimizing logit_y − logit_j (straight-through saturation): [N, K] minima."""
    set_bpda(model, True)
    k = model(x[:1]).shape[1]
    worst = torch.full((len(x), k), float("inf"))
    try:
        for j in range(k):
            xa = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
            for _ in range(steps):
                xa.requires_grad_(True)
                m = _margins(model, xa, y)[:, j]
                (g,) = torch.autograd.grad(m.sum(), xa)
                xa = (xa.detach() - eps / 4 * g.sign()).clamp(x - eps, x + eps).clamp(0, 1)
            with torch.no_grad():
                worst[:, j] = torch.minimum(worst[:, j], _margins(model, xa, y)[:, j])
    finally:
        set_bpda(model, False)
    return worst


@pytest.mark.parametrize("arch,defense,shape", FAMILIES)
def test_margin_bounds_are_sound_and_never_looser_than_intervals(arch, defense, shape):
    torch.manual_seed(0)
    model, _ = build_untrained(arch, defense, shape, 10, seed=1)
    x = torch.rand(6, *shape)
    with torch.no_grad():
        y = model(x).argmax(1)
    for eps in (0.01, 0.05):
        with torch.no_grad():
            bound = margin_lower_bounds(model, x, y, eps)
            lo, hi = logit_bounds(model, x, torch.tensor([eps]))
        ibp = lo.gather(1, y[:, None]) - hi
        assert (bound >= ibp - 1e-5).all(), "CROWN must be at least the interval margin per class"
        assert torch.all(bound.gather(1, y[:, None]) == 0)
        worst = torch.full_like(bound, float("inf"))
        with torch.no_grad():
            for t in range(60):
                d = torch.sign(torch.rand_like(x) - 0.5) if t % 2 else torch.rand_like(x) * 2 - 1
                worst = torch.minimum(worst, _margins(model, (x + eps * d).clamp(0, 1), y))
        worst = torch.minimum(worst, _pgd_on_margin(model, x, y, eps))
        assert (worst >= bound - TOL).all(), float((bound - worst).max())


def test_saturation_lines_are_sound_on_every_kind_of_interval():
    """The linear relaxation of s(z) = ½(sign(z−c) + sign(z+c)): below/above s on all of [lo, hi]
    (intervals across one step, both steps, none, of width 0, ending exactly on a step), sloped
    where that beats the constant, with finite gradients (certified training differentiates it)."""
    torch.manual_seed(0)
    c, n = 0.3, 20000
    lo = torch.rand(n) * 2 - 1
    width = torch.rand(n) * torch.where(torch.rand(n) < 0.5, torch.tensor(0.2), torch.tensor(1.5))
    width[::7] = 0
    hi = lo + width
    lo[:100], lo[100:200], hi[200:300], hi[300:400] = c, -c, c, -c
    hi = torch.maximum(hi, lo)

    def s(z):
        return 0.5 * (torch.sign(z - c) + torch.sign(z + c))

    lo.requires_grad_(True)
    hi.requires_grad_(True)
    a_l, b_l, a_u, b_u = MarginBounds._saturation_lines(lo, hi, s(lo), s(hi), c)
    sum(t.sum() for t in (a_l, b_l, a_u, b_u)).backward()
    assert torch.isfinite(lo.grad).all() and torch.isfinite(hi.grad).all()
    lo, hi, a_l, b_l, a_u, b_u = (t.detach() for t in (lo, hi, a_l, b_l, a_u, b_u))

    points = [lo + (hi - lo) * t for t in (0.0, 1.0, *torch.rand(30).tolist())]
    points += [torch.full_like(lo, p + d) for p in (-c, c) for d in (-1e-6, 0.0, 1e-6)]
    for z in points:
        inside = (z >= lo) & (z <= hi)
        assert not ((a_l * z + b_l > s(z) + 1e-6) & inside).any()
        assert not ((a_u * z + b_u < s(z) - 1e-6) & inside).any()
    stable = (hi < -c) | (lo > c) | ((lo > -c) & (hi < c))
    assert (a_l[stable] == 0).all() and (a_u[stable] == 0).all()  # a stable activation is a constant
    assert torch.equal(b_l[stable], s(lo)[stable]) and torch.equal(b_u[stable], s(hi)[stable])
    assert (a_l > 0).any() and (a_u > 0).any()


def test_pfe_sweep_crosses_the_saturation_and_is_exact_at_eps0():
    torch.manual_seed(0)
    model, _ = build_untrained("pfe_cnn", "pfe", (1, 12, 12), 10, seed=3)
    kinds = [st.kind for st in MarginBounds(model).steps]
    assert "saturation" in kinds and "monotone" not in kinds
    x = torch.rand(8, 1, 12, 12)
    y = torch.randint(0, 10, (8,))
    with torch.no_grad():
        assert torch.allclose(margin_lower_bounds(model, x, y, 0.0), _margins(model, x, y), atol=1e-5)


def test_eps0_bounds_equal_the_margins_and_crown_tightens_a_relu_net():
    torch.manual_seed(0)
    model, _ = build_untrained("pfe_cnn", "none", (1, 12, 12), 10, seed=2)
    x = torch.rand(8, 1, 12, 12)
    y = torch.randint(0, 10, (8,))
    with torch.no_grad():
        assert torch.allclose(margin_lower_bounds(model, x, y, 0.0), _margins(model, x, y), atol=1e-5)
        mb = MarginBounds(model)
        from dcs.training.export.bounds import input_interval

        lo, hi = input_interval(x, torch.tensor([0.02]))
        spec = margin_spec(y, 10)
        full, logits_only = mb(lo, hi, spec), mb(lo, hi, spec, stop=0)
    assert (full >= logits_only - 1e-6).all() and (full > logits_only + 1e-3).any()


def test_unsupported_module_is_named():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    with pytest.raises(UnsupportedBounds, match="Tanh"):
        MarginBounds(net)


def test_best_margins_takes_the_larger_bound_per_class():
    lo = np.array([[1.0, 0.0, 0.0]])
    hi = np.array([[2.0, 1.5, 0.5]])
    y = np.array([0])
    crown = np.array([[0.0, -1.0, 0.8]])  # looser for class 1, tighter for class 2
    assert margins(lo, hi, y)[0] == pytest.approx(-0.5)
    assert best_margins(lo, hi, y, crown)[0] == pytest.approx(-0.5)  # class 1: max(-1, -0.5)
    crown[0, 1] = 0.3
    assert best_margins(lo, hi, y, crown)[0] == pytest.approx(0.3)


def test_certify_method_is_validated_and_costed():
    with pytest.raises(CertifyError, match="method"):
        Certify(method="deeppoly")
    assert Certify(method="crown").query_cost(10) == 20 + CROWN_QUERY_COST * 10
    assert Certify(method="ibp").query_cost(10) == 20


@pytest.fixture(scope="module")
def cnn_pkg(tmp_path_factory):
    """A real exported 8x8 CNN package (random weights) with model.crown.onnx."""
    torch.set_num_threads(1)
    res = export_untrained(tmp_path_factory.mktemp("crown-repo"), "cnn", arch="pfe_cnn", defense="none",
                           input_shape=(1, 8, 8), num_classes=10, seed=0, crown=True)
    return load_package(res.path, CPU), res.path


def test_package_crown_graph_matches_torch_and_certifies_at_least_ibp(cnn_pkg):
    pkg, _ = cnn_pkg
    assert pkg.has_crown and pkg.manifest["bounds"]["crown"]["file"] == "model.crown.onnx"
    _, _, x, y = load_digits_nchw()
    x, y = x[:40], y[:40]
    model, _ = build_untrained("pfe_cnn", "none", (1, 8, 8), 10, seed=0)
    with torch.no_grad():
        ref = margin_lower_bounds(model, torch.from_numpy(x), torch.from_numpy(y), 0.02).numpy()
    got = pkg.margin_bounds(x, y, 0.02)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    for eps in (0.0, 0.005, 0.02):
        ibp = Certify(eps=eps, method="ibp").run(pkg, x, y)
        crown = Certify(eps=eps, method="crown").run(pkg, x, y)
        assert crown.status == "ok" and crown.method == "crown"
        assert np.all(crown.margin_lower >= ibp.margin_lower - 1e-9)
        assert np.all(crown.certified >= ibp.certified)  # every example
        assert crown.queries == len(x) * (1 + CROWN_QUERY_COST)


def test_audit_with_both_methods_passes_the_consistency_check(cnn_pkg):
    pkg, _ = cnn_pkg
    _, _, x, y = load_digits_nchw()
    x, y = x[:30], y[:30]
    suite = Suite(name="crown", eps=(0.0, 0.01, 0.05), headline_eps=0.01,
                  attacks=(AttackSpec("pgd", {"steps": 10}, label="PGD"),
                           AttackSpec("certify", {"method": "ibp"}, label="Certified-IBP"),
                           AttackSpec("certify", {"method": "crown"}, label="Certified-CROWN")),
                  checks=CheckConfig(enabled=False))
    d = audit(pkg, x, y, suite, seed=0).to_dict()
    cert = d["certified"]
    assert cert["status"] == "ok" and cert["methods"] == ["crown", "ibp"]
    assert not C.certified_violations(cert, d["results"], d["worst_case"])
    check = next(c for c in d["checks"] if c["name"] == C.CERTIFIED_CHECK)
    assert check["status"] == "pass"
    by = {(c["method"], c["eps"]): c for c in cert["per_eps"]}
    for eps in (0.0, 0.01, 0.05):
        assert by[("crown", eps)]["certified_accuracy"] >= by[("ibp", eps)]["certified_accuracy"]
    assert suite.estimate_cost(len(x))[1] >= 3 * len(x) * (2 + CROWN_QUERY_COST)
    # the report draws one certified curve per method over ε, and tables both
    from dcs.robustness.report import html as H
    from dcs.robustness.report.plots import (
        certified_methods,
        certified_series,
        certified_vs_empirical,
    )

    assert certified_methods(d) == ["ibp", "crown"]
    assert [round(e, 3) for e in certified_series(d, "crown")["eps"]] == [0.0, 0.01, 0.05]
    assert certified_vs_empirical(d)[:4] == b"\x89PNG"
    page = "\n".join(H._certified_html(d))
    assert "CROWN" in page and "<td>crown</td>" in page and "<td>ibp</td>" in page


def test_old_package_without_crown_graph_is_skipped_with_a_reason(tmp_path):
    path, _ = digits_package(tmp_path, name="old", bounds=True)
    pkg = load_package(path, CPU)
    assert pkg.has_bounds and not pkg.has_crown
    _, _, x, y = load_digits_nchw()
    res = Certify(eps=0.05, method="crown").run(pkg, x[:10], y[:10])
    assert res.status == "skipped" and "model.crown.onnx" in res.reason and "method=ibp" in res.reason
    assert Certify(eps=0.05, method="ibp").run(pkg, x[:10], y[:10]).status == "ok"


# -- certified training ------------------------------------------------------------------------

def test_schedule_warmup_ramp_and_mix():
    from dcs.training.certified import Schedule

    s = Schedule(eps=0.4, warmup=2, ramp=4, kappa_end=0.5)
    assert s.at(1.0) == (0.0, 1.0, 1.0)
    e, k, b = s.at(4.0)
    assert e == pytest.approx(0.2) and k == pytest.approx(0.75) and b == pytest.approx(0.5)
    assert s.at(10.0) == (pytest.approx(0.4), pytest.approx(0.5), pytest.approx(0.0))


def test_certified_loss_equals_ce_at_eps0_and_bounds_it_above():
    import torch.nn.functional as F

    from dcs.training.certified import CertifiedLoss

    model, _ = build_untrained("pfe_cnn", "none", (1, 8, 8), 10, seed=3)
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    ce = F.cross_entropy(model(x), y)
    for method in ("ibp", "crown-ibp"):
        loss = CertifiedLoss(model, method)
        assert float(loss(x, y, model(x), 0.0, 1.0)[0].detach()) == pytest.approx(float(ce.detach()), rel=1e-4)
        robust, _ = loss(x, y, model(x), 0.05, 1.0)
        assert float(robust.detach()) >= float(ce.detach())
        robust.backward()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_certified_loss_gradient_matches_finite_differences(method):
    """Certified training needs the bound's full gradient, including its width through |W|
    (a detached |W| once left only the centres trainable: every IBP run collapsed)."""
    from dcs.training.certified import CertifiedLoss

    model, _ = build_untrained("pfe_cnn", "none", (1, 8, 8), 10, seed=5)
    model = model.double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 3, 5, 9])
    loss = CertifiedLoss(model, method)
    params = [p for p in model.parameters() if p.requires_grad]
    directions = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]

    def robust() -> torch.Tensor:
        return loss(x, y, model(x), 0.1, 0.5)[0]

    model.zero_grad()
    robust().backward()
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, directions))
    h = 1e-8
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.add_(h * d)
        plus = float(robust())
        for p, d in zip(params, directions):
            p.sub_(2 * h * d)
        minus = float(robust())
    assert analytic == pytest.approx((plus - minus) / (2 * h), rel=1e-4, abs=1e-7)


def test_config_rejects_bad_certified_settings():
    from dcs.training.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="certified"):
        TrainConfig(certified="deeppoly").validate()
    with pytest.raises(ConfigError, match="cannot be combined"):
        TrainConfig.from_dict({"certified": "ibp", "defense": "advtrain"})
    cfg = TrainConfig.from_dict({"dataset": "mnist5k", "certified": "ibp"}).resolved()
    assert cfg.cert_eps == pytest.approx(0.4)


@pytest.mark.parametrize("method,defense", [("ibp", "none"), ("crown-ibp", "blur_conv1"), ("ibp", "pfe")])
def test_certified_training_runs_through_dcs_train(tmp_path, method, defense):
    from dcs.training.cli import main

    args = ["train", "--dataset", "digits", "--limit-train", "128", "--limit-test", "64", "--batch-size", "32",
            "--defense", defense, "--certified", method, "--cert-eps", "0.05", "--cert-warmup", "0",
            "--cert-ramp", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")]
    args += ["--pfe-stages", "1,1,1", "--cert-pfe-margin", "1.0"] if defense == "pfe" else ["--epochs", "2"]
    assert main(args) == 0
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(np.isfinite(m["loss"]) and m["seconds"] > 0 for m in metrics)
    assert metrics[-1]["loss"] > metrics[-1]["ce"] or defense == "pfe"
    if defense == "pfe":
        assert metrics[1]["regularizer"] > 0  # stage 2 carries the unstable-activation hinge


def test_certify_crown_through_the_server_with_its_cost_in_the_limits(cnn_pkg, tmp_path):
    """A suite entry {"name": "certify", "params_json": {"method": "crown"}} flows through the audit
    service; its crown passes count against --max-audit-queries (an IBP-only audit fits)."""
    import json

    import grpc

    from dcs.proto import classifier_pb2 as cpb
    from dcs.proto import classifier_pb2_grpc as cpb_grpc
    from tests.server_helpers import start_server_process

    _, path = cnn_pkg
    repo = path.parent.parent
    _, _, x, y = load_digits_nchw()
    x, y = np.ascontiguousarray(x[:20]), y[:20]
    token = tmp_path / "token"
    token.write_text("crown-token\n")
    auth = [("authorization", "Bearer crown-token")]

    def request(*methods):
        return cpb.StartAuditRequest(
            model="cnn", seed=1, eps=[0.01, 0.05],
            attacks=[cpb.AttackSpec(name="certify", params_json=json.dumps({"method": m})) for m in methods],
            examples=cpb.UploadedExamples(images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape, data=x.tobytes()),
                                          labels=y.tolist()))

    with start_server_process(repo, "--audit-token-file", str(token), "--max-audit-queries", "700",
                              metrics=False) as sp:
        with grpc.insecure_channel(sp.audit_target) as ch:
            stub = cpb_grpc.AuditStub(ch)
            with pytest.raises(grpc.RpcError) as err:  # crown: +2 eps x 20 x 10 queries (940 > 700; ibp 540)
                stub.StartAudit(request("crown"), metadata=auth, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max-audit-queries" in err.value.details()
            start = stub.StartAudit(request("ibp"), metadata=auth, timeout=10)
            events = list(stub.WatchAudit(cpb.WatchAuditRequest(job_id=start.job_id), metadata=auth, timeout=60))
            assert events[-1].state == cpb.SUCCEEDED, events[-1].message
        sp.stop()
    with start_server_process(repo, "--audit-token-file", str(token), metrics=False) as sp:
        with grpc.insecure_channel(sp.audit_target) as ch:
            stub = cpb_grpc.AuditStub(ch)
            start = stub.StartAudit(request("ibp", "crown"), metadata=auth, timeout=10)
            events = list(stub.WatchAudit(cpb.WatchAuditRequest(job_id=start.job_id), metadata=auth, timeout=60))
            assert events[-1].state == cpb.SUCCEEDED, events[-1].message
            job = stub.GetAudit(cpb.GetAuditRequest(job_id=start.job_id, include_report=True,
                                                    include_html=True), metadata=auth, timeout=10)
        sp.stop()
    report = json.loads(job.report_json)
    cert = report["certified"]
    assert cert["methods"] == ["crown", "ibp"]
    by = {(c["method"], round(c["eps"], 6)): c["certified_accuracy"] for c in cert["per_eps"]}
    assert all(by[("crown", e)] >= by[("ibp", e)] for e in (0.01, 0.05))
    assert "interval and CROWN bounds" in job.report_html


def test_ibp_init_scales_weights_by_fan_in_and_skips_the_front_end():
    import math

    from dcs.training.certified import ibp_init

    model, _ = build_untrained("pfe_cnn", "pfe", (1, 12, 12), 10, seed=0)
    front = model.front_end.conv.weight.clone()
    names = ibp_init(model)
    assert "front_end.conv" not in names and torch.equal(model.front_end.conv.weight, front)
    fc = model.backbone.body[-1]
    assert float(fc.weight.std()) == pytest.approx(math.sqrt(2 * math.pi) / fc.weight.shape[1], rel=0.3)
    assert float(fc.bias.abs().max()) == 0.0
