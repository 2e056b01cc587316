#!/usr/bin/env bash
# Every GPU check of the benchmarks (docs/benchmarks.md, "GPU") in one run, on a machine with a GPU:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# It needs only python3 with torch, torchvision and Pillow (no TorchServe, no Java, no .venv). Figures go to
# stdout and to OUT_DIR/gpu-<date>.json (default benchmarks/results/); copy them into docs/benchmarks.md with the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-benchmarks/results}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --output "$out_dir/gpu-$(date +%F).json"
# Fixed work per request in iterations (docs/benchmarks.md, "Fixed work"): a GPU reports progress every 10
# iterations, so 21 a scale give each scale two gaps.
python3 benchmarks/fixed_work.py --device cuda --precisions fp32 bf16 --iterations-per-scale 21 --repeats 5 \
    --output "$out_dir/gpu-fixed-work-$(date +%F).json"
