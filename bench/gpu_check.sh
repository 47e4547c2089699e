#!/usr/bin/env bash
# The GPU check run on a lent H100/H200 (see bench/README.md for the numbers it gave):
# installs carried wheels when present, then the capture benchmark and a short ViT-B/16 training
# (bf16, NCCL, fused Adam, SDPA attention) under the DeepSpeed launcher on the synthetic data.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
source "$(dirname "$0")/gpu_setup.sh"
python3 -c "import torch, deepspeed, open_clip, webdataset; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 bench/capture_bench.py --batch 64 --iters 10 2>&1 | tee "$OUT/capture_bench.txt"
timeout 300 python3 -m deepspeed.launcher.runner --num_gpus 1 itself/train.py --preset rstpreid \
  data.root=data/synthetic data.build_synthetic=true model.pretrained= train.batch_size=128 \
  train.epochs=3 train.warmup_epochs=1 train.log_every=2 run_dir=/tmp/gpu_run 2>&1 | tee "$OUT/train.log"
cp /tmp/gpu_run/results.json /tmp/gpu_run/metrics.jsonl "$OUT/" 2>/dev/null
echo done
