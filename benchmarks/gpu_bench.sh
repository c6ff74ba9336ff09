#!/usr/bin/env bash
# The GPU check of the speed issues, as one prepared run for a lent GPU machine, in the order
# of what matters most: first benchmarks/gpu_check.py (the fast, triton and triton_norm paths
# equal the reference there, also under a CUDA graph); then msmlp_tiny (fast, triton, triton_norm
# and reference paths)
# against timm's convnext_tiny, batch 128 at 224x224, bf16 autocast, inference and a training
# step (forward, backward, AdamW), channels_last and NCHW; backbone features at 2x3x800x1333;
# benchmarks/triton_kernels.py (a training step's GPU time by kernel); then fp32 (TF32 off:
# msmlp benchmark's default) and compiled. All within BUDGET seconds (default 540): a step
# that would not fit is skipped, and the table says so. Each table is measured in one process
# by `msmlp benchmark`. On an H200 (2026-12-04) the check took 47 s, an inference table 35 s, a
# training table 77 s and the 800x1333 table 35 s (each step is cut at STEP_TIMEOUT, default
# 150 s: a training table does not fit in 60).
#
# Needs only python3 with torch and timm, as on the device image; nothing is installed and
# the repository is used in place. Tables go to $OUT/gpu_bench.md (./gpu_bench.md without
# $OUT), the log to $OUT/gpu_bench.log. PARTS names the parts to run (default: check kernels
# bf16 features profile bound compile-check fp32 compiled; compile-check is gpu_check.py --compile,
# each path compiled by inductor against the reference; kernels is benchmarks/mixer_kernels.py: the mixer
# fused with its LayerNorm per stage against the mixer then the norm and against ConvNeXt's
# depthwise conv then the norm, and with AGAINST=FILE, another version of msmlp/triton_mix.py,
# the mixer's kernels against that version's; bound
# is benchmarks/mixer_bound.py, msmlp_tiny with its mixer replaced by a copy of its input). QUICK=1 skips the compiled and fp32 tables;
# the compiled tables leave out the reference path (compiled, fast and reference run the same operations).
#
#   benchmarks/gpu_bench.sh                                   # on the GPU machine (LAYOUTS=nchw: skip channels_last)
#   DEVICE=cpu BATCH=2 SIZE=32 RUNS=1 PYTHON=.venv/bin/python benchmarks/gpu_bench.sh  # dry run
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
table="$out_dir/gpu_bench.md"
log="$out_dir/gpu_bench.log"
: >"$table"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
device="${DEVICE:-cuda}"
python="${PYTHON:-python3}"  # the device image's python3 holds torch and timm

{
  echo "# msmlp_tiny vs convnext_tiny on $(hostname), $(date -u +%Y-%m-%dT%H:%MZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c 'import sys, torch, timm; from msmlp import triton_mix as t; print("python", sys.version.split()[0],
"| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", getattr(t.triton, "__version__", None),
"| timm", timm.__version__)'
  echo
} | tee -a "$table"

status=0
started=$SECONDS
budget="${BUDGET:-540}"  # seconds for everything below: steps that would not fit are skipped, and said so
step() {  # step LABEL COMMAND...: run within the step timeout and what is left of the budget
  local label=$1; shift  # TO_TABLE=1: the output goes to the table too
  local left=$((budget - (SECONDS - started)))
  if ((left < ${MIN_STEP:-30})); then
    echo "skipped (budget of ${budget}s spent): $label" | tee -a "$table" "$log"; status=1; return
  fi
  echo "== $label ($((SECONDS - started))s in)" | tee -a "$log"
  timeout "$(( left < ${STEP_TIMEOUT:-150} ? left : ${STEP_TIMEOUT:-150} ))" "$@" 2>&1 |
    tee -a "$log" ${TO_TABLE:+"$table"}
  local rc=${PIPESTATUS[0]}
  ((rc == 124)) && echo "timed out: $label" | tee -a "$table"
  ((rc == 0)) || status=1
}
bench() {  # one table: the fast, triton and reference paths against convnext_tiny
  step "benchmark $*" "$python" -m msmlp.benchmark --device "$device" \
    --model msmlp_tiny --compare convnext_tiny --triton \
    --runs "${RUNS:-10}" --warmup 3 --steps-per-run "${STEPS:-5}" --output "$table" "$@"
}

wanted() { [[ " ${PARTS:-check kernels bf16 features profile bound compile-check fp32 compiled} " == *" $1 "* ]]; }
# in order of what the issue needs most, so that a short budget loses the least
wanted check && TO_TABLE=1 step 'exactness on the GPU' "$python" benchmarks/gpu_check.py --device "$device"
wanted kernels &&  # the fused mixer and norm per stage; AGAINST=FILE: the kernels against another triton_mix.py
  TO_TABLE=1 step 'mixer kernels' "$python" benchmarks/mixer_kernels.py ${AGAINST:+--against "$AGAINST"}
batch="--batch-size ${BATCH:-128} --img-size ${SIZE:-224}"
if wanted bf16; then
  for layout in ${LAYOUTS:-channels-last nchw}; do  # LAYOUTS=nchw: NCHW input only
    [[ $layout == nchw ]] && layout="" || layout="--$layout"
    bench --precision bf16 $batch $layout
    bench --precision bf16 $batch $layout --train
  done
fi
wanted features && bench --precision bf16 --batch-size 2 --img-size "${DET_SIZE:-800x1333}" --features-only --channels-last
[[ $device == cuda ]] && wanted profile &&
  TO_TABLE=1 step 'training step kernels' "$python" benchmarks/triton_kernels.py $batch
wanted bound &&  # msmlp_tiny with its mixer replaced by a copy: what no mixer can pass
  TO_TABLE=1 step 'identity-mixer bound' "$python" benchmarks/mixer_bound.py --device "$device" --precision bf16 \
    $batch --channels-last --no-memory
wanted compile-check &&  # each path compiled by inductor against the reference: outputs and gradients
  TO_TABLE=1 step 'compiled exactness on the GPU' "$python" benchmarks/gpu_check.py --device "$device" --compile
if [[ -z ${QUICK:-} ]]; then  # QUICK=1: skip the fp32 and compiled tables
  if wanted fp32; then
    bench --precision fp32 $batch --channels-last
    bench --precision fp32 $batch --channels-last --train
  fi
  if wanted compiled; then
    bench --precision bf16 $batch --channels-last --compile --no-reference
    bench --precision bf16 $batch --channels-last --compile --no-reference --train
  fi
fi
echo "$((SECONDS - started))s; tables: $table"
exit $status
