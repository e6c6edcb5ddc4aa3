"""gRPC translation for the Audit service (classifier.v1.Audit), plus the bundle the app mounts."""
from __future__ import annotations

import json

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from dcs.server.audit import AuditManager
from dcs.server.audit_request import AuditRequest, DatasetSpec
from dcs.server.auth import TokenAuth
from dcs.server.config import ServerConfig
from dcs.server.dataplane import DataPlane
from dcs.server.errors import InvalidInput, NotReady
from dcs.server.jobs import JobRow
from dcs.server.metrics import ServerMetrics

_STATE_TO_PB = {"queued": cpb.QUEUED, "running": cpb.RUNNING, "succeeded": cpb.SUCCEEDED,
                "failed": cpb.FAILED, "cancelled": cpb.CANCELLED, "interrupted": cpb.INTERRUPTED}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}
_DTYPE_NAMES = {cpb.FLOAT32: "FLOAT32", cpb.UINT8: "UINT8"}


def _progress(p: dict) -> cpb.AuditProgress:
    return cpb.AuditProgress(
        attack=str(p.get("attack", "")), eps=float(p.get("eps", 0.0)),
        examples_done=int(p.get("examples_done", 0)), examples_total=int(p.get("examples_total", 0)),
        robust_accuracy=float(p.get("robust_accuracy", -1.0)), eta_s=float(p.get("eta_s", -1.0)),
        fraction=float(p.get("fraction", 0.0)),
        gradient_evaluations=int(p.get("gradient_evaluations", 0)))


def job_to_pb(row: JobRow, report_json: str = "", report_html: str = "") -> cpb.AuditJob:
    summary = None
    if row.summary:
        s = row.summary
        summary = cpb.AuditSummary(
            clean_accuracy=float(s.get("clean_accuracy") or 0.0),
            robust_accuracy=float(s["robust_accuracy"]) if s.get("robust_accuracy") is not None else -1.0,
            num_examples=int(s.get("n_examples", 0)), summary_json=json.dumps(s, sort_keys=True))
    return cpb.AuditJob(
        job_id=row.id, state=_STATE_TO_PB.get(row.state, cpb.AUDIT_STATE_UNSPECIFIED),
        model=cpb.ModelRef(name=row.model, version=row.version, sha256=row.sha256,
                           provider=row.provider),
        suite=row.suite, request_json=json.dumps(row.request, sort_keys=True),
        progress=_progress(row.progress), summary=summary, report_json=report_json,
        report_html=report_html, error=row.error, created_unix_s=row.created,
        started_unix_s=row.started, finished_unix_s=row.finished)


class AuditServicer(cpb_grpc.AuditServicer):
    def __init__(self, manager: AuditManager, auth: TokenAuth) -> None:
        self._m = manager
        self._auth = auth

    async def StartAudit(self, request: cpb.StartAuditRequest, context):
        self._auth.check(context.invocation_metadata())
        attacks = []
        for i, a in enumerate(request.attacks):
            try:
                params = json.loads(a.params_json) if a.params_json else {}
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"attacks[{i}].params_json is not valid JSON ({exc})") from None
            if not isinstance(params, dict):
                raise InvalidInput(f"attacks[{i}].params_json must be a JSON object, got {a.params_json!r}")
            attacks.append((a.name, params))
        which = request.WhichOneof("data")
        dataset = images = None
        labels: tuple[int, ...] = ()
        if which == "dataset":
            d = request.dataset
            dataset = DatasetSpec(name=d.name, split=d.split, limit=int(d.limit))
        elif which == "examples":
            t = request.examples.images
            images = (_DTYPE_NAMES.get(t.dtype, ""), [int(s) for s in t.shape], t.data)
            labels = tuple(int(v) for v in request.examples.labels)
        row = self._m.start_job(AuditRequest(
            model=request.model, version=int(request.version), suite=request.suite,
            attacks=tuple(attacks), eps=tuple(float(e) for e in request.eps), dataset=dataset,
            images=images, labels=labels, seed=int(request.seed),
            max_examples=int(request.limits.max_examples),
            max_gradients=int(request.limits.max_gradients), note=request.note))
        return cpb.StartAuditResponse(job_id=row.id, state=_STATE_TO_PB[row.state])

    async def GetAudit(self, request: cpb.GetAuditRequest, context):
        self._auth.check(context.invocation_metadata())
        row = self._m.get(request.job_id)
        return job_to_pb(row, self._m.read_report(row) if request.include_report else "",
                         self._m.read_report(row, html=True) if request.include_html else "")

    async def WatchAudit(self, request: cpb.WatchAuditRequest, context):
        self._auth.check(context.invocation_metadata())
        async for ev in self._m.watch(request.job_id):
            yield cpb.AuditEvent(job_id=ev["job_id"], state=_STATE_TO_PB[ev["state"]],
                                 progress=_progress(ev["progress"]), message=ev["message"],
                                 unix_s=ev["unix_s"])

    async def CancelAudit(self, request: cpb.CancelAuditRequest, context):
        self._auth.check(context.invocation_metadata())
        return job_to_pb(self._m.cancel(request.job_id))

    async def ListAudits(self, request: cpb.ListAuditsRequest, context):
        self._auth.check(context.invocation_metadata())
        state = _PB_TO_STATE.get(request.state) if request.state else None
        return cpb.ListAuditsResponse(jobs=[job_to_pb(r) for r in self._m.list(request.limit, state)])


class AuditService:
    """What the app mounts: the manager, its servicer and the token check."""

    available = True

    def __init__(self, config: ServerConfig, dataplane: DataPlane, metrics: ServerMetrics) -> None:
        self.manager = AuditManager(config, dataplane, metrics)
        self.servicer = AuditServicer(self.manager, TokenAuth(config.resolved_audit_token()))
        self._grace = config.grace_period_s

    async def start(self) -> None:
        await self.manager.start()

    async def stop(self) -> None:
        await self.manager.stop(timeout=self._grace)


class _UnavailableAuditServicer(cpb_grpc.AuditServicer):
    """Every audit method answers UNAVAILABLE with the reason (classify is unaffected)."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def _refuse(self):
        raise NotReady(f"audits are unavailable on this server: {self._reason}")

    async def StartAudit(self, request, context):
        self._refuse()

    async def GetAudit(self, request, context):
        self._refuse()

    async def WatchAudit(self, request, context):
        self._refuse()
        yield  # pragma: no cover - makes this an async generator like the real one

    async def CancelAudit(self, request, context):
        self._refuse()

    async def ListAudits(self, request, context):
        self._refuse()


class UnavailableAuditService:
    """Mounted instead of AuditService when the state directory cannot be opened."""

    available = False

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.servicer = _UnavailableAuditServicer(reason)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
