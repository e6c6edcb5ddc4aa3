"""Profile the real server's hot path with py-spy while the load generator drives it.

``python -m bench.profile_server [--concurrency 64] [--batch 1] [--seconds 8] [--api infer-aio]
[--model pfe] [--flags ...]``
prints the top functions by own (self) samples and by inclusive samples, from py-spy's collapsed
stacks of every server thread (event loop + ORT executor). Needs ``py-spy`` (pip install py-spy)
and ptrace permission on the child (same user).
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.common import PFE, ensure_models
from bench.procs import load, real_server


def summarize(collapsed: Path, top: int) -> str:
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        threads[frames[0]] += n
        own[frames[-1]] += n
        for f in set(frames[1:]):
            incl[f] += n
    out = [f"{total} samples; by thread: " + ", ".join(f"{t} {100 * v / total:.0f}%"
                                                      for t, v in threads.most_common(6))]
    out.append("\nself (own) samples:")
    out += [f"  {100 * v / total:5.1f}%  {f}" for f, v in own.most_common(top)]
    out.append("\ninclusive samples:")
    out += [f"  {100 * v / total:5.1f}%  {f}" for f, v in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--api", default="classify", choices=("classify", "infer-aio", "infer-sync",
                                                         "client"),
                   help="the load: Classify pre-serialized (bench.loadgen), or ModelInfer through "
                   "tritonclient / Classify through dcs Client (bench.loadgen_kserve)")
    p.add_argument("--model", default=PFE, help="served model the load asks for (pfe, polarizing)")
    p.add_argument("--idle", action="store_true", help="include idle samples (waiting threads)")
    p.add_argument("--native", action="store_true", help="C/Cython frames too (grpc core, ORT)")
    p.add_argument("--out", type=Path, default=None, help="keep the collapsed stacks here")
    p.add_argument("flags", nargs="*", help="extra server flags (after --)")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="dcs-prof-") as work:
        return _profile(spy, Path(work), args)


def _profile(spy: str, work: Path, args: argparse.Namespace) -> int:
    """Record the loaded server with py-spy and print the summary (``work``: scratch)."""
    repo = ensure_models(work / "repo")
    out = args.out or work / "server.collapsed"
    with real_server(repo, *args.flags) as sp:
        cmd = [spy, "record", "--pid", str(sp.proc.pid), "--format", "raw", "--rate", "250",
               "--duration", str(int(args.seconds)), "--output", str(out), "--threads"]
        cmd += ["--idle"] if args.idle else []
        cmd += ["--native"] if args.native else ["--nonblocking"]  # native needs to pause it
        rec = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        result = {}
        t = threading.Thread(target=lambda: result.update(load(
            sp.target, concurrency=args.concurrency, batch=args.batch, top_k=args.top_k,
            duration=args.seconds, warmup=0.5, model=args.model, api=args.api)))
        t.start()
        t.join(timeout=args.seconds * 3 + 60)
        spy_out = rec.communicate(timeout=args.seconds + 60)[0].decode(errors="replace")
    print(f"load: {result.get('rps', 0):.0f} req/s, {result.get('ips', 0):.0f} img/s, "
          f"p50 {result.get('p50_ms', 0):.2f} ms, p99 {result.get('p99_ms', 0):.2f} ms")
    if not out.exists():
        print(f"py-spy wrote nothing ({rec.returncode}):\n{spy_out[-2000:]}")
        return 1
    print(summarize(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
