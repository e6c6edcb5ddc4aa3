#!/usr/bin/env bash
# Install Fashion-MNIST from Debian (dataset-fashion-mnist). Needs root for apt; without it, says how.
set -u
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST: $DIR"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Fashion-MNIST from Debian (apt-get install dataset-fashion-mnist)..."
  if apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
     { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
    echo "Fashion-MNIST: $DIR"
    exit 0
  fi
  echo "warning: apt-get could not install dataset-fashion-mnist" >&2
else
  echo "note: Fashion-MNIST is not installed and this is not root." >&2
  echo "      Install it with: sudo apt-get install dataset-fashion-mnist" >&2
  echo "      or pass --data-dir DIR holding the four IDX .gz files." >&2
fi
exit 1
