"""The one place where domain errors become gRPC statuses, and where per-RPC metrics are taken.

The wrapping happens once, when a service is registered (``ErrorInterceptor.add_service``), not
per call: a ``grpc.aio.ServerInterceptor`` runs a coroutine and builds a new method handler for
every RPC, which halved the requests/s of a no-op server in ``bench/`` (7.0k → 3.8k on 2 cores).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from dcs.server.errors import InvalidInput, ServiceError
from dcs.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

#: Set by the data plane when a request names a model, so metrics can be labelled by model.
current_model: contextvars.ContextVar[str] = contextvars.ContextVar("current_model", default="")

#: Services whose handlers are wrapped (health and reflection are left as they are).
WRAPPED_PREFIXES = ("/classifier.v1.", "/inference.")


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class _Malformed:
    """Stands in for a request whose bytes did not parse; the handler wrapper refuses it."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


def _tolerant(deserializer):
    """grpc answers UNKNOWN when a request deserializer raises; parse here instead and let the
    wrapper turn a bad message into INVALID_ARGUMENT (DESIGN §5: malformed request)."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything a parser raises
            return _Malformed(exc)
    return parse


def _passthrough(serializer):
    """The response serializer, except that a handler may return the serialized bytes itself
    (``dcs.server.answers``: classify answers encoded in the batch worker)."""
    if serializer is None:
        return None

    def serialize(response) -> bytes:
        return response if response.__class__ is bytes else serializer(response)
    return serialize


def _check_parsed(request, method: str) -> None:
    if isinstance(request, _Malformed):
        raise InvalidInput(f"request to {method} is not a valid protobuf message "
                           f"({type(request.exc).__name__}: {request.exc})")


class _InFlight:
    """RPCs of one method being handled: a plain counter on the event-loop thread that the
    ``dcs_inflight_requests`` gauge reads at scrape time, instead of a locked update per RPC."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def inc(self) -> None:
        self.n += 1

    def dec(self) -> None:
        self.n -= 1


class ErrorInterceptor:
    """Aborts with ``(exc.code, str(exc))`` for ServiceError; INTERNAL (logged) for anything else.

    Also counts requests by method/model/code, observes total latency and tracks in-flight RPCs.
    Register services through :meth:`add_service` so their handlers are wrapped once.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._unary_inflight = 0
        self._inflight: dict[str, _InFlight] = {}  # method -> counter behind its gauge child
        self._idle: asyncio.Event | None = None

    def add_service(self, add_to_server: Callable[[Any, Any], None], servicer: Any,
                    server: grpc.aio.Server) -> None:
        """``add_XServicer_to_server(servicer, server)`` with every method handler wrapped."""
        capture = _Capture()
        add_to_server(servicer, capture)
        if not capture.services:
            raise RuntimeError(f"{add_to_server.__name__} registered no method handlers "
                               "(generated stubs older than grpcio 1.62?); regenerate with `make proto`")
        for service, handlers in capture.services:
            wrapped = {name: self.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
            if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.63: faster lookup
                server.add_registered_method_handlers(service, wrapped)

    async def wait_unary_idle(self) -> None:
        """Return once no unary RPC of ours is being handled (used by the graceful stop)."""
        while self._unary_inflight:
            if self._idle is None:
                self._idle = asyncio.Event()
            self._idle.clear()
            await self._idle.wait()

    def _unary_done(self) -> None:
        self._unary_inflight -= 1
        if not self._unary_inflight and self._idle is not None:
            self._idle.set()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler of ``method`` (full path) with error mapping and metrics around it."""
        if not method.startswith(WRAPPED_PREFIXES):
            return handler
        name = _short(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(name, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=_passthrough(handler.response_serializer))
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(name, handler.unary_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler

    async def _fail(self, context, exc: BaseException, method: str, start: float, inflight) -> None:
        """Record the RPC, then abort. Metrics come first: abort sends the status at once."""
        if isinstance(exc, ServiceError):
            code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
            self._finish(method, start, code.name, inflight)
            await context.abort(code, str(exc))
        log.error("unhandled error in %s", method, exc_info=exc)
        self._finish(method, start, "INTERNAL", inflight)
        await context.abort(grpc.StatusCode.INTERNAL,
                            f"internal error in {method}; see the server log")

    def _counter(self, method: str) -> _InFlight:
        counter = self._inflight.get(method)
        if counter is None:
            counter = self._inflight[method] = _InFlight()
            self._metrics.inflight.labels(method).set_function(lambda: counter.n)
        return counter

    def _finish(self, method: str, start: float, code: str, inflight) -> None:
        inflight.dec()
        self._metrics.observe_request(method, current_model.get(), code, time.perf_counter() - start)

    def _wrap_unary(self, method: str, behavior):
        inflight = self._counter(method)

        async def wrapper(request, context):
            start = time.perf_counter()
            inflight.inc()
            self._unary_inflight += 1
            try:
                _check_parsed(request, method)
                response = await behavior(request, context)
            except asyncio.CancelledError:
                self._finish(method, start, "CANCELLED", inflight)
                raise
            except grpc.aio.AbortError:  # a handler aborted by itself
                self._finish(method, start, _code_name(context), inflight)
                raise
            except Exception as exc:  # noqa: BLE001 - ServiceError, or INTERNAL
                await self._fail(context, exc, method, start, inflight)
            else:
                self._finish(method, start, "OK", inflight)
                return response
            finally:
                self._unary_done()
        return wrapper

    def _wrap_stream(self, method: str, behavior):
        inflight = self._counter(method)

        async def wrapper(request, context):
            start = time.perf_counter()
            inflight.inc()
            try:
                _check_parsed(request, method)
                async for item in behavior(request, context):
                    yield item
            except (asyncio.CancelledError, GeneratorExit):
                self._finish(method, start, "CANCELLED", inflight)
                raise
            except grpc.aio.AbortError:
                self._finish(method, start, _code_name(context), inflight)
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, exc, method, start, inflight)
            else:
                self._finish(method, start, "OK", inflight)
        return wrapper


def _code_name(context) -> str:
    try:
        code = context.code()
        return code.name if code is not None else "UNKNOWN"
    except Exception:  # noqa: BLE001
        return "UNKNOWN"


class _Capture:
    """Stands in for the server in a generated ``add_XServicer_to_server``; keeps the handlers.

    Stubs from grpcio-tools 1.62 (what ``make proto`` pins, so they load on every declared
    grpcio and protobuf) register one generic handler per service; newer ones also register the
    methods by name. Either way the method handlers are read through public API: the service
    name, the method names from the service's descriptor, and ``service(details)`` per method.
    """

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        from google.protobuf import descriptor_pool

        for handler in handlers:
            service = handler.service_name()
            if any(name == service for name, _ in self.services):
                continue
            methods = descriptor_pool.Default().FindServiceByName(service).methods
            found = {m.name: handler.service(_CallDetails(f"/{service}/{m.name}")) for m in methods}
            self.services.append((service, {k: h for k, h in found.items() if h is not None}))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.services = [(name, h) for name, h in self.services if name != service]
        self.services.append((service, dict(handlers)))


class _CallDetails(grpc.HandlerCallDetails):
    """The one field a generic handler reads to pick a method handler."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()
