"""Interrupt mid-epoch, resume, and get bitwise the same weights as an uninterrupted run."""
from __future__ import annotations

import json

import torch

from dcs.training.cli import main

torch.set_num_threads(1)
ARGS = ["--dataset", "digits", "--limit-train", "160", "--limit-test", "50", "--batch-size", "16",
        "--defense", "pfe", "--pfe-stages", "1,1,1", "--adv-train", "--adv-steps", "1", "--threads", "1",
        "--checkpoint-every", "4", "--seed", "3", "--no-progress"]


def _final(run_dir):
    return torch.load(run_dir / "final.pt", weights_only=False)


def test_resume_matches_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *ARGS, "--out", str(full)]) == 0
    assert main(["train", *ARGS, "--stop-after-batches", "17", "--out", str(cut)]) == 0  # epoch 2, batch 7 of 10
    assert not (cut / "final.pt").exists()
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["steps"]) == (1, 7, 17)
    assert main(["train", "--resume", "--no-progress", "--out", str(cut)]) == 0
    a, b = _final(full)["state_dict"], _final(cut)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((cut / "metrics.json").read_text())
    for ra, rb in zip(ma, mb, strict=True):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


def test_resume_without_checkpoint_is_one_line_error(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "config.json not found" in capsys.readouterr().err
