"""One STRIVE/GRPO training step, stage after stage; each stage's logic lives in its own module:

    2 decode      pipeline.decode_batch (prefetched: video.prefetch.Prefetcher)
    3-4 views     pipeline.prepare_batch: keyframes, crops -> views.ViewBuilder -> B*K rollout requests
    5 rollout     rollout.generate_rollouts (+ rollout.shuffled_rollouts for T-GRPO), then the old log-probs
    6 rewards     rewards.step_rewards, (B, K, G), with T-GRPO's temporal bonus
    7 advantages  advantage.compute_advantages over the valid questions (+ DAPO's dynamic sampling)
    8 update      update.policy_update: mini-batches, micro-batches, the fused loss, optim.TrainOptimizer.step

All calls into the sharded policy go through `root(fn)` (see parallel.py): the rollout phase (scoring, sampling,
old log-probs) runs as one root call with the parameters unsharded once. Every rank makes the same sequence of
those calls whatever its data (see update.py).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import Any

import torch

from strive_engine.advantage import (advantage_sums, compute_advantages, dynamic_sampling_keep, empty_advantage_sums,
                                     metrics_from_sums)
from strive_engine.config import AlgorithmConfig
from strive_engine.parallel import all_reduce, unsharded
from strive_engine.pipeline import DecodedBatch, decode_batch, prepare_batch
from strive_engine.rewards import RewardOutput, step_rewards
from strive_engine.rollout import RolloutBatch, generate_rollouts, shuffled_rollouts
from strive_engine.trainer import Trainer
from strive_engine.update import logp_mismatch, on_policy, policy_logprobs, policy_update
from strive_engine.video.prefetch import Prefetcher


def step_seed(seed: int, step: int, rank: int) -> int:
    """Per-(step, rank) seed: sampling, crops and keyframe offsets repeat exactly on resume."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**31 - 1)


def _rollout_phase(t: Trainer, decoded: DecodedBatch, seed: int
                   ) -> tuple[RolloutBatch, RolloutBatch | None, torch.Tensor | None]:
    """Runs inside root(): keyframes, variants, G samples per variant, old log-probs — params unsharded once."""
    cfg = t.cfg
    with unsharded(t.root), torch.no_grad():
        requests = prepare_batch(decoded, t.scorer, t.views, cfg, seed, timer=t.timer)   # (B*K,)
        with t.timer("rollout"):
            rb = generate_rollouts(t.policy, t.tokenizer, requests, cfg.rollout, seed)
            shuffled = None
            if cfg.algorithm.temporal_bonus > 0:  # T-GRPO: each question's canonical view (variant 0), shuffled
                shuffled = shuffled_rollouts(t.policy, t.tokenizer, requests[::cfg.variants.num_variants],
                                             cfg.rollout, seed, t.views.geometry.temporal_patch)
        old_logp = None  # on-policy: the update's own forward gives them (update.on_policy)
        if not on_policy(cfg):
            with t.timer("old_logp"):
                old_logp = policy_logprobs(t.policy, rb, cfg)                    # (N,)
    return rb, shuffled, old_logp


def _ref_phase(t: Trainer, rb: RolloutBatch) -> torch.Tensor:
    """Runs inside the reference's root(): the frozen reference policy's log-probs for the k3 KL term. Its vision
    tower is the policy's only when the tower is frozen: then the rollout's visual tokens are reused, else
    recomputed."""
    if not t.cfg.model.freeze_vision:
        rb = dataclasses.replace(rb, inputs=rb.inputs.without_visual())
    with unsharded(t.reference.root), torch.no_grad():
        return policy_logprobs(t.reference.policy, rb, t.cfg)


def _advantages(rew: RewardOutput, valid: torch.Tensor, algo: AlgorithmConfig
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(B, K, G) advantages over the valid questions (0 elsewhere), (B, K, G) rows kept for the update (valid,
    minus DAPO's dynamically dropped groups), and the advantage metrics, global over ranks: every key of
    advantage.py's metrics on every step, from the counts and sums of every rank's valid questions
    (`advantage_sums`, one all-reduce: a collective, so every rank calls this each step), 0 where no rank has
    a valid question. Advantages themselves stay per rank (groups never span ranks)."""
    B, K, G = rew.reward.shape
    adv = torch.zeros(B, K, G)
    keep = valid.view(B, 1, 1).expand(B, K, G).clone()
    sums = empty_advantage_sums(rew.reward.device)
    if bool(valid.any()):
        res = compute_advantages(rew.reward[valid], algo.advantage_mode, algo.adv_eps)
        adv[valid] = res.advantages.float()
        sums = advantage_sums(rew.reward[valid], res)
        if algo.dynamic_sampling:
            keep[valid] = dynamic_sampling_keep(rew.accuracy[valid], algo.advantage_mode)
    return adv, keep, metrics_from_sums(all_reduce(sums))


def rl_step(t: Trainer, step: int, batches: Prefetcher | None = None) -> dict[str, Any]:
    """One step on the next batch of `batches` (the run's prefetcher over t.loader; None: the loader's next batch,
    decoded here). Returns the step's metrics, global over ranks (the same numbers on every rank) except time/*,
    rollout/engine_* and memory/*, which are this rank's: reward/*, rollout/*, data/* (`_global_stats`); adv/*
    (every key of advantage.py's metrics on every step, over every rank's valid questions: `_advantages`); loss,
    loss/*, grad_norm, update/micro_batches (update.policy_update says what each means)."""
    cfg, env = t.cfg, t.env
    K, G = cfg.variants.num_variants, cfg.rollout.num_generations
    t0 = time.perf_counter()
    seed = step_seed(cfg.run.seed, step, env.rank)

    # ---- stage 2: every video decoded once (prefetched while the previous step ran); bad ones become counted,
    # zero-weight placeholders. "decode" times only what the step waited for.
    with t.timer("decode"):
        if batches is not None:
            _, decoded, _ = batches.next()
        else:
            decoded = decode_batch(t.loader.next_batch(), t.source, cfg.video.pool_frames, device=env.device)
    # ---- stages 3-5 (+ old log-probs) inside one root forward; the reference's log-probs in its own
    rb, shuffled, old_logp = t.root(_rollout_phase, t, decoded, seed)
    ref_logp = None
    if t.reference is not None:
        with t.timer("ref_logp"):
            ref_logp = t.reference.root(_ref_phase, t, rb)

    # ---- stage 6: rewards (B, K, G); stage 7: advantages over the valid questions
    with t.timer("reward"):
        rew = step_rewards(rb.texts, decoded.records, K, G, cfg.reward,
                           shuffled.texts if shuffled is not None else None, cfg.algorithm.temporal_bonus)
    with t.timer("advantage"):
        adv, keep, adv_metrics = _advantages(rew, decoded.valid, cfg.algorithm)
    row_adv, row_keep = adv.reshape(-1), keep.reshape(-1)                       # (M,)

    # ---- stage 8: policy update, mu epochs x minibatches (times "update" (fwd/bwd) and "optimizer")
    upd = policy_update(t, rb, old_logp, row_adv, row_keep, ref_logp)

    # ---- metrics (global over ranks)
    m = _global_stats(rew, decoded.valid, rb)
    m.update({f"adv/{k}": v for k, v in adv_metrics.items()})
    m.update(upd)
    if old_logp is not None and rb.sampling_logprobs is not None:  # else policy_update measured it
        samp = rb.sampling_logprobs[rb.completion_mask.bool()].to(old_logp.device)    # (N,), the same packing
        m.update(logp_mismatch((samp - old_logp.float()).abs()))
    m.update({"step": step, "phase": "rl", "lr": t.optim.lr,
              "data/skipped_videos": _sum_counter(decoded.skipped),
              "data/kept_rows": int(all_reduce(row_keep.sum().float().reshape(1)).item())})  # global, as valid_samples
    if rb.engine_ms:  # the native engine's parts of the rollout stage (this rank's)
        m.update({f"rollout/engine_{k}": round(v, 3) for k, v in rb.engine_ms.items()})
    m.update(t.timer.reset())
    m["time/step"] = round(time.perf_counter() - t0, 4)
    return m


def _sum_counter(c: Counter) -> int:
    v = torch.tensor([float(sum(c.values()))])
    return int(all_reduce(v).item())


def _global_stats(rew: RewardOutput, valid: torch.Tensor, rb: RolloutBatch) -> dict[str, float]:
    reward, accuracy, fmt = rew.reward, rew.accuracy, rew.format                # (B, K, G)
    v = valid.view(-1, 1, 1).expand_as(reward).float()
    r = torch.nan_to_num(reward.float())
    lens = rb.completion_mask.sum(1).float().view_as(reward)
    s = torch.stack([v.sum(), (r * v).sum(), (r * r * v).sum(), (accuracy * v).sum(), (fmt * v).sum(),
                     (lens * v).sum(), (rb.truncated.float().view_as(reward) * v).sum(),
                     torch.tensor(float(rb.num_gen_tokens)),
                     rb.inputs.attention_mask.sum().float().cpu()])
    all_reduce(s)
    n = max(float(s[0]), 1.0)
    mean = float(s[1]) / n
    return {"reward/mean": mean, "reward/std": math.sqrt(max(float(s[2]) / n - mean * mean, 0.0)),
            "reward/accuracy": float(s[3]) / n, "reward/format": float(s[4]) / n,
            "rollout/completion_len": float(s[5]) / n, "rollout/truncated_frac": float(s[6]) / n,
            "rollout/gen_tokens": int(s[7]), "rollout/seq_tokens": int(s[8]), "data/valid_samples": int(s[0])}
