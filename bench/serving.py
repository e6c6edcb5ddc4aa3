"""Serving benchmarks through the real server process, each against its reference.

1. ``classify``: closed loop, one image per request, N = 1/8/64, vs the no-op echo server.
2. ``batched``: images/s at the best client batch size vs raw in-process ONNX Runtime.
3. ``batching``: dynamic batching on vs off (``--max-batch 1``) at N=64.
Server and load generator are separate processes on the same (2-core) machine; the echo
reference is measured under the same conditions.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from bench.common import PROVIDERS, Row, Sizes
from bench.procs import batch_stats, echo_server, load, real_server, warm

log = logging.getLogger("bench.serving")
MAX_BATCH = 32  # the server's default --max-batch
GATED_N = 64  # the concurrency the classify targets are judged at
ROUNDS = 3  # alternating rounds per side in every A-vs-B measurement
#: A figure with a target gets more rounds and more time, the references beside it less: their
#: spread across runs on this VM (±0.08) is what decides PASS or FAIL near a threshold.
GATED_ROUNDS, GATED_SHARE, REFERENCE_SHARE = 4, 1.25, 0.5


def raw_ort_seconds(model_path: Path, batch: int, seconds: float, threads: int = 1,
                    provider: str = PROVIDERS["cpu"],
                    shape: tuple[int, ...] = (1, 28, 28)) -> tuple[float, str]:
    """Mean seconds per ``session.run`` on ``batch`` images (numpy in and out, as a plain ORT
    user calls it); returns (seconds, provider in use). Refuses to measure on another provider."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers = list(dict.fromkeys([provider, PROVIDERS["cpu"]]))
    sess = ort.InferenceSession(str(model_path), so, providers=providers)
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} did not load for {model_path}: {sess.get_providers()}")
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {name: x})
    n, t0 = 0, time.perf_counter()
    while (time.perf_counter() - t0 < seconds or n < 5) and n < 100_000:
        sess.run(None, {name: x})
        n += 1
    return (time.perf_counter() - t0) / n, sess.get_providers()[0]


def _merge(parts: list[dict]) -> dict:
    """Several load() results as one: requests and seconds add up, latencies merge."""
    from bench.common import percentiles

    lat = [v for p in parts for v in p["latencies_s"]]
    req = sum(p["requests"] for p in parts)
    sec = sum(p["seconds"] for p in parts)
    img = sum(p["images"] for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {"requests": req, "images": img, "seconds": sec, "rps": req / sec, "ips": img / sec,
            "errors": errors, "rounds": len(parts), "round_rps": [p["rps"] for p in parts],
            "round_ips": [p["ips"] for p in parts], **percentiles(lat)}


def spread(num: list[float], den: list[float]) -> str:
    """``num/den`` round by round, as "per-round 0.62-0.74x": how much the machine moved."""
    ratios = [a / b for a, b in zip(num, den) if b]  # a round without answers has no ratio
    return f"per-round {min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "no rounds"


def _rounds(target_a: str, target_b: str, sizes: Sizes, *, gated: bool = False, **kw) -> dict:
    """A and B measured alternately (A B A B ...), merged per side; B is under key "other".

    ``gated``: the figure has a target (GATED_ROUNDS rounds, GATED_SHARE of ``duration_s`` per
    side); otherwise ROUNDS rounds and REFERENCE_SHARE of it. Both servers are warm (``warm``)
    before this, so each round's own warm-up is short."""
    rounds, share = (GATED_ROUNDS, GATED_SHARE) if gated else (ROUNDS, REFERENCE_SHARE)
    a, b = [], []
    for _ in range(rounds):
        for side, target in ((a, target_a), (b, target_b)):
            side.append(load(target, duration=sizes.duration_s * share / rounds,
                             warmup=min(sizes.warmup_s, 0.25), keep_latencies=True, **kw))
    return {**_merge(a), "other": _merge(b)}


#: Reference servers between the echo and ours, measured at the top concurrency: what batching
#: alone costs on grpc.aio, and what any design that also runs the model through ORT costs.
FLOORS = (("batching floor (no model)", ("--batching",)),
          ("model floor (batching + ORT)", ("--batching", "--model", "{model}")))
FLOOR_NOTES = ("park + one thread hand-off per batch, nothing else",
               ("the batch really runs through ORT (1 thread); no checks, top-k or metrics, "
               "fixed response"))


def bench_classify(repo: Path, sizes: Sizes) -> list[Row]:
    rows: list[Row] = []
    model_path = repo / sizes.model / "1" / "model.onnx"
    kw = {"model": sizes.model, "shape": sizes.shape}
    res: dict[str, dict[int, dict]] = {"echo": {}, "server": {}}
    # Both servers up at once (the idle one costs nothing); the two are measured alternately in
    # short rounds so drift in machine load hits both sides alike.
    dev = {"device": sizes.device}
    with echo_server(**dev) as echo_target, real_server(repo, **dev) as sp:
        for n in sizes.concurrencies:
            for side, target in (("echo", echo_target), ("server", sp.target)):
                warm(target, n, **kw)
            res["echo"][n] = _rounds(echo_target, sp.target, sizes, gated=n == GATED_N,
                                     concurrency=n, **kw)
            res["server"][n] = res["echo"][n].pop("other")
        stats = batch_stats(sp.metrics_port, sizes.model)
        n_top = max(sizes.concurrencies)
        floors = {}
        for name, flags in FLOORS:
            flags = tuple(str(model_path) if f == "{model}" else f for f in flags)
            with echo_server(*flags, **dev) as floor_target:
                warm(floor_target, n_top, **kw)
                floors[name] = _rounds(floor_target, echo_target, sizes, concurrency=n_top, **kw)
    for n in sizes.concurrencies:
        e, s = res["echo"][n], res["server"][n]
        compute_s, _ = raw_ort_seconds(model_path, min(n, MAX_BATCH), 0.3, shape=sizes.shape,
                                       provider=PROVIDERS[sizes.device])
        r = s["rps"] / e["rps"]
        p99_limit = 2 * e["p99_ms"] + compute_s * 1e3
        gated = n == GATED_N
        rows.append(Row("classify", f"requests/s N={n}", s["rps"], e["rps"], r,
                        ">= 0.80x echo" if gated else "", (r >= 0.8) if gated else None, "req/s",
                        f"errors {s['errors'] or 0}; {spread(s['round_rps'], e['round_rps'])}",
                        extra={"server": s, "echo": e}))
        rows.append(Row("classify", f"p99 latency N={n}", s["p99_ms"], e["p99_ms"],
                        s["p99_ms"] / e["p99_ms"],
                        f"<= 2x echo + compute ({p99_limit:.2f} ms)" if gated else "",
                        (s["p99_ms"] <= p99_limit) if gated else None, "ms",
                        f"p50 {s['p50_ms']:.2f} vs echo {e['p50_ms']:.2f} ms; "
                        f"compute(batch {min(n, MAX_BATCH)}) {compute_s * 1e3:.3f} ms",
                        extra={"compute_ms": compute_s * 1e3}))
    rows[-1].extra["server_batches"] = stats
    ours = res["server"][n_top]["rps"] / res["echo"][n_top]["rps"]
    for (name, flags), what in zip(FLOORS, FLOOR_NOTES):
        floor = floors[name]
        floor_echo = floor.pop("other")
        fr = floor["rps"] / floor_echo["rps"]
        rows.append(Row("classify", f"requests/s N={n_top}, {name} vs echo", floor["rps"],
                        floor_echo["rps"], fr, "", None, "req/s",
                        f"bench.echo_server {' '.join(f for f in flags if f != '{model}')}: {what}; "
                        f"our server reaches {ours / fr:.2f}x of this floor; "
                        f"{spread(floor['round_rps'], floor_echo['round_rps'])}",
                        extra={"floor": floor, "echo": floor_echo}))
    rows += bench_uvloop(repo, sizes, n_top, kw)
    return rows


def bench_uvloop(repo: Path, sizes: Sizes, n: int, kw: dict) -> list[Row]:
    """``--event-loop uvloop`` on both sides: what the optional loop buys, and what the echo gains."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return [Row("classify", f"requests/s N={n}, server and echo on uvloop", None, None, None,
                    "", None, "req/s", "uvloop not installed")]
    flag = ("--event-loop", "uvloop")
    dev = {"device": sizes.device}
    with echo_server(*flag, **dev) as echo_target, real_server(repo, *flag, **dev) as sp:
        for target in (echo_target, sp.target):
            warm(target, n, **kw)
        res = _rounds(sp.target, echo_target, sizes, concurrency=n, **kw)
    echo = res.pop("other")
    return [Row("classify", f"requests/s N={n}, server and echo on uvloop", res["rps"], echo["rps"],
                res["rps"] / echo["rps"], "", None, "req/s",
                f"p99 {res['p99_ms']:.2f} vs echo {echo['p99_ms']:.2f} ms; compare the absolute "
                "req/s with the asyncio row above", extra={"server": res, "echo": echo})]


#: Every batch computed on the event-loop thread (``--inline-compute-ms`` above any batch's
#: compute): no thread hand-off and back per batch, at the price of a loop blocked while it runs.
INLINE_FLAGS = ("--inline-compute-ms", "10000")


def bench_batched(repo: Path, sizes: Sizes) -> list[Row]:
    """Sweep client batch sizes on both sides, then measure the best of each alternately."""
    model_path = repo / sizes.model / "1" / "model.onnx"
    kw = {"model": sizes.model, "shape": sizes.shape}

    def raw_ips(b: int, seconds: float) -> float:
        return b / raw_ort_seconds(model_path, b, seconds, shape=sizes.shape,
                                   provider=PROVIDERS[sizes.device])[0]

    raw_sweep = {b: raw_ips(b, max(0.2, sizes.duration_s / 3)) for b in sizes.batch_sizes}
    best_raw_b = max(raw_sweep, key=raw_sweep.get)
    flags = ("--max-batch", str(max(sizes.batch_sizes)), "--max-queue-delay-ms", "0")
    # concurrency 3: one request computes while the next ones are parsed/queued (closed loop).
    load_kw = {"concurrency": 3, "top_k": 1, "warmup": min(sizes.warmup_s, 0.25),
               "keep_latencies": True, **kw}
    dev = {"device": sizes.device}
    with real_server(repo, *flags, **dev) as sp, \
            real_server(repo, *flags, *INLINE_FLAGS, **dev) as inline_sp, \
            echo_server("--model", str(model_path), **dev) as floor_target, \
            echo_server(**dev) as echo_target:
        sweep = {b: load(sp.target, batch=b, duration=sizes.duration_s / 2, **load_kw)
                 for b in sizes.batch_sizes}
        best_b = max(sweep, key=lambda k: sweep[k]["ips"])
        sides = {"server": sp.target, "inline": inline_sp.target, "floor": floor_target,
                 "echo": echo_target}
        for target in sides.values():
            warm(target, 3, batch=best_b, top_k=1, **kw)
        runs: dict[str, list[dict]] = {name: [] for name in (*sides, "uint8")}
        raw_runs: list[float] = []
        per = sizes.duration_s / ROUNDS
        for _ in range(ROUNDS):  # every side once per round, so load drift hits all alike
            raw_runs.append(raw_ips(best_raw_b, per))
            for name, target in sides.items():
                runs[name].append(load(target, batch=best_b, duration=per, **load_kw))
            # harness-side variant: the same images as UINT8 bytes (4x fewer bytes on the wire)
            runs["uint8"].append(load(sp.target, batch=best_b, dtype="uint8", duration=per,
                                      **load_kw))
    res = {name: _merge(parts) for name, parts in runs.items()}
    ref = sum(raw_runs) / len(raw_runs)
    best = res["server"]
    r = best["ips"] / ref
    sweep_note = (", ".join(f"{b}:{v['ips']:.0f}" for b, v in sweep.items()) + "; raw "
                  + ", ".join(f"{b}:{v:.0f}" for b, v in raw_sweep.items()))
    rows = [Row("batched", f"images/s, server best batch {best_b} (f32, top_k=1)", best["ips"],
                ref, r, ">= 0.90x raw ORT", r >= 0.9, "img/s",
                f"raw ORT best batch {best_raw_b}, 1 intra-op thread; server flags "
                f"{' '.join(flags)}; {ROUNDS} alternating rounds, "
                f"{spread(best['round_ips'], raw_runs)}; sweep server {sweep_note}",
                extra={"server": best, "sweep": sweep, "raw_sweep": raw_sweep,
                       "raw_rounds": raw_runs})]
    floor_share = best["ips"] / res["floor"]["ips"]
    inline_note = (f"server flags {' '.join(INLINE_FLAGS)}: no hand-off to the model's worker "
                   "thread and back")
    floor_note = ("bench.echo_server --model: a handler that only runs the images through ORT and "
                  f"returns a fixed answer; our server reaches {floor_share:.2f}x of it")
    echo_note = ("bench.echo_server: the same request messages, no model, a fixed answer: what "
                 f"grpc.aio alone moves at this batch; our server reaches "
                 f"{best['ips'] / res['echo']['ips']:.2f}x of it")
    notes = {
        "uint8": (f"images/s, batch {best_b} sent as UINT8",
                  "client-side variant: 1 byte/pixel, server scales by 1/255"),
        "inline": (f"images/s, batch {best_b}, batches computed on the event loop", inline_note),
        "floor": (f"images/s, batch {best_b}, model floor (grpc.aio + ORT) vs raw", floor_note),
        "echo": (f"images/s, batch {best_b}, echo (grpc.aio alone) vs raw", echo_note),
    }
    for name, (figure, note) in notes.items():
        rows.append(Row("batched", figure, res[name]["ips"], ref, res[name]["ips"] / ref, "", None,
                        "img/s", note, extra={name: res[name]}))
    return rows


def bench_batching(repo: Path, sizes: Sizes) -> list[Row]:
    """Dynamic batching on vs off (``--max-batch 1``), and the same pair for the model floor:
    what batching can gain for this model on this machine when the unbatched path runs each
    request through ORT right on the event loop."""
    kw = {"model": sizes.model, "shape": sizes.shape}
    model_path = str(repo / sizes.model / "1" / "model.onnx")
    dev = {"device": sizes.device}
    with real_server(repo, "--max-batch", str(MAX_BATCH), **dev) as on, \
            real_server(repo, "--max-batch", "1", **dev) as off:
        for sp in (on, off):
            warm(sp.target, 64, **kw)
        res = _rounds(on.target, off.target, sizes, gated=True, concurrency=64, **kw)
        res = {"off": res.pop("other"), "on": res}
        stats = {"on": batch_stats(on.metrics_port, sizes.model),
                 "off": batch_stats(off.metrics_port, sizes.model)}
    with echo_server("--batching", "--model", model_path, **dev) as floor_on, \
            echo_server("--model", model_path, **dev) as floor_off:
        for target in (floor_on, floor_off):
            warm(target, 64, **kw)
        floor = _rounds(floor_on, floor_off, sizes, concurrency=64, **kw)
        floor_off_res = floor.pop("other")
    r = res["on"]["rps"] / res["off"]["rps"]
    return [Row("batching", "requests/s N=64, dynamic batching on vs off", res["on"]["rps"],
                res["off"]["rps"], r, ">= 2.0x", r >= 2.0, "req/s",
                f"mean batch {stats['on']['mean_batch']:.1f} (on) vs "
                f"{stats['off']['mean_batch']:.1f} (off); p99 {res['on']['p99_ms']:.1f} vs "
                f"{res['off']['p99_ms']:.1f} ms; {spread(res['on']['round_rps'], res['off']['round_rps'])}",
                extra={"on": res["on"], "off": res["off"], "batches": stats}),
            Row("batching", "requests/s N=64, model floor batched vs ORT per request on the loop",
                floor["rps"], floor_off_res["rps"], floor["rps"] / floor_off_res["rps"], "", None,
                "req/s", "bench.echo_server --batching --model vs --model: the gain batching "
                "can give this model here when the unbatched path needs no thread hand-off; "
                f"{spread(floor['round_rps'], floor_off_res['round_rps'])}",
                extra={"on": floor, "off": floor_off_res})]
