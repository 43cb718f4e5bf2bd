#!/usr/bin/env bash
# Issue 13's before/after GPU measurement, in about 8 minutes on one H200. Run on the device machine through
# the gpu-kit (see docs/benchmarks.md, "GPU"):  bash .whl/on-device.sh bash bench/gpu_check.sh
# "before" = the defaults (eval batch 128, padded SFT batches); "after" = the levers (eval batch auto,
# padding-free / packed SFT). Each step writes its own JSON as it goes (to $OUT when the run tool sets it), and a
# step that overruns its time limit is cut without losing the others.
set -uo pipefail
out=${OUT:-bench/results}/gpu
work=${BENCH_WORK:-/tmp/bench_gpu}
mkdir -p "$out"
b() { # NAME SECONDS ARGS...: one bench run, its log beside its JSON
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" python3 bench/bench_gpu.py --work "$work" --out "$out/$name.json" "$@" 2>&1 \
    | grep -v -e "Warning" -e "warnings.warn" -e "Loading weights" -e "Writing model" | tee "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee "$out/gpu.txt"
# 1. evaluation: 8B, 512 prompts x 100 new tokens; batch 128 (before) and auto (after), cold and warm
b gen-8b 170 --gen-model 8b --gen-batch 128,auto --gen-prompts 512 --new-tokens 100 --train ''
# 2. training on the 512-token rows: every method on 1.24B, batch 8 (before) and 16 (a lever)
b train-1b-512 110 --gen-batch '' --train full:1b:8,full:1b:16,lora:1b:8,lora:1b:32,dpo:1b:8,orpo:1b:8 --steps 20
# 3. packing on rows of 128-512 tokens: padded (before) against padding-free and packed (after)
b train-1b-mixed 90 --gen-batch '' --train full:1b:8,lora:1b:16 --packing none,padding_free,bfd --row-min 128 --steps 20
# 4. 8B LoRA (last, the longest: if time runs out, the rest is kept)
b train-8b 170 --gen-batch '' --train lora:8b:8 --steps 15
ls -la "$out"
