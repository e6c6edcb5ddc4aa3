"""Write a sealed model package ``<repo>/<name>/<version>/`` from a torch model, atomically.

Everything is written into a hidden temp folder beside the target, verified with the torch-free
loader (sha256s, I/O names, twin logits == model logits), and only then renamed into place, so a
failed export leaves nothing half-written.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from dcs.robustness.manifest import (
    BOUNDS_FILE,
    CROWN_FILE,
    GRAD_FILE,
    INPUT_NAME,
    LOGITS_NAME,
    MANIFEST_FILE,
    MODEL_FILE,
    PROBE_FILE,
    SCHEMA_VERSION,
    SMOOTH_FILE,
    PackageError,
    atomic_write_json,
    file_entry,
    seal,
    valid_name,
)
from dcs.robustness.package import SessionOptions, list_versions, load_package
from dcs.training.export.bounds import IntervalModel, UnsupportedBounds
from dcs.training.export.onnx_export import (
    DEFAULT_OPSET,
    export_bounds_onnx,
    export_crown_onnx,
    export_model_onnx,
    export_probe_onnx,
    export_twin_onnx,
    export_twin_smooth_onnx,
    exporter_versions,
)
from dcs.training.export.twin import SURROGATE_TAUS, bpda, saturation_modules, surrogate_modules

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ExportError(Exception):
    """The export cannot proceed (bad name, version taken, ...). The message says why."""


@dataclass(frozen=True)
class PackageSpec:
    """What the manifest says about a model besides its graphs."""

    name: str
    labels: Sequence[str]
    input_shape: Sequence[int]
    dataset: str
    defense: dict[str, Any]
    architecture: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    opset: int = DEFAULT_OPSET


@dataclass(frozen=True)
class ExportResult:
    """Where the package went and what it holds; usable as a path (``load_package(result)``)."""

    path: Path
    version: int
    seconds: float
    sizes: dict[str, int]
    gradient: dict[str, Any]

    def __fspath__(self) -> str:
        return str(self.path)


def resolve_version(repo: Path, name: str, version: int | None, force: bool) -> int:
    """The version to write: ``version`` (refused if taken, unless ``force``) or the next free."""
    if not valid_name(name):
        raise ExportError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.'")
    if version is None:
        existing = list_versions(repo, name)
        return (existing[-1] + 1) if existing else 1
    if version < 1:
        raise ExportError(f"--version must be >= 1, got {version}")
    if (Path(repo) / name / str(version)).exists() and not force:
        raise ExportError(f"{Path(repo) / name / str(version)} already exists (use --force to replace it)")
    return int(version)


TWIN_GRADIENTS = ("bpda", "exact")


def gradient_entry(bpda_layers: Sequence[str], masked_layers: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest's ``gradient`` record. ``masked_layers``: saturations traced with their true
    backward (``twin_gradient="exact"``): zero almost everywhere, so the twin's gradient is masked."""
    if masked_layers:
        note = ("exact autograd gradient of the summed cross-entropy, INCLUDING the true (zero almost "
                "everywhere) derivative of the saturation layers listed: the gradient is masked. This "
                "twin shows what a naive gradient attack sees ('without BPDA'); do not use it to claim "
                "robustness")
        return {"kind": "exact", "bpda_layers": [], "masked_layers": list(masked_layers), "note": note}
    if bpda_layers:
        note = ("gradient of the summed cross-entropy; the saturation layers listed use a "
                "straight-through (identity) backward (BPDA), their forward is unchanged")
        return {"kind": "bpda", "bpda_layers": list(bpda_layers), "note": note}
    return {"kind": "exact", "bpda_layers": [],
            "note": "exact autograd gradient of the summed cross-entropy, traced with make_fx"}


def surrogate_family(taus=SURROGATE_TAUS) -> list[dict[str, Any]]:
    """The manifest's ``gradient.surrogates``: straight-through (``model.grad.onnx``) and the tanh
    members (``model.grad.smooth.onnx`` fed ``tau``). Every member has the served forward."""
    out: list[dict[str, Any]] = [{"name": "straight-through", "kind": "straight-through", "file": GRAD_FILE,
                                  "backward": "identity"}]
    out += [{"name": f"tanh:{t:g}", "kind": "tanh", "tau": float(t), "file": SMOOTH_FILE,
             "backward": "d/dz 0.5*(tanh((z-c)/tau) + tanh((z+c)/tau))"} for t in taus]
    return out


def _export_crown(model: nn.Module, shape: list[int], out: Path, opset: int) -> dict[str, Any] | None:
    """``model.crown.onnx`` (issue 27) and its manifest entry, or None (logged) when the model has
    an op without a linear rule: the package then certifies with ``method=ibp`` only."""
    try:
        export_crown_onnx(model, shape, out / CROWN_FILE, opset)
    except UnsupportedBounds as exc:
        log.warning("no %s for this model: %s", CROWN_FILE, exc)
        return None
    return {"file": CROWN_FILE, "method": "crown-ibp", "output": "margins_lower",
            "inputs": ["x", "y", "eps"],
            "note": "lower bounds on logit_y - logit_j over the eps-ball clipped to [0, 1]: backward "
                    "linear relaxation (CROWN) from the margins with interval intermediate bounds, "
                    "the best of the bounds concretized at every layer (never looser than the "
                    "interval margins of model.bounds.onnx); see dcs.training.export.crown"}


def _build(model: nn.Module, spec: PackageSpec, version: int, out: Path,
           bounds: bool | None = None, twin_gradient: str = "bpda", crown: bool = True) -> dict[str, Any]:
    """Export all graphs into ``out`` and write the sealed manifest; returns the manifest."""
    shape = [int(d) for d in spec.input_shape]
    export_model_onnx(model, shape, out / MODEL_FILE, spec.opset)
    straight = twin_gradient == "bpda"
    with bpda(model, enabled=straight) as layers:
        masked = [] if straight else [name for name, _ in saturation_modules(model)]
        export_twin_onnx(model, shape, out / GRAD_FILE, spec.opset)
    files = [MODEL_FILE, GRAD_FILE]
    gradient = gradient_entry(layers, masked)
    if layers and surrogate_modules(model):
        export_twin_smooth_onnx(model, shape, out / SMOOTH_FILE, spec.opset)
        files.append(SMOOTH_FILE)
        gradient["surrogates"] = surrogate_family()
        gradient["note"] += ("; gradient.surrogates lists the backward surrogates offered for them "
                             "(adaptive audits attack through each)")
    bounds_entry: dict[str, Any] | None = None
    if bounds is not False:
        try:
            export_bounds_onnx(model, shape, out / BOUNDS_FILE, spec.opset)
            files.append(BOUNDS_FILE)
            bounds_entry = {"method": "ibp", "norm": "linf", "domain": "eps-ball clipped to [0, 1]",
                            "note": "interval bound propagation: center/radius for affine layers, "
                                    "endpoints for monotone ones (ReLU, max-pool, saturation)"}
            crown_entry = _export_crown(model, shape, out, spec.opset) if crown else None
            if crown_entry is not None:
                files.append(CROWN_FILE)
                bounds_entry["crown"] = crown_entry
        except UnsupportedBounds as exc:
            if bounds:
                raise ExportError(f"cannot build {BOUNDS_FILE}: {exc}") from None
            log.warning("no %s for this model: %s", BOUNDS_FILE, exc)
    probe: dict[str, Any] | None = None
    if callable(getattr(model, "probe", None)) and callable(getattr(model, "first_layer_weight", None)):
        probe = {"outputs": export_probe_onnx(model, shape, out / PROBE_FILE, spec.opset)}
        files.append(PROBE_FILE)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": spec.name,
        "version": int(version),
        "labels": [str(label) for label in spec.labels],
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32", "range": [0.0, 1.0],
                  "layout": "NCHW"},
        "output": {"name": LOGITS_NAME, "num_classes": len(spec.labels)},
        "dataset": spec.dataset,
        "defense": dict(spec.defense),
        "architecture": dict(spec.architecture),
        "training": dict(spec.training),
        "gradient": gradient,
        "loss": {"kind": "cross_entropy", "reduction": "sum", "per_example": True},
        "opset": int(spec.opset),
        "exporter": exporter_versions(),
        "files": {f: file_entry(out / f) for f in files},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if probe is not None:
        manifest["probe"] = probe
    if bounds_entry is not None:
        manifest["bounds"] = bounds_entry
    atomic_write_json(out / MANIFEST_FILE, seal(manifest))
    return manifest


def write_package(model: nn.Module, repo: str | Path, spec: PackageSpec, version: int | None = None,
                  force: bool = False, bounds: bool | None = None, twin_gradient: str = "bpda",
                  crown: bool = True) -> ExportResult:
    """Export ``model`` as ``<repo>/<spec.name>/<version>`` (next free version by default).

    ``twin_gradient``: "bpda" (default) traces the saturation layers with their straight-through
    backward; "exact" keeps their true, zero-almost-everywhere derivative, a deliberately masked
    twin for the "without BPDA" evaluation (the manifest lists them under ``masked_layers``).

    ``bounds``: True requires ``model.bounds.onnx``, False skips it, None (default) writes it
    when every layer has an interval rule and logs a warning otherwise. ``crown`` (default True):
    also write ``model.crown.onnx`` next to the bounds graph when every layer has a linear rule
    (issue 27); False skips it (test fixtures, to keep exports fast).
    """
    if twin_gradient not in TWIN_GRADIENTS:
        raise ExportError(f"twin_gradient must be one of {', '.join(TWIN_GRADIENTS)}, got {twin_gradient!r}")
    t0 = time.perf_counter()
    repo = Path(repo)
    version = resolve_version(repo, spec.name, version, force)
    if bounds:
        try:
            IntervalModel(model)  # fail before the expensive part
        except UnsupportedBounds as exc:
            raise ExportError(f"cannot build {BOUNDS_FILE}: {exc}") from None
    base = repo / spec.name
    base.mkdir(parents=True, exist_ok=True)
    target = base / str(version)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=base))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the server may run as another user
        manifest = _build(model, spec, version, tmp, bounds, twin_gradient, crown)
        load_package(tmp, SessionOptions(device="cpu", intra_op_threads=1))  # refuse a bad pair early
        if target.exists():
            if not force:
                raise ExportError(f"{target} appeared during the export; not replacing it")
            trash = Path(tempfile.mkdtemp(prefix=f".{version}.old-", dir=base))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    sizes = {f: int(e["bytes"]) for f, e in manifest["files"].items()}
    sizes[MANIFEST_FILE] = (target / MANIFEST_FILE).stat().st_size
    log.info("exported %s in %.1fs (%s)", target, seconds, sizes)
    return ExportResult(path=target, version=version, seconds=seconds, sizes=sizes,
                        gradient=manifest["gradient"])


__all__ = ["TWIN_GRADIENTS", "ExportError", "ExportResult", "PackageError", "PackageSpec", "resolve_version",
           "write_package"]
