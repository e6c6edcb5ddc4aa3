"""Property-based fuzzing of every RPC of both APIs against a real server process.

Every answer must be a proper status: OK or a DESIGN §5 code, never UNKNOWN, never INTERNAL
(the interceptor turns a Python exception into INTERNAL, so INTERNAL means a server bug). The
server must stay up and answer a valid request correctly afterwards. Random bytes go through a
raw generic channel call. The default run tries ``FAST`` cases per RPC; ``make stress`` runs the
``slow`` variants with ``SLOW`` cases each. Hypothesis is derandomized: the same cases each run.
"""
from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from dcs.proto import grpc_predict_v2_pb2 as ipb
from dcs.proto import grpc_predict_v2_pb2_grpc as ipb_grpc
from dcs.robustness.attacks import REGISTRY
from tests.reliability.conftest import AUTH, MODEL, assert_no_tracebacks, start_proc

FAST, SLOW = 25, 300

#: What a well-behaved server may answer to arbitrary input (DESIGN §5). Never UNKNOWN/INTERNAL.
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
           "UNAUTHENTICATED", "PERMISSION_DENIED", "UNAVAILABLE"}

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
ODD_NAMES = [MODEL, "", " ", "../digits-mlp", "digits-mlp/../digits-mlp", "/etc/passwd", "..",
             ".", "digits-mlp\x00", "ｄｉｇｉｔｓ-mlp", "digits-mlp/1", "DIGITS-MLP", "%2e%2e%2f",
             "digits-mlp ", "a" * 300, "\u202edigits", "😀", "C:\\\\windows"]
names = st.one_of(st.sampled_from(ODD_NAMES), st.text(max_size=40))
model_names = st.one_of(st.just(MODEL), names)
dims = st.one_of(st.integers(-3, 40), st.sampled_from([1, 8, 2**31, 2**40, 2**62, -(2**62)]),
                 INT64)
shapes = st.one_of(
    st.lists(dims, max_size=6),
    st.tuples(st.integers(-2, 40)).map(lambda t: [t[0], 1, 8, 8]),
    st.just([1, 8, 8]),
    st.tuples(dims, dims, dims).map(lambda t: [t[0], 1, t[1], t[2]]),
)
SPECIAL = [0.0, -0.0, 1.0, 0.5, -1.0, 2.0, math.nan, math.inf, -math.inf, 3.4e38, 1e-45]


@st.composite
def tensor_payload(draw, shape):
    """Bytes for ``shape``: right length with odd values, or a wrong length."""
    kind = draw(st.sampled_from(["f32", "u8", "random", "empty", "off_by_one"]))
    n = 1
    for d in shape:
        n *= d if 0 <= d <= 4096 else 0
    n = min(n, 4096)
    if kind == "f32":
        vals = draw(st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(0, 1, width=32)),
                             min_size=n, max_size=n))
        return np.asarray(vals, "<f4").tobytes()
    if kind == "u8":
        return bytes(draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "off_by_one":
        return b"\x00" * max(0, 4 * n + draw(st.sampled_from([-1, 1, 3])))
    return b""


@st.composite
def tensors(draw):
    shape = draw(shapes)
    return cpb.Tensor(dtype=draw(st.integers(-2, 5)), shape=shape,
                      data=draw(tensor_payload(shape)))


@st.composite
def classify_requests(draw):
    return cpb.ClassifyRequest(model=draw(model_names), version=draw(st.one_of(st.integers(-2, 3), INT64)),
                               images=draw(tensors()), top_k=draw(st.one_of(st.integers(-2, 12), INT32)))


@st.composite
def infer_params(draw):
    p = ipb.InferParameter()
    which = draw(st.sampled_from(["none", "int", "str", "bool", "double", "uint"]))
    if which == "int":
        p.int64_param = draw(INT64)
    elif which == "str":
        p.string_param = draw(st.text(max_size=10))
    elif which == "bool":
        p.bool_param = draw(st.booleans())
    elif which == "double":
        p.double_param = draw(st.floats(allow_nan=True))
    elif which == "uint":
        p.uint64_param = draw(st.integers(0, 2**64 - 1))
    return p


@st.composite
def infer_requests(draw):
    req = ipb.ModelInferRequest(model_name=draw(model_names),
                                model_version=draw(st.one_of(st.sampled_from(["", "1", "0", "-1", "01", "1.0", "９", "9" * 5000]), st.text(max_size=8))),
                                id=draw(st.text(max_size=20)))
    for _ in range(draw(st.integers(0, 2))):
        shape = draw(shapes)
        t = req.inputs.add(name=draw(st.sampled_from(["input", "INPUT", "", "x"])),
                           datatype=draw(st.sampled_from(["FP32", "UINT8", "INT64", "BYTES", "", "fp32"])),
                           shape=shape)
        how = draw(st.sampled_from(["raw", "fp32", "uint", "none"]))
        if how == "raw":
            for _ in range(draw(st.integers(1, 2))):
                req.raw_input_contents.append(draw(tensor_payload(shape)))
        elif how == "fp32":
            t.contents.fp32_contents.extend(draw(st.lists(st.sampled_from(SPECIAL), max_size=70)))
        elif how == "uint":
            t.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=70)))
    for _ in range(draw(st.integers(0, 2))):
        out = req.outputs.add(name=draw(st.sampled_from(["logits", "LOGITS", "", "probs"])))
        if draw(st.booleans()):
            out.parameters["classification"].CopyFrom(draw(infer_params()))
    return req


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
PARAM_KEYS = ["steps", "restarts", "n_queries", "step_size", "batch_size", "eps", "p_init",
              "targeted", "random_start", "attack", "attack_params", "source", "lam", "lr",
              "samples", "eot", "x"]


@st.composite
def params_json(draw):
    kind = draw(st.sampled_from(["obj", "garbage", "empty", "nonobj", "big"]))
    if kind == "obj":
        d = draw(st.dictionaries(st.sampled_from(PARAM_KEYS), json_values, max_size=3))
        return json.dumps(d)
    if kind == "big":
        key = draw(st.sampled_from(["steps", "restarts", "n_queries", "batch_size"]))
        return json.dumps({key: draw(st.sampled_from([10**12, 2**63, -1, 0, 1e308, 10**400]))})
    if kind == "garbage":
        return draw(st.text(max_size=30))
    if kind == "nonobj":
        return draw(st.sampled_from(["[]", "1", "null", '"x"', "NaN", "[{}]"]))
    return ""


@st.composite
def start_requests(draw):
    req = cpb.StartAuditRequest(model=draw(model_names), version=draw(st.one_of(st.integers(-1, 2), INT64)),
                                suite=draw(st.one_of(st.sampled_from(["", "quick", "standard", "paper", "custom", "../quick"]), st.text(max_size=10))),
                                seed=draw(st.integers(0, 2**64 - 1)), note=draw(st.text(max_size=50)))
    for _ in range(draw(st.integers(0, 2))):
        req.attacks.add(name=draw(st.one_of(st.sampled_from(sorted(REGISTRY)), st.text(max_size=10))),
                        params_json=draw(params_json()))
    req.eps.extend(draw(st.lists(st.one_of(st.sampled_from([0.0, 0.01, 0.1, 1.0, -0.1, 2.0, math.nan, math.inf])), max_size=4)))
    which = draw(st.sampled_from(["dataset", "examples", "none"]))
    if which == "dataset":
        req.dataset.CopyFrom(cpb.DatasetRef(name=draw(st.sampled_from(["digits", "", "mnist", "../digits"])),
                                            split=draw(st.sampled_from(["", "test", "train", "val", "../../etc"])),
                                            limit=draw(st.one_of(st.integers(-2, 20), INT64))))
    elif which == "examples":
        req.examples.images.CopyFrom(draw(tensors()))
        req.examples.labels.extend(draw(st.lists(st.one_of(st.integers(-1, 11), INT64), max_size=10)))
    if draw(st.booleans()):
        req.limits.max_examples = draw(st.one_of(st.integers(-2, 20), INT64))
        req.limits.max_gradients = draw(st.one_of(st.integers(-2, 5000), INT64))
    return req


job_ids = st.one_of(st.sampled_from(["", "0" * 32, "../../etc/passwd", "' OR 1=1 --", "%", "*"]),
                    st.text(max_size=40))

# (service stub attribute, method name, request strategy, is streaming)
RPCS = {
    "Classify": ("classifier", lambda: classify_requests(), False),
    "ListModels": ("classifier", lambda: st.just(cpb.ListModelsRequest()), False),
    "GetModel": ("classifier", lambda: st.builds(cpb.GetModelRequest, model=model_names, version=INT64), False),
    "ServerLive": ("inference", lambda: st.just(ipb.ServerLiveRequest()), False),
    "ServerReady": ("inference", lambda: st.just(ipb.ServerReadyRequest()), False),
    "ModelReady": ("inference", lambda: st.builds(ipb.ModelReadyRequest, name=model_names, version=st.text(max_size=6)), False),
    "ServerMetadata": ("inference", lambda: st.just(ipb.ServerMetadataRequest()), False),
    "ModelMetadata": ("inference", lambda: st.builds(ipb.ModelMetadataRequest, name=model_names, version=st.text(max_size=6)), False),
    "ModelInfer": ("inference", lambda: infer_requests(), False),
    "StartAudit": ("audit", lambda: start_requests(), False),
    "GetAudit": ("audit", lambda: st.builds(cpb.GetAuditRequest, job_id=job_ids, include_report=st.booleans(), include_html=st.booleans()), False),
    "WatchAudit": ("audit", lambda: st.builds(cpb.WatchAuditRequest, job_id=job_ids), True),
    "CancelAudit": ("audit", lambda: st.builds(cpb.CancelAuditRequest, job_id=job_ids), False),
    "ListAudits": ("audit", lambda: st.builds(cpb.ListAuditsRequest, limit=INT32, state=st.integers(-1, 9)), False),
}
FULL_NAMES = {
    "classifier": "/classifier.v1.Classifier/", "inference": "/inference.GRPCInferenceService/",
    "audit": "/classifier.v1.Audit/"}
STREAMING = {"WatchAudit"}


@pytest.fixture(scope="module")
def fuzz_server(base_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    # Tiny audit limits: a fuzzed StartAudit that happens to be valid runs for a moment only.
    srv = start_proc(base_repo, "--max-audit-examples", "8", "--max-audit-gradients", "3000",
                     "--max-audit-queries", "20000", "--datasets", "digits", "--max-batch", "16",
                     tmp=tmp)
    yield srv
    code = srv.stop()
    assert code == 0, srv.logs()[-3000:]
    assert_no_tracebacks(srv.logs())


@pytest.fixture(scope="module")
def stubs(fuzz_server):
    with grpc.insecure_channel(fuzz_server.target) as ch:
        yield {"classifier": cpb_grpc.ClassifierStub(ch), "inference": ipb_grpc.GRPCInferenceServiceStub(ch),
               "audit": cpb_grpc.AuditStub(ch), "channel": ch}


def _call(stubs, method: str, request, raw: bool = False):
    """One RPC; returns the status code name. Streams are read to the end (bounded by a deadline)."""
    service = RPCS[method][0]
    kw = {"timeout": 10, "metadata": AUTH if service == "audit" else None}
    try:
        if raw:
            path = FULL_NAMES[service] + method
            ch = stubs["channel"]
            if method in STREAMING:
                for _ in ch.unary_stream(path)(request, **kw):
                    pass
            else:
                ch.unary_unary(path)(request, **kw)
        elif method in STREAMING:
            for i, _ in enumerate(getattr(stubs[service], method)(request, **kw)):
                assert i < 10_000
        else:
            getattr(stubs[service], method)(request, **kw)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()
    return "OK", ""


def _valid_classify_ok(stubs, x, reference) -> None:
    resp = stubs["classifier"].Classify(cpb.ClassifyRequest(
        model=MODEL, images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape, data=x.tobytes())), timeout=10)
    want = reference(x).argmax(1)
    assert [p.top[0].index for p in resp.predictions] == want.tolist()


def _cleanup_jobs(stubs) -> None:
    for job in stubs["audit"].ListAudits(cpb.ListAuditsRequest(limit=1000), metadata=AUTH, timeout=10).jobs:
        if job.state in (cpb.QUEUED, cpb.RUNNING):
            try:
                stubs["audit"].CancelAudit(cpb.CancelAuditRequest(job_id=job.job_id), metadata=AUTH, timeout=10)
            except grpc.RpcError:
                pass


def _fuzz(method: str, n: int, raw: bool, stubs, stats, digits_test, reference):
    seen: dict[str, int] = {}
    strategy = st.binary(max_size=512) if raw else RPCS[method][1]()

    @settings(max_examples=n, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(request):
        code, details = _call(stubs, method, request, raw=raw)
        seen[code] = seen.get(code, 0) + 1
        stats.code(code)
        assert code in ALLOWED, f"{method} answered {code}: {details!r} to {request!r:.500}"
        if code == "RESOURCE_EXHAUSTED" and method == "StartAudit" and "audit job(s)" in details:
            _cleanup_jobs(stubs)  # a valid fuzzed job holds the one slot; free it

    run()
    label = f"{method}{' (random bytes)' if raw else ''}"
    stats.cases[label] += n
    stats.section(f"fuzz {label}", cases=n, codes=seen)
    _cleanup_jobs(stubs)
    # The server is up and still answers a valid request correctly.
    _valid_classify_ok(stubs, digits_test[0][:3], reference)


@pytest.mark.parametrize("method", sorted(RPCS))
def test_fuzz_rpc(method, stubs, stats, digits_test, reference):
    _fuzz(method, FAST, False, stubs, stats, digits_test, reference)


@pytest.mark.parametrize("method", ["Classify", "ModelInfer", "StartAudit", "WatchAudit", "GetModel"])
def test_fuzz_random_bytes(method, stubs, stats, digits_test, reference):
    _fuzz(method, FAST, True, stubs, stats, digits_test, reference)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", sorted(RPCS))
def test_fuzz_rpc_many(method, stubs, stats, digits_test, reference):
    _fuzz(method, SLOW, False, stubs, stats, digits_test, reference)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", sorted(RPCS))
def test_fuzz_random_bytes_many(method, stubs, stats, digits_test, reference):
    _fuzz(method, SLOW // 3, True, stubs, stats, digits_test, reference)
