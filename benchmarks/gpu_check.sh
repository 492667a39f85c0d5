#!/usr/bin/env bash
# GPU check of the compiled bf16 inner loop (benchmarks/gpu_check.py): pairs/s at the ViT-B/32 and
# ViT-B/16 geometries, batch 64 and 256, operator calls and launches per step, peak memory per pair,
# the fraction of the device's measured bf16 matmul peak, and the agreement with fp32 maps.
# Sized to finish in under 8 minutes on one H100-class GPU; stopped after 15. Arguments are passed on,
# e.g. `bash benchmarks/gpu_check.sh --geometries 32 --batches 256`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 900 python benchmarks/gpu_check.py "$@"
