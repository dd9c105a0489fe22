"""Fused log-probs and GRPO/DAPO/Dr.GRPO/STRIVE loss over an lm_head, without materialising [N, V] logits.

    out = fused_logprob_loss(hidden, weight, targets, old_logp, advantages, mask, LossSpec(temperature=0.7),
                             seq_ids=seq_ids, normaliser=num_seqs)
    out.loss.backward()                     # grads of hidden, weight (and bias) were formed in forward
    logp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True)   # no grad: old / ref policy

Shapes: hidden (N, H) packed completion tokens (bf16/fp16/fp32), weight (V, H) lm_head (tied or not),
bias (V,) | None, targets (N,) int64, old_logp / ref_logp (N,), advantages (N,) per token or (S,) per
sequence with seq_ids (N,) in [0, S) (a length-N tensor is read per token: pass advantages[seq_ids] in the
rare case S == N), mask (N,) bool/float. The loss, its settings (`LossSpec`), its aggregation and
`normaliser` are defined in `strive_kernels.reference.logprob`; the result is a `LossOutput`.

How: tokens are processed in chunks of C = max_chunk_bytes / (V * itemsize) rows (a multiple of 128). Per
chunk (rows a:b of hidden):
    logits = hidden[a:b] @ weight.T (+ bias)             matmul 1 (cuBLAS) into one reused (C, V) buffer
    pass: row max / sum-exp, target logit, logp, loss,   ONE fused pass over the buffer, which overwrites
          dL/dlogp, dL/dlogits written over the logits   the logits with their gradient
    grad_hidden[a:b] = dlogits @ weight                  matmul 2
    grad_weight (+)= dlogits.T @ hidden[a:b]             matmul 3 (first chunk writes, later ones add)
    grad_bias  += dlogits.sum(0)
Three matmuls, nothing recomputed: each token's loss depends only on its own log-prob, so dL/dlogits of a
chunk is known as soon as its log-sum-exp is. The (C, V) buffer is the only memory beyond the outputs
(gradients V*H + N*H in the input dtype, O(N) fp32). What bounds it, and the chunk size: bench/TUNING.md.
Backward only scales the stored gradients by grad_output, in place and without a host sync (a no-op
kernel when grad_output == 1).

The pass: Triton (this file's kernels, below) or native (the same chunk loop, pass in torch: the CPU path);
backend: auto | triton | native | reference (strive_kernels._backend). Registered as torch.library custom ops
(strive_kernels::logprob_loss, strive_kernels::logprobs) with fake implementations, so torch.compile can trace
around them. Chunks run in a fixed order with no atomics (cuBLAS/torch reductions only), so grad_weight and
the loss are bitwise reproducible on one machine and software stack.

Triton pass, per chunk, two launches over a grid (C rows, NSPLIT vocabulary splits):
  _lse_partials_kernel   online max / sum-exp (and sum p*z for the entropy) of each split in fp32, plus
                         the target logit (read here, before any program overwrites the row)
  _loss_grad_kernel      combines the <= NSPLIT_P2 partials of its row into log-sum-exp and entropy,
                         computes logp, the clipped surrogate, k3, the aggregation weight and dL/dlogp, and
                         overwrites its split of logits with dL/dlogits = g / T * (1[j = target] - p_j)
Splitting the vocabulary gives C * NSPLIT programs (e.g. 256 * 10 at V = 152,064); the pass reads each logit
twice and writes it once (~6 bytes per bf16 logit), bandwidth-bound and small next to the matmuls. Tile
sizes are fixed rather than autotuned: autotuning a kernel that writes in place would rerun it on its own
output. The settings enter as constexpr (LOSS_AGG, HAS_REF, PER_SEQ_ADV, WITH_ENTROPY, COMPUTE_GRAD). The
running max starts at -1e30 (finite), and exp/products are guarded, so rows with -inf logits (masked
vocabulary, padding past V) never produce NaN.
"""
import contextlib
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from strive_kernels import _backend
from strive_kernels._backend import cdiv, interpreting, next_pow2, resolve
from strive_kernels.reference.logprob import (LOSS_AGGREGATIONS, LossOutput, LossParams, LossSpec, NativePass,
                                              TokenInputs, build_output, check_matrices, check_targets,
                                              prepare_tokens, summarise)

__all__ = ["fused_logprob_loss", "fused_logprobs", "LossOutput", "LossSpec", "DEFAULT_MAX_CHUNK_BYTES"]

DEFAULT_MAX_CHUNK_BYTES = 80 * 2**20  # C = 256 tokens at V = 152,064 bf16: the memory-floor operating point


# ------------------------------------------------------------------------------------------ Triton pass

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


class TritonPass:
    """Per-chunk launcher with its workspace (partials of at most `rows` rows), reused across chunks."""

    extra_bytes = 0  # the pass needs no (C, V) temporaries

    def __init__(self, tok: TokenInputs, params: LossParams, vocab: int, rows: int, device, logprobs_only=False):
        self.tok, self.p, self.vocab = tok, params, vocab
        self.block_v = min(BLOCK_V_MAX, next_pow2(vocab))
        self.split = self.block_v * min(TILES_PER_SPLIT, cdiv(vocab, self.block_v))
        self.nsplit = cdiv(vocab, self.split)
        self.nsplit_p2 = max(2, next_pow2(self.nsplit))
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
    progs = cdiv(x.numel(), block)
    sms = _backend.sm_count(x.device)
    if sms:  # persistent grid: at most a few waves of programs
        progs = min(progs, 8 * sms)
    _scale_kernel[(progs,)](x, g.reshape(1), x.numel(), BLOCK=block,
                            ROUND_BF16=interpreting() and x.dtype == torch.bfloat16, num_warps=8)


# ------------------------------------------------------------------------------------------ chunk loop


def chunk_rows(n: int, vocab: int, elem_bytes: int, max_chunk_bytes: int, extra_bytes: int = 0) -> int:
    """Tokens per chunk so the (C, V) buffer (+ `extra_bytes` per logit of temporaries) fits the budget;
    multiples of 128 when large (matmul tiles), at least 1, at most n."""
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be > 0, got {max_chunk_bytes}")
    rows = max_chunk_bytes // max(1, vocab * (elem_bytes + extra_bytes))
    if rows >= 128:
        rows -= rows % 128
    return int(max(1, min(rows, max(n, 1))))


@contextlib.contextmanager
def fp32_reductions(device: torch.device):
    """cuBLAS may reduce split-K partial sums of bf16/fp16 GEMMs in bf16/fp16 (torch's default allows it);
    matmul 2 has K = V = 152,064, so keep every reduction in fp32 inside this op, as exact as plain
    PyTorch's best case, and restore the caller's setting afterwards."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = False
    m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


def _logits(hc, weight, bias, out) -> None:
    if bias is None:
        torch.mm(hc, weight.t(), out=out)
    else:
        torch.addmm(bias, hc, weight.t(), out=out)


def _loss_loop(hidden, weight, bias, chunk, buf, outs, gh, gw, gb, rows, compute_grad, need_gh, need_gw, need_gb):
    for i, a in enumerate(range(0, hidden.shape[0], rows)):
        b = min(a + rows, hidden.shape[0])
        hc, lg = hidden[a:b], buf[: b - a]
        _logits(hc, weight, bias, lg)  # matmul 1 (after the previous chunk's readers of buf are done)
        chunk.loss_chunk(lg, a, b, outs, compute_grad)  # lg now holds dL/dlogits
        if need_gh:
            torch.mm(lg, weight, out=gh[a:b])  # matmul 2
        if need_gw:  # matmul 3; the first chunk writes (beta = 0: no read of gw, no zero-fill)
            torch.mm(lg.t(), hc, out=gw) if i == 0 else gw.addmm_(lg.t(), hc)
        if need_gb:
            gb.add_(torch.sum(lg, dim=0, dtype=torch.float32))


def run_loss(hidden, weight, bias, tok: TokenInputs, params: LossParams, pass_factory, *, rows: int,
             need_gh: bool, need_gw: bool, need_gb: bool):
    """The chunk loop. Returns (loss 0-d, logp (N,), entropy (N,)|(0,), stats (5,), grad_hidden, grad_weight,
    grad_bias), the grads as empty (0,) tensors where not needed."""
    n, h = hidden.shape
    v, dev = weight.shape[0], hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    outs = {"logp": torch.empty(n, **f32), "loss": torch.empty(n, **f32), "clip": torch.empty(n, **f32),
            "entropy": torch.empty(n if params.with_entropy else 0, **f32),
            "k3": torch.empty(n if tok.ref_logp is not None else 0, **f32)}
    gh = torch.empty_like(hidden) if need_gh else hidden.new_empty(0)  # separate empties: outputs never alias
    gw = torch.empty(v, h, dtype=weight.dtype, device=dev) if need_gw else weight.new_empty(0)
    gb = torch.zeros(v, **f32) if need_gb else hidden.new_empty(0)
    compute_grad = need_gh or need_gw or need_gb
    if n == 0 and need_gw:
        gw.zero_()
    if n:
        chunk = pass_factory(tok, params, v, rows, dev)
        buf = torch.empty(min(rows, n), v, dtype=hidden.dtype, device=dev)  # (C, V) logits, then dlogits
        with fp32_reductions(dev):
            _loss_loop(hidden, weight, bias, chunk, buf, outs, gh, gw, gb, rows, compute_grad, need_gh, need_gw,
                       need_gb)
        del buf
    if need_gb:
        gb = gb.to(bias.dtype)
    stats = summarise(tok, outs["entropy"], outs["clip"], outs["k3"] if tok.ref_logp is not None else None)
    return outs["loss"].sum(), outs["logp"], outs["entropy"], stats, gh, gw, gb


def run_logprobs(hidden, weight, bias, targets, params: LossParams, pass_factory, *, rows: int):
    """No-grad chunk loop: one matmul per chunk + the statistics pass. Returns (logp (N,), entropy (N,)|(0,))."""
    n, v, dev = hidden.shape[0], weight.shape[0], hidden.device
    outs = {"logp": torch.empty(n, dtype=torch.float32, device=dev),
            "entropy": torch.empty(n if params.with_entropy else 0, dtype=torch.float32, device=dev)}
    if n:
        tok = TokenInputs(targets, None, None, None, None, None, None, None, False, 0)
        chunk = pass_factory(tok, params, v, rows, dev, logprobs_only=True)
        buf = torch.empty(min(rows, n), v, dtype=hidden.dtype, device=dev)
        with fp32_reductions(dev):
            for a in range(0, n, rows):
                b = min(a + rows, n)
                _logits(hidden[a:b], weight, bias, buf[: b - a])
                chunk.logprob_chunk(buf[: b - a], a, b, outs)
    return outs["logp"], outs["entropy"]


# ------------------------------------------------------------------------------------ custom ops


def _pass_factory(backend: str):
    return TritonPass if backend == "triton" else NativePass


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("strive_kernels::logprob_loss", mutates_args=())
def _logprob_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, old_logp: Tensor,
                     advantages: Tensor, mask: Tensor, ref_logp: Optional[Tensor], seq_ids: Optional[Tensor],
                     seq_counts: Optional[Tensor], denom: Tensor, settings: list[float], loss_agg: int,
                     with_entropy: bool, needs: list[bool], rows: int, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """settings = the LossSpec's (temperature, eps_low, eps_high, beta), loss_agg its index in LOSS_AGGREGATIONS;
    needs = (grad_hidden, grad_weight, grad_bias) wanted.
    -> loss 0-d, logp (N,), entropy (N,)|(0,), stats (5,), grad_hidden, grad_weight, grad_bias ((0,) if unused)."""
    spec = LossSpec(*settings, loss_agg=LOSS_AGGREGATIONS[loss_agg])
    per_seq_adv = advantages.shape[0] != hidden.shape[0]
    tok = TokenInputs(targets, old_logp, advantages, mask, ref_logp, seq_ids, seq_counts, denom, per_seq_adv, loss_agg)
    with _device_guard(hidden):
        return run_loss(hidden, weight, bias, tok, LossParams(spec, with_entropy), _pass_factory(backend), rows=rows,
                        need_gh=needs[0], need_gw=needs[1], need_gb=needs[2])


@_logprob_loss_op.register_fake
def _logprob_loss_fake(hidden, weight, bias, targets, old_logp, advantages, mask, ref_logp, seq_ids, seq_counts, denom,
                       settings, loss_agg, with_entropy, needs, rows, backend):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (torch.empty((), **f32), torch.empty(n, **f32), torch.empty(n if with_entropy else 0, **f32),
            torch.empty(5, **f32), torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
            torch.empty_like(weight) if needs[1] else weight.new_empty(0),
            torch.empty_like(bias) if needs[2] else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, logp, ent, stats, gh, gw, gb = output
    ctx.mark_non_differentiable(logp, ent, stats, gh, gw, gb)
    # Without this, autograd hands backward a zeros tensor for every output that received no gradient --
    # (V, H) and (N, H) zeros shaped like grad_weight / grad_hidden, allocated in C++ before backward runs:
    # the second gradient-sized buffer of the H200 memory trace (1,039.5 MiB at V=152,064, H=3,584).
    ctx.set_materialize_grads(False)
    # Held as attributes (not save_for_backward) and dropped in backward, so autograd's AccumulateGrad
    # receives the only reference to grad_weight and adopts it instead of copying 1 GB.
    ctx.grads = (gh, gw, gb)


def _scale(x: Tensor, g: Tensor) -> Tensor:
    if x.numel() == 0:
        return x
    if torch.compiler.is_compiling():  # traced graphs: stay functional
        return x * g.to(x.dtype)
    if x.is_cuda:
        scale_(x, g.detach().float())
    elif float(g) != 1.0:  # reading a CPU scalar costs nothing
        x.mul_(g.to(x.dtype))
    return x


_NUM_OP_ARGS = 17  # inputs of strive_kernels::logprob_loss: backward returns one gradient (or None) per input


def _backward(ctx, grad_loss, *_unused):
    if ctx.grads is None:
        raise RuntimeError("fused_logprob_loss: backward ran twice through the same call; its gradients are formed "
                           "in forward and were already handed out (call the loss again, or do not retain_graph)")
    gh, gw, gb = ctx.grads
    ctx.grads = None
    need = ctx.needs_input_grad
    if grad_loss is None:  # no gradient reached the loss (grads are not materialised): nothing to hand out
        return (None,) * _NUM_OP_ARGS
    return (_scale(gh, grad_loss) if need[0] else None, _scale(gw, grad_loss) if need[1] else None,
            _scale(gb, grad_loss) if need[2] else None) + (None,) * (_NUM_OP_ARGS - 3)


_logprob_loss_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("strive_kernels::logprobs", mutates_args=())
def _logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                 with_entropy: bool, rows: int, backend: str) -> tuple[Tensor, Tensor]:
    with _device_guard(hidden):
        return run_logprobs(hidden, weight, bias, targets, LossParams(LossSpec(temperature), with_entropy),
                            _pass_factory(backend), rows=rows)


@_logprobs_op.register_fake
def _logprobs_fake(hidden, weight, bias, targets, temperature, with_entropy, rows, backend):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n if with_entropy else 0, dtype=torch.float32))


# ------------------------------------------------------------------------------------ public API


def _rows(n: int, hidden: Tensor, weight: Tensor, backend: str, max_chunk_bytes: int | None) -> int:
    budget = DEFAULT_MAX_CHUNK_BYTES if max_chunk_bytes is None else int(max_chunk_bytes)
    extra = NativePass.extra_bytes if backend in ("native", "reference") else 0
    return chunk_rows(n, weight.shape[0], hidden.element_size(), budget, extra)


def fused_logprob_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logp: Tensor, advantages: Tensor,
                       mask: Tensor, spec: LossSpec = LossSpec(), *, bias: Optional[Tensor] = None,
                       ref_logp: Optional[Tensor] = None, seq_ids: Optional[Tensor] = None,
                       normaliser: Union[float, Tensor, None] = None, return_entropy: bool = False,
                       backend: str = "auto", max_chunk_bytes: Optional[int] = None) -> LossOutput:
    """Clipped-surrogate policy loss (+ beta * k3) over the lm_head, with the settings of `spec`.

    normaliser: the mode's global denominator D (see strive_kernels.reference.logprob): global unmasked
        token count (token_mean), global number of sequences (seq_mean_token_mean), or number of sequences
        * max_new_tokens (seq_mean_token_sum_norm); a float or a 0-d tensor (no host sync). None: this call
        is the whole batch (token count / distinct seq_ids; seq_mean_token_sum_norm needs it given).
    backend: auto | triton | native | reference (strive_kernels._backend).
    max_chunk_bytes: budget of the (C, V) logits buffer, default 80 MiB (C = 256 at V = 152,064 bf16); larger
        chunks trade memory for speed (bench/TUNING.md).
    Masked tokens (mask == 0) contribute nothing to the loss or any gradient; their logp is still
    computed (NaN where the target is outside [0, V), which is allowed only there; checked on CPU).
    Returns LossOutput; only `loss` is differentiable (w.r.t. hidden, weight, bias).
    """
    check_matrices(hidden, weight, bias)
    be = resolve("fused_logprob_loss", backend, hidden.device)
    n = hidden.shape[0]
    if be == "reference":
        from strive_kernels.reference.logprob import fused_logprob_loss_reference
        return fused_logprob_loss_reference(
            hidden, weight, targets, old_logp, advantages, mask, spec, bias=bias, ref_logp=ref_logp, seq_ids=seq_ids,
            normaliser=normaliser, return_entropy=return_entropy, chunk_rows=_rows(n, hidden, weight, be,
                                                                                   max_chunk_bytes))
    tok = prepare_tokens(hidden, weight, targets, old_logp, advantages, mask, spec, ref_logp=ref_logp,
                         seq_ids=seq_ids, normaliser=normaliser)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad]
    loss, logp, ent, stats, *_ = torch.ops.strive_kernels.logprob_loss(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), tok.targets,
        tok.old_logp, tok.advantages, tok.mask, tok.ref_logp, tok.seq_ids, tok.seq_counts, tok.denom,
        [float(spec.temperature), float(spec.eps_low), float(spec.eps_high), float(spec.beta)], tok.loss_agg,
        bool(return_entropy), needs, _rows(n, hidden, weight, be, max_chunk_bytes), be)
    return build_output(loss, logp, ent, stats, tok.ref_logp is not None, bool(return_entropy))


@torch.no_grad()
def fused_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                   temperature: float = 1.0, return_entropy: bool = False, backend: str = "auto",
                   max_chunk_bytes: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(logp (N,) fp32, entropy (N,) fp32 | None) of the targets under softmax(hidden @ weight.T / T);
    one matmul per chunk plus the statistics pass. Targets outside [0, V) raise on CPU and give NaN on CUDA.
    backend: as fused_logprob_loss; auto takes the twin below a 16,384 vocabulary on CUDA (strive_kernels._backend)."""
    check_matrices(hidden, weight, bias)
    LossSpec(temperature=temperature)  # checks it
    be = resolve("fused_logprobs", backend, hidden.device, vocab=weight.shape[0])
    n = hidden.shape[0]
    rows = _rows(n, hidden, weight, be, max_chunk_bytes)
    if be == "reference":
        from strive_kernels.reference.logprob import fused_logprobs_reference
        logp, ent = fused_logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                             return_entropy=return_entropy, chunk_rows=rows)
        return logp.float(), None if ent is None else ent.float()
    targets = check_targets(targets, n, weight.shape[0], hidden.device)
    logp, ent = torch.ops.strive_kernels.logprobs(hidden.contiguous(), weight.contiguous(),
                                                  None if bias is None else bias.contiguous(), targets,
                                                  float(temperature), bool(return_entropy), rows, be)
    return logp, ent if return_entropy else None
