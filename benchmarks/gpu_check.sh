#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension, run the whole test suite (CUDA cases included) and
# the GPU benchmarks; logs and result files go to $OUT (or benchmarks/results when $OUT is unset).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# The GPU image's default g++ (/opt/gcc) links libstdc++ statically into shared objects, and formatting an
# error message with that private copy crashes inside torch's process; the system g++ links it dynamically.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
rm -rf build
start=$(date +%s)
VISIONMOE_CUDA_ARCHS="${VISIONMOE_CUDA_ARCHS:-90}" CMAKE_BUILD_PARALLEL_LEVEL=16 \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/gpu_build.log" 2>&1 \
  || { tail -60 "$OUT/gpu_build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
"$PYTHON" -c "import visionmoe; print(visionmoe.build_info())"
ldd "$("$PYTHON" -c 'import visionmoe; print(visionmoe._C.__file__)')" | grep -E "stdc|torch_cpu" || echo "libstdc++ not linked dynamically"
"$PYTHON" -m pytest -p no:cacheprovider -q -ra tests ${PYTEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
echo "tests exit $?: $(tail -1 "$OUT/gpu_tests.log")"
grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | head -20
for bench in "$@"; do
  echo "== $bench"
  eval "$PYTHON $bench" 2>&1 | tail -25
done
cp benchmarks/results/*cuda* "$OUT/" 2>/dev/null || true
ls "$OUT"
