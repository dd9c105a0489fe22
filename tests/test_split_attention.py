"""The shared layout's attention as two causal calls (strive_engine.split_attention): the same outputs and gradients
as the block-masked attention, from a softmax written out in fp64, for random layouts; through the real HF models
the same hidden states and parameter gradients as the one masked call."""
import copy

import pytest
import torch

from strive_engine import split_attention as sa
from strive_engine.policy import Policy
from test_decode import tiny  # noqa: F401  (tiny: a fixture)
from test_prompt_sharing import _model, rollout_batch, tok_and_base  # noqa: F401  (tok_and_base: a fixture)


def _layout(g, U, uniform):
    """segment (U, Lg): a prompt of random length, 1-5 answers of 1-9 tokens, padding to a multiple of 8."""
    rows, P0 = [], int(torch.randint(3, 12, (1,), generator=g))
    for _ in range(U):
        p = P0 if uniform else int(torch.randint(1, 14, (1,), generator=g))
        seg = [0] * p
        for k in range(1, int(torch.randint(1, 6, (1,), generator=g)) + 1):
            seg += [k] * int(torch.randint(1, 10, (1,), generator=g))
        rows.append(seg)
    Lg = -(-max(map(len, rows)) // 8) * 8
    return torch.tensor([r + [-1] * (Lg - len(r)) for r in rows])


def _reference(segment, q, k, v, scale):
    """The block mask's attention, softmax written out in fp64 (padding queries: zeros)."""
    s, i = segment[:, :, None], segment[:, None, :]
    pos = torch.arange(segment.shape[1])
    causal = pos[None, :, None] >= pos[None, None, :]
    allowed = (i >= 0) & (s >= 0) & (((i == 0) & ((s > 0) | causal)) | ((i == s) & causal))      # (U, Lg, Lg)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2), segment >= 0                                         # (U, Lg, Hq, D)


@pytest.mark.parametrize("grouped", [None, True])
@pytest.mark.parametrize("seed,U,uniform", [(0, 1, True), (1, 3, False), (2, 2, True), (3, 4, False), (4, 1, False)])
def test_split_attention_equals_the_block_mask_forward_and_backward(seed, U, uniform, grouped):
    """grouped=True: the K/V heads passed grouped (enable_gqa), as on CUDA where flash takes them; None: as this
    device decides (repeated on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    segment = _layout(g, U, uniform)
    Lg, Hq, Hkv, D = segment.shape[1], 4, 2, 8
    q, k, v = (torch.randn(U, h, Lg, D, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (Hq, Hkv, Hkv))
    layout = sa.split_layout(segment, torch.device("cpu"))
    assert (layout.mask is None) == bool(((segment == 0).sum(1) == (segment == 0).sum(1).max()).all())
    out = sa.split_attention(layout, q, k, v, 0.37, grouped=grouped)
    ref, valid = _reference(segment, q, k, v, 0.37)
    assert torch.allclose(out[valid], ref[valid], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))                      # padding: zeros
    w = torch.randn(out[valid].shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out[valid] * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref[valid] * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)


def test_no_answer_means_no_split():
    assert sa.split_layout(torch.tensor([[0, 0, 0, -1]]), torch.device("cpu")) is None


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_policy_hidden_states_and_gradients_equal_the_masked_call(kind, tok_and_base, monkeypatch):
    """Through the real HF models in fp64: every layer's attention takes the split path (counted), and the loss
    and every parameter's gradient equal those of the one masked call."""
    tok, _ = tok_and_base
    base = _model(kind, tok_and_base).double()
    calls = []
    real = sa.split_attention
    monkeypatch.setattr(sa, "split_attention", lambda *a: calls.append(1) or real(*a))
    results = []
    for mode in ("split", "masked"):
        model = copy.deepcopy(base)
        pol = Policy(model, shared_attention=mode)
        assert pol.shared_attention == mode
        x = rollout_batch(pol, tok, kind)
        x = type(x)(**{**x.__dict__, "pixel_values_videos": x.pixel_values_videos.double()})
        targets = x.targets()
        weights = torch.linspace(-1, 1, len(targets), dtype=torch.float64)

        def head(h, w, b):  # weighted log-probs of the scored tokens: every predictor and the head get a gradient
            return ((h @ w.t()).log_softmax(-1).gather(-1, targets[:, None])[:, 0] * weights).sum()

        loss = pol(x, head)
        loss.backward()
        results.append((loss.detach(), {nm: p.grad.clone() for nm, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == model.config.get_text_config().num_hidden_layers          # the split path, every layer
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-12, atol=0)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for nm in g1:
        assert torch.allclose(g1[nm], g2[nm], rtol=1e-9, atol=1e-13), nm


def test_auto_splits_by_the_pairs_it_saves():
    """auto: the gpu_3b layout (one prompt of 2,320 tokens + 8 answers of 256) splits, gpu_small's (4 prompts of
    ~164 + 8 answers of 64) keeps the one masked call; split / masked are unconditional."""
    def segment(prompts, G, n):
        rows = [[0] * p + [k for k in range(1, G + 1) for _ in range(n)] for p in prompts]
        Lg = -(-max(map(len, rows)) // 16) * 16
        return torch.tensor([r + [-1] * (Lg - len(r)) for r in rows])

    cpu = torch.device("cpu")
    big, small = segment([2320], 8, 256), segment([160, 164, 170, 158], 8, 64)
    lay = sa.choose(big, "auto", cpu)
    assert lay is not None and lay.mask is None and lay.saved_pairs > sa.MIN_SAVED_PAIRS
    assert lay.saved_pairs == 4368 ** 2 - (2320 * 2321 // 2 + 8 * 256 * 2576) == sa.saved_pairs(big)
    assert sa.saved_pairs(small) == sa.split_layout(small, cpu).saved_pairs
    assert sa.choose(small, "auto", cpu) is None and sa.split_layout(small, cpu).saved_pairs < sa.MIN_SAVED_PAIRS
    assert sa.choose(small, "split", cpu).mask is not None                 # prompts of different lengths
    assert sa.choose(big, "masked", cpu) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prompts", [[300], [300, 257, 280]])
def test_cuda_bf16_split_attention_is_as_accurate_as_the_masked_call(prompts):
    """On the GPU's kernels (flash / lower-right causal for one prompt length, the boolean mask otherwise), bf16,
    the 3B model's heads (16 / 2, head dim 128): outputs and gradients within 4x the masked SDPA call's own bf16
    error, both against the fp64 softmax."""
    g = torch.Generator().manual_seed(0)
    rows = [[0] * p + [k for k in range(1, 5) for _ in range(int(torch.randint(40, 70, (1,), generator=g)))]
            for p in prompts]
    Lg = -(-max(map(len, rows)) // 16) * 16
    segment = torch.tensor([r + [-1] * (Lg - len(r)) for r in rows])
    U, dev = len(prompts), torch.device("cuda")
    q64, k64, v64 = (torch.randn(U, h, Lg, 128, generator=g, dtype=torch.float64) for h in (16, 2, 2))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q64, k64, v64))
    ref, valid = _reference(segment, qs, ks, vs, 128 ** -0.5)
    w = torch.randn(ref[valid].shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref[valid] * w).sum(), (qs, ks, vs))
    layout = sa.split_layout(segment, dev)
    assert (layout.mask is None) == (len(set(prompts)) == 1)
    s, i = segment[:, :, None], segment[:, None, :]
    pos = torch.arange(Lg)
    causal = pos[None, :, None] >= pos[None, None, :]
    allowed = (i >= 0) & (s >= 0) & (((i == 0) & ((s > 0) | causal)) | ((i == s) & causal))
    mask = (allowed | torch.eye(Lg, dtype=torch.bool))[:, None].to(dev)     # padding rows: themselves (finite)

    def run(split, grouped=None):
        q, k, v = (t.to(dev, torch.bfloat16).detach().requires_grad_() for t in (q64, k64, v64))
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if split:
                out = sa.split_attention(layout, q, k, v, 128 ** -0.5, grouped=grouped)
            else:
                kk, vv = k.repeat_interleave(8, 1), v.repeat_interleave(8, 1)
                out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(1, 2)
        grads = torch.autograd.grad((out[valid.to(dev)].double() * w.to(dev)).sum(), (q, k, v))
        return out[valid.to(dev)].double().cpu(), [x.double().cpu() for x in grads], sum(saved)

    (o_s, g_s, kept_s), (o_m, g_m, _) = run(True), run(False)
    err = lambda a, b: float((a - b).abs().max())  # noqa: E731
    assert err(o_s, ref[valid]) <= 4 * err(o_m, ref[valid]) + 1e-6
    for a, b, r in zip(g_s, g_m, ref_grads):
        assert err(a, r) <= 4 * err(b, r) + 1e-6
    # the K/V heads stay grouped (flash takes them: sm80+, bf16, head dim 128) where no boolean mask is needed; the
    # repeated ones keep more for backward, with the same results
    q, k = (torch.empty(1, h, 4, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for h in (16, 2))
    assert sa.flash_takes_grouped_heads(q, k, k, False) == (torch.cuda.get_device_capability() >= (8, 0))
    if layout.mask is None and sa.flash_takes_grouped_heads(q, k, k, False):
        o_r, g_r, kept_r = run(True, grouped=False)
        assert kept_s < kept_r
        assert err(o_r, ref[valid]) <= 4 * err(o_m, ref[valid]) + 1e-6
