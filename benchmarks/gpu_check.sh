#!/usr/bin/env bash
# The prepared GPU check: per-resolution throughput of every stage (fp32, then bf16 autocast with
# channels_last) and the scaling of N generator actors sharing one GPU. About 3-4 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: runs/gpu-check (or $OUT when set)
#
# Needs this project installed with its dependencies (`pip install -e .`: Ray, pydantic, MLflow, timm)
# and a CUDA build of torch. The teacher is trained on digits first (bundled; seconds on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# One resolution per stage row: 8, 16 and 32 px, 256 images an episode, a 512-image KD batch.
sizes=("resolution.set=[8,16,32]" "synthesis.batch_size=256" "distill.batch_size=512")
fast=("synthesis.precision=bf16" "synthesis.channels_last=true" "distill.precision=bf16" "distill.channels_last=true")
python benchmarks/stages.py --gpu --episodes 4 --kd-steps 100 --json "$out/stages_fp32.json" "${sizes[@]}"
python benchmarks/stages.py --gpu --episodes 4 --kd-steps 100 --stages synthesis,distillation \
    --json "$out/stages_bf16_nhwc.json" "${sizes[@]}" "${fast[@]}"
python benchmarks/actor_scaling.py --gpu --actors 1,2,4,8 --episodes 6 --json "$out/actor_scaling.json" \
    "synthesis.batch_size=256"
echo "results in $out"
