"""Robustness audits as persisted jobs (issue 7, server half).

``AuditManager`` is the domain side: validate a request against the served model and the
limits (``dcs.server.audit_request``), persist it (``dcs.server.jobs.JobStore``), run it on its
own worker pool with its own ORT sessions (``--audit-threads`` intra-op threads,
``--max-concurrent-audits`` workers) so the classify path keeps its latency, publish progress to
watchers, write report.json/.html with ``dcs.robustness.report.write_report`` and record the
summary. The attack engine is ``dcs.robustness.audit.audit``. ``AuditService`` bundles the manager and its gRPC servicer.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcs.robustness.attacks import Stopped
from dcs.robustness.audit import AuditCancelled, AuditError, ProgressEvent, audit
from dcs.robustness.manifest import PackageError
from dcs.robustness.package import SessionOptions, load_package
from dcs.robustness.suites import Suite, SuiteError, is_evaluator
from dcs.server.audit_oracle import StoppableOracle
from dcs.server.audit_request import (
    AuditRequest,
    build_suite,
    check_cost,
    check_upload,
    dataset_source,
    decode_examples,
    resolve_limit,
)
from dcs.server.config import ServerConfig
from dcs.server.dataplane import DataPlane
from dcs.server.errors import (
    FailedPrecondition,
    InvalidInput,
    JobNotFound,
    LimitExceeded,
    StateUnavailable,
)
from dcs.server.jobs import (
    CANCELLED,
    FAILED,
    FINAL,
    INTERRUPTED,
    RUNNING,
    SUCCEEDED,
    JobRow,
    JobStore,
)
from dcs.server.metrics import AUDIT_STATES, ServerMetrics
from dcs.server.priority import lower_thread_priority

log = logging.getLogger(__name__)

@dataclass
class _Live:
    """In-memory side of an active job."""

    cancel_requested: bool = False
    subscribers: set = field(default_factory=set)
    progress: dict = field(default_factory=dict)
    last_db_write: float = 0.0
    last_gradients: int = 0
    last_heartbeat: float = 0.0


class AuditManager:
    def __init__(self, config: ServerConfig, dataplane: DataPlane, metrics: ServerMetrics) -> None:
        self.config = config
        self._dp = dataplane
        self._metrics = metrics
        self.store = JobStore(config.state_dir)
        # Audits are background work: their threads (and ORT's pool threads they create) run
        # below the event loop and the model workers (server.priority).
        self._executor = ThreadPoolExecutor(max_workers=config.max_concurrent_audits,
                                            thread_name_prefix="audit",
                                            initializer=lower_thread_priority,
                                            initargs=(config.audit_niceness,))
        self._live: dict[str, _Live] = {}
        self._active: set[str] = set()  # queued or running; updated by the worker synchronously
        self._active_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._futures: list = []

    # lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        n = self.store.mark_interrupted("the server stopped while this job was queued or running")
        if n:
            log.warning("marked %d audit job(s) from a previous run as interrupted", n)
        # Uploads of jobs a crash interrupted are never read again (no job is active now).
        stale = 0
        for path in self.store.uploads_dir.glob("*.npz"):
            try:
                path.unlink()
                stale += 1
            except OSError as exc:
                log.warning("cannot remove stale upload %s: %s", path, exc)
        if stale:
            log.info("removed %d upload(s) left by interrupted audit jobs", stale)
        self._refresh_state_metrics()

    async def stop(self, timeout: float = 20.0) -> None:
        """Running jobs are stopped at their next batch and recorded as interrupted."""
        self._stopping = True
        pending = [f for f in self._futures if not f.done()]
        if pending:
            log.info("stopping %d audit job(s); they will be marked interrupted", len(pending))
            wrapped = [asyncio.wrap_future(f) for f in pending]
            await asyncio.wait(wrapped, timeout=timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.store.mark_interrupted("the server stopped while this job was queued or running")
        self._refresh_state_metrics()
        self.store.close()

    # requests ---------------------------------------------------------------------------------
    def start_job(self, req: AuditRequest) -> JobRow:
        if self._stopping:
            raise FailedPrecondition("server is shutting down; audits are not accepted")
        served = self._dp.get_model(req.model, req.version)
        rt = served.runtime
        with self._active_lock:
            active = len(self._active)
        if active >= self.config.max_concurrent_audits:
            raise LimitExceeded(f"{active} audit job(s) queued or running; "
                                f"--max-concurrent-audits={self.config.max_concurrent_audits}")
        max_examples = resolve_limit(req.max_examples, self.config.max_audit_examples,
                                     "limits.max_examples", "--max-audit-examples")
        max_gradients = resolve_limit(req.max_gradients, self.config.max_audit_gradients,
                                      "limits.max_gradients", "--max-audit-gradients")
        suite = build_suite(req)
        job_id = uuid.uuid4().hex
        data: dict[str, Any]
        upload: tuple[np.ndarray, np.ndarray] | None = None
        if req.dataset is not None and req.images is not None:
            raise InvalidInput("give either data.dataset or data.examples, not both")
        if req.dataset is not None:
            data = dataset_source(req.dataset, self.config.datasets, max_examples)
            n = data["limit"]
        elif req.images is not None:
            dtype, shape, raw = req.images
            x = decode_examples(rt.name, rt.input_shape, dtype, shape, raw, self._dp.check_values)
            n = len(x)
            upload = (x, check_upload(n, req.labels, len(rt.labels), max_examples))
        else:
            raise InvalidInput("data is unset; expected data.dataset (a named split) or "
                               "data.examples (images + labels)")
        # every member of a BPDA surrogate family counts (dcs.robustness.adaptive)
        members = len((rt.manifest.get("gradient") or {}).get("surrogates") or [])
        max_queries = self.config.max_audit_queries
        check_cost(suite, n, members, max_gradients, max_queries)
        if upload is not None:  # stored only once the request is accepted
            path = self.store.uploads_dir / f"{job_id}.npz"
            try:
                np.savez_compressed(path, x=upload[0], y=upload[1])
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise self._state_error("store the uploaded examples", exc) from None
            data = {"kind": "examples", "path": str(path), "n": n}
        suite = suite.replace(max_examples=n, max_gradients=max_gradients, max_queries=max_queries)
        request = {"model": rt.name, "version": rt.version, "sha256": rt.sha256,
                   "path": str(rt.path), "suite": suite.to_dict(), "data": data,
                   "seed": int(req.seed), "note": req.note,
                   "limits": {"max_examples": max_examples, "max_gradients": max_gradients,
                              "max_queries": max_queries}}
        try:
            self.store.insert(job_id=job_id, model=rt.name, version=rt.version, sha256=rt.sha256,
                              provider=rt.provider, suite=suite.name, request=request)
        except (OSError, sqlite3.Error) as exc:
            if data["kind"] == "examples":
                Path(data["path"]).unlink(missing_ok=True)
            raise self._state_error("record the job", exc) from None
        self._live[job_id] = _Live()
        with self._active_lock:
            self._active.add(job_id)
        self._futures.append(self._executor.submit(self._run, job_id, request))
        self._refresh_state_metrics()
        log.info("audit %s queued: %s/%d suite %s, %d examples", job_id, rt.name, rt.version,
                 suite.name, n)
        return self.get(job_id)

    def _state_error(self, what: str, exc: BaseException) -> StateUnavailable:
        log.error("audit state directory %s: cannot %s: %s", self.config.state_dir, what, exc)
        return StateUnavailable(f"cannot {what} in --state-dir {str(self.config.state_dir)!r} "
                                f"({type(exc).__name__}: {exc}); audits are refused until it is "
                                "writable again, classify is not affected")

    def get(self, job_id: str) -> JobRow:
        row = self.store.get(job_id) if job_id else None
        if row is None:
            raise JobNotFound(f"audit job {job_id!r} not found")
        return row

    def list(self, limit: int, state: str | None) -> list[JobRow]:
        if limit < 0:
            raise InvalidInput(f"limit is {limit}; expected >= 0 (0 = 100)")
        return self.store.list(limit or 100, state)

    def cancel(self, job_id: str) -> JobRow:
        row = self.get(job_id)
        if row.state in (SUCCEEDED, FAILED):
            raise FailedPrecondition(f"audit job {job_id} already finished ({row.state}); "
                                     "only queued or running jobs can be cancelled")
        live = self._live.get(job_id)
        if live is not None:
            live.cancel_requested = True
            log.info("audit %s: cancel requested", job_id)
        return self.get(job_id)

    def read_report(self, row: JobRow, html: bool = False) -> str:
        if row.state != SUCCEEDED or not row.report_dir:
            return ""
        path = Path(row.report_dir) / ("report.html" if html else "report.json")
        try:
            return path.read_text()
        except OSError:
            return ""

    async def watch(self, job_id: str) -> AsyncIterator[dict]:
        queue: asyncio.Queue = asyncio.Queue(maxsize=10000)
        live = self._live.get(job_id)
        if live is not None:
            live.subscribers.add(queue)
        try:
            row = self.get(job_id)
            yield self._event(row.id, row.state, row.progress or (live.progress if live else {}),
                              row.error)
            if row.state in FINAL:
                return
            while True:
                event = await queue.get()
                yield event
                if event["state"] in FINAL:
                    return
        finally:
            if live is not None:
                live.subscribers.discard(queue)

    # worker side (runs in the audit pool) --------------------------------------------------------
    @staticmethod
    def _event(job_id: str, state: str, progress: dict, message: str = "") -> dict:
        return {"job_id": job_id, "state": state, "progress": dict(progress), "message": message,
                "unix_s": time.time()}

    def _publish(self, job_id: str, event: dict) -> None:
        live = self._live.get(job_id)
        if live is None:
            return
        for q in list(live.subscribers):
            if q.full():
                try:
                    q.get_nowait()
                except asyncio.QueueEmpty:
                    pass
            q.put_nowait(event)

    def _emit(self, job_id: str, state: str, message: str = "") -> None:
        live = self._live.get(job_id)
        event = self._event(job_id, state, live.progress if live else {}, message)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._publish, job_id, event)

    def _finish(self, job_id: str, state: str, started: float, *, error: str = "",
                **fields: Any) -> None:
        live = self._live.get(job_id)
        now = time.time()
        try:
            self.store.update(job_id, state=state, error=error, finished=now,
                              progress=live.progress if live else {}, **fields)
        except (OSError, sqlite3.Error) as exc:
            # The row stays active on disk and becomes `interrupted` at the next start; the
            # in-memory side must still end, or the job would hold its concurrency slot forever.
            log.error("audit %s: cannot record final state %s in %s: %s", job_id, state,
                      self.config.state_dir, exc)
        self._metrics.audit_seconds.labels(state).observe(max(0.0, now - started))
        with self._active_lock:
            self._active.discard(job_id)
        self._emit(job_id, state, error)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._live.pop, job_id, None)
        self._refresh_state_metrics()
        log.info("audit %s %s%s", job_id, state, f": {error}" if error else "")

    def _refresh_state_metrics(self) -> None:
        counts = self.store.counts()
        for state in AUDIT_STATES:
            self._metrics.audits.labels(state).set(counts.get(state, 0))

    def _run(self, job_id: str, request: dict) -> None:
        live = self._live[job_id]
        started = time.time()
        if live.cancel_requested or self._stopping:
            self._finish(job_id, INTERRUPTED if self._stopping else CANCELLED, started,
                         error="stopped before it started")
            return
        try:
            self.store.update(job_id, state=RUNNING, started=started)
        except (OSError, sqlite3.Error) as exc:
            self._finish(job_id, FAILED, started, error=f"cannot record the job as running ({exc})")
            return
        self._refresh_state_metrics()
        self._emit(job_id, RUNNING, "started")
        try:
            # The bounds graph is opened only for suites with a certify entry (robustness.certify).
            wants_bounds = any(is_evaluator(a["attack"]) for a in request["suite"]["attacks"])
            pkg = load_package(request["path"], SessionOptions(
                device=self.config.device, intra_op_threads=self.config.audit_threads,
                inter_op_threads=1, load_grad=True, load_bounds=wants_bounds, load_probe=True))
            if pkg.sha256 != request["sha256"]:
                raise AuditError(f"package {request['path']} changed since the job was queued "
                                 f"(sha256 {pkg.sha256[:12]}…, expected {request['sha256'][:12]}…)")
            x, y, class_names = self._load_data(request["data"])
            if tuple(x.shape[1:]) != pkg.input_shape:
                raise AuditError(f"dataset {request['data'].get('name')!r} has examples of shape "
                                 f"{list(x.shape[1:])}; model {pkg.name!r} expects {list(pkg.input_shape)}")
            suite = Suite.from_dict(request["suite"], default_name=request["suite"]["name"])

            def should_stop() -> bool:
                return live.cancel_requested or self._stopping

            try:
                oracle = StoppableOracle(pkg, should_stop, lambda: self._heartbeat(job_id, pkg))
                report = audit(oracle, x, y, suite,
                               seed=int(request["seed"]),
                               progress=lambda ev: self._on_progress(job_id, ev),
                               should_stop=should_stop, package_info=pkg.describe(),
                               class_names=class_names)
            except Stopped as exc:  # raised outside an attack (the clean pass)
                raise AuditCancelled(str(exc)) from None
            out = self.store.reports_dir / job_id
            try:
                from dcs.robustness.report import write_report

                write_report(report, out, oracle=pkg)
            except Exception:
                log.exception("audit %s: HTML report failed; writing report.json only", job_id)
                out.mkdir(parents=True, exist_ok=True)
                (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            summary = job_summary(report.to_dict())
            live.progress.update(fraction=1.0, eta_s=0.0)
            self._finish(job_id, SUCCEEDED, started, summary=summary, report_dir=str(out))
        except AuditCancelled as exc:
            if live.cancel_requested:
                self._finish(job_id, CANCELLED, started, error=str(exc))
            else:
                self._finish(job_id, INTERRUPTED, started,
                             error=f"the server stopped while this job ran ({exc})")
        except (AuditError, PackageError, SuiteError, ValueError, OSError) as exc:
            self._finish(job_id, FAILED, started, error=str(exc))
        except Exception as exc:  # a job must always end in a final state
            log.exception("audit %s crashed", job_id)
            self._finish(job_id, FAILED, started, error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if request["data"]["kind"] == "examples":  # uploads are not kept after the run
                Path(request["data"]["path"]).unlink(missing_ok=True)

    def _load_data(self, data: dict) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
        if data["kind"] == "examples":
            with np.load(data["path"]) as z:
                return z["x"], z["y"], None
        from dcs.data import DataError, load_dataset  # torch-free numpy loaders

        try:
            ds = load_dataset(data["name"], str(self.config.data_dir) if self.config.data_dir else None,
                              limit_test=data["limit"], limit_train=data["limit"])
        except DataError as exc:
            raise AuditError(f"dataset {data['name']!r}: {exc}") from None
        if data["split"] == "train":
            return ds.x_train, ds.y_train, list(ds.class_names)
        return ds.x_test, ds.y_test, list(ds.class_names)

    def _heartbeat(self, job_id: str, pkg: Any) -> None:
        """At most once a second inside long batches: gradient evaluations so far (liveness)."""
        live = self._live.get(job_id)
        now = time.monotonic()
        if live is None or now - live.last_heartbeat < 1.0:
            return
        live.last_heartbeat = now
        used = int(pkg.stats.get("grad", 0))
        if used > live.last_gradients:
            self._metrics.audit_gradients.inc(used - live.last_gradients)
            live.last_gradients = used
        live.progress = {**live.progress, "gradient_evaluations": used}
        self._emit(job_id, RUNNING)

    def _on_progress(self, job_id: str, ev: ProgressEvent) -> None:
        live = self._live.get(job_id)
        if live is None:
            return
        delta = ev.gradients_used - live.last_gradients
        if delta > 0:
            self._metrics.audit_gradients.inc(delta)
            live.last_gradients = ev.gradients_used
        live.progress = {
            "attack": ev.attack, "eps": ev.eps, "examples_done": ev.examples_done,
            "examples_total": ev.examples_total,
            "robust_accuracy": -1.0 if ev.robust_accuracy_so_far is None else ev.robust_accuracy_so_far,
            "eta_s": -1.0 if ev.eta_s is None else ev.eta_s,
            "fraction": ev.units_done / ev.units_total if ev.units_total else 0.0,
            "gradient_evaluations": ev.gradients_used}
        now = time.monotonic()
        if now - live.last_db_write > 0.5:
            live.last_db_write = now
            try:
                self.store.update(job_id, progress=live.progress)
            except (OSError, sqlite3.Error) as exc:  # progress is best effort; the job goes on
                log.warning("audit %s: cannot record progress: %s", job_id, exc)
        self._emit(job_id, RUNNING)


def job_summary(d: dict) -> dict:
    """The part of a report (``AuditReport.to_dict()``) a job row keeps and GetAudit returns."""
    summary = {"clean_accuracy": d["clean_accuracy"],
               "robust_accuracy": d["headline"].get("robust_accuracy"),
               "headline_eps": d["headline"].get("eps"), "n_examples": d["n_examples"],
               "worst_case": [{k: w[k] for k in ("eps", "robust_accuracy", "attacks")}
                              for w in d["worst_case"]],
               "results": [{k: r[k] for k in ("label", "eps", "robust_accuracy",
                                              "attack_success_rate") if k in r}
                           for r in d["results"]],
               "checks": d["checks"], "totals": d["totals"]}
    if d.get("certified") is not None:
        cert = d["certified"]
        summary["certified"] = {
            "status": cert["status"], "reason": cert.get("reason"),
            "per_eps": [{k: c[k] for k in ("eps", "certified_accuracy", "empirical_robust_accuracy",
                                           "unstable_fraction")} for c in cert["per_eps"]]}
    return summary
