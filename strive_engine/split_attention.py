"""The shared-prompt layout's attention as two causal calls instead of one masked call over every pair.

Under prompt sharing (`strive_engine.prompt_sharing`) a sequence is `[prompt | answer 1 | ... | answer G | pad]`
and the block mask lets a prompt token see the prompt before it, an answer token the whole prompt and its own
answer before it. SDPA with that (U, 1, Lg, Lg) mask runs its masked kernel over all Lg^2 (query, key) pairs of
which the mask keeps ~40 % at gpu_3b (one prompt of ~2,320 tokens + 8 answers of 256: 19.1 M pairs computed,
7.7 M needed; about 10 % of the update's FLOPs wasted, on SDPA's slower masked kernel). Here the same attention
is two calls that compute only (nearly) the needed pairs:

  prompts   each group's first P_max slots, causal (`is_causal`: SDPA's flash path on CUDA); the outputs of
            slots past a shorter prompt are discarded (they are answer slots, computed below)
  answers   every answer of every group as one batch row: its queries (padded to the longest answer, L) against
            [its group's prompt keys (padded to P_max) | its own keys], lower-right causal: query i sees the whole
            prompt and its own keys 0..i. When all prompts have one length (a micro-batch of one prompt, as at
            gpu_3b) that is `causal_lower_right` (flash on CUDA); otherwise a boolean mask that also hides the
            padded prompt keys (A x L x (P_max + L) elements, not Lg^2)

and the outputs go back to their slots (padding slots get zeros: finite, and attended by nobody). Exact: the same
softmax over the same keys per query (tests/test_split_attention.py: fp64 outputs and q / k / v gradients against
a softmax written out, random layouts; the loss and every parameter's gradient through the real HF models against
the masked call). The price is the answers' keys and values gathered per answer (G copies of the prompt's K/V per
layer), which activation checkpointing counts per key row (`strive_engine.recompute`), and ~25 more ops per layer,
so `auto` splits only where that pays (`MIN_SAVED_PAIRS`). Where SDPA's flash kernel takes grouped K/V heads (CUDA,
bf16 / fp16: `flash_takes_grouped_heads`) the causal calls get the 2 KV heads as they are (`enable_gqa`): ~21 MB of
gathered keys and values per layer at gpu_3b, kept for backward; repeated per query head as transformers' masked
path repeats them, ~170 MB (the boolean-mask call, whose memory-efficient kernel takes no groups, always repeats).

How it is reached: `install()` wraps transformers' "sdpa" attention function (its registry entry); the wrapper
runs the split path when the attention mask it is given carries a layout (`attach`: `Policy` attaches one to the
shared layout's block mask; activation checkpointing's recompute passes the same mask object again), and is
transformers' own function otherwise. The block mask itself stays exact for any path that does not come through
the registry (eager attention). `model.shared_attention = auto | split | masked` (auto: by shape, `choose`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.integrations.sdpa_attention import repeat_kv   # transformers' own head order


@dataclass
class SplitLayout:
    """Index tensors of one shared layout (U groups of Lg slots), on the device; built by `split_layout`."""

    U: int
    Lg: int
    P: int                       # P_max: the longest prompt
    L: int                       # the longest answer
    q_index: Tensor              # (A, L) flat slot (into U * Lg) of each answer's i-th query (padding: its first)
    k_index: Tensor              # (A, P + L) flat slots of the keys each answer attends: prompt, then its own
    mask: Tensor | None          # (A, 1, L, P + L) bool, None when every prompt has length P (lower-right causal)
    dest: Tensor                 # (n,) flat slots that receive an output (every prompt and answer token)
    src: Tensor                  # (n,) where each comes from in cat(prompt outputs (U * P), answer outputs (A * L))
    saved_pairs: int = 0         # (query, key) pairs the one masked call computes and these two do not
    grouped: dict[str, bool] = field(default_factory=dict)   # per call ("prompts", "answers"): K/V heads grouped?


# `model.shared_attention = auto` splits a layout only when that saves this many (query, key) pairs per forward: at
# gpu_3b (one prompt of ~2,320 tokens + 8 answers of 256) 11.4 M; at gpu_small (4 prompts of ~164 + 8 x 64) 1.4 M,
# where the split's extra gathers and copies made the update 3 % slower on this CPU (and a host-bound GPU stage
# would pay ~25 more launches per layer for ~0.1 ms of attention)
MIN_SAVED_PAIRS = 4_000_000


def split_layout(segment: Tensor, device: torch.device, pairs: int | None = None) -> SplitLayout | None:
    """The split attention's indices for `PromptGroups.segment` (U, Lg) (0 prompt, k >= 1 answer k, -1 padding),
    or None when a group has no answer (nothing to split); `pairs`: its `saved_pairs`, when the caller has them."""
    U, Lg = segment.shape
    plen = (segment == 0).sum(1)                                              # (U,)
    P = int(plen.max())
    answers = [(u, int(k)) for u in range(U) for k in segment[u].unique().tolist() if k >= 1]
    if not answers or P == 0:
        return None
    starts, lens = [], []
    for u, k in answers:
        cols = (segment[u] == k).nonzero().flatten()
        starts.append(u * Lg + int(cols[0]))
        lens.append(len(cols))
    A, L = len(answers), max(lens)
    group = torch.tensor([u for u, _ in answers])
    start, n = torch.tensor(starts), torch.tensor(lens)
    i = torch.arange(L)
    valid = i[None] < n[:, None]                                              # (A, L)
    q_index = start[:, None] + torch.where(valid, i[None], 0)
    k_index = torch.cat([group[:, None] * Lg + torch.arange(P)[None], q_index], 1)
    mask = None
    if bool((plen < P).any()):
        key_ok = torch.cat([torch.arange(P)[None] < plen[group][:, None], torch.ones(A, L, dtype=torch.bool)], 1)
        causal = torch.cat([torch.ones(L, P, dtype=torch.bool), torch.ones(L, L, dtype=torch.bool).tril()], 1)
        mask = (causal[None] & key_ok[:, None, :])[:, None]                  # (A, 1, L, P + L)
    p_valid = torch.arange(P)[None] < plen[:, None]                           # (U, P)
    p_dest = (torch.arange(U)[:, None] * Lg + torch.arange(P)[None])[p_valid]
    p_src = (torch.arange(U)[:, None] * P + torch.arange(P)[None])[p_valid]
    a_dest = q_index[valid]
    a_src = U * P + (torch.arange(A)[:, None] * L + i[None])[valid]
    dest, src = torch.cat([p_dest, a_dest]), torch.cat([p_src, a_src])
    flat = _to_device(torch.cat([q_index.flatten(), k_index.flatten(), dest, src]), device)  # one copy
    q_index, k_index, dest, src = flat.split([q_index.numel(), k_index.numel(), len(dest), len(src)])
    return SplitLayout(U, Lg, P, L, q_index.view(A, L), k_index.view(A, P + L),
                       None if mask is None else _to_device(mask, device), dest, src,
                       saved_pairs(segment) if pairs is None else pairs)


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`; to a GPU through pinned memory without waiting for it (no sync in the forward:
    torch's pinned-memory allocator keeps the block until the copy has run)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def choose(segment: Tensor, mode: str, device: torch.device) -> SplitLayout | None:
    """The layout to split by, or None for the one masked call: mode split (always), masked (never) or auto (when
    it saves at least MIN_SAVED_PAIRS pairs)."""
    if mode == "masked":
        return None
    pairs = saved_pairs(segment)
    return None if mode == "auto" and pairs < MIN_SAVED_PAIRS else split_layout(segment, device, pairs)


def split_shape(prompts: list[int], answers: list[list[int]], Lg: int, mode: str) -> tuple[int, bool] | None:
    """What `choose` decides for a layout of these prompt lengths and answer lengths per group (Lg slots each),
    from the lengths alone: None for the one masked call, else (key rows the answers gather: A x (P + L), whether
    a boolean mask is needed: prompts of several lengths). For sizing micro-batches before their layout exists."""
    P = max(prompts, default=0)
    lens = [n for group in answers for n in group if n > 0]
    A, L = len(lens), max(lens, default=0)
    if mode == "masked" or (mode == "auto" and _pairs(len(prompts), Lg, P, A, L) < MIN_SAVED_PAIRS) or not A or P == 0:
        return None
    return A * (P + L), any(p < P for p in prompts)


def saved_pairs(segment: Tensor) -> int:
    """`SplitLayout.saved_pairs` of a layout from its segment counts alone (no index tensors: cheap on the host)."""
    U, Lg = segment.shape
    P = int((segment == 0).sum(1).max())
    lens = torch.zeros(U, int(segment.max()) + 1, dtype=torch.long).scatter_add_(
        1, segment.clamp(min=0), torch.ones_like(segment))[:, 1:]             # (U, K) answer lengths, 0 if absent
    A, L = int((lens > 0).sum()), int(lens.max()) if lens.numel() else 0
    return _pairs(U, Lg, P, A, L)


def _pairs(U: int, Lg: int, P: int, A: int, L: int) -> int:
    """(query, key) pairs of U groups' one masked call (U x Lg^2) that the split's two calls do not compute: the
    prompts causal over the longest prompt P, A answers of at most L tokens over [P prompt keys | own keys]."""
    return U * Lg * Lg - (U * P * (P + 1) // 2 + A * L * (P + L))


def flash_takes_grouped_heads(query: Tensor, key: Tensor, value: Tensor, is_causal: bool) -> bool:
    """Whether SDPA's flash kernel takes these tensors with fewer K/V heads than query heads as they are (it reads
    each K/V head for its group of query heads; torch >= 2.5, a CUDA device, flash's dtypes and head sizes). The
    same test `causal_lower_right` makes before its flash branch, so a True here means the call runs on flash; where
    it is False the heads are repeated as before (the memory-efficient kernel the call falls to takes no groups)."""
    if query.shape[1] == key.shape[1] or query.device.type != "cuda":
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention
    except ImportError:
        return False
    return bool(can_use_flash_attention(SDPAParams(query, key, value, None, 0.0, is_causal, True)))


def split_attention(layout: SplitLayout, query: Tensor, key: Tensor, value: Tensor, scaling: float | None, *,
                    grouped: bool | None = None) -> Tensor:
    """query (U, Hq, Lg, D), key / value (U, Hkv, Lg, D) in the shared layout -> (U, Lg, Hq, D), as transformers'
    sdpa attention returns it. `grouped`: pass the Hkv heads to SDPA as they are (`enable_gqa`) instead of
    repeating them per query head; None decides per call (`flash_takes_grouped_heads`); the tests force it on the
    CPU, where SDPA's math path takes groups too."""
    U, Hq, Lg, D = query.shape
    groups = Hq // key.shape[1]
    P, L = layout.P, layout.L

    def heads(t: Tensor, use: bool) -> Tensor:
        return t if use else repeat_kv(t, groups)

    def decide(call: str, q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> bool:
        # once per layout and call: every layer of a forward (and its recompute in backward) has the same shapes
        if grouped is not None:
            return grouped and groups > 1
        if call not in layout.grouped:
            layout.grouped[call] = flash_takes_grouped_heads(q, k, v, is_causal)
        return layout.grouped[call]

    # prompts: causal over each group's first P slots
    qp, kp, vp = query[:, :, :P], key[:, :, :P], value[:, :, :P]
    g = decide("prompts", qp, kp, vp, True)
    prompt = F.scaled_dot_product_attention(qp, heads(kp, g), heads(vp, g), is_causal=True, scale=scaling,
                                            enable_gqa=g)
    # answers: [prompt keys | own keys], lower-right causal
    q_flat = query.transpose(1, 2).reshape(U * Lg, Hq, D)
    k_flat, v_flat = (t.transpose(1, 2).reshape(U * Lg, -1, D) for t in (key, value))
    A = layout.q_index.shape[0]
    qa = q_flat[layout.q_index].transpose(1, 2)                               # (A, Hq, L, D)
    ka, va = (t[layout.k_index].transpose(1, 2) for t in (k_flat, v_flat))   # (A, Hkv, P + L, D)
    if layout.mask is None:
        from torch.nn.attention.bias import causal_lower_right

        # without the repeat the gathered keys and values are Hq / Hkv times smaller (~21 instead of ~170 MB per
        # layer at gpu_3b), and so is what the call keeps for backward
        g = decide("answers", qa, ka, va, False)
        answers = F.scaled_dot_product_attention(qa, heads(ka, g), heads(va, g),
                                                 attn_mask=causal_lower_right(L, P + L), scale=scaling, enable_gqa=g)
    else:   # a boolean mask: SDPA's memory-efficient kernel, which needs the heads repeated
        answers = F.scaled_dot_product_attention(qa, heads(ka, False), heads(va, False), attn_mask=layout.mask,
                                                 scale=scaling)
    outs = torch.cat([prompt.transpose(1, 2).reshape(U * P, Hq, D), answers.transpose(1, 2).reshape(A * L, Hq, D)])
    out = query.new_zeros(U * Lg, Hq, D).index_copy(0, layout.dest, outs[layout.src])
    return out.view(U, Lg, Hq, D)


def kept_kv_heads(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """The K/V heads per key row the answers' call keeps for backward on this device: kv_heads where flash takes
    them grouped, else heads (repeated); for `strive_engine.recompute`'s bytes per key row."""
    q = torch.empty(1, heads, 2, head_dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.empty(1, kv_heads, 4, head_dim, dtype=dtype, device=device, requires_grad=True)
    return kv_heads if flash_takes_grouped_heads(q, k, k, False) else heads


# ------------------------------------------------------------------------------ transformers' registry

_ORIGINAL: dict[str, Any] = {}
_ATTR = "_strive_split_layout"


def _sdpa(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *args: Any,
          **kwargs: Any) -> tuple[Tensor, None]:
    layout = getattr(attention_mask, _ATTR, None)
    if (layout is None or query.shape[0] != layout.U or query.shape[2] != layout.Lg or args
            or kwargs.get("dropout", 0.0) or kwargs.get("sliding_window") is not None):
        return _ORIGINAL["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    return split_attention(layout, query, key, value, kwargs.get("scaling")), None


def install() -> bool:
    """Wrap transformers' "sdpa" attention function once (idempotent); False where the registry is not there."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    if "sdpa" not in _ORIGINAL:
        _ORIGINAL["sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _sdpa
    return True


def attach(mask: Tensor, layout: SplitLayout | None) -> Tensor:
    """The block mask carrying `layout`: the language model passes the mask object to every attention call, and
    activation checkpointing passes the same object again when it recomputes a layer in backward, so the split
    path is taken in both (a mask without it, or a path that does not read the registry, runs the mask itself)."""
    if layout is not None:
        setattr(mask, _ATTR, layout)
    return mask
