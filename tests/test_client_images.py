"""Unit tests for the client's image loading/conversion, errors, output helpers and CLI parsing
(no server)."""
from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from dcs.clients import cli
from dcs.clients.errors import (
    ClientError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from dcs.clients.images import (
    ImageError,
    Source,
    expand_inputs,
    load_file,
    load_for_model,
    to_model_input,
)
from tests.torchless import run_without_torch

ROOT = Path(__file__).resolve().parent.parent
GRAY = (1, 8, 8)
RGB = (3, 8, 8)


def _png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def test_png_gray_matches_model_exactly(tmp_path):
    arr = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
    batch = load_for_model([_png(tmp_path / "a.png", arr)], GRAY)
    assert batch.x.shape == (1, 1, 8, 8) and batch.x.dtype == np.float32
    np.testing.assert_allclose(batch.x[0, 0], arr / 255.0, atol=1e-6)
    assert batch.names == (str(tmp_path / "a.png"),) and batch.notes == ()


def test_rgb_png_to_gray_and_resize_is_noted(tmp_path, caplog):
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[..., 0] = 255  # pure red -> luma 0.299
    with caplog.at_level(logging.INFO, logger="dcs.clients.images"):
        batch = load_for_model([_png(tmp_path / "red.png", arr)], GRAY)
    assert batch.x.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(batch.x, 0.299, atol=1e-3)
    assert any("RGB to gray" in n for n in batch.notes)
    assert any("resized from 32x32 to 8x8" in n for n in batch.notes)
    assert "resized from 32x32 to 8x8" in caplog.text  # the note is logged, not only returned


def test_gray_to_rgb_and_alpha_dropped(tmp_path):
    gray = np.full((8, 8), 128, dtype=np.uint8)
    batch = load_for_model([_png(tmp_path / "g.png", gray)], RGB)
    assert batch.x.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(batch.x, 128 / 255, atol=1e-6)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = 10
    src = Source("rgba.npy", rgba)
    out = to_model_input([src], RGB)
    np.testing.assert_allclose(out.x[0, 1], 1.0)
    assert any("alpha" in n for n in out.notes)


def test_jpeg_loads(tmp_path):
    arr = np.full((16, 16, 3), 200, dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    batch = load_for_model([tmp_path / "a.jpg"], RGB)
    assert batch.x.shape == (1, 3, 8, 8)
    assert abs(float(batch.x.mean()) - 200 / 255) < 0.02


@pytest.mark.parametrize("shape,expect_n", [
    ((8, 8), 1), ((1, 8, 8), 1), ((8, 8, 1), 1), ((5, 8, 8), 5), ((4, 1, 8, 8), 4),
    ((4, 8, 8, 1), 4)])
def test_npy_layouts(tmp_path, shape, expect_n):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    batch = load_for_model([tmp_path / "x.npy"], GRAY)
    assert batch.x.shape == (expect_n, 1, 8, 8)
    np.testing.assert_allclose(np.sort(batch.x.ravel()), np.sort(x.ravel()), atol=1e-7)
    if expect_n > 1:
        assert batch.names[1] == f"{tmp_path / 'x.npy'}[1]"


def test_npz_with_labels_and_directory(tmp_path):
    x = (np.random.default_rng(1).random((3, 1, 8, 8)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([1, 2, 3]))
    _png(tmp_path / "b.png", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("ignored in a directory")
    assert [p.name for p in expand_inputs([tmp_path])] == ["b.png", "d.npz"]
    src = load_file(tmp_path / "d.npz")
    batch = to_model_input([src], GRAY)
    np.testing.assert_array_equal(batch.labels, [1, 2, 3])
    np.testing.assert_allclose(batch.x, x / 255.0, atol=1e-6)
    # A mix of labelled and unlabelled sources has no labels.
    assert load_for_model([tmp_path], GRAY).labels is None


def test_float_0_255_scaled_with_note():
    batch = to_model_input([Source("f.npy", np.full((8, 8), 255.0, dtype=np.float64))], GRAY)
    np.testing.assert_allclose(batch.x, 1.0)
    assert any("scaled by 1/255" in n for n in batch.notes)


@pytest.mark.parametrize("array,needle", [
    (np.full((8, 8), np.nan, dtype=np.float32), "NaN/Inf"),
    (np.full((8, 8), -0.5, dtype=np.float32), "expected [0, 1]"),
    (np.full((8, 8), 300, dtype=np.int32), "expected 0..255"),
    (np.zeros((2, 2, 2, 8, 8), dtype=np.float32), "rank 5"),
    (np.zeros((64,), dtype=np.float32), "rank 1"),
    (np.zeros((2, 5, 8, 7), dtype=np.float32), "no channel axis"),
    (np.zeros((2, 8, 8), dtype=np.float32).astype(np.float32)[:0], "empty"),
    (np.zeros((8, 32), dtype=np.uint8), "without distorting"),
    (np.array([["a"]]), "not numeric"),
])
def test_unconvertible_arrays(array, needle):
    with pytest.raises(ImageError) as info:
        to_model_input([Source("bad.npy", array)], GRAY)
    assert needle in str(info.value) and "bad.npy" in str(info.value)


def test_stretch_allows_aspect_change():
    batch = to_model_input([Source("wide.npy", np.zeros((8, 32), dtype=np.uint8))], GRAY,
                           stretch=True)
    assert batch.x.shape == (1, 1, 8, 8)


def test_channel_counts_without_a_conversion():
    with pytest.raises(ImageError, match="no channel axis"):
        to_model_input([Source("two.npy", np.zeros((2, 8, 8, 2), dtype=np.uint8))], RGB)
    with pytest.raises(ImageError, match="3 -> 2 is not a known conversion"):
        to_model_input([Source("rgb.npy", np.zeros((8, 8, 3), dtype=np.uint8))], (2, 8, 8))
    rgba = to_model_input([Source("rgba.npy", np.full((8, 8, 4), 255, dtype=np.uint8))], GRAY)
    np.testing.assert_allclose(rgba.x, 1.0, atol=1e-5)


def test_non_image_and_missing_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="not an image pillow can read"):
        load_file(tmp_path / "notes.txt")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="fake.png"):
        load_file(tmp_path / "fake.png")
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(ImageError, match="not a readable .npy"):
        load_file(tmp_path / "bad.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(ImageError, match="expected one named 'x'"):
        load_file(tmp_path / "two.npz")
    with pytest.raises(ImageError, match="no such file"):
        expand_inputs([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no image"):
        expand_inputs([tmp_path / "empty"])


# ---------------------------------------------------------------------------------------------
# errors


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code,cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
    (grpc.StatusCode.INTERNAL, ServerError), (grpc.StatusCode.DATA_LOSS, ServerError)])
def test_error_mapping(code, cls):
    err = from_rpc_error(_FakeRpcError(code, "field 'x' is bad"), "Classify")
    assert type(err) is cls and isinstance(err, ClientError)
    assert err.code is code and err.details == "field 'x' is bad" and err.method == "Classify"
    assert str(err) == f"{code.name}: field 'x' is bad"


# ---------------------------------------------------------------------------------------------
# CLI pieces (the subprocess tests against a real server are in test_client_cli.py)


def test_headline_table_from_report():
    report = {"package": {"name": "m", "version": 2, "sha256": "ab" * 32},
              "suite": {"name": "quick"},
              "n_examples": 20, "seed": 0, "clean_accuracy": 0.95,
              "headline": {"eps": 0.1, "robust_accuracy": 0.3},
              "results": [{"attack": "fgsm", "label": "FGSM", "eps": 0.1, "fixed_eps": False,
                           "robust_accuracy": 0.5, "attack_success_rate": 0.47},
                          {"attack": "pgd", "label": "PGD", "eps": 0.1, "fixed_eps": False,
                           "robust_accuracy": 0.3, "attack_success_rate": 0.68}],
              "worst_case": [{"eps": 0.1, "robust_accuracy": 0.3}],
              "checks": [{"name": "x", "status": "warn", "detail": "look"}]}
    report["results"].append({"attack": "rp2", "label": "RP2", "eps": 1.0, "fixed_eps": True,
                              "robust_accuracy": 0.8, "attack_success_rate": 0.1})
    report["results"].append({"attack": "fgsm", "label": "FGSM", "eps": 0.2, "fixed_eps": False,
                              "robust_accuracy": 0.1, "attack_success_rate": 0.9})
    report["worst_case"].append({"eps": 0.2, "robust_accuracy": 0.05})
    text = cli.headline_table(report)
    lines = text.splitlines()
    assert lines[0].startswith("m v2 (sha256 abababababab") and "suite quick" in lines[0]
    assert lines[1] == "clean accuracy: 95.0%"
    assert lines[2].split() == ["robust", "accuracy", "eps=0.1*", "eps=0.2", "fixed"]
    assert lines[3].split() == ["FGSM", "50.0%", "10.0%", "-"]
    assert lines[4].split() == ["PGD", "30.0%", "-", "-"]
    assert lines[5].split() == ["RP2", "-", "-", "80.0%"]
    assert lines[6].split() == ["worst", "case", "30.0%", "5.0%", "-"]
    assert "headline (*): worst-case robust accuracy 30.0% at eps 0.1" in text
    assert "check x: WARN look" in text


def test_format_table_aligns_numbers_right():
    text = cli.format_table(["name", "n"], [["a", 1], ["bbb", 100]])
    assert text.splitlines() == ["name    n", "a       1", "bbb   100"]


@pytest.mark.parametrize("argv,needle", [
    ([], "required"),
    (["classify", "x.png"], "--model"),
    (["classify", "--model", "m", "--top-k", "two", "x.png"], "invalid int value"),
    (["audit", "--model", "m"], "one of the arguments --dataset --examples is required"),
    (["audit", "--model", "m", "--dataset", "d", "--examples", "e.npz"], "not allowed with"),
    (["audit", "--model", "m", "--dataset", "d", "--limit", "0"], "--limit is 0"),
    (["audit", "--model", "m", "--dataset", "d", "--attack", "pgd:{bad"], "not JSON"),
    (["--ca", "ca.pem", "models"], "need --tls"),
    (["--token-file", "/nonexistent/token", "audits"], "--token-file"),
    (["classify", "--model", "m", "/nonexistent/a.png"], "no such file"),
    (["audits", "--state", "bogus"], "--state 'bogus'"),
])
def test_cli_usage_errors_are_one_line(argv, needle, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE, err
    assert err.count("\n") == 1 and err.startswith("dcsctl: error: ") and needle in err, err


def test_cli_audit_checks_out_dir_before_calling(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # --out under a regular file cannot be created: refused before any connection is tried.
    rc = cli.main(["--target", "127.0.0.1:9", "--retries", "0", "audit", "--model", "m",
                   "--dataset", "d", "--out", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "--out" in err and "UNAVAILABLE" not in err


def test_cli_in_process_leaves_the_callers_logging_as_it_was(capsys):
    lib = logging.getLogger("dcs.clients")
    before = (lib.handlers[:], lib.level, lib.propagate)
    rc = cli.main(["--target", "127.0.0.1:9", "--retries", "0", "--timeout", "2", "models"])
    assert rc == cli.EXIT_SERVER, capsys.readouterr().err
    # A handler bound to the command's stderr would outlive it (pytest closes that stream) and
    # swallow later records instead of letting them reach the caller's handlers.
    assert (lib.handlers[:], lib.level, lib.propagate) == before


def test_client_imports_without_torch():
    code = ("import sys\n"
            "import dcs.clients, dcs.clients.client, dcs.clients.cli, dcs.clients.images\n"
            "import dcs.clients.errors\n"
            "assert dcs.clients.cli.main(['--help']) == 0\n")
    res = run_without_torch(code, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "torch" not in res.stderr
