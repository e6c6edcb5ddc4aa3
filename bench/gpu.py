"""GPU (7): benchmarks 1, 2 and 4 with the CUDA execution provider, when one really loads.

CUDA is detected through an ORT session's ``get_providers()`` (a provider listed by
``get_available_providers()`` can still fail to load). Without it the row says
"CUDA provider not available" and nothing is measured on CPU in its name.
"""
from __future__ import annotations

import traceback
from dataclasses import replace
from pathlib import Path

from bench.common import PFE, Row, Sizes

CUDA = "CUDAExecutionProvider"
UNAVAILABLE = "CUDA provider not available"


def cuda_session_provider(model_path: Path) -> tuple[str, str]:
    """(provider a real session got, device description or the reason it is unavailable)."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return "CPUExecutionProvider", f"onnxruntime {ort.__version__} lists no {CUDA}"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(model_path), so, providers=[CUDA, "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises private types
        return "CPUExecutionProvider", f"session failed: {exc}"
    got = sess.get_providers()[0]
    if got != CUDA:
        return got, f"session fell back to {got}"
    name = ""
    try:
        import subprocess

        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return got, name or "CUDA device"


#: Client batch sizes for the batched benchmark on a GPU: throughput keeps growing far past the
#: CPU's best batch, so the sweep goes up to the largest batch that fits a 16 MiB message.
GPU_BATCH_SIZES = (16, 128, 512, 1024)
#: Attack batch on a GPU (both engines): a batch of 128 leaves an H200 idle between launches.
GPU_ATTACK_BATCH = 1000


def bench_gpu(repo: Path, sizes: Sizes) -> list[Row]:
    """Benchmarks 1 (classify vs echo), 2 (batched vs raw ORT) and 4 (audit speed) with the
    server, the references and the attack engine on CUDA; rows are relabelled ``gpu``."""
    model_path = repo / PFE / "1" / "model.onnx"
    provider, device = cuda_session_provider(model_path)
    if provider != CUDA:
        print(f"gpu: {UNAVAILABLE} ({device})", flush=True)
        return [Row("gpu", "benchmarks 1, 2, 4 on CUDA", None, None, None, "", None, "",
                    f"{UNAVAILABLE}: {device}")]
    from bench.audit_speed import bench_audit
    from bench.serving import bench_batched, bench_classify

    gpu_sizes = replace(sizes, device="cuda", model=PFE, shape=(1, 28, 28),
                        batch_sizes=(16,) if sizes.mode == "smoke" else GPU_BATCH_SIZES,
                        attack_batch=GPU_ATTACK_BATCH)
    rows: list[Row] = []
    for number, bench in (("1", bench_classify), ("2", bench_batched), ("4", bench_audit)):
        try:
            got = bench(repo, gpu_sizes)
        except Exception as exc:  # noqa: BLE001 - report it in the table, keep the others
            traceback.print_exc()
            got = [Row(bench.__name__, "benchmark raised", None, target="runs", passed=False,
                       note=f"{type(exc).__name__}: {exc}"[:500])]
        for r in got:
            r.extra["cpu_bench"] = r.bench
            r.bench = "gpu"
            r.figure = f"({number}) {r.figure} [{device}]"
        rows += got
    return rows
