"""``dcs train``: one-line errors with exit code 2, a tiny full run, config files, load_trained."""
from __future__ import annotations

import json

import pytest
import torch

from dcs.training.cli import main

torch.set_num_threads(1)
QUICK = ["--dataset", "digits", "--limit-train", "96", "--limit-test", "40", "--threads", "1", "--no-progress"]


def _one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dcs train: error:") and match in err, err


@pytest.mark.parametrize("argv,match", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "fmnist", "--data-dir", "/nonexistent/fm"], "apt-get install dataset-fashion-mnist"),
    (["--dataset", "digits", "--blur-kernel", "4", "--defense", "blur_input"], "blur_kernel must be one of 3, 5, 7"),
    (["--dataset", "digits", "--lr", "fast"], "--lr: invalid value 'fast'"),
    (["--dataset", "digits", "--defense", "magic"], "defense must be one of"),
    (["--dataset", "digits", "--arch", "vgg"], "arch must be one of"),
    (["--dataset", "digits", "--defense", "pfe", "--pfe-stages", "1,x,1"], "--pfe-stages: invalid value"),
    (["--dataset", "digits", "--defense", "pfe", "--pfe-stages", "1,1"], "pfe_stages must be three"),
    (["--dataset", "digits", "--batch-size", "0"], "batch_size must be > 0"),
    (["--dataset", "digits", "--device", "tpu"], "device must be one of"),
    (["--dataset", "digits", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml not found"),
    (["--dataset", "npz:/nonexistent.npz"], "npz file not found"),
])
def test_user_errors_one_line_exit_2(tmp_path, capsys, argv, match):
    _one_line_error(capsys, ["train", *argv, "--out", str(tmp_path / "run")], match)
    assert not (tmp_path / "run").exists()  # failed before creating anything


def test_argparse_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "digits"])  # --out missing
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err


def test_tiny_run_writes_run_dir_and_loads(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("arch: lisa_cnn\nepochs: 5\ndefense:\n  kind: learned_blur\n  blur_kernel: 3\n  alpha: 0.01\n")
    assert main(["train", *QUICK, "--config", str(cfg), "--epochs", "2", "--out", str(out)]) == 0
    assert "test acc" in capsys.readouterr().out
    for f in ("config.json", "checkpoint.pt", "final.pt", "metrics.json", "metrics.csv", "curve.png"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "lisa_cnn" and config["epochs"] == 2  # flag overrides file
    assert config["defense"]["kind"] == "learned_blur" and config["defense"]["alpha"] == 0.01
    assert config["seed"] == 0 and config["threads"] == 1 and config["data"]["input_shape"] == [1, 8, 8]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["regularizer"] > 0 for m in metrics)
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,stage,lambda,lr,loss")

    from dcs.training.runs import load_trained

    run = load_trained(out)
    assert not run.model.training and run.input_shape == (1, 8, 8) and run.dataset == "digits"
    assert run.class_names == tuple(str(i) for i in range(10))
    assert run.defense["kind"] == "learned_blur" and run.defense["adversarial_training"] is None
    assert run.model(torch.rand(3, 1, 8, 8)).shape == (3, 10)

    _one_line_error(capsys, ["train", *QUICK, "--out", str(out)], "already holds a run")
    _one_line_error(capsys, ["train", "--resume", "--lr", "0.1", "--out", str(out)], "do not pass lr")


def test_pfe_adversarial_run_manifest_fields(tmp_path):
    out = tmp_path / "pfe"
    argv = ["train", *QUICK, "--defense", "pfe", "--pfe-stages", "1,1,1", "--adv-train", "--adv-steps", "2",
            "--adv-eps-warmup", "1.5", "--out", str(out)]
    assert main(argv) == 0
    from dcs.training.runs import load_trained

    run = load_trained(out)
    assert run.defense["kind"] == "pfe" and run.defense["pfe_c"] == 0.25 and run.defense["pfe_stages"] == [1, 1, 1]
    adv = run.defense["adversarial_training"]
    assert adv["eps"] == 0.1 and adv["steps"] == 2 and adv["step_size"] == pytest.approx(0.125)
    assert adv["surrogate"] == "straight-through"
    sat = run.model.front_end.saturation
    assert sat.enabled and not sat.straight_through
    stages = [m["stage"] for m in json.loads((out / "metrics.json").read_text())]
    assert stages == [1, 2, 3]


def test_pfe_adversarial_training_through_a_tanh_surrogate(tmp_path, capsys):
    """``--adv-surrogate tanh:TAU`` trains against PGD through the smooth surrogate (issue 25, item 6);
    the choice is recorded in config.json and the manifest's defense record, and a different
    surrogate gives different weights."""
    base = ["train", *QUICK, "--defense", "pfe", "--pfe-stages", "0,0,1", "--adv-train", "--adv-steps", "2"]
    for name, extra in (("st", []), ("tanh", ["--adv-surrogate", "tanh:0.05"])):
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0
    from dcs.training.runs import load_trained

    st, smooth = load_trained(tmp_path / "st"), load_trained(tmp_path / "tanh")
    assert smooth.defense["adversarial_training"]["surrogate"] == "tanh:0.05"
    assert json.loads((tmp_path / "tanh" / "config.json").read_text())["adv"]["surrogate"] == "tanh:0.05"
    a, b = st.model.state_dict(), smooth.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained on other adversarial examples
    _one_line_error(capsys, [*base, "--adv-surrogate", "tanh:-1", "--out", str(tmp_path / "bad")],
                    "adv_surrogate must be 'straight-through' or 'tanh:TAU'")
    _one_line_error(capsys, ["train", *QUICK, "--adv-train", "--adv-surrogate", "tanh:0.1",
                             "--out", str(tmp_path / "bad2")], "only applies to --defense pfe")


def test_config_resolution_defaults_and_round_trip():
    from dcs.training.config import ConfigError, TrainConfig

    cfg = TrainConfig.from_dict({"dataset": "mnist5k", "defense": "pfe", "lr": "1e-3", "adv_train": True}).resolved()
    assert cfg.pfe_stages == (20, 20, 20) and cfg.epochs == 60 and cfg.lr_milestones == (50,)  # the paper's schedule
    assert cfg.defense.pfe_c == 0.5 and cfg.defense.pfe_sigma1 == 0.35 and cfg.defense.pfe_sigma2 == 0.15
    assert cfg.adv.eps == 0.3 and cfg.adv.steps == 40 and cfg.adv.step_size == pytest.approx(2.5 * 0.3 / 40)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({"defense": "pfe", "epochs": 7}).resolved().pfe_stages == (2, 2, 3)
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        TrainConfig.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="must equal the sum"):
        TrainConfig.from_dict({"defense": "pfe", "epochs": 5, "pfe_stages": [1, 1, 1]})
    # ε warm-up: linear from 0 over the given epochs, step size scaled alike, then constant
    warm = TrainConfig.from_dict({"dataset": "mnist5k", "defense": "advtrain", "adv_steps": 10,
                                  "adv_eps_warmup": 4}).resolved().adv
    assert warm.eps_at(0.0) == (0.0, 0.0)
    assert warm.eps_at(1.0) == pytest.approx((0.075, 0.25 * 0.075))
    assert warm.eps_at(4.0) == warm.eps_at(9.0) == pytest.approx((0.3, 0.075))
    assert cfg.adv.eps_at(0.0) == (cfg.adv.eps, cfg.adv.step_size)  # off by default
    with pytest.raises(ConfigError, match="adv_eps_warmup"):
        TrainConfig.from_dict({"defense": "advtrain", "adv_eps_warmup": -1})


def test_threads_from_env(monkeypatch):
    from dcs.training.seeding import resolve_threads

    monkeypatch.setenv("DCS_THREADS", "3")
    assert resolve_threads(None) == 3 and resolve_threads(1) == 1


def test_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--bogus", "1", "--out", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "dcs train: error: unrecognized arguments: --bogus 1"


def test_subprocess_missing_data_dir(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    dcs = Path(sys.executable).with_name("dcs")
    cmd = [str(dcs)] if dcs.exists() else [sys.executable, "-m", "dcs.training.cli"]
    proc = subprocess.run([*cmd, "train", "--dataset", "fmnist", "--data-dir", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "run")], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--data-dir" in lines[0] and "Traceback" not in proc.stderr
