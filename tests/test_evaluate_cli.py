"""``dcs evaluate`` and ``dcs compare`` end to end on a real ONNX digits package (torch-free)."""
from __future__ import annotations

import json

import pytest

from dcs.robustness.testing import digits_package
from dcs.training.cli import main


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    repo = tmp_path_factory.mktemp("cli-repo")
    a, _ = digits_package(repo, name="mlp-a", seed=0)
    b, _ = digits_package(repo, name="mlp-b", seed=2)
    return a, b


def test_evaluate_one_package_into_package(packages, tmp_path, capsys):
    a, _ = packages
    out = tmp_path / "out"
    rc = main(["evaluate", str(a), "--dataset", "digits", "--limit", "40", "--eps", "0.1,0.2",
               "--seed", "3", "--out", str(out), "--into-package", "--no-progress"])
    assert rc == 0
    d = json.loads((out / "report.json").read_text())
    assert d["seed"] == 3 and d["n_examples"] == 40 and d["suite"]["eps"] == [0.1, 0.2]
    assert d["package"]["name"] == "mlp-a" and len(d["package"]["sha256"]) == 64
    assert (out / "report.html").is_file()
    assert (a / "report.json").is_file() and (a / "report.html").is_file()
    text = capsys.readouterr().out
    assert "[PASS]" in text and "wrote" in text
    # the package still verifies with the report beside the manifest
    from dcs.robustness.package import load_package

    load_package(a)


def test_evaluate_two_packages_and_compare(packages, tmp_path, capsys):
    a, b = packages
    out = tmp_path / "two"
    rc = main(["evaluate", str(a), str(b), "--dataset", "digits", "--limit", "30", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| mlp-a v1 |" in table and "| mlp-b v1 |" in table
    md = tmp_path / "t.md"
    rc = main(["compare", str(out / "mlp-a-v1" / "report.json"), str(out / "mlp-b-v1"), "--out", str(md)])
    assert rc == 0
    assert "| model | clean | FGSM | BIM | PGD | APGD | Square | worst |" in md.read_text()


@pytest.mark.parametrize("extra, message", [
    (["--eps", "0.1,abc"], "--eps"),
    (["--eps", "1.5"], "--eps"),
    (["--suite", "nope"], "unknown suite"),
    (["--limit", "0"], "--limit"),
    (["--dataset", "no-such-dataset"], "no-such-dataset"),
])
def test_bad_arguments_fail_fast(packages, tmp_path, capsys, extra, message):
    a, _ = packages
    args = ["evaluate", str(a), "--dataset", "digits", "--out", str(tmp_path / "o"), "--no-progress"]
    # later flags win in argparse
    rc = main(args + extra)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


def test_missing_package_and_unwritable_out(packages, tmp_path, capsys):
    a, _ = packages
    assert main(["evaluate", str(tmp_path / "none"), "--dataset", "digits", "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["evaluate", str(a), "--dataset", "digits", "--out", str(blocker / "sub"), "--no-progress"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_compare_rejects_missing_report(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "r.json")]) == 2
    assert "no such report" in capsys.readouterr().err


def test_transfer_from_another_package(packages, tmp_path):
    a, b = packages
    out = tmp_path / "tr"
    rc = main(["evaluate", str(a), "--dataset", "digits", "--limit", "30", "--eps", "0.2", "--out", str(out),
               "--transfer-from", str(b), "--no-progress"])
    assert rc == 0
    d = json.loads((out / "report.json").read_text())
    tr = [r for r in d["results"] if r["attack"] == "transfer"]
    assert len(tr) == 1 and tr[0]["label"] == "Transfer from mlp-b v1"
    assert tr[0]["robust_accuracy"] < d["clean_accuracy"] and tr[0]["gradients"] > 0
