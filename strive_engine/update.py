"""Stage 8: the policy's log-probs of a rollout batch, and the policy update over it.

    old_logp = policy_logprobs(t.policy, rb, cfg)                             # (N,) no grad, micro-batched
    metrics = policy_update(t, rb, old_logp, row_adv, row_keep, ref_logp)    # mu epochs x mini-batches

N is the number of scored completion tokens, packed row-major as `PolicyInputs.targets()` packs them. Call both
inside the FSDP2 root (`t.root(fn)`, or through `t.root(policy, ...)` as the update does). Every rank makes the same
sequence of calls into the sharded policy whatever its data: micro-batch counts are agreed with an all-reduce(max),
and a rank with nothing to train on runs a zero-weight micro-batch instead of skipping it (left out of the loss/*
statistics, which are token-weighted over every rank: `LossStats`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from strive_engine.config import Config
from strive_engine.loss import LossSpec, loss_normaliser, policy_loss, token_logprobs
from strive_engine.micro_batches import by_memory, held_bytes
from strive_engine.parallel import accumulation, all_reduce
from strive_engine.policy import Policy
from strive_engine.rollout import RolloutBatch
from strive_engine.trainer import Trainer


def policy_logprobs(policy: Policy, rb: RolloutBatch, cfg: Config) -> Tensor:
    """(N,) log-probs of the rollout's completion tokens under `policy`, micro-batched, no grad."""
    M = rb.inputs.num_rows
    mbs = cfg.parallel.micro_batch_size or M
    parts = []
    for lo in range(0, M, mbs):  # row-major chunks: concatenation keeps the packing order
        inputs = rb.inputs.select(torch.arange(lo, min(lo + mbs, M)))
        targets = inputs.targets()
        parts.append(policy(inputs, lambda h, w, b, y=targets: token_logprobs(h, w, y, cfg.rollout.temperature, b)))
    return torch.cat(parts)


def _row_token_counts(rb: RolloutBatch) -> Tensor:
    """(M,) scored tokens per row, on the host (row bookkeeping stays on the CPU; found on an H200)."""
    return rb.inputs.completion_mask[:, 1:].sum(1).long().cpu()


def _packed(values: Tensor, counts: Tensor, rows: Tensor) -> Tensor:
    """Entries of the selected rows from a row-major packed (N,) tensor."""
    starts = torch.cumsum(counts, 0) - counts
    idx = [torch.arange(int(starts[r]), int(starts[r] + counts[r])) for r in rows.tolist()]
    return values[torch.cat(idx).to(values.device)] if idx else values[:0]


def on_policy(cfg: Config) -> bool:
    """Whether the update's own forward gives the old log-probs: one optimizer step per rollout batch
    (algorithm.ppo_epochs == minibatches == 1), so every micro-batch's forward runs the rollout's weights, and
    the separate old-log-prob forward would compute the same numbers (algorithm.old_logp_forward forces it)."""
    a = cfg.algorithm
    return a.ppo_epochs == 1 and a.minibatches == 1 and not a.old_logp_forward


def _micro_batch(t: Trainer, rb: RolloutBatch, rows: Tensor, counts: Tensor, old_logp: Tensor | None,
                 row_adv: Tensor, ref_logp: Tensor | None, samp_all: Tensor | None, spec: LossSpec,
                 norm: Tensor) -> tuple[Tensor, dict, Tensor | None]:
    """Forward + backward of one micro-batch (rows of the rollout batch; none: a zero-weight pass over row 0,
    which keeps every rank's collectives aligned). Returns its loss, its loss statistics and, on-policy, the
    |sampling - trainer| log-prob gaps of its tokens."""
    cfg = t.cfg
    weight = 1.0
    if rows.numel() == 0:
        rows, weight = torch.zeros(1, dtype=torch.long), 0.0
    inputs = rb.inputs.select(rows)
    if not cfg.model.freeze_vision:  # gradients must reach the vision tower: run it again
        inputs = inputs.without_visual()
    targets = inputs.targets()
    dev = targets.device
    old = _packed(old_logp, counts, rows) if old_logp is not None else None
    adv = row_adv[rows].repeat_interleave(counts[rows]).to(dev)
    mask = torch.full(targets.shape, weight, device=dev)
    seq_ids = torch.repeat_interleave(torch.arange(len(rows)), counts[rows]).to(dev)
    ref = _packed(ref_logp, counts, rows) if ref_logp is not None else None

    def head(h, w, b):
        own = old
        if own is None:  # on-policy: this forward's own log-probs, without grad
            with torch.no_grad():
                own = token_logprobs(h, w, targets, cfg.rollout.temperature, b)
        loss, stats = policy_loss(h, w, targets, own, adv, mask, spec, norm, seq_ids=seq_ids, ref_logp=ref, bias=b)
        return loss, stats, own

    with t.timer("update"):
        loss, stats, own = t.root(t.policy, inputs, head)
        loss.backward()
    gap = (_packed(samp_all, counts, rows).to(dev) - own.float()).abs() if samp_all is not None and weight else None
    return loss, stats, gap


def _micro_batches(t: Trainer, rb: RolloutBatch, rows: Tensor) -> list[Tensor]:
    """A mini-batch's rows as micro-batches: parallel.micro_batch_size rows each, in order; with 0, whole prompt
    groups, as many per micro-batch as the memory budget holds (`strive_engine.micro_batches`; the whole
    mini-batch where nothing is planned: no budget, as on the CPU)."""
    mbs = t.cfg.parallel.micro_batch_size
    if mbs:
        return list(rows.split(mbs))
    policy = t.policy
    held = held_bytes(rb.inputs, *([t.reference.root] if t.reference is not None else []))
    parts = by_memory(rb.inputs, rows, getattr(policy, "recompute", None), policy.share_prompts,
                      policy.shared_attention, vision_runs=not t.cfg.model.freeze_vision, held=held)
    return parts if parts is not None else [rows] if rows.numel() else []


class LossStats:
    """The update's loss/* statistics, global over ranks. `add` takes each micro-batch's `policy_loss` stats
    (0-d device tensors; padding passes, which have no rows or no scored token, are left out) and keeps, on the
    device with no host sync, per key of `keys` (a fixed order: every rank's vector lines up) the token-weighted
    sum stat x num_tokens, and the token count; the host counts the real micro-batches. `sums()` is this rank's
    vector, to all-reduce; `metrics(summed, loss)` the logged values:
        loss/clip_frac, clip_frac_low, clip_frac_high, entropy, kl (kl with a reference policy only): means over
            every scored token of every real micro-batch of every update on every rank (token-weighted)
        loss/num_tokens   scored tokens per real micro-batch, over every rank
        update/tokens     scored tokens trained in this step: every update (epochs x mini-batches), every rank
        loss/loss         the update's loss as `policy_update`'s "loss" (a micro-batch's own loss is a share of
                          its mini-batch's, whose mean says nothing)
    A key without any token anywhere is 0.0 (a rank without any real micro-batch adds zeros)."""

    MEANS = ("clip_frac", "clip_frac_low", "clip_frac_high", "entropy")

    def __init__(self, with_kl: bool):
        self.keys = tuple(sorted(self.MEANS + (("kl",) if with_kl else ())))
        self._acc: Tensor | None = None  # (len(keys) + 1,) float64 on the stats' device: sums x tokens, tokens
        self.micro_batches = 0

    def add(self, stats: dict[str, Tensor], real: bool) -> None:
        if not real:
            return
        n = stats["num_tokens"].detach().double()
        v = torch.stack([stats[k].detach().double() * n for k in self.keys] + [n])
        self._acc = v if self._acc is None else self._acc + v
        self.micro_batches += 1

    def sums(self) -> Tensor:
        """(len(keys) + 2,) float64 on the host: this rank's sum of stat x tokens per key, tokens, real
        micro-batches."""
        acc = self._acc.cpu() if self._acc is not None else torch.zeros(len(self.keys) + 1, dtype=torch.float64)
        return torch.cat([acc, torch.tensor([float(self.micro_batches)], dtype=torch.float64)])

    def metrics(self, summed: Tensor, loss: float) -> dict[str, float]:
        """loss/* from `sums()` summed over the ranks, and the update's global loss."""
        s = summed.tolist()
        tokens, micro = s[-2], s[-1]
        means = {k: (v / tokens if tokens > 0 else 0.0) for k, v in zip(self.keys, s)}
        out = {"loss/loss": loss, **{f"loss/{k}": means[k] for k in self.MEANS},
               "loss/num_tokens": tokens / micro if micro > 0 else 0.0, "update/tokens": tokens}
        if "kl" in means:
            out["loss/kl"] = means["kl"]
        return out


def policy_update(t: Trainer, rb: RolloutBatch, old_logp: Tensor | None, row_adv: Tensor, row_keep: Tensor,
                  ref_logp: Tensor | None = None) -> dict:
    """algorithm.ppo_epochs x algorithm.minibatches optimizer steps over the kept rows (row_keep (M,) bool) with
    per-row advantages row_adv (M,), each mini-batch in micro-batches (`_micro_batches`: parallel.micro_batch_size
    rows, or sized by memory). Times "update" (forward + backward) and "optimizer"; returns the update's metrics,
    global over ranks (the same on every rank):
        loss                  the mini-batch loss over all ranks, averaged over the optimizer steps
        loss/*                `LossStats`: token-weighted over every rank's real micro-batches (padding passes,
                              which a rank with fewer micro-batches than its peers runs, are left out)
        grad_norm             the global gradient norm, averaged over the optimizer steps
        update/micro_batches  micro-batches per optimizer step (the all-reduced max: padding passes included)
        rollout/logp_mismatch_*  on-policy only (`logp_mismatch`)
    and memory/* (this rank's recompute plan, if any). The per-update losses and the loss statistics are summed
    over ranks in one all-reduce at the end.
    old_logp None (`on_policy`): each micro-batch's old log-probs are its own forward's, detached (the log-prob
    head once more without grad, instead of a whole forward of the model); the rollout/trainer mismatch is then
    measured here, over the trained rows."""
    cfg = t.cfg
    spec = LossSpec.from_config(cfg.algorithm, cfg.rollout)
    counts = _row_token_counts(rb)                                              # (M,)
    train_rows = row_keep.nonzero().flatten()
    samp_all = rb.sampling_logprobs[rb.completion_mask.bool()] \
        if old_logp is None and rb.sampling_logprobs is not None else None      # (N,) packed as old_logp
    gaps: list[Tensor] = []
    update_losses, grad_norms, skipped, micro_counts = [], [], 0, []
    loss_stats = LossStats(with_kl=ref_logp is not None)  # kl: the same on every rank (config)
    recompute = getattr(t.policy, "recompute", None)      # strive_engine.recompute: which layers are recomputed
    if recompute is not None:
        recompute.reset()                                  # its metrics: this update's forwards only
    gather_once = t.gather_once                           # build_trainer decided it (parallel.gathers_once)
    for _epoch in range(cfg.algorithm.ppo_epochs):
        for mb_rows in torch.tensor_split(train_rows, cfg.algorithm.minibatches):
            # The normaliser covers the whole mini-batch on every rank (all-reduced inside loss_normaliser).
            mb_mask = rb.inputs.completion_mask[mb_rows][:, 1:]
            norm = loss_normaliser(mb_mask, spec.loss_agg, spec.max_new_tokens)
            micro_losses = []
            with contextlib.ExitStack() as window:
                with t.timer("update"):  # gather_once gathers every weight here
                    micro = window.enter_context(accumulation(t.root, gather_once))
                    if recompute is not None:  # the shards' gradients again once the window closes, also on error
                        window.callback(recompute.expect_unsharded_gradients, None)
                        if gather_once:        # whole-size accumulators to come (the weights are gathered now)
                            recompute.expect_unsharded_gradients(t.env.world_size)
                    parts = _micro_batches(t, rb, mb_rows)        # 0: sized by memory (micro_batches.py)
                    n_micro = max(int(all_reduce(torch.tensor([float(len(parts))]), "max").item()), 1)
                micro_counts.append(n_micro)
                for i in range(n_micro):
                    micro(i == n_micro - 1)
                    if recompute is not None and gather_once and i > 0:   # the accumulators exist now
                        recompute.expect_unsharded_gradients(0)
                    rows = parts[i] if i < len(parts) else mb_rows[:0]
                    loss, stats, gap = _micro_batch(t, rb, rows, counts, old_logp, row_adv, ref_logp, samp_all,
                                                    spec, norm)
                    if gap is not None:
                        gaps.append(gap)
                    micro_losses.append(loss.detach())
                    loss_stats.add(stats, real=rows.numel() > 0 and int(counts[rows].sum()) > 0)  # host counts
            with t.timer("optimizer"):
                loss_sum = torch.stack(micro_losses).sum()  # this rank's (scaled) share of the mini-batch loss
                gn, ok = t.optim.step(loss_sum)
            update_losses.append(loss_sum)
            skipped += 0 if ok else 1
            grad_norms.append(float(gn))
    # One all-reduce: the per-update losses, then the loss statistics' sums. loss.py's convention: a rank's loss
    # is world_size x its share, so the global loss is the mean over ranks.
    n_up = len(update_losses)
    summed = all_reduce(torch.cat([torch.stack(update_losses).double().cpu(), loss_stats.sums()]))
    per_update = summed[:n_up].float() / t.env.world_size  # (updates,)
    out = {"loss": float(per_update.mean()),
           "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
           "nonfinite_skipped_updates": skipped, "nonfinite_skipped_total": t.optim.nonfinite_skips,
           "update/micro_batches": sum(micro_counts) / max(len(micro_counts), 1)}
    out.update(loss_stats.metrics(summed[n_up:], out["loss"]))
    if samp_all is not None:
        out.update(logp_mismatch(torch.cat(gaps) if gaps else samp_all[:0]))
    if recompute is not None:
        out.update(recompute.summary())
    return out


def logp_mismatch(gap: Tensor) -> dict[str, float]:
    """Rollout/trainer mismatch over tokens (global over ranks) from |log p_sample - log p_old| (N,): log p_sample
    the rollout's own log-prob under its sampling distribution, log p_old the trainer's forward (same weights).
    Numerical differences only, unless top-k / top-p truncates the distribution sampled from (then the gap is the
    truncation, the real off-policy amount)."""
    s = all_reduce(torch.stack([gap.sum(), torch.tensor(float(gap.numel()), device=gap.device)]).cpu())
    mx = all_reduce(gap.max().reshape(1).cpu() if gap.numel() else torch.zeros(1), "max")
    return {"rollout/logp_mismatch_mean": float(s[0]) / max(float(s[1]), 1.0), "rollout/logp_mismatch_max": float(mx)}
