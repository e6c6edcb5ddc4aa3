"""``export_run``: a finished training run → a model package in a model repository."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dcs.training.export.onnx_export import DEFAULT_OPSET
from dcs.training.export.package_writer import (
    ExportError,
    ExportResult,
    PackageSpec,
    resolve_version,
    write_package,
)

log = logging.getLogger(__name__)


def training_summary(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Epochs and final accuracies from the run's ``summary.json`` / ``metrics.json`` if present."""
    out: dict[str, Any] = {"run_dir": str(Path(run_dir).resolve()), "epochs": config.get("epochs"),
                           "seed": config.get("seed")}
    for key in ("adv", "pfe_stages", "lr", "batch_size", "optimizer"):
        if key in config:
            out[key] = config[key]
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
            out["final_test_acc"] = data.get("final_test_acc")
            out["epochs"] = data.get("epochs", out["epochs"])
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable (%s); training summary left partial", summary, exc)
    metrics = Path(run_dir) / "metrics.json"
    if metrics.is_file():
        try:
            rows = json.loads(metrics.read_text())
            if rows:
                last = rows[-1]
                out.update({k: last[k] for k in ("train_acc", "val_acc") if k in last})
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
            log.warning("%s: unreadable (%s)", metrics, exc)
    return out


def architecture_record(config: dict[str, Any], model: Any) -> dict[str, Any]:
    n_params = sum(int(p.numel()) for p in model.parameters())
    return {"arch": config.get("arch"), "parameters": n_params, "module": type(model).__name__}


def export_run(run_dir: str | Path, repo: str | Path, name: str, version: int | None = None,
               opset: int = DEFAULT_OPSET, force: bool = False, twin_gradient: str = "bpda") -> ExportResult:
    """Load ``run_dir`` with ``dcs.training.runs.load_trained`` and write its package.

    ``twin_gradient``: "bpda" (default: straight-through saturation in the gradient twin) or
    "exact" (the saturation's true zero gradient, for a "without BPDA" evaluation; see
    ``write_package``).

    Argument errors (bad name, version taken) are raised before the run is loaded.
    """
    from dcs.training.runs import RunError, load_trained

    resolve_version(Path(repo), name, version, force)  # fail before the expensive part
    run_dir = Path(run_dir)
    try:
        run = load_trained(run_dir)
    except RunError as exc:
        raise ExportError(str(exc)) from None
    spec = PackageSpec(
        name=name, labels=list(run.class_names), input_shape=list(run.input_shape),
        dataset=str(run.dataset), defense=dict(run.defense),
        architecture=architecture_record(run.config, run.model),
        training=training_summary(run_dir, run.config), opset=opset)
    return write_package(run.model, repo, spec, version=version, force=force, twin_gradient=twin_gradient)
