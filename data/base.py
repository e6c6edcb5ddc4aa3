"""The ``Dataset`` container, its error type and small array helpers shared by loaders."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(Exception):
    """A dataset cannot be found, read or understood; the message says which file and why."""


@dataclass(frozen=True)
class Dataset:
    """Train/test arrays: x float32 NCHW in [0, 1], y int64 class indices."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one example."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def check_dataset(ds: Dataset) -> Dataset:
    """Validate dtypes, ranges, shapes and labels; raise DataError naming the problem."""
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.ndim != 4 or x.dtype != np.float32:
            raise DataError(f"{ds.name}: x_{split} must be float32 NCHW, got {x.dtype} {x.shape}")
        if y.shape != (len(x),) or y.dtype != np.int64:
            raise DataError(f"{ds.name}: y_{split} must be int64 [{len(x)}], got {y.dtype} {y.shape}")
        if len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0 or not np.isfinite(x).all()):
            raise DataError(f"{ds.name}: x_{split} values must lie in [0, 1]")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(ds.class_names)):
            raise DataError(f"{ds.name}: y_{split} labels outside 0..{len(ds.class_names) - 1}")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"{ds.name}: train/test shapes differ: {ds.x_train.shape[1:]} vs {ds.x_test.shape[1:]}")
    if len(ds.x_train) == 0:
        raise DataError(f"{ds.name}: no training examples")
    return ds


def to_unit_float(x: np.ndarray, source: str) -> np.ndarray:
    """uint8 → /255; float/int already in [0, 1] kept; anything else is a DataError."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{source}: unsupported pixel dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise DataError(f"{source}: non-uint8 pixels must lie in [0, 1] "
                        f"(got min {x.min():.3g}, max {x.max():.3g})")
    return x


def stratified_split(y: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: within each class (after a seeded shuffle) the last
    ``ceil(test_fraction·n)`` examples go to test (at least one if the class has ≥ 2).
    Returns (train_idx, test_idx), each shuffled with the same local Generator."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(np.ceil(test_fraction * len(idx))) if len(idx) > 1 else 0
        train.append(idx[: len(idx) - n_test])
        test.append(idx[len(idx) - n_test:])
    tr, te = np.concatenate(train), np.concatenate(test)
    return tr[rng.permutation(len(tr))], te[rng.permutation(len(te))]


def resize_nchw(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of float [0,1] NCHW images to (H, W) with Pillow (per channel)."""
    from PIL import Image

    h, w = size
    if x.shape[2:] == (h, w):
        return x
    out = np.empty((len(x), x.shape[1], h, w), np.float32)
    for i in range(len(x)):
        for c in range(x.shape[1]):
            img = Image.fromarray(x[i, c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)
    return np.clip(out, 0.0, 1.0)
