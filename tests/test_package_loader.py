"""The torch-free package loader: sha256 verification, manifest digest, oracle behaviour."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dcs.robustness.manifest import PackageError, seal
from dcs.robustness.package import load_package
from dcs.robustness.testing import digits_package, load_digits_nchw
from tests.torchless import run_without_torch


@pytest.fixture()
def pkg_dir(tmp_path):
    path, _ = digits_package(tmp_path)
    return path


def test_loads_and_answers_like_numpy(pkg_dir):
    _, w = digits_package(pkg_dir.parent.parent / "again")
    pkg = load_package(pkg_dir)
    _, _, x, y = load_digits_nchw()
    assert pkg.num_classes == 10 and pkg.input_shape == (1, 8, 8)
    np.testing.assert_allclose(pkg.logits(x[:7]), w.logits(x[:7]), atol=1e-5)
    _logits, grad = pkg.loss_grad(x[:7], y[:7])
    np.testing.assert_allclose(grad, w.loss_grad(x[:7], y[:7])[1], atol=1e-5)
    assert grad.shape == x[:7].shape
    assert (pkg.logits(x).argmax(1) == y).mean() > 0.85


@pytest.mark.parametrize("fname", ["model.onnx", "model.grad.onnx"])
def test_flipped_byte_is_refused_naming_the_file(pkg_dir, fname):
    data = bytearray((pkg_dir / fname).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (pkg_dir / fname).write_bytes(bytes(data))
    with pytest.raises(PackageError, match=fname.replace(".", r"\.")):
        load_package(pkg_dir)


def test_hand_edited_manifest_is_refused(pkg_dir):
    m = json.loads((pkg_dir / "manifest.json").read_text())
    m["labels"][0] = "zero"
    (pkg_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="manifest"):
        load_package(pkg_dir)


@pytest.mark.parametrize(("label", "shown"), [(3, r"3 \(int\)"), ("\ud800", r"'\\ud800' \(str\)")])
def test_labels_that_are_not_utf8_strings_are_refused(pkg_dir, label, shown):
    m = json.loads((pkg_dir / "manifest.json").read_text())
    m["labels"][3] = label  # a re-sealed manifest: the digest is right, the entry is not
    (pkg_dir / "manifest.json").write_text(json.dumps(seal(m)))
    with pytest.raises(PackageError, match="labels must be UTF-8 strings, got " + shown):
        load_package(pkg_dir)


def test_missing_file_is_refused(pkg_dir):
    (pkg_dir / "model.grad.onnx").unlink()
    with pytest.raises(PackageError, match="model.grad.onnx"):
        load_package(pkg_dir)


def test_wrong_input_shape_is_a_clear_error(pkg_dir):
    pkg = load_package(pkg_dir)
    with pytest.raises(ValueError, match="does not match"):
        pkg.logits(np.zeros((2, 1, 9, 9), np.float32))


def test_loader_works_with_torch_blocked(pkg_dir):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from dcs.robustness.package import load_package\n"
        f"p = load_package({str(pkg_dir)!r})\n"
        "l, g = p.loss_grad(np.zeros((3, 1, 8, 8), np.float32), np.zeros(3, np.int64))\n"
        "assert g.shape == (3, 1, 8, 8)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    out = run_without_torch(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
