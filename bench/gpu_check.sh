#!/usr/bin/env bash
# The kit's GPU checks in one go (issue 32), for a GPU machine with the kit importable (PYTHONPATH or `pip install -e .`):
#   1. bench/gpu_train.py: the kit's trainer against the train_controlnet.py-style loop, SD 1.5-shaped base, 512 px,
#      batch 8 and 32, bf16; then batch 8 again with gradient checkpointing (peak memory with and without it);
#   2. tests/test_sd_scale.py's real path at 512 px with --mixed_precision=bf16 --gradient_checkpointing=true (train,
#      resume, load with the stock ControlNetModel, generate from two units, validate).
# Every stage runs whatever the one before did; tables, JSON and logs go to the folder given (default: reports/gpu).
#   bash bench/gpu_check.sh [OUT_DIR]
OUT_DIR=${1:-reports/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
$PY -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" \
  | tee -a "$OUT_DIR/gpu.txt"
BASE=$(mktemp -d)/sd15
start=$SECONDS
$PY -m cnkit sd15 --out "$BASE" --seed 0 2>&1 | tail -2
echo "SD 1.5-shaped base saved in $((SECONDS - start)) s"
timeout 200 $PY bench/gpu_train.py --base-dir "$BASE" --json "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.txt"
timeout 110 $PY bench/gpu_train.py --base-dir "$BASE" --batches 8 --gradient-checkpointing \
  --json "$OUT_DIR/bench_checkpointing.json" 2>&1 | tee "$OUT_DIR/bench_checkpointing.txt"
CNKIT_SD_SCALE_RESOLUTION=512 CNKIT_SD_SCALE_BASE="$BASE" \
CNKIT_SD_SCALE_TRAIN_ARGS="--mixed_precision=bf16 --gradient_checkpointing=true" \
  timeout 200 $PY -m pytest -q -s -p no:cacheprovider tests/test_sd_scale.py 2>&1 | tail -40 | tee "$OUT_DIR/sd_scale.txt"
cp reports/test-artifacts/sd_scale.json "$OUT_DIR/" 2>/dev/null
rm -rf "$(dirname "$BASE")"
