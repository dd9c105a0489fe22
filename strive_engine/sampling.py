"""Token sampling on the device, without a host sync: temperature, top-k, top-p, greedy.

    spec = SamplingSpec.from_config(cfg.rollout)
    token, logp = sample_next(logits, spec)          # logits (M, V) -> (M,) int64, (M,) fp32

Without top-k / top-p (as in RL) and for greedy, sampling is `strive_kernels.sample_tokens`: on CUDA one Triton
pass over the logits (online log-sum-exp and a Gumbel-max argmax, Philox noise keyed by the caller's `seed` +
`step` device tensors, so a captured CUDA graph replays with the step its state holds); on the CPU, and on CUDA
when no seed is given, its torch twin. With top-k / top-p the filtered logits go through the same exponential race
in torch (argmax_i log p_i - log E_i, E_i ~ Exp(1), is a draw from p: no cumulative sum, no `torch.multinomial`,
which syncs on CUDA to check its input, no data-dependent shape). The torch paths draw from the default
generator of the logits' device: the caller seeds it (inside `torch.random.fork_rng`), and a captured graph
advances the CUDA generator's philox offset on every replay, so a seeded run repeats exactly.

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

from strive_kernels import sample_tokens
from strive_kernels.reference.sampling import race


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


def unfiltered(spec: SamplingSpec, vocab: int) -> bool:
    """True when top-k and top-p cut nothing: the draw is from softmax(logits / temperature) (or greedy)."""
    return spec.greedy or (not 0 < spec.top_k < vocab and spec.top_p >= 1.0)


def sample_next(logits: Tensor, spec: SamplingSpec, seed: Tensor | None = None,
                step: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """logits (M, V) -> (token (M,) int64, logp (M,) fp32). No host sync; graph-capturable.
    seed / step: (1,) int64 device tensors keying the fused sampler's noise (see the module docstring)."""
    if unfiltered(spec, logits.shape[-1]):
        return sample_tokens(logits, spec.temperature, greedy=spec.greedy, seed=seed, step=step)
    return race(torch.log_softmax(filter_logits(logits, spec), -1))        # (M, V), -inf where filtered
