"""Strength cross-check against torchattacks.PGD on the digits MLP (torch copy; tests only).

Same ε, steps, step size, random start and one restart; our robust accuracy must be within one
point of torchattacks' or lower. Checked on an undefended and an adversarially-trained MLP.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchattacks = pytest.importorskip("torchattacks")

from dcs.robustness.attacks import build
from dcs.robustness.attacks.toy_oracles import ArrayOracle
from dcs.robustness.testing import MLPWeights, fit_mlp, gd_step, load_digits_nchw


def adv_train(x, y, eps=0.1, steps=300, lr=0.5, seed=0) -> MLPWeights:
    """Full-batch GD on a 50/50 mix of clean and FGSM inputs (numpy; ~1 s)."""
    w = fit_mlp(x, y, 10, steps=1, seed=seed)
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(steps):
        _, g = w.loss_grad(x, y)
        xa = np.clip(x + eps * np.sign(g), 0, 1)
        xb = np.concatenate([x, xa]).reshape(2 * len(x), -1)
        gd_step(w, xb, np.concatenate([onehot, onehot]), lr)
    return w


class TorchMLP(torch.nn.Module):
    def __init__(self, w: MLPWeights) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.from_numpy(w.w1.copy()))
        self.b1 = torch.nn.Parameter(torch.from_numpy(w.b1.copy()))
        self.w2 = torch.nn.Parameter(torch.from_numpy(w.w2.copy()))
        self.b2 = torch.nn.Parameter(torch.from_numpy(w.b2.copy()))

    def forward(self, x):
        return torch.relu(x.reshape(len(x), -1) @ self.w1 + self.b1) @ self.w2 + self.b2


@pytest.mark.parametrize("kind", ["undefended", "adv-trained"])
def test_our_pgd_matches_or_beats_torchattacks(kind):
    xtr, ytr, xte, yte = load_digits_nchw()
    w = fit_mlp(xtr, ytr, 10) if kind == "undefended" else adv_train(xtr, ytr)
    x, y = xte, yte  # all 500 test digits
    oracle = ArrayOracle(w, 10, (1, 8, 8))
    model = TorchMLP(w).eval()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        assert np.allclose(model(xt).numpy(), w.logits(x), atol=1e-4)
    # torchattacks draws its random start from torch's global generator (seeded per trial below).
    for eps in (0.1, 0.15):
        steps, alpha = 10, eps / 4
        ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        ta_accs, our_accs = [], []
        for seed in range(5):  # average over random starts: one example is 0.2 points
            torch.manual_seed(seed)
            x_ta = ta(xt, yt)
            with torch.no_grad():
                ta_accs.append(float((model(x_ta).argmax(1) == yt).float().mean()))
            ours = build("pgd", eps=eps, steps=steps, step_size=alpha, restarts=1).run(
                oracle, x, y, rng=np.random.default_rng(seed))
            our_accs.append(float(np.mean(ours.pred == y)))
        ta_acc, our_acc = float(np.mean(ta_accs)), float(np.mean(our_accs))
        clean = float(np.mean(w.logits(x).argmax(1) == y))
        assert our_acc <= ta_acc + 0.01 + 1e-9, f"{kind} ε={eps}: ours {our_acc:.3f} vs torchattacks {ta_acc:.3f}"
        assert our_acc < clean
