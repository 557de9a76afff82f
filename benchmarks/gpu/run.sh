#!/usr/bin/env bash
# zo-opt on one NVIDIA GPU, no network: install from this checkout, run the GPU tests, time
# the passes and steps, write one markdown table. Under 8 minutes: each phase has a timeout.
#
#   benchmarks/gpu/run.sh [OUT_DIR] [driver args...]   # OUT_DIR default: $OUT, else benchmarks/results
#   BUDGET_S=60 benchmarks/gpu/run.sh "$OUT" --sizes 124M  # a shorter first look
#   BUDGET_S=200 benchmarks/gpu/run.sh "$OUT" --sweep-s 60  # first, up to 60 s of the budget:
#                                   # the Triton kernels at each tiling of driver.PLAIN_SWEEP
#                                   # and EXACT_SWEEP
#   PYTEST_ARGS="-k 'not every_uniform'" benchmarks/gpu/run.sh ...   # a narrower test run
#
# Expects python3 with a CUDA torch, triton, pytest and pytest-benchmark already installed
# (PYTHON=... to pick another interpreter). Leaves the card's settings alone.
set -u
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-benchmarks/results}}
shift $(($# > 0 ? 1 : 0))
BUDGET_S=${BUDGET_S:-130}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$SECONDS
say() { echo "[run.sh +$((SECONDS - T0))s] $*"; }

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT_DIR/nvidia-smi.csv"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name())"

say "install (builds the C++/CUDA kernels for this card)"
MAX_JOBS=${MAX_JOBS:-16} timeout 180 $PY -m pip install --no-build-isolation --no-deps \
  --no-cache-dir -q . >"$OUT_DIR/install.log" 2>&1
rc=$?; tail -5 "$OUT_DIR/install.log"; say "install exit $rc"
if ! $PY -c "import zo_opt" 2>/dev/null; then  # a failed build: run from the sources
  say "zo_opt not importable after install; using the checkout (kernels built on first use)"
  export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import zo_opt; print('backends', zo_opt.available_backends(), zo_opt.unavailable_backends())"

say "pytest -m gpu tests"
eval "timeout 180 $PY -m pytest -m gpu tests -q -rs -p no:cacheprovider --durations=8 ${PYTEST_ARGS:-}" \
  >"$OUT_DIR/pytest-gpu.log" 2>&1
rc=$?; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/pytest-gpu.log" | tail -25; say "pytest exit $rc"

say "the Triton kernels' interpreter tests, compiled on the GPU (the same element-by-element checks)"
# Not the sm_90 compile reports (compile_reports: a minute or more of ptxas, and the same on
# any machine, so CI runs them) nor the every-uniform test (the gpu phase ran it).
eval "timeout 150 $PY -m pytest tests/test_triton_backend.py tests/test_exact_triton.py \
  tests/test_exact_table.py -m 'not gpu' -q -p no:cacheprovider \
  -k 'not every_uniform and not compile and not philox_call_twice'" \
  >"$OUT_DIR/pytest-kernels-compiled.log" 2>&1
rc=$?; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/pytest-kernels-compiled.log" | tail -15
say "pytest exit $rc"

say "benchmarks"
timeout $((BUDGET_S + 30)) $PY benchmarks/gpu/driver.py --out "$OUT_DIR" --budget-s "$BUDGET_S" "$@"
rc=$?; say "driver exit $rc; files in $OUT_DIR:"; ls -l "$OUT_DIR"
exit $rc
