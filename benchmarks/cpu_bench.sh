#!/usr/bin/env bash
# The CPU tables of the README's Speed section (issue 5, point 3): msmlp_tiny's fast and
# reference paths against timm models, fp32 batch 16 at 224x224 (inference and a training
# step), the backbone at 1x3x800x1333, torch.compile and bf16 autocast; then the bound that
# the channel MLP alone sets (benchmarks/mixer_bound.py). Every table is measured in one
# process; run it on an otherwise idle machine. About 15 minutes on 2 cores.
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
bench --model msmlp_tiny --batch-size 16 --img-size 224 --compare convnext_tiny swin_tiny
bench --model msmlp_tiny --batch-size 16 --img-size 224 --train --compare convnext_tiny swin_tiny
bench --model msmlp_tiny --batch-size 1 --img-size 800x1333 --features-only --compare convnext_tiny
bench --model msmlp_tiny --batch-size 16 --img-size 224 --compile --compare convnext_tiny
bench --model msmlp_tiny --batch-size 16 --img-size 224 --precision bf16 --compare convnext_tiny
"$python" benchmarks/mixer_bound.py | tee -a "$table" || status=1
echo "tables: $table"
exit $status
