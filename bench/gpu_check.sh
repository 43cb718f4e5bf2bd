#!/usr/bin/env bash
# GPU measurements in one call of under 10 minutes on one H200, through the gpu-kit (docs/benchmarks.md, "GPU"):
#   bash .whl/on-device.sh bash bench/gpu_check.sh [levers|batch1|graphs|plan|eval]
# levers: issue 13's levers at batch 1; batch1: issue 24's batch 1, 1 x 4 preference micro-batches and several
# stages per GPU; graphs: batch 1 with the layers replayed as CUDA graphs; plan: issue 24's calibrated plan
# against a sample of study-paper's stages; eval: issue 24's evaluation levers. Each step is its own process (its "cold" figures hold that process's
# device warm-up), writes its JSON as it goes (to $OUT when the run tool sets it: 8 files, what comes back at
# most) and is cut at its own time limit without losing the others.
# The most important steps run first.
set -uo pipefail
out=${OUT:-bench/results/gpu}
work=${BENCH_WORK:-/tmp/bench_gpu}
mkdir -p "$out"
run() { # SCRIPT NAME SECONDS ARGS...: one bench process; its lines go to the shared log
  local script=$1 name=$2 limit=$3; shift 3
  echo "== $name (limit ${limit}s) $script $*" | tee -a "$out/log.txt"
  # shellcheck disable=SC2086  # BENCH_ARGS=--tiny: the CPU smoke test of this script
  timeout "$limit" python3 "bench/$script" --work "$work" --out "$out/$name.json" "$@" ${BENCH_ARGS:-} 2>&1 \
    | grep --line-buffered -e "^gen " -e "^train " -e "^shared" -e "^calibrate " -e "^misalign " -e "^realign " \
      -e "stages priced" -e "Error" -e "error:" -e "Traceback" -e "^  File" \
    | tee -a "$out/log.txt"
}
b() { run bench_gpu.py "$@"; }         # NAME SECONDS ARGS...: bench_gpu.py
s() { run bench_shared_gpu.py "$@"; }  # NAME SECONDS ARGS...: bench_shared_gpu.py (its processes are timeout's too)
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
batch1) # issue 24: the paper trains at batch 1 on rows of up to 1,024 tokens, DPO and ORPO at 1 x 4 accumulated
  # micro-batches; what one 8B stage does so, eager and compiled, and what 1-4 such stages on one GPU do together.
  # Limits: 530 s in all. 1. 8B LoRA SFT at batch 1, eager then compiled (builds the 8B model: ~100 s when fresh)
  b train-8b-batch1 210 --gen-batch '' --train lora:8b:1 --compile off,on --row-tokens 1024 --row-min 128 \
    --steps 40 --warm-steps 10
  # 2. 8B DPO and ORPO (LoRA) at 1 x 4, eager
  b pref-8b-1x4 70 --gen-batch '' --train dpo:8b:1:4,orpo:8b:1:4 --compile off --row-tokens 1024 --row-min 128 \
    --steps 12 --warm-steps 4
  # 3. 1, 2, 3 and 4 stages of 8B LoRA at batch 1 on the GPU at once (MISALIGN_GPU_SHARE=1/N each)
  s shared-8b-batch1 130 --stages 1,2,3,4 --train lora:8b:1 --row-tokens 1024 --row-min 128 --steps 20 \
    --warm-steps 5 --timeout 100
  # 4. the same DPO and ORPO compiled (a cold compile each, ~60 s at batch 8: ORPO's may not fit; then rerun it alone)
  b pref-8b-1x4-compiled 120 --gen-batch '' --train dpo:8b:1:4,orpo:8b:1:4 --compile on --row-tokens 1024 \
    --row-min 128 --steps 12 --warm-steps 4
  ;;
graphs) # issue 24's third column: the compiled layers replayed as CUDA graphs (train.compile graphs) over rows
  # padded to 64-token buckets, against eager and compiled on the same padded rows, at the paper's batch of 1.
  # LoRA dropout 0, so every variant's train_loss must agree (the graphs' correctness check). Limits: 540 s in all.
  # 1. 8B LoRA SFT at batch 1: eager, compiled, graphs (builds the 8B model: ~100 s when fresh)
  b graphs-8b-batch1 300 --gen-batch '' --train lora:8b:1 --compile off,on,graphs --pad-to 64 --dropout 0 \
    --row-tokens 1024 --row-min 128 --steps 40 --warm-steps 10
  # 2. 8B DPO and ORPO at 1 x 4 as graphs (their eager and compiled figures: the batch1 mode)
  b graphs-8b-pref 240 --gen-batch '' --train dpo:8b:1:4,orpo:8b:1:4 --compile graphs --pad-to 64 --dropout 0 \
    --row-tokens 1024 --row-min 128 --steps 12 --warm-steps 4
  ;;
plan) # issue 24: does `study plan` know what study-paper's stages cost? bench_plan.py calibrates each stage shape
  # with a short stage of it, then trains a sample of the paper's own stages whole (8B Llama with random weights,
  # the paper's settings: LoRA SFT at batch 1, DPO and ORPO at 1 x 4, 5 epochs; rows of 128-1,024 tokens) and
  # compares the plan's wall time with theirs. Limits: 560 s in all.
  echo "== build-8b (limit 180s)" | tee -a "$out/log.txt"
  # shellcheck disable=SC2086
  built=$(timeout 180 python3 bench/bench_gpu.py --work "$work" --build-only --train lora:8b:1 --gen-batch '' \
    ${BENCH_ARGS:-} 2>&1 | tee -a "$out/log.txt" | sed -n 's/^built //p' | tail -1)
  [ -n "$built" ] || { echo "error: the 8B model was not built" | tee -a "$out/log.txt"; exit 1; }
  run bench_plan.py plan-8b 380 --config configs/study-paper.yaml --set "models=[$built]" --rows 128-1024 \
    --set 'attack.methods=[lora,dpo,orpo]' --set 'attack.per_category=[1,3]' --set 'defense.methods=[lora]' \
    --set 'defense.per_category=[3]' --max-stages 7
  ;;
eval) # issue 24 part 4: 8B evaluation, 1,900 prompts x 100 new tokens (goal: 22k generated tokens/s warm-up
  # included, the same greedy outputs). The default (auto batches, static cache prefilled by length) first, cold
  # then warm; transformers' own path (dynamic cache, one prefill per batch: what the default gave before); the
  # cache read up to its filled part (bucketed); the norms and MLP compiled (each compile variant's one run holds
  # its compile); each SDPA kernel forced over the bucketed cache. same_outputs: the share of prompts whose
  # greedy output equals the default's. The last variant's decode steps are profiled. Limits: 420 s in all.
  b eval-8b 420 --gen-model 8b --gen-prompts 1900 --new-tokens 100 --train '' --profile --gen-batch \
    auto,auto:dynamic,auto:bucketed,auto:static:1024:compile,auto:bucketed:1024:cudnn,auto:bucketed:1024:efficient,auto:bucketed:1024:math,auto:bucketed:1024:compile
  ;;
*) echo "usage: gpu_check.sh [levers|batch1|graphs|plan|eval]" >&2; exit 2 ;;
esac
ls -la "$out"
