#!/usr/bin/env bash
# The prepared GPU check of the packed mixed-precision kernel: correctness on the device, the routed-experts
# matmul of a DeepSeek-V2-Lite-sized layer vs torch's grouped matmul, decode tokens/s packed vs dense bf16.
# Writes benchmarks/results/kernel.md. Needs one CUDA GPU with torch, triton, transformers and this project;
# downloads nothing. Budget: < 8 minutes (each step has its own timeout; the whole run stops at 470 s).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --smoke    # CPU, Triton interpreter, tiny shapes: writes kernel_smoke.md
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), GPU_CHECK_OUT (raw JSON + log;
# default a fresh temp dir). Exit status: 0 when every step passed, 1 otherwise (the report says which).
set -uo pipefail

cd "$(dirname "$0")/.."
SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then SMOKE="--smoke"; fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing to download, and nothing may be
START=$(date +%s)
TOTAL=470
if [[ -n "$SMOKE" ]]; then TOTAL=3000; fi   # the interpreter on a loaded CPU is slow

say() { echo "[gpu_check.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
say "python: $PYTHON; output: $OUT; smoke: ${SMOKE:-no}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv \
  2>&1 | tee -a "$LOG"

FAILED=()
run_step() {  # run_step NAME SECONDS
  local name=$1 limit=$2 left
  left=$(( TOTAL - ($(date +%s) - START) - 15 ))   # keep 15 s for the report
  if (( left < 20 )); then say "step $name SKIPPED: the run's time budget is spent"; FAILED+=("$name (no time left)"); return; fi
  if [[ -n "$SMOKE" ]]; then limit=$(( limit * 6 )); fi
  (( limit > left )) && limit=$left
  say "step $name: starting (timeout ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$PYTHON" benchmarks/gpu_check.py "$name" --out "$OUT" $SMOKE \
    2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if (( rc == 124 || rc == 137 )); then say "step $name TIMED OUT after ${limit}s"; FAILED+=("$name (timeout)")
  elif (( rc != 0 )); then say "step $name FAILED (exit $rc)"; FAILED+=("$name")
  else say "step $name: ok"; fi
}

run_step env 60
if [[ " ${FAILED[*]:-} " == *" env "* ]]; then
  say "the environment check failed: no point in timing anything (see above)"
else
  run_step correct 150
  run_step layer 130
  run_step decode 140
fi
"$PYTHON" benchmarks/gpu_check.py report --out "$OUT" $SMOKE 2>&1 | tee -a "$LOG"
if (( ${#FAILED[@]} )); then
  say "FAILED steps: ${FAILED[*]} -- the report above marks them; raw JSON and log in $OUT"
  exit 1
fi
say "all steps passed in $(( $(date +%s) - START ))s; raw JSON and log in $OUT"
