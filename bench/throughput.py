"""End-to-end training throughput of one STRIVE step, with the per-stage breakdown.

    python bench/throughput.py                          # the embedded default (debug_cpu) on this machine
    python bench/throughput.py --compare                # also every fast path -> its pure-torch twin; ratio
    python bench/throughput.py --recipe gpu_small --steps 5 --compare      # bigger random-weight model (GPU)
    python bench/throughput.py --rollout.num_generations=8 ...             # any config override

Runs in one process (a world of one, FSDP2 on gloo/NCCL as in training), warms up, then times `--steps` RL
steps with CUDA synchronised at stage boundaries (StageTimer(sync=True)), and one checkpoint save. Reported:
questions/s, rollouts/s, generated tokens/s, trained (completion) tokens/s, all tokens forwarded by the update
(prompt + video + completion) per second, and seconds per stage (decode, keyframes, variants, rollout, reward,
advantage, old_logp, ref_logp (β>0 only), update, optimizer, checkpoint). `--compare` runs the same steps again
in a child process with STRIVE_KERNELS_BACKEND=reference (same seed, same data) and prints the ratio per
stage. A table goes to stdout, one JSON object is the last line, and the record is appended to
bench/results/throughput.jsonl with machine, versions, git SHA and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from strive_engine.metrics import STAGES

ROOT = Path(__file__).resolve().parent.parent


def _versions() -> dict:
    import torch
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


def measure(argv: list[str], steps: int, warmup: int) -> dict:
    """Build the trainer from the config in argv and time `steps` RL steps after `warmup` ones."""
    from strive_engine.checkpoint import Checkpointer
    from strive_engine.config import load_config
    from strive_engine.metrics import StageTimer
    from strive_engine.parallel import destroy_distributed, init_distributed, seed_everything
    from strive_engine.step import rl_step
    from strive_engine.train import build_reference, build_trainer, trainer_state

    cfg = load_config(argv + ["--logging.progress=false"])
    env = init_distributed(cfg.parallel.backend)
    seed_everything(cfg.run.seed)
    t, _ = build_trainer(cfg, env)
    if cfg.algorithm.beta > 0:
        build_reference(t, None)
    t.timer = StageTimer(sync=True)
    for step in range(warmup):
        rl_step(t, step)
    rows = []
    t0 = time.perf_counter()
    for step in range(warmup, warmup + steps):
        rows.append(rl_step(t, step))
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp, t.timer("checkpoint"):
        Checkpointer(tmp, env, keep=1).save(warmup + steps, t.root, t.optimizer, trainer_state(t, warmup + steps))
    ckpt = t.timer.reset().get("time/checkpoint", 0.0)
    destroy_distributed()

    B, K, G = cfg.data.batch_size, cfg.variants.num_variants, cfg.rollout.num_generations
    per_stage = {s: sum(r.get(f"time/{s}", 0.0) for r in rows) / steps for s in STAGES if s != "checkpoint"}
    per_stage["checkpoint"] = ckpt
    gen = sum(r["rollout/gen_tokens"] for r in rows)
    trained = sum(r.get("loss/num_tokens", 0.0) for r in rows) * cfg.algorithm.ppo_epochs
    forwarded = sum(r.get("rollout/seq_tokens", 0) for r in rows) * cfg.algorithm.ppo_epochs
    return {"recipe_args": argv, "steps": steps, "step_s": wall / steps, "questions_per_s": B * steps / wall,
            "rollouts_per_s": B * K * G * steps / wall, "gen_tokens_per_s": gen / wall,
            "train_tokens_per_s": trained / wall, "update_seq_tokens_per_s": forwarded / wall,
            "stages_s": per_stage,
            "shape": {"B": B, "K": K, "G": G, "F": cfg.keyframes.num_frames, "P": cfg.video.pool_frames,
                      "max_new_tokens": cfg.rollout.max_new_tokens, "device": str(env.device)},
            "accuracy_mean": sum(r["reward/accuracy"] for r in rows) / steps}


def _child(argv: list[str], steps: int, warmup: int, backend: str) -> dict:
    env = {**os.environ, "STRIVE_KERNELS_BACKEND": backend}
    cmd = [sys.executable, __file__, "--_child", "--steps", str(steps), "--warmup", str(warmup), *argv]
    # argv starts with --recipe NAME: the child's own parser takes it back out
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child run ({backend}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(fast: dict, ref: dict | None) -> str:
    lines = [f"{'stage':<12} {'fast s':>9}" + (f" {'reference s':>12} {'ratio':>7}" if ref else "")]
    for s in STAGES:
        a = fast["stages_s"].get(s, 0.0)
        row = f"{s:<12} {a:>9.4f}"
        if ref:
            b = ref["stages_s"].get(s, 0.0)
            row += f" {b:>12.4f} " + (f"{b / a:>6.2f}x" if a > 0 else f"{'-':>7}")
        lines.append(row)
    for k in ("step_s", "questions_per_s", "rollouts_per_s", "gen_tokens_per_s", "train_tokens_per_s",
              "update_seq_tokens_per_s"):
        row = f"{k:<24} {fast[k]:>10.3f}"
        if ref:
            ratio = ref[k] / fast[k] if k == "step_s" else fast[k] / ref[k]
            row += f"   reference {ref[k]:>10.3f}   speed-up {ratio:.2f}x"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="debug_cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed RL steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed RL steps first (compilation, caches)")
    ap.add_argument("--compare", action="store_true", help="also run with every kernel's pure-torch twin")
    ap.add_argument("--no-save", action="store_true", help="do not append to bench/results/throughput.jsonl")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args._child:  # the parent already added the output folder
        print(json.dumps(measure(["--recipe", args.recipe, *rest], args.steps, args.warmup)))
        return
    argv = ["--recipe", args.recipe, f"--run.output_dir={tempfile.gettempdir()}/strive_throughput", *rest]
    fast = _child(argv, args.steps, args.warmup, "auto")
    ref = _child(argv, args.steps, args.warmup, "reference") if args.compare else None
    print(_table(fast, ref))
    record = {"bench": "throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **_versions(), "fast": fast}
    if ref is not None:
        record["reference"] = ref
        record["speedup_step"] = ref["step_s"] / fast["step_s"]
    if not args.no_save:
        out = ROOT / "bench" / "results" / "throughput.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
