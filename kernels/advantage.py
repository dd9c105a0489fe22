"""Segmented (ragged-group) advantage normalisation in Triton: `strive_kernels.group_advantages`.

Contract, modes and conventions: `strive_kernels.reference.advantage` (the pure-torch twin, used as oracle
and CPU fallback). This file is the fast path: two launches (three for `batch_std`), no memset, no host
sync (the public function checks the ids' ordering only on host data or in debug mode).

Algorithm (rewards r, question ids g, variant ids v; N < 2^31):

  main kernel, one program per tile of BLOCK answers. The program loads a *window* = its tile plus HALO
  answers on each side (WIN = BLOCK + 2*HALO lanes, run boundaries from the neighbours' ids) and runs
  segmented scans over it:
      scans 1-2   per run of the chosen grouping: finite count, sum, min, max (forward), then broadcast
                  from the run's last lane to all its lanes (backward, a min-by-lane: order-free)
      scans 3-4   sum of squared deviations from the run mean (two-pass variance), broadcast
                  (when the chosen grouping is by question, the same tuple scans also carry min and max
                  of each variant run: the per-variant dead count is always reported)
  A group that straddles a tile edge but is shorter than HALO lies whole in both neighbours' windows; each
  computes it (the two may differ in the last bit: scan order) and writes its own answers — no
  communication between programs. A run cut by the window edge (a group longer than HALO) is recomputed by
  `_canonical_stats`, which walks the whole group from its first answer in fixed SIDE-wide chunks: the same
  arithmetic in every program that needs it, so all its answers see bit-identical statistics. Detecting a
  cut needs no scan: with sorted ids a run crosses the window's left (right) edge iff it holds the answer
  just before (after) the window. (A group spanning m tiles is then read m times: fine for the K*G <= a few
  thousand answers of RL, quadratic for absurd single groups of millions.)
  The program writes the advantages of its own tile and one row of partial statistics (finite count,
  mean and M2 of rewards and of advantages, group and dead-group counts, NaN count; each group is counted
  by the tile that holds its last answer).

  finalize kernel, one program: merges the per-tile partials (Chan's parallel mean/M2 merge, two passes
  over the partials, fixed order -> deterministic) into the 0-d GroupStats tensors.

  scale kernel (batch_std only): multiplies the centred rewards by 1/(std_batch + eps), read from the
  statistics buffer on the device.

Dead groups (finite rewards all equal, incl. 0 or 1 finite) are detected exactly from min == max, never
from a small computed variance, and get advantage exactly 0 as in the reference.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from strive_kernels._backend import check_values, resolve_auto

from strive_kernels.reference.advantage import (
    ADVANTAGE_MODES,
    AdvantageInputError,
    GroupStats,
    check_advantage_inputs,
    group_advantages_reference,
)

NPART = 10  # columns of the per-tile partials, see _adv_main_kernel
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
def _canonical_stats(r_ptr, g_ptr, v_ptr, p, N, BY_VARIANT: tl.constexpr, SIDE: tl.constexpr):
    """(n, mean, M2, min, max) of the finite rewards of the group holding answer p (a scalar index).

    Finds the group's first answer by walking back in SIDE chunks, then two passes (sum, then squared
    deviations) over chunks anchored at that first answer: every caller gets the same bits.
    """
    offs = tl.arange(0, SIDE)
    gp = tl.load(g_ptr + p)
    vp = tl.load(v_ptr + p)
    lo = p  # answers lo..p are known to be in the group
    searching = lo > 0
    while searching:
        c0 = tl.maximum(lo - SIDE, 0)
        idx = c0 + offs
        m = idx < lo
        same = tl.load(g_ptr + idx, mask=m, other=0) == gp
        if BY_VARIANT:
            same = same & (tl.load(v_ptr + idx, mask=m, other=0) == vp)
        last_other = tl.max(tl.where(m & (same == 0), idx, -1), axis=0)
        lo = tl.where(last_other >= 0, last_other + 1, c0)
        searching = (last_other < 0) & (c0 > 0)
    start = lo
    # pass 1: count, sum, min, max; a chunk full of the group means the group may go on
    n = tl.sum(tl.zeros([SIDE], tl.float32), axis=0)
    s = n
    mn = n + float("inf")
    mx = n - float("inf")
    length = start * 0
    going = start >= 0
    c = start
    while going:
        idx = c + offs
        m = idx < N
        same = m & (tl.load(g_ptr + idx, mask=m, other=0) == gp)
        if BY_VARIANT:
            same = same & (tl.load(v_ptr + idx, mask=m, other=0) == vp)
        r = tl.load(r_ptr + idx, mask=same, other=0.0).to(tl.float32)
        fin = same & _is_finite(r)
        n += tl.sum(fin.to(tl.float32), axis=0)
        s += tl.sum(tl.where(fin, r, 0.0), axis=0)
        mn = tl.minimum(mn, tl.min(tl.where(fin, r, float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.where(fin, r, -float("inf")), axis=0))
        cnt = tl.sum(same.to(tl.int32), axis=0)
        length += cnt
        going = cnt == SIDE
        c += SIDE
    mean = s / tl.maximum(n, 1.0)
    # pass 2: squared deviations from the mean, same chunks
    m2 = n * 0.0
    for c2 in range(start, start + length, SIDE):
        idx = c2 + offs
        m = idx < start + length
        r = tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
        fin = m & _is_finite(r)
        d = tl.where(fin, r - mean, 0.0)
        m2 += tl.sum(d * d, axis=0)
    return n, mean, m2, mn, mx


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7


@triton.jit
def _carries(g_ptr, v_ptr, i, inb, gk, vk, BY_VARIANT: tl.constexpr):
    # lanes holding the ids (gk[, vk]) of one answer: with sorted ids, exactly the lanes of that answer's run
    same = inb & (tl.load(g_ptr + i, mask=inb, other=0) == gk)
    if BY_VARIANT:
        same = same & (tl.load(v_ptr + i, mask=inb, other=0) == vk)
    return same


@triton.jit
def _adv_main_kernel(r_ptr, g_ptr, v_ptr, adv_ptr, part_ptr, N, eps,
                     MODE: tl.constexpr, BLOCK: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr,
                     SIDE: tl.constexpr, NP: tl.constexpr):
    BY_VARIANT: tl.constexpr = MODE == 1
    t = tl.program_id(0)
    s0 = t * BLOCK  # own tile: answers [s0, s0 + BLOCK)
    lane = tl.arange(0, WIN)
    i = s0 - HALO + lane  # (WIN,) global answer index, may be < 0 or >= N
    inb = (i >= 0) & (i < N)
    r = tl.load(r_ptr + i, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=inb, other=0)
    v = tl.load(v_ptr + i, mask=inb, other=0)
    has_prev = inb & (i > 0)
    has_next = inb & (i < N - 1)
    g_prev = tl.load(g_ptr + i - 1, mask=has_prev, other=0)
    v_prev = tl.load(v_ptr + i - 1, mask=has_prev, other=0)
    g_next = tl.load(g_ptr + i + 1, mask=has_next, other=0)
    v_next = tl.load(v_ptr + i + 1, mask=has_next, other=0)
    # real run boundaries (padding lanes are runs of their own)
    q_start = ~has_prev | (g != g_prev)
    q_end = ~has_next | (g != g_next)
    v_start = q_start | (v != v_prev)
    v_end = q_end | (v != v_next)
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

    # ---- scans 1-2: n, sum, min, max of each run of the chosen grouping, broadcast from its last lane; by
    # question, the same scans also carry min/max of each variant run (the per-variant dead count, always
    # reported): one pair of tuple scans for both groupings
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
    # ---- scans 3-4: M2 about the run mean (two-pass variance)
    _f2, m2_c = tl.associative_scan((c_flag, dev * dev), 0, _seg_sum_combine)
    _p2, m2_c = tl.associative_scan((c_pos, m2_c), 0, _bcast_combine, reverse=True)

    # ---- runs cut by the window edge: recompute canonically (rare: groups longer than HALO)
    # The ids are sorted ((question, variant) lexicographically non-decreasing), so a run reaches past the
    # window's left edge iff it holds the answer just before the window, and past the right edge iff it holds
    # the answer just after it: scalar compares for the own tile's first (s0) and last (t_last) answers, and
    # elementwise ones (`_carries`) for the lanes to patch, only on that rare path. No scan.
    own = (lane >= HALO) & (lane < HALO + BLOCK) & inb
    before = s0 - HALO - 1
    after = s0 - HALO + WIN
    has_before = before >= 0
    has_after = after < N
    g_bef = tl.load(g_ptr + before, mask=has_before, other=0)
    v_bef = tl.load(v_ptr + before, mask=has_before, other=0)
    g_aft = tl.load(g_ptr + after, mask=has_after, other=0)
    v_aft = tl.load(v_ptr + after, mask=has_after, other=0)
    t_last = tl.minimum(s0 + BLOCK, N) - 1
    g0 = tl.load(g_ptr + s0)
    v0 = tl.load(v_ptr + s0)
    gt = tl.load(g_ptr + t_last)
    vt = tl.load(v_ptr + t_last)
    head_q = has_before & (g0 == g_bef)
    head_v = head_q & (v0 == v_bef)
    tail_left_q = has_before & (gt == g_bef)
    tail_right_q = has_after & (gt == g_aft)
    if BY_VARIANT:
        head_cut = head_v
        tail_cut = tail_right_q & (vt == v_aft) & ~(tail_left_q & (vt == v_bef))
    else:
        head_cut = head_q
        tail_cut = tail_right_q & ~tail_left_q  # else it is the head's run, done below
    if head_cut:
        cut_left = _carries(g_ptr, v_ptr, i, inb, g_bef, v_bef, BY_VARIANT)
        cn, cmean, cm2, cmn, cmx = _canonical_stats(r_ptr, g_ptr, v_ptr, s0, N, BY_VARIANT, SIDE)
        n_c = tl.where(cut_left, cn, n_c)
        mean_c = tl.where(cut_left, cmean, mean_c)
        m2_c = tl.where(cut_left, cm2, m2_c)
        mn_c = tl.where(cut_left, cmn, mn_c)
        mx_c = tl.where(cut_left, cmx, mx_c)
    if tail_cut:
        cut_right = _carries(g_ptr, v_ptr, i, inb, g_aft, v_aft, BY_VARIANT)
        cn, cmean, cm2, cmn, cmx = _canonical_stats(r_ptr, g_ptr, v_ptr, t_last, N, BY_VARIANT, SIDE)
        n_c = tl.where(cut_right, cn, n_c)
        mean_c = tl.where(cut_right, cmean, mean_c)
        m2_c = tl.where(cut_right, cm2, m2_c)
        mn_c = tl.where(cut_right, cmn, mn_c)
        mx_c = tl.where(cut_right, cmx, mx_c)
    dead_c = ~(mn_c < mx_c)  # all finite rewards equal (or fewer than 2 of them... or none)
    if BY_VARIANT:
        dead_v = dead_c
    else:
        # a variant run cut on the left whose end is ours (the answer after the own tile is not in it): its
        # min/max canonically
        nxt = s0 + BLOCK
        has_nxt = nxt < N
        g_nxt = tl.load(g_ptr + nxt, mask=has_nxt, other=0)
        v_nxt = tl.load(v_ptr + nxt, mask=has_nxt, other=0)
        v_head_cut = head_v & ~(has_nxt & (g_nxt == g_bef) & (v_nxt == v_bef))
        if v_head_cut:
            cut_v = _carries(g_ptr, v_ptr, i, inb, g_bef, v_bef, True)
            _vn, _vmean, _vm2, vmn, vmx = _canonical_stats(r_ptr, g_ptr, v_ptr, s0, N, True, SIDE)
            mn_v = tl.where(cut_v, vmn, mn_v)
            mx_v = tl.where(cut_v, vmx, mx_v)
        dead_v = ~(mn_v < mx_v)

    # ---- advantages of the own tile
    std_c = tl.where(dead_c, 0.0, tl.sqrt_rn(m2_c / tl.maximum(n_c, 1.0)))
    centered = r - mean_c
    if MODE == 0 or MODE == 1:
        adv = tl.div_rn(centered, std_c + eps)
    else:  # mean_only; batch_std is scaled by the scale kernel once std_batch is known
        adv = centered
    adv = tl.where(fin & ~dead_c, adv, 0.0)
    tl.store(adv_ptr + i, adv, mask=own)

    # ---- partial statistics of the own tile (row t of part_ptr): two tuple reductions (one block-wide
    # reduction each, whatever the number of values) instead of ten
    ownf = own & fin
    ends_c = own & c_end
    ends_v = own & v_end
    nf, r_sum, a_sum, n_ends_c, n_dead_c, n_ends_v, n_dead_v, n_nan = tl.reduce(
        (ownf.to(tl.float32), tl.where(ownf, r, 0.0), tl.where(ownf, adv, 0.0), ends_c.to(tl.int32),
         (ends_c & dead_c).to(tl.int32), ends_v.to(tl.int32), (ends_v & dead_v).to(tl.int32),
         (own & ~fin).to(tl.int32)), 0, _add8)
    r_mean = r_sum / tl.maximum(nf, 1.0)
    a_mean = a_sum / tl.maximum(nf, 1.0)
    r_d = tl.where(ownf, r - r_mean, 0.0)
    a_d = tl.where(ownf, adv - a_mean, 0.0)
    r_m2, a_m2 = tl.reduce((r_d * r_d, a_d * a_d), 0, _add2)
    row = part_ptr + t * NP
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
def _column(v, c, k):
    # v[k] of a (NPB,) vector of column sums, as a scalar
    return tl.sum(tl.where(c == k, v, 0), axis=0)


@triton.jit
def _adv_finalize_kernel(part_ptr, stats_ptr, count_ptr, T, eps, MODE: tl.constexpr, TB: tl.constexpr,
                         NP: tl.constexpr, NPB: tl.constexpr):
    # Merge the T per-tile partials: pass 1 totals and means, pass 2 M2 (Chan: M2_t + n_t (mean_t - mean)^2).
    # Rows are read as (TB, NPB) tiles (whole rows, coalesced); per-row values come from reductions along the
    # row (inside a warp), and each pass needs one or two block-wide column sums per tile.
    offs = tl.arange(0, TB)
    c = tl.arange(0, NPB)[None, :]  # (1, NPB) column index
    is_count = (c == 0) | ((c >= 5) & (c < NP))  # n, group / dead counts, NaN count: exact in int64
    is_mean = (c == 1) | (c == 3)
    fsum = tl.zeros([NPB], tl.float32)
    isum = tl.zeros([NPB], tl.int64)
    for t0 in range(0, T, TB):
        rows = t0 + offs
        m = (rows < T)[:, None] & (c < NP)
        tile = tl.load(part_ptr + rows[:, None] * NP + c, mask=m, other=0.0)  # (TB, NPB)
        nt = tl.sum(tl.where(c == 0, tile, 0.0), axis=1)  # (TB,) finite answers of each tile
        fsum += tl.sum(tl.where(is_mean, tile * nt[:, None], 0.0), axis=0)  # per-tile counts are exact in fp32
        isum += tl.sum(tl.where(is_count, tile, 0.0).to(tl.int64), axis=0)
    cv = tl.arange(0, NPB)
    n_tot = _column(isum, cv, 0)
    nf = tl.maximum(n_tot.to(tl.float32), 1.0)
    r_mean = _column(fsum, cv, 1) / nf
    a_mean = _column(fsum, cv, 3) / nf
    m2 = tl.zeros([NPB], tl.float32)
    for t0 in range(0, T, TB):
        rows = t0 + offs
        m = (rows < T)[:, None] & (c < NP)
        tile = tl.load(part_ptr + rows[:, None] * NP + c, mask=m, other=0.0)
        nt = tl.sum(tl.where(c == 0, tile, 0.0), axis=1)
        dr = tl.sum(tl.where(c == 1, tile, 0.0), axis=1) - r_mean  # (TB,) tile mean - batch mean
        da = tl.sum(tl.where(c == 3, tile, 0.0), axis=1) - a_mean
        between = tl.where(c == 2, (nt * dr * dr)[:, None], tl.where(c == 4, (nt * da * da)[:, None], 0.0))
        m2 += tl.sum(tl.where((c == 2) | (c == 4), tile + between, 0.0), axis=0)
    r_std = tl.sqrt_rn(_column(m2, cv, 2) / nf)
    a_std = tl.sqrt_rn(_column(m2, cv, 4) / nf)
    if MODE == 3:  # batch_std: the advantages are still centred rewards; their std scales with them
        a_std = a_std / (r_std + eps)
    cnt_c = _column(isum, cv, 5)
    cnt_v = _column(isum, cv, 7)
    tl.store(stats_ptr + 0, r_mean)
    tl.store(stats_ptr + 1, r_std)
    tl.store(stats_ptr + 2, a_std)
    tl.store(stats_ptr + 3, _column(isum, cv, 6).to(tl.float32) / tl.maximum(cnt_c, 1).to(tl.float32))
    tl.store(stats_ptr + 4, _column(isum, cv, 8).to(tl.float32) / tl.maximum(cnt_v, 1).to(tl.float32))
    tl.store(count_ptr + 0, cnt_c)
    tl.store(count_ptr + 1, _column(isum, cv, 9))


@triton.jit
def _adv_scale_kernel(adv_ptr, stats_ptr, N, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    inv = 1.0 / (tl.load(stats_ptr + 1) + eps)
    tl.store(adv_ptr + offs, tl.load(adv_ptr + offs, mask=m, other=0.0) * inv, mask=m)


def group_advantages_forward(rewards: Tensor, group_ids: Tensor, variant_ids: Tensor, mode: str, eps: float,
                             block: int = 768, halo: int = 128, side: int = 128, num_warps: int = 8,
                             finalize_block: int = 1024, finalize_warps: int = 8) -> tuple[Tensor, GroupStats]:
    """Launch the kernels on validated inputs (no checks, no sync).

    Tuning: a program owns `block` answers and sees `halo` more on each side (block + 2*halo lanes, a power
    of two). Groups up to `halo` answers long take the fast path; longer ones are recomputed canonically in
    chunks of `side`. The finalize program reads the N / block partial rows as (finalize_block, 16) tiles
    (whole rows, coalesced; per-row values reduced inside a warp, one or two block-wide column sums per
    tile: 9 CTA barriers in the compiled kernel where reading the ten columns separately took 35;
    1,024 x 8 warps: 128 registers, no spills).
    Compiled offline for sm_90 (triton 3.7, pointers 16-byte aligned): the default main kernel uses 116
    registers and 76 CTA barriers by question (its block-wide scans and reductions cross warps); with
    num_warps=1 every scan and reduction stays inside one warp (0 barriers; 189 registers at block 192 /
    halo 32 or block 128 / halo 64, no spills) at the price of more programs and more partial rows.
    bench/bench_advantage.py --sweep times these on a GPU. The main-kernel defaults are the best of the
    last GPU sweep (stop 9, eager timing); the finalize default (8 warps) was chosen offline (no spills)
    and is not yet measured.
    """
    win = block + 2 * halo
    if win & (win - 1) or halo < 1 or side & (side - 1):
        raise ValueError(f"block + 2*halo must be a power of two and side too, got {block}, {halo}, {side}")
    n = rewards.numel()
    dev = rewards.device
    adv = torch.empty(n, dtype=torch.float32, device=dev)
    alloc = torch.empty if n else torch.zeros  # the finalize kernel writes every entry: no memset launches
    stats = alloc(5, dtype=torch.float32, device=dev)
    counts = alloc(2, dtype=torch.int64, device=dev)
    mode_id = ADVANTAGE_MODES.index(mode)
    if n:
        T = triton.cdiv(n, block)
        part = torch.empty(T, NPART, dtype=torch.float32, device=dev)
        r, g, v = rewards.contiguous(), group_ids.contiguous(), variant_ids.contiguous()
        _adv_main_kernel[(T,)](r, g, v, adv, part, n, float(eps), MODE=mode_id, BLOCK=block, HALO=halo,
                               WIN=win, SIDE=side, NP=NPART, num_warps=num_warps)
        _adv_finalize_kernel[(1,)](part, stats, counts, T, float(eps), MODE=mode_id,
                                   TB=min(finalize_block, triton.next_power_of_2(T)), NP=NPART,
                                   NPB=triton.next_power_of_2(NPART), num_warps=finalize_warps)
        if mode == "batch_std":
            _adv_scale_kernel[(triton.cdiv(n, 4096),)](adv, stats, n, float(eps), BLOCK=4096, num_warps=4)
    return adv, GroupStats(stats[0], stats[1], stats[2], stats[3], stats[4], counts[0], counts[1])


def _triton_runs_on(t: Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def group_advantages(rewards: Tensor, group_ids: Tensor, variant_ids: Tensor, mode: str = "joint",
                     eps: float = 1e-6, backend: str = "auto", validate: bool | None = None
                     ) -> tuple[Tensor, GroupStats]:
    """Advantages (N,) float32 and GroupStats of ragged question/variant groups.

    rewards float (N,); group_ids int64 (N,) non-decreasing; variant_ids int64 (N,) non-decreasing inside a
    question; mode in joint | per_variant | mean_only | batch_std; population std; NaN/inf -> advantage 0,
    excluded and counted (full contract: strive_kernels.reference.advantage).
    backend: auto (Triton on CUDA tensors, the reference otherwise) | triton | reference.
    validate: check the ordering contract of the ids (reads them: one host sync on CUDA). None (default):
    on host tensors always, on CUDA only with STRIVE_KERNELS_DEBUG=1 (strive_kernels._backend); unchecked
    unsorted ids give unspecified advantages. Shapes, dtypes, devices, mode and eps are always checked
    (no sync).
    """
    backend = resolve_auto(backend)
    validate = check_values(validate, rewards.is_cuda if isinstance(rewards, Tensor) else False)
    if backend not in ("auto", "triton", "reference"):
        raise AdvantageInputError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "reference" or (backend == "auto" and not rewards.is_cuda):
        adv, stats = group_advantages_reference(rewards, group_ids, variant_ids, mode, eps, validate)
        return adv.float(), stats
    check_advantage_inputs(rewards, group_ids, variant_ids, mode, eps, validate_layout=validate)
    if not _triton_runs_on(rewards):
        raise AdvantageInputError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {rewards.device}")
    return group_advantages_forward(rewards, group_ids, variant_ids, mode, eps)
