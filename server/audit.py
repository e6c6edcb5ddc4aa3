"""Robustness audits as persisted jobs (issue 7, server half).

``AuditManager`` is the domain side: validate a request against the served model and the
limits, persist it (``dcs.server.jobs.JobStore``), run it on its own worker pool with its own ORT
sessions (``--audit-threads`` intra-op threads, ``--max-concurrent-audits`` workers) so the
classify path keeps its latency, publish progress to watchers, write report.json/.html with
``dcs.robustness.report.write_report`` and record the summary. The attack engine is
``dcs.robustness.audit.audit``. ``AuditService`` bundles the manager and its gRPC servicer.
"""
from __future__ import annotations

import asyncio
import hmac
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
from dcs.robustness.suites import PRESETS, AttackSpec, Suite, SuiteError, get_suite, is_evaluator
from dcs.server.config import ServerConfig
from dcs.server.dataplane import DataPlane
from dcs.server.errors import (
    FailedPrecondition,
    InvalidInput,
    JobNotFound,
    LimitExceeded,
    PermissionDenied,
    StateUnavailable,
    Unauthenticated,
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

DEFAULT_SUITE = "quick"
SPLITS = ("test", "train")
#: Attacks that read a second package from a path: not offered over the API.
REFUSED_ATTACKS = frozenset({"transfer"})


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    split: str = "test"
    limit: int = 0


@dataclass(frozen=True)
class AuditRequest:
    """A parsed StartAudit request (the servicer builds it from protobuf)."""

    model: str
    version: int = 0
    suite: str = ""
    attacks: tuple[tuple[str, dict], ...] = ()
    eps: tuple[float, ...] = ()
    dataset: DatasetSpec | None = None
    images: tuple[str, list[int], bytes] | None = None  # (dtype, shape, data)
    labels: tuple[int, ...] = ()
    seed: int = 0
    max_examples: int = 0
    max_gradients: int = 0
    note: str = ""


@dataclass
class _Live:
    """In-memory side of an active job."""

    cancel_requested: bool = False
    subscribers: set = field(default_factory=set)
    progress: dict = field(default_factory=dict)
    last_db_write: float = 0.0
    last_gradients: int = 0
    last_heartbeat: float = 0.0


class TokenAuth:
    """Bearer-token check for audit methods (constant-time compare)."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    def check(self, metadata) -> None:
        if self._token is None:
            raise PermissionDenied("audits are disabled on this server: no token configured "
                                   "(--audit-token-file or DCS_AUDIT_TOKEN)")
        header = ""
        for key, value in metadata or ():
            if key.lower() == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
                break
        if not header:
            raise Unauthenticated("metadata 'authorization' is missing; expected 'Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("metadata 'authorization' is not of the form 'Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise PermissionDenied("bearer token is not valid for audit methods")


class StoppableOracle:
    """Delegates to a package but checks ``should_stop`` before every model call.

    The engine polls ``should_stop`` between batches only; checking here as well makes cancel
    and shutdown take effect within one oracle call. It raises the engine's ``Stopped``, which
    ``dcs.robustness.audit.audit`` turns into ``AuditCancelled``.
    """

    def __init__(self, inner: Any, should_stop, on_call=None) -> None:
        self._inner = inner
        self._should_stop = should_stop
        self._on_call = on_call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self) -> None:
        if self._should_stop():
            raise Stopped("audit stopped between two model calls")
        if self._on_call is not None:
            self._on_call()

    def logits(self, x: np.ndarray) -> np.ndarray:
        self._check()
        return self._inner.logits(x)

    def loss_grad(self, x: np.ndarray, y: np.ndarray):
        self._check()
        return self._inner.loss_grad(x, y)

    def logit_bounds(self, x: np.ndarray, eps: float):
        self._check()
        return self._inner.logit_bounds(x, eps)

    def with_surrogate(self, name: str) -> StoppableOracle:
        """A surrogate member's view (adaptive audits), checked like the package itself."""
        return StoppableOracle(self._inner.with_surrogate(name), self._should_stop, self._on_call)

    def probe(self, x: np.ndarray):
        self._check()
        return self._inner.probe(x)


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
        max_examples = self._limit(req.max_examples, self.config.max_audit_examples,
                                   "limits.max_examples", "--max-audit-examples")
        max_gradients = self._limit(req.max_gradients, self.config.max_audit_gradients,
                                    "limits.max_gradients", "--max-audit-gradients")
        suite = self._suite(req)
        job_id = uuid.uuid4().hex
        data: dict[str, Any]
        if req.dataset is not None and req.images is not None:
            raise InvalidInput("give either data.dataset or data.examples, not both")
        if req.dataset is not None:
            ds = req.dataset
            if ds.name not in self.config.datasets:
                raise InvalidInput(f"dataset.name {ds.name!r} is not offered by this server; "
                                   f"expected one of {list(self.config.datasets)} (--datasets)")
            split = ds.split or "test"
            if split not in SPLITS:
                raise InvalidInput(f"dataset.split {ds.split!r}; expected one of {list(SPLITS)}")
            if ds.limit < 0:
                raise InvalidInput(f"dataset.limit is {ds.limit}; expected >= 0 (0 = the limit)")
            if ds.limit > max_examples:
                raise LimitExceeded(f"dataset.limit {ds.limit} exceeds the example limit "
                                    f"{max_examples} (--max-audit-examples / limits.max_examples)")
            n = ds.limit or max_examples
            data = {"kind": "dataset", "name": ds.name, "split": split, "limit": n}
        elif req.images is not None:
            dtype, shape, raw = req.images
            x = self._decode_examples(rt, dtype, shape, raw)
            n = len(x)
            if n > max_examples:
                raise LimitExceeded(f"examples has {n} images; the limit is {max_examples} "
                                    "(--max-audit-examples / limits.max_examples)")
            y = np.asarray(req.labels, dtype=np.int64)
            if y.shape != (n,):
                raise InvalidInput(f"examples.labels has {len(y)} entries; expected {n} (one per image)")
            k = len(rt.labels)
            if n and (y.min() < 0 or y.max() >= k):
                raise InvalidInput(f"examples.labels span [{y.min()}, {y.max()}]; expected 0..{k - 1}")
            path = self.store.uploads_dir / f"{job_id}.npz"
            try:
                np.savez_compressed(path, x=x, y=y)
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise self._state_error("store the uploaded examples", exc) from None
            data = {"kind": "examples", "path": str(path), "n": n}
        else:
            raise InvalidInput("data is unset; expected data.dataset (a named split) or "
                               "data.examples (images + labels)")
        try:
            # every member of a BPDA surrogate family counts (dcs.robustness.adaptive)
            members = len((rt.manifest.get("gradient") or {}).get("surrogates") or [])
            grads, queries = suite.estimate_cost(n, members if members >= 2 else 1)
        except SuiteError as exc:
            raise InvalidInput(str(exc)) from None
        except (TypeError, ValueError, OverflowError) as exc:  # params_json of the wrong type
            raise InvalidInput(f"attacks: a parameter has the wrong type or value ({exc})") from None
        if grads > max_gradients:
            raise LimitExceeded(f"suite {suite.name!r} may need {grads} gradient evaluations for {n} "
                                f"examples; the limit is {max_gradients} (--max-audit-gradients / "
                                "limits.max_gradients)")
        max_queries = self.config.max_audit_queries
        if queries > max_queries:
            raise LimitExceeded(f"suite {suite.name!r} may need {queries} model queries for {n} "
                                f"examples; the limit is {max_queries} (--max-audit-queries)")
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

    def _limit(self, asked: int, server: int, field_name: str, flag: str) -> int:
        if asked < 0:
            raise InvalidInput(f"{field_name} is {asked}; expected >= 0 (0 = the server limit)")
        if asked > server:
            raise LimitExceeded(f"{field_name} {asked} exceeds the server limit {flag}={server}")
        return asked or server

    def _suite(self, req: AuditRequest) -> Suite:
        name = req.suite or DEFAULT_SUITE
        try:
            base = get_suite(name) if name in PRESETS else None
        except SuiteError as exc:
            raise InvalidInput(str(exc)) from None
        if base is None:
            raise InvalidInput(f"suite {name!r} is not a preset; expected one of {sorted(PRESETS)} "
                               "or explicit attacks")
        try:
            if req.attacks:
                specs = []
                for attack, params in req.attacks:
                    if attack in REFUSED_ATTACKS:
                        raise InvalidInput(f"attack {attack!r} is not available in server audits")
                    specs.append(AttackSpec(attack=attack, params=dict(params)))
                return Suite(name="custom", attacks=tuple(specs),
                             eps=tuple(req.eps) if req.eps else base.eps,
                             headline_eps=None, batch_size=base.batch_size, checks=base.checks)
            if req.eps:
                return base.replace(eps=list(req.eps))
            return base
        except SuiteError as exc:
            raise InvalidInput(f"suite: {exc}") from None

    def _decode_examples(self, rt, dtype: str, shape: list[int], raw: bytes) -> np.ndarray:
        from dcs.server.dataplane import DTYPES

        want = tuple(rt.input_shape)
        if dtype not in DTYPES:
            raise InvalidInput(f"examples.images.dtype is {dtype or 'unset'!r}; expected FLOAT32 or UINT8")
        if len(shape) != len(want) + 1 or tuple(shape[1:]) != want:
            raise InvalidInput(f"examples.images.shape {list(shape)}; expected "
                               f"[N, {', '.join(map(str, want))}] for model {rt.name!r}")
        if shape[0] < 1:
            raise InvalidInput("examples.images is empty; send at least one image")
        np_dtype, scale = DTYPES[dtype]
        need = int(np.prod(shape)) * np_dtype.itemsize
        if len(raw) != need:
            raise InvalidInput(f"examples.images.data has {len(raw)} bytes; shape {list(shape)} "
                               f"of {dtype} needs {need}")
        x = np.frombuffer(raw, dtype=np_dtype).reshape(shape).astype(np.float32) * np.float32(scale)
        return self._dp.check_values(x, "examples.images")

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
            d = report.to_dict()
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
