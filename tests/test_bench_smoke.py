"""The benchmark harness runs end to end in its seconds-long ``--smoke`` mode (digits MLP).

Checks the wiring only (servers start, load generators report, the table and files are written),
never the numbers: targets are measured by ``make bench``, not by timed tests.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


#: the ModelInfer rows drive the server with tritonclient (dev extra); left out without it
TRITON = importlib.util.find_spec("tritonclient") is not None


def test_bench_smoke(tmp_path):
    out = tmp_path / "results"
    only = "classify,infer,batching,gpu" if TRITON else "classify,batching,gpu"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--only", only,
         "--out", str(out)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={"DCS_BENCH_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
             "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| bench | figure | value | reference | ratio | target | result |" in proc.stdout
    assert "CUDA provider not available" in proc.stdout or "CUDAExecutionProvider" in proc.stdout
    files = list(out.glob("*-smoke.json"))
    assert len(files) == 1 and (out / "SUMMARY.md").exists()
    data = json.loads(files[0].read_text())
    assert data["machine"]["cpus"] and data["machine"]["provider"]
    benches = {r["bench"] for r in data["rows"]}
    assert {"classify", "batching", "gpu"} <= benches
    assert not [r for r in data["rows"] if r["figure"] == "benchmark raised"], data["rows"]
    rps = [r for r in data["rows"] if r["bench"] == "classify" and r["unit"] == "req/s"]
    assert rps and all(r["value"] > 0 and r["reference"] > 0 for r in rps)
    floors = [r["figure"] for r in rps if "floor" in r["figure"]]
    assert any("batching floor" in f for f in floors) and any("model floor" in f for f in floors)
    # ModelInfer through tritonclient (aio at N=1 and 8, sync at 8), the model floor, and
    # Classify through the project's Client: every row measured against the echo, no errors
    if not TRITON:
        return
    infer = [r for r in data["rows"] if r["bench"] == "infer" and r["unit"] == "req/s"]
    figures = " | ".join(r["figure"] for r in infer)
    for part in ("ModelInfer N=1 (tritonclient.grpc.aio)", "ModelInfer N=8 (tritonclient.grpc)",
                 "model floor", "via dcs Client"):
        assert part in figures, figures
    assert all(r["value"] > 0 and r["reference"] > 0 for r in infer), infer
    assert all(not r["extra"].get("server", {}).get("errors") for r in infer), infer
