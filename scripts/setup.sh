#!/usr/bin/env bash
# Set up a fresh machine for mixbits: the Fashion-MNIST files (Debian package), a virtualenv with the
# CPU build of torch 2.13.0, and mixbits itself with its test extras. Safe to run again: it only does
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

if [ ! -f "$FMNIST" ]; then
  echo "setup: installing the Debian package dataset-fashion-mnist"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# Pinned: an unpinned torch would pull several GB of CUDA packages; 2.13.0 resolves to the CPU build.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch==2.13.0"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
if ! "$VENV/bin/python" -c "import mixbits, pytest, onnxruntime" 2>/dev/null; then
  echo "setup: installing mixbits with its test extras"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
fi
echo "setup: ready ($VENV)"
