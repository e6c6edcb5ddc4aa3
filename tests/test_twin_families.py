"""Every model family exports to model.onnx + a gradient twin that agrees with torch (issue 4)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from dcs.robustness.package import SessionOptions, load_package
from dcs.training.export.fixtures import build_untrained, export_untrained
from dcs.training.export.twin import bpda, reference_loss_grad
from dcs.training.export.verify import grad_agreement

# (arch, defense, input shape, classes). lisa_cnn at 30x30 makes its 6x6 stride-2 conv drop a
# row, so the transposed convolution of the backward needs output_padding=1.
FAMILIES = [
    ("pfe_cnn", "none", (1, 16, 16), 10),
    ("lisa_cnn", "none", (3, 30, 30), 18),
    ("pfe_cnn", "blur_input", (1, 16, 16), 10),
    ("lisa_cnn", "blur_conv1", (3, 16, 16), 5),
    ("lisa_cnn", "learned_blur", (3, 16, 16), 5),
    ("pfe_cnn", "tv", (1, 16, 16), 10),
    ("pfe_cnn", "pfe", (1, 16, 16), 10),
    ("pfe_cnn", "advtrain", (1, 16, 16), 10),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f"{f[0]}-{f[1]}")
def family(request, tmp_path_factory):
    torch.set_num_threads(1)
    arch, defense, shape, k = request.param
    repo = tmp_path_factory.mktemp("families")
    result = export_untrained(repo, f"{arch}-{defense}", arch, defense, shape, k, seed=3)
    model, _ = build_untrained(arch, defense, shape, k, seed=3)
    pkg = load_package(result.path, SessionOptions(device="cpu", intra_op_threads=1))
    return request.param, model, pkg, result


@pytest.mark.parametrize("batch", [1, 7])
def test_twin_matches_torch(family, batch):
    (_arch, _defense, shape, k), model, pkg, result = family
    rng = np.random.default_rng(batch)
    x = rng.random((batch, *shape), dtype=np.float32)
    y = rng.integers(0, k, size=batch).astype(np.int64)
    with bpda(model, enabled=result.gradient["kind"] == "bpda"):
        ref_logits, ref_grad = reference_loss_grad(model, torch.from_numpy(x), torch.from_numpy(y))
    logits = pkg.logits(x)
    assert logits.shape == (batch, k)
    assert np.abs(logits - ref_logits.numpy()).max() <= 1e-4
    twin_logits, grad = pkg.loss_grad(x, y)
    assert np.abs(twin_logits - logits).max() <= 1e-4
    assert grad.shape == x.shape and np.linalg.norm(ref_grad.numpy()) > 0
    rel, cos = grad_agreement(grad, ref_grad.numpy())
    assert rel <= 1e-3 and cos >= 0.999, (rel, cos)


def test_manifest_records_gradient_kind_and_probe(family):
    (arch, defense, shape, k), model, pkg, _result = family
    m = pkg.manifest
    if defense == "pfe":
        assert m["gradient"]["kind"] == "bpda"
        assert m["gradient"]["bpda_layers"] == ["front_end.saturation"]
    else:
        assert m["gradient"] == {**m["gradient"], "kind": "exact", "bpda_layers": []}
    assert m["defense"]["kind"] == defense and m["architecture"]["arch"] == arch
    assert m["input"]["shape"] == list(shape) and len(m["labels"]) == k
    assert set(m["exporter"]) >= {"torch", "onnx", "onnxscript", "onnxruntime"}
    x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    probe = pkg.probe(x)
    assert ("z" in probe) == (defense == "pfe")
    with torch.no_grad():
        want = model.probe(torch.from_numpy(x))
        weights = model.first_layer_weight().numpy()
    np.testing.assert_allclose(probe["features"], want["features"].numpy(), atol=1e-4)
    np.testing.assert_allclose(probe["weights"], weights, atol=1e-6)
    # the exporter leaves the model as it found it
    assert all(not getattr(mod, "straight_through", False) for mod in model.modules())


def _pgd(pkg, x, y, eps, steps=10):
    """A few signed-gradient ascent steps through the twin (strong points near the ball's edge)."""
    adv = np.clip(x + np.random.default_rng(0).uniform(-eps, eps, x.shape).astype(np.float32), 0, 1)
    for _ in range(steps):
        _, g = pkg.loss_grad(adv, y)
        adv = np.clip(np.clip(adv + 0.25 * eps * np.sign(g), x - eps, x + eps), 0, 1).astype(np.float32)
    return adv


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.05])
def test_bounds_are_sound(family, eps):
    """model.bounds.onnx (issue 13): model.onnx logits on random and PGD points in the ε-ball ∩
    [0,1] lie inside the bounds; at ε=0 the bounds are the logits."""
    (_arch, _defense, shape, k), _model, pkg, _result = family
    assert pkg.has_bounds and pkg.manifest["bounds"]["method"] == "ibp"
    rng = np.random.default_rng(11)
    x = rng.random((7, *shape), dtype=np.float32)
    y = rng.integers(0, k, size=7).astype(np.int64)
    lo, hi = pkg.logit_bounds(x, eps)
    assert lo.shape == hi.shape == (7, k) and (lo <= hi).all()
    if eps == 0.0:
        np.testing.assert_allclose(lo, pkg.logits(x), atol=1e-5)
        np.testing.assert_allclose(hi, pkg.logits(x), atol=1e-5)
        return
    points = [_pgd(pkg, x, y, eps)]
    for i in range(12):
        noise = rng.uniform(-eps, eps, x.shape) if i % 2 else eps * rng.choice([-1.0, 1.0], x.shape)
        points.append(np.clip(x + noise, 0, 1).astype(np.float32))
    for xp in points:
        assert np.abs(xp - x).max() <= eps + 1e-7
        logits = pkg.logits(xp)
        assert (logits >= lo - 1e-5).all() and (logits <= hi + 1e-5).all()


def test_bounds_hold_at_the_strongest_pgd_points(family):
    """Issue 13's soundness list: the strongest PGD points found stay inside the bounds. Per
    class t, 20 targeted signed-gradient steps that push logit t up (towards its upper bound),
    and 20 untargeted steps from the true label (pushing logit y towards its lower bound); every
    iterate, not only the last, is checked."""
    (_, defense, shape, k), _, pkg, _ = family
    rng = np.random.default_rng(5)
    x = rng.random((3, *shape), dtype=np.float32)
    y = pkg.logits(x).argmax(1)
    eps = 0.03
    lo, hi = pkg.logit_bounds(x, eps)
    for t in [None, *range(k)]:
        lab = y if t is None else np.full(len(x), t, np.int64)
        sign = 1.0 if t is None else -1.0  # ascend CE(y) / descend CE(t)
        adv = np.clip(x + rng.uniform(-eps, eps, x.shape), 0, 1).astype(np.float32)
        for step in range(21):
            logits = pkg.logits(adv)  # the served model's logits, not the twin's
            assert (logits >= lo - 1e-5).all() and (logits <= hi + 1e-5).all(), (t, step, defense)
            _, g = pkg.loss_grad(adv, lab)
            adv = np.clip(np.clip(adv + sign * 0.25 * eps * np.sign(g), x - eps, x + eps), 0, 1)
            adv = adv.astype(np.float32)
