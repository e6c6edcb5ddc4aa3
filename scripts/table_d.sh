#!/usr/bin/env bash
# Table D (issue 27): certified training (IBP, CROWN-IBP) and certification (IBP, CROWN) on
# MNIST-5k (eps 0.3) and Fashion-MNIST (eps 0.1), with the project's own CLI.
#   scripts/table_d.sh train NAME      train one model (see MODELS below) into runs/tableD/NAME
#   scripts/table_d.sh package NAME    export it to runs/tableD/repo and evaluate it into results/tableD
#   scripts/table_d.sh all             every model, in order
# 2-core budget: one torch thread per job (DCS_THREADS / --threads 1), niced; the schedules are
# shorter than the papers' (see results/README.md, Table D) because of it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
RUNS=${TABLE_D_RUNS:-runs/tableD}
REPO=$RUNS/repo
OUT=results/tableD
export DCS_THREADS=1
COMMON="--arch pfe_cnn --threads 1 --no-progress"

train_args() {
  case "$1" in
    mnist5k_cnn_ibp)      echo "--dataset mnist5k --defense none --certified ibp --cert-eps 0.4 --epochs 50 --cert-warmup 1 --cert-ramp 20 --lr 5e-4" ;;
    mnist5k_cnn_ibp_eps01) echo "--dataset mnist5k --defense none --certified ibp --cert-eps 0.1 --epochs 10 --cert-warmup 1 --cert-ramp 6 --lr 5e-4" ;;
    mnist5k_cnn_ibp_long) echo "--dataset mnist5k --defense none --certified ibp --cert-eps 0.3 --epochs 80 --cert-warmup 3 --cert-ramp 60 --lr 5e-4" ;;
    fmnist_cnn_ibp_long)  echo "--dataset fmnist --limit-train 6000 --defense none --certified ibp --cert-eps 0.1 --epochs 50 --cert-warmup 2 --cert-ramp 35 --lr 5e-4" ;;
    mnist5k_cnn_crownibp) echo "--dataset mnist5k --defense none --certified crown-ibp --cert-eps 0.4 --epochs 24 --cert-warmup 1 --cert-ramp 8 --lr 5e-4" ;;
    mnist5k_pfe_ibp)      echo "--dataset mnist5k --defense pfe --certified ibp --cert-eps 0.4 --pfe-stages 2,2,30 --cert-warmup 1 --cert-ramp 12 --cert-pfe-margin 1.0 --lr 5e-4" ;;
    fmnist_cnn_ibp)       echo "--dataset fmnist --limit-train 12000 --defense none --certified ibp --cert-eps 0.15 --epochs 24 --cert-warmup 1 --cert-ramp 10 --lr 5e-4" ;;
    mnist5k_cnn_ibp_e120) echo "--dataset mnist5k --defense none --certified ibp --cert-eps 0.4 --epochs 120 --cert-warmup 1 --cert-ramp 40 --lr 5e-4" ;;
    fmnist_cnn_ibp_30k)   echo "--dataset fmnist --limit-train 30000 --defense none --certified ibp --cert-eps 0.12 --epochs 14 --cert-warmup 1 --cert-ramp 6 --lr 5e-4" ;;
    fmnist_pfe_ibp)       echo "--dataset fmnist --limit-train 12000 --defense pfe --certified ibp --cert-eps 0.15 --pfe-stages 2,2,20 --cert-warmup 1 --cert-ramp 8 --cert-pfe-margin 1.0 --lr 5e-4" ;;
    mnist5k_cnn_ibp_e200) echo "--dataset mnist5k --defense none --certified ibp --cert-eps 0.4 --epochs 200 --cert-warmup 1 --cert-ramp 60 --lr 5e-4 --lr-milestones 150,180" ;;
    fmnist_cnn_ibp_30k_e30) echo "--dataset fmnist --limit-train 30000 --defense none --certified ibp --cert-eps 0.12 --epochs 30 --cert-warmup 1 --cert-ramp 10 --lr 5e-4 --lr-milestones 24,28" ;;
    mnist5k_pfe_ibp_eps03) echo "--dataset mnist5k --defense pfe --certified ibp --cert-eps 0.3 --pfe-c 0.5 --pfe-stages 2,2,40 --cert-warmup 1 --cert-ramp 15 --cert-pfe-margin 1.0 --lr 5e-4 --lr-milestones 36" ;;
    fmnist_pfe_ibp_6k)    echo "--dataset fmnist --limit-train 6000 --defense pfe --certified ibp --cert-eps 0.1 --pfe-stages 2,2,10 --cert-warmup 1 --cert-ramp 5 --cert-pfe-margin 1.0 --lr 5e-4" ;;
    fmnist_cnn_ibp_6k)    echo "--dataset fmnist --limit-train 6000 --defense none --certified ibp --cert-eps 0.1 --epochs 14 --cert-warmup 5 --cert-ramp 5 --lr 5e-4" ;;
    mnist5k_cnn_crownibp_e120) echo "--dataset mnist5k --defense none --certified crown-ibp --cert-eps 0.4 --epochs 120 --cert-warmup 1 --cert-ramp 40 --lr 5e-4" ;;
    fmnist_cnn_crownibp_6k) echo "--dataset fmnist --limit-train 6000 --defense none --certified crown-ibp --cert-eps 0.1 --epochs 14 --cert-warmup 5 --cert-ramp 5 --lr 5e-4" ;;
    fmnist_pfe_crownibp_6k) echo "--dataset fmnist --limit-train 6000 --defense pfe --certified crown-ibp --cert-eps 0.1 --pfe-stages 2,2,10 --cert-warmup 1 --cert-ramp 5 --cert-pfe-margin 1.0 --lr 5e-4" ;;
    mnist5k_pfe_crownibp_eps03) echo "--dataset mnist5k --defense pfe --certified crown-ibp --cert-eps 0.3 --pfe-c 0.5 --pfe-stages 2,2,40 --cert-warmup 1 --cert-ramp 15 --cert-pfe-margin 1.0 --lr 5e-4 --lr-milestones 36" ;;
    fmnist_pfe_ibp_30k)   echo "--dataset fmnist --limit-train 30000 --defense pfe --certified ibp --cert-eps 0.12 --pfe-c 0.25 --pfe-stages 2,2,26 --cert-warmup 1 --cert-ramp 10 --cert-pfe-margin 1.0 --lr 5e-4 --lr-milestones 24,28" ;;
    *) echo "unknown model $1" >&2; exit 2 ;;
  esac
}
dataset_of() { case "$1" in mnist5k_*) echo mnist5k ;; *) echo fmnist ;; esac; }

train() {
  local name=$1
  if [ -f "$RUNS/$name/final.pt" ]; then echo "$name: trained"; return; fi
  # shellcheck disable=SC2046
  nice -n 10 "$BIN/dcs" train $COMMON $(train_args "$name") --out "$RUNS/$name"
}

package() {
  local name=$1 ds
  ds=$(dataset_of "$name")
  if [ ! -d "$REPO/$name/1" ]; then
    nice -n 10 "$BIN/dcs" export "$RUNS/$name" --repo "$REPO" --name "$name" --version 1
  fi
  mkdir -p "$OUT/configs"
  cp "$RUNS/$name/config.json" "$OUT/configs/train_$name.json"
  cp "$RUNS/$name/metrics.csv" "$OUT/configs/metrics_$name.csv"
  nice -n 10 "$BIN/dcs" evaluate "$REPO/$name/1" --dataset "$ds" --suite "$OUT/configs/suite_$ds.yaml" \
    --limit "${TABLE_D_LIMIT:-500}" --seed 0 --out "$OUT/reports/$name" --no-progress
}

MODELS="mnist5k_cnn_ibp mnist5k_cnn_ibp_long mnist5k_cnn_ibp_e120 mnist5k_cnn_ibp_e200 mnist5k_cnn_crownibp mnist5k_pfe_ibp mnist5k_pfe_ibp_eps03 fmnist_cnn_ibp fmnist_cnn_ibp_30k fmnist_cnn_ibp_30k_e30 fmnist_pfe_ibp fmnist_pfe_ibp_6k fmnist_cnn_ibp_6k mnist5k_cnn_crownibp_e120 fmnist_cnn_crownibp_6k fmnist_pfe_crownibp_6k mnist5k_pfe_crownibp_eps03 fmnist_pfe_ibp_30k"
case "${1:-all}" in
  train) train "$2" ;;
  package) package "$2" ;;
  all) for m in $MODELS; do train "$m"; package "$m"; done
       "$BIN/python" scripts/table_d.py "$OUT" "$RUNS" ;;
  table) "$BIN/python" scripts/table_d.py "$OUT" "$RUNS" ;;
  *) echo "usage: $0 train|package NAME | all | table" >&2; exit 2 ;;
esac
