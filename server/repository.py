"""The model repository: ``<root>/<name>/<version>/`` packages, verified at load, hot-reloaded.

Policy: each model serves its highest version that verifies and loads. A scan (start-up, every
``poll_interval_s``, or SIGHUP) loads a new or changed package off the event loop; on success
the new runtime and batcher swap in atomically (one dict assignment) and the old batcher drains;
on failure the reason is logged, counted in ``dcs_model_load_failures_total`` and the version
that was serving keeps serving. A failed package is not retried until its files change.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from dcs.robustness.manifest import PackageError, valid_name
from dcs.server.batcher import Batcher
from dcs.server.metrics import ServerMetrics
from dcs.server.runtime import ModelRuntime, fingerprint

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: hashable, so per-package caches can key on it
class Served:
    runtime: ModelRuntime
    batcher: Batcher


@dataclass
class ScanReport:
    loaded: list[str] = field(default_factory=list)     # "name/version"
    failed: dict[str, str] = field(default_factory=dict)  # "name/version" -> reason
    unloaded: list[str] = field(default_factory=list)


class ModelRepository:
    def __init__(self, root: Path, *, device: str, intra_op_threads: int,
                 make_batcher: Callable[[ModelRuntime], Batcher], metrics: ServerMetrics,
                 load_executor: Executor | None = None) -> None:
        self.root = Path(root)
        self._device = device
        self._threads = intra_op_threads
        self._make_batcher = make_batcher
        self._metrics = metrics
        self._load_executor = load_executor
        self._models: dict[str, Served] = {}
        self._failed: dict[tuple[str, int], tuple] = {}  # (name, version) -> fingerprint
        self.failures: dict[str, str] = {}               # "name/version" -> last reason
        self.scanned_once = False
        self._lock = asyncio.Lock()

    # lookup -----------------------------------------------------------------------------------
    def get(self, name: str) -> Served | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return sorted(self._models)

    def served(self) -> list[Served]:
        return [self._models[n] for n in sorted(self._models)]

    # scanning ---------------------------------------------------------------------------------
    def _inside(self, path: Path, root: Path) -> bool:
        """True when ``path`` (symlinks resolved) lies inside the repository root."""
        try:
            return path.resolve().is_relative_to(root)
        except (OSError, RuntimeError):  # broken or looping symlink
            return False

    def _versions(self, model_dir: Path, root: Path) -> list[int]:
        """Version folders: ASCII digits in canonical form ("1", not "01" or "¹"), inside root."""
        out = []
        for p in model_dir.iterdir():
            name = p.name
            if not (name.isascii() and name.isdigit() and name == str(int(name))):
                continue
            if p.is_dir() and self._inside(p, root):
                out.append(int(name))
            elif p.is_dir():
                log.error("model repository: %s resolves outside %s; ignored", p, root)
        return sorted(out)

    def _candidates(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        if not self.root.is_dir():
            log.error("model repository %s is not a directory", self.root)
            return out
        root = self.root.resolve()
        for entry in sorted(self.root.iterdir()):
            try:
                if not (valid_name(entry.name) and entry.is_dir()):
                    continue
                if not self._inside(entry, root):
                    log.error("model repository: %s resolves outside %s; ignored", entry, root)
                    continue
                versions = self._versions(entry, root)
            except OSError as exc:  # removed or unreadable while scanning: skip this one
                log.error("model repository: cannot list %s: %s", entry, exc)
                if entry.name in self._models:  # keep serving what is loaded
                    out[entry.name] = [self._models[entry.name].runtime.version]
                continue
            if versions:
                out[entry.name] = versions
        return out

    async def scan(self) -> ScanReport:
        async with self._lock:
            report = await self._scan()
        self.scanned_once = True
        self._metrics.models_loaded.set(len(self._models))
        return report

    async def _scan(self) -> ScanReport:
        loop = asyncio.get_running_loop()
        report = ScanReport()
        candidates = await loop.run_in_executor(self._load_executor, self._candidates)
        for name, versions in candidates.items():
            current = self._models.get(name)
            for version in sorted(versions, reverse=True):
                path = self.root / name / str(version)
                key = f"{name}/{version}"
                try:
                    fp = await loop.run_in_executor(self._load_executor, fingerprint, path)
                except OSError as exc:  # removed between listing and reading
                    log.error("model %s: cannot read %s: %s", key, path, exc)
                    continue
                if current is not None and current.runtime.version == version \
                        and current.runtime.fingerprint == fp:
                    break  # serving this one already, unchanged
                if current is not None and current.runtime.version > version:
                    break  # never downgrade because a newer one failed
                if self._failed.get((name, version)) == fp:
                    continue  # known bad and unchanged: try the next lower version
                try:
                    runtime = await loop.run_in_executor(
                        self._load_executor,
                        lambda p=path: ModelRuntime.load(p, device=self._device,
                                                         intra_op_threads=self._threads))
                    if runtime.name != name or runtime.version != version:
                        raise PackageError(
                            f"{path / 'manifest.json'}: says {runtime.name}/{runtime.version}, "
                            f"but sits in {name}/{version}")
                except (PackageError, OSError, ValueError, KeyError) as exc:
                    self._failed[(name, version)] = fp
                    reason = str(exc)
                    self.failures[key] = reason
                    report.failed[key] = reason
                    self._metrics.load_failures.labels(name).inc()
                    kept = (f"; still serving version {current.runtime.version}"
                            if current is not None else "")
                    log.error("model %s rejected: %s%s", key, reason, kept)
                    continue
                self._install(runtime, current)
                self.failures.pop(key, None)
                self._failed.pop((name, version), None)
                report.loaded.append(key)
                break
        for name in list(self._models):
            if name not in candidates:
                old = self._models.pop(name)
                self._metrics.drop_model(name)
                report.unloaded.append(f"{name}/{old.runtime.version}")
                log.warning("model %s removed from the repository; unloading", name)
                asyncio.get_running_loop().create_task(old.batcher.close())
        return report

    def _install(self, runtime: ModelRuntime, current: Served | None) -> None:
        batcher = self._make_batcher(runtime)
        batcher.start()
        self._models[runtime.name] = Served(runtime, batcher)  # the atomic swap
        self._metrics.set_model(runtime.name, runtime.version, runtime.sha256, runtime.provider)
        if runtime.on_fallback:
            self._metrics.provider_fallbacks.labels(runtime.name).inc()
            log.warning("model %s/%s runs on %s although CUDA is available",
                        runtime.name, runtime.version, runtime.provider)
        elif self._device == "auto" and runtime.provider == "CPUExecutionProvider":
            self._metrics.provider_fallbacks.labels(runtime.name).inc()
            log.warning("model %s/%s: device=auto and no CUDA provider in this onnxruntime; "
                        "running on CPU", runtime.name, runtime.version)
        log.info("serving model %s version %d (sha256 %s, %s)%s", runtime.name, runtime.version,
                 runtime.sha256[:12], runtime.provider,
                 f", replacing version {current.runtime.version}" if current else "")
        if current is not None:
            asyncio.get_running_loop().create_task(current.batcher.close())

    async def close(self) -> None:
        for served in list(self._models.values()):
            await served.batcher.close()
