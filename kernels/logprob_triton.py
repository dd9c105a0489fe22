"""Triton kernels of the fused log-prob loss: the one pass over a (C, V) chunk of logits, and the in-place
gradient scaling used in backward.

Per chunk, two launches over a grid (C rows, NSPLIT vocabulary splits):
  _lse_partials_kernel   online max / sum-exp (and sum p*z for the entropy) of each split in fp32, plus
                         the target logit (read here, before any program overwrites the row)
  _loss_grad_kernel      combines the <= NSPLIT_P2 partials of its row into log-sum-exp and entropy,
                         computes logp, the clipped surrogate, k3, the aggregation weight and dL/dlogp, and
                         overwrites its split of logits with dL/dlogits = g / T * (1[j = target] - p_j)
Splitting the vocabulary gives C * NSPLIT programs (e.g. 256 * 10 at V = 152,064), enough to keep the
memory system busy; the pass reads each logit twice and writes it once (~6 bytes per bf16 logit), so it
is bandwidth-bound and small next to the matmuls (see logprob_chunked.py for what bounds the whole op).
Tile sizes are fixed rather than autotuned: autotuning a kernel that writes in place would rerun it on
its own output. Presets enter as constexpr (LOSS_AGG, HAS_REF, PER_SEQ_ADV, WITH_ENTROPY, COMPUTE_GRAD).
The running max starts at -1e30 (finite), and exp/products are guarded, so rows with -inf logits
(masked vocabulary, padding past V) never produce NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strive_kernels.logprob_common import TokenInputs

BLOCK_V_MAX = 2048  # logits per tile (16 per thread at 4 warps)
TILES_PER_SPLIT = 8  # tiles per program: 16,384 logits, i.e. NSPLIT = 10 at V = 152,064, 16 at 262,144
_NEG_BIG = tl.constexpr(-1e30)  # start of the running max: finite, so exp(m - m_new) is never NaN


@triton.jit
def _round_to_bf16(x):
    """fp32 -> the nearest-even value representable in bf16 (the interpreter's cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


# Arguments that change from call to call (the chunk's first token, the number of sequences, the caller's
# per-token vectors and the workspace rows, whose 16-byte alignment follows the token count) are not
# specialised: Triton would otherwise compile a new variant whenever one of them turned 1, a multiple of
# 16 or an aligned address for the first time -- up to a second of compilation inside a training step,
# which made the fast path slower than the reference at gpu_small (issue 14). They are read a scalar per
# program, so specialising them bought nothing. The logits buffer and its row stride (fixed per model)
# stay specialised: their alignment lets the row loads vectorise.
_NO_SPEC_LSE = ["m_ptr", "s_ptr", "t_ptr", "tok0", "tgt_ptr", "zt_ptr"]
_NO_SPEC_LOSS = ["m_ptr", "s_ptr", "t_ptr", "zt_ptr", "tok0", "tgt_ptr", "old_ptr", "adv_ptr", "mask_ptr", "ref_ptr",
                 "seq_ptr", "cnt_ptr", "n_slots", "denom_ptr", "logp_ptr", "ent_ptr", "loss_ptr", "clip_ptr", "k3_ptr"]
_NO_SPEC_LOGPROB = ["m_ptr", "s_ptr", "t_ptr", "zt_ptr", "tok0", "tgt_ptr", "logp_ptr", "ent_ptr"]


@triton.jit(do_not_specialize=_NO_SPEC_LSE)
def _lse_partials_kernel(logits_ptr, stride_row, V, inv_temp, m_ptr, s_ptr, t_ptr, NSPLIT, tok0, tgt_ptr, zt_ptr,
                         SPLIT: tl.constexpr, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lo = sp * SPLIT
    # Target logit: read by the one program whose split holds it, before the grad pass overwrites it.
    tgt = tl.load(tgt_ptr + tok0 + row)
    own = (tgt >= lo) & (tgt < lo + SPLIT) & (tgt < V)
    x_t = tl.load(base + tgt, mask=own, other=0.0).to(tl.float32)
    tl.store(zt_ptr + row, x_t * inv_temp, mask=own)

    m = _NEG_BIG  # running max (finite start: exp(m - m_new) never sees -inf - -inf)
    s = 0.0  # sum exp(z - m)
    t = 0.0  # sum exp(z - m) * (z - m), for the entropy log(s) - t / s
    for start in range(0, SPLIT, BLOCK_V):  # constexpr trip count
        cols = lo + start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 for -inf logits and the padding
        if WITH_ENTROPY:
            ez = e * tl.where(e > 0, z - m_new, 0.0)  # 0 * -inf never formed
            t = alpha * (t - (m_new - m) * s) + tl.sum(ez, 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    out = row * NSPLIT + sp
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, s)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t)


@triton.jit
def _combine_partials(m_ptr, s_ptr, t_ptr, row, NSPLIT, NSPLIT_P2: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """(max, log sum exp(z - max), entropy) of a row from its NSPLIT partials (entropy 0 if not WITH_ENTROPY).
    The log-sum-exp stays split as max + log_s: forming it would round it at the logits' magnitude (an
    ulp of 0.002 at |z| = 3e4), while (z - max) - log_s stays exact to the fp32 ulp of the difference."""
    idx = tl.arange(0, NSPLIT_P2)
    ok = idx < NSPLIT
    off = row * NSPLIT + idx
    mi = tl.load(m_ptr + off, mask=ok, other=_NEG_BIG)
    si = tl.load(s_ptr + off, mask=ok, other=0.0)
    mx = tl.max(mi, 0)
    sc = tl.exp(mi - mx)
    s = tl.sum(si * sc, 0)
    log_s = tl.log(s)
    ent = 0.0
    if WITH_ENTROPY:
        ti = tl.load(t_ptr + off, mask=ok, other=0.0)
        t = tl.sum(sc * (ti + (mi - mx) * si), 0)  # re-centre each split's sum on the global max
        ent = log_s - t / s
    return mx, log_s, ent


@triton.jit(do_not_specialize=_NO_SPEC_LOSS)
def _loss_grad_kernel(logits_ptr, stride_row, V, inv_temp, m_ptr, s_ptr, t_ptr, NSPLIT, zt_ptr,
                      tok0, tgt_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, seq_ptr, cnt_ptr, n_slots, denom_ptr,
                      eps_low, eps_high, beta, logp_ptr, ent_ptr, loss_ptr, clip_ptr, k3_ptr,
                      SPLIT: tl.constexpr, BLOCK_V: tl.constexpr, NSPLIT_P2: tl.constexpr, LOSS_AGG: tl.constexpr,
                      HAS_REF: tl.constexpr, PER_SEQ_ADV: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                      COMPUTE_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    tok = tok0 + row
    mx, log_s, ent = _combine_partials(m_ptr, s_ptr, t_ptr, row, NSPLIT, NSPLIT_P2, WITH_ENTROPY)
    tgt = tl.load(tgt_ptr + tok)
    tgt_ok = (tgt >= 0) & (tgt < V)
    logp = tl.where(tgt_ok, (tl.load(zt_ptr + row) - mx) - log_s, float("nan"))

    # ---- per-token surrogate and its derivative w.r.t. logp (scalars; every split recomputes them)
    mval = tl.load(mask_ptr + tok)
    live = mval != 0
    if PER_SEQ_ADV or LOSS_AGG == 1:
        sid = tl.load(seq_ptr + tok)
        sid_ok = (sid >= 0) & (sid < n_slots)
    if PER_SEQ_ADV:
        adv = tl.load(adv_ptr + sid, mask=sid_ok, other=float("nan"))
    else:
        adv = tl.load(adv_ptr + tok)
    ratio = tl.exp(logp - tl.load(old_ptr + tok))
    unclipped = ratio * adv
    lim = tl.minimum(tl.maximum(ratio, 1.0 - eps_low, propagate_nan=tl.PropagateNan.ALL), 1.0 + eps_high,
                     propagate_nan=tl.PropagateNan.ALL)
    clipped = lim * adv
    loss = -tl.minimum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)
    dloss = tl.where(unclipped <= clipped, -ratio * adv, 0.0)  # clipped branch strictly smaller: no gradient
    if HAS_REF:
        d = tl.load(ref_ptr + tok) - logp
        ed = tl.exp(d)
        k3 = ed - d - 1.0
        loss = loss + beta * k3
        dloss = dloss + beta * (1.0 - ed)
    denom = tl.load(denom_ptr)
    if LOSS_AGG == 1:  # seq_mean_token_mean: divide by the sequence's own token count too
        cnt = tl.load(cnt_ptr + sid, mask=sid_ok, other=float("nan"))
        w = mval / (tl.where(live, cnt, 1.0) * denom)  # a fully masked sequence has cnt = 0
    else:
        w = mval / denom
    loss_t = tl.where(live, w * loss, 0.0)
    g = tl.where(live, w * dloss, 0.0)
    code = tl.where(live & (ratio < 1.0 - eps_low) & (adv < 0), -1.0,
                    tl.where(live & (ratio > 1.0 + eps_high) & (adv > 0), 1.0, 0.0))
    first = sp == 0
    tl.store(logp_ptr + tok, logp, mask=first)
    tl.store(loss_ptr + tok, loss_t, mask=first)
    tl.store(clip_ptr + tok, code, mask=first)
    if WITH_ENTROPY:
        tl.store(ent_ptr + tok, ent, mask=first)
    if HAS_REF:
        tl.store(k3_ptr + tok, k3, mask=first)

    # ---- dL/dlogits over this program's split, written over the logits
    if COMPUTE_GRAD:
        base = logits_ptr + row.to(tl.int64) * stride_row
        gs = g * inv_temp
        lo = sp * SPLIT
        for start in range(0, SPLIT, BLOCK_V):
            cols = lo + start + tl.arange(0, BLOCK_V)
            inb = cols < V
            z = tl.load(base + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
            p = tl.exp((z - mx) - log_s)
            dz = gs * (tl.where(cols == tgt, 1.0, 0.0) - p)
            if ROUND_BF16:
                dz = _round_to_bf16(dz)
            tl.store(base + cols, dz.to(logits_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=_NO_SPEC_LOGPROB)
def _logprob_kernel(m_ptr, s_ptr, t_ptr, NSPLIT, zt_ptr, tok0, tgt_ptr, V, logp_ptr, ent_ptr,
                    NSPLIT_P2: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0)
    tok = tok0 + row
    mx, log_s, ent = _combine_partials(m_ptr, s_ptr, t_ptr, row, NSPLIT, NSPLIT_P2, WITH_ENTROPY)
    tgt = tl.load(tgt_ptr + tok)
    ok = (tgt >= 0) & (tgt < V)
    tl.store(logp_ptr + tok, tl.where(ok, (tl.load(zt_ptr + row) - mx) - log_s, float("nan")))
    if WITH_ENTROPY:
        tl.store(ent_ptr + tok, ent)


@triton.jit(do_not_specialize=["g_ptr"])
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """x *= g in place, skipped entirely (no memory traffic) when g == 1, without a host sync."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        nblocks = tl.cdiv(n, BLOCK)
        for blk in range(tl.program_id(0), nblocks, tl.num_programs(0)):
            offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            y = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32) * g
            if ROUND_BF16:
                y = _round_to_bf16(y)
            tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=inb)


# ------------------------------------------------------------------------------------------ launchers


_INTERPRETING = type(_loss_grad_kernel).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    """True when Triton runs under TRITON_INTERPRET=1 (decided when this module was imported)."""
    return _INTERPRETING


class TritonPass:
    """Per-chunk launcher with its workspace (partials of at most `rows` rows), reused across chunks."""

    extra_bytes = 0  # the pass needs no (C, V) temporaries

    def __init__(self, tok: TokenInputs, params, vocab: int, rows: int, device, logprobs_only: bool = False):
        self.tok, self.p, self.vocab = tok, params, vocab
        self.block_v = min(BLOCK_V_MAX, triton.next_power_of_2(vocab))
        self.split = self.block_v * min(TILES_PER_SPLIT, triton.cdiv(vocab, self.block_v))
        self.nsplit = triton.cdiv(vocab, self.split)
        self.nsplit_p2 = max(2, triton.next_power_of_2(self.nsplit))
        self.num_warps = 4 if self.block_v <= 2048 else 8
        ws = torch.empty(3, rows * self.nsplit + 1, dtype=torch.float32, device=device)
        self.m, self.s, self.t = ws[0], ws[1], ws[2]
        self.zt = torch.empty(rows, dtype=torch.float32, device=device)
        self.dummy = torch.zeros(1, dtype=torch.float32, device=device)
        self.idummy = torch.zeros(1, dtype=torch.int64, device=device)

    def _partials(self, lg, a: int) -> None:
        _lse_partials_kernel[(lg.shape[0], self.nsplit)](
            lg, lg.stride(0), self.vocab, self.p.inv_temp, self.m, self.s, self.t, self.nsplit, a,
            self.tok.targets, self.zt, SPLIT=self.split, BLOCK_V=self.block_v, WITH_ENTROPY=self.p.with_entropy,
            num_warps=self.num_warps)

    def loss_chunk(self, lg, a: int, b: int, outs, compute_grad: bool) -> None:
        t, p = self.tok, self.p
        self._partials(lg, a)
        has_ref = t.ref_logp is not None
        _loss_grad_kernel[(lg.shape[0], self.nsplit if compute_grad else 1)](
            lg, lg.stride(0), self.vocab, p.inv_temp, self.m, self.s, self.t, self.nsplit, self.zt,
            a, t.targets, t.old_logp, t.advantages, t.mask, t.ref_logp if has_ref else self.dummy,
            t.seq_ids if t.seq_ids is not None else self.idummy,
            t.seq_counts if t.seq_counts is not None else self.dummy,
            t.seq_counts.shape[0] if t.seq_counts is not None else t.advantages.shape[0], t.denom,
            p.eps_low, p.eps_high, p.beta, outs["logp"], outs["entropy"] if p.with_entropy else self.dummy,
            outs["loss"], outs["clip"], outs["k3"] if has_ref else self.dummy,
            SPLIT=self.split, BLOCK_V=self.block_v, NSPLIT_P2=self.nsplit_p2, LOSS_AGG=t.loss_agg, HAS_REF=has_ref,
            PER_SEQ_ADV=t.per_seq_adv, WITH_ENTROPY=p.with_entropy, COMPUTE_GRAD=compute_grad,
            ROUND_BF16=interpreting() and lg.dtype == torch.bfloat16, num_warps=self.num_warps)

    def logprob_chunk(self, lg, a: int, b: int, outs) -> None:
        self._partials(lg, a)
        _logprob_kernel[(lg.shape[0],)](
            self.m, self.s, self.t, self.nsplit, self.zt, a, self.tok.targets, self.vocab, outs["logp"],
            outs["entropy"] if self.p.with_entropy else self.dummy, NSPLIT_P2=self.nsplit_p2,
            WITH_ENTROPY=self.p.with_entropy, num_warps=1)


def scale_(x: torch.Tensor, g: torch.Tensor) -> None:
    """x *= g in place (x contiguous, g a 0-d tensor on x's device); free when g == 1."""
    if x.numel() == 0:
        return
    block = 4096
    progs = triton.cdiv(x.numel(), block)
    if x.is_cuda:  # persistent grid: at most a few waves of programs
        progs = min(progs, 8 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    _scale_kernel[(progs,)](x, g.reshape(1), x.numel(), BLOCK=block,
                            ROUND_BF16=interpreting() and x.dtype == torch.bfloat16, num_warps=8)
