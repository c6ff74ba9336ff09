#!/usr/bin/env bash
# The CPU tables of docs/speed.md: msmlp_tiny's fast and reference paths against timm models,
# fp32: single images at 224x224 (with and without the CPU mixer kernel; the classifier and the
# backbone), batch 16 at 224x224 (inference and a training step), the backbone at 1x3x800x1333,
# torch.compile and bf16 autocast at batch 16; then the bound that
# the channel MLP alone sets (benchmarks/mixer_bound.py). Every table is measured in one
# process; run it on an otherwise idle machine. About 20 minutes on 2 cores.
#
#   benchmarks/cpu_bench.sh            # tables appended to ${OUT:-.}/cpu_bench.md
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
table="${OUT:-.}/cpu_bench.md"
status=0
bench() { "$python" -m msmlp.benchmark --output "$table" "$@" || status=1; }
{
  echo "# msmlp_tiny on $(hostname), $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
  "$python" -c 'import torch, timm; print("torch", torch.__version__, "| timm", timm.__version__, "| threads", torch.get_num_threads())'
  echo
} >>"$table"
single=(--runs 30 --warmup 5 --steps-per-run 5)
bench --model msmlp_tiny --batch-size 1 --img-size 224 "${single[@]}" --compare convnext_tiny
MSMLP_CPU_KERNEL=0 bench --model msmlp_tiny --batch-size 1 --img-size 224 "${single[@]}" --compare convnext_tiny
bench --model msmlp_tiny --batch-size 1 --img-size 224 --features-only "${single[@]}" --compare convnext_tiny
bench --model msmlp_tiny --batch-size 16 --img-size 224 --compare convnext_tiny swin_tiny
bench --model msmlp_tiny --batch-size 16 --img-size 224 --train --compare convnext_tiny swin_tiny
bench --model msmlp_tiny --batch-size 1 --img-size 800x1333 --features-only --compare convnext_tiny
bench --model msmlp_tiny --batch-size 16 --img-size 224 --compile --compare convnext_tiny
bench --model msmlp_tiny --batch-size 16 --img-size 224 --precision bf16 --compare convnext_tiny
"$python" benchmarks/mixer_bound.py | tee -a "$table" || status=1
echo "tables: $table"
exit $status
