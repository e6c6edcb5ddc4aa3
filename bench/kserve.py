"""The KServe v2 path and the project's own client, through the real server process.

``infer``: ``inference.GRPCInferenceService/ModelInfer`` driven by ``tritonclient.grpc.aio`` at
N = 1/8/64 (and the sync ``tritonclient.grpc`` at N = 8), one image per request, for each model
of ``Sizes.infer_models`` (the demo's two kinds: ``baseline``, an undefended pfe_cnn, and
``polarizing``, the same network behind a polarizing front end), each against the echo server
answering the same ModelInfer messages with a prebuilt response, in alternating rounds; the
model floors (``bench.echo_server --batching --model`` at N = 64: batching + ORT, nothing else;
``--model`` at N = 1: ORT per request on the loop) of each model show the compute's share. Then ``Classify`` driven by ``dcs.clients.Client``
(what users run: the client builds and parses every message) against the echo at N = 8 and 64.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from bench.common import PROVIDERS, Row, Sizes
from bench.procs import echo_server, real_server, warm
from bench.serving import GATED_N, MAX_BATCH, _rounds, raw_ort_seconds, spread

log = logging.getLogger("bench.kserve")

#: ModelInfer targets at N=64 per model label (issue 28); N=1 is judged against ``LONE_TARGET``.
GATED_TARGETS = {"baseline": 0.80, "polarizing": 0.70}
LONE_TARGET = 0.60
SYNC_N = 8


def _pair_rows(bench: str, label: str, s: dict, e: dict, *, target: float | None,
               p99_limit_ms: float | None, compute_ms: float, extra: dict) -> list[Row]:
    r = s["rps"] / e["rps"]
    rows = [Row(bench, f"{label}", s["rps"], e["rps"], r,
                f">= {target:.2f}x echo" if target else "", (r >= target) if target else None,
                "req/s", f"errors {s['errors'] or 0}/{e['errors'] or 0}; "
                f"p50 {s['p50_ms']:.2f} vs {e['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} vs "
                f"{e['p99_ms']:.2f} ms; {spread(s['round_rps'], e['round_rps'])}",
                extra={"server": s, "echo": e, **extra})]
    if p99_limit_ms is not None:
        rows.append(Row(bench, f"{label}: p99 latency", s["p99_ms"], e["p99_ms"],
                        s["p99_ms"] / e["p99_ms"],
                        f"<= 2x echo + compute ({p99_limit_ms:.2f} ms)",
                        s["p99_ms"] <= p99_limit_ms, "ms",
                        f"compute(batch {MAX_BATCH}) {compute_ms:.3f} ms"))
    return rows


#: Shortest window per side (seconds): a tritonclient process needs a moment to reach speed, and
#: --smoke's 0.3 s would leave rounds of 50 ms with no answer at all on a loaded machine.
MIN_DURATION_S = 1.2


def bench_infer(repo: Path, sizes: Sizes) -> list[Row]:
    rows: list[Row] = []
    sizes = replace(sizes, duration_s=max(sizes.duration_s, MIN_DURATION_S))
    dev = {"device": sizes.device}
    shape = sizes.shape
    top_n = max(sizes.infer_concurrencies)
    with echo_server(**dev) as echo, real_server(repo, **dev) as sp:
        for label, model in sizes.infer_models:
            kw = {"model": model, "shape": shape}
            model_path = repo / model / "1" / "model.onnx"
            compute_s, _ = raw_ort_seconds(model_path, MAX_BATCH, 0.3, shape=shape,
                                           provider=PROVIDERS[sizes.device])
            for api, ns in (("infer-aio", sizes.infer_concurrencies), ("infer-sync", (SYNC_N,))):
                client = "tritonclient.grpc.aio" if api == "infer-aio" else "tritonclient.grpc"
                for n in ns:
                    for target in (echo, sp.target):
                        warm(target, n, api=api, **kw)
                    gated = api == "infer-aio" and n == GATED_N
                    res = _rounds(sp.target, echo, sizes, gated=gated, concurrency=n, api=api,
                                  **kw)
                    e = res.pop("other")
                    target = (GATED_TARGETS.get(label) if gated
                              else LONE_TARGET if api == "infer-aio" and n == 1 else None)
                    limit = 2 * e["p99_ms"] + compute_s * 1e3 if gated else None
                    rows += _pair_rows("infer", f"{label}: ModelInfer N={n} ({client})", res, e,
                                       target=target, p99_limit_ms=limit,
                                       compute_ms=compute_s * 1e3,
                                       extra={"compute_ms": compute_s * 1e3})
            # the model floors (compute's share): at the top N batching + this model's ORT, at
            # N=1 this model's ORT per request on the loop; no checks, fixed answer
            lone_n = min(sizes.infer_concurrencies)
            for n, flags, what in ((top_n, ("--batching",), "batching + ORT"),
                                   (lone_n, (), "ORT per request")):
                with echo_server(*flags, "--model", str(model_path), **dev) as floor:
                    warm(floor, n, api="infer-aio", **kw)
                    res = _rounds(floor, echo, sizes, concurrency=n, api="infer-aio", **kw)
                e = res.pop("other")
                rows.append(Row(
                    "infer", f"{label}: ModelInfer N={n}, model floor ({what}) vs echo",
                    res["rps"], e["rps"], res["rps"] / e["rps"], "", None, "req/s",
                    f"bench.echo_server {' '.join(flags)} --model: no checks, fixed answer; ORT "
                    f"batch of {MAX_BATCH} {compute_s * 1e3:.3f} ms ({compute_s / MAX_BATCH * 1e6:.0f}"
                    f" µs/image); p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms; "
                    f"{spread(res['round_rps'], e['round_rps'])}", extra={"floor": res, "echo": e}))
        # the project's own client on Classify (builds and parses every message)
        model = sizes.model
        kw = {"model": model, "shape": shape}
        for n in sizes.client_concurrencies:
            for target in (echo, sp.target):
                warm(target, n, api="client", **kw)
            res = _rounds(sp.target, echo, sizes, concurrency=n, api="client", **kw)
            e = res.pop("other")
            rows += _pair_rows("infer", f"Classify N={n} via dcs Client ({n} threads, top_k=5)",
                               res, e, target=None, p99_limit_ms=None, compute_ms=0.0, extra={})
    return rows
