#!/usr/bin/env bash
# GPU check: on a CUDA machine holding nothing but this repo, build the extension, run the GPU tests and the
# kernel benchmarks, and print one table. A few minutes on an H100/H200.
#
#   bash bench/gpu_check.sh [OUTDIR]        # logs and JSON in OUTDIR (default /tmp/gpu_check); with $OUT set
#                                           # (the device tool) they are packed into $OUT/gpu_check.tgz
#   GPU_CHECK_ONLY="logprob keyframe" bash bench/gpu_check.sh    # only these stages (plus build and table):
#       logprob memtrace keyframe advantage variant tests throughput; default all, in that order
#   GPU_CHECK_BUDGET_S=570                  # whole-script wall-clock budget (default 540)
#
# Optional wheels in .whl/ (PyAV for the tests that decode video, liger-kernel and cut-cross-entropy as
# benchmark peers) are installed to /tmp/site first. Every stage has its own time limit and log, so one
# failure never loses the other numbers. Copy the table, with card, versions and date, into bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check.tgz" -C "$OUTDIR" . && cp "$OUTDIR/table.md" "$OUT/" 2>/dev/null; true; }
trap pack EXIT
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
BUDGET=${GPU_CHECK_BUDGET_S:-540}   # whole-script wall-clock budget; later stages shrink to fit
ONLY=${GPU_CHECK_ONLY:-all}
want() { [ "$ONLY" = all ] || [[ " $ONLY " == *" $1 "* ]]; }
START=$SECONDS
stage() { echo "[$(date +%T) +$((SECONDS - START))s] $*" | tee -a "$OUTDIR/stages.txt"; }
limit() {  # limit WANTED -> min(WANTED, time left - 15 s), at least 1
  local left=$((BUDGET - (SECONDS - START) - 15)); [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

stage "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
  $PY -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null || true; date -u +%FT%TZ; } > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

if ! { want variant || want tests || want throughput; }; then
  # Triton-only stages: import the packages from the tree (no C++ build: saves up to 4 minutes)
  mkdir -p /tmp/strive_path && ln -sfn "$PWD/kernels" /tmp/strive_path/strive_kernels
  export PYTHONPATH=/tmp/strive_path:$PWD:${PYTHONPATH:-}
  stage "extension build skipped (GPU_CHECK_ONLY=$ONLY)"
else
stage "build the extension (CUDA kernel for sm_90 only, to keep the build short)"
# Build with the compiler whose libstdc++ the Python process loads. A newer GCC's headers against an older
# libstdc++.so crash in iostream code inside the extension (seen: /opt/gcc g++ on the CUDA image segfaulted
# in std::ostream::_M_insert<long> while formatting an error message); the system g++ matches it.
if [ -z "${CXX:-}" ] || [ "${STRIVE_SYSTEM_CXX:-1}" = 1 ]; then
  for c in /usr/bin/g++ /usr/bin/c++; do [ -x "$c" ] && { export CXX=$c CUDAHOSTCXX=$c; break; }; done
fi
echo "C++ compiler: ${CXX:-default} ($(${CXX:-c++} --version | head -1))"
STRIVE_CUDA_ARCHS=${STRIVE_CUDA_ARCHS:-90} MAX_JOBS=16 timeout "$(limit 240)" \
  $PY -m pip install -q --no-build-isolation --no-deps --no-cache-dir -e . > "$OUTDIR/build.log" 2>&1 \
  && echo "build ok" || { echo "CUDA BUILD FAILED (tail follows); building the CPU kernel only"; tail -30 "$OUTDIR/build.log";
    STRIVE_WITH_CUDA=0 MAX_JOBS=16 timeout "$(limit 120)" $PY -m pip install -q --no-build-isolation --no-deps \
      --no-cache-dir -e . > "$OUTDIR/build_cpu.log" 2>&1 || echo "CPU build failed too"; }
$PY -c "import torch, strive_kernels._C; print('native CUDA op registered:', torch._C._dispatch_has_kernel_for_dispatch_key('strive::variant_patchify', 'CUDA'))" 2>&1 | tail -1
fi

run_bench() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  stage "bench $name"
  timeout "$(limit "$limit")" $PY "bench/$name.py" "$@" > "$OUTDIR/$name.log" 2>&1 || echo "  $name exited with $? (see $name.log)"
  tail -1 "$OUTDIR/$name.log" > "$OUTDIR/$name.json"
}
want logprob && run_bench bench_logprob 150 --quick
# Where the extra gradient-sized buffer of the fused loss's backward comes from (H200, torch 2.11: 2.14 GiB
# peak vs 1.10 after forward): allocations alive at the peak with their Python frames; snapshot for memory_viz.
if want memtrace; then
stage "log-prob memory trace"
timeout "$(limit 60)" $PY bench/bench_logprob.py --memory-trace "$OUTDIR/logprob_memory.pickle" \
  > "$OUTDIR/bench_logprob_memtrace.log" 2>&1 || echo "  memory trace exited with $?"
grep "MiB" "$OUTDIR/bench_logprob_memtrace.log" | head -8
tail -1 "$OUTDIR/bench_logprob_memtrace.log" > "$OUTDIR/bench_logprob_memtrace.json"
fi
# Device times from CUDA-graph replays over rotating input sets (bench/_timing.py graph_time_us); the sweeps
# compile one kernel per tiling.
want keyframe && run_bench bench_keyframe 100 --quick --sweep
want advantage && run_bench bench_advantage 120 --quick --sweep
want variant && run_bench bench_variant_patchify 60 --quick

if want tests; then
stage "GPU tests"
# xdist (-n): a crashing test takes down one worker, not the whole report.
XD=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
timeout "$(limit 200)" $PY -m pytest -q -rfE $XD -p no:cacheprovider tests/kernels tests/test_loss.py \
  tests/test_advantage.py tests/test_keyframes.py tests/test_model.py tests/test_rollout.py tests/test_variants.py \
  > "$OUTDIR/tests_gpu.log" 2>&1
grep -E "^(FAILED|ERROR)" "$OUTDIR/tests_gpu.log" | cut -c1-200
echo "kernel + model tests on the GPU (Triton compiled, CUDA op): $(tail -1 "$OUTDIR/tests_gpu.log")"
fi

if want throughput; then
stage "end-to-end throughput (gpu_small recipe: random-weight 0.17 B Qwen2.5-VL, synthetic videos)"
timeout "$(limit 150)" $PY bench/throughput.py --recipe gpu_small --steps 3 --compare --no-save \
  > "$OUTDIR/bench_throughput.log" 2>&1 || echo "  throughput exited with $? (see bench_throughput.log)"
grep -v "^\[rank" "$OUTDIR/bench_throughput.log" | grep -E "^(step_s|rollouts|gen_tokens|update_seq)" || true
tail -1 "$OUTDIR/bench_throughput.log" > "$OUTDIR/bench_throughput.json"
fi

stage "table"
$PY bench/gpu_table.py "$OUTDIR" | tee "$OUTDIR/table.md"
