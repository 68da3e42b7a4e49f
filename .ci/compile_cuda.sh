#!/usr/bin/env bash
# Compiles every CUDA source with nvcc against the installed torch's headers (compile only, no GPU needed), so
# CUDA code cannot rot unseen on machines without a GPU. Usage: .ci/compile_cuda.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-.venv/bin/python}"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ ! -x "$NVCC" ]; then
  echo "compile_cuda: nvcc not found; install the CUDA toolkit (Debian: nvidia-cuda-toolkit) or set NVCC" >&2
  exit 1
fi
TORCH_INCLUDE="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')"
ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
ARCH="${VISIONMOE_CUDA_ARCH:-sm_90}"
# The C++ standard torch was built with (recorded in its CMake config), as the real build uses.
STD="$(sed -n 's/^ *CXX_STANDARD \([0-9]*\).*/\1/p' "$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')/Torch/TorchConfig.cmake" | head -1)"
STD="${STD:-17}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# A CPU build of torch ships c10/cuda's headers but not the one its CMake generates for CUDA builds; supply it
# (its whole content in a shared-library build of torch is this one definition).
TORCH_ROOT="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
if [ ! -f "$TORCH_ROOT/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$out/include/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/include/c10/cuda/impl/cuda_cmake_macros.h"
  TORCH_INCLUDE="-I$out/include $TORCH_INCLUDE"
fi
# cub (CUDA's CCCL) ships with the toolkit; where a toolkit lacks it, take it from PyPI.
if ! echo '#include <cub/block/block_scan.cuh>' | "$NVCC" -E -x cu - -o /dev/null 2>/dev/null; then
  "$PYTHON" -m pip install -q --target "$out/cccl" "nvidia-cuda-cccl==13.0.*"
  TORCH_INCLUDE="-I$(dirname "$(find "$out/cccl" -path '*/cub/cub.cuh' | head -1)")/.. $TORCH_INCLUDE"
fi
status=0
count=0
for source in $(find csrc -name '*.cu' | sort); do
  count=$((count + 1))
  echo "nvcc -c $source (arch $ARCH, c++$STD)"
  # shellcheck disable=SC2086
  if ! "$NVCC" -c "$source" -o "$out/$(basename "$source").o" -std=c++$STD -arch="$ARCH" -O2 \
      --expt-relaxed-constexpr -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
      -DVISIONMOE_WITH_CUDA -Icsrc $TORCH_INCLUDE; then
    status=1
  fi
done
# Host files compile their CUDA branches only in CUDA builds: check those branches too (syntax and types).
PY_INCLUDE="$("$PYTHON" -c 'import sysconfig, pybind11; print("-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"])')"
for source in $(grep -rl VISIONMOE_WITH_CUDA csrc --include='*.cpp' | sort); do
  echo "c++ -fsyntax-only -DVISIONMOE_WITH_CUDA $source"
  # shellcheck disable=SC2086
  if ! "${CXX:-c++}" -fsyntax-only "$source" -std=c++$STD -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DVISIONMOE_WITH_CUDA \
      -DVISIONMOE_TORCH_VERSION='"check"' -DVISIONMOE_COMPILER='"check"' -DVISIONMOE_CUDA_VERSION='"check"' \
      -DVISIONMOE_CUDA_ARCHS='"check"' -Icsrc $PY_INCLUDE $TORCH_INCLUDE -w; then
    status=1
  fi
done
if [ "$count" -eq 0 ]; then
  echo "compile_cuda: no .cu files found under csrc/" >&2
  exit 1
fi
echo "compile_cuda: $count CUDA source(s) compiled, status $status"
exit $status
