"""Security: audit auth on every audit method, constant-time token compare, TLS with a test CA,
request size limits, audit limits that parameters cannot bypass, model names that never escape
the repository, and no secrets in the logs. All against a real server process on loopback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from dcs.proto import grpc_predict_v2_pb2 as ipb
from dcs.proto import grpc_predict_v2_pb2_grpc as ipb_grpc
from tests.reliability.conftest import (
    AUTH,
    MODEL,
    TOKEN,
    assert_no_token,
    assert_no_tracebacks,
    checked_call,
    start_proc,
)

AUDIT_CALLS = [
    ("StartAudit", cpb.StartAuditRequest(model=MODEL, suite="quick")),
    ("GetAudit", cpb.GetAuditRequest(job_id="x")),
    ("CancelAudit", cpb.CancelAuditRequest(job_id="x")),
    ("ListAudits", cpb.ListAuditsRequest()),
    ("WatchAudit", cpb.WatchAuditRequest(job_id="x")),
]
BAD_AUTH = [
    (None, "UNAUTHENTICATED"),
    ([("authorization", "")], "UNAUTHENTICATED"),
    ([("authorization", "Bearer")], "UNAUTHENTICATED"),
    ([("authorization", "Bearer    ")], "UNAUTHENTICATED"),
    ([("authorization", f"Basic {TOKEN}")], "UNAUTHENTICATED"),
    ([("authorization", f"{TOKEN}")], "UNAUTHENTICATED"),
    ([("authorization", "Bearer wrong-token")], "PERMISSION_DENIED"),
    ([("authorization", f"Bearer {TOKEN[:-1]}")], "PERMISSION_DENIED"),
    ([("authorization", f"Bearer {TOKEN}x")], "PERMISSION_DENIED"),
    ([("authorization", f"Bearer {TOKEN.upper()}")], "PERMISSION_DENIED"),
    ([("x-authorization", f"Bearer {TOKEN}")], "UNAUTHENTICATED"),
]


def images(x: np.ndarray) -> cpb.Tensor:
    return cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape, data=np.ascontiguousarray(x).tobytes())


def upload(x, y) -> cpb.UploadedExamples:
    return cpb.UploadedExamples(images=images(x), labels=[int(v) for v in y])


@pytest.fixture(scope="module")
def sec_server(base_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    srv = start_proc(base_repo, "--max-audit-examples", "16", "--max-audit-gradients", "20000",
                     "--max-audit-queries", "50000", "--max-message-bytes", str(256 * 1024),
                     "--datasets", "digits", "--log-level", "debug", tmp=tmp)
    yield srv
    assert srv.stop() == 0
    logs = srv.logs()
    assert_no_tracebacks(logs)
    assert_no_token(logs)
    assert "wrong-token" not in logs  # nor what a client sent as a token


@pytest.fixture(scope="module")
def chan(sec_server):
    with grpc.insecure_channel(sec_server.target,
                               options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


def _invoke(stub, method, request, metadata):
    fn = getattr(stub, method)
    if method == "WatchAudit":
        return list(fn(request, metadata=metadata, timeout=10))
    return fn(request, metadata=metadata, timeout=10)


@pytest.mark.parametrize("method,request_", AUDIT_CALLS, ids=[m for m, _ in AUDIT_CALLS])
def test_every_audit_method_refuses_missing_or_wrong_token(chan, stats, method, request_):
    stub = cpb_grpc.AuditStub(chan)
    for metadata, want in BAD_AUTH:
        with pytest.raises(grpc.RpcError) as info:
            _invoke(stub, method, request_, metadata)
        stats.code(info.value.code().name)
        assert info.value.code().name == want, (metadata, info.value.details())
        assert TOKEN not in info.value.details()
    # With the token the same call gets past auth (NOT_FOUND / a real answer, not an auth code).
    try:
        _invoke(stub, method, request_, AUTH)
    except grpc.RpcError as exc:
        assert exc.code().name not in ("UNAUTHENTICATED", "PERMISSION_DENIED"), exc.details()


def test_token_compare_is_constant_time(monkeypatch):
    """The server compares tokens with hmac.compare_digest (== leaks a timing side channel)."""
    import hmac
    import inspect

    import dcs.server.auth as audit_mod
    from dcs.server.errors import PermissionDenied

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(audit_mod.hmac, "compare_digest", spy)
    auth = audit_mod.TokenAuth("s3cret")
    auth.check([("authorization", "Bearer s3cret")])
    with pytest.raises(PermissionDenied):
        auth.check([("authorization", "Bearer s3creT")])
    assert len(calls) == 2 and all(a is bytes and b is bytes for a, b in calls)
    # ... and nothing in TokenAuth compares the secret with == / != / startswith.
    src = inspect.getsource(audit_mod.TokenAuth)
    assert "compare_digest" in src
    for bad in ("== self._token", "self._token ==", "!= self._token", "self._token !=",
                "startswith(self._token"):
        assert bad not in src
    assert True  # either is constant time


def test_request_size_limit_is_enforced_and_server_keeps_serving(chan, stats, digits_test):
    stub = cpb_grpc.ClassifierStub(chan)
    big = np.zeros((1, 1, 8, 8 * 1500), np.float32)  # ~384 KiB > --max-message-bytes 256 KiB
    code, details = checked_call(stub.Classify, cpb.ClassifyRequest(model=MODEL, images=images(big)),
                                 stats, timeout=10)
    assert code == "RESOURCE_EXHAUSTED", details
    istub = ipb_grpc.GRPCInferenceServiceStub(chan)
    req = ipb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"\0" * (300 * 1024)])
    req.inputs.add(name="input", datatype="FP32", shape=[1200, 1, 8, 8])
    code, details = checked_call(istub.ModelInfer, req, stats, timeout=10)
    assert code == "RESOURCE_EXHAUSTED", details
    code, details = checked_call(cpb_grpc.AuditStub(chan).StartAudit, cpb.StartAuditRequest(
        model=MODEL, examples=upload(np.zeros((1200, 1, 8, 8), np.float32), [0] * 1200)),
        stats, metadata=AUTH, timeout=10)
    assert code == "RESOURCE_EXHAUSTED", details
    # A batch larger than --max-batch but under the byte limit: refused by the data plane.
    x = np.zeros((33, 1, 8, 8), np.float32)
    code, details = checked_call(stub.Classify, cpb.ClassifyRequest(model=MODEL, images=images(x)),
                                 stats, timeout=10)
    assert code == "INVALID_ARGUMENT" and "max_batch" in details
    x, _ = digits_test
    code, resp = checked_call(stub.Classify, cpb.ClassifyRequest(model=MODEL, images=images(x[:4])),
                              stats, timeout=10)
    assert code == "OK" and len(resp.predictions) == 4


def _start(chan, stats, **kw):
    return checked_call(cpb_grpc.AuditStub(chan).StartAudit, cpb.StartAuditRequest(model=MODEL, **kw),
                        stats, metadata=AUTH, timeout=10)


def test_audit_limits_cannot_be_bypassed_through_parameters(chan, stats, digits_test):
    x, y = digits_test
    ex = upload(x[:8], y[:8])
    attack = lambda name, **p: [cpb.AttackSpec(name=name, params_json=json.dumps(p))]
    cases = [
        # (kwargs, expected code, word in the message)
        ({"examples": ex, "limits": cpb.AuditLimits(max_examples=10**12)}, "RESOURCE_EXHAUSTED", "max_examples"),
        ({"examples": ex, "limits": cpb.AuditLimits(max_gradients=2**63 - 1)}, "RESOURCE_EXHAUSTED", "max_gradients"),
        ({"examples": ex, "limits": cpb.AuditLimits(max_examples=-1)}, "INVALID_ARGUMENT", "max_examples"),
        ({"examples": ex, "limits": cpb.AuditLimits(max_gradients=-(2**63))}, "INVALID_ARGUMENT", "max_gradients"),
        ({"dataset": cpb.DatasetRef(name="digits", limit=10**9)}, "RESOURCE_EXHAUSTED", "limit"),
        ({"dataset": cpb.DatasetRef(name="digits", limit=-5)}, "INVALID_ARGUMENT", "limit"),
        ({"examples": upload(np.zeros((17, 1, 8, 8), np.float32), [0] * 17)}, "RESOURCE_EXHAUSTED", "limit"),
        ({"attacks": attack("pgd", steps=10**9), "eps": [0.1], "examples": ex}, "RESOURCE_EXHAUSTED", "gradient"),
        ({"attacks": attack("pgd", steps=100, restarts=10**6), "eps": [0.1], "examples": ex}, "RESOURCE_EXHAUSTED", "gradient"),
        ({"attacks": attack("pgd", steps=10**400), "eps": [0.1], "examples": ex}, "RESOURCE_EXHAUSTED", "gradient"),
        ({"attacks": attack("pgd", steps=-5), "eps": [0.1], "examples": ex}, "INVALID_ARGUMENT", "steps"),
        ({"attacks": attack("pgd", restarts=-10**9), "eps": [0.1], "examples": ex}, "INVALID_ARGUMENT", "restarts"),
        ({"attacks": attack("pgd", steps="1000000000"), "eps": [0.1], "examples": ex}, "INVALID_ARGUMENT", ""),
        ({"attacks": attack("pgd", steps=None), "eps": [0.1], "examples": ex}, "INVALID_ARGUMENT", ""),
        ({"attacks": attack("pgd", steps=[10**9]), "eps": [0.1], "examples": ex}, "INVALID_ARGUMENT", ""),
        ({"attacks": attack("apgd-ce", steps=10**9), "eps": [0.1], "examples": ex}, "RESOURCE_EXHAUSTED", "gradient"),
        # Score-only attacks spend no gradients: the query limit bounds them.
        ({"attacks": attack("square", n_queries=10**9), "eps": [0.001], "examples": ex}, "RESOURCE_EXHAUSTED", "quer"),
        ({"attacks": attack("noise", batch_size=-1), "eps": [0.1], "examples": ex}, "INVALID_ARGUMENT", "batch_size"),
        # Many eps values multiply the cost; they are counted too.
        ({"attacks": attack("pgd", steps=200), "eps": [0.01] * 20 + [0.02], "examples": ex}, "RESOURCE_EXHAUSTED", "gradient"),
        ({"attacks": attack("pgd"), "eps": [1.5], "examples": ex}, "INVALID_ARGUMENT", "eps"),
        ({"attacks": attack("pgd"), "eps": [float("nan")], "examples": ex}, "INVALID_ARGUMENT", "eps"),
        ({"attacks": attack("transfer", source="/etc"), "eps": [0.1], "examples": ex}, "INVALID_ARGUMENT", "transfer"),
        ({"suite": "paper", "examples": ex}, "RESOURCE_EXHAUSTED", "gradient"),
        ({"suite": "../../quick", "examples": ex}, "INVALID_ARGUMENT", "suite"),
        ({"dataset": cpb.DatasetRef(name="../../../etc/passwd")}, "INVALID_ARGUMENT", "dataset"),
        ({"dataset": cpb.DatasetRef(name="digits", split="../../x")}, "INVALID_ARGUMENT", "split"),
    ]
    for kw, want, word in cases:
        code, details = _start(chan, stats, **kw)
        shown = {k: (v if k != "examples" else "...") for k, v in kw.items()}
        assert code == want, (shown, code, details)
        assert word in details, (shown, details)


@pytest.mark.parametrize("name", ["../digits-mlp", "digits-mlp/../digits-mlp", "./digits-mlp",
                                  "/digits-mlp", "..", "digits-mlp/1", "..\\digits-mlp",
                                  "digits-mlp\x00", "%2e%2e/digits-mlp", "../../../../etc/passwd"])
def test_odd_model_names_never_reach_a_package(chan, stats, name):
    c, i = cpb_grpc.ClassifierStub(chan), ipb_grpc.GRPCInferenceServiceStub(chan)
    x = np.zeros((1, 1, 8, 8), np.float32)
    for fn, req, kw in [
        (c.Classify, cpb.ClassifyRequest(model=name, images=images(x)), {}),
        (c.GetModel, cpb.GetModelRequest(model=name), {}),
        (i.ModelMetadata, ipb.ModelMetadataRequest(name=name), {}),
        (cpb_grpc.AuditStub(chan).StartAudit, cpb.StartAuditRequest(model=name, suite="quick"),
         {"metadata": AUTH}),
    ]:
        code, details = checked_call(fn, req, stats, timeout=10, **kw)
        assert code in ("NOT_FOUND", "INVALID_ARGUMENT"), (name, code, details)
    code, resp = checked_call(i.ModelReady, ipb.ModelReadyRequest(name=name), stats, timeout=10)
    assert code == "OK" and resp.ready is False


def test_repository_never_loads_a_package_from_outside(base_repo, tmp_path, stats):
    """Symlinks that resolve outside the repository, odd folder names and odd version folders
    are skipped; the good model still serves and the server does not crash on any of them."""
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    shutil.copytree(base_repo, repo)
    shutil.copytree(base_repo / MODEL, outside / "evil")
    _reseal(outside / "evil" / "1", name="evil")
    (repo / "evil").symlink_to(outside / "evil", target_is_directory=True)     # escapes
    (repo / "inner").symlink_to(repo / MODEL, target_is_directory=True)       # stays inside
    (repo / MODEL / "7").symlink_to(outside / "evil" / "1", target_is_directory=True)
    (repo / MODEL / "²").mkdir()        # str.isdigit() but not int()-able
    (repo / MODEL / "01").mkdir()       # not canonical: "<repo>/digits-mlp/1" is another folder
    (repo / "..hidden").mkdir()
    (repo / "with space").mkdir()
    srv = start_proc(repo, tmp=tmp_path)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            models = cpb_grpc.ClassifierStub(ch).ListModels(cpb.ListModelsRequest(), timeout=10).models
            served = {(m.ref.name, m.ref.version) for m in models}
            stats.code("OK")
            assert (MODEL, 1) in served
            assert all(name != "evil" for name, _ in served), served
            assert all(v != 7 for _, v in served), served
    finally:
        assert srv.stop() == 0
    logs = srv.logs()
    assert "outside" in logs
    assert_no_tracebacks(logs)


def _reseal(pkg: Path, name: str | None = None) -> None:
    from dcs.robustness.manifest import (
        GRAD_FILE,
        MANIFEST_FILE,
        MODEL_FILE,
        atomic_write_json,
        file_entry,
        seal,
    )

    m = json.loads((pkg / MANIFEST_FILE).read_text())
    if name:
        m["name"] = name
    m.pop("manifest_digest", None)
    m["files"] = {MODEL_FILE: file_entry(pkg / MODEL_FILE), GRAD_FILE: file_entry(pkg / GRAD_FILE)}
    atomic_write_json(pkg / MANIFEST_FILE, seal(m))


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca_and_cert(d: Path, cn: str = "localhost") -> tuple[Path, Path, Path]:
    """A test CA, and a server certificate for 127.0.0.1/localhost that it signed."""
    ca_key, ca, key, csr, cert, ext = (d / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr",
                                                        "srv.pem", "ext.cnf"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
             str(ca), "-days", "1", "-subj", "/CN=dcs-test-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={cn}")
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return ca, cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_with_a_test_ca_and_plaintext_or_untrusted_clients_refused(base_repo, tmp_path, stats,
                                                                     digits_test):
    ca, cert, key = make_ca_and_cert(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = make_ca_and_cert(other)
    srv = start_proc(base_repo, "--tls-cert", str(cert), "--tls-key", str(key), tmp=tmp_path)
    x, _y = digits_test
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        with grpc.secure_channel(srv.target, creds) as ch:
            code, resp = checked_call(cpb_grpc.ClassifierStub(ch).Classify,
                                      cpb.ClassifyRequest(model=MODEL, images=images(x[:2])), stats, timeout=10)
            assert code == "OK" and len(resp.predictions) == 2
            code, _ = checked_call(cpb_grpc.AuditStub(ch).ListAudits, cpb.ListAuditsRequest(), stats,
                                   metadata=AUTH, timeout=10)
            assert code == "OK"
        with grpc.insecure_channel(srv.target) as ch:
            code, _ = checked_call(cpb_grpc.ClassifierStub(ch).Classify,
                                   cpb.ClassifyRequest(model=MODEL, images=images(x[:1])), stats, timeout=5)
            assert code == "UNAVAILABLE"
        bad = grpc.ssl_channel_credentials(root_certificates=other_ca.read_bytes())
        with grpc.secure_channel(srv.target, bad) as ch:
            code, _ = checked_call(cpb_grpc.ClassifierStub(ch).Classify,
                                   cpb.ClassifyRequest(model=MODEL, images=images(x[:1])), stats, timeout=5)
            assert code == "UNAVAILABLE"
    finally:
        assert srv.stop() == 0
    assert key.read_text().strip().splitlines()[1] not in srv.logs()
    assert_no_token(srv.logs())


def test_token_file_contents_and_env_token_never_logged(base_repo, tmp_path, stats):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    srv = start_proc(base_repo, "--audit-token-file", str(token_file), "--log-level", "debug",
                     tmp=tmp_path, token=False)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            code, _ = checked_call(cpb_grpc.AuditStub(ch).ListAudits, cpb.ListAuditsRequest(), stats,
                                   metadata=AUTH, timeout=10)
            assert code == "OK"
    finally:
        srv.stop()
    assert str(token_file) in srv.logs()  # the path is logged, the secret is not
    assert_no_token(srv.logs())
