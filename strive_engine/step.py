"""One STRIVE/GRPO training step: rollout phase (stages 3–5), rewards and advantages (6–7), policy update (8).

All calls into the sharded policy go through `root(fn)` (see parallel.py). Every rank makes the same sequence of
those calls whatever its data: micro-batch counts are agreed with an all-reduce(max), and a rank with nothing to
train on runs a zero-weight micro-batch instead of skipping it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from strive_engine.advantage import compute_advantages, dynamic_sampling_keep
from strive_engine.config import Config
from strive_engine.data import RecordLoader
from strive_engine.loss import LossSpec, loss_normaliser, policy_loss, token_logprobs
from strive_engine.metrics import StageTimer
from strive_engine.model import Policy
from strive_engine.parallel import DistEnv, all_reduce, unsharded
from strive_engine.pipeline import decode_batch, prepare_batch
from strive_engine.rewards import compute_rewards, temporal_bonus
from strive_engine.rollout import RolloutRequest, generate_rollouts, shuffle_frames


@dataclass
class Trainer:
    """What a step needs; built once by train.py."""

    cfg: Config
    env: DistEnv
    root: torch.nn.Module          # FSDP root (parallel.Root) wrapping `policy`
    policy: Policy
    tokenizer: Any
    scorer: Any
    source: Any
    loader: RecordLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    timer: StageTimer
    prefetcher: Any = None         # video.prefetch.Prefetcher over `loader` (built after a resume)
    ref_root: Any = None           # frozen reference policy (FSDP root) when algorithm.beta > 0
    ref_policy: Any = None
    nonfinite_skips: int = 0

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.root.parameters() if p.requires_grad]


def step_seed(seed: int, step: int, rank: int) -> int:
    """Per-(step, rank) seed: sampling, crops and keyframe offsets repeat exactly on resume."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**31 - 1)


def _rollout_phase(t: Trainer, decoded, seed: int):
    """Runs inside root(): keyframes, variants, G samples per variant, old log-probs — params unsharded once."""
    cfg = t.cfg
    with unsharded(t.root), torch.no_grad():
        prepared = prepare_batch(decoded, t.scorer, cfg, seed, timer=t.timer)
        with t.timer("rollout"):
            rb = generate_rollouts(t.policy, t.tokenizer, prepared.requests, cfg.rollout, seed)
            shuffled = None
            if cfg.algorithm.temporal_bonus > 0:  # T-GRPO: the canonical view with its frames shuffled
                gen = torch.Generator().manual_seed(seed + 1)
                K = cfg.variants.num_variants
                reqs = []
                for r in prepared.requests[::K]:
                    pix, _ = shuffle_frames(r.pixel_values, r.grid_thw, gen)
                    reqs.append(RolloutRequest(r.question, pix, r.grid_thw, r.second_per_grid_ts))
                shuffled = generate_rollouts(t.policy, t.tokenizer, reqs, cfg.rollout, seed + 2)
        with t.timer("old_logp"):
            old_logp = _logprobs(t.policy, rb, cfg)                             # (N,)
    return prepared, rb, shuffled, old_logp


def _logprobs(policy: Policy, rb, cfg: Config) -> torch.Tensor:
    """(N,) log-probs of the rollout's completion tokens under `policy`, micro-batched, no grad."""
    M = rb.inputs.num_rows
    mbs = cfg.parallel.micro_batch_size or M
    parts = []
    for lo in range(0, M, mbs):  # row-major chunks: concatenation keeps the packing order
        inputs = rb.inputs.select(torch.arange(lo, min(lo + mbs, M)))
        targets = inputs.targets()
        parts.append(policy(inputs, lambda h, w, b, y=targets: token_logprobs(h, w, y, cfg.rollout.temperature, b)))
    return torch.cat(parts)


def _ref_phase(t: Trainer, rb) -> torch.Tensor:
    """Runs inside ref_root(): the frozen reference policy's log-probs for the k3 KL term. Its vision tower is
    the policy's only when the tower is frozen: then the rollout's visual tokens are reused, else recomputed."""
    if not t.cfg.model.freeze_vision:
        rb = dataclasses.replace(rb, inputs=rb.inputs.without_visual())
    with unsharded(t.ref_root), torch.no_grad():
        return _logprobs(t.ref_policy, rb, t.cfg)


def _row_token_counts(rb) -> torch.Tensor:
    """(M,) scored tokens per row, on the host (row bookkeeping stays on the CPU; found on an H200)."""
    return rb.inputs.completion_mask[:, 1:].sum(1).long().cpu()


def _packed(values: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Entries of the selected rows from a row-major packed (N,) tensor."""
    starts = torch.cumsum(counts, 0) - counts
    idx = [torch.arange(int(starts[r]), int(starts[r] + counts[r])) for r in rows.tolist()]
    return values[torch.cat(idx).to(values.device)] if idx else values[:0]


def rl_step(t: Trainer, step: int) -> dict[str, Any]:
    cfg, env = t.cfg, t.env
    B, K, G = cfg.data.batch_size, cfg.variants.num_variants, cfg.rollout.num_generations
    if cfg.algorithm.beta > 0 and t.ref_root is None:
        raise RuntimeError(f"algorithm.beta = {cfg.algorithm.beta} > 0 needs the frozen reference policy: "
                           "call strive_engine.train.build_reference(trainer, resumed) before the first RL step")
    t0 = time.perf_counter()
    seed = step_seed(cfg.run.seed, step, env.rank)

    # ---- stage 2: decode every video once (prefetched while the previous step ran); bad ones become
    # counted, zero-weight placeholders. "decode" times only what the step waited for.
    with t.timer("decode"):
        if t.prefetcher is not None:
            records, decoded, _ = t.prefetcher.next()
        else:
            records = t.loader.next_batch()
            decoded = decode_batch(records, t.source, cfg.video.pool_frames, device=env.device)
    # ---- stages 3-5 (+ old log-probs) inside one root forward
    prepared, rb, shuffled, old_logp = t.root(_rollout_phase, t, decoded, seed)
    ref_logp = None
    if t.ref_root is not None:
        with t.timer("ref_logp"):
            ref_logp = t.ref_root(_ref_phase, t, rb)

    # ---- stage 6: rewards (B, K, G)
    with t.timer("reward"):
        answers = [records[i // (K * G)].answer for i in range(B * K * G)]
        ptypes = [records[i // (K * G)].problem_type for i in range(B * K * G)]
        rew = compute_rewards(rb.texts, answers, ptypes, cfg.reward)
        reward = rew.reward.view(B, K, G).clone()
        accuracy = rew.accuracy.view(B, K, G)
        if shuffled is not None:  # shuffled rows: question b, sample g  ->  (B, G)
            acc_sh = compute_rewards(shuffled.texts, [r.answer for r in records for _ in range(G)],
                                     [r.problem_type for r in records for _ in range(G)], cfg.reward).accuracy
            acc_sh = acc_sh.view(B, G)
            bonus = temporal_bonus(accuracy.reshape(B, K * G), acc_sh, cfg.algorithm.temporal_bonus,
                                   cfg.reward.temporal_mu)
            reward += bonus.view(B, K, G)
    valid = decoded.valid                                                        # (B,)

    # ---- stage 7: advantages over the valid questions
    with t.timer("advantage"):
        adv = torch.zeros(B, K, G)
        keep = valid.view(B, 1, 1).expand(B, K, G).clone()
        adv_metrics: dict[str, float] = {}
        if bool(valid.any()):
            res = compute_advantages(reward[valid], cfg.algorithm.advantage_mode, cfg.algorithm.adv_eps)
            adv[valid] = res.advantages.float()
            adv_metrics = res.metrics
            if cfg.algorithm.dynamic_sampling:
                keep[valid] = dynamic_sampling_keep(accuracy[valid], cfg.algorithm.advantage_mode)
    row_adv, row_keep = adv.reshape(-1), keep.reshape(-1)                       # (M,)

    # ---- stage 8: policy update, mu epochs x minibatches
    upd = _update(t, rb, old_logp, row_adv, row_keep, ref_logp)  # times "update" (fwd/bwd) and "optimizer"

    # ---- metrics (global over ranks)
    m = _global_stats(reward, accuracy, rew.format.view(B, K, G), valid, rb)
    m.update({f"adv/{k}": v for k, v in adv_metrics.items()})
    m.update(upd)
    m.update(_mismatch(rb, old_logp))
    m.update({"step": step, "phase": "rl", "lr": t.scheduler.get_last_lr()[0],
              "data/skipped_videos": _sum_counter(decoded.skipped),
              "data/kept_rows": int(all_reduce(row_keep.sum().float().reshape(1)).item())})  # global, as valid_samples
    m.update(t.timer.reset())
    m["time/step"] = round(time.perf_counter() - t0, 4)
    return m


def _mismatch(rb, old_logp: torch.Tensor) -> dict[str, float]:
    """Rollout/trainer mismatch over the step's completion tokens (global): |log p_sample - log p_old|, where
    log p_sample is the rollout's own log-prob under its sampling distribution and log p_old the trainer's
    forward (same weights). Numerical differences only, unless top-k / top-p truncates the distribution sampled
    from (then the gap is the truncation, the real off-policy amount)."""
    if rb.sampling_logprobs is None:
        return {}
    samp = rb.sampling_logprobs[rb.completion_mask.bool()].to(old_logp.device)       # (N,), the same packing
    d = (samp - old_logp.float()).abs()
    s = all_reduce(torch.stack([d.sum(), torch.tensor(float(d.numel()), device=d.device)]).cpu())
    mx = all_reduce(d.max().reshape(1).cpu() if d.numel() else torch.zeros(1), "max")
    return {"rollout/logp_mismatch_mean": float(s[0]) / max(float(s[1]), 1.0), "rollout/logp_mismatch_max": float(mx)}


def _sum_counter(c) -> int:
    v = torch.tensor([float(sum(c.values()))])
    return int(all_reduce(v).item())


def _global_stats(reward, accuracy, fmt, valid, rb) -> dict[str, float]:
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


def _optimizer_step(t: Trainer, loss_sum: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Clip and step; a non-finite loss or gradient never reaches the optimizer (skipped and counted).
    Every rank takes the same decision: the grad norm is global already, the loss flag is all-reduced."""
    gn = torch.nn.utils.clip_grad_norm_(t.params, t.cfg.optim.grad_clip or float("inf"))
    gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
    bad = all_reduce(torch.tensor([0.0 if bool(torch.isfinite(loss_sum)) else 1.0]), "max")
    ok = bool(torch.isfinite(gn)) and bad.item() == 0
    if ok:
        t.optimizer.step()
    else:
        t.nonfinite_skips += 1
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    return gn, ok


def _update(t: Trainer, rb, old_logp: torch.Tensor, row_adv: torch.Tensor, row_keep: torch.Tensor,
            ref_logp: torch.Tensor | None = None) -> dict:
    cfg = t.cfg
    spec = LossSpec.from_config(cfg.algorithm, cfg.rollout)
    counts = _row_token_counts(rb)                                              # (M,)
    train_rows = row_keep.nonzero().flatten()
    mbs_cfg = cfg.parallel.micro_batch_size
    update_losses, stats_acc, grad_norms, skipped = [], {}, [], 0
    for _epoch in range(cfg.algorithm.ppo_epochs):
        for mb_rows in torch.tensor_split(train_rows, cfg.algorithm.minibatches):
            # The normaliser covers the whole mini-batch on every rank (all-reduced inside loss_normaliser).
            mb_mask = rb.inputs.completion_mask[mb_rows][:, 1:]
            norm = loss_normaliser(mb_mask, spec.loss_agg, spec.max_new_tokens)
            mbs = mbs_cfg or max(len(mb_rows), 1)
            n_micro = torch.tensor([float(math.ceil(len(mb_rows) / mbs))])
            n_micro = max(int(all_reduce(n_micro, "max").item()), 1)
            micro_losses = []
            for i in range(n_micro):
                rows = mb_rows[i * mbs:(i + 1) * mbs]
                weight = 1.0
                if rows.numel() == 0:  # keep collectives aligned: a zero-weight pass over row 0
                    rows, weight = torch.zeros(1, dtype=torch.long), 0.0
                inputs = rb.inputs.select(rows)
                if not cfg.model.freeze_vision:  # gradients must reach the vision tower: run it again
                    inputs = inputs.without_visual()
                targets = inputs.targets()
                old = _packed(old_logp, counts, rows)
                adv = row_adv[rows].repeat_interleave(counts[rows]).to(old.device)
                mask = torch.full_like(old, weight)
                seq_ids = torch.repeat_interleave(torch.arange(len(rows)), counts[rows]).to(old.device)

                ref = _packed(ref_logp, counts, rows) if ref_logp is not None else None

                def head(h, w, b, targets=targets, old=old, adv=adv, mask=mask, seq_ids=seq_ids, ref=ref):
                    return policy_loss(h, w, targets, old, adv, mask, spec, norm, seq_ids=seq_ids, ref_logp=ref,
                                       bias=b)

                with t.timer("update"):
                    loss, stats = t.root(t.policy, inputs, head)
                    loss.backward()
                micro_losses.append(loss.detach())
                for k, v in stats.items():
                    stats_acc.setdefault(k, []).append(v.detach().float())
            with t.timer("optimizer"):
                loss_sum = torch.stack(micro_losses).sum()  # this rank's (scaled) share of the mini-batch loss
                gn, ok = _optimizer_step(t, loss_sum)
            update_losses.append(loss_sum)
            skipped += 0 if ok else 1
            grad_norms.append(float(gn))
    # loss.py's convention: a rank's loss is world_size x its share, so the global loss is the mean over ranks.
    per_update = all_reduce(torch.stack(update_losses).float()) / t.env.world_size  # (updates,)
    out = {"loss": float(per_update.mean()),
           "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
           "nonfinite_skipped_updates": skipped, "nonfinite_skipped_total": t.nonfinite_skips}
    for k, v in stats_acc.items():
        out[f"loss/{k}"] = float(torch.stack(v).mean())
    return out
