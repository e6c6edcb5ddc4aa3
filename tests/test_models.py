"""Models: forward on odd shapes for every arch × defense, probes, saturation/BPDA, layers."""
from __future__ import annotations

import pytest
import torch

from dcs.training.config import DEFENSES, DefenseSpec
from dcs.training.models import (
    L1NormalizedConv2d,
    Saturation,
    build_model,
    configure_pfe_stage,
    set_bpda,
)

torch.set_num_threads(1)
SHAPES = [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 20, 24)]
ARCH_DEFENSES = [(a, d) for a in ("pfe_cnn", "lisa_cnn") for d in DEFENSES]


@pytest.mark.parametrize("arch,defense", ARCH_DEFENSES)
def test_forward_odd_shapes(arch, defense):
    torch.manual_seed(0)
    for shape in SHAPES:
        model = build_model(arch, DefenseSpec(kind=defense, blur_kernel=3), shape, 5)
        x = torch.rand(2, *shape)
        logits = model(x)
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()
        probe = model.probe(x)
        assert torch.equal(probe["logits"], logits)
        assert probe["features"].shape[:2] == ((2, 25) if defense == "pfe" else (2, 32 if arch == "pfe_cnn" else 64))
        assert ("z" in probe) == (defense == "pfe")
        w = model.first_layer_weight()
        assert w.ndim == 4 and w.shape[1] == shape[0]


def test_paper_sizes():
    m = build_model("pfe_cnn", DefenseSpec(kind="pfe"), (1, 28, 28), 10)
    assert m.backbone.body[6].in_features == 1024  # 64·4·4 as in the PFE code
    m = build_model("lisa_cnn", DefenseSpec(), (3, 32, 32), 18)
    assert m.backbone.body[-1].in_features == 512  # RP2's LISA-CNN


def test_fixed_blur_is_not_trainable_learned_blur_is_box_init():
    fixed = build_model("lisa_cnn", DefenseSpec(kind="blur_conv1", blur_type="gaussian", blur_kernel=5), (3, 32, 32), 4)
    assert not any("post_conv1" in n for n, _ in fixed.named_parameters())
    k = fixed.backbone.post_conv1.weight
    assert k.shape == (64, 1, 5, 5) and torch.allclose(k.sum((1, 2, 3)), torch.ones(64))
    assert k[0, 0, 2, 2] > k[0, 0, 0, 0]  # gaussian peaks in the centre
    learned = build_model("pfe_cnn", DefenseSpec(kind="learned_blur", blur_kernel=7), (1, 28, 28), 4)
    w = dict(learned.named_parameters())["backbone.post_conv1.weight"]
    assert torch.allclose(w, torch.full_like(w, 1 / 49))
    inp = build_model("pfe_cnn", DefenseSpec(kind="blur_input", blur_kernel=3), (3, 16, 16), 4)
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(inp.input_blur(x)[0, :, 5, 5], x[0, :, 4:7, 4:7].mean((1, 2)), atol=1e-6)


def test_saturation_values_and_gradients():
    z = torch.tensor([-0.9, -0.3, -0.1, 0.0, 0.1, 0.3, 0.9], requires_grad=True)
    sat = Saturation(0.2)
    out = sat(z)
    assert out.tolist() == [-1, -1, 0, 0, 0, 1, 1]
    out.sum().backward()
    assert torch.count_nonzero(z.grad) == 0  # true gradient: zero almost everywhere
    z.grad = None
    sat.straight_through = True
    out = sat(z)
    assert out.tolist() == [-1, -1, 0, 0, 0, 1, 1]
    (out * torch.arange(7.0)).sum().backward()
    assert z.grad.tolist() == list(range(7))  # BPDA: identity backward
    sat.enabled = False
    assert torch.equal(sat(z), z)


def test_set_bpda_and_stages():
    m = build_model("pfe_cnn", DefenseSpec(kind="pfe", pfe_c=0.3), (1, 8, 8), 3)
    assert set_bpda(m, True) == ["front_end.saturation"]
    assert m.front_end.saturation.straight_through
    assert set_bpda(build_model("pfe_cnn", DefenseSpec(), (1, 8, 8), 3), True) == []
    configure_pfe_stage(m, 1)
    x = torch.rand(2, 1, 8, 8)
    p = m.probe(x)
    assert torch.equal(p["features"], p["z"])  # stages 1-2: unsaturated
    configure_pfe_stage(m, 3)
    p = m.probe(x)
    assert set(p["features"].unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert not any(q.requires_grad for q in m.front_end.parameters())


def test_l1_normalized_conv():
    conv = L1NormalizedConv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, -1, 0], [0, 2, 0], [0, 0, 0]]], [[[0.5] * 3] * 3]]))
    x = torch.ones(1, 1, 5, 5)
    out = conv(x)
    assert out[0, 0, 2, 2].item() == pytest.approx(2 / 4)  # (1 − 1 + 2) / ‖w‖₁=4
    assert out[0, 1, 2, 2].item() == pytest.approx(1.0)
    assert conv.normalized_weight().abs().sum((1, 2, 3)).tolist() == pytest.approx([1.0, 1.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("resnet", DefenseSpec(), (1, 8, 8), 10)
    with pytest.raises(ValueError):
        build_model("pfe_cnn", DefenseSpec(kind="blur_input", blur_kernel=4), (1, 8, 8), 10)
    with pytest.raises(ValueError):
        build_model("pfe_cnn", DefenseSpec(), (0, 8, 8), 10)


def test_pgd_stays_in_eps_ball():
    from dcs.training.adversarial import pgd_linf

    torch.manual_seed(0)
    m = build_model("pfe_cnn", DefenseSpec(kind="pfe"), (1, 8, 8), 3)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    g = torch.Generator().manual_seed(0)
    adv = pgd_linf(m, x, y, eps=0.1, steps=3, step_size=0.05, generator=g)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not m.front_end.saturation.straight_through  # restored
    assert all(p.grad is None for p in m.parameters())


def test_pgd_differentiates_through_the_chosen_surrogate():
    """One unclipped PGD step from x moves by step·sign(∇) of the surrogate's loss: checked against
    autograd of a reference model whose saturation *is* the smooth tanh (or the identity)."""
    import torch.nn.functional as F

    from dcs.training.adversarial import pgd_linf
    from dcs.training.models.layers import tanh_surrogate

    torch.manual_seed(1)
    m = build_model("pfe_cnn", DefenseSpec(kind="pfe", pfe_c=0.25), (1, 8, 8), 3).eval()
    sat = m.front_end.saturation
    x, y = torch.rand(6, 1, 8, 8) * 0.5 + 0.25, torch.tensor([0, 1, 2, 0, 1, 2])

    def reference_sign(backward):
        xr = x.clone().requires_grad_(True)
        z = m.front_end.conv(xr)
        h = sat(z).detach() + backward(z) - backward(z).detach()  # served forward, surrogate backward
        F.cross_entropy(m.backbone(h), y).backward()
        return xr.grad.sign()

    step = 0.01
    for name, backward in (("straight-through", lambda z: z), ("tanh:0.05", lambda z: tanh_surrogate(z, 0.25, 0.05))):
        adv = pgd_linf(m, x, y, eps=0.2, steps=1, step_size=step, random_start=False, surrogate=name)
        assert torch.equal(((adv - x) / step).round(), reference_sign(backward)), name
        assert not sat.straight_through and sat.surrogate_tau is None  # restored
    st = pgd_linf(m, x, y, eps=0.2, steps=1, step_size=step, random_start=False)
    smooth = pgd_linf(m, x, y, eps=0.2, steps=1, step_size=step, random_start=False, surrogate="tanh:0.05")
    assert not torch.equal(st, smooth)  # the surrogate changes the attack
    with pytest.raises(ValueError, match="tanh:TAU"):
        pgd_linf(m, x, y, eps=0.2, steps=1, step_size=step, surrogate="tanh")


@pytest.mark.parametrize("defense", ["none", "blur_input", "learned_blur", "pfe"])
def test_onnx_export_matches_torch(defense, tmp_path):
    import warnings

    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model("pfe_cnn", DefenseSpec(kind=defense, blur_kernel=3), (1, 9, 7), 4)
    configure_pfe_stage(model, 3)
    model.eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 1, 9, 7),), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, 9, 7)
    out = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-5)
