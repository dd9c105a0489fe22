"""Pure-torch twin of `strive_kernels.sample_tokens`: one token per row from softmax(logits / temperature), or the
argmax, and that token's log-probability. The contract both paths keep:

    token, logp = sample_tokens(logits, temperature, greedy=..., seed=..., step=...)
        logits (M, V) any float dtype (the lm_head's output, bf16 on GPUs), M >= 1, V >= 1
        sampled: token ~ softmax(logits.float() / temperature), each row independently;
                 logp = log_softmax(logits.float() / temperature)[token]
        greedy:  token = the first index of the row's maximum logit (as torch.argmax);
                 logp = log_softmax(logits.float())[token]   (temperature not applied, as HF reports greedy scores)
        token (M,) int64, logp (M,) fp32; no host sync, no data-dependent shape (graph-capturable)

The noise differs between the two paths, the distribution does not. This twin draws it from the default generator
of the logits' device (`Tensor.exponential_`: the caller seeds it, and a captured CUDA graph advances the
generator's philox offset on every replay); `seed` / `step` are not read. The Triton kernel reads counter-based
Philox keyed by `seed + step` (device tensors) at the element's (row, column): see strive_kernels.sampling.

Draws use the exponential race: argmax_i (log p_i - log E_i) with E_i ~ Exp(1) i.i.d. is a draw from p (the Gumbel-max
trick: -log E is a standard Gumbel), which needs no cumulative sum and no `torch.multinomial` (which syncs on CUDA).
"""
from __future__ import annotations

import torch
from torch import Tensor


def sample_tokens_reference(logits: Tensor, temperature: float = 1.0, *, greedy: bool = False) -> tuple[Tensor, Tensor]:
    """(M, V) logits -> (token (M,) int64, logp (M,) fp32); noise from the default generator of logits.device."""
    if greedy:
        logp_all = torch.log_softmax(logits.float(), -1)
        token = torch.argmax(logits, -1)
        return token, logp_all.gather(-1, token[:, None]).squeeze(-1)
    logp_all = torch.log_softmax(logits.float() / temperature, -1)
    return race(logp_all)


def race(logp_all: Tensor) -> tuple[Tensor, Tensor]:
    """A draw per row from the (M, V) log-probabilities (-inf where a token is excluded) and its log-prob.
    E is clamped away from 0, which has probability 0 anyway, so an excluded token can never win."""
    e = torch.empty_like(logp_all).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)
    token = torch.argmax(logp_all - torch.log(e), -1)
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)
