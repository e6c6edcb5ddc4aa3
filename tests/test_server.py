"""The real grpc.aio server on 127.0.0.1 (in-process, event loop in a thread) with real packages.

Covers Classify single/batched, errors → status codes, batching, queue overflow, hot reload
and tampered packages, health, reflection, ListModels/GetModel and /metrics.
"""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from dcs.proto import grpc_predict_v2_pb2 as ipb
from dcs.proto import grpc_predict_v2_pb2_grpc as ipb_grpc
from dcs.robustness.package import SessionOptions, load_package
from dcs.robustness.testing import digits_package
from tests.server_helpers import InProcessServer, sample_value, scrape_metrics

MODEL = "digits-mlp"
MAX_MESSAGE = 64 * 1024


def images(n: int | None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (1, 8, 8) if n is None else (n, 1, 8, 8)
    return rng.random(shape, dtype=np.float32)


def tensor(x: np.ndarray, dtype=cpb.FLOAT32) -> cpb.Tensor:
    return cpb.Tensor(dtype=dtype, shape=list(x.shape), data=x.tobytes())


def reference_logits(repo: Path, x: np.ndarray, version: int = 1) -> np.ndarray:
    pkg = load_package(repo / MODEL / str(version), SessionOptions(device="cpu", load_grad=False))
    return pkg.logits(x.reshape(-1, 1, 8, 8))


@pytest.fixture(scope="module")
def server(digits_repo):
    srv = InProcessServer(digits_repo, metrics_http=True, max_batch=32, max_queue_delay_ms=10,
                          max_message_bytes=MAX_MESSAGE)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return cpb_grpc.ClassifierStub(channel)


def classify(stub, x, **kw):
    return stub.Classify(cpb.ClassifyRequest(model=MODEL, images=tensor(x), **kw), timeout=10)


def test_classify_single_image_matches_onnxruntime(stub, digits_repo):
    x = images(None)
    resp = classify(stub, x, top_k=3)
    want = reference_logits(digits_repo, x)[0]
    assert resp.model.name == MODEL and resp.model.version == 1
    assert len(resp.model.sha256) == 64 and resp.model.provider
    assert len(resp.predictions) == 1
    top = resp.predictions[0].top
    assert len(top) == 3
    assert top[0].index == int(np.argmax(want)) and top[0].label == str(int(np.argmax(want)))
    assert top[0].logit == pytest.approx(float(want.max()), abs=1e-4)
    probs = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
    assert [t.probability for t in top] == pytest.approx(sorted(probs, reverse=True)[:3], abs=1e-5)


def test_classify_batch_and_uint8(stub, digits_repo):
    x = images(5, seed=1)
    resp = classify(stub, x, top_k=1)
    want = reference_logits(digits_repo, x)
    assert [p.top[0].index for p in resp.predictions] == list(np.argmax(want, axis=1))
    u8 = (x * 255).round().astype(np.uint8)
    resp8 = stub.Classify(cpb.ClassifyRequest(model=MODEL, images=tensor(u8, cpb.UINT8)), timeout=10)
    want8 = reference_logits(digits_repo, u8.astype(np.float32) / 255)
    assert [p.top[0].logit for p in resp8.predictions] == pytest.approx(want8.max(axis=1), abs=1e-4)
    assert len(resp8.predictions[0].top) == 5  # default top_k


def _bad_requests():
    good = images(2)
    nan = good.copy()
    nan[1, 0, 3, 4] = np.nan
    inf = good.copy()
    inf[0, 0, 0, 0] = np.inf
    return {
        "wrong rank": (cpb.ClassifyRequest(model=MODEL, images=cpb.Tensor(
            dtype=cpb.FLOAT32, shape=[8, 8], data=good[0, 0].tobytes())),
            grpc.StatusCode.INVALID_ARGUMENT, ["shape [8, 8]", "rank 2"]),
        "wrong size": (cpb.ClassifyRequest(model=MODEL, images=cpb.Tensor(
            dtype=cpb.FLOAT32, shape=[1, 1, 9, 9], data=np.zeros(81, np.float32).tobytes())),
            grpc.StatusCode.INVALID_ARGUMENT, ["[1, 1, 9, 9]", "[N, 1, 8, 8]"]),
        "wrong byte count": (cpb.ClassifyRequest(model=MODEL, images=cpb.Tensor(
            dtype=cpb.FLOAT32, shape=[2, 1, 8, 8], data=good.tobytes()[:-4])),
            grpc.StatusCode.INVALID_ARGUMENT, ["508 bytes", "needs 512"]),
        "wrong dtype": (cpb.ClassifyRequest(model=MODEL, images=cpb.Tensor(
            shape=[2, 1, 8, 8], data=good.tobytes())),
            grpc.StatusCode.INVALID_ARGUMENT, ["dtype", "FLOAT32 or UINT8"]),
        "nan": (cpb.ClassifyRequest(model=MODEL, images=tensor(nan)),
                grpc.StatusCode.INVALID_ARGUMENT, ["NaN/Inf", "[1, 0, 3, 4]"]),
        "inf": (cpb.ClassifyRequest(model=MODEL, images=tensor(inf)),
                grpc.StatusCode.INVALID_ARGUMENT, ["NaN/Inf", "[0, 0, 0, 0]"]),
        "out of range": (cpb.ClassifyRequest(model=MODEL, images=tensor(good * 3)),
                         grpc.StatusCode.INVALID_ARGUMENT, ["expected [0, 1]"]),
        "empty batch": (cpb.ClassifyRequest(model=MODEL, images=cpb.Tensor(
            dtype=cpb.FLOAT32, shape=[0, 1, 8, 8], data=b"")),
            grpc.StatusCode.INVALID_ARGUMENT, ["empty"]),
        "batch above limit": (cpb.ClassifyRequest(model=MODEL, images=tensor(images(33))),
                              grpc.StatusCode.INVALID_ARGUMENT, ["33", "max_batch 32"]),
        "unknown model": (cpb.ClassifyRequest(model="no-such-model", images=tensor(good)),
                          grpc.StatusCode.NOT_FOUND, ["'no-such-model'", MODEL]),
        "unknown version": (cpb.ClassifyRequest(model=MODEL, version=7, images=tensor(good)),
                            grpc.StatusCode.NOT_FOUND, ["version 7", "serving version 1"]),
        "negative top_k": (cpb.ClassifyRequest(model=MODEL, images=tensor(good), top_k=-1),
                           grpc.StatusCode.INVALID_ARGUMENT, ["top_k is -1"]),
        "oversized message": (cpb.ClassifyRequest(model=MODEL, images=cpb.Tensor(
            dtype=cpb.FLOAT32, shape=[1, 1, 8, 8], data=b"\0" * (MAX_MESSAGE + 100))),
            grpc.StatusCode.RESOURCE_EXHAUSTED, [str(MAX_MESSAGE)]),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_gets_status_and_named_problem_and_server_keeps_serving(stub, case):
    request, code, fragments = _bad_requests()[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), (fragment, info.value.details())
    assert classify(stub, images(1)).predictions  # still serving


def test_model_infer_errors_over_kserve_api(channel):
    stub = ipb_grpc.GRPCInferenceServiceStub(channel)
    x = images(2)
    base = {"model_name": MODEL, "raw_input_contents": [x.tobytes()]}
    cases = [
        (ipb.ModelInferRequest(inputs=[ipb.ModelInferRequest.InferInputTensor(
            name="x", datatype="INT64", shape=[2, 1, 8, 8])], **base),
         grpc.StatusCode.INVALID_ARGUMENT, "datatype is 'INT64'"),
        (ipb.ModelInferRequest(inputs=[ipb.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="FP32", shape=[2, 1, 8, 8])], **base),
         grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name is 'pixels'"),
        (ipb.ModelInferRequest(model_name=MODEL, model_version="x1"),
         grpc.StatusCode.INVALID_ARGUMENT, "model_version is 'x1'"),
        (ipb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
    ]
    for request, code, fragment in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert info.value.code() == code and fragment in info.value.details(), info.value.details()
    # typed contents (no raw) work too
    ok = stub.ModelInfer(ipb.ModelInferRequest(model_name=MODEL, inputs=[
        ipb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[2, 1, 8, 8],
            contents=ipb.InferTensorContents(fp32_contents=x.ravel().tolist()))]), timeout=10)
    assert np.frombuffer(ok.raw_output_contents[0], "<f4").shape == (20,)
    assert stub.ServerReady(ipb.ServerReadyRequest()).ready
    assert stub.ModelReady(ipb.ModelReadyRequest(name=MODEL)).ready
    assert not stub.ModelReady(ipb.ModelReadyRequest(name="nope")).ready


class _HoldFirstBatch:
    """Wraps a batcher's worker step: the first batch the worker thread computes waits (bounded)
    until ``queued`` requests wait behind it, so the next batches are certain to hold several
    requests however the machine schedules the client's sends (a busy machine can space 64
    "concurrent" requests so that each finds the model idle). Inline batches are off meanwhile:
    on such a machine every request can also look like a lone client's and run on the event loop
    (``inline_lone_ms``), where holding it would block the very arrivals it waits for."""

    def __init__(self, batcher, queued: int, limit_s: float = 30.0) -> None:
        self.batcher, self.queued, self.limit_s = batcher, queued, limit_s
        self.inner, self.held = batcher._process, False
        self.inline_limits = (batcher.inline_s, batcher.inline_lone_s)

    def __enter__(self):
        self.batcher._process = self
        self.batcher.inline_s = self.batcher.inline_lone_s = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.batcher._process = self.inner
        self.batcher.inline_s, self.batcher.inline_lone_s = self.inline_limits

    def __call__(self, x):
        if not self.held and threading.current_thread().name.startswith("ort-"):
            self.held = True  # never on the event loop thread (an inline batch): it would block
            deadline = time.monotonic() + self.limit_s
            while len(self.batcher._queue) < self.queued and time.monotonic() < deadline:
                time.sleep(0.005)
        return self.inner(x)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, stub, digits_repo):
    before = scrape_metrics(server.metrics_port)
    xs = [images(None, seed=100 + i) for i in range(64)]
    want = reference_logits(digits_repo, np.stack(xs))
    with _HoldFirstBatch(server.server.repository.get(MODEL).batcher, queued=32) as hold:
        futures = [stub.Classify.future(cpb.ClassifyRequest(model=MODEL, images=tensor(x), top_k=10),
                                        timeout=60) for x in xs]  # 64 in flight at once
        results = [f.result() for f in futures]
    assert hold.held
    for i, resp in enumerate(results):
        got = {t.index: t.logit for t in resp.predictions[0].top}
        assert [got[j] for j in range(10)] == pytest.approx(want[i], abs=1e-4)
    after = scrape_metrics(server.metrics_port)
    name = "dcs_batch_size_examples"
    count = (sample_value(after, f"{name}_count", model=MODEL)
             - sample_value(before, f"{name}_count", model=MODEL))
    total = (sample_value(after, f"{name}_sum", model=MODEL)
             - sample_value(before, f"{name}_sum", model=MODEL))
    singles = (sample_value(after, f"{name}_bucket", model=MODEL, le="1.0")
               - sample_value(before, f"{name}_bucket", model=MODEL, le="1.0"))
    assert total == 64
    assert count < 64 and singles < count, (count, singles)  # some batches held > 1 example


def test_bad_values_checked_in_the_batch_fail_alone_and_neighbours_are_answered(server, stub,
                                                                               digits_repo):
    """Value checks run per batch in the worker: a NaN or out-of-range image that shares a batch
    with good ones gets INVALID_ARGUMENT; the good ones get the model's answer."""
    xs = [images(None, seed=300 + i) for i in range(24)]
    bad = {5: np.nan, 11: 1.5, 17: -0.25}
    for i, v in bad.items():
        xs[i] = xs[i].copy()
        xs[i][0, 3, 4] = v
    want = reference_logits(digits_repo, np.stack(xs))
    futures = [stub.Classify.future(cpb.ClassifyRequest(model=MODEL, images=tensor(x), top_k=10),
                                    timeout=20) for x in xs]
    for i, f in enumerate(futures):
        if i in bad:
            with pytest.raises(grpc.RpcError) as err:
                f.result()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("NaN/Inf" if i == 5 else "expected [0, 1]") in err.value.details()
        else:
            got = {t.index: t.logit for t in f.result().predictions[0].top}
            assert [got[j] for j in range(10)] == pytest.approx(want[i], abs=1e-4)


def test_queue_overflow_is_resource_exhausted_not_a_hang(digits_repo):
    with InProcessServer(digits_repo, max_batch=1, max_queue=2, max_queue_delay_ms=0) as srv:
        # Slow the model down where the batcher reaches it at call time (its worker holds a
        # bound ``runtime.run``, so replacing that attribute would not slow anything).
        package = srv.server.repository.get(MODEL).runtime.package
        real = package.logits

        def slow(x):
            time.sleep(0.05)
            return real(x)

        package.logits = slow
        with grpc.insecure_channel(srv.target) as ch:
            stub = cpb_grpc.ClassifierStub(ch)
            t0 = time.monotonic()
            futures = [stub.Classify.future(cpb.ClassifyRequest(model=MODEL, images=tensor(images(1))),
                                            timeout=20) for _ in range(24)]
            codes, details = [], []
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    details.append(exc.details())
            assert time.monotonic() - t0 < 15
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "--max-queue=2" in details[0]


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_hot_reload_new_version_and_refuse_tampered_one(tmp_path):
    repo = tmp_path / "repo"
    digits_package(repo, MODEL, 1)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "manifest.json").write_text("{not json")
    with InProcessServer(repo, metrics_http=True) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = cpb_grpc.ClassifierStub(ch)
        assert classify(stub, images(1)).model.version == 1  # broken package did not stop it
        assert "broken/1" in srv.server.repository.failures
        assert "manifest.json" in srv.server.repository.failures["broken/1"]
        v1_sha = classify(stub, images(1)).model.sha256

        digits_package(repo, MODEL, 2, seed=1)
        srv.reload()
        resp = classify(stub, images(1))
        assert resp.model.version == 2 and resp.model.sha256 != v1_sha

        v3 = digits_package(repo, MODEL, 3, seed=2)[0]
        _corrupt(v3 / "model.onnx")
        srv.reload()
        assert classify(stub, images(1)).model.version == 2  # the old one keeps serving
        reason = srv.server.repository.failures[f"{MODEL}/3"]
        assert "model.onnx" in reason and "sha256" in reason
        fams = scrape_metrics(srv.metrics_port)
        assert sample_value(fams, "dcs_model_load_failures_total", model=MODEL) == 1
        assert sample_value(fams, "dcs_model_info", model=MODEL, version="2") == 1
        assert sample_value(fams, "dcs_model_info", model=MODEL, version="1") == 0
        srv.reload()  # unchanged bad package is not retried
        assert sample_value(scrape_metrics(srv.metrics_port), "dcs_model_load_failures_total",
                            model=MODEL) == 1
        shutil.rmtree(v3)
        digits_package(repo, MODEL, 3, seed=2)  # a fixed v3 is picked up
        srv.reload()
        assert classify(stub, images(1)).model.version == 3


def test_health_not_serving_then_serving_then_not_serving_on_shutdown(digits_repo):
    srv = InProcessServer(digits_repo, scan=False)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            NOT, OK = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
            for service in ("", "classifier.v1.Classifier", "inference.GRPCInferenceService"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == NOT
            with pytest.raises(grpc.RpcError) as info:
                cpb_grpc.ClassifierStub(ch).Classify(
                    cpb.ClassifyRequest(model=MODEL, images=tensor(images(1))), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            srv.reload()
            for service in ("", "classifier.v1.Classifier", "inference.GRPCInferenceService"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == OK
            seen = []
            stream = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            seen.append(next(stream).status)
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 1})
            stopper.start()
            try:
                for msg in stream:
                    seen.append(msg.status)
            except grpc.RpcError:
                pass
            stopper.join(timeout=30)
            assert seen[0] == OK and NOT in seen[1:], seen
    finally:
        srv.stop()


def test_reflection_lists_services(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"classifier.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_list_and_get_model(stub, digits_repo):
    models = stub.ListModels(cpb.ListModelsRequest(), timeout=5).models
    assert [m.ref.name for m in models] == [MODEL] and models[0].ready
    assert list(models[0].input_shape) == [1, 8, 8] and len(models[0].labels) == 10
    got = stub.GetModel(cpb.GetModelRequest(model=MODEL), timeout=5)
    manifest = json.loads(got.manifest_json)
    assert manifest["files"]["model.onnx"]["sha256"] == got.summary.ref.sha256
    assert list(got.input.shape) == [1, 8, 8] and got.input.max_batch == 32
    assert cpb.UINT8 in got.input.accepted_dtypes


def test_metrics_parse_and_counters_move(server, stub):
    before = scrape_metrics(server.metrics_port)
    classify(stub, images(3))
    with pytest.raises(grpc.RpcError):
        stub.Classify(cpb.ClassifyRequest(model="nope", images=tensor(images(1))), timeout=5)
    after = scrape_metrics(server.metrics_port)

    def delta(name, **labels):
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    assert delta("dcs_requests_total", method="Classify", model=MODEL, code="OK") == 1
    assert delta("dcs_requests_total", method="Classify", code="NOT_FOUND") == 1
    assert delta("dcs_request_duration_seconds_count", method="Classify", model=MODEL) == 1
    assert delta("dcs_queue_duration_seconds_count", model=MODEL) >= 1
    assert delta("dcs_compute_duration_seconds_count", model=MODEL) >= 1
    assert sample_value(after, "dcs_model_info", model=MODEL, version="1",
                        provider="CPUExecutionProvider") == 1
    assert "dcs_queue_depth_requests" in after and "dcs_inflight_requests" in after
    assert not math.isnan(sample_value(after, "dcs_models_loaded"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls(digits_repo, tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    with InProcessServer(digits_repo, tls_cert=cert, tls_key=key) as srv:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(srv.target, creds) as ch:
            assert classify(cpb_grpc.ClassifierStub(ch), images(1)).predictions
        with grpc.insecure_channel(srv.target) as ch:
            with pytest.raises(grpc.RpcError) as info:
                classify(cpb_grpc.ClassifierStub(ch), images(1))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_requests_during_hot_swaps_never_fail_or_hang(tmp_path):
    repo = tmp_path / "repo"
    digits_package(repo, MODEL, 1)
    errors: list = []
    versions: set = set()
    stop = threading.Event()
    with InProcessServer(repo, max_queue_delay_ms=20) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = cpb_grpc.ClassifierStub(ch)

        def hammer():
            while not stop.is_set():
                try:
                    versions.add(classify(stub, images(1)).model.version)
                except grpc.RpcError as exc:
                    errors.append((exc.code(), exc.details()))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for version in (2, 3):
                digits_package(repo, MODEL, version, seed=version)
                srv.reload()
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
    assert not errors, errors[:3]
    assert 3 in versions
