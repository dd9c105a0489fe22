"""Token-chunk driver of the fused log-prob loss, and its pure-torch ("native") per-chunk pass.

For each chunk of C tokens (rows a:b of hidden):
    logits = hidden[a:b] @ weight.T (+ bias)             matmul 1 (cuBLAS) into one reused (C, V) buffer
    pass: row max / sum-exp, target logit, logp, loss,   ONE fused pass over the buffer (Triton), which
          dL/dlogp, dL/dlogits written over the logits   overwrites the logits with their gradient
    grad_hidden[a:b] = dlogits @ weight                  matmul 2
    grad_weight (+)= dlogits.T @ hidden[a:b]             matmul 3 (first chunk writes, later ones add)
    grad_bias  += dlogits.sum(0)
Three matmuls, no recomputation: each token's loss depends only on its own log-prob, so dL/dlogits of a
chunk is known as soon as its log-sum-exp is. The (C, V) buffer is the only memory beyond the outputs.

What bounds it at T=8192, H=3584, V=152064 bf16 (H100/H200; a cost model, the measured numbers are in
bench_logprob.py's output): the three matmuls (35.4 ms at 757 TFLOP/s)
plus, for small chunks, memory traffic -- matmul 3 with K = C re-reads and re-writes the 1.09 GB bf16
grad_weight once per chunk (2.2 GB, ~0.52 ms at 4.2 TB/s vs 0.37 ms of math at C = 256) and matmuls 1
and 2 each re-read the 1.09 GB weight once per chunk. Larger chunks amortise that traffic but cost
C * V * 2 bytes of buffer: C = 256 keeps the extra peak at ~1.14 GiB (gradients 1.07 GiB + 74 MiB buffer),
C = 1024 is closer to the matmul floor at ~1.36 GiB. `max_chunk_bytes` chooses (see bench_logprob.py).
The fused pass itself moves ~6 bytes per logit (read twice, write once): ~1.8 ms over all chunks.
"""
from __future__ import annotations

import contextlib

import torch

from strive_kernels.logprob_common import TokenInputs, summarise, token_advantages, token_weights

DEFAULT_MAX_CHUNK_BYTES = 80 * 2**20  # C = 256 tokens at V = 152,064 bf16: the memory-floor operating point
_FP32_ACCUM_OUT_DTYPE = {"ok": True}  # whether addmm(out_dtype=fp32) works here (tried once on CUDA)
# Run matmul 2 (grad_hidden) on a side stream concurrently with matmul 3 (grad_weight): both only read the
# chunk's dlogits. Off until bench_logprob.py's "two_streams" numbers show it pays on the target GPU.
OVERLAP_GRAD_MATMULS = False
_SIDE_STREAMS: dict = {}


def chunk_rows(n: int, vocab: int, elem_bytes: int, max_chunk_bytes: int, extra_bytes: int = 0) -> int:
    """Tokens per chunk so the (C, V) buffer (+ `extra_bytes` per logit of temporaries) fits the budget;
    multiples of 128 when large (matmul tiles), at least 1, at most n."""
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be > 0, got {max_chunk_bytes}")
    rows = max_chunk_bytes // max(1, vocab * (elem_bytes + extra_bytes))
    if rows >= 128:
        rows -= rows % 128
    return int(max(1, min(rows, max(n, 1))))


class LossParams:
    """Scalars of one call (kept together so both passes read the same thing)."""

    def __init__(self, temperature: float, eps_low: float, eps_high: float, beta: float, with_entropy: bool):
        self.inv_temp = 1.0 / float(temperature)
        self.eps_low, self.eps_high, self.beta = float(eps_low), float(eps_high), float(beta)
        self.with_entropy = bool(with_entropy)


def token_terms(logp, old, adv, ref, w, p: LossParams):
    """Analytic per-token terms from log-probs (c,): (weighted loss, dL/dlogp weighted, clip code, k3)."""
    ratio = torch.exp(logp - old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - p.eps_low, 1.0 + p.eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    # min picks the unclipped branch (gradient -ratio * A) unless clipping made it strictly smaller.
    dloss = torch.where(unclipped <= clipped, -ratio * adv, torch.zeros_like(ratio))
    k3 = None
    if ref is not None:
        d = ref - logp
        ed = torch.exp(d)
        k3 = ed - d - 1.0
        loss = loss + p.beta * k3
        dloss = dloss + p.beta * (1.0 - ed)
    live = w != 0
    zero = torch.zeros_like(loss)
    low = live & (ratio < 1.0 - p.eps_low) & (adv < 0)
    high = live & (ratio > 1.0 + p.eps_high) & (adv > 0)
    code = torch.where(low, -1.0, torch.where(high, 1.0, 0.0))  # (c,) -1 / +1: clipped below / above
    return torch.where(live, w * loss, zero), torch.where(live, w * dloss, zero), code, k3


class NativePass:
    """Per-chunk pass in plain torch (fp32 temporaries of (C, V)): the CPU path and a GPU baseline."""

    extra_bytes = 12  # fp32 copy of the logits, fp32 log_softmax, and a temporary per logit

    def __init__(self, tok: TokenInputs, params: LossParams, vocab: int, rows: int, device, logprobs_only=False):
        self.tok, self.p, self.vocab = tok, params, vocab
        if not logprobs_only:
            self.w = token_weights(tok)  # (N,)
            self.adv = token_advantages(tok)  # (N,)

    def _logp(self, lg, tgt, need_prob: bool):
        acc = torch.float64 if lg.dtype == torch.float64 else torch.float32
        z = lg.to(acc)  # (c, V); the buffer itself when it is already fp32
        if self.p.inv_temp != 1.0:
            z = z * self.p.inv_temp
        # log_softmax works on z - max and never forms max + log(sum), which at |z| ~ 3e4 would be rounded
        # to fp32's ulp there (0.002): log-probs keep their own precision.
        logsm = torch.log_softmax(z, dim=-1)  # (c, V)
        valid = (tgt >= 0) & (tgt < self.vocab)
        logp = logsm.gather(1, tgt.clamp(0, self.vocab - 1)[:, None]).squeeze(1)
        logp = torch.where(valid, logp, torch.full_like(logp, float("nan")))
        prob = logsm.exp_() if need_prob else None  # (c, V) softmax, in place
        return logp, prob, valid

    def loss_chunk(self, lg, a: int, b: int, outs, compute_grad: bool) -> None:
        t = self.tok
        tgt = t.targets[a:b]
        logp, prob, valid = self._logp(lg, tgt, need_prob=compute_grad or self.p.with_entropy)
        ref = t.ref_logp[a:b] if t.ref_logp is not None else None
        loss_t, g, code, k3 = token_terms(logp, t.old_logp[a:b], self.adv[a:b], ref, self.w[a:b], self.p)
        outs["logp"][a:b] = logp
        outs["loss"][a:b] = loss_t
        outs["clip"][a:b] = code
        if k3 is not None:
            outs["k3"][a:b] = k3
        if self.p.with_entropy:
            outs["entropy"][a:b] = torch.special.entr(prob).sum(-1)
        if compute_grad:  # dL/dx_j = g / T * (1[j = target] - p_j), written over the logits
            g = (g * self.p.inv_temp).to(prob.dtype)
            prob.mul_(-g[:, None])
            prob.scatter_add_(1, tgt.clamp(0, self.vocab - 1)[:, None], torch.where(valid, g, 0.0)[:, None])
            lg.copy_(prob)

    def logprob_chunk(self, lg, a: int, b: int, outs) -> None:
        logp, prob, _ = self._logp(lg, self.tok.targets[a:b], need_prob=self.p.with_entropy)
        outs["logp"][a:b] = logp
        if self.p.with_entropy:
            outs["entropy"][a:b] = torch.special.entr(prob).sum(-1)


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


def _add_weight_grad(gw, dl, hc, first: bool) -> None:
    """gw (V, H) (+)= dl.T (V, c) @ hc (c, H); fp32 gw accumulates bf16/fp16 products without rounding."""
    if gw.dtype == dl.dtype:
        if first:
            torch.mm(dl.t(), hc, out=gw)  # beta = 0: no read of gw, no zero-fill
        else:
            gw.addmm_(dl.t(), hc)
        return
    if first:
        gw.zero_()
    if gw.is_cuda and _FP32_ACCUM_OUT_DTYPE["ok"]:
        try:  # cuBLAS with fp32 output: exact accumulation at bf16 speed
            torch.addmm(gw, dl.t(), hc, out_dtype=gw.dtype, out=gw)
            return
        except (RuntimeError, TypeError):
            _FP32_ACCUM_OUT_DTYPE["ok"] = False
    gw.addmm_(dl.t().to(gw.dtype), hc.to(gw.dtype))  # (V, c) fp32 temporary, chunk-sized


def _loss_loop(hidden, weight, bias, chunk, buf, outs, gh, gw, gb, rows, compute_grad, need_gh, need_gw, need_gb):
    n = hidden.shape[0]
    main = side = None
    if OVERLAP_GRAD_MATMULS and hidden.is_cuda and need_gh and need_gw:
        main = torch.cuda.current_stream()
        if hidden.device not in _SIDE_STREAMS:  # one per device: cuBLAS keeps a workspace per stream
            _SIDE_STREAMS[hidden.device] = torch.cuda.Stream(hidden.device)
        side = _SIDE_STREAMS[hidden.device]
    for i, a in enumerate(range(0, n, rows)):
        b = min(a + rows, n)
        hc, lg = hidden[a:b], buf[: b - a]
        _logits(hc, weight, bias, lg)  # matmul 1 (after the previous chunk's readers of buf are done)
        chunk.loss_chunk(lg, a, b, outs, compute_grad)  # lg now holds dL/dlogits
        if side is not None:  # matmul 2 beside matmul 3: compute-bound next to memory-bound at small C
            side.wait_stream(main)
            with torch.cuda.stream(side):
                torch.mm(lg, weight, out=gh[a:b])
        elif need_gh:
            torch.mm(lg, weight, out=gh[a:b])  # matmul 2
        if need_gw:
            _add_weight_grad(gw, lg, hc, first=i == 0)  # matmul 3
        if need_gb:
            gb.add_(torch.sum(lg, dim=0, dtype=torch.float32))
        if side is not None:
            main.wait_stream(side)  # buf is overwritten by the next chunk; gh is complete when we return


def run_loss(hidden, weight, bias, tok: TokenInputs, params: LossParams, pass_factory, *, rows: int,
             need_gh: bool, need_gw: bool, need_gb: bool, fp32_grad_accum: bool):
    """The chunk loop. Returns (loss 0-d, logp (N,), entropy (N,)|(0,), stats (5,), grad_hidden, grad_weight,
    grad_bias), the grads as empty (0,) tensors where not needed."""
    n, h = hidden.shape
    v, dev = weight.shape[0], hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    outs = {"logp": torch.empty(n, **f32), "loss": torch.empty(n, **f32), "clip": torch.empty(n, **f32),
            "entropy": torch.empty(n if params.with_entropy else 0, **f32),
            "k3": torch.empty(n if tok.ref_logp is not None else 0, **f32)}
    gh = torch.empty_like(hidden) if need_gh else hidden.new_empty(0)  # separate empties: outputs never alias
    gw = torch.empty(v, h, dtype=torch.float32 if fp32_grad_accum else weight.dtype, device=dev) if need_gw \
        else weight.new_empty(0)
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
    if need_gw and gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
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
