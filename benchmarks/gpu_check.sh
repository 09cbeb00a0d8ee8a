#!/usr/bin/env bash
# GPU checks on a CUDA machine without network: install only the wheels placed in the git-ignored .whl/
# folder (if any), install the project itself without dependencies, then run every gpu-marked test and
# the kernel benchmark (Triton vs torch reference vs the reference code's style), JSON into $OUT or here.
# Usage: bash benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-.}"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --find-links .whl .whl/*.whl
fi
"$PY" -m pip install --quiet --no-index --no-build-isolation --no-deps -e .
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

status=0
"$PY" -m pytest -q -m gpu -rs tests || status=$?
"$PY" benchmarks/kernels_bench.py --networks --json "$OUT_DIR/kernels_bench.json" || status=$?
exit "$status"
