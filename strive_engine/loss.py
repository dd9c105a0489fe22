"""Policy loss of the update step (stage 8): clipped surrogate over the lm_head, via strive_kernels.

The trainer takes the last hidden state at the positions that predict completion tokens (shifted by
one), packs them row-major into hidden (N, H) (N = completion tokens), and passes the lm_head weight
(V, H) (tied or not) -- this module holds no model code. Per token t of sequence i:

    ratio = exp(logp - old_logp),  L = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
            (+ beta * k3,  k3 = exp(ref - logp) - (ref - logp) - 1)

logits divided by the sampling temperature, aggregated over the mini-batch by `loss_agg`:
    token_mean               (DAPO)     sum_{i,t} m L / sum_{i,t} m
    seq_mean_token_mean      (GRPO)     mean_i (sum_t m L / sum_t m)
    seq_mean_token_sum_norm  (Dr.GRPO)  sum_{i,t} m L / (num_seqs * max_new_tokens)
The denominators are global: `loss_normaliser` counts them over the whole mini-batch mask and sums them
across ranks, so micro-batches and ranks each contribute their share of one loss.

Distributed convention (as verl): FSDP/DDP average gradients over ranks, so each denominator is divided
by the world size; then the averaged gradient is the gradient of the global loss. The loss a rank
returns is world_size x its share: the MEAN over ranks of the per-rank losses (each summed over its
micro-batches) is the global loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

import strive_kernels as sk
from strive_kernels import LOSS_AGGREGATIONS

__all__ = ["LossSpec", "LossNormaliser", "loss_normaliser", "policy_loss", "token_logprobs", "pack_positions"]


@dataclass(frozen=True, kw_only=True)
class LossSpec(sk.LossSpec):
    """The kernel's loss settings (temperature, eps_low, eps_high, beta, loss_agg; checked by strive_kernels)
    and the generation length that seq_mean_token_sum_norm divides by."""

    max_new_tokens: int

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ValueError(f"LossSpec.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def from_config(cls, algorithm_cfg, rollout_cfg) -> "LossSpec":
        """From `AlgorithmConfig` (preset already resolved) and `RolloutConfig`."""
        return cls(eps_low=float(algorithm_cfg.eps_low), eps_high=float(algorithm_cfg.eps_high),
                   beta=float(algorithm_cfg.beta), loss_agg=algorithm_cfg.loss_agg,
                   temperature=float(rollout_cfg.temperature), max_new_tokens=int(rollout_cfg.max_new_tokens))


class LossNormaliser(NamedTuple):
    """Global counts of one mini-batch and the denominator the kernel divides by."""

    denominator: torch.Tensor  # 0-d fp32: the mode's global count / world_size (see module docstring)
    num_tokens: torch.Tensor  # 0-d fp32: unmasked completion tokens, all ranks
    num_seqs: torch.Tensor  # 0-d fp32: sequences, all ranks
    world_size: int


def loss_normaliser(mask: torch.Tensor, loss_agg: str, max_new_tokens: int, group=None) -> LossNormaliser:
    """Denominator of `loss_agg` for the mini-batch whose completion mask on this rank is `mask` (S, L).

    Pass the whole mini-batch mask (all micro-batches), not one micro-batch. When torch.distributed is
    initialised the counts are summed over `group` (default: the world) with one all_reduce, so every rank
    of the group must call this for the same mini-batch. Per mode, with counts over all ranks:
        token_mean               denominator = max(tokens, 1) / world_size
        seq_mean_token_mean      denominator = max(seqs, 1) / world_size   (each sequence also divides by
                                 its own token count inside the kernel; all-masked rows count as sequences)
        seq_mean_token_sum_norm  denominator = seqs * max_new_tokens / world_size
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg {loss_agg!r} is not one of {', '.join(LOSS_AGGREGATIONS)}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be the (S, L) completion mask of the mini-batch, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = mask.device
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # NCCL reduces CUDA tensors only
    counts = torch.stack([mask.float().sum(), torch.full((), float(mask.shape[0]), device=mask.device)]).to(device)
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    tokens, seqs = counts[0], counts[1]
    if loss_agg == "token_mean":
        denom = tokens.clamp_min(1.0)
    elif loss_agg == "seq_mean_token_mean":
        denom = seqs.clamp_min(1.0)
    else:
        denom = seqs.clamp_min(1.0) * float(max_new_tokens)
    return LossNormaliser(denom / world, tokens, seqs, world)


def pack_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major packing of a (S, L) completion mask: (flat indices into S * L (N,), seq_ids (N,))."""
    flat = mask.reshape(-1).nonzero().squeeze(1)  # (N,)
    return flat, torch.div(flat, mask.shape[1], rounding_mode="floor")


def policy_loss(hidden, weight, targets, old_logp, advantages, mask, spec: LossSpec, normaliser, *, seq_ids=None,
                ref_logp=None, bias=None, backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch of packed completion tokens, and its diagnostics.

    hidden (N, H) requires grad; weight (V, H); targets (N,) completion token ids; old_logp (N,) from the
    rollout policy; advantages (N,) per token or (S,) per sequence; mask (N,) bool/float (0 = padding or
    a dropped token); normaliser: a `LossNormaliser` of the whole mini-batch (or its denominator);
    seq_ids (N,) in [0, S): needed for seq_mean_token_mean and per-sequence advantages (a sequence must lie
    in one call), e.g. torch.repeat_interleave(torch.arange(S), tokens_per_seq); ref_logp (N,) when
    spec.beta > 0 (also logs the KL when beta = 0).
    Returns (loss 0-d differentiable, stats of 0-d detached tensors: loss, clip_frac, clip_frac_low,
    clip_frac_high, entropy, num_tokens, and kl when ref_logp is given) -- no host sync.
    """
    if seq_ids is None and spec.loss_agg == "seq_mean_token_mean":
        raise ValueError("policy_loss with loss_agg='seq_mean_token_mean' needs seq_ids (N,): the sequence of each "
                         "packed token, e.g. torch.repeat_interleave(torch.arange(S), tokens_per_seq)")
    denom = normaliser.denominator if isinstance(normaliser, LossNormaliser) else normaliser
    out = sk.fused_logprob_loss(hidden, weight, targets, old_logp, advantages, mask, spec, bias=bias,
                                ref_logp=ref_logp, seq_ids=seq_ids, normaliser=denom, return_entropy=True,
                                backend=backend)
    stats = {"loss": out.loss.detach(), "clip_frac": out.clip_frac, "clip_frac_low": out.clip_frac_low,
             "clip_frac_high": out.clip_frac_high, "entropy": out.entropy_mean, "num_tokens": out.num_tokens}
    if out.kl is not None:
        stats["kl"] = out.kl
    return out.loss, stats


@torch.no_grad()
def token_logprobs(hidden, weight, targets, temperature: float, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """(N,) fp32 log-probs of `targets` under softmax(hidden @ weight.T (+ bias) / temperature), no grad:
    the old (rollout) and reference policies' log-probs, one matmul per chunk."""
    logp, _ = sk.fused_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, backend=backend)
    return logp
