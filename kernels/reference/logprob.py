"""Pure-torch twin of `strive_kernels.fused_logprob_loss` / `fused_logprobs`: the test oracle.

Written to be obviously right rather than fast: logits -> log_softmax -> gather, the clipped surrogate
written as in the papers, and gradients from autograd (not the analytic dL/dlogits of the fast paths).
Tokens are processed in chunks of `chunk_rows`; with gradients each chunk runs under activation
checkpointing, so at most one (chunk_rows, V) block of logits (in the accumulation dtype) is alive at a
time, in forward and in backward. Accumulation dtype: fp64 for fp64 inputs (the oracle), fp32 otherwise.
Contract and aggregation: see `strive_kernels.logprob_common`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from strive_kernels.logprob_common import (SEQ_MEAN, LossOutput, check_matrices, check_scalars, check_targets,
                                           prepare_tokens)

_DEFAULT_CHUNK_BYTES = 64 * 2**20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n: int, vocab: int, dtype: torch.dtype, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        chunk_rows = _DEFAULT_CHUNK_BYTES // max(1, vocab * 3 * torch.finfo(_acc_dtype(dtype)).bits // 8)
    return max(1, min(int(chunk_rows), max(n, 1)))


def _log_softmax_rows(h, weight, bias, targets, temperature):
    """(c, H) rows -> logp (c,) of the targets and log_softmax (c, V), in the accumulation dtype."""
    logits = F.linear(h, weight, bias)  # (c, V) in the input dtype, as a model's lm_head would produce
    logp_all = torch.log_softmax(logits.to(_acc_dtype(logits.dtype)) / temperature, dim=-1)
    valid = (targets >= 0) & (targets < weight.shape[0])
    logp = logp_all.gather(1, targets.clamp(0, weight.shape[0] - 1)[:, None]).squeeze(1)
    return torch.where(valid, logp, torch.full_like(logp, float("nan"))), logp_all


def _surrogate(logp, old, adv, ref, eps_low, eps_high, beta):
    """Per-token clipped surrogate (+ beta * k3): returns (L, k3 or None)."""
    ratio = torch.exp(logp - old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if ref is None:
        return loss, None
    d = ref - logp
    k3 = torch.exp(d) - d - 1.0
    return loss + beta * k3, k3


def _loss_piece(h, weight, bias, targets, old, adv, ref, w, temperature, eps_low, eps_high, beta, with_entropy):
    logp, logp_all = _log_softmax_rows(h, weight, bias, targets, temperature)
    loss, _ = _surrogate(logp, old, adv, ref, eps_low, eps_high, beta)
    piece = torch.where(w != 0, w * loss, torch.zeros_like(loss)).sum()
    ent = torch.special.entr(logp_all.exp()).sum(-1) if with_entropy else logp.new_empty(0)
    return piece, logp.detach(), ent.detach()


def fused_logprob_loss_reference(hidden, weight, targets, old_logp, advantages, mask, *, bias=None, ref_logp=None,
                                 seq_ids=None, temperature=1.0, eps_low=0.2, eps_high=0.2, beta=0.0,
                                 loss_agg="seq_mean_token_mean", normaliser=None, return_entropy=False,
                                 deterministic=False, chunk_rows=None) -> LossOutput:
    """Same contract as `strive_kernels.fused_logprob_loss`; outputs in the accumulation dtype."""
    check_matrices(hidden, weight, bias)
    check_scalars(temperature, eps_low, eps_high, beta)
    tok = prepare_tokens(hidden, weight, targets, old_logp, advantages, mask, ref_logp=ref_logp, seq_ids=seq_ids,
                         normaliser=normaliser, loss_agg=loss_agg, beta=beta, deterministic=deterministic)
    n, acc = hidden.shape[0], _acc_dtype(hidden.dtype)
    # Per-token weights written out independently of the fast paths (and in the accumulation dtype).
    m, denom = tok.mask.to(acc), tok.denom.to(acc)
    if tok.loss_agg == SEQ_MEAN:
        w = m / (tok.seq_counts.to(acc)[tok.seq_ids] * denom)
    else:
        w = m / denom
    w = torch.where(m != 0, w, torch.zeros_like(w))
    adv = (tok.advantages[tok.seq_ids] if tok.per_seq_adv else tok.advantages).to(acc)
    old = tok.old_logp.to(acc)
    ref = tok.ref_logp.to(acc) if tok.ref_logp is not None else None

    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    rows = _chunk_rows(n, weight.shape[0], hidden.dtype, chunk_rows)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    logps, ents = [], []
    for a in range(0, n, rows):
        s = slice(a, min(a + rows, n))
        args = (hidden[s], weight, bias, tok.targets[s], old[s], adv[s], None if ref is None else ref[s], w[s],
                temperature, eps_low, eps_high, beta, return_entropy)
        if grad and n > rows:  # recompute each chunk in backward instead of keeping its logits
            piece, lp, ent = checkpoint(_loss_piece, *args, use_reentrant=False)
        else:
            piece, lp, ent = _loss_piece(*args)
        total = total + piece
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps) if logps else old.new_empty(0)
    entropy = torch.cat(ents) if return_entropy and ents else None

    # Diagnostics from the detached log-probs, written out again (not shared with the fast paths).
    with torch.no_grad():
        ratio = torch.exp(logp - old)
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        count = m.sum()
        inv = 1.0 / count.clamp_min(torch.finfo(torch.float32).tiny)
        live = m != 0
        zero = torch.zeros_like(m)
        k3 = _surrogate(logp, old, adv, ref, eps_low, eps_high, beta)[1] if ref is not None else None
        kl = torch.where(live, m * k3, zero).sum() * inv if k3 is not None else None
        ent_mean = torch.where(live, m * entropy, zero).sum() * inv if entropy is not None else None
    return LossOutput(loss=total, logp=logp, entropy=entropy, clip_frac=(m * (low | high)).sum() * inv,
                      clip_frac_low=(m * low).sum() * inv, clip_frac_high=(m * high).sum() * inv, kl=kl,
                      entropy_mean=ent_mean, num_tokens=count)


@torch.no_grad()
def fused_logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False,
                             chunk_rows=None):
    """(logp (N,), entropy (N,) | None) in the accumulation dtype; targets outside [0, V) give NaN."""
    check_matrices(hidden, weight, bias)
    check_scalars(temperature, 0.0, 0.0, 0.0)
    n = hidden.shape[0]
    targets = check_targets(targets, n, weight.shape[0], hidden.device)
    rows = _chunk_rows(n, weight.shape[0], hidden.dtype, chunk_rows)
    logps, ents = [], []
    for a in range(0, n, rows):
        lp, logp_all = _log_softmax_rows(hidden[a:a + rows], weight, bias, targets[a:a + rows], temperature)
        logps.append(lp)
        if return_entropy:
            ents.append(torch.special.entr(logp_all.exp()).sum(-1))
    acc = _acc_dtype(hidden.dtype)
    logp = torch.cat(logps) if logps else torch.empty(0, dtype=acc, device=hidden.device)
    if not return_entropy:
        return logp, None
    return logp, torch.cat(ents) if ents else torch.empty(0, dtype=acc, device=hidden.device)
