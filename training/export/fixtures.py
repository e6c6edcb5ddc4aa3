"""Real exported packages for tests, in a couple of seconds: random weights, no training."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dcs.training.export.onnx_export import DEFAULT_OPSET
from dcs.training.export.package_writer import ExportResult, PackageSpec, write_package


def build_untrained(arch: str, defense: str | dict[str, Any], input_shape: Sequence[int],
                    num_classes: int, seed: int = 0):
    """``dcs.training.models.build_model`` with weights from ``torch.manual_seed(seed)``, eval mode.

    ``defense``: a kind ('none', 'pfe', ...) or a dict of ``DefenseSpec`` fields.
    """
    import torch

    from dcs.training.config import DefenseSpec
    from dcs.training.models import build_model

    spec = DefenseSpec(kind=defense) if isinstance(defense, str) else DefenseSpec(**defense)
    if spec.kind == "pfe" and spec.pfe_c is None:  # record the c the model is built with
        from dataclasses import replace

        from dcs.training.models import DEFAULT_C

        spec = replace(spec, pfe_c=DEFAULT_C)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(arch, spec, tuple(int(d) for d in input_shape), int(num_classes))
    finally:
        torch.random.set_rng_state(state)
    return model.eval(), spec


def export_untrained(repo: str | Path, name: str, arch: str = "pfe_cnn",
                     defense: str | dict[str, Any] = "none",
                     input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                     seed: int = 0, version: int | None = None, force: bool = False,
                     opset: int = DEFAULT_OPSET, crown: bool = False) -> ExportResult:
    """Build a random-weight model via ``build_model`` and export it as ``<repo>/<name>/<version>``.

    Returns the :class:`ExportResult` (``.path`` is the package folder). ``crown``: also export
    ``model.crown.onnx`` (off by default: it is the slowest graph to trace).
    """
    model, spec = build_untrained(arch, defense, input_shape, num_classes, seed)
    pkg = PackageSpec(
        name=name, labels=[f"class_{i}" for i in range(num_classes)],
        input_shape=[int(d) for d in input_shape], dataset="untrained",
        defense={**asdict(spec), "adversarial_training": None},
        architecture={"arch": arch, "parameters": sum(int(p.numel()) for p in model.parameters()),
                      "module": type(model).__name__},
        training={"epochs": 0, "seed": seed, "note": "untrained: random weights (test fixture)"},
        opset=opset)
    return write_package(model, repo, pkg, version=version, force=force, crown=crown)


def write_untrained_run(run_dir: str | Path, arch: str = "pfe_cnn", defense: str = "none",
                        input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                        seed: int = 0) -> Path:
    """A run folder that ``dcs.training.runs.load_trained`` accepts (``final.pt`` with random weights).

    For export/verify tests that need a run without training one.
    """

    from dcs.training import runs
    from dcs.training.config import DefenseSpec, TrainConfig

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(arch=arch, defense=DefenseSpec(kind=defense), epochs=None, seed=seed).resolved()
    model, _ = build_untrained(arch, asdict(cfg.defense), input_shape, num_classes, seed)
    config = cfg.to_dict()
    config["data"] = {"input_shape": [int(d) for d in input_shape],
                      "class_names": [f"class_{i}" for i in range(num_classes)]}
    runs.atomic_torch_save({"state_dict": model.state_dict(), "config": config, "test_acc": None},
                           run_dir / runs.FINAL_FILE)
    runs.atomic_write_json(run_dir / "summary.json", {"final_test_acc": None, "epochs": cfg.epochs,
                                                      "dataset": cfg.dataset, "arch": arch,
                                                      "defense": defense})
    return run_dir
