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
levers) # defaults and levers, one against another
  # 1. evaluation, the goal: 8B, 1,900 prompts x 100 new tokens, warm-up included ("cold"), at the
  #    defaults (batch auto, static cache on a GPU), then the dynamic cache warm
  b gen-default 120 --gen-model 8b --gen-batch auto,auto:dynamic --gen-prompts 1900 --new-tokens 100 --train '' \
    --profile
  # 2. training on the 512-token rows, 1.24B; steady MFU over steps 5-10 of 12 (the last 2 are profiled),
  #    each without and with train.compile (its compile falls in the first steps: first_step_s). Full SFT at
  #    batch 8 and 16 (Liger was measured there in h200-2026-11-30: no gain at 1.24B)
  b train-1b-full 100 --gen-batch '' --train full:1b:8,full:1b:16 --compile off,on --steps 12 --warm-steps 4 \
    --profile
  #    DPO and ORPO (LoRA), host-bound in h200-2026-11-30 (DPO's reference path and ORPO's logits changed since)
  b train-1b-pref 110 --gen-batch '' --train dpo:1b:8,orpo:1b:8 --compile off,on --steps 12 --warm-steps 4 \
    --profile
  # 3. 8B LoRA (all linear layers, r 16), batch 8, no gradient checkpointing, without and with train.compile
  #    (Liger's 35.0% against 28.6% is in h200-2026-11-30; compile fuses peft's float32 casts and dropout, a
  #    third of that profile's GPU time)
  b train-8b 150 --gen-batch '' --train lora:8b:8 --compile off,on --steps 10 --warm-steps 3 --profile
  #    and both levers together (Liger alone is h200-2026-11-30's 35.0%)
  b train-8b-liger 70 --gen-batch '' --train lora:8b:8 --liger on --compile on --steps 10 --warm-steps 3
  # 4. packing on rows of 128-512 tokens: padded against padding-free and packed
  b train-packing 30 --gen-batch '' --train full:1b:8 --packing none,padding_free,bfd --row-min 128 --steps 12 \
    --warm-steps 4
  ;;
*) echo "usage: gpu_check.sh [levers]" >&2; exit 2 ;;
esac
ls -la "$out"
