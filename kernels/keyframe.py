"""Importance-aware keyframe sampling in one Triton launch: `strive_kernels.keyframe_sample`.

Contract, exactness rules and the coverage bound: `strive_kernels.reference.keyframe` (the pure-torch twin,
oracle and CPU fallback). Same seed -> the same indices on the reference, the interpreter and the GPU, as
long as the fp32 importance agrees to the bit (see the reference docstring for when it may not).

One launch, grid (B, S): program (b, s) scores rows [s*ROWS, (s+1)*ROWS) of pool b — the 38 MB of
embeddings of a B=64 x P=256 x D=1152 bf16 batch are spread over B*S programs so that every SM streams —
and writes the scores. The last program of pool b to finish (an atomic ticket per pool: stores, CTA
barrier, acq_rel atomic; the loser programs exit) then runs the per-pool tail on P_BLOCK lanes:

    softmax(scores / tau) mixed with lambda/P  ->  importance (stored)
    integer CDF W = cumsum(floor(importance * 2^30))          (int64, exact)
    for j in 0..F-1, all K variants at once ((K_BLOCK, P_BLOCK) tile):
        raw index x = #{i : W_i * F <= j*T + (U_k*T >> 24)}, nearest free frame (earlier on a tie)
    scatter the used frames in order: indices (B, K, F) sorted

When a pool fits one program (S == 1) the ticket is compiled out. On the stream: the (B+1) offsets copied
from pinned host memory (when the caller's are on the host), one memset (the B zeroed tickets, skipped when
S == 1) and the one Triton kernel; no host sync. The public function validates the offsets on the host copy
the caller passes; the NaN check of the scores reads device data, so on CUDA it runs only when asked
(`check_finite=True` or STRIVE_KERNELS_DEBUG=1, see strive_kernels._backend).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from strive_kernels._backend import cdiv, check_values, next_pow2, resolve

from strive_kernels.reference.keyframe import (
    COS_EPS,
    KeyframeInputError,
    check_finite_embeddings,
    check_keyframe_inputs,
    keyframe_sample_reference,
)

_COS_EPS = tl.constexpr(COS_EPS)
_BIG_KEY = tl.constexpr(1 << 30)  # "taken" marker of the nearest-free-frame search (> any 2*distance+1)


@triton.jit
def _min_and_sum(ka, ca, kb, cb):
    return tl.minimum(ka, kb), ca + cb


@triton.jit(do_not_specialize=["seed"])
def _keyframe_kernel(f_ptr, q_ptr, off_ptr, scores_ptr, imp_ptr, idx_ptr, ticket_ptr,
                     D, stride_f, stride_q, K, F, tau, lam, seed,
                     S: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, P_BLOCK: tl.constexpr,
                     K_BLOCK: tl.constexpr, CANON: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    start = tl.load(off_ptr + b)
    P = (tl.load(off_ptr + b + 1) - start).to(tl.int32)

    # ---- phase 1: cosine scores of this program's rows (fp32 accumulation over D chunks)
    rows = s * ROWS + tl.arange(0, ROWS)  # (ROWS,) local frame index
    rmask = rows < P
    dcol = tl.arange(0, BLOCK_D)
    acc_fq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    acc_ff = tl.zeros([ROWS, BLOCK_D], tl.float32)
    acc_qq = tl.zeros([BLOCK_D], tl.float32)
    f_rows = f_ptr + (start + rows).to(tl.int64)[:, None] * stride_f  # (ROWS, 1) row pointers
    q_row = q_ptr + b.to(tl.int64) * stride_q
    # register double buffering: chunk d0 + BLOCK_D is requested before chunk d0 is reduced, so two
    # chunks per program are in flight (Triton does not pipeline loads that do not feed a tl.dot)
    f_nx = tl.load(f_rows + dcol[None, :], mask=rmask[:, None] & (dcol < D)[None, :], other=0.0)
    q_nx = tl.load(q_row + dcol, mask=dcol < D, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        f = f_nx.to(tl.float32)
        q = q_nx.to(tl.float32)
        dn = d0 + BLOCK_D + dcol
        dm = dn < D
        f_nx = tl.load(f_rows + dn[None, :], mask=rmask[:, None] & dm[None, :], other=0.0)
        q_nx = tl.load(q_row + dn, mask=dm, other=0.0)
        acc_fq += f * q[None, :]
        acc_ff += f * f
        acc_qq += q * q
    dot = tl.sum(acc_fq, axis=1)
    norm = tl.sqrt_rn(tl.sum(acc_ff, axis=1)) * tl.sqrt_rn(tl.sum(acc_qq, axis=0))
    score = tl.div_rn(dot, tl.maximum(norm, _COS_EPS))
    tl.store(scores_ptr + start + rows, score, mask=rmask)
    # every thread's score stores precede what follows: the release below (several programs), or this program's
    # own reload in phase 2 (one program: Triton lets one warp store a replicated tensor, and every warp reloads it)
    tl.debug_barrier()

    # ---- the last program of the pool continues (ticket), the others are done
    if S > 1:
        ticket = tl.atomic_add(ticket_ptr + b, 1, sem="acq_rel", scope="gpu")
        is_last = ticket == S - 1
    else:
        is_last = P >= 0
    if is_last:
        # ---- phase 2: importance = (1 - lam) softmax(s / tau) + lam / P
        lane = tl.arange(0, P_BLOCK)
        valid = lane < P
        sc = tl.load(scores_ptr + start + lane, mask=valid, other=0.0, cache_modifier=".cg")
        z = tl.where(valid, tl.div_rn(sc, tau), -float("inf"))
        e = tl.exp(z - tl.max(z, axis=0))
        soft = tl.div_rn(e, tl.sum(e, axis=0))
        p_f = P.to(tl.float32)
        imp = (1.0 - lam) * soft + tl.div_rn(lam, p_f)
        imp = tl.where(valid, imp, 0.0)
        tl.store(imp_ptr + start + lane, imp, mask=valid)

        # ---- phase 3: integer CDF per variant, (K_BLOCK, P_BLOCK)
        w = (imp * 1073741824.0).to(tl.int64)  # floor(imp * 2^30): exact scaling, truncation = floor
        Wq = tl.cumsum(w, axis=0)
        kk = tl.arange(0, K_BLOCK)
        canon_k = (kk == 0) & CANON
        wc = (tl.div_rn(1.0, p_f) * 1073741824.0).to(tl.int64)
        Wc = wc * (tl.minimum(lane, P - 1) + 1).to(tl.int64)  # the cumulative sum of a constant, no scan
        W = tl.where(canon_k[:, None], Wc[None, :], Wq[None, :])  # (K_BLOCK, P_BLOCK)
        T = tl.where(canon_k, wc * P.to(tl.int64), tl.sum(w, axis=0))  # (K_BLOCK,)
        u = tl.rand(seed, b * 65536 + kk)
        u = tl.where(canon_k, 0.5, u)
        uT = ((u * 16777216.0).to(tl.int64) * T) >> 24  # floor(u * 2^24) * T >> 24
        WF = W * F
        valid2 = valid[None, :] & (kk < K)[:, None]
        used = tl.where(valid2, 0, 1)  # padding lanes count as taken
        lane2 = lane[None, :]
        # raw inverse-CDF index of sample j: x_j = #{i : W_i * F <= j*T + uT}. It does not depend on the
        # frames already taken, so x_{j+1} is counted in the same (tuple) reduction as step j's nearest-free
        # search: one block-wide reduction per step instead of two.
        x = tl.sum(((WF <= uT[:, None]) & valid2).to(tl.int32), axis=1)  # x_0
        for j in range(F):
            dist = tl.abs(lane2 - x[:, None])
            key = tl.where(used != 0, _BIG_KEY, dist * 2 + (lane2 > x[:, None]).to(tl.int32))
            nxt = ((WF <= ((j + 1) * T + uT)[:, None]) & valid2).to(tl.int32)
            kmin, x_next = tl.reduce((key, nxt), 1, _min_and_sum)  # nearest free frame (earlier on a tie); x_{j+1}
            d = kmin >> 1
            new = tl.where((kmin & 1) != 0, x + d, x - d)
            used = tl.where(lane2 == new[:, None], 1, used)
            x = x_next
        # ---- phase 4: the F used frames of each variant, in order
        taken = (used != 0) & valid2
        rank = tl.cumsum(taken.to(tl.int32), axis=1) - 1
        out = idx_ptr + (b * K + kk).to(tl.int64)[:, None] * F + rank
        tl.store(out, lane2.to(tl.int64) + tl.zeros([K_BLOCK, P_BLOCK], tl.int64), mask=taken)


def keyframe_sample_forward(frame_emb: Tensor, question_emb: Tensor, offsets: Tensor, sizes: list[int],
                            num_variants: int, num_frames: int, temperature: float, uniform_mix: float, seed: int,
                            canonical_first: bool, rows_per_program: int = 64,
                            num_warps: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Launch on validated inputs (no checks, no sync): returns (indices, scores, importance).

    rows_per_program=64, num_warps=8: the fastest of bench_keyframe.py --sweep on an H200 (2026-11-26,
    B=64 x P=256 x D=1152 bf16: 34.1 us, against 36.4 us for 32 rows; bench/results/h200-2026-11-26/)."""
    dev = frame_emb.device
    B, K, F = len(sizes), num_variants, num_frames
    total, D = frame_emb.shape
    pmax = max(sizes)
    rows = min(next_pow2(rows_per_program), next_pow2(pmax))
    S = cdiv(pmax, rows)
    fe = frame_emb if frame_emb.stride(1) == 1 else frame_emb.contiguous()
    qe = question_emb if question_emb.stride(1) == 1 else question_emb.contiguous()
    off = _device_offsets(offsets, dev)
    scores = torch.empty(total, dtype=torch.float32, device=dev)
    imp = torch.empty(total, dtype=torch.float32, device=dev)
    idx = torch.empty(B, K, F, dtype=torch.int64, device=dev)
    tickets = torch.zeros(B if S > 1 else 1, dtype=torch.int32, device=dev)
    block_d = min(128, next_pow2(D))
    _keyframe_kernel[(B, S)](fe, qe, off, scores, imp, idx, tickets, D, fe.stride(0), qe.stride(0), K, F,
                             float(temperature), float(uniform_mix), seed, S=S, ROWS=rows, BLOCK_D=block_d,
                             P_BLOCK=next_pow2(pmax), K_BLOCK=next_pow2(K),
                             CANON=bool(canonical_first), num_warps=num_warps)
    return idx, scores, imp


def _device_offsets(offsets: Tensor, device: torch.device) -> Tensor:
    """(B+1,) int64 offsets on `device` without a host sync: a host tensor goes through pinned memory with a
    non-blocking copy (a copy from pageable memory makes the CPU wait for the whole stream)."""
    if offsets.device == device:
        return offsets.to(torch.int64)
    if device.type != "cuda":
        return offsets.to(device=device, dtype=torch.int64)
    staged = torch.empty(offsets.shape, dtype=torch.int64, pin_memory=True)
    staged.copy_(offsets)
    return staged.to(device, non_blocking=True)  # the pinned block is not reused before the copy ran


def keyframe_sample(frame_emb: Tensor, question_emb: Tensor, offsets: Tensor, num_variants: int, num_frames: int,
                    temperature: float = 0.1, uniform_mix: float = 0.3, seed: int = 0, canonical_first: bool = True,
                    backend: str = "auto", check_finite: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """K sets of F sorted unique keyframes per pool; returns (indices int64 (B, K, F), scores fp32 (sum P,),
    importance fp32 (sum P,)).

    frame_emb float (sum P_b, D) (fp32/bf16/fp16); question_emb (B, D); offsets int64 (B+1,), pool b =
    rows offsets[b]:offsets[b+1]. Pass them on the host (as strive_engine does): they are validated there
    and copied without a sync. Offsets on the device are read on the host once (one sync).
    temperature tau, uniform_mix lambda, seed (Philox key), canonical_first (variant 0 evenly spread).
    backend: auto | triton | reference (strive_kernels._backend): auto takes Triton on CUDA tensors when
    P_b <= 8192 and K <= 64 (its per-pool tail keeps (K, P) tiles in registers), the reference otherwise.
    check_finite: raise on NaN/inf embeddings (checked on the scores after the launch: one sync on CUDA).
        None (default): on host tensors always, on CUDA only with STRIVE_KERNELS_DEBUG=1. Unchecked
        non-finite embeddings give NaN scores and importance and unspecified (still sorted, unique,
        in-range) indices for their pool.
    Full contract: strive_kernels.reference.keyframe.
    """
    sizes = check_keyframe_inputs(frame_emb, question_emb, offsets, num_variants, num_frames, temperature,
                                  uniform_mix, seed)
    if resolve("keyframe_sample", backend, frame_emb.device, pool=max(sizes), variants=num_variants) == "reference":
        return keyframe_sample_reference(frame_emb, question_emb, offsets, num_variants, num_frames, temperature,
                                         uniform_mix, seed, canonical_first)
    idx, scores, imp = keyframe_sample_forward(frame_emb, question_emb, _device_offsets(offsets, frame_emb.device),
                                               sizes, num_variants, num_frames, temperature, uniform_mix, seed,
                                               canonical_first)
    if check_values(check_finite, frame_emb.is_cuda) and not bool(torch.isfinite(scores).all()):
        check_finite_embeddings(frame_emb, question_emb, sizes)  # names the pool
        raise KeyframeInputError("non-finite cosine scores from finite embeddings (|values| too large for fp32?)")
    return idx, scores, imp
