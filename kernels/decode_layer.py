"""The decode step's elementwise work in three Triton kernels: `add_rmsnorm`, `rope_cache`, `silu_mul`.

Contracts and HF's rounding points: `strive_kernels.reference.decode_layer` (the torch twins, used on the CPU).

Why: one decode step of a 36-layer model runs ~40 small torch kernels per layer (RMSNorm alone is 7: cast,
square, mean, add, rsqrt, multiply, cast-multiply; rotary 6 per tensor), ~1,500 per token. Replayed from a CUDA
graph each still costs a few microseconds at M = 128 rows, which is more than the step's bandwidth floor
(~1.8 ms at the Qwen2.5-VL-3B shape). Fused, a layer is 10 launches in the engine: add+norm, the stacked q/k/v GEMM,
2 attention kernels (`strive_kernels.rope_shared_prefix_attention`, which do rope_cache's work through `_rope`
below), o GEMM, add+norm, gate and up GEMMs, silu*up, down GEMM.

    x, h = add_rmsnorm(x, delta, w, eps)        x + delta (model dtype), then RMSNorm(x + delta) * w; one row per
                                                program, everything in registers
    q = rope_cache(q, k, v, base_pos, t, inv_freq, scaling, k_cache, v_cache, q_norm, k_norm, eps)
                                                (m, head) per program: optional per-head RMSNorm (Qwen3-VL),
                                                rotary at position base_pos[m] + t (angles computed in place),
                                                q rotated in place; k rotated and v written to cache slot t
    y = silu_mul(gate, up)                      silu(gate) * up
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from strive_kernels._backend import cdiv, next_pow2, resolve
from strive_kernels.reference.decode_layer import add_rmsnorm_reference, rope_reference, silu_mul_reference

__all__ = ["add_rmsnorm", "rope_cache", "silu_mul"]


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, y_ptr, h_ptr, H, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < H
    x = tl.load(x_ptr + m * H + c, mask=ok, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + m * H + c, mask=ok, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)        # the residual add, rounded as torch does
        tl.store(y_ptr + m * H + c, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / H
    n = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + c, mask=ok, other=0.0)
    tl.store(h_ptr + m * H + c, (n.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=ok)


@triton.jit
def _rope(x, xp, f, sign, scaling, w, wp, eps, D: tl.constexpr, HAS_NORM: tl.constexpr):
    """Heads x (..., D) and their rotate-half partners xp (xp[.., d] = x[.., (d + D/2) % D]) in the model dtype ->
    rotated, HF's rounding points (`rope_reference`). f (D,) fp32: the angle of each column, position x its
    frequency (one position for all of x); sign (D,) -1 in the first half; w / wp (D,) fp32: Qwen3-VL's per-head
    RMSNorm weight and its partner (HAS_NORM). Shared by rope_cache and the decode attention kernels
    (strive_kernels.decode_attention), so that both compute the same bits."""
    dt = x.dtype
    if HAS_NORM:                                                        # Qwen3-VL q_norm / k_norm over the head
        xf = x.to(tl.float32)
        r = tl.math.rsqrt(tl.sum(xf * xf, axis=-1, keep_dims=True) / D + eps)
        x = ((xf * r).to(dt).to(tl.float32) * w).to(dt)
        xp = ((xp.to(tl.float32) * r).to(dt).to(tl.float32) * wp).to(dt)
    cos = (tl.cos(f) * scaling).to(dt).to(tl.float32)
    sin = (tl.sin(f) * scaling).to(dt).to(tl.float32)
    a = (x.to(tl.float32) * cos).to(dt).to(tl.float32)
    b = ((sign * xp.to(tl.float32)).to(dt).to(tl.float32) * sin).to(dt).to(tl.float32)
    return (a + b).to(dt)


@triton.jit
def _norm_weights(n_ptr, d, partner, HAS_NORM: tl.constexpr):
    """(w, wp) for `_rope`: the per-head norm weight at columns d and their partners, fp32 (1.0 without a norm)."""
    w = 1.0
    wp = 1.0
    if HAS_NORM:
        w = tl.load(n_ptr + d).to(tl.float32)
        wp = tl.load(n_ptr + partner).to(tl.float32)
    return w, wp


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, t_ptr, inv_ptr, kc_ptr, vc_ptr, qn_ptr, kn_ptr,
                       HQ, HKV, T, scaling, eps, sq_m, sq_h, sk_m, sk_h, sv_m, sv_h,
                       D: tl.constexpr, HAS_NORM: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    t = tl.load(t_ptr)
    pos = (tl.load(pos_ptr + m) + t).to(tl.float32)
    d = tl.arange(0, D)
    half: tl.constexpr = D // 2
    partner = (d + half) % D
    sign = tl.where(d < half, -1.0, 1.0)
    f = pos * tl.load(inv_ptr + d % half)
    is_q = h < HQ
    if is_q:
        base = q_ptr + m * sq_m + h * sq_h
        w, wp = _norm_weights(qn_ptr, d, partner, HAS_NORM)
    else:
        base = k_ptr + m * sk_m + (h - HQ) * sk_h
        w, wp = _norm_weights(kn_ptr, d, partner, HAS_NORM)
    out = _rope(tl.load(base + d), tl.load(base + partner), f, sign, scaling, w, wp, eps, D, HAS_NORM)
    if is_q:
        tl.store(base + d, out)
    else:
        hk = (h - HQ).to(tl.int64)
        slot = (m * HKV + hk) * T + t
        tl.store(kc_ptr + slot * D + d, out)
        tl.store(vc_ptr + slot * D + d, tl.load(v_ptr + m * sv_m + hk * sv_h + d))


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    g = tl.load(g_ptr + i, mask=ok, other=0.0)
    u = tl.load(u_ptr + i, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(y_ptr + i, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def _use_triton(backend: str, *tensors: Tensor) -> bool:
    """Whether this call runs the Triton kernel (strive_kernels._backend's rule for decode_layer): every tensor on
    CUDA (or on the CPU under TRITON_INTERPRET=1 when asked for explicitly) in one dtype. A layout the kernel
    cannot read (rope_cache: head size not a power of two; silu_mul: strided inputs) takes the twin."""
    ts = [t for t in tensors if t is not None]
    supported = len({t.dtype for t in ts}) == 1 and len({t.device.type for t in ts}) == 1
    return resolve("decode_layer", backend, ts[0].device, supported=supported) == "triton"


def add_rmsnorm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, *,
                backend: str = "auto") -> tuple[Tensor, Tensor]:
    """x, delta (M, H), weight (H,) -> (x + delta, RMSNorm(x + delta) * weight); delta None: (x, norm). The kernel
    reads contiguous rows; other layouts take the twin."""
    dense = x.is_contiguous() and weight.is_contiguous() and (delta is None or delta.is_contiguous())
    if not (dense and _use_triton(backend, x, delta, weight)):
        return add_rmsnorm_reference(x, delta, weight, eps)
    M, H = x.shape
    h = torch.empty_like(x)
    y = torch.empty_like(x) if delta is not None else x
    _add_rmsnorm_kernel[(M,)](x, delta if delta is not None else x, weight, y, h, H, float(eps),
                              HAS_DELTA=delta is not None, BLOCK=next_pow2(H),
                              num_warps=4 if H <= 4096 else 8)
    return y, h


def rope_cache(q: Tensor, k: Tensor, v: Tensor, base_pos: Tensor, t: Tensor, inv_freq: Tensor, scaling: float,
               k_cache: Tensor, v_cache: Tensor, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
               eps: float = 1e-6, *, backend: str = "auto") -> Tensor:
    """q (M, Hq, D), k / v (M, Hkv, D) of the token at completion index t (1-element device tensor), position
    base_pos (M,) + t. Returns q rotated; writes k rotated and v into slot t of k_cache / v_cache (M, Hkv, T, D)
    (views of (R, G, Hkv, T, D) caches). q_norm / k_norm (D,): Qwen3-VL's per-head RMSNorm before the rotary."""
    M, Hq, D = q.shape
    Hkv, T = k.shape[1], k_cache.shape[2]
    readable = (not D & (D - 1) and q.stride(2) == k.stride(2) == v.stride(2) == 1
                and base_pos.device == q.device and t.device == q.device)
    if not (readable and _use_triton(backend, q, k, v, k_cache, v_cache, q_norm, k_norm)):
        qr = rope_reference(q, base_pos + t, inv_freq, scaling, q_norm, eps)
        kr = rope_reference(k, base_pos + t, inv_freq, scaling, k_norm, eps)
        k_cache.index_copy_(2, t, kr[:, :, None])
        v_cache.index_copy_(2, t, v[:, :, None])
        return qr
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_cache: k_cache and v_cache must be contiguous (M, Hkv, T, D)")
    inv = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    has_norm = q_norm is not None
    _rope_cache_kernel[(M, Hq + Hkv)](
        q, k, v, base_pos, t, inv, k_cache, v_cache, q_norm if has_norm else q, k_norm if has_norm else q,
        Hq, Hkv, T, float(scaling), float(eps), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), D=D, HAS_NORM=has_norm, num_warps=1)
    return q


def silu_mul(gate: Tensor, up: Tensor, *, backend: str = "auto") -> Tensor:
    """silu(gate) * up, both (M, I) contiguous, in their dtype."""
    if not _use_triton(backend, gate, up) or not (gate.is_contiguous() and up.is_contiguous()):
        return silu_mul_reference(gate, up)
    y = torch.empty_like(gate)
    N = gate.numel()
    BLOCK = 1024
    _silu_mul_kernel[(cdiv(N, BLOCK),)](gate, up, y, N, BLOCK=BLOCK, num_warps=4)
    return y
