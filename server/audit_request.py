"""What a StartAudit request may ask for: its parsed form and the checks that turn it into a job.

Everything here is pure validation (no I/O, no job state): ``AuditManager.start_job`` calls these
in order and maps each refusal to its status code through the exception type
(``InvalidInput`` → INVALID_ARGUMENT, ``LimitExceeded`` → RESOURCE_EXHAUSTED).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from dcs.robustness.suites import PRESETS, AttackSpec, Suite, SuiteError, get_suite
from dcs.server.errors import InvalidInput, LimitExceeded

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


def resolve_limit(asked: int, server: int, field_name: str, flag: str) -> int:
    """The request's limit (0 = the server's), refused past the server's."""
    if asked < 0:
        raise InvalidInput(f"{field_name} is {asked}; expected >= 0 (0 = the server limit)")
    if asked > server:
        raise LimitExceeded(f"{field_name} {asked} exceeds the server limit {flag}={server}")
    return asked or server


def build_suite(req: AuditRequest) -> Suite:
    """The preset the request names (default ``quick``), or its explicit attacks on that preset."""
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


def dataset_source(ds: DatasetSpec, offered: Iterable[str], max_examples: int) -> dict:
    """The job's ``data`` entry for a named split the server offers (``--datasets``)."""
    offered = list(offered)
    if ds.name not in offered:
        raise InvalidInput(f"dataset.name {ds.name!r} is not offered by this server; "
                           f"expected one of {offered} (--datasets)")
    split = ds.split or "test"
    if split not in SPLITS:
        raise InvalidInput(f"dataset.split {ds.split!r}; expected one of {list(SPLITS)}")
    if ds.limit < 0:
        raise InvalidInput(f"dataset.limit is {ds.limit}; expected >= 0 (0 = the limit)")
    if ds.limit > max_examples:
        raise LimitExceeded(f"dataset.limit {ds.limit} exceeds the example limit "
                            f"{max_examples} (--max-audit-examples / limits.max_examples)")
    return {"kind": "dataset", "name": ds.name, "split": split, "limit": ds.limit or max_examples}


def decode_examples(model: str, input_shape: tuple[int, ...], dtype: str, shape: list[int],
                    raw: bytes, check_values: Callable[[np.ndarray, str], np.ndarray]) -> np.ndarray:
    """Uploaded images as float32 in [0, 1], checked against the model's input shape."""
    from dcs.server.dataplane import DTYPES

    want = tuple(input_shape)
    if dtype not in DTYPES:
        raise InvalidInput(f"examples.images.dtype is {dtype or 'unset'!r}; expected FLOAT32 or UINT8")
    if len(shape) != len(want) + 1 or tuple(shape[1:]) != want:
        raise InvalidInput(f"examples.images.shape {list(shape)}; expected "
                           f"[N, {', '.join(map(str, want))}] for model {model!r}")
    if shape[0] < 1:
        raise InvalidInput("examples.images is empty; send at least one image")
    np_dtype, scale = DTYPES[dtype]
    need = int(np.prod(shape)) * np_dtype.itemsize
    if len(raw) != need:
        raise InvalidInput(f"examples.images.data has {len(raw)} bytes; shape {list(shape)} "
                           f"of {dtype} needs {need}")
    x = np.frombuffer(raw, dtype=np_dtype).reshape(shape).astype(np.float32) * np.float32(scale)
    return check_values(x, "examples.images")


def check_upload(n: int, labels: tuple[int, ...], num_classes: int, max_examples: int) -> np.ndarray:
    """The uploaded labels as int64, one per image and each a class of the model."""
    if n > max_examples:
        raise LimitExceeded(f"examples has {n} images; the limit is {max_examples} "
                            "(--max-audit-examples / limits.max_examples)")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (n,):
        raise InvalidInput(f"examples.labels has {len(y)} entries; expected {n} (one per image)")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise InvalidInput(f"examples.labels span [{y.min()}, {y.max()}]; expected 0..{num_classes - 1}")
    return y


def check_cost(suite: Suite, n: int, members: int, max_gradients: int, max_queries: int) -> None:
    """Refuse a suite whose worst-case cost on ``n`` examples passes the gradient or query limit.

    ``members``: the size of the package's BPDA surrogate family (each member's attacks count).
    """
    try:
        grads, queries = suite.estimate_cost(n, members if members >= 2 else 1)
    except SuiteError as exc:
        raise InvalidInput(str(exc)) from None
    except (TypeError, ValueError, OverflowError) as exc:  # params_json of the wrong type
        raise InvalidInput(f"attacks: a parameter has the wrong type or value ({exc})") from None
    if grads > max_gradients:
        raise LimitExceeded(f"suite {suite.name!r} may need {grads} gradient evaluations for {n} "
                            f"examples; the limit is {max_gradients} (--max-audit-gradients / "
                            "limits.max_gradients)")
    if queries > max_queries:
        raise LimitExceeded(f"suite {suite.name!r} may need {queries} model queries for {n} "
                            f"examples; the limit is {max_queries} (--max-audit-queries)")
