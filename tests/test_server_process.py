"""The server as a real child process (``python -m dcs.server``, torch blocked in the child):
tritonclient.grpc against the KServe v2 API, SIGTERM drain, config precedence, torch-free."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from dcs.robustness.package import SessionOptions, load_package
from tests.server_helpers import (
    ROOT,
    sample_value,
    scrape_metrics,
    start_server_process,
    task_niceness,
)

MODEL = "digits-mlp"

# tritonclient's own stubs define the same `inference.*` protobuf symbols as ours, so the two
# cannot share one process: the Triton client runs in a child and prints what it got.
TRITON_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
url = sys.argv[1]
x = np.load(sys.argv[2])
c = tc.InferenceServerClient(url=url)
out = {"live": c.is_server_live(), "ready": c.is_server_ready(),
       "model_ready": c.is_model_ready("digits-mlp")}
meta = c.get_model_metadata("digits-mlp", as_json=True)
out["meta_inputs"] = meta["inputs"]
inp = tc.InferInput("x", list(x.shape), "FP32"); inp.set_data_from_numpy(x)
r = c.infer("digits-mlp", [inp], outputs=[tc.InferRequestedOutput("logits")])
out["logits"] = r.as_numpy("logits").tolist()
out["version"] = r.get_response().model_version
u8 = (x * 255).round().astype(np.uint8)
inp8 = tc.InferInput("x", list(u8.shape), "UINT8"); inp8.set_data_from_numpy(u8)
r8 = c.infer("digits-mlp", [inp8])
out["logits_u8"] = r8.as_numpy("logits").tolist()
rc = c.infer("digits-mlp", [inp], outputs=[tc.InferRequestedOutput("logits", class_count=3)])
out["classes"] = [[v.decode() for v in row] for row in rc.as_numpy("logits")]
try:
    bad = tc.InferInput("x", [4, 8, 8], "FP32"); bad.set_data_from_numpy(x[:, 0])
    c.infer("digits-mlp", [bad])
except tc.InferenceServerException as e:
    out["bad_status"] = str(e.status()); out["bad_message"] = str(e)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def proc_server(digits_repo, tmp_path_factory):
    sp = start_server_process(digits_repo, "--max-queue-delay-ms", "1",
                              log_dir=tmp_path_factory.mktemp("srv"))
    yield sp
    sp.stop()


def test_tritonclient_model_infer_matches_onnxruntime(proc_server, digits_repo, tmp_path):
    x = np.random.default_rng(3).random((4, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    res = subprocess.run([sys.executable, "-c", TRITON_CLIENT, proc_server.target,
                          str(tmp_path / "x.npy")], check=False, capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT ", 1)[1])
    pkg = load_package(digits_repo / MODEL / "1", SessionOptions(device="cpu", load_grad=False))
    want = pkg.logits(x)
    assert out["live"] and out["ready"] and out["model_ready"] and out["version"] == "1"
    assert out["meta_inputs"][0]["shape"] == ["-1", "1", "8", "8"]
    np.testing.assert_allclose(np.array(out["logits"]), want, atol=1e-5)
    want8 = pkg.logits((x * 255).round().astype(np.uint8).astype(np.float32) / 255)
    np.testing.assert_allclose(np.array(out["logits_u8"]), want8, atol=1e-5)
    for row, logits in zip(out["classes"], want):
        value, index, label = row[0].split(":")
        assert int(index) == int(np.argmax(logits)) and label == str(np.argmax(logits))
        assert float(value) == pytest.approx(float(logits.max()), abs=1e-4)
        assert len(row) == 3
    assert "INVALID_ARGUMENT" in out["bad_status"] + out["bad_message"], out
    assert "shape" in out["bad_message"]


def test_metrics_endpoint_of_the_process(proc_server):
    with grpc.insecure_channel(proc_server.target) as ch:
        cpb_grpc.ClassifierStub(ch).ListModels(cpb.ListModelsRequest(), timeout=5)
    fams = scrape_metrics(proc_server.metrics_port)
    assert sample_value(fams, "dcs_requests_total", method="ListModels", code="OK") >= 1
    assert sample_value(fams, "dcs_model_info", model=MODEL) == 1


def test_sigterm_with_requests_in_flight_loses_none(digits_repo, tmp_path):
    # A long batching window keeps requests queued (in flight) while SIGTERM arrives.
    sp = start_server_process(digits_repo, "--max-queue-delay-ms", "700", "--max-batch", "64",
                              log_dir=tmp_path)
    with sp, grpc.insecure_channel(sp.target) as ch:
        stub = cpb_grpc.ClassifierStub(ch)
        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        req = cpb.ClassifyRequest(model=MODEL, images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape,
                                                                 data=x.tobytes()))
        futures = [stub.Classify.future(req, timeout=30) for _ in range(24)]
        time.sleep(0.3)  # all accepted and waiting in the batch queue
        assert not any(f.done() for f in futures)
        sp.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]  # raises if any was lost
        assert all(r.predictions for r in results)
        rc = sp.stop(timeout=20)  # also asserts the child never imported torch
    assert rc == 0, sp.logs()[-2000:]
    logs = sp.logs()
    assert "shutting down" in logs and "DCS_TORCH_MODULES=\n" in logs


def test_open_health_watch_does_not_hold_the_stop_for_the_grace_period(digits_repo, tmp_path):
    """Kubernetes and load balancers keep health Watch streams open; once unary RPCs have
    drained, SIGTERM ends them instead of waiting out --grace-period-s."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sp = start_server_process(digits_repo, "--grace-period-s", "20", log_dir=tmp_path)
    with sp, grpc.insecure_channel(sp.target) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""),
                                                       timeout=60)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        start = time.monotonic()
        sp.send_signal(signal.SIGTERM)
        rc = sp.proc.wait(timeout=30)
        took = time.monotonic() - start
    assert rc == 0, sp.logs()[-2000:]
    assert took < 8, f"stop took {took:.1f} s with a health watcher open (grace 20 s)"


def test_server_never_imports_torch_even_when_started_normally(proc_server):
    # start_server_process runs the child with torch blocked (tests.torchless): an import would have
    # crashed start-up; the atexit report (checked in stop()) catches anything subtler.
    assert proc_server.proc.poll() is None


def test_config_precedence_and_errors(tmp_path, digits_repo):
    from dcs.server.config import ConfigError, load_config

    cfg_file = tmp_path / "server.yaml"
    cfg_file.write_text(f"repo: {digits_repo}\nmax-batch: 8\nport: 9100\nmetrics_port: 9101\n")
    cfg = load_config(["--config", str(cfg_file), "--port", "9200"],
                      {"DCS_PORT": "9300", "DCS_MAX_BATCH": "16", "DCS_AUDIT_TOKEN": "s3cret"})
    assert (cfg.port, cfg.max_batch, cfg.metrics_port) == (9200, 16, 9101)
    assert cfg.sources["port"] == "flag" and cfg.sources["max_batch"] == "env"
    assert cfg.sources["metrics_port"] == "file"
    assert cfg.resolved_audit_token() == "s3cret" and "s3cret" not in repr(cfg)
    assert "s3cret" not in json.dumps(cfg.describe())
    toml = tmp_path / "server.toml"
    toml.write_text(f'repo = "{digits_repo}"\ndevice = "cpu"\n')
    assert load_config(["--config", str(toml)], {}).device == "cpu"
    with pytest.raises(ConfigError, match="--max-batch=0"):
        load_config(["--repo", str(digits_repo), "--max-batch", "0"], {})
    with pytest.raises(ConfigError, match="DCS_PORT"):
        load_config(["--repo", str(digits_repo)], {"DCS_PORT": "eighty"})
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key"):
        load_config(["--repo", str(digits_repo), "--tls-key", str(cfg_file)], {})
    with pytest.raises(ConfigError, match="unknown option 'max_bach'"):
        (tmp_path / "bad.yaml").write_text("max_bach: 3\n")
        load_config(["--config", str(tmp_path / "bad.yaml")], {})
    with pytest.raises(ConfigError, match="--repo is required"):
        load_config([], {})
    with pytest.raises(ConfigError, match="--worker-niceness=20 .from flag.: expected 0..19"):
        load_config(["--repo", str(digits_repo), "--worker-niceness", "20"], {})
    with pytest.raises(ConfigError, match="--audit-niceness=-1 .from env.: expected 0..19"):
        load_config(["--repo", str(digits_repo)], {"DCS_AUDIT_NICENESS": "-1"})
    with pytest.raises(ConfigError, match="--event-loop='tokio' .from env.: expected one of auto"):
        load_config(["--repo", str(digits_repo)], {"DCS_EVENT_LOOP": "tokio"})


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_each_event_loop_serves_and_stops_cleanly(digits_repo, loop):
    """``--event-loop``: both loops classify, drain on SIGTERM and exit 0; the log names the
    loop in use. (The helper's own temporary folder goes once the child ends; the log stays.)"""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    sp = start_server_process(digits_repo, "--event-loop", loop)
    own = sp.owned_dir
    assert own is not None and sp.log_path.parent == own
    with sp, grpc.insecure_channel(sp.target) as ch:
        x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
        resp = cpb_grpc.ClassifierStub(ch).Classify(cpb.ClassifyRequest(
            model=MODEL, images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape, data=x.tobytes())),
            timeout=10)
        assert len(resp.predictions) == 3
        assert sp.stop(timeout=20) == 0
    assert f"event loop: {loop}" in sp.logs()
    assert not own.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_model_worker_runs_below_the_event_loop(proc_server):
    """``--worker-niceness`` (default 10): after a classify the model's worker thread exists and
    runs at niceness 10; the event loop and gRPC's threads stay at the process's 0."""
    with grpc.insecure_channel(proc_server.target) as ch:
        x = np.zeros((2, 1, 8, 8), np.float32)
        cpb_grpc.ClassifierStub(ch).Classify(cpb.ClassifyRequest(
            model=MODEL, images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape, data=x.tobytes())),
            timeout=10)
    pid = proc_server.proc.pid
    nice = task_niceness(pid)
    assert list(nice.values()).count(10) == 1 and nice[pid] == 0, nice


def test_default_event_loop_is_asyncio(proc_server):
    assert "event loop: asyncio" in proc_server.logs()


def test_cli_reports_bad_config_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dcs.server", "serve", "--repo", str(tmp_path / "missing")],
                         check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2
    assert "--repo=" in res.stderr and "existing directory" in res.stderr


def test_helper_honours_port_flags_and_tls_probe(digits_repo, tmp_path):
    import shutil

    from tests.server_helpers import free_port

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    sp = start_server_process(digits_repo, "--port", str(port), "--tls-cert", str(cert),
                              "--tls-key", str(key), metrics=False, log_dir=tmp_path)
    with sp:
        assert sp.port == port
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(sp.target, creds) as ch:
            assert cpb_grpc.ClassifierStub(ch).ListModels(cpb.ListModelsRequest(), timeout=5).models
        assert sp.stop() == 0


def test_sighup_reloads_a_new_version(tmp_path):
    from dcs.robustness.testing import digits_package

    repo = tmp_path / "repo"
    digits_package(repo, MODEL, 1)
    sp = start_server_process(repo, metrics=False, log_dir=tmp_path)
    with sp, grpc.insecure_channel(sp.target) as ch:
        stub = cpb_grpc.ClassifierStub(ch)
        x = np.zeros((1, 1, 8, 8), np.float32)
        req = cpb.ClassifyRequest(model=MODEL, images=cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape,
                                                                 data=x.tobytes()))
        assert stub.Classify(req, timeout=5).model.version == 1
        digits_package(repo, MODEL, 2, seed=1)
        sp.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while stub.Classify(req, timeout=5).model.version != 2:
            assert time.monotonic() < deadline, sp.logs()[-2000:]
            time.sleep(0.05)
        assert sp.stop() == 0
    assert "replacing version 1" in sp.logs()
