"""Shared contract of the log-prob + GRPO/STRIVE loss: output type, input checks, per-token weights, stats.

Used by every path of `strive_kernels.fused_logprob_loss` (Triton, native torch, reference twin), so the
three agree on what the inputs mean. Per-token surrogate (token t with log-prob logp under the current
policy, old log-prob o, advantage A, optional reference log-prob r):

    ratio = exp(logp - o)
    L_t   = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)  [+ beta * k3]
    k3    = exp(r - logp) - (r - logp) - 1                                 (only when ref_logp is given)

Aggregation: loss = sum_t w_t * L_t with w_t = mask_t / D (token_mean, seq_mean_token_sum_norm) or
w_t = mask_t / (n_seq(t) * D) (seq_mean_token_mean), where n_seq(t) = sum of the mask over the tokens of
t's sequence in this call and D = `normaliser`, the mode's global denominator supplied by the caller:
    token_mean               D = number of unmasked tokens in the whole mini-batch (all ranks)
    seq_mean_token_mean      D = number of sequences in the whole mini-batch (all ranks)
    seq_mean_token_sum_norm  D = number of sequences * max_new_tokens
A sequence must not be split across calls (its n_seq is counted inside one call).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LOSS_AGG_ID = {name: i for i, name in enumerate(LOSS_AGGREGATIONS)}  # tl.constexpr codes
SEQ_MEAN = LOSS_AGG_ID["seq_mean_token_mean"]


class LossOutput(NamedTuple):
    """What `fused_logprob_loss` returns. Every tensor is fp32 and lives on the input device; the scalars
    are 0-d tensors (reading them is the caller's choice of host sync)."""

    loss: torch.Tensor  # 0-d, differentiable w.r.t. hidden, weight, bias
    logp: torch.Tensor  # (N,) log-probs of the targets under the current policy (detached)
    entropy: torch.Tensor | None  # (N,) entropy of the temperature-scaled distribution (detached), if asked
    clip_frac: torch.Tensor  # 0-d mask-weighted fraction of tokens whose clipped branch is active
    clip_frac_low: torch.Tensor  # 0-d ... with ratio < 1 - eps_low and A < 0
    clip_frac_high: torch.Tensor  # 0-d ... with ratio > 1 + eps_high and A > 0
    kl: torch.Tensor | None  # 0-d mask-weighted mean k3 to the reference, if ref_logp is given
    entropy_mean: torch.Tensor | None  # 0-d mask-weighted mean entropy, if asked
    num_tokens: torch.Tensor  # 0-d sum of the mask in this call


class TokenInputs(NamedTuple):
    """Per-token inputs after checking, on one device, in the dtypes the kernels read."""

    targets: torch.Tensor  # (N,) int64
    old_logp: torch.Tensor  # (N,) fp32
    advantages: torch.Tensor  # (N,) per token or (S,) per sequence, fp32
    mask: torch.Tensor  # (N,) fp32 (bool masks become 0/1)
    ref_logp: torch.Tensor | None  # (N,) fp32
    seq_ids: torch.Tensor | None  # (N,) int64 in [0, num_seq_slots)
    seq_counts: torch.Tensor | None  # (num_seq_slots,) fp32 sum of the mask per sequence (seq_mean only)
    denom: torch.Tensor  # 0-d fp32: D above
    per_seq_adv: bool
    loss_agg: int


def _vector(x: torch.Tensor, name: str, n: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, hidden is on {device}")


def check_matrices(hidden, weight, bias) -> None:
    """hidden (N, H), weight (V, H), bias (V,) | None: same dtype and device, no DTensor."""
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if type(t).__name__ == "DTensor":
            raise TypeError(f"{name} is a DTensor (FSDP-sharded); pass the unsharded local tensor, e.g. call "
                            f"inside the module's unshard() / forward, so the full (V, H) lm_head is visible")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H={hidden.shape[1]}) and weight (V, H={weight.shape[1]}) disagree on H")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device}, weight on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must be ({weight.shape[0]},) {weight.dtype} on {weight.device}, got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")


def check_targets(targets, n: int, vocab: int, device, mask=None) -> torch.Tensor:
    _vector(targets, "targets", n, device)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    targets = targets.long().contiguous()
    if device.type == "cpu" and n:  # value checks only where they cost no device sync
        bad = (targets < 0) | (targets >= vocab)
        if mask is not None:
            bad &= mask != 0
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {vocab}) on an "
                             f"unmasked token (out-of-range targets are allowed only where mask == 0)")
    return targets


def check_scalars(temperature, eps_low, eps_high, beta) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= eps_low < 1:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if not eps_high >= 0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")


def _segment_sum(values: torch.Tensor, ids: torch.Tensor, slots: int, deterministic: bool) -> torch.Tensor:
    """sum of values per id -> (slots,) fp32. index_add_ uses atomics on CUDA, which is exact for 0/1 masks
    but order-dependent for fractional ones; the deterministic path sorts and differences a fp64 cumsum."""
    if not deterministic:
        return torch.zeros(slots, dtype=torch.float32, device=values.device).index_add_(0, ids, values)
    order = torch.sort(ids, stable=True)
    csum = torch.nn.functional.pad(torch.cumsum(values[order.indices].double(), 0), (1, 0))  # (N + 1,)
    slot = torch.arange(slots, device=ids.device)
    lo = torch.searchsorted(order.values, slot, side="left")
    hi = torch.searchsorted(order.values, slot, side="right")
    return (csum[hi] - csum[lo]).float()


def prepare_tokens(hidden, weight, targets, old_logp, advantages, mask, *, ref_logp, seq_ids, normaliser,
                   loss_agg: str, beta: float, deterministic: bool = False) -> TokenInputs:
    """Check the per-token inputs and bring them into the form every path reads (see module docstring)."""
    n, device, vocab = hidden.shape[0], hidden.device, weight.shape[0]
    if loss_agg not in LOSS_AGG_ID:
        raise ValueError(f"loss_agg {loss_agg!r} is not one of {', '.join(map(repr, LOSS_AGGREGATIONS))}")
    agg = LOSS_AGG_ID[loss_agg]
    _vector(mask, "mask", n, device)
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise TypeError(f"mask must be bool or floating, got {mask.dtype}")
    mask = mask.float().contiguous()
    if device.type == "cpu" and n and bool((mask < 0).any()):
        raise ValueError("mask has negative entries; it must be a 0/1 (or non-negative weight) mask")
    targets = check_targets(targets, n, vocab, device, mask)
    _vector(old_logp, "old_logp", n, device)
    old_logp = old_logp.float().contiguous()
    if ref_logp is not None:
        _vector(ref_logp, "ref_logp", n, device)
        ref_logp = ref_logp.float().contiguous()
    elif beta > 0:
        raise ValueError(f"beta = {beta} > 0 needs ref_logp (the frozen reference policy's log-probs)")
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1:
        raise ValueError(f"advantages must be a 1-d tensor: (N={n},) per token or (S,) per sequence")
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device}, hidden is on {device}")
    per_seq = advantages.shape[0] != n
    advantages = advantages.float().contiguous()
    slots = advantages.shape[0] if per_seq else n
    if seq_ids is None and (per_seq or agg == SEQ_MEAN):
        why = f"advantages has {advantages.shape[0]} != N={n} entries (per sequence)" if per_seq \
            else "loss_agg='seq_mean_token_mean' averages per sequence"
        raise ValueError(f"seq_ids (N,) is required: {why}")
    if seq_ids is not None:
        _vector(seq_ids, "seq_ids", n, device)
        if seq_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"seq_ids must be int64 (or int32), got {seq_ids.dtype}")
        seq_ids = seq_ids.long().contiguous()
        if device.type == "cpu" and n and bool(((seq_ids < 0) | (seq_ids >= slots)).any()):
            bad = int(seq_ids[(seq_ids < 0) | (seq_ids >= slots)][0])
            raise ValueError(f"seq_ids contains {bad}, outside [0, {slots}) "
                             f"({'len(advantages)' if per_seq else 'N'} slots)")
    seq_counts = _segment_sum(mask, seq_ids, slots, deterministic) if agg == SEQ_MEAN else None
    denom = _normaliser(normaliser, agg, mask, seq_ids, slots, device)
    return TokenInputs(targets, old_logp, advantages, mask, ref_logp, seq_ids, seq_counts, denom, per_seq, agg)


def _normaliser(normaliser, agg: int, mask, seq_ids, slots: int, device) -> torch.Tensor:
    """The global denominator D as a 0-d fp32 tensor on `device` (no host sync for tensors)."""
    if normaliser is None:  # this call is the whole batch
        if agg == LOSS_AGG_ID["token_mean"]:
            return mask.sum().clamp_min(1.0)
        if agg == SEQ_MEAN:  # number of distinct sequences present in the call
            seen = torch.zeros(slots, dtype=torch.float32, device=device).index_fill_(0, seq_ids, 1.0)
            return seen.sum().clamp_min(1.0)
        raise ValueError("loss_agg='seq_mean_token_sum_norm' needs normaliser = num_seqs * max_new_tokens "
                         "(the kernel does not know max_new_tokens)")
    if isinstance(normaliser, torch.Tensor):
        if normaliser.numel() != 1:
            raise ValueError(f"normaliser must be a scalar, got shape {tuple(normaliser.shape)}")
        d = normaliser.detach().reshape(()).to(device=device, dtype=torch.float32)
        if d.device.type == "cpu" and not float(d) > 0:
            raise ValueError(f"normaliser must be > 0, got {float(d)}")
        return d
    if not float(normaliser) > 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser}")
    return torch.full((), float(normaliser), dtype=torch.float32, device=device)


def token_weights(tok: TokenInputs) -> torch.Tensor:
    """(N,) fp32 w_t of the module docstring (0 where mask == 0)."""
    if tok.loss_agg == SEQ_MEAN:
        cnt = tok.seq_counts[tok.seq_ids]
        w = tok.mask / (cnt * tok.denom)
    else:
        w = tok.mask / tok.denom
    return torch.where(tok.mask != 0, w, torch.zeros_like(w))


def token_advantages(tok: TokenInputs) -> torch.Tensor:
    """(N,) fp32 advantage of each token (gathers per-sequence advantages)."""
    return tok.advantages[tok.seq_ids] if tok.per_seq_adv else tok.advantages


def summarise(tok: TokenInputs, entropy, clip_code, k3) -> torch.Tensor:
    """Mask-weighted means of the per-token diagnostics -> (5,) fp32 [clip_low, clip_high, kl, entropy,
    num_tokens]; kl / entropy are 0 when not computed. Stays on device (no host sync)."""
    m = tok.mask
    count = m.sum()
    inv = 1.0 / count.clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.zeros((), dtype=torch.float32, device=m.device)
    low = (m * (clip_code < 0)).sum() * inv
    high = (m * (clip_code > 0)).sum() * inv
    kl = (torch.where(m != 0, m * k3, zero)).sum() * inv if k3 is not None and k3.numel() else zero
    ent = (torch.where(m != 0, m * entropy, zero)).sum() * inv if entropy is not None and entropy.numel() else zero
    return torch.stack([low, high, kl, ent, count])


def build_output(loss, logp, entropy, stats, has_ref: bool, with_entropy: bool) -> LossOutput:
    return LossOutput(loss=loss, logp=logp, entropy=entropy if with_entropy else None,
                      clip_frac=stats[0] + stats[1], clip_frac_low=stats[0], clip_frac_high=stats[1],
                      kl=stats[2] if has_ref else None, entropy_mean=stats[3] if with_entropy else None,
                      num_tokens=stats[4])
