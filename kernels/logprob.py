"""Fused log-probs and GRPO/DAPO/Dr.GRPO/STRIVE loss over an lm_head, without materialising [N, V] logits.

    out = fused_logprob_loss(hidden, weight, targets, old_logp, advantages, mask,
                             seq_ids=seq_ids, loss_agg="seq_mean_token_mean", normaliser=num_seqs)
    out.loss.backward()                     # grads of hidden, weight (and bias) were formed in forward
    logp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True)   # no grad: old / ref policy

Shapes: hidden (N, H) packed completion tokens (bf16/fp16/fp32), weight (V, H) lm_head (tied or not),
bias (V,) | None, targets (N,) int64, old_logp / ref_logp (N,), advantages (N,) per token or (S,) per
sequence with seq_ids (N,) in [0, S) (a length-N tensor is read per token: pass advantages[seq_ids] in the
rare case S == N), mask (N,) bool/float. The loss, its aggregation and `normaliser`
are defined in `strive_kernels.logprob_common` (module docstring); the result is a `LossOutput`.

How: tokens are processed in chunks of C = max_chunk_bytes / (V * itemsize) rows (a multiple of 128):
cuBLAS computes the chunk's logits into one reused (C, V) buffer, one fused Triton pass turns them into
dL/dlogits in place (fp32 online log-sum-exp), and two more cuBLAS matmuls produce grad_hidden for the
chunk and accumulate grad_weight -- three matmuls in total, nothing recomputed (logprob_chunked.py has
the cost model). Backward only scales the stored gradients by grad_output, in place and without a host
sync (a no-op kernel when grad_output == 1).

Backends: "triton" (CUDA; on CPU only under TRITON_INTERPRET=1), "native" (same chunk loop, pass in
torch; the CPU default), "reference" (autograd twin, `strive_kernels.reference.logprob`), "auto".
Registered as torch.library custom ops (strive_kernels::logprob_loss, strive_kernels::logprobs) with
fake implementations, so torch.compile can trace around them.

Determinism: chunks are processed in a fixed order with no atomics (cuBLAS/torch reductions only), so
grad_weight and the loss are bitwise reproducible on one machine and software stack. `deterministic=True`
additionally replaces the atomic per-sequence token count (exact for 0/1 masks, order-dependent for
fractional masks) by a sort-based segment sum.
Memory: outputs (grad_weight V*H, grad_hidden N*H in the input dtype) + the (C, V) buffer + O(N) fp32;
`fp32_grad_accum=True` accumulates grad_weight in fp32 (V*H*4 more, plus the final cast) for callers
who need it free of the per-chunk bf16 rounding.
"""
import contextlib
from typing import Optional, Union

import torch
from torch import Tensor
from strive_kernels._backend import resolve_auto

from strive_kernels.logprob_chunked import (DEFAULT_MAX_CHUNK_BYTES, LossParams, NativePass, chunk_rows, run_logprobs,
                                            run_loss)
from strive_kernels.logprob_common import (LossOutput, TokenInputs, build_output, check_matrices, check_scalars,
                                           check_targets, prepare_tokens)

__all__ = ["fused_logprob_loss", "fused_logprobs", "LossOutput", "DEFAULT_MAX_CHUNK_BYTES", "BACKENDS"]

BACKENDS = ("auto", "triton", "native", "reference")


def _resolve_backend(backend: str, device: torch.device) -> str:
    backend = resolve_auto(backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        if device.type != "cuda":
            return "native"
        try:
            import strive_kernels.logprob_triton  # noqa: F401
        except ImportError:  # no Triton on this CUDA install: same loop, pass in torch
            return "native"
        return "triton"
    if backend == "triton" and device.type != "cuda":
        from strive_kernels.logprob_triton import interpreting
        if device.type != "cpu" or not interpreting():
            raise RuntimeError(f"backend='triton' needs CUDA tensors (got {device}) or, on CPU, TRITON_INTERPRET=1 "
                               f"set before strive_kernels.logprob_triton is imported; use backend='native' on CPU")
    return backend


# No-grad log-probs (old / reference policy) at a small vocabulary: the fused pass cannot beat one cuBLAS matmul
# plus log_softmax over [N, V] logits that are small anyway. Measured on an H200 (bench_logprob.py --engine,
# 2026-12-04, torch 2.11): V=1,028, N=2,048, H=1,024: fused 0.50 ms vs the torch twin 0.29 ms; V=152,064,
# N=8,192, H=3,584: fused 13.9 ms vs 75.5 ms. "auto" therefore takes the twin below this vocabulary.
SMALL_VOCAB_NOGRAD = 16_384


def _logprobs_backend(backend: str, device: torch.device, vocab: int) -> str:
    """The backend of `fused_logprobs`: `_resolve_backend`, with auto's small-vocabulary rule on CUDA."""
    be = _resolve_backend(backend, device)
    if resolve_auto(backend) == "auto" and be == "triton" and vocab < SMALL_VOCAB_NOGRAD:
        return "reference"
    return be


def _pass_factory(backend: str):
    if backend == "triton":
        from strive_kernels.logprob_triton import TritonPass
        return TritonPass
    return NativePass


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("strive_kernels::logprob_loss", mutates_args=())
def _logprob_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, old_logp: Tensor,
                     advantages: Tensor, mask: Tensor, ref_logp: Optional[Tensor], seq_ids: Optional[Tensor],
                     seq_counts: Optional[Tensor], denom: Tensor, temperature: float, eps_low: float, eps_high: float,
                     beta: float, loss_agg: int, per_seq_adv: bool, with_entropy: bool, need_gh: bool, need_gw: bool,
                     need_gb: bool, fp32_grad_accum: bool, rows: int, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> loss 0-d, logp (N,), entropy (N,)|(0,), stats (5,), grad_hidden, grad_weight, grad_bias ((0,) if unused)."""
    tok = TokenInputs(targets, old_logp, advantages, mask, ref_logp, seq_ids, seq_counts, denom, per_seq_adv, loss_agg)
    params = LossParams(temperature, eps_low, eps_high, beta, with_entropy)
    with _device_guard(hidden):
        return run_loss(hidden, weight, bias, tok, params, _pass_factory(backend), rows=rows, need_gh=need_gh,
                        need_gw=need_gw, need_gb=need_gb, fp32_grad_accum=fp32_grad_accum)


@_logprob_loss_op.register_fake
def _logprob_loss_fake(hidden, weight, bias, targets, old_logp, advantages, mask, ref_logp, seq_ids, seq_counts, denom,
                       temperature, eps_low, eps_high, beta, loss_agg, per_seq_adv, with_entropy, need_gh, need_gw,
                       need_gb, fp32_grad_accum, rows, backend):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (torch.empty((), **f32), torch.empty(n, **f32), torch.empty(n if with_entropy else 0, **f32),
            torch.empty(5, **f32), torch.empty_like(hidden) if need_gh else hidden.new_empty(0),
            torch.empty_like(weight) if need_gw else weight.new_empty(0),
            torch.empty_like(bias) if need_gb else hidden.new_empty(0))


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
        from strive_kernels.logprob_triton import scale_
        scale_(x, g.detach().float())
    elif float(g) != 1.0:  # reading a CPU scalar costs nothing
        x.mul_(g.to(x.dtype))
    return x


def _backward(ctx, grad_loss, *_unused):
    if ctx.grads is None:
        raise RuntimeError("fused_logprob_loss: backward ran twice through the same call; its gradients are formed "
                           "in forward and were already handed out (call the loss again, or do not retain_graph)")
    gh, gw, gb = ctx.grads
    ctx.grads = None
    need = ctx.needs_input_grad
    if grad_loss is None:  # no gradient reached the loss (grads are not materialised): nothing to hand out
        return (None,) * 24
    return (_scale(gh, grad_loss) if need[0] else None, _scale(gw, grad_loss) if need[1] else None,
            _scale(gb, grad_loss) if need[2] else None) + (None,) * 21


_logprob_loss_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("strive_kernels::logprobs", mutates_args=())
def _logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                 with_entropy: bool, rows: int, backend: str) -> tuple[Tensor, Tensor]:
    params = LossParams(temperature, 0.0, 0.0, 0.0, with_entropy)
    with _device_guard(hidden):
        return run_logprobs(hidden, weight, bias, targets, params, _pass_factory(backend), rows=rows)


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
                       mask: Tensor, *, bias: Optional[Tensor] = None, ref_logp: Optional[Tensor] = None,
                       seq_ids: Optional[Tensor] = None, temperature: float = 1.0, eps_low: float = 0.2,
                       eps_high: float = 0.2, beta: float = 0.0, loss_agg: str = "seq_mean_token_mean",
                       normaliser: Union[float, Tensor, None] = None, return_entropy: bool = False,
                       backend: str = "auto",
                       deterministic: bool = False, max_chunk_bytes: Optional[int] = None,
                       fp32_grad_accum: bool = False) -> LossOutput:
    """Clipped-surrogate policy loss (+ beta * k3) over the lm_head, aggregated by `loss_agg`.

    normaliser: the mode's global denominator D (see strive_kernels.logprob_common): global unmasked
        token count (token_mean), global number of sequences (seq_mean_token_mean), or number of sequences
        * max_new_tokens (seq_mean_token_sum_norm); a float or a 0-d tensor (no host sync). None: this call
        is the whole batch (token count / distinct seq_ids; seq_mean_token_sum_norm needs it given).
    max_chunk_bytes: budget of the (C, V) logits buffer, default 80 MiB (C = 256 at V = 152,064 bf16).
    Masked tokens (mask == 0) contribute nothing to the loss or any gradient; their logp is still
    computed (NaN where the target is outside [0, V), which is allowed only there; checked on CPU).
    Returns LossOutput; only `loss` is differentiable (w.r.t. hidden, weight, bias).
    """
    check_matrices(hidden, weight, bias)
    check_scalars(temperature, eps_low, eps_high, beta)
    be = _resolve_backend(backend, hidden.device)
    if not isinstance(deterministic, bool) or not isinstance(fp32_grad_accum, bool):
        raise TypeError("deterministic and fp32_grad_accum must be bool")
    n = hidden.shape[0]
    if be == "reference":
        from strive_kernels.reference.logprob import fused_logprob_loss_reference
        return fused_logprob_loss_reference(
            hidden, weight, targets, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp, seq_ids=seq_ids,
            temperature=temperature, eps_low=eps_low, eps_high=eps_high, beta=beta, loss_agg=loss_agg,
            normaliser=normaliser, return_entropy=return_entropy, deterministic=deterministic,
            chunk_rows=_rows(n, hidden, weight, be, max_chunk_bytes))
    tok = prepare_tokens(hidden, weight, targets, old_logp, advantages, mask, ref_logp=ref_logp, seq_ids=seq_ids,
                         normaliser=normaliser, loss_agg=loss_agg, beta=beta, deterministic=deterministic)
    grad_on = torch.is_grad_enabled()
    need_gh = grad_on and hidden.requires_grad
    need_gw = grad_on and weight.requires_grad
    need_gb = grad_on and bias is not None and bias.requires_grad
    loss, logp, ent, stats, *_ = torch.ops.strive_kernels.logprob_loss(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), tok.targets,
        tok.old_logp, tok.advantages, tok.mask, tok.ref_logp, tok.seq_ids, tok.seq_counts, tok.denom,
        float(temperature), float(eps_low), float(eps_high), float(beta), tok.loss_agg, tok.per_seq_adv,
        bool(return_entropy), need_gh, need_gw, need_gb, fp32_grad_accum and weight.dtype != torch.float32,
        _rows(n, hidden, weight, be, max_chunk_bytes), be)
    return build_output(loss, logp, ent, stats, tok.ref_logp is not None, bool(return_entropy))


@torch.no_grad()
def fused_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                   temperature: float = 1.0, return_entropy: bool = False, backend: str = "auto",
                   max_chunk_bytes: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(logp (N,) fp32, entropy (N,) fp32 | None) of the targets under softmax(hidden @ weight.T / T);
    one matmul per chunk plus the statistics pass. Targets outside [0, V) raise on CPU and give NaN on CUDA."""
    check_matrices(hidden, weight, bias)
    check_scalars(temperature, 0.0, 0.0, 0.0)
    be = _logprobs_backend(backend, hidden.device, weight.shape[0])
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
