"""Segmented (ragged-group) advantage normalisation in Triton: `strive_kernels.group_advantages`.

Contract, modes and conventions: `strive_kernels.reference.advantage` (the pure-torch twin, used as oracle
and CPU fallback). This file is the fast path, sized for what the engine feeds it: B x K x G rewards per
step, a few hundred to a few thousand, at most MAX_REWARDS (65,536) per call. No host sync (the public
function checks the ids' ordering only on host data or in debug mode).

One program per block of whole questions (rewards r, question ids g, variant ids v):

    program t owns the questions whose first answer lies in answers [t*BLOCK, (t+1)*BLOCK) and loads a
    window of WIN = 2*BLOCK answers from t*BLOCK, so each owned question lies in it whole (a question has
    at most BLOCK + 1 = MAX_QUESTION answers; a batch of <= 2*BLOCK answers is one program and has no
    limit). Segmented scans over the window give each run of the chosen grouping its finite count, sum,
    min, max and then its sum of squared deviations (two-pass variance), broadcast from the run's last lane;
    by question the same scans carry the min/max of each variant run (the per-variant dead count is always
    reported). The program writes the advantages of the answers it owns and one row of partial statistics
    (finite count, mean and M2 of rewards and of advantages, group and dead-group counts, NaN count).

    A one-program batch merges its row into the GroupStats itself; otherwise a second one-program launch
    merges the T <= 64 rows (Chan's mean/M2 merge, one fixed order: deterministic). batch_std scales the
    centred rewards by 1 / (std_batch + eps) in that same merge.

Each question is computed by one program, by the same sequence of scan steps whatever the tiling. Dead
groups (finite rewards all equal, incl. 0 or 1 finite) are detected exactly from min == max, never from a
small computed variance, and get advantage exactly 0 as in the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from strive_kernels import _backend
from strive_kernels._backend import cdiv, check_values, next_pow2, resolve
from strive_kernels.reference.advantage import (
    ADVANTAGE_MODES,
    AdvantageInputError,
    GroupStats,
    check_advantage_inputs,
    group_advantages_reference,
)

NPART = 10  # columns of the partial-statistics rows, see _advantage_kernel
_NP = tl.constexpr(NPART)  # the same, readable inside the kernels
_BIG = tl.constexpr(1 << 30)  # "no run end here" lane marker (> any lane)


@triton.jit
def _is_finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _seg_stats_combine(fa, na, sa, mna, mxa, fb, nb, sb, mnb, mxb):
    # Segmented merge of (a, b), a before b: b restarts its run when its start flag is set.
    rb = fb != 0
    return (fa | fb, tl.where(rb, nb, na + nb), tl.where(rb, sb, sa + sb),
            tl.where(rb, mnb, tl.minimum(mna, mnb)), tl.where(rb, mxb, tl.maximum(mxa, mxb)))


@triton.jit
def _bcast_stats_combine(pa, na, sa, mna, mxa, pb, nb, sb, mnb, mxb):
    # Keep the values of the nearest run end (smallest end lane). Order-free (a min by key), so the
    # direction convention of reverse scans does not matter.
    ta = pa <= pb
    return (tl.where(ta, pa, pb), tl.where(ta, na, nb), tl.where(ta, sa, sb), tl.where(ta, mna, mnb),
            tl.where(ta, mxa, mxb))


@triton.jit
def _seg_minmax_combine(fa, mna, mxa, fb, mnb, mxb):
    rb = fb != 0
    return fa | fb, tl.where(rb, mnb, tl.minimum(mna, mnb)), tl.where(rb, mxb, tl.maximum(mxa, mxb))


@triton.jit
def _bcast_minmax_combine(pa, mna, mxa, pb, mnb, mxb):
    ta = pa <= pb
    return tl.where(ta, pa, pb), tl.where(ta, mna, mnb), tl.where(ta, mxa, mxb)


@triton.jit
def _seg_both_combine(fa, na, sa, mna, mxa, ga, mnva, mxva, fb, nb, sb, mnb, mxb, gb, mnvb, mxvb):
    f, n, s, mn, mx = _seg_stats_combine(fa, na, sa, mna, mxa, fb, nb, sb, mnb, mxb)
    g, mnv, mxv = _seg_minmax_combine(ga, mnva, mxva, gb, mnvb, mxvb)
    return f, n, s, mn, mx, g, mnv, mxv


@triton.jit
def _bcast_both_combine(pa, na, sa, mna, mxa, qa, mnva, mxva, pb, nb, sb, mnb, mxb, qb, mnvb, mxvb):
    p, n, s, mn, mx = _bcast_stats_combine(pa, na, sa, mna, mxa, pb, nb, sb, mnb, mxb)
    q, mnv, mxv = _bcast_minmax_combine(qa, mnva, mxva, qb, mnvb, mxvb)
    return p, n, s, mn, mx, q, mnv, mxv


@triton.jit
def _seg_sum_combine(fa, xa, fb, xb):
    return fa | fb, tl.where(fb != 0, xb, xa + xb)


@triton.jit
def _bcast_combine(pa, xa, pb, xb):
    ta = pa <= pb
    return tl.where(ta, pa, pb), tl.where(ta, xa, xb)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7


@triton.jit
def _pick(x, idx, k):
    # x[k] of a vector as a scalar (x indexed by idx)
    return tl.sum(tl.where(idx == k, x, 0), axis=0)


@triton.jit
def _merge_partials(part_ptr, stats_ptr, count_ptr, adv_ptr, T, N, eps, MODE: tl.constexpr, TP: tl.constexpr):
    """GroupStats from the T partial rows (Chan: M2 = sum_t M2_t + n_t (mean_t - mean)^2) into stats_ptr
    (5 fp32) and count_ptr (2 int64); batch_std: the advantages (centred rewards so far) scaled in place."""
    cols = tl.arange(0, 16)
    c = cols[None, :]
    tile = tl.load(part_ptr + tl.arange(0, TP)[:, None] * _NP + c,
                   mask=(tl.arange(0, TP) < T)[:, None] & (c < _NP), other=0.0)  # (TP, 16)
    is_count = (c == 0) | (c >= 5)  # n, group / dead counts, NaN count: exact in fp32 per row, summed in int64
    counts = tl.sum(tl.where(is_count, tile, 0.0).to(tl.int64), axis=0)  # (16,)
    nt = tl.sum(tl.where(c == 0, tile, 0.0), axis=1)  # (TP,) finite answers of each row
    r_mean_t = tl.sum(tl.where(c == 1, tile, 0.0), axis=1)
    a_mean_t = tl.sum(tl.where(c == 3, tile, 0.0), axis=1)
    nf = tl.maximum(_pick(counts, cols, 0).to(tl.float32), 1.0)
    r_mean = tl.sum(nt * r_mean_t, axis=0) / nf
    a_mean = tl.sum(nt * a_mean_t, axis=0) / nf
    dr = r_mean_t - r_mean
    da = a_mean_t - a_mean
    r_std = tl.sqrt_rn(tl.sum(tl.sum(tl.where(c == 2, tile, 0.0), axis=1) + nt * dr * dr, axis=0) / nf)
    a_std = tl.sqrt_rn(tl.sum(tl.sum(tl.where(c == 4, tile, 0.0), axis=1) + nt * da * da, axis=0) / nf)
    if MODE == 3:  # batch_std: the advantages are still centred rewards; their std scales with them
        a_std = a_std / (r_std + eps)
        inv = 1.0 / (r_std + eps)
        for i0 in range(0, N, 1024):
            i = i0 + tl.arange(0, 1024)
            tl.store(adv_ptr + i, tl.load(adv_ptr + i, mask=i < N, other=0.0) * inv, mask=i < N)
    cnt_c = _pick(counts, cols, 5)
    cnt_v = _pick(counts, cols, 7)
    tl.store(stats_ptr + 0, r_mean)
    tl.store(stats_ptr + 1, r_std)
    tl.store(stats_ptr + 2, a_std)
    tl.store(stats_ptr + 3, _pick(counts, cols, 6).to(tl.float32) / tl.maximum(cnt_c, 1).to(tl.float32))
    tl.store(stats_ptr + 4, _pick(counts, cols, 8).to(tl.float32) / tl.maximum(cnt_v, 1).to(tl.float32))
    tl.store(count_ptr + 0, cnt_c)
    tl.store(count_ptr + 1, _pick(counts, cols, 9))


@triton.jit
def _write_partials(row, r, adv, own, fin, ends_c, ends_v, dead_c, dead_v):
    """The row of partial statistics of a program's owned answers: finite count, mean and M2 of rewards and of
    advantages, groups and dead groups of the chosen grouping and of variants, NaN count (two tuple reductions)."""
    ownf = own & fin
    nf, r_sum, a_sum, n_ends_c, n_dead_c, n_ends_v, n_dead_v, n_nan = tl.reduce(
        (ownf.to(tl.float32), tl.where(ownf, r, 0.0), tl.where(ownf, adv, 0.0), ends_c.to(tl.int32),
         (ends_c & dead_c).to(tl.int32), ends_v.to(tl.int32), (ends_v & dead_v).to(tl.int32),
         (own & ~fin).to(tl.int32)), 0, _add8)
    r_mean = r_sum / tl.maximum(nf, 1.0)
    a_mean = a_sum / tl.maximum(nf, 1.0)
    r_d = tl.where(ownf, r - r_mean, 0.0)
    a_d = tl.where(ownf, adv - a_mean, 0.0)
    r_m2, a_m2 = tl.reduce((r_d * r_d, a_d * a_d), 0, _add2)
    tl.store(row + 0, nf)
    tl.store(row + 1, r_mean)
    tl.store(row + 2, r_m2)
    tl.store(row + 3, a_mean)
    tl.store(row + 4, a_m2)
    tl.store(row + 5, n_ends_c.to(tl.float32))
    tl.store(row + 6, n_dead_c.to(tl.float32))
    tl.store(row + 7, n_ends_v.to(tl.float32))
    tl.store(row + 8, n_dead_v.to(tl.float32))
    tl.store(row + 9, n_nan.to(tl.float32))


@triton.jit
def _advantage_kernel(r_ptr, g_ptr, v_ptr, adv_ptr, part_ptr, stats_ptr, count_ptr, N, eps,
                      MODE: tl.constexpr, BLOCK: tl.constexpr, WIN: tl.constexpr, ONE_PROGRAM: tl.constexpr):
    BY_VARIANT: tl.constexpr = MODE == 1
    t = tl.program_id(0)
    lane = tl.arange(0, WIN)
    i = t * BLOCK + lane  # (WIN,) answer index
    inb = i < N
    r = tl.load(r_ptr + i, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=inb, other=0)
    v = tl.load(v_ptr + i, mask=inb, other=0)
    has_prev = inb & (i > 0)
    has_next = inb & (i < N - 1)
    g_prev = tl.load(g_ptr + i - 1, mask=has_prev, other=0)
    v_prev = tl.load(v_ptr + i - 1, mask=has_prev, other=0)
    g_next = tl.load(g_ptr + i + 1, mask=has_next, other=0)
    v_next = tl.load(v_ptr + i + 1, mask=has_next, other=0)
    # run boundaries (padding lanes are runs of their own)
    q_start = ~has_prev | (g != g_prev)
    q_end = ~has_next | (g != g_next)
    v_start = q_start | (v != v_prev)
    v_end = q_end | (v != v_next)
    # the owned questions: from the first question start of the window to the first one at or past BLOCK
    # (answers before it belong to a question the previous program owns; ids are sorted, runs contiguous)
    first_own = tl.min(tl.where(q_start & inb, lane, WIN), axis=0)
    past_own = tl.min(tl.where(q_start & inb & (lane >= BLOCK), lane, WIN), axis=0)
    own = inb & (lane >= first_own) & (lane < past_own)
    if BY_VARIANT:
        c_start = v_start
        c_end = v_end
    else:
        c_start = q_start
        c_end = q_end
    first = lane == 0
    last = lane == WIN - 1
    fin = inb & _is_finite(r)
    r_lo = tl.where(fin, r, float("inf"))
    r_hi = tl.where(fin, r, -float("inf"))
    c_flag = (c_start | first).to(tl.int32)
    c_pos = tl.where(c_end | last, lane, _BIG)

    # ---- n, sum, min, max of each run of the chosen grouping, broadcast from its last lane; by question the
    # same scans also carry min/max of each variant run (the per-variant dead count, always reported)
    if BY_VARIANT:
        _f1, n_c, s_c, mn_c, mx_c = tl.associative_scan(
            (c_flag, fin.to(tl.float32), tl.where(fin, r, 0.0), r_lo, r_hi), 0, _seg_stats_combine)
        _p1, n_c, s_c, mn_c, mx_c = tl.associative_scan((c_pos, n_c, s_c, mn_c, mx_c), 0, _bcast_stats_combine,
                                                        reverse=True)
    else:
        _f1, n_c, s_c, mn_c, mx_c, _f3, mn_v, mx_v = tl.associative_scan(
            (c_flag, fin.to(tl.float32), tl.where(fin, r, 0.0), r_lo, r_hi, (v_start | first).to(tl.int32), r_lo,
             r_hi), 0, _seg_both_combine)
        _p1, n_c, s_c, mn_c, mx_c, _p3, mn_v, mx_v = tl.associative_scan(
            (c_pos, n_c, s_c, mn_c, mx_c, tl.where(v_end | last, lane, _BIG), mn_v, mx_v), 0, _bcast_both_combine,
            reverse=True)
    mean_c = s_c / tl.maximum(n_c, 1.0)
    dev = tl.where(fin, r - mean_c, 0.0)
    # ---- M2 about the run mean (two-pass variance)
    _f2, m2_c = tl.associative_scan((c_flag, dev * dev), 0, _seg_sum_combine)
    _p2, m2_c = tl.associative_scan((c_pos, m2_c), 0, _bcast_combine, reverse=True)
    dead_c = ~(mn_c < mx_c)  # all finite rewards equal (or fewer than 2 of them)
    if BY_VARIANT:
        dead_v = dead_c
    else:
        dead_v = ~(mn_v < mx_v)

    # ---- advantages of the owned answers
    std_c = tl.where(dead_c, 0.0, tl.sqrt_rn(m2_c / tl.maximum(n_c, 1.0)))
    centered = r - mean_c
    if MODE == 0 or MODE == 1:
        adv = tl.div_rn(centered, std_c + eps)
    else:  # mean_only; batch_std is scaled in _merge_partials once std_batch is known
        adv = centered
    adv = tl.where(fin & ~dead_c, adv, 0.0)
    tl.store(adv_ptr + i, adv, mask=own)

    _write_partials(part_ptr + t * _NP, r, adv, own, fin, own & c_end, own & v_end, dead_c, dead_v)
    if ONE_PROGRAM:  # the whole batch was this program's: merge here (its stores are visible after the barrier)
        tl.debug_barrier()
        _merge_partials(part_ptr, stats_ptr, count_ptr, adv_ptr, 1, N, eps, MODE, 2)


@triton.jit
def _finalize_kernel(part_ptr, stats_ptr, count_ptr, adv_ptr, T, N, eps, MODE: tl.constexpr, TP: tl.constexpr):
    _merge_partials(part_ptr, stats_ptr, count_ptr, adv_ptr, T, N, eps, MODE, TP)


def _block() -> int:
    """Answers owned per program (a question has at most block + 1 of them); follows _backend.MAX_QUESTION."""
    return _backend.MAX_QUESTION - 1


def group_advantages_forward(rewards: Tensor, group_ids: Tensor, variant_ids: Tensor, mode: str, eps: float
                             ) -> tuple[Tensor, GroupStats]:
    """Launch the kernels on validated inputs (no checks, no sync): one launch for <= 2 * block answers,
    else T = ceil(N / block) programs and the merge."""
    n = rewards.numel()
    dev = rewards.device
    adv = torch.empty(n, dtype=torch.float32, device=dev)
    alloc = torch.empty if n else torch.zeros  # the merge writes every entry: no memset launches
    stats = alloc(5, dtype=torch.float32, device=dev)
    counts = alloc(2, dtype=torch.int64, device=dev)
    if n:
        mode_id = ADVANTAGE_MODES.index(mode)
        block = _block()
        one = n <= 2 * block
        if one:  # the window is the whole batch
            block = max(16, next_pow2(n))
        T = cdiv(n, block)
        win = block if one else 2 * block
        part = torch.empty(T, NPART, dtype=torch.float32, device=dev)
        r, g, v = rewards.contiguous(), group_ids.contiguous(), variant_ids.contiguous()
        _advantage_kernel[(T,)](r, g, v, adv, part, stats, counts, n, float(eps), MODE=mode_id, BLOCK=block, WIN=win,
                                ONE_PROGRAM=one, num_warps=1 if win <= 128 else min(8, win // 64))
        if not one:
            _finalize_kernel[(1,)](part, stats, counts, adv, T, n, float(eps), MODE=mode_id,
                                   TP=next_pow2(T), num_warps=4)
    return adv, GroupStats(*stats.unbind(), *counts.unbind())


def check_question_lengths(group_ids: Tensor) -> None:
    """The Triton path's layout limit (reads the ids: one host sync on CUDA): in a batch of more than 2 * block
    answers no question may have more than block + 1 (= MAX_QUESTION) answers."""
    block, n = _block(), group_ids.numel()
    if n <= 2 * block:
        return
    g = group_ids.cpu()
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool), g[1:] != g[:-1]])).flatten()
    sizes = torch.diff(starts, append=torch.tensor([n]))
    q = int(sizes.argmax())
    if int(sizes[q]) > block + 1:
        raise AdvantageInputError(
            f"question {int(group_ids[starts[q]])} (answers {int(starts[q])}..{int(starts[q] + sizes[q]) - 1}) has "
            f"{int(sizes[q])} answers; in batches of more than {2 * block} the Triton path takes questions of at "
            f"most {block + 1}: use backend='reference'")


def group_advantages(rewards: Tensor, group_ids: Tensor, variant_ids: Tensor, mode: str = "joint",
                     eps: float = 1e-6, backend: str = "auto", validate: bool | None = None
                     ) -> tuple[Tensor, GroupStats]:
    """Advantages (N,) float32 and GroupStats of ragged question/variant groups.

    rewards float (N,); group_ids int64 (N,) non-decreasing; variant_ids int64 (N,) non-decreasing inside a
    question; mode in joint | per_variant | mean_only | batch_std; population std; NaN/inf -> advantage 0,
    excluded and counted (full contract: strive_kernels.reference.advantage).
    backend: auto | triton | reference (strive_kernels._backend): auto takes Triton on CUDA tensors for
    N <= 65,536. The Triton path also needs questions of at most MAX_QUESTION (1,025) answers when N > 2,048.
    validate: check the layout contract of the ids (ordering, and the Triton path's question length; reads
    them: one host sync on CUDA). None (default): on host tensors always, on CUDA only with
    STRIVE_KERNELS_DEBUG=1; unchecked ids that break it give unspecified advantages. Shapes, dtypes,
    devices, mode and eps are always checked (no sync).
    """
    on_host = not (isinstance(rewards, Tensor) and rewards.is_cuda)
    validate = check_values(validate, not on_host)
    device = rewards.device if isinstance(rewards, Tensor) else torch.device("cpu")
    n = rewards.numel() if isinstance(rewards, Tensor) else 0
    if resolve("group_advantages", backend, device, n=n) == "reference":
        adv, stats = group_advantages_reference(rewards, group_ids, variant_ids, mode, eps, validate)
        return adv.float(), stats
    check_advantage_inputs(rewards, group_ids, variant_ids, mode, eps, validate_layout=validate)
    if validate:
        check_question_lengths(group_ids)
    return group_advantages_forward(rewards, group_ids, variant_ids, mode, eps)
