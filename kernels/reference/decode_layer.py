"""Pure-torch twins of the decode step's elementwise kernels (`strive_kernels.decode_layer`).

They compute exactly what HF's Qwen2/2.5/3-VL decoder layers compute, with the same rounding points in the
model dtype, so that a decode step built from them gives HF's logits (fp32: to the bit up to summation order).

    add_rmsnorm_reference(x, delta, weight, eps) -> (x + delta, rmsnorm(x + delta) * weight)
        HF: residual + h (model dtype), then w * (y.float() * rsqrt(mean(y.float()^2) + eps)).to(dtype)
    rope_reference(x, pos, inv_freq, scaling, norm_weight=None, eps) -> x rotated (.., H, D) at positions pos (M,)
        optional per-head RMSNorm first (Qwen3-VL's q_norm / k_norm); cos/sin = cos/sin(pos * inv_freq) * scaling
        in fp32, cast to the model dtype; x * cos + rotate_half(x) * sin in the model dtype (HF's
        apply_rotary_pos_emb on equal mRoPE axes)
    silu_mul_reference(gate, up) -> silu(gate) * up in the model dtype
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rmsnorm_reference(y: Tensor, weight: Tensor, eps: float) -> Tensor:
    yf = y.float()
    yf = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * yf.to(y.dtype)


def add_rmsnorm_reference(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(M, H) residual stream x (+ delta) -> (new stream, normalised) in x.dtype."""
    y = x if delta is None else x + delta
    return y, rmsnorm_reference(y, weight, eps)


def rope_angles(pos: Tensor, inv_freq: Tensor, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (M, D) at integer positions pos (M,), as HF's rotary modules compute them for text tokens."""
    freqs = pos[:, None].float() * inv_freq.to(pos.device).float()[None]          # (M, D/2)
    emb = torch.cat((freqs, freqs), -1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def rope_reference(x: Tensor, pos: Tensor, inv_freq: Tensor, scaling: float = 1.0,
                   norm_weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """x (M, H, D) -> rotated (M, H, D) in x.dtype (per-head RMSNorm first when norm_weight (D,) is given)."""
    if norm_weight is not None:
        x = rmsnorm_reference(x, norm_weight, eps)
    cos, sin = rope_angles(pos, inv_freq, scaling, x.dtype)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up
