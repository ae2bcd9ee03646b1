#!/usr/bin/env bash
# Compile the extension's CUDA build on a machine without a GPU or a CUDA toolkit, to objects
# only: every source setup.py compiles when it builds with CUDA (the same .cpp files with
# PEFTKERN_WITH_CUDA defined, and CUDA's headers on the path). It catches what would otherwise
# cost the first minutes of a GPU machine: a CUDA-only header, a missing include, a syntax error
# behind the macro. It does not link (libtorch_cuda and libc10_cuda ship only in CUDA wheels of
# torch) and runs nothing. Needs network once, for NVIDIA's runtime wheel (headers) from PyPI.
#
#   csrc/check_cuda_compile.sh            # CUDA tools under ${CUDA_WHEELS:-/tmp/peftkern-cuda}
#   FILES="csrc/autograd/dora_node.cpp" csrc/check_cuda_compile.sh   # only these sources
#
# A CPU wheel of torch lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h; a stub
# with the CUDA wheel's one definition stands in for it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${CUDA_WHEELS:-/tmp/peftkern-cuda}
if [ ! -d "$WHEELS/nvidia/cu13/include" ]; then
  $PY -m pip install -q --target "$WHEELS" nvidia-cuda-runtime
fi
CUDA=$WHEELS/nvidia/cu13
TORCH=$($PY -c 'import os, torch; print(os.path.dirname(torch.__file__))')
PYINC=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
STUB=$(mktemp -d)
OBJ=$(mktemp -d)
trap 'rm -rf "$STUB" "$OBJ"' EXIT
mkdir -p "$STUB/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
INC=(-I"$STUB" -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" -I"$CUDA/include" -I"$PYINC")
DEF=(-DPEFTKERN_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -std=c++20)  # the standard cpp_extension uses for torch 2.13
failed=0
for f in ${FILES:-csrc/*.cpp csrc/cpu/*.cpp csrc/autograd/*.cpp}; do
  if g++ -c "$f" -o "$OBJ/$(basename "$f").o" "${INC[@]}" "${DEF[@]}" -O1 -fPIC -fopenmp; then
    echo "ok      $f (g++, PEFTKERN_WITH_CUDA)"; else echo "FAILED  $f"; failed=1; fi
done
exit $failed
