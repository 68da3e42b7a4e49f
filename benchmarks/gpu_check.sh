#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension, run the whole test suite (CUDA cases included) and
# the GPU benchmarks; logs and result files go to $OUT (or benchmarks/results when $OUT is unset).
# Usage: benchmarks/gpu_check.sh ["benchmark command" ...]   (default: every GPU benchmark below)
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
if [ "$#" -eq 0 ]; then
  set -- "benchmarks/bench_dispatch.py --device cuda --repeat 50" \
    "benchmarks/bench_dispatch.py --device cuda --tokens 65536 --dim 1024 --dtype bfloat16 --repeat 30 --tag large" \
    "benchmarks/bench_routing.py --device cuda --routers topk sinkhorn_topk expert_choice sinkhorn_expert_choice soft" \
    "benchmarks/bench_sinkhorn.py --device cuda" \
    "benchmarks/bench_soft_moe.py --device cuda" \
    "benchmarks/bench_expert_mlp.py --device cuda --dtype bfloat16 --dim 768 --hidden 3072 --rows 65536" \
    "benchmarks/bench_moe_layer.py --device cuda --dim 768 --hidden 3072 --tokens 65536 --dtype bfloat16" \
    "benchmarks/bench_teacher_routing.py --device cuda" \
    "benchmarks/bench_whatwhere.py --device cuda" \
    "benchmarks/bench_wwt_model.py --device cuda --batch 64"
fi
for bench in "$@"; do
  echo "== $bench"
  eval "$PYTHON $bench" 2>&1 | tail -25
done
# One archive: the device tool brings back at most eight files.
tar czf "$OUT/gpu_results.tgz" benchmarks/results/*cuda* 2>/dev/null || true
ls "$OUT"
