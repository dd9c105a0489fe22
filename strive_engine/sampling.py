"""Token sampling on the device, without a host sync: temperature, top-k, top-p, greedy.

    spec = SamplingSpec.from_config(cfg.rollout)
    token, logp = sample_next(logits, spec)          # logits (M, V) -> (M,) int64, (M,) fp32

Sampling uses the exponential race (argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p), which needs no
cumulative sum, no `torch.multinomial` (which syncs on CUDA to check its input) and no data-dependent shape,
so the step that calls it can be captured in a CUDA graph. The noise comes from the default generator of the
logits' device: the caller seeds it (inside `torch.random.fork_rng`), and a captured graph advances the CUDA
generator's philox offset on every replay, so a seeded run repeats exactly.

Filtering follows HF's warpers in HF's order (temperature, then top-k, then top-p) with HF's tie rules: top-k
keeps every logit >= the k-th largest; top-p drops a token when the probability of the tokens strictly more
likely than it already reaches top_p (so at least one token always survives). `logp` is the sampled token's
log-probability under the distribution it was drawn from (filtered and renormalised); with top_k = 0 and
top_p = 1, as in RL, that is exactly log_softmax(logits / temperature), the trainer's distribution. Greedy takes
the argmax of the raw logits (the first on a tie, as torch.argmax) and reports log_softmax(logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingSpec:
    """What `sample_next` draws from: greedy, or softmax(logits / temperature) restricted by top_k / top_p."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1 = off

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"SamplingSpec.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingSpec.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_config(cls, cfg: Any) -> "SamplingSpec":
        """From a RolloutConfig (do_sample, temperature, top_k, top_p)."""
        if not getattr(cfg, "do_sample", True):
            return cls(greedy=True)
        return cls(temperature=float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p))


def filter_logits(logits: Tensor, spec: SamplingSpec) -> Tensor:
    """(M, V) fp32 logits / temperature with the tokens outside top-k / top-p set to -inf."""
    x = logits.float() / spec.temperature
    V = x.shape[-1]
    if 0 < spec.top_k < V:
        kth = torch.topk(x, spec.top_k, dim=-1).values[:, -1:]                   # (M, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(sorted_x, -1)
        before = torch.cumsum(p, -1) - p                                         # mass strictly more likely
        drop_sorted = before >= spec.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_next(logits: Tensor, spec: SamplingSpec) -> tuple[Tensor, Tensor]:
    """logits (M, V) -> (token (M,) int64, logp (M,) fp32). No host sync; graph-capturable."""
    if spec.greedy:
        logp_all = torch.log_softmax(logits.float(), -1)
        token = torch.argmax(logits, -1)
        return token, logp_all.gather(-1, token[:, None]).squeeze(-1)
    logp_all = torch.log_softmax(filter_logits(logits, spec), -1)                 # (M, V), -inf where filtered
    # Exponential race in log space: argmax(log p - log E). E is clamped away from 0, which has probability 0
    # anyway, so a filtered token (log p = -inf) can never win.
    e = torch.empty_like(logp_all).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)
    token = torch.argmax(logp_all - torch.log(e), -1)
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)
