"""Torch-free model packages for tests and benchmarks: a numpy-trained MLP exported with onnx.helper.

``build_mlp_package`` writes a complete package (``model.onnx``, an exact analytic gradient twin
``model.grad.onnx`` and a sealed manifest) for a one-hidden-layer ReLU network; with
``bounds=True`` also an interval-bound (IBP) twin ``model.bounds.onnx`` built by hand
(center/radius through the linear layers, endpoints through ReLU). It needs the ``onnx`` package
(a dev/train dependency), not torch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dcs.robustness.manifest import (
    BOUNDS_FILE,
    EPS_NAME,
    GRAD_FILE,
    GRAD_NAME,
    INPUT_NAME,
    LABEL_NAME,
    LOGITS_NAME,
    LOWER_NAME,
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    UPPER_NAME,
    atomic_write_bytes,
    atomic_write_json,
    file_entry,
    seal,
)

OPSET = 17


@dataclass
class MLPWeights:
    w1: np.ndarray  # [D, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, K]
    b2: np.ndarray  # [K]

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x.reshape(len(x), -1) @ self.w1 + self.b1, 0.0)
        return (h @ self.w2 + self.b2).astype(np.float32)

    def loss_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = x.reshape(len(x), -1)
        pre = flat @ self.w1 + self.b1
        h = np.maximum(pre, 0.0)
        logits = h @ self.w2 + self.b2
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0
        dh = (p @ self.w2.T) * (pre > 0)
        return logits.astype(np.float32), (dh @ self.w1.T).reshape(x.shape).astype(np.float32)


def load_digits_nchw(n_train: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn 8x8 digits as float32 [N,1,8,8] in [0,1]; fixed 1,297/500 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    xtr, ytr, xte, yte = x[:1297], y[:1297], x[1297:], y[1297:]
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    return xtr, ytr, xte, yte


def fit_mlp(x: np.ndarray, y: np.ndarray, num_classes: int, hidden: int = 32, steps: int = 300,
            lr: float = 0.5, seed: int = 0) -> MLPWeights:
    """Full-batch gradient descent on cross-entropy; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(x.shape[1:]))
    w = MLPWeights(
        w1=(rng.standard_normal((d, hidden)) * np.sqrt(2.0 / d)).astype(np.float32),
        b1=np.zeros(hidden, np.float32),
        w2=(rng.standard_normal((hidden, num_classes)) * np.sqrt(1.0 / hidden)).astype(np.float32),
        b2=np.zeros(num_classes, np.float32),
    )
    flat = x.reshape(len(x), -1)
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    for _ in range(steps):
        gd_step(w, flat, onehot, lr)
    return w


def gd_step(w: MLPWeights, flat: np.ndarray, onehot: np.ndarray, lr: float) -> None:
    """One in-place full-batch gradient step on mean cross-entropy (flat inputs [N, D])."""
    pre = flat @ w.w1 + w.b1
    h = np.maximum(pre, 0)
    logits = h @ w.w2 + w.b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dlog = (p - onehot) / len(flat)
    dh = (dlog @ w.w2.T) * (pre > 0)
    w.w2 -= lr * h.T @ dlog
    w.b2 -= lr * dlog.sum(0)
    w.w1 -= lr * flat.T @ dh
    w.b1 -= lr * dh.sum(0)


def _graphs(w: MLPWeights, input_shape: Sequence[int]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = w.w2.shape[1]
    inits = [
        numpy_helper.from_array(w.w1.astype(np.float32), "w1"),
        numpy_helper.from_array(w.b1.astype(np.float32), "b1"),
        numpy_helper.from_array(w.w2.astype(np.float32), "w2"),
        numpy_helper.from_array(w.b2.astype(np.float32), "b2"),
    ]
    x_info = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *input_shape])
    logits_info = helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["N", k])
    forward = [
        helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "b2"], [LOGITS_NAME]),
    ]
    model = helper.make_model(
        helper.make_graph(forward, "mlp", [x_info], [logits_info], inits),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dcs.robustness.testing")

    grad_inits = inits + [
        numpy_helper.from_array(w.w1.T.copy().astype(np.float32), "w1t"),
        numpy_helper.from_array(w.w2.T.copy().astype(np.float32), "w2t"),
        numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "offon"),
        numpy_helper.from_array(np.array(k, np.int64), "depth"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    backward = forward + [
        helper.make_node("Softmax", [LOGITS_NAME], ["p"], axis=1),
        helper.make_node("OneHot", [LABEL_NAME, "depth", "offon"], ["onehot"], axis=1),
        helper.make_node("Sub", ["p", "onehot"], ["dlog"]),
        helper.make_node("MatMul", ["dlog", "w2t"], ["dh_raw"]),
        helper.make_node("Greater", ["pre", "zero"], ["mask_b"]),
        helper.make_node("Cast", ["mask_b"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["dh_raw", "mask"], ["dh"]),
        helper.make_node("MatMul", ["dh", "w1t"], ["dflat"]),
        helper.make_node("Shape", [INPUT_NAME], ["xshape"]),
        helper.make_node("Reshape", ["dflat", "xshape"], [GRAD_NAME]),
    ]
    y_info = helper.make_tensor_value_info(LABEL_NAME, TensorProto.INT64, ["N"])
    grad_info = helper.make_tensor_value_info(GRAD_NAME, TensorProto.FLOAT, ["N", *input_shape])
    grad_model = helper.make_model(
        helper.make_graph(backward, "mlp_grad", [x_info, y_info], [logits_info, grad_info], grad_inits),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dcs.robustness.testing")
    onnx.checker.check_model(model)
    onnx.checker.check_model(grad_model)
    return model, grad_model


def _bounds_graph(w: MLPWeights, input_shape: Sequence[int]):
    """IBP twin: (x, eps) -> (logits_lower, logits_upper) over the ε-ball ∩ [0, 1]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = w.w2.shape[1]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (w.w1, "w1"), (w.b1, "b1"), (w.w2, "w2"), (w.b2, "b2"), (np.abs(w.w1), "w1abs"),
        (np.abs(w.w2), "w2abs"), (np.array(0.0, np.float32), "zero"), (np.array(1.0, np.float32), "one"),
        (np.array(0.5, np.float32), "half"))]
    nodes = [
        helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1),
        helper.make_node("Abs", [EPS_NAME], ["e"]),
        helper.make_node("Sub", ["flat", "e"], ["lo_raw"]),
        helper.make_node("Add", ["flat", "e"], ["hi_raw"]),
        helper.make_node("Clip", ["lo_raw", "zero", "one"], ["lo0"]),
        helper.make_node("Clip", ["hi_raw", "zero", "one"], ["hi0"]),
        # layer 1: center/radius
        helper.make_node("Add", ["lo0", "hi0"], ["s0"]), helper.make_node("Mul", ["s0", "half"], ["c0"]),
        helper.make_node("Sub", ["hi0", "lo0"], ["d0"]), helper.make_node("Mul", ["d0", "half"], ["r0"]),
        helper.make_node("MatMul", ["c0", "w1"], ["c1m"]), helper.make_node("Add", ["c1m", "b1"], ["c1"]),
        helper.make_node("MatMul", ["r0", "w1abs"], ["r1"]),
        helper.make_node("Sub", ["c1", "r1"], ["lo1"]), helper.make_node("Add", ["c1", "r1"], ["hi1"]),
        helper.make_node("Relu", ["lo1"], ["lo2"]), helper.make_node("Relu", ["hi1"], ["hi2"]),
        # layer 2
        helper.make_node("Add", ["lo2", "hi2"], ["s2"]), helper.make_node("Mul", ["s2", "half"], ["c2"]),
        helper.make_node("Sub", ["hi2", "lo2"], ["d2"]), helper.make_node("Mul", ["d2", "half"], ["r2"]),
        helper.make_node("MatMul", ["c2", "w2"], ["c3m"]), helper.make_node("Add", ["c3m", "b2"], ["c3"]),
        helper.make_node("MatMul", ["r2", "w2abs"], ["r3"]),
        helper.make_node("Sub", ["c3", "r3"], [LOWER_NAME]), helper.make_node("Add", ["c3", "r3"], [UPPER_NAME]),
    ]
    x_info = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *input_shape])
    e_info = helper.make_tensor_value_info(EPS_NAME, TensorProto.FLOAT, [1])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", k]) for n in (LOWER_NAME, UPPER_NAME)]
    model = helper.make_model(helper.make_graph(nodes, "mlp_bounds", [x_info, e_info], outs, inits),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dcs.robustness.testing")
    onnx.checker.check_model(model)
    return model


def build_mlp_package(repo: str | Path, name: str, version: int, weights: MLPWeights,
                      input_shape: Sequence[int], labels: Sequence[str], dataset: str = "digits",
                      defense: str = "none", bounds: bool = False) -> Path:
    """Write a sealed package ``<repo>/<name>/<version>`` for an MLP; returns its path.

    ``bounds``: also write the IBP twin ``model.bounds.onnx`` (manifest ``bounds`` entry).
    """
    import onnx

    out = Path(repo) / name / str(version)
    out.mkdir(parents=True, exist_ok=True)
    model, grad_model = _graphs(weights, input_shape)
    atomic_write_bytes(out / MODEL_FILE, model.SerializeToString())
    atomic_write_bytes(out / GRAD_FILE, grad_model.SerializeToString())
    files = {MODEL_FILE: file_entry(out / MODEL_FILE), GRAD_FILE: file_entry(out / GRAD_FILE)}
    if bounds:
        atomic_write_bytes(out / BOUNDS_FILE, _bounds_graph(weights, input_shape).SerializeToString())
        files[BOUNDS_FILE] = file_entry(out / BOUNDS_FILE)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": int(version),
        "labels": [str(l) for l in labels],
        "input": {"name": INPUT_NAME, "shape": [int(d) for d in input_shape], "dtype": "float32",
                  "range": [0.0, 1.0], "layout": "NCHW"},
        "output": {"name": LOGITS_NAME, "num_classes": len(labels)},
        "dataset": dataset,
        "defense": {"kind": defense, "params": {}},
        "architecture": {"kind": "mlp", "hidden": int(weights.w1.shape[1])},
        "gradient": {"kind": "exact", "bpda_layers": [], "note": "analytic backward built by hand"},
        "opset": OPSET,
        "exporter": {"name": "dcs.robustness.testing", "onnx": onnx.__version__},
        "files": files,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if bounds:
        manifest["bounds"] = {"method": "ibp", "norm": "linf", "domain": "eps-ball clipped to [0, 1]",
                              "note": "hand-built: center/radius for the linear layers, endpoints for ReLU"}
    atomic_write_json(out / MANIFEST_FILE, seal(manifest))
    return out


def digits_package(repo: str | Path, name: str = "digits-mlp", version: int = 1,
                   hidden: int = 32, seed: int = 0, bounds: bool = False) -> tuple[Path, MLPWeights]:
    """Train a small MLP on 8x8 digits (~1 s) and write its package (``bounds``: with the IBP twin)."""
    xtr, ytr, _, _ = load_digits_nchw()
    w = fit_mlp(xtr, ytr, 10, hidden=hidden, seed=seed)
    path = build_mlp_package(repo, name, version, w, (1, 8, 8), [str(i) for i in range(10)], bounds=bounds)
    return path, w
