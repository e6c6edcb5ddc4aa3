#!/usr/bin/env bash
# Run a command while N niced busy loops keep the cores busy: `with_cpu_hog.sh N CMD ...`.
# The loops stop when the command ends (or this script is interrupted); the command's exit code
# is the script's. Used by `make test-loaded`, the suite as CI's shared cores see it.
set -u
n="$1"; shift
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT INT TERM
for _ in $(seq "$n"); do
  nice -n 10 python3 -c 'while True: pass' &
  pids+=("$!")
done
echo "with_cpu_hog: $n niced busy loops (pids ${pids[*]}) while: $*" >&2
"$@"
