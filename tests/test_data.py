"""Dataset loaders on tiny fixtures: IDX (incl. corrupt files), npz layouts, PNG folders, LISA CSV."""
from __future__ import annotations

import dataclasses
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcs.data import DataError, Dataset, load_dataset
from dcs.data.idx import read_idx
from dcs.data.registry import FMNIST_FILES


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fmnist(root: Path, n_train: int = 12, n_test: int = 6) -> None:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28)), "y_train": np.arange(n_train) % 10,
              "x_test": rng.integers(0, 256, (n_test, 28, 28)), "y_test": np.arange(n_test) % 10}
    for key, name in FMNIST_FILES.items():
        (root / name).write_bytes(gzip.compress(_idx_bytes(np.asarray(arrays[key]))))


def test_fmnist_from_data_dir(tmp_path):
    _write_fmnist(tmp_path)
    ds = load_dataset("fmnist", str(tmp_path), limit_train=10)
    assert isinstance(ds, Dataset)
    assert ds.x_train.shape == (10, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.input_shape == (1, 28, 28) and len(ds.class_names) == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "x"  # type: ignore[misc]


def test_fmnist_truncated_file_names_it(tmp_path):
    _write_fmnist(tmp_path)
    path = tmp_path / FMNIST_FILES["x_train"]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated"):
        load_dataset("fmnist", str(tmp_path))


def test_fmnist_wrong_magic_names_it(tmp_path):
    _write_fmnist(tmp_path)
    path = tmp_path / FMNIST_FILES["y_test"]
    path.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + b"\0" * 20))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: not an IDX file"):
        load_dataset("fmnist", str(tmp_path))


def test_fmnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        load_dataset("fmnist", str(tmp_path / "nowhere"))


def test_idx_reader_rank_and_raw_files(tmp_path):
    p = tmp_path / "a.idx"
    p.write_bytes(_idx_bytes(np.arange(6).reshape(2, 3)))
    assert read_idx(p).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(DataError, match="expected 3-d"):
        read_idx(p, expect_ndim=3)
    p.write_bytes(_idx_bytes(np.arange(6).reshape(2, 3)) + b"xx")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(p)


def test_digits_matches_robustness_split():
    from dcs.robustness.testing import load_digits_nchw

    ds = load_dataset("digits")
    xtr, _, _, yte = load_digits_nchw()
    assert np.array_equal(ds.x_train, xtr) and np.array_equal(ds.y_test, yte)
    assert ds.input_shape == (1, 8, 8)


def test_mnist5k_stratified_split():
    ds = load_dataset("mnist5k", limit_test=300)
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (300, 1, 28, 28)
    assert np.bincount(ds.y_train, minlength=10).tolist() == [400] * 10
    assert len(np.unique(ds.y_train[:50])) > 5  # shuffled, not sorted by class


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_float", "nhw_uint8"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    if layout == "nhwc_uint8":
        x = rng.integers(0, 256, (20, 6, 5, 3)).astype(np.uint8)
    elif layout == "nchw_float":
        x = rng.random((20, 3, 6, 5)).astype(np.float32)
    else:
        x = rng.integers(0, 256, (20, 6, 5)).astype(np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    c = 1 if layout == "nhw_uint8" else 3
    assert ds.input_shape == (c, 6, 5)
    assert len(ds.x_train) + len(ds.x_test) == 20 and len(ds.x_test) == 4  # 20% per class
    assert ds.class_names == ("0", "1", "2", "3")


def test_npz_explicit_split_and_errors(tmp_path):
    x = np.zeros((4, 1, 3, 3), np.float32)
    np.savez(tmp_path / "ok.npz", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x[:2], y_test=np.array([1, 0]),
             class_names=np.array(["a", "b"]))
    ds = load_dataset(f"npz:{tmp_path / 'ok.npz'}")
    assert ds.class_names == ("a", "b") and len(ds.x_test) == 2
    np.savez(tmp_path / "bad.npz", x=np.full((4, 3, 3), 7.0), y=np.arange(4))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "keys.npz", images=x)
    with pytest.raises(DataError, match="expected keys"):
        load_dataset(f"npz:{tmp_path / 'keys.npz'}")


def test_folder_of_pngs(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "emu"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert ds.class_names == ("cat", "dog", "emu")
    assert ds.input_shape == (3, 16, 16)
    assert len(ds.x_train) == 12 and len(ds.x_test) == 3
    assert sorted(np.bincount(ds.y_test).tolist()) == [1, 1, 1]


def test_folder_grayscale_train_test_dirs(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.fromarray(np.full((7, 7), 200, np.uint8)).save(d / "x.png")
    ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert ds.input_shape == (1, 8, 8) and len(ds.x_train) == 2 and len(ds.x_test) == 2
    assert np.allclose(ds.x_train, 200 / 255, atol=1e-3)


def _write_lisa(root: Path) -> None:
    rows = [("Filename;Annotation tag;Upper left corner X;Upper left corner Y;Lower right corner X;"
             "Lower right corner Y;Occluded,On another road")]
    (root / "aiua").mkdir()
    tags = ["stop"] * 6 + ["yield"] * 4 + ["merge"] * 2
    for i, tag in enumerate(tags):
        img = np.zeros((40, 50, 3), np.uint8)
        img[5:25, 10:30] = (255, 0, 0) if tag == "stop" else (0, 255, 0)
        name = f"aiua/frame{i}.png"
        Image.fromarray(img).save(root / name)
        rows.append(f"{name};{tag};10;5;29;24;0,0")
    (root / "allAnnotations.csv").write_text("\n".join(rows) + "\n")


def test_lisa_layout_top_n_crops(tmp_path):
    _write_lisa(tmp_path)
    ds = load_dataset(f"lisa2:{tmp_path}")
    assert ds.class_names == ("stop", "yield")
    assert ds.input_shape == (3, 32, 32)
    assert len(ds.x_train) + len(ds.x_test) == 10
    stop = np.concatenate([ds.x_train[ds.y_train == 0], ds.x_test[ds.y_test == 0]])
    assert np.allclose(stop[:, 0], 1.0, atol=1e-3) and np.allclose(stop[:, 1], 0.0, atol=1e-3)  # crop = red box only
    assert load_dataset(f"lisa:{tmp_path / 'allAnnotations.csv'}", top_n=3).num_classes == 3


def test_lisa_missing_columns(tmp_path):
    (tmp_path / "a.csv").write_text("Filename;Tag\nx.png;stop\n")
    with pytest.raises(DataError, match="missing columns"):
        load_dataset(f"lisa:{tmp_path}")


@pytest.mark.parametrize("name", ["imagenet", "npz:", "digits:extra", "lisa:/no/such/dir"])
def test_unknown_or_bad_names(name):
    with pytest.raises(DataError):
        load_dataset(name)


def test_data_package_is_torch_free():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from dcs.data import load_dataset\n"
            "print(load_dataset('digits', limit_train=5).input_shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(1, 8, 8)"
