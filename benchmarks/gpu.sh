#!/usr/bin/env bash
# GPU benchmark: training slices/s (fp32 vs bf16) and inference seconds per patient.
# usage: bash benchmarks/gpu.sh [--json OUT.json] [--batch 32] [--steps 20]
#   (needs a CUDA GPU and the package importable)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}" python3 "$here/gpu.py" "$@"
