#!/usr/bin/env bash
# The GPU check, ready to run on a CUDA machine in under 10 minutes (book/performance.md, "On a GPU"):
#   1. the tests that need CUDA (tests/test_cuda.py: mixed precision, fp16 resume, the cache on the GPU, resident
#      data there) and the fast path's exactness tests, on the GPU (TF32 off, deterministic kernels: tests/conftest.py);
#   2. benchmarks/gpu_check.py: CIFAR-10 at 32 px with the GPU settings (resident data, bf16, channels_last), images
#      per second per stage of the sequential fast path and of teacher-forced stages, the projected time of the
#      `paper` profile's CIFAR-10 part, written as JSON to $OUT/gpu_check.json.
# CIFAR-10 comes from data/cifar10, or from data/cifar10-jpeg.tar.gz extracted there (data/README.md).
# On a machine without CUDA the tests skip and the benchmark runs on the CPU: use --small there (the tests do).
# Arguments go to benchmarks/gpu_check.py, e.g.: bash benchmarks/gpu_check.sh --small --dataset digits --size 16
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/runs/gpu_check}
mkdir -p "$OUT"
if [ ! -d data/cifar10/train ] && [ -f data/cifar10-jpeg.tar.gz ]; then tar -xzf data/cifar10-jpeg.tar.gz -C data; fi
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), 'bf16:', torch.cuda.is_bf16_supported())"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fastpath.py tests/test_forced.py 2>&1 \
    | tee "$OUT/tests.log" | tail -n 15
else
  echo "no CUDA GPU here: the tests that need one skip; the benchmark runs on the CPU"
fi
"$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
