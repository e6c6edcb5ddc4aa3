"""The newcomer path, scaled down: scripts/demo.sh end to end as subprocesses on 8x8 digits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_demo_script_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "DEMO_OUT": str(out),
        "DEMO_DATASET": "digits",
        "DEMO_LIMIT_TRAIN": "600",
        "DEMO_AUDIT_LIMIT": "40",
        "DEMO_THREADS": "1",
        "DEMO_TRAIN_ARGS": "--no-progress --batch-size 32",
        "VENV": str(Path(sys.executable).parent.parent),
    }
    run = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=580, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = run.stdout
    for name in ("baseline", "polarizing"):
        assert (out / "models" / name / "1" / "manifest.json").is_file()
        report = json.loads((out / "audits" / name / "report.json").read_text())
        assert report["package"]["name"] == name
        assert report["n_examples"] == 40
        assert (out / "audits" / name / "report.html").is_file()
    assert "| baseline v1 |" in text and "| polarizing v1 |" in text   # the headline table
    assert "server stopped" in text
    assert "Took " in text

    # Re-running reuses the trained runs and packages instead of training again.
    again = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=580, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") >= 4
