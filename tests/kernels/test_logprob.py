"""strive_kernels.fused_logprob_loss / fused_logprobs against the fp64 autograd reference.

Error rule (flash-attention's): |ours - fp64 reference| <= 2 * |plain PyTorch - fp64 reference| + a noise
floor of 2e-6 of the output's scale (~16 fp32 ulps: plain PyTorch's error on a single token can be 0 by
luck), where plain PyTorch is the reference twin run at the inputs' precision in one chunk (materialised
logits, fp32 log_softmax, autograd gradients).
On CPU the Triton pass runs under TRITON_INTERPRET=1 (conftest) with small tiles, so shapes stay tiny.
"""
import pytest
import torch

import strive_kernels as sk
from strive_engine.algorithms import PRESETS
from strive_kernels.reference import fused_logprobs_reference

from logprob_cases import BIG, assert_close_to_oracle, make_case, on, run, small_tiles  # noqa: F401  (fixture)


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
