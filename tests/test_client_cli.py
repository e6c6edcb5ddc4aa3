"""The installed ``dcsctl`` console script, run as a subprocess against a real server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_token_file
from tests.server_helpers import start_server_process

ROOT = Path(__file__).resolve().parent.parent
DCSCTL = Path(sys.executable).parent / "dcsctl"
MODEL = "digits-mlp"
TOKEN = "cli-test-token"

pytestmark = pytest.mark.skipif(not DCSCTL.exists(), reason=f"{DCSCTL} is not installed")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return write_token_file(tmp_path_factory, TOKEN)


@pytest.fixture(scope="module")
def server(digits_repo, token_file):
    sp = start_server_process(digits_repo, "--audit-token-file", str(token_file), metrics=False)
    yield sp
    sp.stop()


def dcsctl(server, *args: str, token_file: Path | None = None, timeout: float = 60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCS_")}
    pre = ["--target", server.target, "--timeout", "10"]
    if token_file is not None:
        pre += ["--token-file", str(token_file)]
    return subprocess.run([str(DCSCTL), *pre, *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(res, rc: int, *needles: str) -> None:
    assert res.returncode == rc, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("dcsctl: error: ") and "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert res.stdout == ""


def test_models(server):
    res = dcsctl(server, "models")
    assert res.returncode == 0, res.stderr
    header, row = res.stdout.splitlines()[:2]
    assert header.split()[:3] == ["model", "version", "input"]
    assert row.split()[:4] == [MODEL, "1", "1x8x8", "10"]
    res = dcsctl(server, "models", "--json")
    models = json.loads(res.stdout)
    assert models[0]["name"] == MODEL and models[0]["input_shape"] == [1, 8, 8]


def test_classify_png_with_conversion_note(server, digits_test, tmp_path):
    x, y = digits_test
    # A 32x32 RGB PNG of a test digit: converted to gray and resized to 8x8, with notes.
    img = np.repeat(np.kron(np.round(x[0, 0] * 255).astype(np.uint8),
                            np.ones((4, 4), np.uint8))[..., None], 3, axis=2)
    png = tmp_path / "digit.png"
    Image.fromarray(img).save(png)
    res = dcsctl(server, "classify", "--model", MODEL, "--top-k", "3", str(png))
    assert res.returncode == 0, res.stderr
    assert "note:" in res.stderr and "resized from 32x32 to 8x8" in res.stderr
    assert "RGB to gray" in res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["input", "label", "prob", "next"]
    assert lines[1].split()[0] == str(png) and lines[1].split()[1] == str(y[0])

    res = dcsctl(server, "classify", "--model", MODEL, "--json", str(png))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["model"]["name"] == MODEL and len(out["model"]["sha256"]) == 64
    assert out["predictions"][0]["input"] == str(png)
    assert out["predictions"][0]["label"] == str(y[0]) and len(out["predictions"][0]["top"]) == 5
    assert any("resized" in n for n in out["notes"])


def test_classify_npy_batch_and_directory(server, digits_test, tmp_path):
    x, y = digits_test
    npy = tmp_path / "batch.npy"
    np.save(npy, x[:10])
    res = dcsctl(server, "-q", "classify", "--model", MODEL, "--json", str(npy))
    assert res.returncode == 0, res.stderr
    preds = json.loads(res.stdout)["predictions"]
    assert [p["input"] for p in preds] == [f"{npy}[{i}]" for i in range(10)]
    assert np.mean([p["index"] == t for p, t in zip(preds, y[:10])]) >= 0.8
    assert res.stderr == ""

    folder = tmp_path / "dir"
    folder.mkdir()
    np.save(folder / "one.npy", x[1, 0])  # [H, W]
    Image.fromarray(np.round(x[2, 0] * 255).astype(np.uint8)).save(folder / "two.png")
    res = dcsctl(server, "classify", "--model", MODEL, str(folder))
    assert res.returncode == 0, res.stderr
    rows = res.stdout.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [str(folder / "one.npy"), str(folder / "two.png")]
    assert [r.split()[1] for r in rows] == [str(y[1]), str(y[2])]


def test_classify_bad_inputs_fail_with_one_line(server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    assert_one_line_error(dcsctl(server, "classify", "--model", MODEL, str(text)), 2,
                          str(text), "not an image")

    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((8, 40), np.uint8)).save(wide)
    assert_one_line_error(dcsctl(server, "classify", "--model", MODEL, str(wide)), 2,
                          str(wide), "8x40", "cannot be converted")

    five = tmp_path / "five.npy"
    np.save(five, np.zeros((2, 2, 1, 8, 8), np.float32))
    assert_one_line_error(dcsctl(server, "classify", "--model", MODEL, str(five)), 2,
                          str(five), "rank 5")

    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((8, 8), np.nan, np.float32))
    assert_one_line_error(dcsctl(server, "classify", "--model", MODEL, str(nan)), 2, "NaN")

    assert_one_line_error(dcsctl(server, "classify", "--model", MODEL,
                                 str(tmp_path / "missing.png")), 2, "no such file")

    ok = tmp_path / "ok.npy"
    np.save(ok, np.zeros((8, 8), np.float32))
    assert_one_line_error(dcsctl(server, "classify", "--model", "nope", str(ok)), 1,
                          "NOT_FOUND", "'nope'")


def test_audit_progress_table_and_report(server, token_file, digits_test, tmp_path):
    x, y = digits_test
    examples = tmp_path / "examples.npz"
    np.savez(examples, x=x[:20], y=y[:20])
    out = tmp_path / "out"
    res = dcsctl(server, "audit", "--model", MODEL, "--examples", str(examples), "--attack",
                 "fgsm", "--attack", 'pgd:{"steps": 5}', "--eps", "0.1", "--seed", "1",
                 "--out", str(out), token_file=token_file)
    assert res.returncode == 0, res.stderr
    assert "audit job" in res.stderr and "100%" in res.stderr  # the tqdm bar reached the end
    report = json.loads((out / "report.json").read_text())
    assert report["n_examples"] == 20 and report["seed"] == 1
    assert f"wrote {out / 'report.json'}" in res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"{MODEL} v1 (sha256 {report['package']['sha256'][:12]}")
    assert lines[1] == f"clean accuracy: {100 * report['clean_accuracy']:.1f}%"
    assert lines[2].split() == ["robust", "accuracy", "eps=0.1*"]
    pgd = next(r for r in report["results"] if r["attack"] == "pgd")
    assert f"pgd {100 * pgd['robust_accuracy']:.1f}%" in [" ".join(ln.split()) for ln in lines]
    worst = report["worst_case"][0]["robust_accuracy"]
    assert f"worst case {100 * worst:.1f}%" in [" ".join(ln.split()) for ln in lines]
    if (out / "report.html").exists():
        assert "<html" in (out / "report.html").read_text().lower()

    job = res.stderr.split("audit job ", 1)[1].split()[0]
    out2 = tmp_path / "again"
    res = dcsctl(server, "report", job, "--out", str(out2), "--json", token_file=token_file)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == report == json.loads((out2 / "report.json").read_text())

    res = dcsctl(server, "audits", token_file=token_file)
    assert res.returncode == 0 and job in res.stdout and "succeeded" in res.stdout


def test_audit_errors_and_cancel(server, token_file, digits_test, tmp_path):
    x, y = digits_test
    examples = tmp_path / "examples.npz"
    np.savez(examples, x=x[:400], y=y[:400])
    assert_one_line_error(dcsctl(server, "audit", "--model", MODEL, "--examples", str(examples)),
                          1, "UNAUTHENTICATED")
    no_labels = tmp_path / "nolabels.npz"
    np.savez(no_labels, x=x[:3])
    assert_one_line_error(dcsctl(server, "audit", "--model", MODEL, "--examples", str(no_labels),
                                 token_file=token_file), 2, "no labels")
    assert_one_line_error(dcsctl(server, "report", "no-such-job", token_file=token_file), 1,
                          "NOT_FOUND", "no-such-job")

    res = dcsctl(server, "-q", "audit", "--model", MODEL, "--examples", str(examples),
                 "--detach", token_file=token_file)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip()
    res = dcsctl(server, "cancel", job, token_file=token_file)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == job
    res = dcsctl(server, "audits", "--json", token_file=token_file)
    assert job in [j["job_id"] for j in json.loads(res.stdout)]
