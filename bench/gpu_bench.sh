#!/usr/bin/env bash
# The performance benchmarks on a lent GPU machine (see BENCHMARKS.md): one training step at
# ViT-B/16 384x128 bf16 batch 256 (baseline, ITSELF, all layers captured, naive loops), and the
# retrieval-metrics benchmark on the GPU and on the machine's CPU cores.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 bench/step_bench.py --gpu 2>&1 | grep -v "No pretrained" | tee "$OUT/step_bench_gpu.txt"
timeout 200 python3 bench/eval_bench.py --device cuda 2>&1 | tee "$OUT/eval_bench_cuda.txt"
timeout 200 python3 bench/eval_bench.py 2>&1 | tee "$OUT/eval_bench_cpu16.txt"
echo done
