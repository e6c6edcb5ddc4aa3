"""``dcs.server.interceptor.ErrorInterceptor`` on its own: status mapping and the per-RPC metrics."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from dcs.server.errors import ModelNotFound
from dcs.server.interceptor import ErrorInterceptor
from dcs.server.metrics import ServerMetrics


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.status: tuple | None = None

    async def abort(self, code, details):
        self.status = (code, details)
        raise Aborted(details)


def _guard() -> tuple[ErrorInterceptor, CollectorRegistry]:
    registry = CollectorRegistry()
    return ErrorInterceptor(ServerMetrics(registry)), registry


def test_inflight_gauge_counts_rpcs_being_handled_and_errors_map_to_codes():
    guard, registry = _guard()
    release = asyncio.Event()

    async def behavior(request, context):
        await release.wait()
        if request == "missing":
            raise ModelNotFound("model 'x' is not loaded")
        return "answer"

    handler = guard._wrap_unary("Classify", behavior)

    def inflight():
        return registry.get_sample_value("dcs_inflight_requests", {"method": "Classify"})

    def count(code):
        return registry.get_sample_value(
            "dcs_requests_total", {"method": "Classify", "model": "", "code": code}) or 0.0

    async def main():
        ctx = FakeContext()
        calls = [asyncio.ensure_future(handler(r, ctx)) for r in ("a", "b", "missing")]
        await asyncio.sleep(0.01)
        during = inflight()
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        return during, results, ctx.status

    during, results, status = asyncio.run(main())
    assert during == 3.0 and inflight() == 0.0
    assert results[:2] == ["answer", "answer"] and isinstance(results[2], Aborted)
    assert status == (grpc.StatusCode.NOT_FOUND, "model 'x' is not loaded")
    assert count("OK") == 2 and count("NOT_FOUND") == 1


def test_a_method_wrapped_twice_keeps_one_gauge_reading():
    guard, registry = _guard()
    gate = asyncio.Event()

    async def behavior(request, context):
        await gate.wait()
        return request

    first, second = guard._wrap_unary("M", behavior), guard._wrap_unary("M", behavior)

    async def main():
        calls = [asyncio.ensure_future(first(1, None)), asyncio.ensure_future(second(2, None))]
        await asyncio.sleep(0.01)
        value = registry.get_sample_value("dcs_inflight_requests", {"method": "M"})
        gate.set()
        await asyncio.gather(*calls)
        return value

    assert asyncio.run(main()) == 2.0


def test_cancelled_rpc_leaves_the_gauge_at_zero():
    method = "Classify"
    guard, registry = _guard()

    async def behavior(request, context):
        await asyncio.sleep(10)

    handler = guard._wrap_unary(method, behavior)

    async def main():
        call = asyncio.ensure_future(handler(None, FakeContext()))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())
    assert registry.get_sample_value("dcs_inflight_requests", {"method": method}) == 0.0
    assert registry.get_sample_value(
        "dcs_requests_total", {"method": method, "model": "", "code": "CANCELLED"}) == 1.0
