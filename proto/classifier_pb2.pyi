from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]

class AuditState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_STATE_UNSPECIFIED: _ClassVar[AuditState]
    QUEUED: _ClassVar[AuditState]
    RUNNING: _ClassVar[AuditState]
    SUCCEEDED: _ClassVar[AuditState]
    FAILED: _ClassVar[AuditState]
    CANCELLED: _ClassVar[AuditState]
    INTERRUPTED: _ClassVar[AuditState]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
UINT8: DType
AUDIT_STATE_UNSPECIFIED: AuditState
QUEUED: AuditState
RUNNING: AuditState
SUCCEEDED: AuditState
FAILED: AuditState
CANCELLED: AuditState
INTERRUPTED: AuditState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "sha256", "provider")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    sha256: str
    provider: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., provider: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "images", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: Tensor
    top_k: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "predictions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("ref", "labels", "input_shape", "dataset", "defense", "ready")
    REF_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DEFENSE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ref: ModelRef
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    dataset: str
    defense: str
    ready: bool
    def __init__(self, ref: _Optional[_Union[ModelRef, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., dataset: _Optional[str] = ..., defense: _Optional[str] = ..., ready: bool = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "shape", "accepted_dtypes", "min_value", "max_value", "layout", "max_batch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    min_value: float
    max_value: float
    layout: str
    max_batch: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., accepted_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., min_value: _Optional[float] = ..., max_value: _Optional[float] = ..., layout: _Optional[str] = ..., max_batch: _Optional[int] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("summary", "manifest_json", "input")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    summary: ModelSummary
    manifest_json: str
    input: InputSpec
    def __init__(self, summary: _Optional[_Union[ModelSummary, _Mapping]] = ..., manifest_json: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ...) -> None: ...

class AttackSpec(_message.Message):
    __slots__ = ("name", "params_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    params_json: str
    def __init__(self, name: _Optional[str] = ..., params_json: _Optional[str] = ...) -> None: ...

class DatasetRef(_message.Message):
    __slots__ = ("name", "split", "limit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    split: str
    limit: int
    def __init__(self, name: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class UploadedExamples(_message.Message):
    __slots__ = ("images", "labels")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class AuditLimits(_message.Message):
    __slots__ = ("max_examples", "max_gradients")
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    max_examples: int
    max_gradients: int
    def __init__(self, max_examples: _Optional[int] = ..., max_gradients: _Optional[int] = ...) -> None: ...

class StartAuditRequest(_message.Message):
    __slots__ = ("model", "version", "suite", "attacks", "eps", "dataset", "examples", "seed", "limits", "note")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    ATTACKS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    suite: str
    attacks: _containers.RepeatedCompositeFieldContainer[AttackSpec]
    eps: _containers.RepeatedScalarFieldContainer[float]
    dataset: DatasetRef
    examples: UploadedExamples
    seed: int
    limits: AuditLimits
    note: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., suite: _Optional[str] = ..., attacks: _Optional[_Iterable[_Union[AttackSpec, _Mapping]]] = ..., eps: _Optional[_Iterable[float]] = ..., dataset: _Optional[_Union[DatasetRef, _Mapping]] = ..., examples: _Optional[_Union[UploadedExamples, _Mapping]] = ..., seed: _Optional[int] = ..., limits: _Optional[_Union[AuditLimits, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class StartAuditResponse(_message.Message):
    __slots__ = ("job_id", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: AuditState
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[AuditState, str]] = ...) -> None: ...

class AuditProgress(_message.Message):
    __slots__ = ("attack", "eps", "examples_done", "examples_total", "robust_accuracy", "eta_s", "fraction", "gradient_evaluations")
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROBUST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    attack: str
    eps: float
    examples_done: int
    examples_total: int
    robust_accuracy: float
    eta_s: float
    fraction: float
    gradient_evaluations: int
    def __init__(self, attack: _Optional[str] = ..., eps: _Optional[float] = ..., examples_done: _Optional[int] = ..., examples_total: _Optional[int] = ..., robust_accuracy: _Optional[float] = ..., eta_s: _Optional[float] = ..., fraction: _Optional[float] = ..., gradient_evaluations: _Optional[int] = ...) -> None: ...

class AuditSummary(_message.Message):
    __slots__ = ("clean_accuracy", "robust_accuracy", "num_examples", "summary_json")
    CLEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ROBUST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    clean_accuracy: float
    robust_accuracy: float
    num_examples: int
    summary_json: str
    def __init__(self, clean_accuracy: _Optional[float] = ..., robust_accuracy: _Optional[float] = ..., num_examples: _Optional[int] = ..., summary_json: _Optional[str] = ...) -> None: ...

class AuditJob(_message.Message):
    __slots__ = ("job_id", "state", "model", "suite", "request_json", "progress", "summary", "report_json", "report_html", "error", "created_unix_s", "started_unix_s", "finished_unix_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    REPORT_HTML_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: AuditState
    model: ModelRef
    suite: str
    request_json: str
    progress: AuditProgress
    summary: AuditSummary
    report_json: str
    report_html: str
    error: str
    created_unix_s: float
    started_unix_s: float
    finished_unix_s: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[AuditState, str]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., suite: _Optional[str] = ..., request_json: _Optional[str] = ..., progress: _Optional[_Union[AuditProgress, _Mapping]] = ..., summary: _Optional[_Union[AuditSummary, _Mapping]] = ..., report_json: _Optional[str] = ..., report_html: _Optional[str] = ..., error: _Optional[str] = ..., created_unix_s: _Optional[float] = ..., started_unix_s: _Optional[float] = ..., finished_unix_s: _Optional[float] = ...) -> None: ...

class GetAuditRequest(_message.Message):
    __slots__ = ("job_id", "include_report", "include_html")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REPORT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HTML_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    include_report: bool
    include_html: bool
    def __init__(self, job_id: _Optional[str] = ..., include_report: bool = ..., include_html: bool = ...) -> None: ...

class WatchAuditRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("job_id", "state", "progress", "message", "unix_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UNIX_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: AuditState
    progress: AuditProgress
    message: str
    unix_s: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[AuditState, str]] = ..., progress: _Optional[_Union[AuditProgress, _Mapping]] = ..., message: _Optional[str] = ..., unix_s: _Optional[float] = ...) -> None: ...

class CancelAuditRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListAuditsRequest(_message.Message):
    __slots__ = ("limit", "state")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    limit: int
    state: AuditState
    def __init__(self, limit: _Optional[int] = ..., state: _Optional[_Union[AuditState, str]] = ...) -> None: ...

class ListAuditsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[AuditJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[AuditJob, _Mapping]]] = ...) -> None: ...
