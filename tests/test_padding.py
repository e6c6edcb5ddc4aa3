"""Fixed batch shapes (robustness/padding.py): the padder's policy, and a package whose calls are
padded returns exactly what the unpadded package returns."""
from __future__ import annotations

import numpy as np
import pytest

from dcs.robustness.package import SessionOptions, load_package
from dcs.robustness.padding import BatchPadder, pad_rows
from dcs.robustness.testing import digits_package


def test_padder_pads_to_the_high_water_mark_and_skips_big_calls():
    p = BatchPadder(True, limit=100)
    assert [p.size_for(n) for n in (8, 3, 20, 1, 20)] == [8, 8, 20, 20, 20]
    assert p.size_for(500) == 500 and p.mark == 20  # above the limit: own size, mark unchanged
    assert p.size_for(0) == 20


def test_disabled_padder_keeps_every_size():
    p = BatchPadder(False)
    assert [p.size_for(n) for n in (8, 3, 20)] == [8, 3, 20] and p.mark == 0


def test_pad_rows_appends_zero_rows_and_keeps_dtype():
    a = np.arange(6, dtype=np.int64).reshape(3, 2)
    out = pad_rows(a, 5)
    assert out.dtype == np.int64 and out.shape == (5, 2)
    np.testing.assert_array_equal(out[:3], a)
    assert not out[3:].any()
    assert pad_rows(a, 3) is a and pad_rows(a, 2) is a


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    path, _ = digits_package(tmp_path_factory.mktemp("repo"), "digits-pad", 1, bounds=True)
    opts = {"device": "cpu", "intra_op_threads": 1}
    return (load_package(path, SessionOptions(**opts)),
            load_package(path, SessionOptions(static_batch=True, **opts)))


def test_cpu_sessions_are_not_padded_unless_asked(packages):
    plain, padded = packages
    assert plain.static_batch is False and padded.static_batch is True


def test_padded_calls_equal_unpadded_calls(packages, digits_test):
    plain, padded = packages
    x, y = digits_test
    for n in (64, 17, 64, 1, 40):  # shrinking and growing, as an attack's surviving set does
        xs, ys = x[:n], y[:n]
        np.testing.assert_allclose(padded.logits(xs), plain.logits(xs), rtol=1e-5, atol=1e-6)
        for got, want in zip(padded.loss_grad(xs, ys), plain.loss_grad(xs, ys)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(padded.logit_bounds(xs, 0.05), plain.logit_bounds(xs, 0.05)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert padded._padders["grad"].mark == 64
    assert padded.stats == plain.stats  # only real rows are counted
