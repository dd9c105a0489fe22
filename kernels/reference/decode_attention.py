"""Pure-torch twin of `strive_kernels.shared_prefix_attention`: decode attention of G rows that share a prompt.

Contract (one decode step, R requests x G rows each, GQA with n_rep = Hq / Hkv query heads per K/V head):

    q         (R, G, Hq, D)         the new token's queries (RoPE applied)
    k_prefix  (R, Hkv, Lp, D)       the request's prompt K/V, left-padded: columns < prefix_start[r] are padding
    v_prefix  (R, Hkv, Lp, D)
    prefix_start (R,) int           first valid prefix column of each request
    k_suffix  (R, G, Hkv, T, D)     each row's own generated K/V (a static cache of T slots)
    v_suffix  (R, G, Hkv, T, D)
    suffix_len  int tensor, 1 element, on the device: slots [0, suffix_len) are valid (the same for every row;
                read on the device, so a CUDA graph can replay the step with a growing length)
    -> (R, G, Hq, D) in q.dtype

    out[r, g, h] = softmax([q.K_prefix[r, h//n_rep]^T ; q.K_suffix[r, g, h//n_rep]^T] * scale) @ [V_prefix ; V_suffix]

one exact softmax over the prefix and the row's suffix together. The prefix is read once per (request, K/V head)
for all G * n_rep queries (a batched matmul over (R, Hkv)), never G times.

The twin computes in fp32 (fp64 for fp64 inputs) whatever the input dtype (it is the oracle) and reads all T suffix slots (masked).
"""
from __future__ import annotations

import torch
from torch import Tensor

from strive_kernels.reference.decode_layer import rope_reference


class DecodeAttentionInputError(ValueError):
    """Inconsistent shapes, dtypes or devices in a shared-prefix attention call (the message names them)."""


def check_decode_attention_inputs(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor,
                                  k_suffix: Tensor, v_suffix: Tensor, suffix_len: Tensor) -> tuple[int, ...]:
    """Shape/dtype/device checks only (no device data is read). Returns (R, G, Hq, Hkv, D, Lp, T)."""
    if q.dim() != 4:
        raise DecodeAttentionInputError(f"q must be (R, G, Hq, D), got shape {tuple(q.shape)}")
    R, G, Hq, D = q.shape
    if k_prefix.dim() != 4 or k_prefix.shape[0] != R or k_prefix.shape[3] != D:
        raise DecodeAttentionInputError(f"k_prefix must be (R={R}, Hkv, Lp, D={D}), got {tuple(k_prefix.shape)}")
    Hkv, Lp = k_prefix.shape[1], k_prefix.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise DecodeAttentionInputError(f"query heads {Hq} must be a multiple of the K/V heads {Hkv} (GQA)")
    if v_prefix.shape != k_prefix.shape:
        raise DecodeAttentionInputError(f"v_prefix {tuple(v_prefix.shape)} != k_prefix {tuple(k_prefix.shape)}")
    if k_suffix.dim() != 5 or tuple(k_suffix.shape[:3]) != (R, G, Hkv) or k_suffix.shape[4] != D:
        raise DecodeAttentionInputError(f"k_suffix must be (R={R}, G={G}, Hkv={Hkv}, T, D={D}), "
                                        f"got {tuple(k_suffix.shape)}")
    if v_suffix.shape != k_suffix.shape:
        raise DecodeAttentionInputError(f"v_suffix {tuple(v_suffix.shape)} != k_suffix {tuple(k_suffix.shape)}")
    if tuple(prefix_start.shape) != (R,) or prefix_start.dtype.is_floating_point:
        raise DecodeAttentionInputError(f"prefix_start must be (R={R},) integers, got {tuple(prefix_start.shape)} "
                                        f"{prefix_start.dtype}")
    if suffix_len.numel() != 1 or suffix_len.dtype.is_floating_point:
        raise DecodeAttentionInputError(f"suffix_len must be one integer, got {tuple(suffix_len.shape)} "
                                        f"{suffix_len.dtype}")
    dtypes = {t.dtype for t in (q, k_prefix, v_prefix, k_suffix, v_suffix)}
    if len(dtypes) != 1:
        raise DecodeAttentionInputError(f"q, K and V must share one dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in (q, k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, suffix_len)}
    if len(devices) != 1:
        raise DecodeAttentionInputError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return R, G, Hq, Hkv, D, Lp, k_suffix.shape[3]


def shared_prefix_attention_reference(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor,
                                      k_suffix: Tensor, v_suffix: Tensor, suffix_len: Tensor,
                                      scale: float | None = None) -> Tensor:
    """See the module docstring. fp32 (or fp64) math, one softmax over prefix and suffix; no host sync."""
    return _attend(q, k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, suffix_len, scale, last_slot=False)


def rope_shared_prefix_attention_reference(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, t: Tensor,
                                           inv_freq: Tensor, rope_scaling: float, k_prefix: Tensor,
                                           v_prefix: Tensor, prefix_start: Tensor, k_suffix: Tensor,
                                           v_suffix: Tensor, scale: float | None = None,
                                           q_norm: Tensor | None = None, k_norm: Tensor | None = None,
                                           eps: float = 1e-6) -> Tensor:
    """The decode step's rotary, cache write and attention in one contract (`strive_kernels.
    rope_shared_prefix_attention`): q (R * G, Hq, D), k / v (R * G, Hkv, D) of the token at completion index t
    (1-element int tensor) before the rotary. pos (R,): the position after request r's prompt; its G rows share the
    prompt, so all of them decode token t at position pos[r] + t. Writes k rotated and v into slot t of
    k_suffix / v_suffix (R, G, Hkv, T, D) and returns the attention of the rotated q over the prefix and slots
    [0, t] (R, G, Hq, D): `rope_cache` (at pos repeated G times) followed by `shared_prefix_attention` with
    suffix_len = t + 1."""
    check_rope_inputs(q, k, v, pos, k_suffix, q_norm, k_norm)
    R, G, Hkv, T, D = k_suffix.shape
    at = pos.repeat_interleave(G) + t
    qr = rope_reference(q, at, inv_freq, rope_scaling, q_norm, eps)
    kr = rope_reference(k, at, inv_freq, rope_scaling, k_norm, eps)
    k_suffix.index_copy_(3, t, kr.view(R, G, Hkv, 1, D))
    v_suffix.index_copy_(3, t, v.reshape(R, G, Hkv, 1, D))
    return _attend(qr.view(R, G, -1, D), k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, t, scale,
                   last_slot=True)


def check_rope_inputs(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, k_suffix: Tensor, q_norm: Tensor | None,
                      k_norm: Tensor | None) -> None:
    """The rotary arguments of `rope_shared_prefix_attention_reference` against the suffix cache's (R, G, Hkv, T, D)
    (shapes only; the attention's own arguments are checked by check_decode_attention_inputs)."""
    if k_suffix.dim() != 5:
        raise DecodeAttentionInputError(f"k_suffix must be (R, G, Hkv, T, D), got {tuple(k_suffix.shape)}")
    R, G, Hkv, T, D = k_suffix.shape
    if q.dim() != 3 or q.shape[0] != R * G or k.shape != (R * G, Hkv, D) or v.shape != k.shape:
        raise DecodeAttentionInputError(f"q must be (R * G = {R * G}, Hq, {D}) and k / v ({R * G}, {Hkv}, {D}), got "
                                        f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if tuple(pos.shape) != (R,) or pos.dtype.is_floating_point or pos.device != q.device:
        raise DecodeAttentionInputError(f"pos must be (R = {R},) integers on {q.device} (one position per request), "
                                        f"got {tuple(pos.shape)} {pos.dtype} on {pos.device}")
    if (q_norm is None) != (k_norm is None):
        raise DecodeAttentionInputError("q_norm and k_norm come together (Qwen3-VL) or not at all")


def _attend(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor, k_suffix: Tensor,
            v_suffix: Tensor, length: Tensor, scale: float | None, last_slot: bool) -> Tensor:
    """last_slot: `length` is the last valid suffix slot t (slots [0, t]), else the suffix length."""
    R, G, Hq, Hkv, D, Lp, T = check_decode_attention_inputs(q, k_prefix, v_prefix, prefix_start, k_suffix,
                                                            v_suffix, length)
    n_rep = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)                                  # fp32, or fp64 for fp64
    qf = q.to(ct).reshape(R, G, Hkv, n_rep, D)
    # prefix: the G * n_rep queries of one (request, kv head) against its prompt, one batched matmul
    qp = qf.permute(0, 2, 1, 3, 4).reshape(R, Hkv, G * n_rep, D)
    sp = torch.matmul(qp, k_prefix.to(ct).transpose(-1, -2)) * scale                  # (R, Hkv, G*n_rep, Lp)
    cols = torch.arange(Lp, device=q.device)
    pad = cols[None, :] < prefix_start.to(cols.dtype)[:, None]                            # (R, Lp)
    sp = sp.masked_fill(pad[:, None, None, :], float("-inf"))
    sp = sp.reshape(R, Hkv, G, n_rep, Lp).permute(0, 2, 1, 3, 4)                        # (R, G, Hkv, n_rep, Lp)
    # suffix: each row against its own generated tokens
    ss = torch.matmul(qf, k_suffix.to(ct).transpose(-1, -2)) * scale                   # (R, G, Hkv, n_rep, T)
    slots = torch.arange(T, device=q.device)
    n = length.reshape(()).to(slots.dtype)
    ss = ss.masked_fill(slots > n if last_slot else slots >= n, float("-inf"))
    p = torch.softmax(torch.cat([sp, ss], -1), -1)                                      # one exact softmax
    pp = p[..., :Lp].permute(0, 2, 1, 3, 4).reshape(R, Hkv, G * n_rep, Lp)
    out = torch.matmul(pp, v_prefix.to(ct)).reshape(R, Hkv, G, n_rep, D).permute(0, 2, 1, 3, 4)
    out = out + torch.matmul(p[..., Lp:], v_suffix.to(ct))                             # (R, G, Hkv, n_rep, D)
    return out.reshape(R, G, Hq, D).to(q.dtype)
