"""A loaded model: one verified package with its classify-path ORT session (load / ready / stop).

Loading happens at start-up or on reload, never inside a request. ``run`` is blocking and is
called from the batcher through an executor.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dcs.robustness.package import CPU, CUDA, ModelPackage, SessionOptions, load_package

log = logging.getLogger(__name__)


def fingerprint(package_dir: Path) -> tuple:
    """Cheap change detector for a package folder: (file, size, mtime_ns) of every entry."""
    out = []
    for p in sorted(Path(package_dir).iterdir()):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass
class ModelRuntime:
    package: ModelPackage
    fingerprint: tuple
    loaded_at: float

    @classmethod
    def load(cls, package_dir: Path, *, device: str, intra_op_threads: int) -> ModelRuntime:
        """Verify (sha256, manifest digest) and open ``model.onnx``. Raises PackageError."""
        before = fingerprint(package_dir)
        pkg = load_package(package_dir, SessionOptions(
            device=device, intra_op_threads=intra_op_threads, inter_op_threads=1,
            load_grad=False, load_bounds=False, load_probe=False))
        return cls(package=pkg, fingerprint=before, loaded_at=time.time())

    # identity -------------------------------------------------------------------------------
    # read from the manifest once: the classify path asks for them per request
    @cached_property
    def name(self) -> str:
        return self.package.name

    @cached_property
    def version(self) -> int:
        return self.package.version

    @property
    def sha256(self) -> str:
        return self.package.sha256

    @property
    def provider(self) -> str:
        return self.package.provider

    @cached_property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.package.labels)

    @cached_property
    def input_shape(self) -> tuple[int, ...]:
        return self.package.input_shape

    @property
    def manifest(self) -> dict[str, Any]:
        return self.package.manifest

    @property
    def path(self) -> Path:
        return self.package.path

    @property
    def on_fallback(self) -> bool:
        """True when this session runs on CPU although CUDA was wanted or available."""
        return self.provider == CPU and _cuda_available()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a validated float32 batch ``[N, *input_shape]`` (blocking)."""
        return self.package.logits(x)


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        return False
    return CUDA in ort.get_available_providers()
