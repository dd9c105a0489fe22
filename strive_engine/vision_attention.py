"""The vision tower's attention, batched by segment length (`model.vision_attention = "segmented"`).

Qwen-VL vision towers attend inside segments of the packed patch sequence: Qwen2.5-VL's windows (112 px, about
64 patches) in most blocks and whole frames in the rest, Qwen2-VL and Qwen3-VL whole frames. Under SDPA, transformers
runs one attention call per segment in a Python loop. At Qwen2.5-VL-3B's rollout shape (16 videos of 8 x 30 x 26
patches) that is 128 windows x 16 videos x 28 windowed blocks = 57k calls per vision forward, and the H200 run of
2026-12-04 spent 3.6 s in a prefill whose matmuls need ~0.4 s (bench/results/h200-2026-12-04b.md).

Segments of equal length are independent attention problems of one shape, so they stack into one batch: one SDPA
call per distinct length (a handful: full windows, the short ones at the right and bottom edges, and the frames),
with no mask, so SDPA keeps its fused kernels. Each segment's softmax is over exactly its own keys, as in the loop.
With flash_attention_2 transformers already runs one varlen call per block; this is for sdpa.

    install(model)   # after from_pretrained / _from_config; swaps each vision attention module's class
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# The vision attention classes whose forward is the one reproduced here (identical in transformers 5.17 and 5.22:
# qkv -> vision rotary -> attention inside each cu_seqlens segment -> proj).
SUPPORTED = ("VisionAttention", "Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention")
SCORE_BUDGET = 1 << 30   # bytes of (segments, heads, L, L) fp32 scores per call, should SDPA take its math path
_PLANS: dict[int, tuple[Tensor, "Plan"]] = {}   # cu_seqlens tensor id -> (tensor, plan): one plan per forward


class Plan:
    """How the segments of one cu_seqlens group by length: `groups` = (length, count) in the order of the
    permutation `perm` that makes each group's segments contiguous (`inverse` undoes it; both None when the
    tokens are already in that order, e.g. equal frames)."""

    def __init__(self, cu_seqlens: Tensor):
        bounds = cu_seqlens.tolist()  # the one host sync, as in transformers' loop
        if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {bounds[:8]}...")
        cu = torch.tensor(bounds)
        lengths, starts = cu[1:] - cu[:-1], cu[:-1]
        keep = lengths > 0
        by_length = torch.argsort(lengths[keep], stable=True)  # segments by length, in token order within one
        lengths, starts = lengths[keep][by_length], starts[keep][by_length]
        self.total = bounds[-1]
        values, counts = torch.unique_consecutive(lengths, return_counts=True)
        self.groups = list(zip(values.tolist(), counts.tolist()))
        first = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
        perm = first + torch.arange(self.total)  # token i of the grouped order is token perm[i] of the input
        self.perm: Tensor | None = None
        self.inverse: Tensor | None = None
        if not torch.equal(perm, torch.arange(self.total)):
            self.perm = perm.to(cu_seqlens.device)
            self.inverse = torch.argsort(perm).to(cu_seqlens.device)


def plan_for(cu_seqlens: Tensor) -> Plan:
    """The plan of `cu_seqlens`, built once per tensor (the vision forward passes the same tensor to every block)."""
    hit = _PLANS.get(id(cu_seqlens))
    if hit is not None and hit[0] is cu_seqlens:
        return hit[1]
    if len(_PLANS) >= 8:
        _PLANS.clear()
    plan = Plan(cu_seqlens)
    _PLANS[id(cu_seqlens)] = (cu_seqlens, plan)
    return plan


class _Permute(torch.autograd.Function):
    """x[perm] along dim 0 whose backward is the inverse permutation's gather (no scatter-add: perm is a bijection)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inverse, = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _pieces(tensors, sizes: list[int]) -> list[list[Tensor]]:
    """[[t's piece i for t in tensors] for each size i] along dim 0; the tensors themselves when one piece."""
    if len(sizes) == 1:
        return [list(tensors)]
    return [list(p) for p in zip(*(t.split(sizes) for t in tensors))]


def segment_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """Attention of (N, heads, D) q/k/v within each segment [cu_seqlens[i], cu_seqlens[i+1]) -> (N, heads, D)."""
    plan = plan_for(cu_seqlens)
    if plan.total != q.shape[0]:
        raise ValueError(f"cu_seqlens covers {plan.total} tokens but the sequence has {q.shape[0]}")
    heads, dim = q.shape[1], q.shape[2]
    if plan.perm is not None:  # each length's segments contiguous
        q, k, v = (_Permute.apply(t, plan.perm, plan.inverse) for t in (q, k, v))
    outs = []
    # Pieces by split, not slicing: a slice's backward is a zero-filled full-size gradient plus a copy (and the
    # groups' gradients are then summed), split's is one cat of the pieces' gradients.
    groups = _pieces((q, k, v), [count * length for length, count in plan.groups])
    for (length, count), qkv in zip(plan.groups, groups):
        per_call = max(1, SCORE_BUDGET // (heads * length * length * 4))
        qkv = [t.view(count, length, heads, dim) for t in qkv]
        for qs, ks, vs in _pieces(qkv, [min(per_call, count - c) for c in range(0, count, per_call)]):
            o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                               scale=scale)                     # (n, heads, L, D)
            outs.append(o.transpose(1, 2).reshape(-1, heads, dim))
    if not outs:  # no tokens
        return torch.empty_like(q)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out if plan.perm is None else _Permute.apply(out, plan.inverse, plan.perm)


def _forward(self: nn.Module, hidden_states: Tensor, cu_seqlens: Tensor,
             position_embeddings: tuple[Tensor, Tensor] | None = None, max_seqlen: int | None = None,
             **kwargs: Any) -> Tensor:
    """transformers' vision attention forward, with the per-segment loop replaced by `segment_attention`."""
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._strive_rope(q, k, cos, sin)
    out = segment_attention(q, k, v, cu_seqlens, self.scaling)
    return self.proj(out.reshape(n, -1))


_CLASSES: dict[type, type] = {}


def _segmented_class(cls: type) -> type:
    if cls not in _CLASSES:
        rope = getattr(sys.modules[cls.__module__], "apply_rotary_pos_emb_vision")
        _CLASSES[cls] = type(f"Segmented{cls.__name__}", (cls,),
                             {"forward": _forward, "_strive_rope": staticmethod(rope), "__module__": __name__})
    return _CLASSES[cls]


def install(model: nn.Module) -> int:
    """Give every vision attention module of `model` (a whole Qwen-VL model or its vision tower) the segmented
    forward where it runs under sdpa; returns how many modules changed (none under flash_attention_2 or eager,
    nor for a class this module does not know)."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if (cls.__name__ in SUPPORTED and getattr(module.config, "_attn_implementation", None) == "sdpa"
                and hasattr(sys.modules[cls.__module__], "apply_rotary_pos_emb_vision")):
            module.__class__ = _segmented_class(cls)
            changed += 1
    if changed:
        log.debug("vision attention: %d modules batched by segment length", changed)
    return changed


def uninstall(model: nn.Module) -> int:
    """Undo `install`: transformers' own forward (one attention call per segment) again; returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) in _CLASSES.values():
            module.__class__ = type(module).__mro__[1]
            changed += 1
    return changed
