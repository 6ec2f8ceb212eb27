#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU: build the extension with the CUDA kernels, run the
# CUDA tests for every activation (GPU parity/opcheck/gradcheck/special values/compile/graphs,
# static resource checks, host harness) and benchmark the CUDA backend against eager PyTorch
# (cuBLAS).
#
#   scripts/gpu_check.sh            # build + tests + benchmark
#   SKIP_BUILD=1 scripts/gpu_check.sh
#   PY=python3 scripts/gpu_check.sh # another interpreter (default: .venv/bin/python, else python3)
#   BENCH_ACTIVATIONS=relu,gelu scripts/gpu_check.sh   # fewer activations in the benchmark
#
# The benchmark is the project's CLI on the GPU (cuda and triton backends, every dtype, every
# activation of fb.ACTIVATIONS, forward, backward and forward+backward, with and without
# recompute): it prints the tables and writes benchmarks/results/cuda/ (bench.csv, bench.json,
# PNGs); the log of each step goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FUSED_BACKPROP_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The GPU's own architecture (plus the two the project targets), unless given.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null || true)
  TORCH_CUDA_ARCH_LIST="8.0;9.0"
  case "$cap" in ""|8.0|9.0) ;; *) TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST;$cap" ;; esac
  export TORCH_CUDA_ARCH_LIST
fi
# tests/conftest.py defaults Triton to its CPU interpreter; on a GPU run real kernels.
export TRITON_INTERPRET=${TRITON_INTERPRET:-0}

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name())'

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  start=$(date +%s)
  "$PY" -m pip install -q --no-build-isolation -e .
  echo "build: $(( $(date +%s) - start )) s"
fi
"$PY" -c 'import fused_backprop as fb, torch; b = fb.available_backends(torch.device("cuda")); print("cuda backends:", b); assert "cuda" in b'

echo "== tests"
"$PY" -m pytest -q -rs tests/test_cuda_gpu.py tests/test_cuda_static.py tests/test_cuda_harness.py

echo "== benchmark"
BENCH_ACTIVATIONS=${BENCH_ACTIVATIONS:-$("$PY" -c 'import fused_backprop as fb; print(",".join(fb.ACTIVATIONS))')}
"$PY" -m fused_backprop.bench --device cuda --dtypes float32,float16,bfloat16,float64 --modes all \
  --activations "$BENCH_ACTIVATIONS" --recompute both --out benchmarks/results/cuda "$@"
