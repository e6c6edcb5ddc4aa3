"""Regularizer values on hand-computed tiny tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcs.training.defenses import (
    blur_kernel,
    linf_depthwise_penalty,
    pfe_b1,
    pfe_b2,
    pfe_lambda,
    tv_penalty,
)


def test_linf_depthwise_penalty():
    w = torch.tensor([[[[0.1, -0.5], [0.2, 0.0]]], [[[0.3, 0.3], [-0.1, 0.2]]]])  # K=2
    # α/K · (0.5 + 0.3) with α = 2 → 0.8
    assert linf_depthwise_penalty(w, 2.0).item() == pytest.approx(0.8)


def test_tv_penalty():
    f = torch.zeros(2, 1, 2, 3)
    f[0, 0] = torch.tensor([[1.0, 2.0, 4.0], [1.0, 0.0, 4.0]])
    # sample 0: vertical |0|+|−2|+|0| = 2; horizontal |1|+|2| + |−1|+|4| = 8 → TV 10; sample 1: 0
    # α/(N·K) · 10 = 0.5/(2·1) · 10 = 2.5
    assert tv_penalty(f, 0.5).item() == pytest.approx(2.5)


def test_pfe_b1_b2():
    z = torch.tensor([0.0, 0.35])
    expected1 = (1.0 + math.exp(-0.5)) / 2
    assert pfe_b1(z, 0.35).item() == pytest.approx(expected1, rel=1e-6)
    z = torch.tensor([0.2, -0.2, 0.0])
    e = lambda d: math.exp(-d * d / (2 * 0.15 ** 2))
    expected2 = ((e(0) + e(0.4)) * 2 + 2 * e(0.2)) / 3
    assert pfe_b2(z, 0.2, 0.15).item() == pytest.approx(expected2, rel=1e-6)


def test_pfe_lambda_ramps():
    assert pfe_lambda(0, 20, 1.0, "epoch") == 0.0
    assert pfe_lambda(10.7, 20, 1.0, "epoch") == pytest.approx(0.5)
    assert pfe_lambda(10.7, 20, 1.0, "batch") == pytest.approx(10.7 / 20)
    assert pfe_lambda(3, 20, 0.7, "none") == 0.7
    assert pfe_lambda(0, 0, 1.0) == 0.0


def test_regularizers_are_differentiable():
    w = torch.rand(3, 1, 3, 3, requires_grad=True)
    linf_depthwise_penalty(w, 1.0).backward()
    assert torch.count_nonzero(w.grad) == 3  # one max per channel
    f = torch.rand(2, 3, 4, 4, requires_grad=True)
    tv_penalty(f, 1.0).backward()
    assert f.grad is not None


def test_blur_kernels():
    assert np.allclose(blur_kernel(3, "box"), 1 / 9)
    g = blur_kernel(5, "gaussian")
    assert g.sum() == pytest.approx(1.0) and g[2, 2] == g.max() and np.allclose(g, g.T)
    g2 = blur_kernel(3, "gaussian", sigma=1.0)
    t = np.exp(-np.array([1.0, 0.0, 1.0]) / 2)
    assert np.allclose(g2, np.outer(t, t) / np.outer(t, t).sum())
