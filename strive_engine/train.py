"""Train a video-language model with STRIVE (or GRPO / Dr.GRPO / DAPO / T-GRPO) on FSDP2.

    torchrun --nproc_per_node 2 -m strive_engine.train                       # the embedded default (CPU)
    torchrun --nproc_per_node 8 -m strive_engine.train --recipe qwen25vl_7b --model.path=/ckpt --data.path=/d.json
    torchrun ... -m strive_engine.train --checkpoint.resume=true              # continue exactly, or fail clearly
    torchrun ... -m strive_engine.train --checkpoint.resume=auto              # continue if there is something
    python -m strive_engine.train --recipe qwen25vl_7b --help                 # every option, with the value it takes

A user error (missing records file, bad model folder, unusable checkpoint, bad option) prints one line and exits
2 (rank 0 alone prints it under torchrun); `--debug` or STRIVE_DEBUG=1 shows the traceback (strive_engine.cli).

Stages: config → distributed → resume point (verified, config compared) → output folder → data → model → FSDP2 →
optimizer → resume → (SFT warm start) → RL loop → HF export + plot. One RL step is `step.rl_step`.

The output folder keeps every run's logs: a fresh start moves an earlier run's `metrics.jsonl`, `config.json` and
`checkpoints/` aside to `<name>.N` (next free N); a resume keeps the first `config.json`, records its own config
as `config.resume_step<S>.json` when it differs, and copies `metrics.jsonl` to `metrics.jsonl.N` before dropping
the rows the killed run logged after its checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

from strive_engine.checkpoint import Checkpointer, ResumePoint, export_hf, load_reference
from strive_engine.cli import config_from_cli, run_main, setup_logging
from strive_engine.config import Config
from strive_engine.data import RecordFileError, RecordLoader, load_records
from strive_engine.keyframes import build_scorer
from strive_engine.metrics import MetricsLogger, StageTimer, plot_run, read_metrics, require_tensorboard
from strive_engine.model import Policy, build_model
from strive_engine.pipeline import SkipTally, decode_batch
from strive_engine.parallel import DistEnv, apply_fsdp, barrier, destroy_distributed, init_distributed, seed_everything
from strive_engine.sft import run_sft
from strive_engine.step import Trainer, rl_step
from strive_engine.synthetic import ensure_synthetic
from strive_engine.trained_settings import refuse_tiny_recipe_for_checkpoint
from strive_engine.video import build_source
from strive_engine.video.prefetch import Prefetcher

log = logging.getLogger("strive_engine")


def train_records_path(cfg: Config) -> Path:
    """`data.path`, or the embedded synthetic set (generated on first use; ranks wait on a file lock)."""
    if cfg.data.path:
        return Path(cfg.data.path)
    train, _ = ensure_synthetic(os.path.expanduser(cfg.data.synthetic_dir), cfg.data.synthetic_size,
                                cfg.data.synthetic_seed, progress=cfg.logging.progress, **cfg.data.synthetic_options)
    return train


def lr_lambda(cfg, total_updates: int):
    """Linear warmup, then cosine decay to min_lr_ratio (or constant)."""
    def f(i: int) -> float:
        if i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        p = min(1.0, (i - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def build_sharded_policy(cfg: Config, env: DistEnv, activation_checkpointing: bool = False):
    """(hf model, tokenizer, Policy, FSDP Root). With bf16 mixed precision (CUDA by default) the weights are
    fp32 masters and FSDP2 gathers them in bf16; on CPU everything is fp32."""
    mp = cfg.parallel.mixed_precision
    mp = ("bf16" if env.device.type == "cuda" else "off") if mp == "auto" else mp
    model_cfg = dataclasses.replace(cfg.model, dtype="float32") if mp == "bf16" else cfg.model
    hf, tokenizer = build_model(model_cfg, env.device)
    if activation_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(hf)
    root = apply_fsdp(policy, hf, mixed_precision=mp, reshard_after_forward=cfg.parallel.reshard_after_forward,
                      device=env.device)
    return hf, tokenizer, policy, root


def build_trainer(cfg: Config, env: DistEnv) -> tuple[Trainer, list]:
    # ---- data: records (bad ones counted and reported), per-rank loader, video decoder
    # Every rank parses the same file; only rank 0 reports the bad records (quiet elsewhere).
    records, report = load_records(train_records_path(cfg), video_root=cfg.data.video_root or None,
                                   extra_roots=cfg.data.extra_roots, quiet=not env.is_main)
    if not records:
        raise RecordFileError(f"no usable records in {report.path}: {report.summary()}")
    loader = RecordLoader(records, cfg.data.batch_size, env.rank, env.world_size, seed=cfg.run.seed,
                          shuffle=cfg.data.shuffle, report=report)
    source = build_source(cfg.video, env.device)

    # ---- model (identical init on every rank), then FSDP2 per block and the root
    torch.manual_seed(cfg.run.seed)
    hf, tokenizer, policy, root = build_sharded_policy(cfg, env, cfg.parallel.activation_checkpointing)
    scorer = build_scorer(cfg.keyframes, model=hf, tokenizer=tokenizer)

    # ---- optimizer: AdamW + warmup/cosine over all optimizer steps of the run
    params = [p for p in root.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    updates = cfg.run.steps * cfg.algorithm.ppo_epochs * cfg.algorithm.minibatches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, updates))
    t = Trainer(cfg=cfg, env=env, root=root, policy=policy, tokenizer=tokenizer, scorer=scorer, source=source,
                loader=loader, optimizer=opt, scheduler=sched, timer=StageTimer())
    return t, records


def build_reference(t: Trainer, resumed: Path | None) -> None:
    """A second, frozen, identically sharded copy of the policy. Fresh run: the current (post-SFT) weights.
    Resumed run: the reference saved in the checkpoint (key "ref"), so KL terms continue exactly."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    _, _, t.ref_policy, t.ref_root = build_sharded_policy(t.cfg, t.env)
    t.ref_root.requires_grad_(False)
    if resumed is not None:
        load_reference(t.ref_root, resumed)
    else:
        set_model_state_dict(t.ref_root, get_model_state_dict(t.root))
    log.info("reference policy for the KL term (beta=%g) ready", t.cfg.algorithm.beta)


def trainer_state(t: Trainer, step: int) -> dict:
    # The prefetcher reads the loader ahead; its state is the next batch the trainer will consume.
    loader = t.prefetcher.state_dict() if t.prefetcher is not None else t.loader.state_dict()
    return {"step": step, "scheduler": t.scheduler.state_dict(), "loader": loader, "nonfinite_skips": t.nonfinite_skips}


def rotate(path: Path) -> Path:
    """Move `path` (file or folder) to `<name>.N`, N the next free number; returns the new path."""
    n = 1
    while (dest := path.with_name(f"{path.name}.{n}")).exists():
        n += 1
    path.rename(dest)
    return dest


def prepare_output(out: Path, cfg: Config, resumed: ResumePoint | None) -> None:
    """Rank 0: the output folder for a fresh start or a resume; never deletes an earlier run's logs."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, config = out / cfg.logging.metrics_file, out / "config.json"
    text = json.dumps(cfg.to_dict(), indent=1)
    if resumed is None:
        earlier = [p for p in (metrics, config) if p.exists()]
        ckpts = out / "checkpoints"
        if ckpts.is_dir() and any(ckpts.iterdir()):
            earlier.append(ckpts)
        for p in earlier:
            log.warning("starting afresh in %s: moved the earlier run's %s to %s", out, p.name, rotate(p).name)
        config.write_text(text)
        return
    if not config.exists():
        config.write_text(text)
    elif json.loads(config.read_text()) != cfg.to_dict():
        (out / f"config.resume_step{resumed.step}.json").write_text(text)
    if metrics.exists():
        # Rows the killed run logged after its checkpoint are recomputed: keep a copy, then drop them.
        rows = read_metrics(metrics)
        keep = [r for r in rows if r.get("phase") != "rl" or r["step"] < resumed.step]
        if len(keep) < len(rows):
            log.info("resuming at step %d: the full log is kept as %s", resumed.step, rotate(metrics).name)
            metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 for a user error (one line; strive_engine.cli.run_main)."""
    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    cfg = config_from_cli(argv)
    refuse_tiny_recipe_for_checkpoint(cfg, argv)  # a Qwen checkpoint under debug_cpu's tiny-model prompt: refused
    if cfg.logging.tensorboard:
        require_tensorboard()  # every rank, before any work: a missing package is a one-line error
    env = init_distributed(cfg.parallel.backend)
    setup_logging(cfg.logging.log_level)
    seed_everything(cfg.run.seed + env.rank)
    out = Path(cfg.run.output_dir)
    ckpt = Checkpointer(out / "checkpoints", env, cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                        config=cfg.to_dict())
    try:
        return _run(cfg, env, out, ckpt)
    finally:
        ckpt.close(wait=False)  # a normal exit waited already; after an error, do not wait on peers


def _run(cfg: Config, env: DistEnv, out: Path, ckpt: Checkpointer) -> int:
    # ---- resume point first (verified against its manifest, config compared): a bad resume fails in seconds
    resumed = ckpt.find_resume(cfg.checkpoint.resume, cfg.checkpoint.allowed_changes)
    t, records = build_trainer(cfg, env)  # before the output folder: a bad records file or model touches nothing
    skips = SkipTally(cfg.data.max_empty_steps, t.loader.report)  # what the run skips and why; stops a run of none
    if env.is_main:
        prepare_output(out, cfg, resumed)
    barrier()

    # ---- resume: model, optimizer, scheduler, data position, RNG
    start = 0
    if resumed is not None:
        st = ckpt.load(resumed, t.root, t.optimizer)
        t.scheduler.load_state_dict(st["scheduler"])
        t.loader.load_state_dict(st["loader"])
        t.nonfinite_skips = st["nonfinite_skips"]
        start = st["step"]
    metrics_path = out / cfg.logging.metrics_file
    tb = out / "tb" if cfg.logging.tensorboard else None

    # ---- supervised warm start (fresh runs only: a checkpoint already holds the warmed-up weights)
    if cfg.sft.steps and resumed is None:
        sft_log = MetricsLogger(metrics_path, enabled=env.is_main, total_steps=cfg.sft.steps,
                                progress=cfg.logging.progress, desc="sft", tensorboard_dir=tb)
        def sft_row(row: dict) -> None:  # every rank: the skipped count is global, so all stop together
            sft_log.log(row)
            skips.empty_step(cfg.sft.batch_size * env.world_size - row["data/skipped_videos"], "SFT", row["step"])

        run_sft(t, records, log_fn=sft_row, on_decoded=skips.add)
        sft_log.close()

    # ---- frozen reference policy for the k3 KL term (beta > 0): the policy as RL starts (after SFT)
    if cfg.algorithm.beta > 0:
        build_reference(t, resumed.path if resumed is not None else None)

    # ---- RL loop; the next batch's videos decode on a background thread while a step runs; checkpoints are
    # written on a background thread too ("time/checkpoint" is the stall: the CPU copy of the state)
    t.prefetcher = Prefetcher(t.loader, functools.partial(decode_batch, source=t.source,
                                                          pool_frames=cfg.video.pool_frames, device=env.device),
                              depth=cfg.video.prefetch_batches, on_next=lambda _, decoded: skips.add(decoded))
    rl_log = MetricsLogger(metrics_path, enabled=env.is_main, total_steps=cfg.run.steps, initial_step=start,
                           progress=cfg.logging.progress and cfg.run.steps > start, desc=cfg.algorithm.preset,
                           tensorboard_dir=tb)
    every = cfg.checkpoint.every
    for step in range(start, cfg.run.steps):
        m = rl_step(t, step)
        if (every and (step + 1) % every == 0) or step + 1 == cfg.run.steps:
            with t.timer("checkpoint"):
                ckpt.save(step + 1, t.root, t.optimizer, trainer_state(t, step + 1), ref_root=t.ref_root)
            m.update(t.timer.reset())
        rl_log.log(m)
        skips.empty_step(m["data/valid_samples"], "RL", step)  # global count: every rank stops at the same step
    rl_log.close()
    t.prefetcher.close()
    ckpt.wait()  # the last checkpoint is COMPLETE before the export and the exit
    counts = skips.global_counts()  # collective: summed over ranks
    if env.is_main:
        log.log(logging.WARNING if skips.num_skipped(counts) else logging.INFO, "skipped in this run: %s",
                skips.summary(counts))

    # ---- export (weights in the source's dtype, its tokenizer/processor/generation files, the run's settings) + plot
    if cfg.checkpoint.export_hf:
        export_hf(t.root, t.policy.hf, t.tokenizer, out / "hf", env, source=cfg.model.path,
                  dtype=cfg.checkpoint.export_dtype, settings=cfg)
    if env.is_main and cfg.logging.plot and metrics_path.exists():
        png = plot_run(out, cfg.logging.metrics_file)
        log.info("wrote %s and %s", metrics_path, png)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
