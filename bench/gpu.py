"""GPU (7): benchmarks 1, 2 and 4 with the CUDA execution provider, when one really loads.

CUDA is detected through an ORT session's ``get_providers()`` (a provider listed by
``get_available_providers()`` can still fail to load). Without it the row says
"CUDA provider not available" and nothing is measured on CPU in its name.
"""
from __future__ import annotations

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


def bench_gpu(repo: Path, sizes: Sizes) -> list[Row]:
    model_path = repo / PFE / "1" / "model.onnx"
    provider, device = cuda_session_provider(model_path)
    if provider != CUDA:
        print(f"gpu: {UNAVAILABLE} ({device})", flush=True)
        return [Row("gpu", "benchmarks 1, 2, 4 on CUDA", None, None, None, "", None, "",
                    f"{UNAVAILABLE}: {device}")]
    from bench.serving import raw_ort_seconds

    rows = []
    best = 0.0
    for b in sizes.batch_sizes:
        sec, _ = raw_ort_seconds(model_path, b, 1.0, provider=CUDA)
        best = max(best, b / sec)
    rows.append(Row("gpu", f"raw ORT images/s on {device}", best, None, None, "", None, "img/s",
                    "CUDA provider confirmed by session.get_providers(); server runs of 1, 2 "
                    "and 4 with --device cuda need the onnxruntime-gpu build (deploy/)"))
    return rows
