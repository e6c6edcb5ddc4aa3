#!/usr/bin/env bash
# Issue 25, item 6: PGD adversarial training of a polarizing front end through a chosen BPDA
# surrogate. Trains the same Fashion-MNIST PFE twice (straight-through vs tanh τ=0.05 in the
# training attack), exports both with the surrogate family and audits both adaptively
# (quick suite, ε=0.1 headline, 200 test images). Results: results/adv_surrogate/.
#   scripts/adv_surrogate.sh [st|tanh|all]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
RUNS=${ADV_SURROGATE_RUNS:-runs/adv_surrogate}
OUT=results/adv_surrogate
export DCS_THREADS=1
TRAIN="--dataset fmnist --limit-train 6000 --arch pfe_cnn --defense pfe --pfe-stages 2,2,4 --pfe-lambda 5
       --adv-train --adv-steps 10 --threads 1 --no-progress"

surrogate_of() { case "$1" in st) echo straight-through ;; tanh) echo tanh:0.05 ;; *) echo "unknown $1" >&2; exit 2 ;; esac; }

one() {
  local name=$1
  if [ ! -f "$RUNS/$name/final.pt" ]; then
    # shellcheck disable=SC2086
    nice -n 10 "$BIN/dcs" train $TRAIN --adv-surrogate "$(surrogate_of "$name")" --out "$RUNS/$name"
  fi
  if [ ! -d "$RUNS/repo/pfe_adv_$name/1" ]; then
    nice -n 10 "$BIN/dcs" export "$RUNS/$name" --repo "$RUNS/repo" --name "pfe_adv_$name" --version 1
  fi
  mkdir -p "$OUT"
  cp "$RUNS/$name/config.json" "$OUT/train_$name.json"
  nice -n 10 "$BIN/dcs" evaluate "$RUNS/repo/pfe_adv_$name/1" --dataset fmnist --suite quick --limit 200 \
    --seed 0 --out "$OUT/reports/$name" --no-progress
}

case "${1:-all}" in
  st|tanh) one "$1" ;;
  all) one st; one tanh ;;
  *) echo "usage: $0 [st|tanh|all]" >&2; exit 2 ;;
esac
