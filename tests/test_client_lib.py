"""The client library against real server processes on 127.0.0.1: classify, models, error
mapping, retries on UNAVAILABLE, round-robin over two servers, and audits end to end."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from dcs.clients.client import Client, TLSConfig
from dcs.clients.errors import (
    ClientError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from dcs.clients.results import AuditState, Prediction
from tests.conftest import write_token_file
from tests.server_helpers import HOST, free_port, sample_value, scrape_metrics, start_server_process

MODEL = "digits-mlp"
TOKEN = "client-test-token"
FAST_ATTACKS = ["fgsm", ("pgd", {"steps": 5})]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return write_token_file(tmp_path_factory, TOKEN)


@pytest.fixture(scope="module")
def server(digits_repo, token_file):
    sp = start_server_process(digits_repo, "--audit-token-file", str(token_file))
    yield sp
    sp.stop()


@pytest.fixture()
def client(server):
    with Client(server.target, token=TOKEN, timeout_s=10) as c:
        yield c


def test_wait_ready_returns_the_models_or_says_what_is_missing(client):
    assert [m.name for m in client.wait_ready(MODEL, timeout_s=5)] == [MODEL]
    assert [m.name for m in client.wait_ready(timeout_s=5)] == [MODEL]
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="model 'nope' is not loaded and ready .serving: "
                                          + MODEL):
        client.wait_ready("nope", timeout_s=0.3)
    assert time.monotonic() - t0 < 3
    with Client(f"{HOST}:{free_port()}", retries=0, timeout_s=1) as nobody, \
            pytest.raises(Unavailable, match="not ready after 0.3 s"):
        nobody.wait_ready(timeout_s=0.3)
    with pytest.raises(InvalidArgument):
        client.wait_ready(timeout_s=-1)


def test_models_and_model(client):
    models = client.models()
    assert [m.name for m in models] == [MODEL]
    m = models[0]
    assert m.input_shape == (1, 8, 8) and m.labels == tuple(str(i) for i in range(10))
    assert m.ready and len(m.sha256) == 64 and m.input is None
    info = client.model(MODEL)
    assert info.ref == m.ref
    assert info.input.shape == (1, 8, 8) and info.input.layout == "NCHW"
    assert set(info.input.accepted_dtypes) == {"FLOAT32", "UINT8"} and info.input.max_batch >= 1
    assert info.manifest["name"] == MODEL


def test_classify_float_and_uint8(client, digits_test):
    x, y = digits_test
    n = 70  # more than the server's max_batch (32): split into several calls
    preds = client.classify(x[:n], MODEL, top_k=3)
    assert len(preds) == n and all(isinstance(p, Prediction) for p in preds)
    assert all(len(p.top) == 3 for p in preds)
    assert all(p.top[0].probability >= p.top[1].probability >= p.top[2].probability for p in preds)
    assert preds[0].model.name == MODEL and preds[0].model.sha256 == client.model(MODEL).sha256
    accuracy = np.mean([p.index == t for p, t in zip(preds, y[:n])])
    assert accuracy > 0.8
    assert all(p.label == str(p.index) for p in preds)
    x8 = np.round(x[:5] * 255).astype(np.uint8)
    preds8 = client.classify(x8, MODEL)
    assert [p.index for p in preds8] == [p.index for p in preds[:5]]
    one = client.classify(x[0], MODEL, top_k=1)  # one [C, H, W] image
    assert len(one) == 1 and one[0].index == preds[0].index
    with pytest.raises(dataclass_frozen_error()):
        preds[0].top = ()  # results are frozen


def dataclass_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_error_mapping(client, digits_test):
    x, _ = digits_test
    with pytest.raises(NotFound) as info:
        client.classify(x[:1], "no-such-model")
    err = info.value
    assert err.code is grpc.StatusCode.NOT_FOUND and "no-such-model" in err.details
    assert MODEL in err.details  # the message names the loaded models
    with pytest.raises(NotFound):
        client.model("no-such-model")
    with pytest.raises(InvalidArgument) as info:
        client.classify(np.zeros((1, 3, 8, 8), np.float32), MODEL, batch_size=8)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and "shape" in info.value.details
    with pytest.raises(InvalidArgument) as info:
        client.classify(np.full((1, 1, 8, 8), 2.0, np.float32), MODEL, batch_size=8)
    assert "[0, 1]" in info.value.details
    with pytest.raises(InvalidArgument, match="expected"):  # caught locally, no call made
        client.classify(np.zeros((8, 8), np.int64), MODEL)
    with pytest.raises(NotFound) as info:
        client.audit("no-such-job")
    assert "no-such-job" in info.value.details
    assert isinstance(info.value, ClientError)


def test_audit_needs_the_token(server):
    with Client(server.target) as anonymous:
        with pytest.raises(Unauthenticated) as info:
            anonymous.audits()
        assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    with Client(server.target, token="wrong") as wrong:
        with pytest.raises((PermissionDenied, Unauthenticated)) as info:
            wrong.start_audit(MODEL, attacks=["fgsm"], eps=[0.1],
                              examples=np.zeros((1, 1, 8, 8), np.float32), labels=[0])
        assert info.value.code in (grpc.StatusCode.PERMISSION_DENIED,
                                   grpc.StatusCode.UNAUTHENTICATED)
    with Client(server.target) as anonymous:  # classify stays open
        assert len(anonymous.classify(np.zeros((1, 1, 8, 8), np.float32), MODEL)) == 1


def test_audit_end_to_end(client, digits_test):
    x, y = digits_test
    job = client.start_audit(MODEL, attacks=FAST_ATTACKS, eps=[0.1], examples=x[:20],
                             labels=y[:20], seed=3)
    events = list(client.watch(job, timeout_s=60))
    assert events and events[-1].state is AuditState.SUCCEEDED
    assert all(e.job_id == job for e in events)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(e.attack == "pgd" and e.eps == 0.1 for e in events)

    status = client.audit(job)
    assert status.state is AuditState.SUCCEEDED and status.num_examples == 20
    assert status.model.sha256 == client.model(MODEL).sha256

    report = client.report(job)
    assert report["package"]["sha256"] == status.model.sha256
    assert report["n_examples"] == 20 and report["seed"] == 3
    assert {r["attack"] for r in report["results"]} == {"fgsm", "pgd"}
    assert status.robust_accuracy == pytest.approx(report["headline"]["robust_accuracy"], abs=1e-6)
    for r in report["results"]:
        assert r["robust_accuracy"] <= report["clean_accuracy"] + 1e-9
    html = client.report_html(job)
    assert html is None or "<html" in html.lower()
    assert job in [j.job_id for j in client.audits()]
    assert job in [j.job_id for j in client.audits(state="succeeded")]

    # The numbers equal an offline audit of the same package, suite and seed.
    from dcs.robustness.audit import audit
    from dcs.robustness.package import SessionOptions, load_package
    from dcs.robustness.report.schema import strip_nondeterministic
    from dcs.robustness.suites import Suite

    request = status.request
    suite = Suite.from_dict(request["suite"], default_name=request["suite"]["name"])
    pkg = load_package(request["path"], SessionOptions(device="cpu", intra_op_threads=1))
    offline = audit(pkg, x[:20], y[:20], suite, seed=3, package_info=pkg.describe()).to_dict()
    for key in ("clean_accuracy", "results", "worst_case", "headline"):
        assert strip_nondeterministic(report[key]) == strip_nondeterministic(
            json.loads(json.dumps(offline[key]))), key


def test_cancel_and_report_of_unfinished_job(client, digits_test):
    x, y = digits_test
    job = client.start_audit(MODEL, suite="quick", examples=x[:400], labels=y[:400])
    status = client.cancel(job)
    assert status.job_id == job
    last = list(client.watch(job, timeout_s=60))[-1]
    assert last.state in (AuditState.CANCELLED, AuditState.SUCCEEDED)
    if last.state is AuditState.CANCELLED:
        with pytest.raises(FailedPrecondition, match="CANCELLED"):
            client.report(job)
    assert client.audit(job).state is last.state


def test_start_audit_validates_locally(client):
    with pytest.raises(InvalidArgument, match="exactly one data source"):
        client.start_audit(MODEL)
    with pytest.raises(InvalidArgument, match="labels"):
        client.start_audit(MODEL, examples=np.zeros((2, 1, 8, 8), np.float32), labels=[1])


def test_retries_until_the_server_comes_up(digits_repo, caplog):
    # Bounded (at most ~2 min of 0.5 s backoffs): a busy machine can take 30 s or more to start
    # a server process (imports of onnxruntime, grpc, numpy), more than 60 retries cover.
    retries = 240
    port = free_port()
    target = f"{HOST}:{port}"
    with Client(target, retries=0, timeout_s=2) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as info:
            c.models()
        assert info.value.code is grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 2
    started: list = []

    def start_later():
        time.sleep(0.5)
        # A later --port wins over the helper's own free port.
        started.append(start_server_process(digits_repo, "--port", str(port), metrics=False,
                                            wait_ready=False))

    thread = threading.Thread(target=start_later)
    try:
        with caplog.at_level(logging.INFO, logger="dcs.clients.client"), \
                Client(target, retries=retries, backoff_s=0.1, max_backoff_s=0.5, timeout_s=5) as c:
            thread.start()
            c.models()  # first attempt fails: nothing listens yet; retried until it answers
            models = c.wait_ready(MODEL, timeout_s=60)  # it listens before its models load
        assert [m.name for m in models] == [MODEL] and models[0].ready
        assert "UNAVAILABLE" in caplog.text and f"retry 1/{retries}" in caplog.text
    finally:
        thread.join(timeout=30)
        for sp in started:
            sp.stop()


def test_start_audit_is_not_retried(caplog):
    with caplog.at_level(logging.INFO, logger="dcs.clients.client"), \
            Client(f"{HOST}:{free_port()}", token=TOKEN, retries=5, timeout_s=2) as c, \
            pytest.raises(Unavailable):
        c.start_audit(MODEL, attacks=["fgsm"], examples=np.zeros((1, 1, 8, 8), np.float32),
                      labels=[0])
    assert "retry" not in caplog.text


def _classify_count(sp) -> float:
    return sample_value(scrape_metrics(sp.metrics_port), "dcs_requests_total", method="Classify")


def test_round_robin_spreads_requests_over_two_servers(digits_repo):
    one = start_server_process(digits_repo)
    try:
        two = start_server_process(digits_repo)
        try:
            target = f"ipv4:{one.target},{two.target}"
            x = np.zeros((1, 1, 8, 8), np.float32)
            calls = 20
            with Client(target, round_robin=True) as c:
                for _ in range(calls):
                    c.classify(x, MODEL, batch_size=8)
            counts = [_classify_count(one), _classify_count(two)]
            assert sum(counts) == calls
            assert min(counts) >= calls // 4, counts  # both replicas served a fair share
            # The default policy (pick_first) pins every request to one connection.
            with Client(target) as c:
                for _ in range(calls):
                    c.classify(x, MODEL, batch_size=8)
            after = [_classify_count(one), _classify_count(two)]
            delta = sorted(a - b for a, b in zip(after, counts))
            assert delta == [0, calls], delta
        finally:
            two.stop()
    finally:
        one.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_ca(digits_repo, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=30)
    sp = start_server_process(digits_repo, "--tls-cert", str(cert), "--tls-key", str(key),
                              metrics=False, wait_ready=False)  # its health probe is plaintext
    try:
        with Client(sp.target, tls=TLSConfig(ca_file=cert), retries=60, backoff_s=0.1,
                    max_backoff_s=0.5) as c:
            assert [m.name for m in c.wait_ready(MODEL)] == [MODEL]  # polled until loaded
        # plaintext to a TLS port
        with Client(sp.target, retries=0, timeout_s=3) as plain, pytest.raises(Unavailable):
            plain.models()
        res = subprocess.run([str(Path(sys.executable).parent / "dcsctl"), "--target", sp.target,
                              "--tls", "--ca", str(cert), "models", "--json"],
                             check=False, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)[0]["name"] == MODEL
        res = subprocess.run([str(Path(sys.executable).parent / "dcsctl"), "--target", sp.target,
                              "--tls", "--ca", str(tmp_path / "missing.pem"), "models"],
                             check=False, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--ca" in res.stderr
    finally:
        sp.stop()
