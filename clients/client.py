"""Typed Python client for the defended-classifier service (``classifier.v1``), torch-free.

    from dcs.clients.client import Client

    with Client("127.0.0.1:8001", token="...") as c:
        preds = c.classify(x, model="digits-mlp")  # [N, C, H, W] float32 in [0, 1] or uint8
        job = c.start_audit("digits-mlp", suite="quick", dataset="digits", limit=100)
        for p in c.watch(job):
            print(p.attack, p.fraction)
        report = c.report(job)                               # report.json as a dict

Behaviour:

* Every call has a deadline (``timeout_s``; ``watch`` uses ``stream_timeout_s``).
* Idempotent calls (Classify, ListModels, GetModel, GetAudit, ListAudits, WatchAudit,
  CancelAudit) are retried on UNAVAILABLE only, ``retries`` times, with exponential backoff and
  jitter. StartAudit is never retried (it would start a second job).
* Failures raise a ``dcs.clients.errors.ClientError`` subclass carrying ``.code`` (grpc.StatusCode)
  and ``.details`` (the server's message).
* Audit methods send ``authorization: Bearer <token>``; they can live on a separate port
  (``audit_target``).
* ``round_robin=True`` sets the channel option ``grpc.lb_policy_name`` to ``round_robin`` so
  requests spread over every address the target resolves to. Use it with
  ``dns:///<headless-service>:<port>``: a headless Kubernetes Service resolves to one address
  per replica, and without round_robin gRPC's default ``pick_first`` pins the single HTTP/2
  connection to one replica. (A ClusterIP Service has one virtual IP, so it balances
  connections, not requests.) An ``ipv4:`` target can also list addresses directly:
  ``ipv4:10.0.0.1:8001,10.0.0.2:8001``. Retries re-pick, so an UNAVAILABLE replica is skipped.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from dcs.clients.errors import (
    ClientError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
)
from dcs.clients.results import (
    AuditProgress,
    AuditState,
    AuditStatus,
    ClassScore,
    ModelInfo,
    ModelRef,
    Prediction,
)
from dcs.clients.tls import TLSConfig
from dcs.clients.wire import as_wire_array, attack_spec
from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc

log = logging.getLogger("dcs.clients.client")

T = TypeVar("T")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Client:
    """Synchronous client; one channel per target, closed by ``close()`` or the context manager."""

    def __init__(self, target: str, *, tls: bool | TLSConfig = False, token: str | None = None,
                 timeout_s: float = 10, retries: int = 3, round_robin: bool = False,
                 audit_target: str | None = None, backoff_s: float = 0.2,
                 max_backoff_s: float = 2.0, stream_timeout_s: float = 24 * 3600,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if not target:
            raise InvalidArgument("target is empty; expected HOST:PORT or dns:///HOST:PORT")
        if timeout_s <= 0:
            raise InvalidArgument(f"timeout_s is {timeout_s}; expected > 0")
        if retries < 0:
            raise InvalidArgument(f"retries is {retries}; expected >= 0")
        self.target = target
        self.audit_target = audit_target or target
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.stream_timeout_s = float(stream_timeout_s)
        self._token = token.strip() if token else None
        self._tls = TLSConfig() if tls is True else (tls or None)
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Our own retry loop decides; keep gRPC's transparent retries from doubling it.
            ("grpc.enable_retries", 0),
        ]
        # Reconnect quickly so retries reach a server that just came up. Not
        # grpc.min_reconnect_backoff_ms: grpcio before 1.82 also takes it as every connection
        # attempt's timeout, and a TLS handshake on a busy machine never fits in 100 ms (a secure
        # channel made before its server listened never connected; make test-deps, floors).
        options += [("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", int(max(max_backoff_s, 0.1) * 1000))]
        if round_robin:
            options.append(("grpc.lb_policy_name", "round_robin"))
        if self._tls is not None and self._tls.server_name:
            options.append(("grpc.ssl_target_name_override", self._tls.server_name))
        self._options = options
        self._channel = self._make_channel(target)
        self._audit_channel = (self._channel if self.audit_target == target
                               else self._make_channel(self.audit_target))
        self._classifier = cpb_grpc.ClassifierStub(self._channel)
        self._audit = cpb_grpc.AuditStub(self._audit_channel)
        self._specs: dict[tuple[str, int], ModelInfo] = {}

    def _make_channel(self, target: str) -> grpc.Channel:
        if self._tls is None:
            return grpc.insecure_channel(target, options=self._options)
        return grpc.secure_channel(target, self._tls.credentials(), options=self._options)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()
        if self._audit_channel is not self._channel:
            self._audit_channel.close()

    def __enter__(self) -> Client:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------

    def _metadata(self, audit: bool) -> list[tuple[str, str]] | None:
        if audit and self._token:
            return [("authorization", f"Bearer {self._token}")]
        return None

    def _sleep_before(self, attempt: int) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
        return delay * (0.5 + random.random() / 2)

    def _call(self, method: str, fn: Callable[..., T], request: Any, *, audit: bool = False,
              retry: bool = True) -> T:
        """One unary call with a deadline; UNAVAILABLE retried when ``retry``."""
        attempt = 0
        while True:
            try:
                return fn(request, timeout=self.timeout_s, metadata=self._metadata(audit))
            except grpc.RpcError as exc:
                err = from_rpc_error(exc, method)
            if not (retry and isinstance(err, Unavailable) and attempt < self.retries):
                raise err
            delay = self._sleep_before(attempt)
            attempt += 1
            log.info("%s: UNAVAILABLE (%s); retry %d/%d in %.2f s", method, err.details,
                     attempt, self.retries, delay)
            time.sleep(delay)

    # -- Classifier ------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Models the server is serving (one version each)."""
        reply = self._call("ListModels", self._classifier.ListModels, cpb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in reply.models]

    def wait_ready(self, model: str | None = None, *, timeout_s: float = 60.0) -> list[ModelInfo]:
        """Block until the server answers and ``model`` is loaded and ready (with None: at least
        one model, all of them ready); returns the models. A starting server listens before its
        models are loaded, so ``models()`` alone can answer an empty list. Polls with the client's
        backoff; raises Unavailable with the last reason once ``timeout_s`` has passed."""
        if timeout_s < 0:
            raise InvalidArgument(f"timeout_s is {timeout_s}; expected >= 0")
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            try:
                reply = self._call("ListModels", self._classifier.ListModels,
                                   cpb.ListModelsRequest(), retry=False)
            except Unavailable as exc:
                why = exc.details
            else:
                infos = [ModelInfo.from_pb(m) for m in reply.models]
                ready = [m for m in infos if m.ready]
                if (model is None and ready and len(ready) == len(infos)) or \
                        any(m.name == model for m in ready):
                    return infos
                why = (f"model {model!r} is not loaded and ready (serving: "
                       f"{', '.join(m.name for m in ready) or 'none'})" if model
                       else f"{len(ready)} of {len(infos)} models ready")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"{self.target} not ready after {timeout_s:g} s: {why}",
                                  method="ListModels")
            time.sleep(min(left, self._sleep_before(attempt)))
            attempt += 1

    def model(self, name: str, version: int | None = None) -> ModelInfo:
        """One model with its input spec and manifest."""
        reply = self._call("GetModel", self._classifier.GetModel,
                           cpb.GetModelRequest(model=name, version=int(version or 0)))
        info = ModelInfo.from_pb(reply.summary, reply.input, reply.manifest_json)
        self._specs[(name, int(version or 0))] = info
        return info

    def _spec(self, name: str, version: int | None) -> ModelInfo:
        key = (name, int(version or 0))
        return self._specs.get(key) or self.model(name, version)

    def classify(self, images: np.ndarray, model: str, version: int | None = None,
                 top_k: int = 5, *, batch_size: int | None = None) -> list[Prediction]:
        """Top-k predictions for ``images`` ([N, C, H, W] or one [C, H, W]; float32 in [0, 1] or
        uint8 0..255), one ``Prediction`` per image in order. Batches larger than the server's
        ``max_batch`` (or ``batch_size``) are split into several calls."""
        x = as_wire_array(images)
        if top_k < 0:
            raise InvalidArgument(f"top_k is {top_k}; expected 0 (server default) or more")
        if batch_size is None:
            batch_size = self._spec(model, version).input.max_batch or len(x)
        batch_size = max(1, int(batch_size))
        dtype = cpb.UINT8 if x.dtype == np.uint8 else cpb.FLOAT32
        out: list[Prediction] = []
        for start in range(0, len(x), batch_size):
            chunk = np.ascontiguousarray(x[start:start + batch_size])
            request = cpb.ClassifyRequest(
                model=model, version=int(version or 0), top_k=int(top_k),
                images=cpb.Tensor(dtype=dtype, shape=list(chunk.shape), data=chunk.tobytes()))
            reply = self._call("Classify", self._classifier.Classify, request)
            ref = ModelRef.from_pb(reply.model)
            for p in reply.predictions:
                out.append(Prediction(tuple(ClassScore(int(s.index), s.label, float(s.probability),
                                                       float(s.logit)) for s in p.top), ref))
        return out

    # -- Audit -----------------------------------------------------------------------------------

    def start_audit(self, model: str, *, version: int | None = None, suite: str = "quick",
                    attacks: Sequence[str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]]
                    | None = None, eps: Sequence[float] | None = None,
                    dataset: str | None = None, split: str = "test", limit: int | None = None,
                    examples: np.ndarray | None = None, labels: Sequence[int] | None = None,
                    seed: int = 0, max_gradients: int | None = None, note: str = "") -> str:
        """Start an audit job and return its id (never retried: it is not idempotent).

        Data: ``dataset`` (a split the server was configured with, at most ``limit`` examples)
        or ``examples`` ([N, C, H, W], float32 in [0, 1] or uint8) with ``labels``.
        ``attacks``: names, ``(name, params)`` pairs or ``{"name": ..., "params": {...}}``;
        given, they replace the suite's attacks. ``eps`` overrides the ε list."""
        if (dataset is None) == (examples is None):
            raise InvalidArgument("give exactly one data source: dataset=NAME or "
                                  "examples=ARRAY (with labels)")
        request = cpb.StartAuditRequest(model=model, version=int(version or 0),
                                        suite=suite or "", seed=int(seed), note=note)
        for spec in attacks or ():
            request.attacks.append(attack_spec(spec))
        if eps is not None:
            request.eps.extend(float(e) for e in eps)
        if limit is not None and limit <= 0:
            raise InvalidArgument(f"limit is {limit}; expected a positive number of examples")
        if dataset is not None:
            request.dataset.CopyFrom(cpb.DatasetRef(name=dataset, split=split or "test",
                                                    limit=int(limit or 0)))
        else:
            x = as_wire_array(examples)
            if labels is None:
                raise InvalidArgument("examples need labels (one class index per example)")
            y = np.asarray(labels).reshape(-1)
            if len(y) != len(x):
                raise InvalidArgument(f"labels has {len(y)} entries for {len(x)} examples")
            if limit is not None:
                x, y = x[:limit], y[:limit]
            dtype = cpb.UINT8 if x.dtype == np.uint8 else cpb.FLOAT32
            request.examples.CopyFrom(cpb.UploadedExamples(
                images=cpb.Tensor(dtype=dtype, shape=list(x.shape),
                                  data=np.ascontiguousarray(x).tobytes()),
                labels=[int(v) for v in y]))
        if limit is not None or max_gradients is not None:
            request.limits.CopyFrom(cpb.AuditLimits(max_examples=int(limit or 0),
                                                    max_gradients=int(max_gradients or 0)))
        reply = self._call("StartAudit", self._audit.StartAudit, request, audit=True,
                           retry=False)
        return reply.job_id

    def audit(self, job_id: str) -> AuditStatus:
        """The job's state, progress and summary."""
        job = self._call("GetAudit", self._audit.GetAudit, cpb.GetAuditRequest(job_id=job_id),
                         audit=True)
        return AuditStatus.from_pb(job)

    def audits(self, *, limit: int = 100,
               state: AuditState | str | None = None) -> list[AuditStatus]:
        """Jobs, newest first (no report bodies)."""
        st = AuditState(state.upper() if isinstance(state, str) else state) if state else None
        reply = self._call("ListAudits", self._audit.ListAudits,
                           cpb.ListAuditsRequest(limit=int(limit),
                                                 state=st.to_pb() if st else 0), audit=True)
        return [AuditStatus.from_pb(j) for j in reply.jobs]

    def cancel(self, job_id: str) -> AuditStatus:
        """Ask the server to cancel the job; returns its state after the request."""
        job = self._call("CancelAudit", self._audit.CancelAudit,
                         cpb.CancelAuditRequest(job_id=job_id), audit=True)
        return AuditStatus.from_pb(job)

    def _get_job(self, job_id: str, *, report: bool, html: bool) -> cpb.AuditJob:
        return self._call("GetAudit", self._audit.GetAudit,
                          cpb.GetAuditRequest(job_id=job_id, include_report=report,
                                              include_html=html), audit=True)

    def report(self, job_id: str) -> dict[str, Any]:
        """report.json of a SUCCEEDED job, as a dict. Other states -> ``FailedPrecondition``."""
        job = self._get_job(job_id, report=True, html=False)
        if not job.report_json:
            state = AuditState.from_pb(job.state)
            why = f": {job.error}" if job.error else ""
            raise FailedPrecondition(f"job {job_id!r} is {state.value}{why}; a report exists once "
                                     f"it has SUCCEEDED", method="GetAudit")
        return json.loads(job.report_json)

    def report_html(self, job_id: str) -> str | None:
        """report.html of a SUCCEEDED job, or None when the server provides none."""
        job = self._get_job(job_id, report=False, html=True)
        return job.report_html or None

    def watch(self, job_id: str, *, timeout_s: float | None = None) -> Iterator[AuditProgress]:
        """Progress events until the job reaches a final state (the last event carries it).

        The stream's deadline is ``timeout_s`` (default ``stream_timeout_s``). A stream cut by
        UNAVAILABLE is re-opened (up to ``retries`` times in a row with backoff)."""
        budget = timeout_s if timeout_s is not None else self.stream_timeout_s
        deadline = time.monotonic() + budget
        failures = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise from_rpc_error(_Expired(), "WatchAudit")
            stream = self._audit.WatchAudit(cpb.WatchAuditRequest(job_id=job_id),
                                            timeout=remaining, metadata=self._metadata(True))
            last: AuditProgress | None = None
            try:
                for event in stream:
                    failures = 0
                    last = AuditProgress.from_event(event)
                    yield last
                    if last.state.final:
                        return
                if last is None or last.state.final:
                    return
                # The server closed the stream early (e.g. shutting down): re-check the job.
                status = self.audit(job_id)
                if status.state.final:
                    yield status.progress
                    return
                time.sleep(self._sleep_before(0))
            except grpc.RpcError as exc:
                err = from_rpc_error(exc, "WatchAudit")
                if not isinstance(err, Unavailable) or failures >= self.retries:
                    raise err from None
                delay = self._sleep_before(failures)
                failures += 1
                log.info("WatchAudit: UNAVAILABLE (%s); re-opening in %.2f s", err.details, delay)
                time.sleep(delay)
            finally:
                stream.cancel()


class _Expired(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "watch deadline exceeded"


__all__ = ["Client", "ClientError", "TLSConfig"]
