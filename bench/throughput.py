"""End-to-end training throughput of one STRIVE step: every stage's seconds, what bounds it and how close it runs.

    python bench/throughput.py                          # the embedded default (debug_cpu) on this machine
    python bench/throughput.py --compare                # also every fast path -> its pure-torch twin; ratio
    python bench/throughput.py --recipe gpu_small --steps 8 --compare      # 0.17 B random-weight model (GPU)
    python bench/throughput.py --recipe gpu_3b --steps 2 --skip-checkpoint  # Qwen2.5-VL-3B shapes (one H200)
    python bench/throughput.py --profile                # + a torch.profiler trace of one more step
    python bench/throughput.py --count-ops              # + ATen ops and device->host reads per stage, one more step
    python bench/throughput.py --save                   # + append the record to bench/results/throughput.jsonl
    python bench/throughput.py --rollout.num_generations=8 ...             # any config override

Runs in one process (a world of one, FSDP2 on gloo/NCCL as in training), with the next batch's videos decoded
in the background as in training (so "decode" is the time a step waited for them), warms up, then times
`--steps` RL steps with CUDA synchronised at stage boundaries, and one checkpoint save (unless
--skip-checkpoint). First it measures the ceilings of this device in this run: bf16 matmul FLOP/s (8192^3) and
device copy bytes/s on CUDA; on CPU the same in the model's dtype (fp32) at CPU sizes.

Per stage (median over the timed steps): seconds, spread ((max - min) / median over the steps), share of the
step, what bounds it (FLOPs or bytes by the models below; or the host), the achieved TFLOP/s or GB/s, the
fraction of the ceiling (floor time at the ceilings / measured time), and the peak device memory inside the
stage. Also: the update's MFU as 6 x parameters x tokens forwarded /
time / matmul ceiling and old log-probs' as 2 x ..., the same from the FLOP model, the rollout backend that
ran (printed), questions/s, rollouts/s, generated and trained tokens/s. Whether the steps were enough: the
rollout's median should repeat within 10%, read as the medians of the first and the second half of the timed
steps agreeing within 10% of the whole's (printed as ok / noisy); with `--max-steps M` the run adds timed steps,
up to M, until they do.

`--count-ops` runs one more step under a dispatch mode and reports, per stage, the ATen ops that are not views
(each one kernel launch on a GPU, unless a CUDA graph replays it) and the device->host reads (a `.item()`,
`nonzero`, a copy to the host: each one a sync on CUDA; on a CPU run every such read is counted, host bookkeeping
included). A stage that runs far below its FLOP or byte floor at a small model's sizes is bound by these; they
are counted the same on the CPU, so a change to them can be checked without a GPU.

`--compare` runs the same steps again in a child process with STRIVE_KERNELS_BACKEND=reference (same seed,
same data) and prints the ratio per stage. A table goes to stdout and one JSON object is the last line. The
record is appended to runs/bench/throughput.jsonl (or --out DIR); only --save also appends it to the tracked
bench/results/throughput.jsonl. The run's own files (checkpoints) go to a temporary folder.

FLOP and byte models (bench/flops.py).

Matmul FLOPs only (2 per multiply-add), as torch.utils.flop_counter counts them; norms, activations, rotary
and softmax are left out (a few % at these widths). Symbols: P_lm = weights of the decoder's Linear layers
(36 x 77.1 M for Qwen2.5-VL-3B), P_head = V x H (the lm_head), P_vis = weights of the vision blocks' Linear
layers, A = attention width (heads x head_dim), L = decoder layers, D = vision width.

  language model, one sequence of s tokens:  2 P_lm s  +  2 L A s^2          (causal: half of the 4 L A s^2
                                                                              that a full score matrix costs)
  loss head / log-probs, n scored tokens:    2 P_head n                      (logits only where scored)
  vision tower, one video of t x h x w patches (N = t h w):
      2 (P_patch_embed + P_vis) N  +  2 P_merger N / 4
      + window blocks: sum over windows of 4 n_w^2 D   (windows of 4 x 4 merged tokens = 64 patches)
      + full blocks:   t x 4 (h w)^2 D                  (Qwen2.5-VL attends within each temporal patch)
  old / reference log-probs (old: only with algorithm.old_logp_forward or ppo_epochs / minibatches > 1; else the
      update's forward gives them): the language model + head forward on every row (no padding counted), the vision
      tower as it ran (forward hooks; nothing when visual tokens are reused). When the policy runs the rows of
      one prompt as one sequence (model.share_prompts), the prompt counts once and the attention counts the
      pairs its block mask allows: P^2 / 2 + sum over completions of (c P + c^2 / 2), times 4 L A; "tokens" are
      the tokens the model ran over, "row_tokens" those of the rows (what one row per completion runs).
  keyframes: the vision tower as the policy scorer ran it
  update (forward + backward) = 3 x forward of the language model and head; the vision tower 3 x when it
      is trained, 1 x when frozen. Activation checkpointing recomputes one more forward: not counted (model
      FLOPs, not hardware FLOPs).
  MFU as issue 14 defines it: 6 x all parameters x tokens forwarded (update), 2 x ... (old log-probs).

  rollout: prefill (each (question, variant) prompt once, its video once: the least work any engine can do)
      FLOPs = sum over requests of [language model on its prompt + vision tower on its video]
      decode bytes, per decode step of one generate call (steps = its longest completion):
          the decoder's and lm_head's weights once (2 bytes each in bf16) + the K/V cache read: each
          request's prompt once (shared by its G rows) + every row's own completion so far;
          K/V bytes per token = 2 x L x kv_heads x head_dim x element size (36.9 KB for Qwen2.5-VL-3B)
      floor = prefill FLOPs / matmul ceiling + decode bytes / copy ceiling
  optimizer (AdamW, fp32 states): per trained parameter read p, g, m, v, write p, m, v, plus the gradient
      norm's read of g = 32 bytes
  variants: the pixel_values written (lower bound of the traffic: the frames read are left out)

Every stage is reported against its floor, floor_s = FLOPs / matmul ceiling + bytes / copy ceiling, measured in
the same run (`measure_ceilings`): bound = the larger term, achieved rate = that quantity / measured seconds,
fraction = floor_s / measured seconds. Stages without a device model (decode, reward, advantage, checkpoint)
are bound by the host (video decoder, Python, launch latency, disk) and get seconds and share only.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _profile import stage_profile  # noqa: E402
from _report import table  # noqa: E402
from flops import (CallRecord, measure_ceilings, model_shape, policy_call_flops, rollout_work,  # noqa: E402
                   vision_flops)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from strive_engine.metrics import STAGES, StageTimer  # noqa: E402
from strive_engine.prompt_sharing import prompt_groups  # noqa: E402

HOST_BOUND = {"decode": "host: video decoder", "reward": "host: Python", "advantage": "launch latency",
              "checkpoint": "disk"}
STABLE = 0.10  # how far apart the medians of the timed steps' two halves may be, over the whole's: repeatable
GiB = 2 ** 30


def _versions() -> dict:
    import transformers
    import triton

    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        out["git_sha"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = "unknown"
    return out


# -------------------------------------------------------------------------------------- instrumentation


_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class OpCounter(TorchDispatchMode):
    """ATen ops (views excluded) and device->host reads per stage of `timer` (see --count-ops)."""

    def __init__(self, timer: "BenchTimer"):
        super().__init__()
        self.timer = timer
        self.names: dict[str, Counter] = defaultdict(Counter)  # per stage: ATen op name -> count
        self.reads: dict[str, int] = defaultdict(int)
        self.cuda_run = torch.cuda.is_available()  # a CPU run counts every host read (see --count-ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view and func.namespace != "profiler":  # record_function's markers launch nothing
            stage = self.timer.current
            name = func.__name__.split(".")[0]
            self.names[stage][name] += 1
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            on_host = first is None or first.device.type == "cpu"
            to_host = name == "_to_copy" and not on_host and str(kwargs.get("device", "")) == "cpu"
            if to_host or (name in _HOST_READS and (not on_host or not self.cuda_run)):
                self.reads[stage] += 1
        return out

    def record(self) -> dict[str, dict[str, int]]:
        return {s: {"ops": c.total(), "host_reads": self.reads.get(s, 0)} for s, c in sorted(self.names.items())}

    def top(self, n: int = 12) -> dict[str, list[tuple[str, int]]]:
        """Each stage's n most frequent ops: where its launches come from."""
        return {s: c.most_common(n) for s, c in sorted(self.names.items())}



class BenchTimer(StageTimer):
    """StageTimer that also knows the current stage (for the work hooks), keeps each stage's peak CUDA memory,
    and names each stage in a profiler trace (record_function)."""

    def __init__(self, sync: bool):
        super().__init__(sync=sync)
        self.stack: list[str] = []
        self.peak_bytes: dict[str, int] = defaultdict(int)
        self.peak_reserved = 0  # the allocator's segments: above peak_bytes by what fragmentation costs
        self.cuda = torch.cuda.is_available()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "other"

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self.stack.append(stage)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.profiler.record_function(f"stage/{stage}"), super().__call__(stage):
                yield
        finally:
            if self.cuda:
                self.peak_bytes[stage] = max(self.peak_bytes[stage], torch.cuda.max_memory_allocated())
                self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved())
            self.stack.pop()


class WorkRecorder:
    """Forward pre-hooks on the Policy and its vision tower: the shapes each stage ran, for the FLOP models.
    Tensors are kept by reference and read on the host after the step (no sync inside a timed stage)."""

    def __init__(self, policies: list[torch.nn.Module], timer: BenchTimer):
        self.timer = timer
        self._policy: list = []
        self._vision: list = []
        for policy in policies:  # the trained policy, and the frozen reference when beta > 0
            policy.register_forward_pre_hook(self._on_policy, with_kwargs=True)
            visual = getattr(getattr(policy.hf, "model", policy.hf), "visual", None)
            if visual is not None:
                visual.register_forward_pre_hook(self._on_vision, with_kwargs=True)

    def _on_policy(self, module, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        self._policy.append((self.timer.current, inputs, getattr(module, "share_prompts", False)))

    def _on_vision(self, module, args, kwargs):
        grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        self._vision.append((self.timer.current, grid))

    def collect(self) -> tuple[list[CallRecord], list[tuple[str, tuple[int, int, int]]]]:
        calls = []
        for stage, x, share in self._policy:
            pix = x.pixel_values_videos
            groups = prompt_groups(x.input_ids, x.attention_mask, x.completion_mask, x.video_index) if share else None
            shared = [] if groups is None else [
                (int((seg == 0).sum()), [int((seg == k).sum()) for k in range(1, int(seg.max()) + 1)])
                for seg in groups.segment]
            calls.append(CallRecord(stage, x.attention_mask.sum(1).tolist(), x.completion_mask.sum(1).tolist(),
                                    x.video_index.tolist(), [tuple(g) for g in x.video_grid_thw.tolist()],
                                    pixel_bytes=pix.shape[1] * pix.element_size(), shared=shared))
        vision = [(stage, tuple(g)) for stage, grid in self._vision if grid is not None for g in grid.tolist()]
        self._policy, self._vision = [], []
        return calls, vision


def step_work(shape, calls: list[CallRecord], vision, cfg, elem: int) -> dict[str, dict[str, float]]:
    """FLOPs and bytes of each stage of one step (bench/flops.py's models on the shapes the hooks saw)."""
    work: dict[str, dict[str, float]] = defaultdict(lambda: {"flops": 0.0, "bytes": 0.0, "tokens": 0.0,
                                                             "row_tokens": 0.0})
    vis_by_stage: dict[str, float] = defaultdict(float)
    for stage, grid in vision:
        vis_by_stage[stage] += sum(vision_flops(shape, grid))
    for rec in calls:
        mult = 3.0 if rec.stage == "update" else 1.0
        work[rec.stage]["flops"] += mult * policy_call_flops(shape, rec)
        work[rec.stage]["tokens"] += rec.forwarded
        work[rec.stage]["row_tokens"] += sum(rec.seq_lens)
    for stage, f in vis_by_stage.items():
        if stage != "rollout":  # the rollout's floor counts each video once, below
            work[stage]["flops"] += f * (3.0 if stage == "update" and shape.vision_trained else 1.0)
    # the rollout's rows: the old log-probs' calls, else (on-policy: no such stage) the update's, which hold the
    # kept rows only (with DAPO's dynamic sampling the rollout's work is then undercounted)
    rows = [c for c in calls if c.stage == "old_logp"] or [c for c in calls if c.stage == "update"]
    if rows:
        ro = rollout_work(shape, rows, cfg.rollout.max_batch, elem,
                          whole_requests=getattr(cfg.rollout, "backend", "native") == "native")
        work["rollout"].update(flops=ro["flops"], bytes=ro["bytes"], decode_steps=ro["decode_steps"],
                               requests=ro["requests"], prompt_tokens_mean=ro["prompt_tokens_mean"],
                               executed_vision_flops=vis_by_stage.get("rollout", 0.0))
        patches = sum(t * h * w for rec in rows for (t, h, w) in rec.grids)
        work["variants"]["bytes"] = patches * rows[0].pixel_bytes
    updates = cfg.algorithm.ppo_epochs * cfg.algorithm.minibatches
    work["optimizer"]["bytes"] = 32.0 * shape.trainable * updates
    return work


# ---------------------------------------------------------------------------------------------- measure


def repeats(xs: list[float], tol: float = STABLE) -> bool:
    """A median that repeats: the medians of the first and the second half of xs within tol of the median of all
    (at least 4 values; an odd middle one goes to the second half). Unlike (max - min) / median, which only grows
    with more steps, this settles as steps are added when the stage's time is stationary."""
    if len(xs) < 4:
        return False
    half, med = len(xs) // 2, statistics.median(xs)
    return med > 0 and abs(statistics.median(xs[:half]) - statistics.median(xs[half:])) <= tol * med


def _trainer_step_loop(t, cfg, env, warmup: int, steps: int, profile_path: Path | None, batches,
                       count_ops: bool = False, max_steps: int = 0):
    """Warm-up steps, timed steps (one row and one work record each; after `steps` of them more, up to
    `max_steps`, until the rollout's median repeats), then optionally one profiled step and one step under the
    op counter (its record in t.op_counts)."""
    from strive_engine.step import rl_step

    rec = WorkRecorder([t.policy] + ([t.reference.policy] if t.reference is not None else []), t.timer)
    for step in range(warmup):
        rl_step(t, step, batches)
        rec.collect()
    rows, works = [], []
    t0 = time.perf_counter()
    while len(rows) < steps or (len(rows) < max_steps and not repeats([r.get("time/rollout", 0.0) for r in rows])):
        rows.append(rl_step(t, warmup + len(rows), batches))
        works.append(rec.collect())
    wall = time.perf_counter() - t0
    steps = len(rows)
    if profile_path is not None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts, record_shapes=True) as prof:
            rl_step(t, warmup + steps, batches)
        rec.collect()
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(profile_path))
        t.stage_profile = stage_profile(prof.events())
    if count_ops:
        counter = OpCounter(t.timer)
        with counter:
            rl_step(t, warmup + steps + (profile_path is not None), batches)
        rec.collect()
        t.op_counts = counter.record()
        t.op_top = counter.top()
    return rows, works, wall


def _checkpoint_seconds(t, cfg, env, step: int) -> dict:
    from strive_engine.checkpoint import Checkpointer

    params = inspect.signature(Checkpointer).parameters
    kw = {"async_save": cfg.checkpoint.async_save} if "async_save" in params and hasattr(cfg.checkpoint,
                                                                                         "async_save") else {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ck = Checkpointer(tmp, env, keep=1, **kw)
            t0 = time.perf_counter()
            with t.timer("checkpoint"):
                ck.save_trainer(step, t, t.loader.state_dict())
            blocking = time.perf_counter() - t0
            if hasattr(ck, "close"):
                ck.close()
            total = time.perf_counter() - t0
    except Exception as err:  # a failed save is reported, and does not take the timed steps' numbers with it
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"[:600]}
    finally:
        t.timer.reset()
    return {"blocking_s": blocking, "on_disk_s": total}


def measure(argv: list[str], steps: int, warmup: int, skip_checkpoint: bool = False,
            profile_path: Path | None = None, count_ops: bool = False, max_steps: int = 0) -> dict:
    """Build the trainer from the config in argv, time `steps` RL steps after `warmup` ones (more, up to
    `max_steps`, until the rollout's median repeats), explain them."""
    import functools

    from strive_engine.config import load_config
    from strive_engine.parallel import destroy_distributed, init_distributed, seed_everything
    from strive_engine.pipeline import decode_batch
    from strive_engine.trainer import build_trainer
    from strive_engine.video.prefetch import Prefetcher

    cfg = load_config(argv + ["--logging.progress=false"])
    env = init_distributed(cfg.parallel.backend)
    seed_everything(cfg.run.seed)
    t_build = time.perf_counter()
    t = build_trainer(cfg, env)  # with the frozen KL reference when algorithm.beta > 0
    build_s = time.perf_counter() - t_build
    dtype = next(p for p in t.policy.hf.parameters()).dtype if env.device.type == "cpu" else torch.bfloat16
    ceilings = measure_ceilings(env.device, dtype)
    t.timer = BenchTimer(sync=True)
    batches = Prefetcher(t.loader, functools.partial(decode_batch, source=t.source,
                                                     pool_frames=cfg.video.pool_frames, device=env.device),
                         depth=cfg.video.prefetch_batches)
    try:
        rows, works, wall = _trainer_step_loop(t, cfg, env, warmup, steps, profile_path, batches, count_ops,
                                               max_steps)
        steps = len(rows)
        ckpt = None if skip_checkpoint else _checkpoint_seconds(t, cfg, env, warmup + steps)
    finally:
        batches.close()
    peak = {s: b / GiB for s, b in t.timer.peak_bytes.items()}
    shape = model_shape(t.policy.hf)
    elem = 2 if env.device.type == "cuda" else 4
    stage_work = [step_work(shape, calls, vision, cfg, elem) for calls, vision in works]
    destroy_distributed()
    out = explain(cfg, env, rows, stage_work, wall, steps, shape, ceilings, peak, ckpt, build_s, argv)
    if env.device.type == "cuda":  # the allocator's segments: above peak_gib by what fragmentation costs
        out["memory"]["reserved_gib"] = t.timer.peak_reserved / GiB
        out["memory"]["allocator"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF", ""))
    if profile_path is not None:
        out["profile"] = t.stage_profile
    if count_ops:
        out["ops"] = t.op_counts
        out["ops_top"] = t.op_top
    return out


# ---------------------------------------------------------------------------------------------- explain


def _spread(xs: list[float]) -> float:
    med = statistics.median(xs)
    return (max(xs) - min(xs)) / med if med > 0 else 0.0


def _halves(xs: list[float]) -> list[float]:
    """The medians of the first and the second half of xs (what `repeats` compares), [] under 2 values."""
    return [statistics.median(xs[: len(xs) // 2]), statistics.median(xs[len(xs) // 2:])] if len(xs) >= 2 else []


def _stage_row(stage: str, secs: list[float], work: list[dict], ceilings: dict, step_s: float) -> dict:
    med = statistics.median(secs)
    row = {"s": med, "s_steps": [round(x, 5) for x in secs], "spread": _spread(secs) if secs else 0.0,
           "share": med / step_s if step_s > 0 else 0.0}
    flops = sum(w.get("flops", 0.0) for w in work)
    nbytes = sum(w.get("bytes", 0.0) for w in work)
    total_s = sum(secs)
    if stage in HOST_BOUND or (flops == 0 and nbytes == 0) or total_s <= 0:
        row["bound"] = HOST_BOUND.get(stage, "no device model")
        return row
    t_f = flops / ceilings["matmul_flops_per_s"]
    t_b = nbytes / ceilings["copy_bytes_per_s"]
    tokens, row_tokens = (sum(w.get(k, 0.0) for w in work) / len(work) for k in ("tokens", "row_tokens"))
    if tokens:  # the policy's forwards: tokens run over, and the rows' tokens (fewer run when prompts are shared)
        row.update(tokens=tokens, row_tokens=row_tokens)
    row.update(bound="FLOPs" if t_f >= t_b else "bytes", flops=flops / len(work), bytes=nbytes / len(work),
               tflops_per_s=flops / total_s / 1e12, gb_per_s=nbytes / total_s / 1e9,
               floor_s=(t_f + t_b) / len(work), fraction=(t_f + t_b) / total_s)
    return row


def engine_parts(rows: list[dict]) -> dict[str, float]:
    """The native engine's parts of the rollout stage (medians over the timed steps, ms; CUDA events on a GPU),
    and `host_ms`: the rest of the stage's wall time (prompt building, positions, detokenising, launches the
    device waited for)."""
    found = {k.removeprefix("rollout/engine_") for r in rows for k in r if k.startswith("rollout/engine_")}
    if not found:
        return {}
    order = ["prefill_ms", "first_token_ms", "warmup_step_ms", "capture_ms", "decode_ms", "decode_steps",
             "decode_timed_steps"]
    keys = [k for k in order if k in found] + sorted(found - set(order))
    out = {k: statistics.median(r.get(f"rollout/engine_{k}", 0.0) for r in rows) for k in keys}
    device = sum(v for k, v in out.items() if k.endswith("_ms"))
    out["host_ms"] = statistics.median(1e3 * r.get("time/rollout", 0.0) for r in rows) - device
    return out


def explain(cfg, env, rows, stage_work, wall, steps, shape, ceilings, peak, ckpt, build_s, argv) -> dict:
    B, K, G = cfg.data.batch_size, cfg.variants.num_variants, cfg.rollout.num_generations
    step_times = [r["time/step"] for r in rows]
    step_s = statistics.median(step_times)
    stages = {}
    for s in STAGES:
        secs = [r.get(f"time/{s}", 0.0) for r in rows]
        if s == "checkpoint" or (not any(secs) and s != "decode"):  # decode at 0: the prefetcher hid it, say so
            continue
        stages[s] = _stage_row(s, secs, [w.get(s, {}) for w in stage_work], ceilings, step_s)
        if s in peak:
            stages[s]["peak_gib"] = peak[s]
    ro = stage_work[0].get("rollout", {})
    for k in ("decode_steps", "requests", "prompt_tokens_mean"):
        if k in ro and "rollout" in stages:
            stages["rollout"][k] = ro[k]
    parts = engine_parts(rows)
    if parts and "rollout" in stages:
        stages["rollout"]["engine_ms"] = parts
    peak_flops = ceilings["matmul_flops_per_s"]
    mfu = {}
    for s, factor in (("update", 6.0), ("old_logp", 2.0), ("ref_logp", 2.0)):
        tok = sum(w.get(s, {}).get("tokens", 0.0) for w in stage_work)
        sec = sum(r.get(f"time/{s}", 0.0) for r in rows)
        if tok and sec:
            mfu[f"{s}_PT"] = factor * shape.params * tok / sec / peak_flops
            mfu[f"{s}_model"] = stages[s].get("fraction", 0.0)
    gen = sum(r["rollout/gen_tokens"] for r in rows)
    trained = sum(r.get("update/tokens", 0.0) for r in rows)  # every update of the step, every rank
    forwarded = sum(r.get("rollout/seq_tokens", 0) for r in rows) * cfg.algorithm.ppo_epochs
    ro_secs = [r.get("time/rollout", 0.0) for r in rows]
    out = {"recipe_args": argv, "steps": steps, "step_s": step_s, "step_s_mean": wall / steps,
           "step_spread": _spread(step_times), "build_s": build_s,
           "backend": {"kernels": os.environ.get("STRIVE_KERNELS_BACKEND", "auto"),
                       "rollout": getattr(cfg.rollout, "backend", "hf"),
                       "cuda_graph": (getattr(cfg.rollout, "cuda_graph", False) and env.device.type == "cuda"
                                      and getattr(cfg.rollout, "backend", "hf") == "native")},  # HF: never
           "questions_per_s": B * steps / wall, "rollouts_per_s": B * K * G * steps / wall,
           "gen_tokens_per_s": gen / wall, "train_tokens_per_s": trained / wall,
           "update_seq_tokens_per_s": forwarded / wall,
           "stages_s": {s: v["s"] for s, v in stages.items()}, "stages": stages, "mfu": mfu,
           "rollout_repeatable": repeats(ro_secs), "rollout_halves_s": _halves(ro_secs), "ceilings": ceilings,
           "model": {"params": shape.params, "trainable": shape.trainable, "vision_trained": shape.vision_trained},
           "shape": {"B": B, "K": K, "G": G, "F": cfg.keyframes.num_frames, "P": cfg.video.pool_frames,
                     "max_new_tokens": cfg.rollout.max_new_tokens, "device": str(env.device)},
           "accuracy_mean": sum(r["reward/accuracy"] for r in rows) / steps}
    if ckpt is not None:
        if "blocking_s" in ckpt:
            out["stages_s"]["checkpoint"] = ckpt["blocking_s"]
        out["checkpoint"] = ckpt
    if env.device.type == "cuda":
        out["memory"] = {"peak_gib": max(peak.values(), default=0.0),
                         "state_gib": 16.0 * shape.trainable / GiB}  # fp32 weights + grads + 2 Adam moments
    else:
        out["memory"] = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}
    # activation checkpointing "auto" (strive_engine.recompute): the layers it recomputed and the update's peak it
    # predicted, the most over the timed steps (absent when it had no budget: on the CPU nothing is recomputed)
    out["memory"].update({k.split("/", 1)[1]: max(r[k] for r in rows) for k in rows[0] if k.startswith("memory/")})
    # the update's micro-batches per optimizer step (parallel.micro_batch_size; 0 sizes them by the memory budget)
    out["memory"]["micro_batches"] = max(r.get("update/micro_batches", 0) for r in rows)
    return out


def _child(argv: list[str], args, backend: str, stamp: str) -> dict:
    env = {**os.environ, "STRIVE_KERNELS_BACKEND": backend}
    cmd = [sys.executable, __file__, "--_child", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--max-steps", str(args.max_steps)]
    if args.skip_checkpoint:
        cmd.append("--skip-checkpoint")
    if args.profile:
        cmd += ["--_trace", str(Path(args.out) / f"throughput-trace-{backend}-{stamp}.json")]
    if args.count_ops:
        cmd.append("--count-ops")
    out = subprocess.run(cmd + argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child run ({backend}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="debug_cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed RL steps (whether the rollout repeats says if enough)")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="add timed steps, up to this many, until the rollout's median repeats within 10%%")
    ap.add_argument("--warmup", type=int, default=1, help="untimed RL steps first (compilation, caches)")
    ap.add_argument("--compare", action="store_true", help="also run with every kernel's pure-torch twin")
    ap.add_argument("--profile", action="store_true", help="write a torch.profiler trace of one more step to --out")
    ap.add_argument("--skip-checkpoint", action="store_true", help="do not time a checkpoint save (big models)")
    ap.add_argument("--count-ops", action="store_true",
                    help="count ATen ops and device->host reads per stage in one more step")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="where the record (and trace) go")
    ap.add_argument("--save", action="store_true", help="also append the record to bench/results/throughput.jsonl")
    ap.add_argument("--results-dir", default=str(ROOT / "bench" / "results"), help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true", help=argparse.SUPPRESS)  # old scripts: now the default
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_trace", default="", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.max_steps and args.max_steps < max(args.steps, 4):
        ap.error(f"--max-steps must be 0 (off) or >= max(--steps, 4), got {args.max_steps}: whether a median "
                 "repeats is read from two halves of at least 2 steps")
    if args._child:  # the parent already added the output folder
        trace = Path(args._trace) if args._trace else None
        rec = measure(["--recipe", args.recipe, *rest], args.steps, args.warmup, args.skip_checkpoint, trace,
                      args.count_ops, args.max_steps)
        print(json.dumps({**rec, **({"trace": str(trace)} if trace else {})}))
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    with tempfile.TemporaryDirectory(prefix="strive_throughput_") as run_dir:
        argv = ["--recipe", args.recipe, f"--run.output_dir={run_dir}", *rest]
        fast = _child(argv, args, "auto", stamp)
        if args.compare:  # the fast record first, on a line of its own: a reference run cut short by a time limit
            # (gpu_check.sh's stages) cannot take it along; the full record below repeats it
            print(json.dumps({"bench": "throughput", "partial": "fast column only", **_versions(), "fast": fast}),
                  flush=True)
            print(table(fast, None, STABLE), flush=True)  # readable even if the reference run is cut
        ref = _child(argv, args, "reference", stamp) if args.compare else None
    print(table(fast, ref, STABLE))
    record = {"bench": "throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **_versions(), "fast": fast}
    if ref is not None:
        record["reference"] = ref
        record["speedup_step"] = ref["step_s"] / fast["step_s"]
    record["written_to"] = [str(p) for p in write_record(record, Path(args.out),
                                                          Path(args.results_dir) if args.save else None)]
    print(json.dumps(record))


def write_record(record: dict, out: Path, results: Path | None) -> list[Path]:
    """Append the record to out/throughput.jsonl (untracked: runs/bench by default) and, with --save only, to
    results/throughput.jsonl (the tracked bench/results). Returns the files written."""
    written = []
    for folder in [out] + ([results] if results is not None else []):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "throughput.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        written.append(folder / "throughput.jsonl")
    return written


if __name__ == "__main__":
    main()
