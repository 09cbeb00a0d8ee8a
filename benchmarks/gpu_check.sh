#!/usr/bin/env bash
# GPU checks on a CUDA machine without network: install only the wheels placed in the git-ignored .whl/
# folder (if any), install the project itself without dependencies, then run every gpu-marked test and
# the kernel benchmark (Triton vs torch reference vs the reference code's style), then `phanes bench` on
# CUDA for the paper and cpu configs (untrained weights: speed only) with every backend importable here
# (torch under bf16 autocast, ONNX Runtime CUDA, TensorRT fp16 when installed). Tables and JSON go to
# $OUT (or here): kernels_bench.json, bench_<config>.txt and bench_<config>.json.
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

for config in paper cpu; do
    bundle="$(mktemp -d)/bundle-$config"
    "$PY" benchmarks/untrained_bundle.py "configs/$config.yaml" "$bundle" || { status=1; continue; }
    formats=onnx
    "$PY" -c "import tensorrt" 2>/dev/null && formats=all
    "$PY" -m phanes_cli.cli export --bundle "$bundle" --format "$formats" --precision fp16 || status=$?
    "$PY" -m phanes_cli.cli bench --bundle "$bundle" --device cuda --slices 128 --backends torch,onnxruntime,tensorrt \
        | tee "$OUT_DIR/bench_$config.txt" || status=$?
    cp "$bundle/engines/bench.json" "$OUT_DIR/bench_$config.json" 2>/dev/null || true
done
exit "$status"
