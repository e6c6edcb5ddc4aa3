"""Metrics on hand-made arrays against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from dcs.robustness.metrics import (
    accuracy,
    attack_metrics,
    attack_success_rate,
    l2_dissimilarity,
    robust_mask,
    worst_case_mask,
)

Y = np.array([0, 1, 2, 3])
CLEAN = np.array([0, 1, 2, 0])   # 3 of 4 correct (the last is wrong)
ADV = np.array([0, 2, 1, 1])     # example 0 survives; 1 and 2 flipped; 3 stays wrong


def test_accuracy_robust_and_success_rate():
    assert accuracy(CLEAN, Y) == 0.75
    np.testing.assert_array_equal(robust_mask(Y, CLEAN, ADV), [True, False, False, False])
    assert attack_success_rate(Y, CLEAN, ADV) == pytest.approx(2 / 3)  # 2 of 3 correct changed
    # targeted: success only where the prediction became the target
    assert attack_success_rate(Y, CLEAN, ADV, target=np.array([1, 2, 0, 0])) == pytest.approx(1 / 3)
    assert attack_success_rate(Y, np.array([1, 0, 0, 0]), ADV) is None


def test_wrong_clean_example_is_never_robust_even_if_adv_is_right():
    y = np.array([0, 1])
    clean = np.array([1, 1])
    adv = np.array([0, 1])   # attack "fixes" example 0: still not robust
    assert robust_mask(y, clean, adv).tolist() == [False, True]


def test_l2_dissimilarity_by_hand():
    x = np.zeros((2, 1, 2, 2), np.float32)
    x[0, 0, 0, 0] = 1.0
    xa = x.copy()
    xa[0, 0, 0, 1] = 1.0          # ‖x−x_adv‖ = 1, ‖x_adv‖ = √2
    xa[1] = 0.5                   # ‖x−x_adv‖ = 1 (4·0.25), ‖x_adv‖ = 1
    np.testing.assert_allclose(l2_dissimilarity(x, xa), [1 / np.sqrt(2), 1.0])
    z = np.zeros((1, 1, 2, 2), np.float32)
    assert l2_dissimilarity(z, z).tolist() == [0.0]


def test_attack_metrics_and_worst_case():
    x = np.zeros((4, 1, 1, 2), np.float32)
    xa = x.copy()
    xa[:, 0, 0, 0] = [0.0, 0.5, 0.5, 0.5]
    xa[:, 0, 0, 1] = [0.0, 0.0, 0.5, 0.5]
    m = attack_metrics(x, Y, CLEAN, xa, ADV)
    assert m.n == 4 and m.clean_accuracy == 0.75 and m.robust_accuracy == 0.25
    assert m.attack_success_rate == pytest.approx(2 / 3)
    # over the 3 originally-correct examples: 0, 1 (0.5/0.5), 1 (√0.5/√0.5)
    assert m.mean_l2_dissimilarity == pytest.approx(2 / 3)
    a1 = np.array([0, 1, 1, 3])
    a2 = np.array([1, 1, 2, 3])
    np.testing.assert_array_equal(worst_case_mask(Y, CLEAN, [a1, a2]), [False, True, False, False])
    assert worst_case_mask(Y, CLEAN, [a1, a2]).mean() == 0.25
