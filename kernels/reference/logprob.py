"""The contract of `strive_kernels.fused_logprob_loss` / `fused_logprobs`, their chunked torch pass and their
pure-torch twin (the oracle).

Per-token surrogate (token t with log-prob logp under the current policy, old log-prob o, advantage A,
optional reference log-prob r; the settings are a `LossSpec`):

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

The output type, the input checks, the per-token weights and the diagnostics below are shared by every
path (Triton, the native chunked pass below, the twin), so the three agree on what the inputs mean. The twin is
written to be obviously right rather than fast: logits -> log_softmax -> gather, the clipped surrogate
written as in the papers, and gradients from autograd (not the analytic dL/dlogits of the fast paths).
Tokens are processed in chunks of `chunk_rows`; with gradients each chunk runs under activation
checkpointing, so at most one (chunk_rows, V) block of logits (in the accumulation dtype) is alive at a
time, in forward and in backward. Accumulation dtype: fp64 for fp64 inputs (the oracle), fp32 otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")  # index = tl.constexpr code
SEQ_MEAN = LOSS_AGGREGATIONS.index("seq_mean_token_mean")


@dataclass(frozen=True)
class LossSpec:
    """The settings of the loss (one algorithm preset and the sampling temperature), checked once here."""

    temperature: float = 1.0  # logits are divided by it (the rollout's sampling temperature)
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ... and above at 1 + eps_high (DAPO's clip-higher: eps_high > eps_low)
    beta: float = 0.0  # weight of the k3 KL to the reference policy (ref_logp needed when > 0)
    loss_agg: str = "seq_mean_token_mean"  # one of LOSS_AGGREGATIONS (module docstring)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if not self.eps_high >= 0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg {self.loss_agg!r} is not one of {', '.join(map(repr, LOSS_AGGREGATIONS))}")


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


def prepare_tokens(hidden, weight, targets, old_logp, advantages, mask, spec: LossSpec, *, ref_logp, seq_ids,
                   normaliser) -> TokenInputs:
    """Check the per-token inputs and bring them into the form every path reads (see module docstring)."""
    n, device, vocab = hidden.shape[0], hidden.device, weight.shape[0]
    if not isinstance(spec, LossSpec):
        raise TypeError(f"spec must be a strive_kernels.LossSpec, got {type(spec).__name__}")
    agg = LOSS_AGGREGATIONS.index(spec.loss_agg)
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
    elif spec.beta > 0:
        raise ValueError(f"beta = {spec.beta} > 0 needs ref_logp (the frozen reference policy's log-probs)")
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
    # index_add_ is atomic on CUDA: exact for 0/1 masks, order-dependent in the last bit for fractional ones
    seq_counts = torch.zeros(slots, dtype=torch.float32, device=device).index_add_(0, seq_ids, mask) \
        if agg == SEQ_MEAN else None
    denom = _normaliser(normaliser, agg, mask, seq_ids, slots, device)
    return TokenInputs(targets, old_logp, advantages, mask, ref_logp, seq_ids, seq_counts, denom, per_seq, agg)


def _normaliser(normaliser, agg: int, mask, seq_ids, slots: int, device) -> torch.Tensor:
    """The global denominator D as a 0-d fp32 tensor on `device` (no host sync for tensors)."""
    if normaliser is None:  # this call is the whole batch
        if agg == LOSS_AGGREGATIONS.index("token_mean"):
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


# ------------------------------------------------------------------------------------------ native pass
# The per-chunk pass of `strive_kernels.fused_logprob_loss`'s chunk loop in plain torch (backend="native", its
# CPU path and a GPU baseline): the analytic dL/dlogits of the Triton pass, in torch.


class LossParams:
    """A call's settings as both passes read them."""

    def __init__(self, spec: LossSpec, with_entropy: bool):
        self.inv_temp = 1.0 / float(spec.temperature)
        self.eps_low, self.eps_high, self.beta = float(spec.eps_low), float(spec.eps_high), float(spec.beta)
        self.with_entropy = bool(with_entropy)


def token_terms(logp, old, adv, ref, w, p: LossParams):
    """Analytic per-token terms from log-probs (c,): (weighted loss, dL/dlogp weighted, clip code, k3)."""
    ratio = torch.exp(logp - old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - p.eps_low, 1.0 + p.eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    # min picks the unclipped branch (gradient -ratio * A) unless clipping made it strictly smaller.
    dloss = torch.where(unclipped <= clipped, -ratio * adv, torch.zeros_like(ratio))
    k3 = None
    if ref is not None:
        d = ref - logp
        ed = torch.exp(d)
        k3 = ed - d - 1.0
        loss = loss + p.beta * k3
        dloss = dloss + p.beta * (1.0 - ed)
    live = w != 0
    zero = torch.zeros_like(loss)
    low = live & (ratio < 1.0 - p.eps_low) & (adv < 0)
    high = live & (ratio > 1.0 + p.eps_high) & (adv > 0)
    code = torch.where(low, -1.0, torch.where(high, 1.0, 0.0))  # (c,) -1 / +1: clipped below / above
    return torch.where(live, w * loss, zero), torch.where(live, w * dloss, zero), code, k3


class NativePass:
    """Per-chunk pass in plain torch (fp32 temporaries of (C, V)): the CPU path and a GPU baseline."""

    extra_bytes = 12  # fp32 copy of the logits, fp32 log_softmax, and a temporary per logit

    def __init__(self, tok: TokenInputs, params: LossParams, vocab: int, rows: int, device, logprobs_only=False):
        self.tok, self.p, self.vocab = tok, params, vocab
        if not logprobs_only:
            self.w = token_weights(tok)  # (N,)
            self.adv = token_advantages(tok)  # (N,)

    def _logp(self, lg, tgt, need_prob: bool):
        acc = torch.float64 if lg.dtype == torch.float64 else torch.float32
        z = lg.to(acc)  # (c, V); the buffer itself when it is already fp32
        if self.p.inv_temp != 1.0:
            z = z * self.p.inv_temp
        # log_softmax works on z - max and never forms max + log(sum), which at |z| ~ 3e4 would be rounded
        # to fp32's ulp there (0.002): log-probs keep their own precision.
        logsm = torch.log_softmax(z, dim=-1)  # (c, V)
        valid = (tgt >= 0) & (tgt < self.vocab)
        logp = logsm.gather(1, tgt.clamp(0, self.vocab - 1)[:, None]).squeeze(1)
        logp = torch.where(valid, logp, torch.full_like(logp, float("nan")))
        prob = logsm.exp_() if need_prob else None  # (c, V) softmax, in place
        return logp, prob, valid

    def loss_chunk(self, lg, a: int, b: int, outs, compute_grad: bool) -> None:
        t = self.tok
        tgt = t.targets[a:b]
        logp, prob, valid = self._logp(lg, tgt, need_prob=compute_grad or self.p.with_entropy)
        ref = t.ref_logp[a:b] if t.ref_logp is not None else None
        loss_t, g, code, k3 = token_terms(logp, t.old_logp[a:b], self.adv[a:b], ref, self.w[a:b], self.p)
        outs["logp"][a:b] = logp
        outs["loss"][a:b] = loss_t
        outs["clip"][a:b] = code
        if k3 is not None:
            outs["k3"][a:b] = k3
        if self.p.with_entropy:
            outs["entropy"][a:b] = torch.special.entr(prob).sum(-1)
        if compute_grad:  # dL/dx_j = g / T * (1[j = target] - p_j), written over the logits
            g = (g * self.p.inv_temp).to(prob.dtype)
            prob.mul_(-g[:, None])
            prob.scatter_add_(1, tgt.clamp(0, self.vocab - 1)[:, None], torch.where(valid, g, 0.0)[:, None])
            lg.copy_(prob)

    def logprob_chunk(self, lg, a: int, b: int, outs) -> None:
        logp, prob, _ = self._logp(lg, self.tok.targets[a:b], need_prob=self.p.with_entropy)
        outs["logp"][a:b] = logp
        if self.p.with_entropy:
            outs["entropy"][a:b] = torch.special.entr(prob).sum(-1)


# ------------------------------------------------------------------------------------------ twin


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


def fused_logprob_loss_reference(hidden, weight, targets, old_logp, advantages, mask, spec: LossSpec = LossSpec(), *,
                                 bias=None, ref_logp=None, seq_ids=None, normaliser=None, return_entropy=False,
                                 chunk_rows=None) -> LossOutput:
    """Same contract as `strive_kernels.fused_logprob_loss`; outputs in the accumulation dtype."""
    check_matrices(hidden, weight, bias)
    tok = prepare_tokens(hidden, weight, targets, old_logp, advantages, mask, spec, ref_logp=ref_logp, seq_ids=seq_ids,
                         normaliser=normaliser)
    temperature, eps_low, eps_high, beta = spec.temperature, spec.eps_low, spec.eps_high, spec.beta
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
    LossSpec(temperature=temperature)  # checks it
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
