"""strive_kernels.fused_logprob_loss / fused_logprobs against the fp64 autograd reference.

Error rule (flash-attention's): |ours - fp64 reference| <= 2 * |plain PyTorch - fp64 reference| + a noise
floor of 2e-6 of the output's scale (~16 fp32 ulps: plain PyTorch's error on a single token can be 0 by
luck), where plain PyTorch is the reference twin run at the inputs' precision in one chunk (materialised
logits, fp32 log_softmax, autograd gradients).
On CPU the Triton pass runs under TRITON_INTERPRET=1 (conftest) with small tiles, so shapes stay tiny.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import strive_kernels as sk
from strive_engine.algorithms import PRESETS
from strive_kernels.reference import fused_logprob_loss_reference, fused_logprobs_reference

BIG = 1 << 40  # max_chunk_bytes that makes everything one chunk


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter-sized tiles: V=1000 -> 4 tiles of 256 in 2 splits, so the split-combine and tails run."""
    from strive_kernels import logprob
    monkeypatch.setattr(logprob, "BLOCK_V_MAX", 256)
    monkeypatch.setattr(logprob, "TILES_PER_SPLIT", 2)


def make_case(n=37, h=72, v=1000, *, n_seq=4, seed=0, bias=True, mask_frac=0.25, per_seq=False, scale=2.0):
    """Targets sampled from the model itself and old/ref log-probs near the true ones, so ratios straddle
    both clip limits; logits ~ N(0, scale^2)."""
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (scale / math.sqrt(h))
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    logits = hid @ w.T + (b if bias else 0)
    tgt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
    true = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).squeeze(1)
    seq = torch.sort(torch.randint(0, n_seq, (n,), generator=g)).values
    adv_seq = torch.randn(n_seq, generator=g)
    mask = torch.rand(n, generator=g) >= mask_frac
    mask[0] = True
    return dict(hidden=hid, weight=w, bias=b, targets=tgt, old_logp=(true + 0.2 * torch.randn(n, generator=g)).float(),
                ref_logp=(true + 0.3 * torch.randn(n, generator=g)).float(), seq_ids=seq,
                advantages=adv_seq if per_seq else adv_seq[seq] + 0.1 * torch.randn(n, generator=g), mask=mask)


def dev_for(backend):
    """Triton runs on CUDA tensors where there is a GPU (compiled), on CPU tensors under the interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def on(case, backend):
    return {k: v.to(dev_for(backend)) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


SETTINGS = ("temperature", "eps_low", "eps_high", "beta", "loss_agg")  # the fields of sk.LossSpec


def run(case, dtype, backend, *, with_ref=True, max_chunk_bytes=BIG, **kw):
    """Call the public op on `case` cast to dtype; returns a dict of outputs and gradients (fp64, CPU).
    kw: LossSpec fields (default seq_mean_token_mean at temperature 0.7) and the op's keyword arguments."""
    case = on(case, backend)
    hid = case["hidden"].to(dtype, copy=True).requires_grad_()
    w = case["weight"].to(dtype, copy=True).requires_grad_()
    b = case["bias"].to(dtype, copy=True).requires_grad_() if case["bias"] is not None else None
    spec = sk.LossSpec(**{"temperature": 0.7, **{k: kw.pop(k) for k in SETTINGS if k in kw}})
    out = sk.fused_logprob_loss(hid, w, case["targets"], case["old_logp"], case["advantages"], case["mask"], spec,
                                bias=b, ref_logp=case["ref_logp"] if with_ref else None, seq_ids=case["seq_ids"],
                                backend=backend, return_entropy=True, max_chunk_bytes=max_chunk_bytes, **kw)
    out.loss.backward()
    res = {"loss": out.loss, "logp": out.logp, "entropy": out.entropy, "grad_hidden": hid.grad, "grad_weight": w.grad,
           "clip_frac": out.clip_frac, "entropy_mean": out.entropy_mean}
    if b is not None:
        res["grad_bias"] = b.grad
    if with_ref:
        res["kl"] = out.kl
    return {k: v.detach().double().cpu() for k, v in res.items()}


def assert_close_to_oracle(case, dtype, backend, **kw):
    """ours vs fp64 oracle, bounded by plain PyTorch's own error at `dtype`."""
    oracle = run(case, torch.float64, "reference", **{k: v for k, v in kw.items() if k != "max_chunk_bytes"})
    plain = run(case, dtype, "reference", **{k: v for k, v in kw.items() if k != "max_chunk_bytes"})
    ours = run(case, dtype, backend, **kw)
    assert set(ours) == set(oracle)
    for key, ref in oracle.items():
        assert torch.isfinite(ref).all(), key
        scale = ref.abs().max().item() if ref.numel() else 0.0
        if key == "kl":  # k3 = exp(d) - d - 1 cancels: its fp32 noise is ~ulp(1), not ulp(k3)
            scale = max(scale, 1.0)
        e_ours = (ours[key] - ref).abs().max().item() if ref.numel() else 0.0
        e_plain = (plain[key] - ref).abs().max().item() if ref.numel() else 0.0
        assert e_ours <= 2 * e_plain + 2e-6 * scale + 1e-12, (key, e_ours, e_plain, scale)
    return ours, oracle


# ------------------------------------------------------------------------- accuracy vs the fp64 oracle

AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("with_ref", [False, True], ids=["noref", "ref"])
@pytest.mark.parametrize("per_seq", [False, True], ids=["adv_tok", "adv_seq"])
def test_native_matches_oracle(dtype, loss_agg, with_ref, per_seq):
    case = make_case(per_seq=per_seq, seed=1)
    norm = {"seq_mean_token_sum_norm": 4 * 24.0}.get(loss_agg)
    assert_close_to_oracle(case, dtype, "native", loss_agg=loss_agg, with_ref=with_ref, beta=0.05 if with_ref else 0.0,
                           normaliser=norm, max_chunk_bytes=16 * 1000 * 10)  # 3 chunks of <= 16 tokens


@pytest.mark.parametrize("dtype,loss_agg,with_ref,per_seq,temperature", [
    (torch.float32, "seq_mean_token_mean", True, True, 0.7),
    (torch.float32, "token_mean", False, False, 1.0),
    (torch.bfloat16, "seq_mean_token_sum_norm", True, False, 1.3),
    (torch.bfloat16, "seq_mean_token_mean", False, True, 0.7),
], ids=["fp32-seqmean-ref-advseq", "fp32-tokmean", "bf16-drgrpo-ref", "bf16-seqmean-advseq"])
def test_triton_matches_oracle(small_tiles, dtype, loss_agg, with_ref, per_seq, temperature):
    case = make_case(per_seq=per_seq, seed=2)
    norm = 96.0 if loss_agg == "seq_mean_token_sum_norm" else None
    assert_close_to_oracle(case, dtype, "triton", loss_agg=loss_agg, with_ref=with_ref, beta=0.04 if with_ref else 0.0,
                           normaliser=norm, temperature=temperature, max_chunk_bytes=16 * 1000 * 2)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("n,h,v", [(1, 72, 1000), (37, 72, 1000), (5, 16, 257)], ids=["N1", "N37", "V257"])
def test_weird_shapes(small_tiles, backend, n, h, v):
    case = make_case(n=n, h=h, v=v, seed=3, n_seq=min(n, 3))
    assert_close_to_oracle(case, torch.float32, backend, max_chunk_bytes=7 * v * 4)  # 7-token chunks


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_presets(preset, beta):
    p = PRESETS[preset]
    case = make_case(seed=4, per_seq=True)
    norm = 4 * 16.0 if p.loss_agg == "seq_mean_token_sum_norm" else None
    assert_close_to_oracle(case, torch.bfloat16, "native", loss_agg=p.loss_agg, eps_low=p.eps_low,
                           eps_high=p.eps_high, beta=beta, with_ref=beta > 0, normaliser=norm,
                           max_chunk_bytes=20 * 1000 * 10)


def test_clipping_is_exercised():
    """The cases above must hit both clip limits, otherwise they would not test the clipped branch."""
    out = run(make_case(seed=1), torch.float64, "reference")
    assert 0.05 < out["clip_frac"].item() < 0.6


# ------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_masked_tokens_contribute_nothing(small_tiles, backend):
    case = make_case(seed=5, n=20)
    masked = ~case["mask"]
    assert masked.sum() >= 3
    other = dict(case)
    g = torch.Generator().manual_seed(9)
    other["hidden"] = case["hidden"].clone()
    other["hidden"][masked] = torch.randn(int(masked.sum()), case["hidden"].shape[1], generator=g, dtype=torch.float64)
    other["targets"] = case["targets"].clone()
    other["targets"][masked] = -100  # out-of-range targets are allowed where masked
    other["old_logp"] = case["old_logp"].clone()
    other["old_logp"][masked] = 50.0
    a = run(case, torch.float32, backend, max_chunk_bytes=8 * 1000 * 4)
    b = run(other, torch.float32, backend, max_chunk_bytes=8 * 1000 * 4)
    for key in ("loss", "grad_weight", "grad_bias", "clip_frac", "kl"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert (b["grad_hidden"][masked] == 0).all() and (a["grad_hidden"][masked] == 0).all()
    assert b["logp"][masked].isnan().all()  # no log-prob of an out-of-vocabulary target
    assert torch.isfinite(b["logp"][~masked]).all()


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_neg_inf_safe(small_tiles, backend, dtype):
    """Very negative logits everywhere (-3e4) and -inf on banned vocabulary entries: finite, and as accurate
    as plain PyTorch (in bf16 the -3e4 offset leaves ~1 significant bit of each logit, for both)."""
    case = make_case(seed=6, v=300)
    banned = torch.ones(300, dtype=torch.bool)
    banned[case["targets"]] = False
    banned[:5] = False
    bias = case["bias"] - 3e4
    bias[banned] = float("-inf")
    case["bias"] = bias
    out, _ = assert_close_to_oracle(case, dtype, backend, temperature=1.0, max_chunk_bytes=10 * 300 * 4)
    for key in ("loss", "logp", "grad_hidden", "entropy"):
        assert torch.isfinite(out[key]).all(), key
    assert (out["grad_weight"][banned] == 0).all() and (out["grad_bias"][banned] == 0).all()


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_per_sequence_equals_per_token_advantages(small_tiles, backend):
    case = make_case(seed=7, per_seq=True, n=15)
    tok = dict(case, advantages=case["advantages"][case["seq_ids"]])
    a = run(case, torch.float32, backend, max_chunk_bytes=6 * 1000 * 4)
    b = run(tok, torch.float32, backend, max_chunk_bytes=6 * 1000 * 4)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_chunking_does_not_change_the_result():
    case = make_case(seed=8)
    one = run(case, torch.float32, "native", max_chunk_bytes=BIG)
    many = run(case, torch.float32, "native", max_chunk_bytes=5 * 1000 * 12)
    for key in one:
        torch.testing.assert_close(one[key], many[key], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_grad_output_scales_gradients(small_tiles, backend):
    case = on(make_case(seed=10, n=9), backend)
    h = case["hidden"].float().requires_grad_()
    w = case["weight"].float().requires_grad_()
    kw = dict(seq_ids=case["seq_ids"], backend=backend)
    args = (case["targets"], case["old_logp"], case["advantages"], case["mask"])
    sk.fused_logprob_loss(h, w, *args, **kw).loss.backward()
    g1 = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (-2.5 * sk.fused_logprob_loss(h, w, *args, **kw).loss).backward()
    torch.testing.assert_close(h.grad, -2.5 * g1[0])
    torch.testing.assert_close(w.grad, -2.5 * g1[1])


def test_backward_twice_is_an_error():
    case = make_case(seed=11, n=6)
    h = case["hidden"].float().requires_grad_()
    out = sk.fused_logprob_loss(h, case["weight"].float(), case["targets"], case["old_logp"], case["advantages"],
                                case["mask"], seq_ids=case["seq_ids"])
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_only_requested_gradients_and_no_grad():
    case = make_case(seed=12, n=8)
    h = case["hidden"].float().requires_grad_()
    w = case["weight"].float()  # frozen lm_head
    args = (case["targets"], case["old_logp"], case["advantages"], case["mask"])
    out = sk.fused_logprob_loss(h, w, *args, seq_ids=case["seq_ids"])
    out.loss.backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        out2 = sk.fused_logprob_loss(h, w, *args, seq_ids=case["seq_ids"])
    assert not out2.loss.requires_grad
    torch.testing.assert_close(out.loss.detach(), out2.loss)
    assert not out.logp.requires_grad


def test_reproducible(small_tiles):
    """Chunks in a fixed order, no atomics in the loss path: two calls give the same bits, also with
    fractional mask weights."""
    case = make_case(seed=13, n=14)
    case["mask"] = torch.rand(14, generator=torch.Generator().manual_seed(0)).float()  # fractional weights
    a = run(case, torch.bfloat16, "triton", max_chunk_bytes=6 * 1000 * 2)
    b = run(case, torch.bfloat16, "triton", max_chunk_bytes=6 * 1000 * 2)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_weight_gradient_is_handed_over_not_copied():
    """AccumulateGrad adopts the grad_weight formed in forward (a copy would double the peak memory)."""
    case = make_case(seed=18, n=9)
    w = case["weight"].float().requires_grad_()
    out = sk.fused_logprob_loss(case["hidden"].float(), w, case["targets"], case["old_logp"], case["advantages"],
                                case["mask"], seq_ids=case["seq_ids"])
    formed = out.loss.grad_fn.grads[1].data_ptr()  # the custom op's autograd context holds (gh, gw, gb)
    out.loss.backward()
    assert w.grad.data_ptr() == formed


class _NewTensors(TorchDispatchMode):
    """Records every op output of at least `numel` elements that does not share storage with an input."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.made += [(str(func), tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                      and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in ins]
        return out


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("grad_scale", [1.0, -2.5])
def test_backward_allocates_no_gradient_sized_tensor(small_tiles, backend, grad_scale):
    """Backward only scales the gradients formed in forward: no (N, H) or (V, H) tensor is created. Autograd
    used to materialise zeros for the op's non-differentiable outputs (shaped like grad_hidden and
    grad_weight) before calling backward: the second gradient-sized buffer of the H200 memory trace."""
    case = on(make_case(seed=22, n=24, h=16, v=1000), backend)
    h = case["hidden"].float().requires_grad_()
    w = case["weight"].float().requires_grad_()
    out = sk.fused_logprob_loss(h, w, case["targets"], case["old_logp"], case["advantages"], case["mask"],
                                seq_ids=case["seq_ids"], backend=backend)
    rec = _NewTensors(min(h.numel(), w.numel()))
    with rec:
        (out.loss * grad_scale).backward()
    assert rec.made == []
    assert h.grad is not None and w.grad is not None


class _Launches:
    """Stands in for a Triton kernel: records the arguments of every launch, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch

    def specialisations(self) -> set[str]:
        """The distinct compile keys Triton's JIT would derive from the recorded launches for an sm_90 GPU
        (argument types, integer == 1 / divisible by 16, pointer alignment): one compile each."""
        pytest.importorskip("triton.backends.nvidia")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
        k = self.kernel
        jit = k if isinstance(k, JITFunction) else JITFunction(k.fn, **k.kwargs)
        binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
        return {str(binder(*args, **kwargs)[1]) for args, kwargs in self.calls}


def test_one_compile_whatever_the_token_count(small_tiles, monkeypatch):
    """Calls that differ only in token count, number of sequences, chunk offsets or where the caller's vectors
    start in memory must map to one compiled variant per kernel: each new variant is a Triton compile (up
    to a second) in the middle of a training step, which made the fast path lose to the reference at
    gpu_small (issue 14). Before the fix the workspace rows' alignment followed the token count, and the
    first token of a chunk and the number of sequences were specialised."""
    from strive_kernels import logprob as lt
    rec = {name: _Launches(getattr(lt, name)) for name in ("_lse_partials_kernel", "_loss_grad_kernel",
                                                            "_logprob_kernel")}
    for name, r in rec.items():
        monkeypatch.setattr(lt, name, r)
    v = 1000
    for i, (n, n_seq, rows) in enumerate([(37, 4, None), (50, 1, 16), (61, 3, 32), (16, 16, None), (33, 5, 17)]):
        case = make_case(seed=30 + i, n=n, h=16, v=v, n_seq=n_seq)
        pad = torch.zeros(n + 1, dtype=torch.int64)  # the caller's targets at an odd address
        pad[1:] = case["targets"]
        case["targets"] = pad[1:]
        run(case, torch.float32, "triton", with_ref=False, max_chunk_bytes=BIG if rows is None else rows * v * 4)
        c = on(case, "triton")
        sk.fused_logprobs(c["hidden"].float(), c["weight"].float(), c["targets"], backend="triton",
                          return_entropy=True, max_chunk_bytes=BIG if rows is None else rows * v * 4)
    for name, r in rec.items():
        assert len(r.calls) >= 5, name
        assert len(r.specialisations()) == 1, (name, r.specialisations())


def test_default_tiles_several_splits():
    """Production tile sizes (2048-wide tiles, 8 per split) with V spanning three splits and a ragged tail."""
    case = make_case(n=3, h=16, v=2 * 16384 + 3001, seed=19, n_seq=2)
    assert_close_to_oracle(case, torch.bfloat16, "triton")


def test_empty_batch():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    e = torch.zeros(0)
    out = sk.fused_logprob_loss(h, w, torch.zeros(0, dtype=torch.long), e, e, e.bool(),
                                sk.LossSpec(loss_agg="token_mean"))
    out.loss.backward()
    assert out.loss.item() == 0 and out.logp.shape == (0,) and (w.grad == 0).all()


# ------------------------------------------------------------------------- no-grad log-prob path


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_match_oracle(small_tiles, backend, dtype):
    case = make_case(seed=15, n=29)
    args = dict(bias=case["bias"], temperature=0.8, return_entropy=True)
    ref_lp, ref_ent = fused_logprobs_reference(case["hidden"], case["weight"], case["targets"], **args)
    cast = {"bias": case["bias"].to(dtype)}
    pt_lp, pt_ent = fused_logprobs_reference(case["hidden"].to(dtype), case["weight"].to(dtype), case["targets"],
                                             **{**args, **cast})
    d = on(case, backend)
    lp, ent = sk.fused_logprobs(d["hidden"].to(dtype), d["weight"].to(dtype), d["targets"], backend=backend,
                                max_chunk_bytes=10 * 1000 * 4, bias=d["bias"].to(dtype), temperature=0.8,
                                return_entropy=True)
    lp, ent = lp.cpu(), ent.cpu()
    assert lp.dtype == torch.float32 and ent.shape == (29,)
    for ours, plain, ref in ((lp, pt_lp, ref_lp), (ent, pt_ent, ref_ent)):
        e_ours, e_plain = (ours.double() - ref).abs().max(), (plain.double() - ref).abs().max()
        assert e_ours <= 2 * e_plain + 2e-6 * ref.abs().max()
    lp2, none = sk.fused_logprobs(case["hidden"].float(), case["weight"].float(), case["targets"])
    assert none is None and lp2.shape == (29,)


# ------------------------------------------------------------------------- errors and plumbing


def test_bad_inputs_are_named():
    case = make_case(seed=16, n=6, v=50)
    h, w = case["hidden"].float(), case["weight"].float()
    args = (case["targets"], case["old_logp"], case["advantages"], case["mask"])
    with pytest.raises(ValueError, match="disagree on H"):
        sk.fused_logprob_loss(h[:, :5], w, *args, seq_ids=case["seq_ids"])
    with pytest.raises(TypeError, match="share one floating dtype"):
        sk.fused_logprob_loss(h.double(), w, *args, seq_ids=case["seq_ids"])
    with pytest.raises(ValueError, match="loss_agg 'mean'"):
        sk.LossSpec(loss_agg="mean")
    with pytest.raises(TypeError, match="spec must be a strive_kernels.LossSpec"):
        sk.fused_logprob_loss(h, w, *args, {"loss_agg": "token_mean"}, seq_ids=case["seq_ids"])
    with pytest.raises(ValueError, match="seq_ids .* is required"):
        sk.fused_logprob_loss(h, w, *args)
    with pytest.raises(ValueError, match="needs ref_logp"):
        sk.fused_logprob_loss(h, w, *args, sk.LossSpec(beta=0.1), seq_ids=case["seq_ids"])
    for field, bad_value in (("temperature", 0.0), ("eps_low", 1.0), ("eps_high", -0.1), ("beta", -1.0)):
        with pytest.raises(ValueError, match=f"{field} must be"):
            sk.LossSpec(**{field: bad_value})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sk.fused_logprobs(h, w, case["targets"], temperature=0.0)
    with pytest.raises(ValueError, match=r"backend must be one of auto\|triton\|native\|reference, got 'cuda'"):
        sk.fused_logprob_loss(h, w, *args, seq_ids=case["seq_ids"], backend="cuda")
    with pytest.raises(ValueError, match="needs normaliser"):
        sk.fused_logprob_loss(h, w, *args, sk.LossSpec(loss_agg="seq_mean_token_sum_norm"), seq_ids=case["seq_ids"])
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        sk.fused_logprob_loss(h, w, *args, seq_ids=case["seq_ids"], normaliser=0)
    bad = case["targets"].clone()
    bad[0] = 50
    with pytest.raises(ValueError, match=r"targets\[0\] = 50 is outside the vocabulary \[0, 50\)"):
        sk.fused_logprob_loss(h, w, bad, *args[1:], seq_ids=case["seq_ids"])
    with pytest.raises(ValueError, match="seq_ids contains 7"):
        sk.fused_logprob_loss(h, w, *args[:2], torch.randn(3), args[3], seq_ids=torch.full((6,), 7))
    with pytest.raises(ValueError, match=r"old_logp must have shape \(6,\)"):
        sk.fused_logprob_loss(h, w, args[0], args[1][:3], *args[2:], seq_ids=case["seq_ids"])


def test_fake_implementation_matches_shapes():
    """The fake (meta) kernels used by torch.compile report the real output shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import strive_kernels.logprob  # noqa: F401  (registers the ops)
    case = make_case(seed=17, n=7, v=40)
    h, w = case["hidden"].float(), case["weight"].float()
    real = torch.ops.strive_kernels.logprobs(h, w, None, case["targets"], 1.0, True, 7, "native")
    with FakeTensorMode() as mode:
        fh, fw = mode.from_tensor(h), mode.from_tensor(w)
        ft = mode.from_tensor(case["targets"])
        fake = torch.ops.strive_kernels.logprobs(fh, fw, None, ft, 1.0, True, 7, "native")
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    # the loss op: settings as (temperature, eps_low, eps_high, beta), the aggregation's index, the gradients wanted
    n = h.shape[0]
    ones = torch.ones(n)
    args = (h, w, None, case["targets"], case["old_logp"], case["advantages"], ones, None, None, None,
            torch.tensor(float(n)), [1.0, 0.2, 0.2, 0.0], 0, True, [True, True, False], 7, "native")
    real = torch.ops.strive_kernels.logprob_loss(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.strive_kernels.logprob_loss(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                       for a in args))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    assert real[4].shape == h.shape and real[5].shape == w.shape and real[6].numel() == 0


def test_kernels_compile_for_sm90():
    """Compile the Triton kernels ahead of time for Hopper (no GPU needed): catches GPU-only compile errors."""
    code = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import strive_kernels.logprob as K
f32 = "*fp32"
sig = {"logits_ptr": "*bf16", "stride_row": "i32", "V": "i32", "inv_temp": "fp32", "m_ptr": f32, "s_ptr": f32,
       "t_ptr": f32, "NSPLIT": "i32"}
loss = {**sig, "zt_ptr": f32, "tok0": "i32", "tgt_ptr": "*i64", "old_ptr": f32, "adv_ptr": f32, "mask_ptr": f32,
        "ref_ptr": f32, "seq_ptr": "*i64", "cnt_ptr": f32, "n_slots": "i32", "denom_ptr": f32, "eps_low": "fp32",
        "eps_high": "fp32", "beta": "fp32", "logp_ptr": f32, "ent_ptr": f32, "loss_ptr": f32, "clip_ptr": f32,
        "k3_ptr": f32}
cases = [
    (K._lse_partials_kernel, {**sig, "tok0": "i32", "tgt_ptr": "*i64", "zt_ptr": f32},
     dict(SPLIT=16384, BLOCK_V=2048, WITH_ENTROPY=True)),
    (K._loss_grad_kernel, loss, dict(SPLIT=16384, BLOCK_V=2048, NSPLIT_P2=16, LOSS_AGG=1, HAS_REF=True,
     PER_SEQ_ADV=True, WITH_ENTROPY=True, COMPUTE_GRAD=True, ROUND_BF16=False)),
    (K._logprob_kernel, {"m_ptr": f32, "s_ptr": f32, "t_ptr": f32, "NSPLIT": "i32", "zt_ptr": f32, "tok0": "i32",
     "tgt_ptr": "*i64", "V": "i32", "logp_ptr": f32, "ent_ptr": f32}, dict(NSPLIT_P2=16, WITH_ENTROPY=True)),
    (K._scale_kernel, {"x_ptr": "*bf16", "g_ptr": f32, "n": "i64"}, dict(BLOCK=4096, ROUND_BF16=False)),
]
for fn, s, c in cases:
    src = ASTSource(fn=fn, signature={**s, **{k: "constexpr" for k in c}}, constexprs=c)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert k.asm["cubin"], fn
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if "No module named" in res.stderr and "nvidia" in res.stderr:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------- GPU (compiled Triton)


@pytest.mark.gpu
@pytest.mark.parametrize("n,h,v", [(300, 256, 50_257), (70, 128, 262_144)], ids=["gpt2V", "V262k"])
def test_gpu_matches_oracle(n, h, v):
    case = {k: (t.cuda() if isinstance(t, torch.Tensor) else t) for k, t in make_case(n=n, h=h, v=v, seed=20).items()}
    assert_close_to_oracle(case, torch.bfloat16, "triton", max_chunk_bytes=128 * v * 2)  # 3 chunks at n = 300
    lp, ent = sk.fused_logprobs(case["hidden"].bfloat16(), case["weight"].bfloat16(), case["targets"],
                                bias=case["bias"].bfloat16(), return_entropy=True)
    ref_lp, _ = fused_logprobs_reference(case["hidden"], case["weight"], case["targets"], bias=case["bias"])
    assert (lp.double() - ref_lp).abs().max() < 0.1


@pytest.mark.gpu
def test_gpu_no_recompile_across_token_counts():
    """Compiled variants per kernel after a first call stay the same when token count, number of sequences
    and chunking change (each new variant would be a compile inside a training step)."""
    from strive_kernels import logprob as lt
    kernels = (lt._lse_partials_kernel, lt._loss_grad_kernel, lt._logprob_kernel)
    dev = torch.cuda.current_device()

    def call(n, n_seq, rows):
        case = {k: t.cuda() for k, t in make_case(n=n, h=64, v=5000, n_seq=n_seq, seed=n).items()}
        run(case, torch.bfloat16, "triton", with_ref=False, max_chunk_bytes=rows * 5000 * 2)
        sk.fused_logprobs(case["hidden"].bfloat16(), case["weight"].bfloat16(), case["targets"], return_entropy=True,
                          max_chunk_bytes=rows * 5000 * 2)

    call(300, 8, 128)
    before = [len(k.device_caches[dev][0]) for k in kernels]
    for n, n_seq, rows in ((301, 1, 128), (77, 3, 64), (512, 16, 100), (1000, 33, 256)):
        call(n, n_seq, rows)
    assert [len(k.device_caches[dev][0]) for k in kernels] == before


@pytest.mark.gpu
def test_gpu_extra_memory_is_gradients_plus_one_chunk():
    n, h, v = 2048, 1024, 65_536
    torch.manual_seed(0)
    hid = (torch.randn(n, h, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.03).requires_grad_()
    tgt = torch.randint(0, v, (n,), device="cuda")
    old = torch.full((n,), -11.0, device="cuda")
    adv = torch.randn(n, device="cuda")
    mask = torch.ones(n, dtype=torch.bool, device="cuda")
    budget = 256 * v * 2
    spec = sk.LossSpec(loss_agg="token_mean")
    sk.fused_logprob_loss(hid, w, tgt, old, adv, mask, spec, max_chunk_bytes=budget).loss.backward()
    hid.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sk.fused_logprob_loss(hid, w, tgt, old, adv, mask, spec, max_chunk_bytes=budget).loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (v * h + n * h) * 2
    assert extra <= grads + budget + 8 * 2**20, (extra - grads) / 2**20  # no copy of grad_weight


@pytest.mark.parametrize("order", ["loss_first", "other_first", "together"])
def test_weight_used_twice_accumulates(order):
    """Tied lm_head/embedding: the adopted grad_weight and another use's gradient add up, in any order."""
    case = make_case(seed=21, n=7)
    args = (case["targets"], case["old_logp"], case["advantages"], case["mask"])
    hid = case["hidden"].double()

    def loss(w):
        return sk.fused_logprob_loss(hid, w, *args, seq_ids=case["seq_ids"]).loss

    def other(w):
        return (w[:3] ** 2).sum() * 0.5  # gradient: w on rows 0..2, 0 elsewhere

    w = case["weight"].double().requires_grad_()
    loss(w).backward()
    alone = w.grad.clone()                # the fused op's gradient on its own
    w.grad = None
    if order == "other_first":
        other(w).backward()
        loss(w).backward()
    elif order == "loss_first":
        loss(w).backward()
        other(w).backward()
    else:
        (loss(w) + other(w)).backward()
    expect = alone.clone()
    expect[:3] += w.detach()[:3]
    torch.testing.assert_close(w.grad, expect, rtol=0, atol=0)


def test_nograd_backend_by_vocabulary_size():
    """auto picks the torch twin for no-grad log-probs below SMALL_VOCAB_NOGRAD on CUDA (measured slower there),
    the fused kernel above it; an explicit backend, the loss and the CPU are untouched by the rule."""
    from strive_kernels._backend import SMALL_VOCAB_NOGRAD

    cuda = torch.device("cuda")
    assert sk.resolve("fused_logprobs", "auto", cuda, vocab=1028) == "reference"
    assert sk.resolve("fused_logprobs", "auto", cuda, vocab=SMALL_VOCAB_NOGRAD - 1) == "reference"
    assert sk.resolve("fused_logprobs", "auto", cuda, vocab=SMALL_VOCAB_NOGRAD) == "triton"
    assert sk.resolve("fused_logprobs", "auto", cuda, vocab=152064) == "triton"
    assert sk.resolve("fused_logprobs", "triton", cuda, vocab=1028) == "triton"
    assert sk.resolve("fused_logprob_loss", "auto", cuda) == "triton"
    assert sk.resolve("fused_logprobs", "auto", torch.device("cpu"), vocab=1028) == "native"
