"""Robustness metrics from predictions (numpy only; no oracle calls).

Definitions (all fractions in [0, 1]):

* clean accuracy: mean(clean_pred == y).
* robust accuracy: mean(clean_pred == y and adv_pred == y); an example the model already gets
  wrong is never robust (AutoAttack's convention).
* attack success rate (BlurNet): among originally-correct examples, the fraction whose prediction
  changed (targeted: became the target). ``None`` when no example was correct.
* mean L2 dissimilarity (BlurNet/RP2): mean over originally-correct examples of
  ‖x − x_adv‖₂ / ‖x_adv‖₂ (0 when x_adv is all zeros and equal to x). ``None`` as above.
* worst case: an example is robust only if it survives every attack (headline robust accuracy).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class AttackMetrics:
    n: int
    clean_accuracy: float
    robust_accuracy: float
    attack_success_rate: float | None
    mean_l2_dissimilarity: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    pred, y = np.asarray(pred), np.asarray(y)
    return float(np.mean(pred == y)) if len(y) else 0.0


def robust_mask(y: np.ndarray, clean_pred: np.ndarray, adv_pred: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return (np.asarray(clean_pred) == y) & (np.asarray(adv_pred) == y)


def attack_success_rate(y, clean_pred, adv_pred, target=None) -> float | None:
    correct = np.asarray(clean_pred) == np.asarray(y)
    if not correct.any():
        return None
    adv_pred = np.asarray(adv_pred)
    if target is not None:
        changed = adv_pred[correct] == np.asarray(target)[correct]
    else:
        changed = adv_pred[correct] != np.asarray(clean_pred)[correct]
    return float(np.mean(changed))


def l2_dissimilarity(x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
    """Per example ‖x − x_adv‖₂ / ‖x_adv‖₂."""
    n = len(x)
    diff = np.sqrt(((np.asarray(x, np.float64) - x_adv).reshape(n, -1) ** 2).sum(1))
    norm = np.sqrt((np.asarray(x_adv, np.float64).reshape(n, -1) ** 2).sum(1))
    return np.divide(diff, norm, out=np.zeros(n), where=norm > 0)


def attack_metrics(x, y, clean_pred, x_adv, adv_pred, target=None) -> AttackMetrics:
    return metrics_from_outcomes(y, clean_pred, adv_pred, l2_dissimilarity(x, x_adv), target)


def metrics_from_outcomes(y, clean_pred, adv_pred, l2, target=None) -> AttackMetrics:
    """``attack_metrics`` from per-example outcomes (``l2``: per-example dissimilarity), e.g. merged shards."""
    y = np.asarray(y)
    correct = np.asarray(clean_pred) == y
    l2 = np.asarray(l2, np.float64)
    return AttackMetrics(
        n=len(y),
        clean_accuracy=accuracy(clean_pred, y),
        robust_accuracy=float(np.mean(robust_mask(y, clean_pred, adv_pred))) if len(y) else 0.0,
        attack_success_rate=attack_success_rate(y, clean_pred, adv_pred, target),
        mean_l2_dissimilarity=float(l2[correct].mean()) if correct.any() else None,
    )


def worst_case_mask(y, clean_pred, adv_preds: Iterable[np.ndarray]) -> np.ndarray:
    """Robust under every attack (and correct on the clean input)."""
    mask = np.asarray(clean_pred) == np.asarray(y)
    for p in adv_preds:
        mask = mask & (np.asarray(p) == np.asarray(y))
    return mask
