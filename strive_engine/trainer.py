"""The Trainer: everything an RL or SFT step needs, built complete by `build_trainer`.

    t = build_trainer(cfg, env)          # data -> model -> FSDP2 -> scorer, views -> optimizer -> KL reference
    m = step.rl_step(t, step)            # strive_engine.step;  sft.run_sft(t) for the warm start

Stages of the build, in order: the records (bad ones counted; rank 0 reports them), the per-rank loader and the
video decoder; the model, identical on every rank (seeded), sharded with FSDP2 per block and at the root; the
keyframe scorer and the view builder (the vision geometry read from the model's config); AdamW with its
warmup/cosine schedule over every optimizer step of the run; and, when algorithm.beta > 0, the frozen reference
policy for the k3 KL term. A resumed run loads its state into the built trainer (checkpoint.Checkpointer.resume);
a fresh one copies the policy into the reference after the warm start (`Reference.copy_from`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from strive_engine.config import Config
from strive_engine.data import RecordFileError, RecordLoader, load_records
from strive_engine.keyframes import FrameScorer, build_scorer
from strive_engine.metrics import StageTimer
from strive_engine.model import build_model
from strive_engine.optim import LRSchedule, TrainOptimizer
from strive_engine.parallel import (DistEnv, Root, all_agree, apply_fsdp, gathers_once, reshard_all,
                                    unsharded_extra_bytes)
from strive_engine.policy import Policy
from strive_engine.recompute import Recompute
from strive_engine.synthetic import ensure_synthetic
from strive_engine.video import VideoSource, build_source
from strive_engine.views import ViewBuilder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def train_records_path(cfg: Config) -> Path:
    """`data.path`, or the embedded synthetic set (generated on first use; ranks wait on a file lock)."""
    if cfg.data.path:
        return Path(cfg.data.path)
    train, _ = ensure_synthetic(os.path.expanduser(cfg.data.synthetic_dir), cfg.data.synthetic_size,
                                cfg.data.synthetic_seed, progress=cfg.logging.progress, **cfg.data.synthetic_options)
    return train


def build_sharded_policy(cfg: Config, env: DistEnv, activation_checkpointing: str = "false"
                         ) -> tuple[nn.Module, PreTrainedTokenizerBase, Policy, Root]:
    """(hf model, tokenizer, Policy, FSDP Root). With bf16 mixed precision (CUDA by default) the weights are
    fp32 masters and FSDP2 gathers them in bf16; on CPU everything is fp32. activation_checkpointing: auto | true
    | false (strive_engine.recompute; "auto" with a budget measures the layers' activations with one small
    forward here)."""
    mp = cfg.parallel.mixed_precision
    mp = ("bf16" if env.device.type == "cuda" else "off") if mp == "auto" else mp
    model_cfg = dataclasses.replace(cfg.model, dtype="float32") if mp == "bf16" else cfg.model
    hf, tokenizer = build_model(model_cfg, env.device)
    compute_bytes = 2 if mp == "bf16" else next(hf.parameters()).element_size()
    recompute = Recompute.build(hf, activation_checkpointing, cfg.parallel.memory_budget_gib, env.device,
                                compute_bytes)
    policy = Policy(hf, share_prompts=cfg.model.share_prompts, shared_attention=cfg.model.shared_attention)
    policy.recompute = recompute
    root = apply_fsdp(policy, hf, mixed_precision=mp, reshard_after_forward=cfg.parallel.reshard_after_forward,
                      device=env.device)
    recompute.track_gradients(hf.parameters())      # the FSDP2 shards (see track_gradients), before any forward
    if recompute.active:
        # a forward without backward leaves the root's (and the last layer's) params unsharded: reshard after each
        recompute.measure_paths(policy, lambda x: root(policy, x, lambda h, w, b: h.float().sum()),
                                recompute.probe_inputs(policy, tokenizer, cfg.rollout.prompt), lambda: reshard_all(root))
    return hf, tokenizer, policy, root


@dataclass
class Reference:
    """The frozen KL reference (algorithm.beta > 0): a second, identically sharded copy of the policy, no grads.
    Its weights are the policy's as RL starts (`copy_from` after the warm start), or a checkpoint's (key "ref")."""

    root: Root
    policy: Policy

    @classmethod
    def build(cls, cfg: Config, env: DistEnv) -> "Reference":
        _, _, policy, root = build_sharded_policy(cfg, env)
        root.requires_grad_(False)
        return cls(root, policy)

    def copy_from(self, root: nn.Module) -> None:
        """Take the weights of the policy's FSDP root (same sharding: shard to shard, no gather)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        set_model_state_dict(self.root, get_model_state_dict(root))


@dataclass
class Trainer:
    """What a step needs; `build_trainer` sets every field."""

    cfg: Config
    env: DistEnv
    root: Root                         # FSDP2 root wrapping `policy`: every call into the policy goes through it
    policy: Policy
    tokenizer: PreTrainedTokenizerBase
    scorer: FrameScorer                # keyframe scorer (stage 3)
    views: ViewBuilder                 # (frames, crops) -> rollout requests in the model's vision geometry
    source: VideoSource                # video decoder
    loader: RecordLoader               # this rank's batches of the training records
    optim: TrainOptimizer              # AdamW, schedule, clipping, non-finite skips (RL)
    timer: StageTimer
    reference: Reference | None        # frozen KL reference, exactly when algorithm.beta > 0
    gather_once: bool = False          # the update holds every weight gathered (parallel.accumulation)

    def __post_init__(self):
        beta = self.cfg.algorithm.beta
        if (beta > 0) != (self.reference is not None):
            raise ValueError(f"Trainer: algorithm.beta = {beta} " + ("> 0 needs the frozen reference policy"
                                                                      if beta > 0 else "has no use for a reference"))

    @property
    def params(self) -> list[nn.Parameter]:
        return self.optim.params


def build_trainer(cfg: Config, env: DistEnv) -> Trainer:
    # ---- data: records (bad ones counted; only rank 0 reports them), per-rank loader, video decoder
    records, report = load_records(train_records_path(cfg), video_root=cfg.data.video_root or None,
                                   extra_roots=cfg.data.extra_roots, quiet=not env.is_main)
    if not records:
        raise RecordFileError(f"no usable records in {report.path}: {report.summary()}")
    loader = RecordLoader(records, cfg.data.batch_size, env.rank, env.world_size, seed=cfg.run.seed,
                          shuffle=cfg.data.shuffle, report=report)
    source = build_source(cfg.video, env.device)

    # ---- model (identical init on every rank), FSDP2 per block and the root; the scorer and views read it
    torch.manual_seed(cfg.run.seed)
    hf, tokenizer, policy, root = build_sharded_policy(cfg, env, cfg.parallel.activation_checkpointing)
    scorer = build_scorer(cfg.keyframes, model=hf, tokenizer=tokenizer)
    views = ViewBuilder.for_model(hf.config, cfg.variants)

    # ---- optimizer: AdamW + warmup/cosine over all optimizer steps of the run
    o = cfg.optim
    updates = cfg.run.steps * cfg.algorithm.ppo_epochs * cfg.algorithm.minibatches
    optim = TrainOptimizer.build([p for p in root.parameters() if p.requires_grad], lr=o.lr,
                                 schedule=LRSchedule.for_rl(o, updates), grad_clip=o.grad_clip,
                                 betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)

    # ---- frozen reference policy for the k3 KL term (its weights: see Reference)
    reference = Reference.build(cfg, env) if cfg.algorithm.beta > 0 else None
    if reference is not None:
        log.info("reference policy for the KL term (beta=%g) built", cfg.algorithm.beta)
    # ---- the update's micro-batches: every weight gathered once per optimizer step where memory allows
    rec = policy.recompute
    extra = unsharded_extra_bytes(optim.params, env.world_size, rec.compute_bytes)
    # one choice for all ranks (uneven shards give them slightly different `extra`): the update's collectives differ
    gather_once = all_agree(gathers_once(cfg.parallel.accumulate_unsharded, env.world_size, extra, rec.budget))
    log.info("update: %s (parallel.accumulate_unsharded=%s; whole weights and gradients %.2f GiB more per rank%s)",
             "weights gathered once per optimizer step" if gather_once else "FSDP2 gathers per micro-batch",
             cfg.parallel.accumulate_unsharded, extra / 2**30,
             f" of a {rec.budget / 2**30:.1f} GiB budget" if rec.budget is not None else ", no memory budget")
    mbs, G = cfg.parallel.micro_batch_size, cfg.rollout.num_generations
    if mbs and mbs % G and policy.share_prompts and env.is_main:      # a setting: said once, not per rank
        log.warning("parallel.micro_batch_size=%d is not a multiple of rollout.num_generations=%d: prompt groups are "
                    "split across micro-batches, and their prompts and videos run in each part; use a multiple of %d, "
                    "or 0 (micro-batches by memory, whole groups)", mbs, G, G)
    return Trainer(cfg=cfg, env=env, root=root, policy=policy, tokenizer=tokenizer, scorer=scorer, views=views,
                   source=source, loader=loader, optim=optim, timer=StageTimer(), reference=reference,
                   gather_once=gather_once)
