"""Frozen result types returned by ``dcs.clients.client.Client`` (built from the protobuf replies)."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from dcs.proto import classifier_pb2 as cpb


class AuditState(str, enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"

    @property
    def final(self) -> bool:
        return self in (AuditState.SUCCEEDED, AuditState.FAILED, AuditState.CANCELLED,
                        AuditState.INTERRUPTED)

    @classmethod
    def from_pb(cls, value: int) -> AuditState:
        name = cpb.AuditState.Name(value) if value in cpb.AuditState.values() else ""
        return cls(name) if name in cls.__members__ and name != "AUDIT_STATE_UNSPECIFIED" \
            else cls.UNSPECIFIED

    def to_pb(self) -> int:
        return 0 if self is AuditState.UNSPECIFIED else cpb.AuditState.Value(self.value)


@dataclass(frozen=True)
class ModelRef:
    """Which package answered: name, version, sha256 of model.onnx, ORT provider."""

    name: str
    version: int
    sha256: str
    provider: str = ""

    @classmethod
    def from_pb(cls, m: cpb.ModelRef) -> ModelRef:
        return cls(m.name, int(m.version), m.sha256, m.provider)


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float
    logit: float


@dataclass(frozen=True)
class Prediction:
    """One image's top-k, descending probability (``top[0]`` is the prediction)."""

    top: tuple[ClassScore, ...]
    model: ModelRef

    @property
    def index(self) -> int:
        return self.top[0].index

    @property
    def label(self) -> str:
        return self.top[0].label

    @property
    def probability(self) -> float:
        return self.top[0].probability


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]                   # without the batch axis, [C, H, W]
    accepted_dtypes: tuple[str, ...]         # "FLOAT32", "UINT8"
    min_value: float
    max_value: float
    layout: str
    max_batch: int

    @classmethod
    def from_pb(cls, s: cpb.InputSpec) -> InputSpec:
        return cls(s.name, tuple(int(v) for v in s.shape),
                   tuple(cpb.DType.Name(d) for d in s.accepted_dtypes), float(s.min_value),
                   float(s.max_value), s.layout, int(s.max_batch))


@dataclass(frozen=True)
class ModelInfo:
    """A served model. ``input`` and ``manifest_json`` are set by ``Client.model(name)`` only."""

    ref: ModelRef
    labels: tuple[str, ...]
    input_shape: tuple[int, ...]
    dataset: str
    defense: str
    ready: bool
    input: InputSpec | None = None
    manifest_json: str = ""

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def version(self) -> int:
        return self.ref.version

    @property
    def sha256(self) -> str:
        return self.ref.sha256

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_json) if self.manifest_json else {}

    @classmethod
    def from_pb(cls, s: cpb.ModelSummary, input: cpb.InputSpec | None = None,
                manifest_json: str = "") -> ModelInfo:
        return cls(ModelRef.from_pb(s.ref), tuple(s.labels), tuple(int(v) for v in s.input_shape),
                   s.dataset, s.defense, bool(s.ready),
                   InputSpec.from_pb(input) if input is not None else None, manifest_json)


def _opt(value: float) -> float | None:
    return None if value < 0 else _f32(value)


def _f32(value: float) -> float:
    """A protobuf ``float`` as the decimal it was sent as (0.1, not 0.10000000149011612)."""
    return float(f"{value:.7g}")


@dataclass(frozen=True)
class AuditProgress:
    """One WatchAudit event; ``robust_accuracy``/``eta_s`` are None when the server has none."""

    job_id: str
    state: AuditState
    attack: str = ""
    eps: float = 0.0
    examples_done: int = 0
    examples_total: int = 0
    robust_accuracy: float | None = None
    eta_s: float | None = None
    fraction: float = 0.0
    gradient_evaluations: int = 0
    message: str = ""
    unix_s: float = 0.0

    @classmethod
    def from_pb(cls, job_id: str, state: int, p: cpb.AuditProgress, message: str = "",
                unix_s: float = 0.0) -> AuditProgress:
        return cls(job_id, AuditState.from_pb(state), p.attack, _f32(p.eps),
                   int(p.examples_done), int(p.examples_total), _opt(p.robust_accuracy),
                   _opt(p.eta_s), float(p.fraction), int(p.gradient_evaluations), message,
                   float(unix_s))

    @classmethod
    def from_event(cls, e: cpb.AuditEvent) -> AuditProgress:
        return cls.from_pb(e.job_id, e.state, e.progress, e.message, e.unix_s)


@dataclass(frozen=True)
class AuditStatus:
    """A job as GetAudit/ListAudits return it (the report body is fetched by ``Client.report``)."""

    job_id: str
    state: AuditState
    model: ModelRef
    suite: str
    request_json: str
    progress: AuditProgress
    clean_accuracy: float | None
    robust_accuracy: float | None
    num_examples: int
    summary_json: str
    error: str
    created_unix_s: float
    started_unix_s: float
    finished_unix_s: float
    has_summary: bool = False

    @property
    def request(self) -> dict[str, Any]:
        return json.loads(self.request_json) if self.request_json else {}

    @property
    def summary(self) -> Any:
        return json.loads(self.summary_json) if self.summary_json else None

    @classmethod
    def from_pb(cls, j: cpb.AuditJob) -> AuditStatus:
        has = j.HasField("summary")
        s = j.summary
        return cls(j.job_id, AuditState.from_pb(j.state), ModelRef.from_pb(j.model), j.suite,
                   j.request_json, AuditProgress.from_pb(j.job_id, j.state, j.progress),
                   _f32(s.clean_accuracy) if has else None,
                   _f32(s.robust_accuracy) if has else None, int(s.num_examples),
                   s.summary_json, j.error, float(j.created_unix_s), float(j.started_unix_s),
                   float(j.finished_unix_s), has)
