#!/usr/bin/env bash
# GPU check: on a CUDA machine holding nothing but this repo, build the extension, run the GPU tests and the
# kernel benchmarks, and print one table. A few minutes on an H100/H200.
#
#   bash bench/gpu_check.sh [OUTDIR]        # default OUTDIR: $OUT, else bench/results/gpu_check
#
# Optional wheels in .whl/ (PyAV for the tests that decode video, liger-kernel and cut-cross-entropy as
# benchmark peers) are installed to /tmp/site first. Every stage has its own time limit and log, so one
# failure never loses the other numbers. Copy the table, with card, versions and date, into bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-bench/results/gpu_check}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
stage() { echo "[$(date +%T)] $*" | tee -a "$OUTDIR/stages.txt"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

stage "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
  $PY -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null || true; date -u +%FT%TZ; } > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

stage "build the extension (CUDA kernel for sm_90 only, to keep the build short)"
STRIVE_CUDA_ARCHS=${STRIVE_CUDA_ARCHS:-90} MAX_JOBS=16 timeout 300 \
  $PY -m pip install -q --no-build-isolation --no-deps --no-cache-dir -e . > "$OUTDIR/build.log" 2>&1 \
  && echo "build ok" || { echo "BUILD FAILED (tail follows)"; tail -30 "$OUTDIR/build.log"; }
$PY -c "import torch, strive_kernels._C; print('native CUDA op registered:', torch._C._dispatch_has_kernel_for_dispatch_key('strive::variant_patchify', 'CUDA'))" 2>&1 | tail -1

run_bench() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  stage "bench $name"
  timeout "$limit" $PY "bench/$name.py" "$@" > "$OUTDIR/$name.log" 2>&1 || echo "  $name exited with $? (see $name.log)"
  tail -1 "$OUTDIR/$name.log" > "$OUTDIR/$name.json"
}
run_bench bench_logprob 240 --quick
run_bench bench_variant_patchify 120 --quick
run_bench bench_keyframe 90 --quick --sweep
run_bench bench_advantage 90 --quick --sweep

stage "GPU tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests > "$OUTDIR/tests_gpu.log" 2>&1
echo "gpu-marked tests: $(tail -1 "$OUTDIR/tests_gpu.log")"
timeout 240 $PY -m pytest -q -p no:cacheprovider -x tests/kernels/test_logprob.py tests/kernels/test_keyframe.py \
  tests/kernels/test_advantage.py tests/kernels/test_variant_patchify.py > "$OUTDIR/tests_kernels.log" 2>&1
echo "kernel tests compiled on the GPU: $(tail -1 "$OUTDIR/tests_kernels.log")"

stage "table"
$PY bench/gpu_table.py "$OUTDIR" | tee "$OUTDIR/table.md"
