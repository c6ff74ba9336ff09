#!/usr/bin/env bash
# Idempotent set-up: creates .venv with torch, Lightning, timm and the OpenMMLab stack
# (mmcv 2.1.0 built from source with its CPU ops, cached outside the repo) and ONNX export
# (onnx, onnxscript, onnxruntime), then installs
# this project in editable mode and builds its CPU mixer kernel. A second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
CACHE=${MSMLP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/msmlp}
MMCV_VERSION=2.1.0
TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import torch, torchvision, lightning, timm, mmengine, mmdet, mmseg, mmcv.ops, onnx, onnxruntime, onnxscript, xdist, msmlp" 2>/dev/null; then
  log "installing torch, Lightning, timm and build tools"
  $PIP install --upgrade pip
  $PIP install $TORCH_SPEC "setuptools>=77,<81" wheel ninja
  $PIP install "lightning>=2.6,<2.7" "torchmetrics>=1.9,<2" "timm>=1.0,<2" \
    "jsonargparse[signatures]>=4.32" tensorboard pytest "pytest-xdist>=3.6,<4" pycocotools ftfy regex \
    "mmengine==0.10.7" "numpy<2.3" opencv-python-headless safetensors onnx onnxruntime onnxscript

  if ! "$VENV/bin/python" -c "import mmcv.ops" 2>/dev/null; then
    torch_tag=$("$VENV/bin/python" -c "import torch; print(torch.__version__.replace('+', '_'))")
    wheel_dir="$CACHE/wheels/torch-$torch_tag${FORCE_CUDA:+-cuda}"
    if ! ls "$wheel_dir"/mmcv-$MMCV_VERSION-*.whl >/dev/null 2>&1; then
      log "building mmcv $MMCV_VERSION with its compiled ops (about 6 minutes on 2 cores; cached in $wheel_dir)"
      build=$(mktemp -d)
      $PIP download --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$build"
      tar -xzf "$build"/mmcv-$MMCV_VERSION.tar.gz -C "$build"
      src="$build/mmcv-$MMCV_VERSION"
      # torch 2.14's headers need C++20; mmcv's setup.py asks for C++17.
      sed -i 's/-std=c++17/-std=c++20/g; s/std=c++14/std=c++20/g' "$src/setup.py"
      # Python's own flags (this pyenv 3.11's CFLAGS) without -g: debug info doubled the build. The
      # header that 63 of the 77 sources open is precompiled with the flags torch's build passes;
      # where they differ gcc ignores it. 6 minutes on 2 cores where these took 37. The variable
      # replaces Python's CFLAGS (setuptools' customize_compiler), so on any Python the header and
      # the sources get these same flags.
      cflags="-Wsign-compare -DNDEBUG -g0 -fwrapv -O3 -Wall"
      includes=$("$VENV/bin/python" -c "import sysconfig, sys; from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths() + [sys.prefix + '/include', sysconfig.get_paths()['include']]))")
      common="$src/mmcv/ops/csrc/common"
      c++ $cflags -fPIC -I"$common" $includes -std=c++20 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_ext \
        -x c++-header -o "$common/pytorch_cpp_helper.hpp.gch" "$common/pytorch_cpp_helper.hpp" || true
      mkdir -p "$wheel_dir"
      (cd "$src" && CFLAGS="$cflags" MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
        "$OLDPWD/$VENV/bin/python" -m pip wheel --no-deps --no-build-isolation -w "$wheel_dir" .)
      rm -rf "$build"
    fi
    $PIP install --no-deps "$wheel_dir"/mmcv-$MMCV_VERSION-*.whl
    $PIP install addict yapf packaging pillow pyyaml
  fi
  $PIP install "mmdet==3.3.0" "mmsegmentation==1.2.2" shapely scipy terminaltables tqdm prettytable
  $PIP install -e . --no-deps
fi
# The fast path's CPU kernel (msmlp/cpu_kernel.py), built once per CPU model into $CACHE/kernels;
# where it cannot be built the fast path runs its PyTorch operations.
MSMLP_CACHE="$CACHE" "$VENV/bin/python" -c "from msmlp import cpu_kernel; cpu_kernel.main()" || true
log "ready: $VENV ($("$VENV/bin/python" -c 'import torch, mmcv; print("torch", torch.__version__, "mmcv", mmcv.__version__)'))"
