"""The GPU benchmark's wiring (bench/gpu.py) without a GPU: it never measures CPU in the GPU's name.

With CUDA confirmed it runs benchmarks 1, 2 and 4 on ``device="cuda"`` with GPU-sized batches,
relabels their rows, and one failing benchmark does not hide the others. The numbers themselves
come from ``make bench`` on a GPU machine (bench/results/SUMMARY-cuda.md).
"""
from __future__ import annotations

import pytest

from bench import audit_speed, gpu, serving
from bench.common import PROVIDERS, Row, Sizes


def test_without_cuda_the_row_says_so(tmp_path):
    rows = gpu.bench_gpu(tmp_path, Sizes.make("quick"))
    assert len(rows) == 1 and rows[0].value is None
    assert rows[0].note.startswith(gpu.UNAVAILABLE)


def test_with_cuda_each_benchmark_runs_on_cuda_and_is_relabelled(monkeypatch, tmp_path):
    seen = {}

    def fake(name):
        def bench(repo, sizes):
            seen[name] = sizes
            if name == "batched":
                raise RuntimeError("no GPU here")
            return [Row(name, "requests/s", 1.0, 2.0, 0.5)]
        bench.__name__ = f"bench_{name}"
        return bench

    monkeypatch.setattr(gpu, "cuda_session_provider", lambda path: (gpu.CUDA, "Test GPU"))
    monkeypatch.setattr(serving, "bench_classify", fake("classify"))
    monkeypatch.setattr(serving, "bench_batched", fake("batched"))
    monkeypatch.setattr(audit_speed, "bench_audit", fake("audit"))
    rows = gpu.bench_gpu(tmp_path, Sizes.make("quick"))
    assert set(seen) == {"classify", "batched", "audit"}
    for sizes in seen.values():
        assert sizes.device == "cuda" and sizes.batch_sizes == gpu.GPU_BATCH_SIZES
        assert sizes.attack_batch == gpu.GPU_ATTACK_BATCH
    assert [r.bench for r in rows] == ["gpu"] * 3
    assert [r.figure for r in rows] == ["(1) requests/s [Test GPU]",
                                        "(2) benchmark raised [Test GPU]",
                                        "(4) requests/s [Test GPU]"]
    assert rows[1].passed is False and "no GPU here" in rows[1].note


@pytest.mark.filterwarnings("ignore:Specified provider")  # ORT warns, then falls back to CPU
def test_raw_reference_refuses_another_provider(tmp_path):
    import onnxruntime as ort

    if PROVIDERS["cuda"] in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    from dcs.robustness.testing import digits_package

    path, _ = digits_package(tmp_path, "digits-raw", 1)
    with pytest.raises(RuntimeError, match="did not load"):
        serving.raw_ort_seconds(path / "model.onnx", 1, 0.01, provider=PROVIDERS["cuda"],
                                shape=(1, 8, 8))
    seconds, provider = serving.raw_ort_seconds(path / "model.onnx", 4, 0.01, shape=(1, 8, 8))
    assert seconds > 0 and provider == PROVIDERS["cpu"]
