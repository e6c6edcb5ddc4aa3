"""Assemble and run the server: gRPC (classifier.v1, inference, audits, health, reflection),
Prometheus metrics, repository polling, signals and the bounded graceful stop.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sqlite3
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from dcs.proto import classifier_pb2_grpc, grpc_predict_v2_pb2_grpc
from dcs.server.batcher import Batcher
from dcs.server.config import ServerConfig
from dcs.server.dataplane import DataPlane, score_batch
from dcs.server.interceptor import ErrorInterceptor
from dcs.server.metrics import ServerMetrics
from dcs.server.repository import ModelRepository
from dcs.server.runtime import ModelRuntime
from dcs.server.servicers import (
    AUDIT_SERVICE,
    CLASSIFIER_SERVICE,
    INFERENCE_SERVICE,
    ClassifierServicer,
    InferenceServicer,
    classify_answers,
)

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Server:
    """One server instance. ``await start()``, then ``await wait()``; ``await stop()`` drains."""

    def __init__(self, config: ServerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServerMetrics(self.registry)
        self.port: int | None = None
        self.audit_port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: list[grpc.aio.Server] = []
        self._guard = ErrorInterceptor(self.metrics)  # wraps our services' handlers, both ports
        self._http = None
        self._poll_task: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.repository = ModelRepository(
            config.repo, device=config.device, intra_op_threads=config.intra_op_threads,
            make_batcher=self._make_batcher, metrics=self.metrics)
        self.dataplane = DataPlane(self.repository, max_batch=config.max_batch)
        self.health = HealthServicer()
        self.audits = None  # server.audit.AuditService when the audit engine is importable

    def _make_batcher(self, runtime: ModelRuntime) -> Batcher:
        return Batcher(runtime, max_batch=self.config.max_batch,
                       max_queue_delay_ms=self.config.max_queue_delay_ms,
                       max_queue=self.config.max_queue,
                       metrics=self.metrics, inline_compute_ms=self.config.inline_compute_ms,
                       overlap=self.config.batch_overlap == "on",
                       niceness=self.config.worker_niceness,
                       inline_lone_ms=self.config.inline_lone_ms,
                       process=functools.partial(score_batch, runtime.run,
                                                 encode=classify_answers(runtime).encode))

    def _new_grpc(self) -> grpc.aio.Server:
        limit = self.config.max_message_bytes
        return grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])

    def _bind(self, srv: grpc.aio.Server, port: int) -> int:
        address = f"{self.config.host}:{port}"
        if self.config.tls:
            creds = grpc.ssl_server_credentials(
                [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())])
            bound = srv.add_secure_port(address, creds)
        else:
            bound = srv.add_insecure_port(address)
        if not bound:
            raise OSError(f"could not bind {address}")
        return bound

    async def start(self, *, scan: bool = True) -> None:
        cfg = self.config
        cfg.log(log)
        main = self._new_grpc()
        self._guard.add_service(classifier_pb2_grpc.add_ClassifierServicer_to_server,
                                ClassifierServicer(self.dataplane), main)
        self._guard.add_service(grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
                                InferenceServicer(self.dataplane), main)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        names = [CLASSIFIER_SERVICE, INFERENCE_SERVICE, HEALTH_SERVICE,
                 reflection.SERVICE_NAME]
        audit_srv = None
        self.audits = self._make_audits()
        if self.audits is not None:
            if cfg.audit_port:
                audit_srv = self._new_grpc()
                self._add_audits(audit_srv)
                health_pb2_grpc.add_HealthServicer_to_server(self.health, audit_srv)
                reflection.enable_server_reflection(
                    [AUDIT_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], audit_srv)
            else:
                self._add_audits(main)
                names.insert(2, AUDIT_SERVICE)
        reflection.enable_server_reflection(names, main)
        await self._set_health(False)
        self.port = self._bind(main, cfg.port)
        self._grpc.append(main)
        if audit_srv is not None:
            self.audit_port = self._bind(audit_srv, cfg.audit_port)
            self._grpc.append(audit_srv)
        for srv in self._grpc:
            await srv.start()
        if cfg.metrics_port:
            self._start_metrics(cfg.metrics_port)
        log.info("listening: grpc %s:%s%s%s (%s)", cfg.host, self.port,
                 f", audits :{self.audit_port}" if self.audit_port else "",
                 f", metrics :{self.metrics_port}" if self.metrics_port else "",
                 "TLS" if cfg.tls else "plaintext")
        if self.audits is not None:
            await self.audits.start()
        if scan:
            await self.reload()
        if cfg.poll_interval_s > 0:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    def _add_audits(self, srv: grpc.aio.Server) -> None:
        self._guard.add_service(classifier_pb2_grpc.add_AuditServicer_to_server, self.audits.servicer, srv)

    def _start_metrics(self, port: int) -> None:
        from prometheus_client import start_http_server

        self._http, _thread = start_http_server(port, addr=self.config.host, registry=self.registry)
        self.metrics_port = self._http.server_port

    def start_metrics_on_free_port(self) -> int:
        """Tests: serve /metrics on an ephemeral port (``metrics_port`` 0 means disabled)."""
        self._start_metrics(0)
        return self.metrics_port

    def _make_audits(self):
        try:
            from dcs.server.audit_servicer import AuditService
        except ImportError as exc:
            log.warning("audit service disabled: %s", exc)
            return None
        try:
            return AuditService(self.config, self.dataplane, self.metrics)
        except (OSError, sqlite3.Error) as exc:
            # A read-only, full or broken --state-dir must not take classify down with it.
            from dcs.server.audit_servicer import UnavailableAuditService

            reason = (f"--state-dir {str(self.config.state_dir)!r} cannot be used "
                      f"({type(exc).__name__}: {exc})")
            log.error("audit service unavailable: %s; classify is not affected", reason)
            return UnavailableAuditService(reason)

    async def _set_health(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", CLASSIFIER_SERVICE, INFERENCE_SERVICE):
            await self.health.set(service, status)
        audits_ok = self.audits is None or getattr(self.audits, "available", True)
        await self.health.set(AUDIT_SERVICE, status if audits_ok
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def reload(self) -> None:
        """Rescan the repository (poll tick or SIGHUP) and update health."""
        if self._stopping:
            return
        report = await self.repository.scan()
        if report.loaded or report.failed or report.unloaded:
            log.info("repository scan: loaded %s, failed %s, unloaded %s", report.loaded,
                     list(report.failed), report.unloaded)
        if not self._stopping:
            await self._set_health(self.dataplane.ready)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.reload()
            except Exception:
                log.exception("repository scan failed")

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop accepting, drain in-flight RPCs within ``grace`` seconds."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_period_s if grace is None else grace
        log.info("shutting down: health NOT_SERVING, draining up to %.1f s", grace)
        self.dataplane.draining = True
        await self.health.enter_graceful_shutdown()
        if self._poll_task is not None:
            self._poll_task.cancel()
        # Drain notice: for a moment new RPCs still reach the handlers and get UNAVAILABLE
        # ("shutting down") while clients and balancers see NOT_SERVING, before gRPC stops
        # taking calls (a call that arrives just as it stops is CANCELLED, grpc/grpc#41785).
        await asyncio.sleep(min(DRAIN_NOTICE_S, grace))
        # Audits stop alongside the drain: running jobs are checkpointed as interrupted, which
        # also ends their WatchAudit streams so they do not hold the drain for the whole grace.
        grpc_stops = [asyncio.ensure_future(srv.stop(grace)) for srv in self._grpc]
        drained = [self._guard.wait_unary_idle()]
        if self.audits is not None:
            drained.append(self.audits.stop())
        drain = asyncio.gather(*drained)
        # Streams that never end by themselves (grpc.health.v1 Watch) would hold the stop for
        # the whole grace period: once unary RPCs and audits have drained, end the rest at once.
        try:
            await asyncio.wait_for(asyncio.shield(drain), grace)
        except asyncio.TimeoutError:
            pass
        await asyncio.gather(*(srv.stop(0) for srv in self._grpc))
        await drain
        await asyncio.gather(*grpc_stops)
        await self.repository.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        log.info("stopped")
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


#: Seconds between health NOT_SERVING on SIGTERM and gRPC refusing new calls (see ``stop``).
DRAIN_NOTICE_S = 0.5

#: GIL switch interval for the server process. Audits run Python attack loops in worker threads;
#: the default 5 ms interval lets them hold the GIL long enough to double classify latency.
SWITCH_INTERVAL_S = 0.0005


def tune_interpreter() -> None:
    """Process-wide settings for serving (called by ``serve``; tests may call it too)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP rescans the repository. Returns the exit code."""
    tune_interpreter()
    server = Server(config)
    loop = asyncio.get_running_loop()
    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(server.stop()))
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.reload()))
    await server.wait()
    return 0
