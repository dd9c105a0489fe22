"""Train a video-language model with STRIVE (or GRPO / Dr.GRPO / DAPO / T-GRPO) on FSDP2.

    torchrun --nproc_per_node 2 -m strive_engine.train                       # the embedded default (CPU)
    torchrun --nproc_per_node 8 -m strive_engine.train --recipe qwen25vl_7b --model.path=/ckpt --data.path=/d.json
    torchrun ... -m strive_engine.train --checkpoint.resume=true              # continue exactly
    python -m strive_engine.train --help                                      # every option, documented

Stages: config → distributed → data → model → FSDP2 → optimizer → resume → (SFT warm start) → RL loop →
HF export + plot. One RL step is `step.rl_step`.
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

from strive_engine.checkpoint import Checkpointer, export_hf
from strive_engine.config import Config, config_from_cli
from strive_engine.data import RecordLoader, load_records
from strive_engine.keyframes import build_scorer
from strive_engine.metrics import MetricsLogger, StageTimer, plot_metrics, read_metrics
from strive_engine.model import Policy, build_model
from strive_engine.pipeline import decode_batch
from strive_engine.parallel import DistEnv, apply_fsdp, barrier, destroy_distributed, init_distributed, seed_everything
from strive_engine.sft import run_sft
from strive_engine.step import Trainer, rl_step
from strive_engine.synthetic import ensure_synthetic
from strive_engine.video import build_source
from strive_engine.video.prefetch import Prefetcher

log = logging.getLogger("strive_engine")


def setup_logging(env: DistEnv, level: str) -> None:
    logging.basicConfig(level=getattr(logging, level) if env.is_main else logging.WARNING,
                        format=f"[rank{env.rank}] %(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")


def train_records_path(cfg: Config) -> Path:
    """`data.path`, or the embedded synthetic set (generated on first use; ranks wait on a file lock)."""
    if cfg.data.path:
        return Path(cfg.data.path)
    train, _ = ensure_synthetic(os.path.expanduser(cfg.data.synthetic_dir), cfg.data.synthetic_size,
                                cfg.data.synthetic_seed, **cfg.data.synthetic_options)
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
    records, report = load_records(train_records_path(cfg))
    if env.is_main:
        log.info("%s", report.summary())
    if not records:
        raise SystemExit(f"no usable records in {report.path}: {report.summary()}")
    loader = RecordLoader(records, cfg.data.batch_size, env.rank, env.world_size, seed=cfg.run.seed,
                          shuffle=cfg.data.shuffle)
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
    Resumed run: the reference saved with the checkpoint (`ref/` beside it), so KL terms continue exactly."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    _, _, t.ref_policy, t.ref_root = build_sharded_policy(t.cfg, t.env)
    t.ref_root.requires_grad_(False)
    if resumed is not None and (resumed / "ref").is_dir():
        import torch.distributed.checkpoint as dcp

        sd = get_model_state_dict(t.ref_root)
        dcp.load(sd, checkpoint_id=str(resumed / "ref"))
        set_model_state_dict(t.ref_root, sd)
    else:
        set_model_state_dict(t.ref_root, get_model_state_dict(t.root))
    log.info("reference policy for the KL term (beta=%g) ready", t.cfg.algorithm.beta)


def trainer_state(t: Trainer, step: int) -> dict:
    # The prefetcher reads the loader ahead; its state is the next batch the trainer will consume.
    loader = t.prefetcher.state_dict() if t.prefetcher is not None else t.loader.state_dict()
    return {"step": step, "scheduler": t.scheduler.state_dict(), "loader": loader, "nonfinite_skips": t.nonfinite_skips}


def _trim_metrics(path: Path, start: int) -> None:
    """On resume, drop RL rows the killed run logged after its last checkpoint (they are recomputed)."""
    if path.exists():
        rows = [r for r in read_metrics(path) if r.get("phase") != "rl" or r["step"] < start]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_cli(argv)
    env = init_distributed(cfg.parallel.backend)
    setup_logging(env, cfg.logging.log_level)
    seed_everything(cfg.run.seed + env.rank)
    out = Path(cfg.run.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    t, records = build_trainer(cfg, env)

    # ---- resume: model, optimizer, scheduler, data position, RNG
    ckpt = Checkpointer(out / "checkpoints", env, cfg.checkpoint.keep)
    start, resumed = 0, None
    if cfg.checkpoint.resume and (resumed := ckpt.latest()) is not None:
        st = ckpt.load(resumed, t.root, t.optimizer)
        t.scheduler.load_state_dict(st["scheduler"])
        t.loader.load_state_dict(st["loader"])
        t.nonfinite_skips = st["nonfinite_skips"]
        start = st["step"]
    metrics_path = out / cfg.logging.metrics_file
    if env.is_main:
        if resumed is not None:
            _trim_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
    barrier()

    # ---- supervised warm start (fresh runs only: a checkpoint already holds the warmed-up weights)
    if cfg.sft.steps and resumed is None:
        sft_log = MetricsLogger(metrics_path, enabled=env.is_main, total_steps=cfg.sft.steps,
                                progress=cfg.logging.progress, desc="sft")
        run_sft(t, records, log_fn=sft_log.log)
        sft_log.close()

    # ---- frozen reference policy for the k3 KL term (beta > 0): the policy as RL starts (after SFT)
    if cfg.algorithm.beta > 0:
        build_reference(t, resumed)

    # ---- RL loop; the next batch's videos decode on a background thread while a step runs
    t.prefetcher = Prefetcher(t.loader, functools.partial(decode_batch, source=t.source,
                                                          pool_frames=cfg.video.pool_frames, device=env.device),
                              depth=cfg.video.prefetch_batches)
    rl_log = MetricsLogger(metrics_path, enabled=env.is_main, total_steps=cfg.run.steps, initial_step=start,
                           progress=cfg.logging.progress, desc=cfg.algorithm.preset)
    every = cfg.checkpoint.every
    for step in range(start, cfg.run.steps):
        m = rl_step(t, step)
        if (every and (step + 1) % every == 0) or step + 1 == cfg.run.steps:
            with t.timer("checkpoint"):
                ckpt.save(step + 1, t.root, t.optimizer, trainer_state(t, step + 1), ref_root=t.ref_root)
            m.update(t.timer.reset())
        rl_log.log(m)
    rl_log.close()
    t.prefetcher.close()

    # ---- export + plot
    if cfg.checkpoint.export_hf:
        export_hf(t.root, t.policy.hf, t.tokenizer, out / "hf", env)
    if env.is_main and cfg.logging.plot and metrics_path.exists() and cfg.run.steps > 0:
        png = plot_metrics(metrics_path, out / "curves.png", title=f"{cfg.run.name} ({cfg.algorithm.preset})")
        log.info("wrote %s and %s", metrics_path, png)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
