#!/usr/bin/env bash
# One run on a lent GPU (an H200 for issue #16), everything written under $OUT:
#   1. the CUDA tests: default path selection, compiled kernels vs the reference loop
#      (compensated bfloat16/float16 θ and int8 moments too), torch.cuda.set_sync_debug_mode
#      ("error") around step(), CUDA-graph capture + replay, the benchmark smoke test;
#   2. the interpreter tests, as CI runs them (a separate process: Triton decides at import
#      whether a kernel is interpreted);
#   3. `decoupled bench --device cuda` on the three layouts (the README's GPU table), with
#      rows for int8 moments and compensated bfloat16 θ ("int8", "bf16 θ+r", "bf16 θ+r int8":
#      16, 16 and 12 bytes moved per parameter, against 28 for float32 state).
# Usage, from the repository root: OUT=/some/dir bash benchmarks/gpu_check.sh (at most 10
# minutes: 240 s of CUDA tests, 120 s of interpreter tests, 240 s of benchmark)
# Without a virtual environment, it makes one with the dev and triton extras.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, triton, pytest" 2>/dev/null; then
    # (needs the network; a machine without it must bring torch, triton and pytest)
    "$PY" -m venv --system-site-packages .venv-gpu && . .venv-gpu/bin/activate && PY=python
    pip install -q -e ".[dev,triton]" >"$OUT/pip.log" 2>&1
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/device.txt" 2>&1

timeout 240 "$PY" -m pytest tests/optim/test_cuda.py -p no:cacheprovider -q -rs --durations=10 \
    >"$OUT/test_cuda.txt" 2>&1
echo "test_cuda exit $?" >>"$OUT/summary.txt"

if "$PY" -c "import hypothesis" 2>/dev/null; then
    TRITON_INTERPRET=1 timeout 120 "$PY" -m pytest tests/optim/test_triton.py \
        tests/optim/test_triton_compact.py -p no:cacheprovider -q >"$OUT/test_triton.txt" 2>&1
    echo "test_triton exit $?" >>"$OUT/summary.txt"
else
    echo "test_triton skipped: hypothesis is not installed" >>"$OUT/summary.txt"
fi

timeout 240 "$PY" -m decoupled bench --device cuda --steps 20 --rounds 5 >"$OUT/bench.txt" 2>&1
echo "bench exit $?" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
