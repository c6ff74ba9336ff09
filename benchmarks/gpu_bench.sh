#!/usr/bin/env bash
# The GPU check of the speed issues, as one prepared run for a lent GPU machine:
# msmlp_tiny (fast, triton and reference paths) against timm's convnext_tiny, batch 128 at
# 224x224, bf16 autocast, inference and a training step (forward, backward, AdamW), with NCHW
# and with channels_last input; backbone features at 2x3x800x1333; then compiled, and fp32
# (TF32 off: msmlp benchmark's default). Every table is measured in one process by `msmlp benchmark`;
# first, benchmarks/gpu_check.py checks that the fast and triton paths equal the reference there,
# and benchmarks/triton_kernels.py splits a training step's GPU time by kernel.
#
# Needs only python3 with torch and timm, as on the device image; nothing is installed and
# the repository is used in place. Tables go to $OUT/gpu_bench.md (./gpu_bench.md without
# $OUT), the log to $OUT/gpu_bench.log. QUICK=1 skips the compiled and fp32 tables.
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
  "$python" -c 'import sys, torch, timm; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| timm", timm.__version__)'
  echo
} | tee -a "$table"

status=0
"$python" benchmarks/gpu_check.py --device "$device" 2>&1 | tee -a "$table" "$log" || status=1
echo | tee -a "$table"
[[ $device == cuda ]] && { timeout "${STEP_TIMEOUT:-150}" "$python" benchmarks/triton_kernels.py \
  --batch-size "${BATCH:-128}" --img-size "${SIZE:-224}" 2>&1 | tee -a "$table" "$log" || status=1; echo | tee -a "$table"; }
bench() {  # one table: the fast, triton and reference paths against convnext_tiny
  echo "== $*" | tee -a "$log"
  timeout "${STEP_TIMEOUT:-150}" "$python" -m msmlp.benchmark --device "$device" \
    --model msmlp_tiny --compare convnext_tiny --triton \
    --runs "${RUNS:-10}" --warmup 3 --steps-per-run "${STEPS:-5}" --output "$table" "$@" 2>&1 | tee -a "$log" || status=1
}
batch="--batch-size ${BATCH:-128} --img-size ${SIZE:-224}"
for layout in ${LAYOUTS:-nchw channels-last}; do  # LAYOUTS=nchw: NCHW input only
  [[ $layout == nchw ]] && layout="" || layout="--$layout"
  bench --precision bf16 $batch $layout
  bench --precision bf16 $batch $layout --train
done
bench --precision bf16 --batch-size 2 --img-size "${DET_SIZE:-800x1333}" --features-only
if [[ -z ${QUICK:-} ]]; then  # QUICK=1: skip the compiled and fp32 tables
  bench --precision bf16 $batch --compile
  bench --precision bf16 $batch --compile --train
  bench --precision fp32 $batch
  bench --precision fp32 $batch --train
fi
echo "tables: $table"
exit $status
