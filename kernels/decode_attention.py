"""Decode attention for G rows that share a prompt: `strive_kernels.shared_prefix_attention` (Triton), and
`strive_kernels.rope_shared_prefix_attention`, the same from unrotated q / k with the rotary and the K/V cache
write of the new token in the kernels (the native decode engine's call).

Contract: `strive_kernels.reference.decode_attention` (the pure-torch twin, oracle and CPU fallback).

Why a kernel: at the Qwen2.5-VL-3B rollout shape (16 requests x G=8, 2,000-token prompts, 2 K/V heads of 128)
the prompts' K/V are 33 MB per layer, about a sixth of what a decode step must read; the twin reads them once
too but writes and re-reads fp32 scores of the same size, and reads all T suffix slots every step. Here each
byte of K/V is read once, and only the suffix slots written so far.

Two launches, flash-decoding style:

    _prefix_kernel   grid (R * Hkv, S): program (r, h, s) takes the G * n_rep queries of request r and K/V head
                     h (one (QB, D) tile: the prefix is read once for all G rows) against prefix columns
                     [s * SPLIT, (s + 1) * SPLIT), online softmax, and writes a partial (m, l, acc) in fp32.
                     S splits keep every SM streaming when R * Hkv is small; `plan_splits` picks S so that
                     the grid fills whole waves of resident programs.
    _suffix_kernel   grid (R * G * Hkv,): program (r, g, h) takes row (r, g)'s n_rep queries against its own
                     suffix slots [0, suffix_len) (the length is read on the device: a CUDA graph replays the
                     step unchanged), merges the S prefix partials of those queries and writes the output.

Partials: S x (R * Hkv * QB) x (D + 2) fp32, written once and read once: 7.5 MB per layer at the 3B rollout
shape (S = 7), against 34 MB of prompt K/V.

With the rotary (ROPE): both kernels rotate the q rows they load (angles from pos[r] + t, computed in place by
`decode_layer._rope`, rope_cache's arithmetic), the split-0 programs of the prefix kernel also rotate the G rows'
new k and write k and v to suffix slot t, and the suffix kernel reads t and attends over slots [0, t]. One launch
per layer fewer than rope_cache + shared_prefix_attention, the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from strive_kernels import _backend
from strive_kernels._backend import next_pow2, resolve
from strive_kernels.decode_layer import _norm_weights, _rope
from strive_kernels.reference.decode_attention import (
    DecodeAttentionInputError,
    check_decode_attention_inputs,
    check_rope_inputs,
    rope_shared_prefix_attention_reference,
    shared_prefix_attention_reference,
)

__all__ = ["shared_prefix_attention", "rope_shared_prefix_attention", "DecodeAttentionInputError"]

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp(_NEG - m) == 0 without inf - inf = nan


@triton.jit
def _prefix_kernel(q_ptr, k_ptr, v_ptr, start_ptr, m_ptr, l_ptr, acc_ptr,
                   Lp, HKV, GN, SPLIT, scale,
                   sq_r, sq_g, sq_h, sk_r, sk_h, sk_n, sv_r, sv_h, sv_n,
                   pos_ptr, t_ptr, inv_ptr, qn_ptr, kn_ptr, scaling, eps,
                   nk_ptr, nv_ptr, snk_m, snk_h, snv_m, snv_h,
                   kc_ptr, vc_ptr, sc_r, sc_g, sc_h, sc_t, svc_r, svc_g, svc_h, svc_t,
                   N_REP: tl.constexpr, QB: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   IEEE: tl.constexpr, ROPE: tl.constexpr, HAS_NORM: tl.constexpr, GB: tl.constexpr):
    rh = tl.program_id(0)
    s = tl.program_id(1)
    num_s = tl.num_programs(1)
    r = rh // HKV
    h = rh % HKV
    rows = tl.arange(0, QB)                                    # query row i = g * N_REP + j
    row_ok = rows < GN
    g = rows // N_REP
    j = rows % N_REP
    d = tl.arange(0, D)
    qa = q_ptr + r * sq_r + g[:, None] * sq_g + (h * N_REP + j)[:, None] * sq_h
    q = tl.load(qa + d[None, :], mask=row_ok[:, None], other=0.0)
    if ROPE:  # q as the projection left it: rotated here; the request's G rows are all at position pos[r] + t
        G = GN // N_REP
        t = tl.load(t_ptr)
        half: tl.constexpr = D // 2
        pd = (d + half) % D
        sign = tl.where(d < half, -1.0, 1.0)
        f = (tl.load(pos_ptr + r) + t).to(tl.float32) * tl.load(inv_ptr + d % half)      # (D,): one angle per column
        w, wp = _norm_weights(qn_ptr, d, pd, HAS_NORM)
        q = _rope(q, tl.load(qa + pd[None, :], mask=row_ok[:, None], other=0.0), f, sign, scaling, w, wp, eps, D,
                  HAS_NORM)
        if s == 0:  # and once per (request, K/V head): the G rows' new k (rotated) and v into suffix slot t
            gs = tl.arange(0, GB)
            g_ok = gs < G
            mrow = r * G + gs
            ka = nk_ptr + mrow[:, None] * snk_m + h * snk_h
            kw, kwp = _norm_weights(kn_ptr, d, pd, HAS_NORM)
            kr = _rope(tl.load(ka + d[None, :], mask=g_ok[:, None], other=0.0),
                       tl.load(ka + pd[None, :], mask=g_ok[:, None], other=0.0), f, sign, scaling, kw, kwp, eps, D,
                       HAS_NORM)
            tl.store(kc_ptr + r * sc_r + gs[:, None] * sc_g + h * sc_h + t * sc_t + d[None, :], kr,
                     mask=g_ok[:, None])
            vn = tl.load(nv_ptr + mrow[:, None] * snv_m + h * snv_h + d[None, :], mask=g_ok[:, None], other=0.0)
            tl.store(vc_ptr + r * svc_r + gs[:, None] * svc_g + h * svc_h + t * svc_t + d[None, :], vn,
                     mask=g_ok[:, None])
    start = tl.load(start_ptr + r).to(tl.int32)
    lo = tl.maximum(s * SPLIT, start)
    hi = tl.minimum((s + 1) * SPLIT, Lp)
    m_i = tl.full((QB,), _NEG, tl.float32)
    l_i = tl.zeros((QB,), tl.float32)
    acc = tl.zeros((QB, D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < hi
        k = tl.load(k_ptr + r * sk_r + h * sk_h + cols[:, None] * sk_n + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = tl.where(ok[None, :], sc * scale, _NEG)           # (QB, BLOCK_N); every block has a valid column
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + r * sv_r + h * sv_h + cols[:, None] * sv_n + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (rh * num_s + s) * QB + rows                        # (QB,) partial row index
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc)


@triton.jit
def _suffix_kernel(q_ptr, k_ptr, v_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
                   G, HKV, S, scale,
                   sq_r, sq_g, sq_h, sk_r, sk_g, sk_h, sk_t, sv_r, sv_g, sv_h, sv_t, so_r, so_g, so_h,
                   pos_ptr, inv_ptr, qn_ptr, scaling, eps,
                   N_REP: tl.constexpr, QS: tl.constexpr, QB: tl.constexpr, D: tl.constexpr,
                   BLOCK_T: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr, HAS_NORM: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % HKV
    rg = pid // HKV
    g = rg % G
    r = rg // G
    j = tl.arange(0, QS)
    row_ok = j < N_REP
    d = tl.arange(0, D)
    qa = q_ptr + r * sq_r + g * sq_g + (h * N_REP + j)[:, None] * sq_h
    q = tl.load(qa + d[None, :], mask=row_ok[:, None], other=0.0)
    if ROPE:  # len_ptr holds t: q rotated as the prefix kernel did; slots [0, t + 1), t written by that kernel
        t = tl.load(len_ptr)
        half: tl.constexpr = D // 2
        pd = (d + half) % D
        sign = tl.where(d < half, -1.0, 1.0)
        f = (tl.load(pos_ptr + r) + t).to(tl.float32) * tl.load(inv_ptr + d % half)
        w, wp = _norm_weights(qn_ptr, d, pd, HAS_NORM)
        q = _rope(q, tl.load(qa + pd[None, :], mask=row_ok[:, None], other=0.0), f, sign, scaling, w, wp, eps, D,
                  HAS_NORM)
        n = (t + 1).to(tl.int32)
    else:
        n = tl.load(len_ptr).to(tl.int32)
    m_i = tl.full((QS,), _NEG, tl.float32)
    l_i = tl.zeros((QS,), tl.float32)
    acc = tl.zeros((QS, D), tl.float32)
    kb = k_ptr + r * sk_r + g * sk_g + h * sk_h
    vb = v_ptr + r * sv_r + g * sv_g + h * sv_h
    for t0 in range(0, n, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        ok = ts < n
        k = tl.load(kb + ts[:, None] * sk_t + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = tl.where(ok[None, :], sc * scale, _NEG)
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + ts[:, None] * sv_t + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # merge the prefix partials of these queries (rows g * N_REP + j of program (r, h) of the prefix kernel)
    prow = g * N_REP + j
    for s in range(0, S):
        part = ((r * HKV + h) * S + s) * QB + prow
        mp = tl.load(m_ptr + part, mask=row_ok, other=_NEG)
        lp = tl.load(l_ptr + part, mask=row_ok, other=0.0)
        ap = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, mp)
        a = tl.exp(m_i - m_new)
        b = tl.exp(mp - m_new)
        l_i = l_i * a + lp * b
        acc = acc * a[:, None] + ap * b[:, None]
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + r * so_r + g * so_g + (h * N_REP + j)[:, None] * so_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _num_sms(device: torch.device) -> int:
    return _backend.sm_count(device) or 4  # the interpreter: a few splits, enough to exercise the merge


# _prefix_kernel's programs resident per SM at the launch config below (QB=64, D=128, BLOCK_N=64, 8 warps) on
# sm_90: 121 registers and 113 KiB of shared memory (3 pipeline stages) fit two (bench/kernel_resources.py;
# tests/test_bench.py checks this number against the compiled kernel).
PREFIX_PROGRAMS_PER_SM = 2
# ... and the register cap that keeps it there: ptxas gave the kernel with the rotary of q in its prologue 146
# registers (one program per SM: 1.70 waves at the 3B shape); capped at 65,536 / (2 x 256 threads) = 128 it takes
# 124 and spills nothing (bench/kernel_resources.py, triton 3.7.1 and 3.6.0).
_REGS_PER_SM = 65_536


def _max_regs(warps: int) -> int:
    return min(255, _REGS_PER_SM // (PREFIX_PROGRAMS_PER_SM * 32 * warps))


# A program's fixed cost, in blocks of BLOCK_N columns of K/V read: loading q, writing its (QB, D) fp32 partial,
# and the suffix kernel reading it back (each about the size of one K + V block at the 3B shape).
_PROGRAM_OVERHEAD_BLOCKS = 2


def plan_splits(R: int, Hkv: int, Lp: int, block_n: int, num_sms: int,
                per_sm: int = PREFIX_PROGRAMS_PER_SM) -> tuple[int, int]:
    """(S, SPLIT): split each (request, K/V head)'s prefix of Lp columns into S pieces of SPLIT columns (a multiple
    of block_n), choosing the S that finishes soonest. The R * Hkv * S programs run in waves of num_sms * per_sm;
    a wave lasts as long as a program: its ceil(Lp / block_n / S) blocks plus a fixed cost (q, the partial). A
    grid just over a whole number of waves runs its last wave on a sliver of the GPU (the plan before 2026-12-06
    gave 288 programs for 264 slots at the 3B rollout shape: 1.09 waves); ties go to fewer splits (less partial
    traffic). Deterministic in its arguments."""
    blocks = max(1, -(-Lp // block_n))
    slots = max(1, num_sms * per_sm)
    best = None
    for want in range(1, blocks + 1):
        per = -(-blocks // want)
        S = -(-blocks // per)  # no empty split
        cost = -(-R * Hkv * S // slots) * (per + _PROGRAM_OVERHEAD_BLOCKS)
        if best is None or cost < best[0]:
            best = (cost, S, per)
    return best[1], best[2] * block_n


def _triton_supported(q: Tensor, D: int, n_rep: int) -> bool:
    return (D >= 16 and D & (D - 1) == 0 and D <= 256 and n_rep <= 64
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32))


def shared_prefix_attention_triton(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor,
                                   k_suffix: Tensor, v_suffix: Tensor, suffix_len: Tensor,
                                   scale: float | None = None, splits: tuple[int, int] | None = None) -> Tensor:
    """The two launches. splits: (S, SPLIT) to override `plan_splits` (benches and tests; S * SPLIT >= Lp)."""
    return _launch(q, k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, suffix_len, scale, splits, None)


def _launch(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor, k_suffix: Tensor,
            v_suffix: Tensor, length: Tensor, scale: float | None, splits: tuple[int, int] | None,
            rope: _Rope | None) -> Tensor:
    """Both kernels; rope None: q is rotated and `length` is the suffix length; else `length` is t, q is rotated in
    the kernels and rope.k / rope.v go to slot t of the suffix caches first (`rope_shared_prefix_attention`)."""
    R, G, Hq, Hkv, D, Lp, T = check_decode_attention_inputs(q, k_prefix, v_prefix, prefix_start, k_suffix,
                                                            v_suffix, length)
    n_rep = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    for name, t in (("q", q), ("k_prefix", k_prefix), ("v_prefix", v_prefix), ("k_suffix", k_suffix),
                    ("v_suffix", v_suffix)):
        if t.stride(-1) != 1:
            raise DecodeAttentionInputError(f"{name} must have a unit stride in D, got strides {t.stride()}")
    BLOCK_N, BLOCK_T = 64, 32
    QB = max(16, next_pow2(G * n_rep))
    QS = max(16, next_pow2(n_rep))
    S, split = splits or plan_splits(R, Hkv, Lp, BLOCK_N, _num_sms(q.device))
    if S < 1 or split < 1 or S * split < Lp:
        raise DecodeAttentionInputError(f"splits {(S, split)} do not cover the prefix of {Lp} columns")
    m = torch.empty(R * Hkv * S * QB, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(R * Hkv * S * QB, D, device=q.device, dtype=torch.float32)
    out = torch.empty(R, G, Hq, D, device=q.device, dtype=q.dtype)
    ieee = q.dtype == torch.float32
    warps = 8 if QB * D >= 64 * 128 else 4
    has_norm = rope is not None and rope.q_norm is not None
    if rope is None:  # unused pointer / stride arguments of the rotary branch (ROPE=False compiles it out)
        pos = t_ptr = inv = qn = kn = nk = nv = q
        scaling, eps, nk_strides, nv_strides = 1.0, 0.0, (0, 0), (0, 0)
    else:
        pos, t_ptr, inv, nk, nv = rope.pos, length, rope.inv_freq, rope.k, rope.v
        qn, kn = (rope.q_norm, rope.k_norm) if has_norm else (q, q)
        scaling, eps, nk_strides, nv_strides = rope.scaling, rope.eps, rope.k.stride()[:2], rope.v.stride()[:2]
    _prefix_kernel[(R * Hkv, S)](
        q, k_prefix, v_prefix, prefix_start, m, l, acc, Lp, Hkv, G * n_rep, split, scale,
        q.stride(0), q.stride(1), q.stride(2), *k_prefix.stride()[:3], *v_prefix.stride()[:3],
        pos, t_ptr, inv, qn, kn, scaling, eps, nk, nv, *nk_strides, *nv_strides,
        k_suffix, v_suffix, *k_suffix.stride()[:4], *v_suffix.stride()[:4],
        N_REP=n_rep, QB=QB, D=D, BLOCK_N=BLOCK_N, IEEE=ieee, ROPE=rope is not None, HAS_NORM=has_norm,
        GB=next_pow2(G), num_warps=warps, maxnreg=_max_regs(warps))
    _suffix_kernel[(R * G * Hkv,)](
        q, k_suffix, v_suffix, length, m, l, acc, out, G, Hkv, S, scale,
        q.stride(0), q.stride(1), q.stride(2), *k_suffix.stride()[:4], *v_suffix.stride()[:4],
        out.stride(0), out.stride(1), out.stride(2), pos, inv, qn, scaling, eps,
        N_REP=n_rep, QS=QS, QB=QB, D=D, BLOCK_T=BLOCK_T, IEEE=ieee, ROPE=rope is not None, HAS_NORM=has_norm,
        num_warps=4)
    return out


@torch.library.custom_op("strive::shared_prefix_attention", mutates_args=())
def _shared_prefix_attention_op(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor,
                                k_suffix: Tensor, v_suffix: Tensor, suffix_len: Tensor, scale: float) -> Tensor:
    return shared_prefix_attention_triton(q, k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, suffix_len,
                                          scale)


@_shared_prefix_attention_op.register_fake
def _(q, k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, suffix_len, scale):
    return torch.empty_like(q)


def shared_prefix_attention(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor,
                            k_suffix: Tensor, v_suffix: Tensor, suffix_len: Tensor, scale: float | None = None,
                            *, backend: str = "auto") -> Tensor:
    """Decode attention of G rows over their shared prompt and their own suffixes (contract:
    `strive_kernels.reference.decode_attention`). backend: auto | triton | reference (strive_kernels._backend):
    auto takes Triton on CUDA when the head size is a power of two in [16, 256], else the twin. No host sync on
    either path."""
    D = q.shape[-1]
    n_rep = q.shape[2] // max(k_prefix.shape[1], 1)
    backend = resolve("shared_prefix_attention", backend, q.device, head_dim=D, n_rep=n_rep,
                      supported=_triton_supported(q, D, n_rep))
    scale = D ** -0.5 if scale is None else float(scale)
    if backend == "reference":
        return shared_prefix_attention_reference(q, k_prefix, v_prefix, prefix_start, k_suffix, v_suffix,
                                                 suffix_len, scale)
    return _shared_prefix_attention_op(q, k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, suffix_len, scale)


@dataclass(frozen=True)
class _Rope:
    """The rotary and cache-write arguments of `rope_shared_prefix_attention` for the kernels."""
    k: Tensor
    v: Tensor
    pos: Tensor
    inv_freq: Tensor
    scaling: float
    q_norm: Tensor | None
    k_norm: Tensor | None
    eps: float


def rope_shared_prefix_attention_triton(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, t: Tensor, inv_freq: Tensor,
                                        rope_scaling: float, k_prefix: Tensor, v_prefix: Tensor,
                                        prefix_start: Tensor, k_suffix: Tensor, v_suffix: Tensor,
                                        scale: float | None = None, q_norm: Tensor | None = None,
                                        k_norm: Tensor | None = None, eps: float = 1e-6,
                                        splits: tuple[int, int] | None = None) -> Tensor:
    """The same two launches with the rotary of q and k and the cache write in them (no `rope_cache` launch)."""
    check_rope_inputs(q, k, v, pos, k_suffix, q_norm, k_norm)
    R, G = k_suffix.shape[:2]
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise DecodeAttentionInputError(f"k and v must have a unit stride in D, got {k.stride()} and {v.stride()}")
    rope = _Rope(k, v, pos.contiguous(), inv_freq.to(device=q.device, dtype=torch.float32).contiguous(),
                 float(rope_scaling), q_norm, k_norm, float(eps))
    return _launch(q.view(R, G, *q.shape[1:]), k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, t, scale,
                   splits, rope)


@torch.library.custom_op("strive::rope_shared_prefix_attention", mutates_args=("k_suffix", "v_suffix"))
def _rope_op(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, t: Tensor, inv_freq: Tensor, rope_scaling: float,
             k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor, k_suffix: Tensor, v_suffix: Tensor,
             scale: float, q_norm: Optional[Tensor], k_norm: Optional[Tensor], eps: float) -> Tensor:
    return rope_shared_prefix_attention_triton(q, k, v, pos, t, inv_freq, rope_scaling, k_prefix, v_prefix,
                                               prefix_start, k_suffix, v_suffix, scale, q_norm, k_norm, eps)


@_rope_op.register_fake
def _(q, k, v, pos, t, inv_freq, rope_scaling, k_prefix, v_prefix, prefix_start, k_suffix, v_suffix, scale, q_norm,
      k_norm, eps):
    R, G = k_suffix.shape[:2]
    return q.new_empty(R, G, q.shape[1], q.shape[2])


def rope_shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, t: Tensor, inv_freq: Tensor,
                                 rope_scaling: float, k_prefix: Tensor, v_prefix: Tensor, prefix_start: Tensor,
                                 k_suffix: Tensor, v_suffix: Tensor, scale: float | None = None,
                                 q_norm: Tensor | None = None, k_norm: Tensor | None = None, eps: float = 1e-6,
                                 *, backend: str = "auto") -> Tensor:
    """One decode step's attention from the projections: rotary of q and k at position pos[r] + t for the G rows of
    request r (pos (R,): they share the prompt; Qwen3-VL's per-head norms first when given), k and v into slot t of
    the suffix caches, then `shared_prefix_attention` over the prefix and slots [0, t]. Contract:
    `strive_kernels.reference.decode_attention.rope_shared_prefix_attention_reference`. On Triton the rotary runs
    inside the two attention kernels: one launch fewer per layer than `rope_cache` + `shared_prefix_attention` (36
    graph nodes per step at the 3B shape), and q, k never make a round trip through memory. Same backend rule as
    `shared_prefix_attention`, plus: q, k, v with a unit stride in D and pos on q's device, else the twin."""
    D = q.shape[-1]
    n_rep = q.shape[1] // max(k.shape[1], 1)
    readable = (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and pos.device == q.device == t.device
                and len({x.dtype for x in (q, k, v, k_prefix, k_suffix)}) == 1)
    backend = resolve("shared_prefix_attention", backend, q.device, head_dim=D, n_rep=n_rep,
                      supported=readable and _triton_supported(q, D, n_rep))
    scale = D ** -0.5 if scale is None else float(scale)
    if backend == "reference":
        return rope_shared_prefix_attention_reference(q, k, v, pos, t, inv_freq, rope_scaling, k_prefix, v_prefix,
                                                      prefix_start, k_suffix, v_suffix, scale, q_norm, k_norm, eps)
    return _rope_op(q, k, v, pos, t, inv_freq, float(rope_scaling), k_prefix, v_prefix, prefix_start, k_suffix,
                    v_suffix, scale, q_norm, k_norm, float(eps))
