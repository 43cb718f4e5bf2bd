#!/usr/bin/env bash
# Issue 13's GPU measurement in one call of under 10 minutes on one H200, through the gpu-kit (docs/benchmarks.md,
# "GPU"):  bash .whl/on-device.sh bash bench/gpu_check.sh
# Each step is its own process (its "cold" figures hold that process's device warm-up), writes its JSON as it goes
# (to $OUT when the run tool sets it: 8 files, what comes back at most) and is cut at its own time limit without
# losing the others. The most important steps run first.
set -uo pipefail
out=${OUT:-bench/results/gpu}
work=${BENCH_WORK:-/tmp/bench_gpu}
mkdir -p "$out"
b() { # NAME SECONDS ARGS...: one bench process; its lines go to the shared log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s) $*" | tee -a "$out/log.txt"
  # shellcheck disable=SC2086  # BENCH_ARGS=--tiny: the CPU smoke test of this script
  timeout "$limit" python3 bench/bench_gpu.py --work "$work" --out "$out/$name.json" "$@" ${BENCH_ARGS:-} 2>&1 \
    | grep --line-buffered -e "^gen " -e "^train " -e "Error" -e "error:" -e "Traceback" -e "^  File" \
    | tee -a "$out/log.txt"
}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
case ${1:-levers} in
levers) # what train.compile "auto" should weigh at the paper's micro-batch of 1 (h200-2026-11-30-compile measured
  # batch 8: 8B LoRA 32.9% -> 48.2% steady MFU, DPO 28.8 -> 45.3%, ORPO 24.9 -> 40.4%, at a 55-65 s cold compile)
  # 1. 8B LoRA at batch 1 on rows of 128-1,024 tokens, eager then compiled (this step builds the 8B model: on a
  #    fresh machine that took over 100 s)
  b train-8b-batch1 280 --gen-batch '' --train lora:8b:1 --compile off,on --row-tokens 1024 --row-min 128 \
    --steps 40 --warm-steps 10
  # 2. DPO and ORPO (LoRA, 1.24B) at batch 1, the paper's preference micro-batch
  b train-1b-batch1 150 --gen-batch '' --train dpo:1b:1,orpo:1b:1 --compile off,on --row-tokens 1024 \
    --row-min 128 --steps 40 --warm-steps 10
  # 3. evaluation at the defaults again: 8B, 1,900 prompts x 100 new tokens, warm-up included
  b gen-default 90 --gen-model 8b --gen-batch auto --gen-prompts 1900 --new-tokens 100 --train ''
  ;;
*) echo "usage: gpu_check.sh [levers]" >&2; exit 2 ;;
esac
ls -la "$out"
