#!/usr/bin/env bash
# One prepared run of every throughput benchmark of issue #14 (a few minutes on an H100/H200):
#   bash experiments/gpu_benchmarks.sh [--data_dir=~/tensorflow_datasets]   (or --smoke on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
out="experiments/results/gpu_$(date -u +%Y-%m-%d).json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
python -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
python experiments/gpu_benchmarks.py --out="$out" "$@"
echo "results: $out"
