#!/usr/bin/env bash
# The performance benchmarks on a lent GPU machine, in one run of about 12 minutes (BENCHMARKS.md
# records every figure with the card's name): the profile of the full ITSELF step; the step at
# ViT-B/16 384x128 bf16 batch 256 (baseline, ITSELF, all layers, naive loops, compiled towers,
# activation checkpointing) with MFU and peak memory; the real training loop against the bare
# step; and the retrieval metrics on the GPU and the machine's CPU cores.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
source "$(dirname "$0")/gpu_setup.sh"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 bench/profile_step.py --gpu --trace "$OUT/step_trace.json" 2>&1 | tee "$OUT/profile_eager.txt"
timeout 200 python3 bench/profile_step.py --gpu --compile 2>&1 | tee "$OUT/profile_compiled.txt"
timeout 300 python3 bench/step_bench.py --gpu --compile --grad-checkpointing 2>&1 | grep -v "No pretrained" \
  | tee "$OUT/step_bench_gpu.txt"
timeout 150 python3 bench/step_bench.py --gpu --loop 2>&1 | tail -3 | tee "$OUT/loop_vs_step_gpu.txt"
timeout 120 python3 bench/eval_bench.py --device cuda 2>&1 | tee "$OUT/eval_bench_cuda.txt"
echo done
