"""The model-package manifest: schema, digests and atomic writes (torch-free).

Layout of a package (DESIGN.md section 3)::

    <repo>/<name>/<version>/
        model.onnx        x [N,C,H,W] f32 in [0,1] -> logits [N,K]
        model.grad.onnx   (x, y [N] int64) -> (logits, grad = d CE / dx)
        model.grad.smooth.onnx (optional, packages with BPDA layers) (x, y, tau [1] f32) ->
                          (logits, grad) with the saturations' tanh-surrogate backward at τ
        model.bounds.onnx (optional) (x, eps [1] f32) -> (logits_lower, logits_upper)
        model.crown.onnx  (optional) (x, y [N] int64, eps [1] f32) -> margins_lower [N,K]: lower
                          bounds on logit_y − logit_j (backward linear relaxation, issue 27)
        model.probe.onnx  (optional) x -> features [N,K,h,w] (first-layer maps), and optionally
                          z (normalized front-end activations) and weights (first-layer filters)
        manifest.json
        report.json / report.html (optional)

The manifest carries the sha256 of every graph file and a ``manifest_digest``: the sha256 of its
own canonical JSON without that key, so a hand edit is detected.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
GRAD_FILE = "model.grad.onnx"
BOUNDS_FILE = "model.bounds.onnx"
PROBE_FILE = "model.probe.onnx"
CROWN_FILE = "model.crown.onnx"
MARGINS_LOWER_NAME = "margins_lower"
SMOOTH_FILE = "model.grad.smooth.onnx"
TAU_NAME = "tau"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "x"
LABEL_NAME = "y"
EPS_NAME = "eps"
LOGITS_NAME = "logits"
GRAD_NAME = "grad"
LOWER_NAME = "logits_lower"
UPPER_NAME = "logits_upper"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

REQUIRED_KEYS = (
    "schema_version", "name", "version", "labels", "input", "files", "gradient", "defense",
    "dataset", "opset", "exporter", "created_at",
)


class PackageError(Exception):
    """A model package is missing, tampered with or inconsistent. The message names the file."""


def valid_name(name: str) -> bool:
    """Model names: letters, digits, '_', '-', '.'; no path separators, no leading dot."""
    return bool(NAME_RE.match(name)) and ".." not in name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``manifest`` with its ``manifest_digest`` set."""
    out = dict(manifest)
    out["manifest_digest"] = manifest_digest(out)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; packages are read by the server
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def read_manifest(package_dir: Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` (keys, schema version, own digest). Raises PackageError."""
    path = Path(package_dir) / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(f"{path}: manifest.json is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise PackageError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise PackageError(f"{path}: missing keys {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise PackageError(
            f"{path}: schema_version {manifest['schema_version']!r}, expected {SCHEMA_VERSION}")
    if manifest.get("manifest_digest") != manifest_digest(manifest):
        raise PackageError(
            f"{path}: manifest_digest does not match its contents (edited by hand?)")
    if not isinstance(manifest["name"], str) or not valid_name(manifest["name"]):
        raise PackageError(f"{path}: invalid model name {manifest['name']!r}")
    return manifest


def verify_files(package_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in the manifest exists and matches its sha256."""
    package_dir = Path(package_dir)
    files = manifest["files"]
    for required in (MODEL_FILE, GRAD_FILE):
        if required not in files:
            raise PackageError(f"{package_dir / MANIFEST_FILE}: files has no entry for {required}")
    for fname, entry in files.items():
        if "/" in fname or fname.startswith("."):
            raise PackageError(f"{package_dir / MANIFEST_FILE}: bad file name {fname!r}")
        path = package_dir / fname
        if not path.is_file():
            raise PackageError(f"{path}: listed in the manifest but missing")
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            raise PackageError(
                f"{path}: sha256 {digest[:16]}… does not match the manifest's "
                f"{str(entry.get('sha256'))[:16]}… (file changed or corrupted)")
