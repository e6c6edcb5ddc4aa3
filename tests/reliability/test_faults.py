"""Faults against a real server process: SIGTERM under load, SIGKILL during an audit then a
restart, the serving model file truncated or tampered with, a model whose ORT session cannot be
created, and a read-only or full state directory."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from tests.reliability.conftest import (
    AUTH,
    MODEL,
    assert_no_token,
    assert_no_tracebacks,
    can_private_mount,
    checked_call,
    in_child_ns,
    proc_rss_kib,
    start_proc,
    start_proc_with_tmpfs,
)
from tests.server_helpers import sample_value, scrape_metrics, wait_for_health

FINAL = {cpb.SUCCEEDED, cpb.FAILED, cpb.CANCELLED, cpb.INTERRUPTED}
LONG = [cpb.AttackSpec(name="pgd", params_json=json.dumps({"steps": 20000, "restarts": 10}))]


def images(x: np.ndarray) -> cpb.Tensor:
    return cpb.Tensor(dtype=cpb.FLOAT32, shape=x.shape, data=np.ascontiguousarray(x).tobytes())


def upload(x, y) -> cpb.UploadedExamples:
    return cpb.UploadedExamples(images=images(x), labels=[int(v) for v in y])


def watch_final(stub, job_id: str, timeout: float = 180) -> cpb.AuditEvent:
    last = None
    for ev in stub.WatchAudit(cpb.WatchAuditRequest(job_id=job_id), metadata=AUTH, timeout=timeout):
        last = ev
        if ev.state in FINAL:
            break
    return last


def wait_running(stub, job_id: str, timeout: float = 120) -> None:
    for ev in stub.WatchAudit(cpb.WatchAuditRequest(job_id=job_id), metadata=AUTH, timeout=timeout):
        if ev.state == cpb.RUNNING and ev.progress.gradient_evaluations > 0:
            return
        assert ev.state not in FINAL, ev


def classify_ok(stub, x, reference, stats=None) -> None:
    code, resp = checked_call(stub.Classify, cpb.ClassifyRequest(model=MODEL, images=images(x)),
                              stats, timeout=10)
    assert code == "OK", resp
    got = np.array([[s.logit for s in sorted(p.top, key=lambda s: s.index)] for p in resp.predictions])
    want = reference(x)
    top = [p.top[0].index for p in resp.predictions]
    assert top == want.argmax(1).tolist()
    assert np.allclose(np.sort(got, 1)[:, -5:], np.sort(want, 1)[:, -5:], atol=1e-4)


def metric(srv, name: str, **labels) -> float:
    return sample_value(scrape_metrics(srv.metrics_port), name, **labels)


def wait_metric(srv, name: str, at_least: float, timeout: float = 20, **labels) -> float:
    deadline = time.monotonic() + timeout
    value = 0.0
    while time.monotonic() < deadline:
        value = metric(srv, name, **labels)
        if value >= at_least:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{name}{labels} stayed at {value} < {at_least}; logs:\n{srv.logs()[-3000:]}")


# --- SIGTERM under load ------------------------------------------------------------------------
def test_sigterm_under_load_drains_accepted_refuses_new_and_flips_health_first(
        base_repo, tmp_path, stats, digits_test, reference):
    x, _ = digits_test
    srv = start_proc(base_repo, "--max-queue-delay-ms", "250", "--max-batch", "32",
                     "--grace-period-s", "5", tmp=tmp_path)
    health_events: list[tuple[float, int]] = []
    try:
        ch = grpc.insecure_channel(srv.target)
        stub = cpb_grpc.ClassifierStub(ch)
        classify_ok(stub, x[:2], reference, stats)  # warm
        # A health watcher on its own connection, as a load balancer would hold.
        hch = grpc.insecure_channel(srv.target)
        watch = health_pb2_grpc.HealthStub(hch).Watch(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=30)

        def watcher():
            try:
                for ev in watch:
                    health_events.append((time.monotonic(), ev.status))
            except grpc.RpcError:
                pass

        wt = threading.Thread(target=watcher, daemon=True)
        wt.start()
        deadline = time.monotonic() + 10
        while not health_events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health_events and health_events[0][1] == health_pb2.HealthCheckResponse.SERVING
        # 96 requests in flight: with a 250 ms batching window they sit in the queue.
        batch = [x[i:i + 1 + i % 3] for i in range(96)]
        futures = [stub.Classify.future(cpb.ClassifyRequest(model=MODEL, images=images(b)), timeout=20)
                   for b in batch]
        time.sleep(0.15)
        t_term = time.monotonic()
        srv.send_signal(signal.SIGTERM)
        # New requests after SIGTERM, each on a fresh connection, until they are refused.
        after: list[tuple[float, str]] = []
        for _ in range(200):
            with grpc.insecure_channel(srv.target) as ch2:
                code, _ = checked_call(cpb_grpc.ClassifierStub(ch2).Classify,
                                       cpb.ClassifyRequest(model=MODEL, images=images(x[:1])), None,
                                       timeout=2)
            after.append((time.monotonic(), code))
            if code == "UNAVAILABLE":
                break
            time.sleep(0.01)
        # Accepted before SIGTERM: every one completes, correctly.
        done = 0
        for b, f in zip(batch, futures):
            resp = f.result(timeout=20)
            assert [p.top[0].index for p in resp.predictions] == reference(b).argmax(1).tolist()
            done += 1
        stats.code("OK", done)
        rc = srv.proc.wait(timeout=15)
        t_exit = time.monotonic()
        wt.join(timeout=5)
        ch.close()
        hch.close()
    finally:
        srv.__exit__()
    assert rc == 0, srv.logs()[-3000:]
    # Bounded: the stop never outlasts the grace period (an open health Watch stream is ended
    # once the unary RPCs have drained).
    assert t_exit - t_term < 5 + 3
    assert after and after[-1][1] == "UNAVAILABLE", after
    for _, code in after:
        stats.code(code)
        assert code in ("OK", "UNAVAILABLE"), after
    statuses = [s for _, s in health_events]
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
    t_not_serving = next(t for t, s in health_events if s == health_pb2.HealthCheckResponse.NOT_SERVING)
    refused_at = after[-1][0]
    # Health flipped before the first refusal of a new request (and before exit).
    assert t_not_serving <= refused_at + 0.05 and t_not_serving < t_exit
    logs = srv.logs()
    assert "shutting down" in logs and "stopped" in logs
    assert_no_tracebacks(logs)
    stats.section("sigterm under load", accepted_in_flight=done, completed=done,
                  new_after_sigterm=[c for _, c in after][-5:], drain_s=round(t_exit - t_term, 3),
                  health_not_serving_after_s=round(t_not_serving - t_term, 3))


# --- SIGKILL during an audit, restart ------------------------------------------------------------
def _integrity(db: Path) -> str:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def test_sigkill_during_an_audit_then_restart_loses_nothing(base_repo, tmp_path, stats, digits_test):
    x, y = digits_test
    state = tmp_path / "state"
    # Audit threads at the event loop's priority: under --audit-niceness 19 (the default) a busy
    # machine can starve an audit for minutes, and this test is about durability, not priority.
    flags = ("--max-audit-gradients", str(10**9), "--max-audit-queries", str(10**10),
             "--audit-niceness", "0")
    srv = start_proc(base_repo, *flags, tmp=tmp_path, state_dir=state)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            audits = cpb_grpc.AuditStub(ch)
            done = audits.StartAudit(cpb.StartAuditRequest(
                model=MODEL, attacks=[cpb.AttackSpec(name="fgsm")], eps=[0.1],
                examples=upload(x[:8], y[:8])), metadata=AUTH, timeout=10).job_id
            assert watch_final(audits, done).state == cpb.SUCCEEDED
            before = audits.GetAudit(cpb.GetAuditRequest(job_id=done, include_report=True,
                                                         include_html=True), metadata=AUTH, timeout=10)
            long = audits.StartAudit(cpb.StartAuditRequest(model=MODEL, attacks=LONG, eps=[0.001],
                                                           examples=upload(x[:8], y[:8])),
                                     metadata=AUTH, timeout=10).job_id
            wait_running(audits, long)
            time.sleep(0.7)  # let it write progress rows (every 0.5 s) while we kill it
            stats.code("OK", 4)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=10)
    finally:
        srv.__exit__()
    db = state / "audits.sqlite3"
    assert _integrity(db) == "ok"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("SELECT state FROM jobs WHERE id=?", (long,)).fetchone()[0] == "running"
    con.close()
    report_before = (state / "reports" / done / "report.json").read_bytes()

    t0 = time.monotonic()
    srv = start_proc(base_repo, *flags, tmp=tmp_path, state_dir=state)
    restart_s = time.monotonic() - t0
    try:
        with grpc.insecure_channel(srv.target) as ch:
            audits = cpb_grpc.AuditStub(ch)
            job = audits.GetAudit(cpb.GetAuditRequest(job_id=long), metadata=AUTH, timeout=10)
            assert job.state == cpb.INTERRUPTED and job.error, job
            after = audits.GetAudit(cpb.GetAuditRequest(job_id=done, include_report=True,
                                                        include_html=True), metadata=AUTH, timeout=10)
            assert after.state == cpb.SUCCEEDED
            assert after.report_json == before.report_json and after.report_html == before.report_html
            assert after.summary == before.summary
            assert json.loads(after.report_json)["n_examples"] == 8
            # The interrupted job does not hold the concurrency slot: a new audit runs.
            again = audits.StartAudit(cpb.StartAuditRequest(
                model=MODEL, attacks=[cpb.AttackSpec(name="fgsm")], eps=[0.1],
                examples=upload(x[:4], y[:4])), metadata=AUTH, timeout=10).job_id
            assert watch_final(audits, again).state == cpb.SUCCEEDED
            states = {j.job_id: j.state for j in audits.ListAudits(cpb.ListAuditsRequest(),
                                                                     metadata=AUTH, timeout=10).jobs}
            assert states == {done: cpb.SUCCEEDED, long: cpb.INTERRUPTED, again: cpb.SUCCEEDED}
            stats.code("OK", 5)
            assert metric(srv, "dcs_audits", state="interrupted") == 1
    finally:
        assert srv.stop() == 0
    assert (state / "reports" / done / "report.json").read_bytes() == report_before
    assert _integrity(db) == "ok"
    assert not list((state / "uploads").iterdir())  # uploads are not left behind
    assert_no_tracebacks(srv.logs())
    stats.section("sigkill during audit", restart_to_healthy_s=round(restart_s, 2),
                  interrupted_marked=True, report_intact=True, sqlite_integrity="ok")


# --- model file replaced during serving -----------------------------------------------------------
def test_serving_model_truncated_or_tampered_keeps_old_version(repo_copy, tmp_path, stats,
                                                               digits_test, reference):
    x, y = digits_test
    srv = start_proc(repo_copy, tmp=tmp_path)
    model = repo_copy / MODEL / "1" / "model.onnx"
    original = model.read_bytes()
    stop = threading.Event()
    errors: list[str] = []
    served = [0]

    def load():
        with grpc.insecure_channel(srv.target) as ch:
            stub = cpb_grpc.ClassifierStub(ch)
            for i in range(3000):
                if stop.is_set():
                    return
                b = x[i % 400: i % 400 + 2]
                try:
                    resp = stub.Classify(cpb.ClassifyRequest(model=MODEL, images=images(b)), timeout=10)
                    if [p.top[0].index for p in resp.predictions] != reference(b).argmax(1).tolist():
                        errors.append(f"wrong answer at {i}")
                    served[0] += 1
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = cpb_grpc.ClassifierStub(ch)
            sha = stub.GetModel(cpb.GetModelRequest(model=MODEL), timeout=10).summary.ref.sha256
            # 1. truncated in place
            model.write_bytes(original[: len(original) // 3])
            srv.send_signal(signal.SIGHUP)
            wait_metric(srv, "dcs_model_load_failures_total", 1, model=MODEL)
            classify_ok(stub, x[:8], reference, stats)
            # 2. same length, bytes flipped (a tampered file the manifest does not vouch for)
            tampered = bytearray(original)
            for i in range(len(tampered) // 2, len(tampered) // 2 + 64):
                tampered[i] ^= 0xFF
            model.write_bytes(bytes(tampered))
            srv.send_signal(signal.SIGHUP)
            wait_metric(srv, "dcs_model_load_failures_total", 2, model=MODEL)
            classify_ok(stub, x[8:16], reference, stats)
            summary = stub.GetModel(cpb.GetModelRequest(model=MODEL), timeout=10).summary
            assert summary.ref.sha256 == sha and summary.ready
            # An audit reads the package from disk: it must refuse the tampered file, clearly.
            audits = cpb_grpc.AuditStub(ch)
            job = audits.StartAudit(cpb.StartAuditRequest(
                model=MODEL, attacks=[cpb.AttackSpec(name="fgsm")], eps=[0.1],
                examples=upload(x[:4], y[:4])), metadata=AUTH, timeout=10).job_id
            ev = watch_final(audits, job)
            assert ev.state == cpb.FAILED and ("sha256" in ev.message or "changed" in ev.message), ev
            # 3. restored: the same version verifies again; nothing was lost on the way.
            model.write_bytes(original)
            srv.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            classify_ok(stub, x[16:24], reference, stats)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(timeout=30)
        assert srv.stop() == 0
    assert not errors, errors[:5]
    assert served[0] > 0
    stats.code("OK", served[0])
    logs = srv.logs()
    assert "rejected" in logs and "still serving version 1" in logs
    assert_no_tracebacks(logs)
    stats.section("model replaced during serving", requests_during_swaps=served[0],
                  failed_requests=len(errors), load_failures_counted=2)


def _broken_package(repo: Path, name: str, version: int, src: Path) -> None:
    """A package that verifies (sha256 matches its manifest) but ORT cannot open."""
    import shutil

    from tests.reliability.test_security import _reseal

    dst = repo / name / str(version)
    shutil.copytree(src, dst)
    (dst / "model.onnx").write_bytes(b"\x08\x07\x12\x04junk" + bytes(range(256)) * 4)
    _reseal(dst, name=name)


def test_model_whose_ort_session_fails_is_refused_and_others_serve(repo_copy, base_repo, tmp_path,
                                                                   stats, digits_test, reference):
    src = base_repo / MODEL / "1"
    _broken_package(repo_copy, MODEL, 2, src)       # newer version of a good model
    _broken_package(repo_copy, "broken", 1, src)    # a model with no good version
    srv = start_proc(repo_copy, tmp=tmp_path)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = cpb_grpc.ClassifierStub(ch)
            models = stub.ListModels(cpb.ListModelsRequest(), timeout=10).models
            assert [(m.ref.name, m.ref.version) for m in models] == [(MODEL, 1)]
            classify_ok(stub, digits_test[0][:4], reference, stats)
            code, details = checked_call(stub.Classify, cpb.ClassifyRequest(
                model="broken", images=images(digits_test[0][:1])), stats, timeout=10)
            assert code == "NOT_FOUND", details
        assert metric(srv, "dcs_model_load_failures_total", model=MODEL) == 1
        assert metric(srv, "dcs_model_load_failures_total", model="broken") == 1
        # SIGHUP does not retry an unchanged bad package (no failure storm), and stays up.
        srv.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert metric(srv, "dcs_model_load_failures_total", model="broken") == 1
        wait_for_health(srv.target, timeout=5)
    finally:
        assert srv.stop() == 0
    logs = srv.logs()
    assert "onnxruntime could not load" in logs and "broken/1 rejected" in logs
    assert_no_tracebacks(logs)


# --- state directory read-only or full ------------------------------------------------------------
def _audits_refused_classify_ok(srv, stats, digits_test, reference, word: str) -> None:
    with grpc.insecure_channel(srv.target) as ch:
        classify_ok(cpb_grpc.ClassifierStub(ch), digits_test[0][:4], reference, stats)
        audits = cpb_grpc.AuditStub(ch)
        x, y = digits_test
        for fn, req in [(audits.StartAudit, cpb.StartAuditRequest(
                             model=MODEL, attacks=[cpb.AttackSpec(name="fgsm")], eps=[0.1],
                             examples=upload(x[:4], y[:4]))),
                        (audits.ListAudits, cpb.ListAuditsRequest())]:
            code, details = checked_call(fn, req, stats, metadata=AUTH, timeout=10)
            assert code == "UNAVAILABLE", (code, details)
            assert "state-dir" in details and word in details, details
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="classifier.v1.Audit"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="classifier.v1.Classifier"), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_read_only_state_dir_audits_refused_clearly_classify_unaffected(base_repo, tmp_path, stats,
                                                                        digits_test, reference):
    state = tmp_path / "ro-state"
    if can_private_mount():
        srv = start_proc_with_tmpfs(base_repo, state, tmp=tmp_path, read_only=True)
        word = "Read-only file system"
    elif os.geteuid() != 0:
        state.mkdir()
        state.chmod(0o555)
        srv = start_proc(base_repo, tmp=tmp_path, state_dir=state)
        word = "Permission denied"
    else:
        pytest.skip("root without unshare: cannot make a read-only directory")
    try:
        _audits_refused_classify_ok(srv, stats, digits_test, reference, word)
    finally:
        assert srv.stop() == 0
    logs = srv.logs()
    assert "audit service unavailable" in logs and "classify is not affected" in logs
    assert_no_tracebacks(logs)
    assert_no_token(logs)


@pytest.mark.skipif(not can_private_mount(), reason="needs root and unshare for a small tmpfs")
def test_full_state_dir_audits_refused_clearly_classify_unaffected_then_recovers(
        base_repo, tmp_path, stats, digits_test, reference):
    state = tmp_path / "small-state"
    srv = start_proc_with_tmpfs(base_repo, state, tmp=tmp_path, size_kib=1024)
    x, y = digits_test
    fill = in_child_ns(srv, state / "fill")
    try:
        with grpc.insecure_channel(srv.target) as ch:
            audits = cpb_grpc.AuditStub(ch)
            ok = audits.StartAudit(cpb.StartAuditRequest(
                model=MODEL, attacks=[cpb.AttackSpec(name="fgsm")], eps=[0.1],
                examples=upload(x[:4], y[:4])), metadata=AUTH, timeout=10).job_id
            assert watch_final(audits, ok).state == cpb.SUCCEEDED
            with open(fill, "wb", buffering=0) as f:  # fill the child's tmpfs to the last block
                try:
                    f.writelines(b"\0" * 4096 for _ in range(4096))
                except OSError:
                    pass
            classify_ok(cpb_grpc.ClassifierStub(ch), x[:4], reference, stats)
            refused = 0
            for n in (64, 128, 256):  # uploads big enough not to fit in a last partial block
                code, details = checked_call(audits.StartAudit, cpb.StartAuditRequest(
                    model=MODEL, attacks=[cpb.AttackSpec(name="fgsm")], eps=[0.1],
                    examples=upload(x[:n], y[:n])), stats, metadata=AUTH, timeout=10)
                if code == "OK":
                    watch_final(audits, details.job_id)
                    continue
                assert code == "UNAVAILABLE", (code, details)
                assert "state-dir" in details and ("No space left" in details
                                                   or "disk is full" in details), details
                refused += 1
            assert refused >= 1
            classify_ok(cpb_grpc.ClassifierStub(ch), x[4:8], reference, stats)
            fill.unlink()
            again = audits.StartAudit(cpb.StartAuditRequest(
                model=MODEL, attacks=[cpb.AttackSpec(name="fgsm")], eps=[0.1],
                examples=upload(x[:4], y[:4])), metadata=AUTH, timeout=10).job_id
            assert watch_final(audits, again).state == cpb.SUCCEEDED
            stats.code("OK", 4)
    finally:
        assert srv.stop() == 0
    logs = srv.logs()
    assert "No space left" in logs or "disk is full" in logs
    assert_no_tracebacks(logs)
    stats.rss(proc_rss_kib(srv.proc.pid)[1])



def test_state_write_failure_at_job_end_does_not_leak_the_audit_slot(base_repo, tmp_path, stats,
                                                                      digits_test):
    """The disk fills (or the database breaks) just as a job ends: the job's final state cannot
    be written, but its concurrency slot must still be freed, or every later audit is refused."""
    from tests.server_helpers import InProcessServer

    x, y = digits_test
    with InProcessServer(base_repo, audit_token=AUTH[0][1].split()[1],
                         state_dir=tmp_path / "state") as srv, \
            grpc.insecure_channel(srv.target) as ch:
        store = srv.server.audits.manager.store
        real_update = store.update

        def failing_update(job_id, **fields):
            if fields.get("state") in ("succeeded", "failed", "cancelled", "interrupted"):
                raise sqlite3.OperationalError("database or disk is full")
            return real_update(job_id, **fields)

        store.update = failing_update
        audits = cpb_grpc.AuditStub(ch)
        req = cpb.StartAuditRequest(model=MODEL, attacks=[cpb.AttackSpec(name="fgsm")], eps=[0.1],
                                    examples=upload(x[:4], y[:4]))
        first = audits.StartAudit(req, metadata=AUTH, timeout=10).job_id
        assert watch_final(audits, first).state == cpb.SUCCEEDED  # the live event still arrives
        store.update = real_update
        second = audits.StartAudit(req, metadata=AUTH, timeout=10).job_id  # not RESOURCE_EXHAUSTED
        assert watch_final(audits, second).state == cpb.SUCCEEDED
        stats.code("OK", 4)
