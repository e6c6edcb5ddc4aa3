"""Package writing: standin ops, tampering, torch-free loading, versions, atomicity and the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from dcs.robustness.manifest import PackageError
from dcs.robustness.package import SessionOptions, load_package
from dcs.training.export import package_writer
from dcs.training.export.package_writer import ExportError, PackageSpec, write_package
from dcs.training.export.standins import StandinLISA, StandinPFE
from dcs.training.export.twin import bpda, reference_loss_grad
from dcs.training.export.verify import grad_agreement
from tests.torchless import run_without_torch

CPU = SessionOptions(device="cpu", intra_op_threads=1)


def _spec(name: str, shape, k: int) -> PackageSpec:
    return PackageSpec(name=name, labels=[str(i) for i in range(k)], input_shape=shape,
                       dataset="random", defense={"kind": "standin"}, architecture={"arch": name})


def _standin(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return (StandinPFE(), (1, 16, 16), 10) if kind == "pfe" else (StandinLISA(), (3, 16, 16), 5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both standins exported once: {kind: (model, shape, k, ExportResult)}."""
    torch.set_num_threads(1)
    repo = tmp_path_factory.mktemp("repo")
    out = {}
    for kind in ("pfe", "lisa"):
        model, shape, k = _standin(kind)
        out[kind] = (model, shape, k, write_package(model, repo, _spec(kind, shape, k)))
    return out


@pytest.mark.parametrize("kind", ["pfe", "lisa"])
def test_standin_twin_matches_torch(exported, kind):
    """Covers L1-normalized conv + BPDA saturation, 'same' strided conv, output_padding, depthwise."""
    model, shape, k, result = exported[kind]
    pkg = load_package(result.path, CPU)
    x = np.random.default_rng(1).random((7, *shape), dtype=np.float32)
    y = np.arange(7, dtype=np.int64) % k
    with bpda(model) as layers:
        ref_logits, ref_grad = reference_loss_grad(model, torch.from_numpy(x), torch.from_numpy(y))
    assert result.gradient["bpda_layers"] == layers == (["sat"] if kind == "pfe" else [])
    assert np.abs(pkg.logits(x) - ref_logits.numpy()).max() <= 1e-4
    rel, cos = grad_agreement(pkg.loss_grad(x, y)[1], ref_grad.numpy())
    assert rel <= 1e-3 and cos >= 0.999


@pytest.mark.parametrize("fname", ["model.onnx", "model.grad.onnx", "model.probe.onnx",
                                   "model.bounds.onnx"])
def test_flipped_byte_is_refused_naming_the_file(exported, tmp_path, fname):
    pkg_dir = shutil.copytree(exported["pfe"][3].path, tmp_path / "m" / "1")
    data = bytearray((pkg_dir / fname).read_bytes())
    data[len(data) // 2] ^= 0x01
    (pkg_dir / fname).write_bytes(bytes(data))
    with pytest.raises(PackageError, match=fname.replace(".", r"\.")):
        load_package(pkg_dir, CPU)


def test_hand_edited_manifest_is_refused(exported, tmp_path):
    pkg_dir = shutil.copytree(exported["pfe"][3].path, tmp_path / "m" / "1")
    m = json.loads((pkg_dir / "manifest.json").read_text())
    m["gradient"]["kind"] = "exact"
    (pkg_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="manifest.json"):
        load_package(pkg_dir, CPU)


def test_exported_package_loads_with_torch_blocked(exported):
    path = exported["lisa"][3].path
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from dcs.robustness.package import load_package\n"
        f"p = load_package({str(path)!r})\n"
        "l, g = p.loss_grad(np.zeros((2, 3, 16, 16), np.float32), np.zeros(2, np.int64))\n"
        "assert g.shape == (2, 3, 16, 16) and l.shape == (2, 5)\n"
        "assert sorted(p.probe(np.zeros((1, 3, 16, 16), np.float32))) == ['features', 'weights']\n"
        "lo, hi = p.logit_bounds(np.full((2, 3, 16, 16), 0.5, np.float32), 0.1)\n"
        "assert lo.shape == (2, 5) and (lo <= hi).all()\n"
        "print('ok')\n"
    )
    out = run_without_torch(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_existing_version_is_refused_and_next_free_is_used(exported):
    model, shape, k, result = exported["pfe"]
    repo = result.path.parent.parent
    with pytest.raises(ExportError, match="already exists"):
        write_package(model, repo, _spec("pfe", shape, k), version=result.version)
    assert package_writer.resolve_version(repo, "pfe", None, False) == result.version + 1
    with pytest.raises(ExportError, match="invalid model name"):
        package_writer.resolve_version(repo, "../x", None, False)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model, shape, k = _standin("lisa")

    def boom(*args, **kwargs):
        raise RuntimeError("twin export failed")

    monkeypatch.setattr(package_writer, "export_twin_onnx", boom)
    with pytest.raises(RuntimeError, match="twin export failed"):
        write_package(model, tmp_path, _spec("lisa", shape, k), version=1)
    assert list((tmp_path / "lisa").iterdir()) == []


def test_force_replaces_a_version(exported, tmp_path):
    _model, shape, k, result = exported["lisa"]
    repo = tmp_path / "repo"
    shutil.copytree(result.path, repo / "lisa" / "1")
    other, _, _ = _standin("lisa", seed=5)
    new = write_package(other, repo, _spec("lisa", shape, k), version=1, force=True, bounds=False)
    assert new.path == repo / "lisa" / "1"
    assert sorted(p.name for p in (repo / "lisa").iterdir()) == ["1"]
    assert not (new.path / "model.bounds.onnx").exists()
    pkg = load_package(new.path, CPU)
    assert pkg.sha256 != json.loads((result.path / "manifest.json").read_text())["files"]["model.onnx"]["sha256"]


def test_cli_export_then_verify(tmp_path, capsys):
    from dcs.training.cli import main
    from dcs.training.export.fixtures import write_untrained_run

    run_dir = write_untrained_run(tmp_path / "run", "pfe_cnn", "pfe", (1, 16, 16), 10, seed=2)
    other = write_untrained_run(tmp_path / "other", "pfe_cnn", "pfe", (1, 16, 16), 10, seed=9)
    repo = tmp_path / "models"
    assert main(["export", str(run_dir), "--repo", str(repo), "--name", "fm-pfe"]) == 0
    pkg_dir = repo / "fm-pfe" / "1"
    manifest = json.loads((pkg_dir / "manifest.json").read_text())
    assert manifest["gradient"]["kind"] == "bpda" and manifest["training"]["epochs"] == 60
    assert manifest["defense"]["pfe_c"] == 0.25 and manifest["defense"]["pfe_stages"] == [20, 20, 20]
    capsys.readouterr()
    assert main(["verify", str(pkg_dir), "--run", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "twin gradient == torch autograd (bpda)" in table and "FAIL" not in table
    assert "logits inside bounds" in table
    assert main(["verify", str(pkg_dir), "--run", str(other)]) == 1
    assert "FAIL" in capsys.readouterr().out
    # refused before any work; one-line error, exit code 2
    assert main(["export", str(run_dir), "--repo", str(repo), "--name", "fm-pfe", "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["pfe", "lisa"])
def test_standin_bounds_are_sound(exported, kind):
    """IBP through F.pad / F.relu / F.max_pool2d / torch.flatten calls and the standin saturation."""
    _model, shape, _k, result = exported[kind]
    pkg = load_package(result.path, CPU)
    rng = np.random.default_rng(4)
    x = rng.random((5, *shape), dtype=np.float32)
    lo, hi = pkg.logit_bounds(x, 0.0)
    np.testing.assert_allclose(lo, pkg.logits(x), atol=1e-5)
    lo, hi = pkg.logit_bounds(x, 0.02)
    for _ in range(10):
        z = pkg.logits(np.clip(x + 0.02 * rng.choice([-1.0, 1.0], x.shape), 0, 1).astype(np.float32))
        assert (z >= lo - 1e-5).all() and (z <= hi + 1e-5).all()


def test_unsupported_op_has_no_bounds_graph(tmp_path):
    from torch import nn

    from dcs.training.export.bounds import IntervalModel, UnsupportedBounds

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Tanh()).eval()
    with pytest.raises(UnsupportedBounds, match="Tanh"):
        IntervalModel(model)
    with pytest.raises(ExportError, match="model.bounds.onnx"):
        write_package(model, tmp_path, _spec("tanh", (1, 4, 4), 3), bounds=True)
    assert not (tmp_path / "tanh").exists()


def test_out_of_range_labels_are_refused(exported):
    pkg = load_package(exported["lisa"][3].path, CPU)
    x = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        pkg.loss_grad(x, np.array([0, 5]))
