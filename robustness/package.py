"""Open a model package with ONNX Runtime and use it as an attack oracle (torch-free).

``load_package`` verifies the manifest and every sha256, opens ORT sessions for ``model.onnx`` and
``model.grad.onnx`` (and ``model.bounds.onnx`` when present) with ``dcs.robustness.sessions``, and
checks their input/output names, shapes and dtypes against the manifest. The result implements the oracle protocol.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcs.robustness.manifest import (
    BOUNDS_FILE,
    CROWN_FILE,
    EPS_NAME,
    GRAD_FILE,
    GRAD_NAME,
    INPUT_NAME,
    LABEL_NAME,
    LOGITS_NAME,
    LOWER_NAME,
    MARGINS_LOWER_NAME,
    MODEL_FILE,
    PROBE_FILE,
    SMOOTH_FILE,
    TAU_NAME,
    UPPER_NAME,
    PackageError,
    read_manifest,
    verify_files,
)
from dcs.robustness.padding import BatchPadder, pad_rows
from dcs.robustness.sessions import (
    CPU,
    CUDA,
    SessionOptions,
    check_input_shape,
    make_session,
    open_checked,
)

log = logging.getLogger(__name__)

__all__ = ["CPU", "CUDA", "ModelPackage", "PackageError", "SessionOptions", "SurrogateView", "list_versions",
           "load_package", "make_session"]


@dataclass
class ModelPackage:
    """A verified model package with live ORT sessions; implements the oracle protocol."""

    path: Path
    manifest: dict[str, Any]
    session: Any
    grad_session: Any | None
    bounds_session: Any | None
    probe_session: Any | None
    provider: str
    bounds: tuple[float, float] = (0.0, 1.0)
    stats: dict[str, int] = field(default_factory=lambda: {"logits": 0, "grad": 0, "bounds": 0})
    static_batch: bool = False  # pad each session's calls to a fixed batch (CUDA)
    _padders: dict[str, BatchPadder] = field(default_factory=dict, repr=False)
    smooth_session: Any | None = None  # model.grad.smooth.onnx (tanh surrogates), when declared
    crown_session: Any | None = None  # model.crown.onnx (margin lower bounds, issue 27), when present

    # -- identity -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["labels"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["input"]["shape"])

    @property
    def sha256(self) -> str:
        """sha256 of ``model.onnx``: the artifact that is served."""
        return str(self.manifest["files"][MODEL_FILE]["sha256"])

    @property
    def grad_sha256(self) -> str:
        return str(self.manifest["files"][GRAD_FILE]["sha256"])

    @property
    def has_bounds(self) -> bool:
        return self.bounds_session is not None

    # -- oracle -----------------------------------------------------------------------------
    def _as_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"input shape {list(x.shape)} does not match the model's [N, {', '.join(map(str, self.input_shape))}]")
        return x

    def _run(self, kind: str, session, outputs: list[str], feeds: dict[str, np.ndarray],
             batched: tuple[str, ...] = (INPUT_NAME,)) -> list[np.ndarray]:
        """``session.run``; with ``static_batch`` the ``batched`` feeds are padded to the
        session's fixed batch and the outputs cut back to the real rows."""
        padder = self._padders.get(kind)
        if padder is None:
            padder = self._padders[kind] = BatchPadder(self.static_batch)
        n = len(feeds[INPUT_NAME])
        size = padder.size_for(n)
        if size == n:
            return session.run(outputs, feeds)
        feeds = {k: pad_rows(v, size) if k in batched else v for k, v in feeds.items()}
        return [out[:n] for out in session.run(outputs, feeds)]

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = self._as_input(x)
        self.stats["logits"] += len(x)
        return self._run("logits", self.session, [LOGITS_NAME], {INPUT_NAME: x})[0]

    def _grad_inputs(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._as_input(x)
        y = np.ascontiguousarray(y, dtype=np.int64).reshape(-1)
        if len(y) != len(x):
            raise ValueError(f"got {len(x)} inputs but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got min {int(y.min())} "
                             f"max {int(y.max())}")
        return x, y

    def loss_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.grad_session is None:
            raise PackageError(f"{self.path}: gradient twin not loaded")
        x, y = self._grad_inputs(x, y)
        self.stats["grad"] += len(x)
        logits, grad = self._run("grad", self.grad_session, [LOGITS_NAME, GRAD_NAME],
                                 {INPUT_NAME: x, LABEL_NAME: y}, (INPUT_NAME, LABEL_NAME))
        return logits, grad

    # -- surrogate family (issue 25) -------------------------------------------------------------
    @property
    def surrogates(self) -> tuple[str, ...]:
        """Names of the backward surrogates the manifest declares for its BPDA layers (empty for
        packages without such layers, and for packages written before they were declared)."""
        if self.grad_session is None:
            return ()
        members = self.manifest.get("gradient", {}).get("surrogates") or []
        return tuple(str(m["name"]) for m in members
                     if m.get("file") == GRAD_FILE or self.smooth_session is not None)

    def _member(self, name: str) -> dict[str, Any]:
        for m in self.manifest.get("gradient", {}).get("surrogates") or []:
            if m["name"] == name and name in self.surrogates:
                return m
        raise PackageError(f"{self.path}: no gradient surrogate {name!r}; declared: {list(self.surrogates)}")

    def with_surrogate(self, name: str) -> SurrogateView:
        """This oracle with ``loss_grad`` through surrogate ``name`` (same ``logits``)."""
        member = self._member(name)
        if member.get("file") == GRAD_FILE:
            return SurrogateView(self, name, self.loss_grad)
        tau = np.array([float(member["tau"])], dtype=np.float32)
        return SurrogateView(self, name, lambda x, y: self._smooth_grad(x, y, tau))

    def _smooth_grad(self, x: np.ndarray, y: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._grad_inputs(x, y)
        self.stats["grad"] += len(x)
        logits, grad = self._run("smooth", self.smooth_session, [LOGITS_NAME, GRAD_NAME],
                                 {INPUT_NAME: x, LABEL_NAME: y, TAU_NAME: tau}, (INPUT_NAME, LABEL_NAME))
        return logits, grad

    def logit_bounds(self, x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """Sound interval bounds on the logits over the ℓ∞ ball of radius ``eps`` (bounds twin)."""
        if self.bounds_session is None:
            raise PackageError(f"{self.path}: package has no {BOUNDS_FILE}")
        x = self._as_input(x)
        self.stats["bounds"] += len(x)
        lo, hi = self._run("bounds", self.bounds_session, [LOWER_NAME, UPPER_NAME],
                           {INPUT_NAME: x, EPS_NAME: np.array([eps], dtype=np.float32)})
        return lo, hi

    @property
    def has_crown(self) -> bool:
        return self.crown_session is not None

    def margin_bounds(self, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
        """Sound lower bounds [N, K] on logit_y − logit_j over the ℓ∞ ball of radius ``eps``
        (``model.crown.onnx``; 0 at j = y)."""
        if self.crown_session is None:
            raise PackageError(f"{self.path}: package has no {CROWN_FILE}")
        x, y = self._grad_inputs(x, y)
        self.stats["crown"] = self.stats.get("crown", 0) + len(x)
        return self._run("crown", self.crown_session, [MARGINS_LOWER_NAME],
                         {INPUT_NAME: x, LABEL_NAME: y, EPS_NAME: np.array([eps], dtype=np.float32)},
                         (INPUT_NAME, LABEL_NAME))[0]

    @property
    def has_probe(self) -> bool:
        return self.probe_session is not None

    def probe(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Internal activations for reports: ``features`` (first-layer maps), maybe ``z``, ``weights``."""
        if self.probe_session is None:
            raise PackageError(f"{self.path}: package has no {PROBE_FILE}")
        x = self._as_input(x)
        names = [o.name for o in self.probe_session.get_outputs()]
        return dict(zip(names, self.probe_session.run(names, {INPUT_NAME: x})))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "grad_sha256": self.grad_sha256, "path": str(self.path), "provider": self.provider}


class SurrogateView:
    """A package seen through one gradient surrogate: ``logits`` unchanged (the served graph),
    ``loss_grad`` through the member's twin. Implements the oracle protocol."""

    def __init__(self, package: ModelPackage, name: str, loss_grad) -> None:
        self.package = package
        self.surrogate = name
        self.num_classes = package.num_classes
        self.input_shape = package.input_shape
        self.bounds = package.bounds
        self._loss_grad = loss_grad

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.package.logits(x)

    def loss_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._loss_grad(x, y)


def _utf8_text(value: Any) -> bool:
    """A str that encodes as UTF-8 (JSON can carry lone surrogates, protobuf strings cannot)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_package(package_dir: str | Path, options: SessionOptions | None = None) -> ModelPackage:
    """Verify and open the package at ``<repo>/<name>/<version>``. Raises PackageError."""
    opts = options or SessionOptions()
    package_dir = Path(package_dir)
    if not package_dir.is_dir():
        raise PackageError(f"{package_dir}: not a directory")
    manifest = read_manifest(package_dir)
    verify_files(package_dir, manifest)
    try:
        input_shape = tuple(int(d) for d in manifest["input"]["shape"])
        labels = list(manifest["labels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{package_dir / 'manifest.json'}: bad input/labels entry ({exc})") from None
    if not labels:
        raise PackageError(f"{package_dir / 'manifest.json'}: labels is empty")
    for label in labels:
        if not _utf8_text(label):
            raise PackageError(f"{package_dir / 'manifest.json'}: labels must be UTF-8 strings, "
                               f"got {label!r} ({type(label).__name__})")

    model_path = package_dir / MODEL_FILE
    sess, provider = open_checked(model_path, opts, [INPUT_NAME], [LOGITS_NAME], input_shape)
    out_shape = sess.get_outputs()[0].shape
    if isinstance(out_shape[-1], int) and out_shape[-1] != len(labels):
        raise PackageError(f"{model_path}: {out_shape[-1]} logits but {len(labels)} labels in the manifest")

    grad_sess = None
    if opts.load_grad:
        grad_path = package_dir / GRAD_FILE
        grad_sess, _ = open_checked(grad_path, opts, [INPUT_NAME, LABEL_NAME], [LOGITS_NAME, GRAD_NAME],
                                    input_shape)

    smooth_sess = None
    if opts.load_grad and SMOOTH_FILE in manifest["files"]:
        smooth_path = package_dir / SMOOTH_FILE
        smooth_sess, _ = open_checked(smooth_path, opts, [INPUT_NAME, LABEL_NAME, TAU_NAME],
                                      [LOGITS_NAME, GRAD_NAME], input_shape)

    bounds_sess = None
    if opts.load_bounds and BOUNDS_FILE in manifest["files"]:
        bounds_path = package_dir / BOUNDS_FILE
        bounds_sess, _ = open_checked(bounds_path, opts, [INPUT_NAME, EPS_NAME], [LOWER_NAME, UPPER_NAME],
                                      input_shape)

    crown_sess = None
    if opts.load_bounds and CROWN_FILE in manifest["files"]:
        crown_path = package_dir / CROWN_FILE
        crown_sess, _ = open_checked(crown_path, opts, [INPUT_NAME, LABEL_NAME, EPS_NAME], [MARGINS_LOWER_NAME],
                                     input_shape)

    probe_sess = None
    if opts.load_probe and PROBE_FILE in manifest["files"]:
        probe_path = package_dir / PROBE_FILE
        probe_sess, _ = make_session(probe_path, opts)
        if [i.name for i in probe_sess.get_inputs()] != [INPUT_NAME]:
            raise PackageError(f"{probe_path}: graph inputs {[i.name for i in probe_sess.get_inputs()]}, "
                               f"expected {[INPUT_NAME]}")
        check_input_shape(probe_path, probe_sess, input_shape)

    pkg = ModelPackage(path=package_dir, manifest=manifest, session=sess, grad_session=grad_sess,
                       bounds_session=bounds_sess, probe_session=probe_sess, provider=provider,
                       bounds=tuple(manifest["input"].get("range", (0.0, 1.0))),
                       static_batch=(provider == CUDA if opts.static_batch is None
                                     else opts.static_batch), smooth_session=smooth_sess,
                       crown_session=crown_sess)
    # The served graph and its twin must agree; a cheap probe catches a mismatched pair.
    if grad_sess is not None:
        probe = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)
        a = pkg.logits(probe)
        b, _ = pkg.loss_grad(probe, np.zeros(2, dtype=np.int64))
        if not np.allclose(a, b, atol=1e-4, rtol=1e-4):
            raise PackageError(f"{package_dir / GRAD_FILE}: twin logits differ from {MODEL_FILE} "
                               f"(max abs diff {float(np.abs(a - b).max()):.3g})")
        if smooth_sess is not None:
            c, _ = pkg._smooth_grad(probe, np.zeros(2, dtype=np.int64), np.array([0.05], np.float32))
            if not np.allclose(a, c, atol=1e-4, rtol=1e-4):
                raise PackageError(f"{package_dir / SMOOTH_FILE}: twin logits differ from {MODEL_FILE} "
                                   f"(max abs diff {float(np.abs(a - c).max()):.3g})")
        pkg.stats.update(logits=0, grad=0)
    # Bounds at eps=0 must collapse onto the logits (catches a bounds graph of another model).
    if bounds_sess is not None:
        probe = np.random.default_rng(1).random((2, *input_shape), dtype=np.float32)
        a = pkg.logits(probe)
        lo, hi = pkg.logit_bounds(probe, 0.0)
        worst = float(max(np.abs(lo - a).max(), np.abs(hi - a).max()))
        if not worst <= 1e-4 * max(1.0, float(np.abs(a).max())):
            raise PackageError(f"{package_dir / BOUNDS_FILE}: bounds at eps=0 differ from "
                               f"{MODEL_FILE}'s logits (max abs diff {worst:.3g})")
        pkg.stats.update(logits=0, bounds=0)
    # Margin bounds at eps=0 must equal the logit margins (catches a crown graph of another model).
    if crown_sess is not None:
        probe = np.random.default_rng(2).random((2, *input_shape), dtype=np.float32)
        a = pkg.logits(probe).astype(np.float64)
        yy = np.arange(2, dtype=np.int64) % len(labels)
        m = pkg.margin_bounds(probe, yy, 0.0)
        want = a[np.arange(2), yy][:, None] - a
        worst = float(np.abs(m - want).max())
        if not worst <= 1e-4 * max(1.0, float(np.abs(a).max())):
            raise PackageError(f"{package_dir / CROWN_FILE}: margin bounds at eps=0 differ from "
                               f"{MODEL_FILE}'s logit margins (max abs diff {worst:.3g})")
        pkg.stats.update(logits=0, crown=0)
    return pkg


def list_versions(repo: str | Path, name: str) -> list[int]:
    """Integer version folders of ``<repo>/<name>``, ascending."""
    base = Path(repo) / name
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())
