"""Adaptive audits across a PFE package's BPDA surrogate family (issue 25).

The surrogates are written here again, independently of the package code, and a plain torch PGD
attacks the model through each; the adaptive audit must be at least as strong as the best of them
(worst case ≤ best + one example). ``surrogate_sensitivity`` warns on a straight-through-only audit
and passes on the adaptive one.
"""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from dcs.robustness.adaptive import CHECK_NAME, Calibration, check_surrogate_sensitivity
from dcs.robustness.attacks import AttackError, build
from dcs.robustness.audit import AuditBudgetExceeded, audit
from dcs.robustness.manifest import MANIFEST_FILE, SMOOTH_FILE, seal
from dcs.robustness.package import SessionOptions, load_package
from dcs.robustness.suites import AttackSpec, CheckConfig, Suite
from dcs.training.export.fixtures import build_untrained, export_untrained
from dcs.training.export.twin import SURROGATE_TAUS
from dcs.training.export.verify import grad_agreement

SHAPE = (1, 16, 16)
CPU = SessionOptions(device="cpu", intra_op_threads=1)
MEMBERS = ("straight-through", *(f"tanh:{t:g}" for t in SURROGATE_TAUS))


# -- the surrogates, written in the test (not imported from the package) -------------------------
class _Sat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, c, tau):
        ctx.save_for_backward(z)
        ctx.c, ctx.tau = c, tau
        return 0.5 * (torch.sign(z - c) + torch.sign(z + c))

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        if ctx.tau is None:  # straight-through
            return g, None, None
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            smooth = 0.5 * (torch.tanh((zz - ctx.c) / ctx.tau) + torch.tanh((zz + ctx.c) / ctx.tau))
            (d,) = torch.autograd.grad(smooth.sum(), zz)
        return g * d, None, None


class _TestSaturation(torch.nn.Module):
    def __init__(self, c: float, tau: float | None) -> None:
        super().__init__()
        self.c, self.tau = c, tau

    def forward(self, z):
        return _Sat.apply(z, self.c, self.tau)


def _tau(member: str) -> float | None:
    return None if member == "straight-through" else float(member.split(":")[1])


def _with_surrogate(model, member: str):
    import copy

    m = copy.deepcopy(model)
    m.front_end.saturation = _TestSaturation(model.front_end.saturation.c, _tau(member))
    return m.eval()


def torch_pgd(model, x, y, eps: float, steps: int, seed: int) -> np.ndarray:
    """Plain ℓ∞ PGD (random start, step 2.5ε/steps, sign of the CE gradient); returns the
    per-example 'still correct' mask at the last iterate or any earlier one that broke it."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    xa = (x0 + (torch.rand(x0.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    robust = torch.ones(len(x), dtype=torch.bool)
    for _ in range(steps):
        xa.requires_grad_(True)
        logits = model(xa)
        robust &= logits.argmax(1) == yt
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, yt, reduction="sum"), xa)
        with torch.no_grad():
            xa = torch.min(torch.max(xa + 2.5 * eps / steps * grad.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    with torch.no_grad():
        robust &= model(xa).argmax(1) == yt
    return robust.numpy()


def _suite(adaptive: bool = True, **kw) -> Suite:
    return Suite(name="adaptive-test", eps=(0.1,), headline_eps=0.1, adaptive=adaptive,
                 attacks=(AttackSpec("fgsm", label="FGSM"), AttackSpec("pgd", {"steps": 10}, label="PGD"),
                          AttackSpec("square", {"n_queries": 30}, label="Square")),
                 checks=CheckConfig(steps=10, more_steps_factor=1, more_restarts=1, max_examples=40), **kw)


@pytest.fixture(scope="module")
def pfe(tmp_path_factory):
    """An untrained PFE package (random weights) and data it classifies as labelled: its
    straight-through and tanh gradients disagree strongly (a clear, deterministic case)."""
    torch.set_num_threads(1)
    repo = tmp_path_factory.mktemp("adaptive")
    result = export_untrained(repo, "pfe", "pfe_cnn", "pfe", SHAPE, 10, seed=3)
    model, _ = build_untrained("pfe_cnn", "pfe", SHAPE, 10, seed=3)
    pkg = load_package(result.path, CPU)
    x = np.random.default_rng(0).random((40, *SHAPE), dtype=np.float32)
    y = pkg.logits(x).argmax(1).astype(np.int64)
    return result, model, pkg, x, y


def test_manifest_lists_surrogates_and_every_member_matches_torch(pfe):
    _, model, pkg, x, y = pfe
    members = pkg.manifest["gradient"]["surrogates"]
    assert [m["name"] for m in members] == list(MEMBERS) == list(pkg.surrogates)
    assert SMOOTH_FILE in pkg.manifest["files"]
    xs, ys = x[:7], (y[:7] + 3) % 10
    served = pkg.logits(xs)
    for name in MEMBERS:
        logits, grad = pkg.with_surrogate(name).loss_grad(xs, ys)
        assert np.abs(logits - served).max() <= 1e-4  # the member's forward is the served model's
        ref_model = _with_surrogate(model, name)
        xt = torch.from_numpy(xs).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(ref_model(xt), torch.from_numpy(ys), reduction="sum")
        (ref,) = torch.autograd.grad(loss, xt)
        rel, cos = grad_agreement(grad, ref.numpy())
        assert rel <= 1e-3 and cos >= 0.999, (name, rel, cos)


def test_attacks_take_a_surrogate(pfe):
    _, _, pkg, x, y = pfe
    a = build("pgd", eps=0.1, steps=5, surrogate="tanh:0.01")
    res = a.run(pkg, x[:8], y[:8], rng=np.random.default_rng(0))
    assert res.gradients > 0 and a.params()["surrogate"] == "tanh:0.01"
    with pytest.raises(AttackError, match="not declared"):
        build("pgd", eps=0.1, steps=1, surrogate="sigmoid:1").run(pkg, x[:2], y[:2], rng=np.random.default_rng(0))


@pytest.mark.parametrize("n,steps", [(24, 10)])
def test_adaptive_worst_case_beats_each_torch_surrogate(pfe, n, steps):
    _, model, pkg, x, y = pfe
    _adaptive_vs_torch(model, pkg, x[:n], y[:n], steps, _suite())


def _adaptive_vs_torch(model, pkg, x, y, steps, suite):
    per_member = {}
    for name in MEMBERS:
        robust = torch_pgd(_with_surrogate(model, name), x, y, 0.1, steps, seed=0)
        per_member[name] = int(robust.sum())
    rep = audit(pkg, x, y, suite, seed=0)
    worst = round(rep.headline["robust_accuracy"] * len(x))
    assert worst <= min(per_member.values()) + 1, (worst, per_member)
    d = rep.to_dict()
    assert d["adaptive"]["used"] and set(d["adaptive"]["calibration"]["members"]) == set(MEMBERS)
    return worst, per_member, d


def test_report_names_attack_and_surrogate_per_input(pfe):
    _, _, pkg, x, y = pfe
    d = audit(pkg, x, y, _suite(), seed=0).to_dict()
    used = d["adaptive"]["used"]
    cal = d["adaptive"]["calibration"]
    assert set(cal["kept"]) | set(cal["dropped"]) == set(MEMBERS)
    assert used[0] == "straight-through" and set(used) == {"straight-through", *cal["kept"]}
    pgd = next(r for r in d["results"] if r["label"] == "PGD")
    assert [t["surrogate"] for t in pgd["surrogates"]] == used
    w = d["worst_case"][0]
    assert len(w["broken_by"]) == len(x)
    for mask, by in zip(w["robust_mask"], w["broken_by"]):
        assert (by is None) == bool(mask)  # every clean-correct input (all here) broken names a job
        assert by is None or by.split(" @ ")[0] in ("FGSM", "PGD", "Square", "Noise")
    json.dumps(d)


def test_sensitivity_warns_straight_through_only_and_passes_adaptive(pfe):
    _, _, pkg, x, y = pfe
    st = audit(pkg, x, y, _suite(adaptive=False), seed=0).to_dict()
    ad = audit(pkg, x, y, _suite(adaptive=True), seed=0).to_dict()
    c_st = next(c for c in st["checks"] if c["name"] == CHECK_NAME)
    c_ad = next(c for c in ad["checks"] if c["name"] == CHECK_NAME)
    assert c_st["status"] == "warn" and "one surrogate only" in c_st["detail"], c_st
    assert c_ad["status"] == "pass" and "worst case" in c_ad["detail"], c_ad
    assert st["adaptive"]["used"] == [] and not any("surrogates" in r for r in st["results"])
    assert ad["headline"]["robust_accuracy"] <= st["headline"]["robust_accuracy"]
    # straight-through runs first with the job's own stream: every adaptive row is at most the
    # straight-through-only row, example by example
    for r_st, r_ad in zip(st["results"], ad["results"]):
        assert r_ad["robust_accuracy"] <= r_st["robust_accuracy"], (r_st["label"], r_ad, r_st)


def test_sensitivity_check_passes_when_members_agree():
    r = {"a": np.array([True] * 50 + [False] * 50), "b": np.array([True] * 49 + [False] * 51)}
    cal = Calibration(members=("a", "b"), kept=("b",), attack="pgd", eps=0.1, n=100,
                      robust_accuracy={k: float(v.mean()) for k, v in r.items()}, robust=r)
    assert check_surrogate_sensitivity(cal, False, 0.02).status == "pass"
    assert check_surrogate_sensitivity(None, True, 0.02).status == "skip"


def test_budget_counts_every_surrogate(pfe):
    _, _, pkg, x, y = pfe
    s = _suite()
    one, _ = s.estimate_cost(len(x))
    five, _ = s.estimate_cost(len(x), len(MEMBERS))
    assert five > 4 * (one - len(x)) // 2
    assert s.replace(adaptive=False).estimate_cost(len(x), len(MEMBERS))[0] < five
    with pytest.raises(AuditBudgetExceeded):
        audit(pkg, x, y, s.replace(max_gradients=one + 1), seed=0)
    rep = audit(pkg, x, y, s.replace(max_gradients=five), seed=0)
    assert rep.totals["gradients"] <= five


def test_package_without_family_audits_as_before(pfe, tmp_path):
    """An old PFE package (no gradient.surrogates, no smooth twin) and a non-PFE one: no
    calibration, no check, no adaptive section."""
    import shutil

    result, _, _, x, y = pfe
    old = tmp_path / "old" / "1"
    shutil.copytree(result.path, old)
    m = json.loads((old / MANIFEST_FILE).read_text())
    m["gradient"].pop("surrogates")
    m["files"].pop(SMOOTH_FILE)
    (old / SMOOTH_FILE).unlink()
    (old / MANIFEST_FILE).write_text(json.dumps(seal(m)))
    pkg = load_package(old, CPU)
    assert pkg.surrogates == ()
    d = audit(pkg, x[:10], y[:10], _suite(), seed=0).to_dict()
    assert "adaptive" not in d and all(c["name"] != CHECK_NAME for c in d["checks"])
    assert "broken_by" not in d["worst_case"][0]


@pytest.mark.slow
def test_adaptive_on_a_trained_pfe_full(tmp_path):
    """The full version: a PFE trained on digits, 200 test images, PGD-20 per surrogate."""
    from dcs.data import load_dataset
    from dcs.training.config import DefenseSpec, TrainConfig
    from dcs.training.export.exporter import export_run
    from dcs.training.runs import load_trained
    from dcs.training.trainer import train

    torch.set_num_threads(1)
    data = load_dataset("digits")
    cfg = TrainConfig(dataset="digits", arch="pfe_cnn", defense=DefenseSpec(kind="pfe", pfe_c=0.25, pfe_lambda=5.0),
                      pfe_stages=(2, 3, 2), batch_size=32, lr=3e-3, seed=0, threads=1)
    train(cfg, data, tmp_path / "run", progress=False)
    res = export_run(tmp_path / "run", tmp_path / "repo", "pfe", version=1)
    pkg = load_package(res.path, CPU)
    model = load_trained(tmp_path / "run").model.eval()
    x, y = data.x_test[:200], data.y_test[:200].astype(np.int64)
    suite = Suite(name="adaptive-full", eps=(0.1,), headline_eps=0.1,
                  attacks=(AttackSpec("fgsm", label="FGSM"), AttackSpec("pgd", {"steps": 40}, label="PGD"),
                           AttackSpec("apgd-ce", {"steps": 40}, label="APGD-CE")),
                  checks=CheckConfig(steps=20, more_steps_factor=1, more_restarts=1, max_examples=100))
    assert asdict(suite.checks)["max_examples"] == 100
    _adaptive_vs_torch(model, pkg, x, y, 20, suite)
