"""One copy of each prompt per forward (strive_engine.prompt_sharing): the layout, the block mask, and the policy's
hidden states and gradients against the forward with one row per completion, on the real HF model classes."""
import copy
import types

import pytest
import torch

from strive_engine.loss import LossSpec, policy_loss
from strive_engine.policy import Policy, PolicyInputs
from strive_engine.prompt_sharing import block_mask, prompt_groups
from test_decode import _prompts, _requests, tiny  # noqa: F401  (tiny: a fixture)
from test_rollout import _tiny_other

LENGTHS = [[5, 2, 7], [3, 3, 1], [6, 4, 2]]  # completion tokens of request r's G=3 rows
ORDER = [4, 0, 8, 2, 9, 6, 1, 5, 3, 7]       # rows of one prompt are not adjacent; row 9 is a prompt-only row


@pytest.fixture(scope="module")
def tok_and_base(tiny):
    """test_decode's tiny Qwen2.5-VL (the tests deep-copy it before changing it) and its tokenizer."""
    pol, tok = tiny
    return tok, pol.hf


def _model(kind, tok_and_base):
    tok, base = tok_and_base
    return copy.deepcopy(base) if kind == "qwen2_5_vl" else _tiny_other(kind, tok).hf


def rollout_batch(pol, tok, kind, seed=0) -> PolicyInputs:
    """Three requests (prompts of different lengths, left-padded) x G=3 completions of different lengths (right-
    padded), rows shuffled, plus a row holding request 0's prompt and no completion."""
    p = _prompts(pol, tok, _requests(kind, seed=seed))
    g = torch.Generator().manual_seed(seed)
    R, Lp = p.input_ids.shape
    T = max(map(max, LENGTHS))
    ids = torch.full((R * 3 + 1, Lp + T), int(p.input_ids[0, 0]))
    am, cm = torch.zeros_like(ids), torch.zeros_like(ids)
    for r in range(R):
        for k, n in enumerate(LENGTHS[r]):
            m = 3 * r + k
            ids[m, :Lp], am[m, :Lp] = p.input_ids[r], p.attention_mask[r]
            ids[m, Lp:Lp + n] = torch.randint(10, 400, (n,), generator=g)
            am[m, Lp:Lp + n] = 1
            cm[m, Lp:Lp + n] = 1
    ids[-1, :Lp], am[-1, :Lp] = p.input_ids[0], p.attention_mask[0]
    vi = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    order = torch.tensor(ORDER)
    return PolicyInputs(ids[order], am[order], cm[order], p.pixel_values_videos, p.video_grid_thw,
                        p.second_per_grid_ts, vi[order])


def test_layout_puts_each_prompt_once_and_every_predictor_on_its_token(tok_and_base):
    tok, model = tok_and_base
    x = rollout_batch(Policy(model), tok, "qwen2_5_vl")
    gr = prompt_groups(x.input_ids, x.attention_mask, x.completion_mask, x.video_index)
    assert gr.num_groups == 3 and gr.first_row.tolist() == [0, 1, 2]   # first rows of requests 1, 0, 2 (ORDER)
    assert gr.video.tolist() == [1, 0, 2]
    prompt_len = [int(x.attention_mask[m].sum()) - int(x.completion_mask[m].sum()) for m in (0, 1, 2)]
    assert gr.tokens == sum(prompt_len) + int(x.completion_mask.sum())    # each prompt once, every completion
    assert gr.tokens < int(x.attention_mask.sum())
    L = x.input_ids.shape[1]
    flat = x.input_ids.reshape(-1)
    # every scored token's predictor holds the token before it in its row (same id), and sits in the prompt
    # (segment 0) exactly when that token is the row's last prompt token
    rows, cols = x.completion_mask[:, 1:].nonzero(as_tuple=True)        # row-major, as targets()
    assert len(gr.predictor) == len(rows)
    src = gr.src.reshape(-1)[gr.predictor]
    assert torch.equal(flat[src], x.input_ids[rows, cols])
    seg = gr.segment.reshape(-1)[gr.predictor]
    first_completion = x.completion_mask[rows, cols] == 0
    assert torch.equal(seg == 0, first_completion)
    assert bool((src[~first_completion] == rows[~first_completion] * L + cols[~first_completion]).all())
    # one prompt per group, its completions in segments 1..G, padding last
    for u in range(3):
        s = gr.segment[u][gr.valid[u]]
        assert bool((s[1:] >= s[:-1]).all()) and int(s[0]) == 0
    # nothing shared: no layout
    one = x.select([0, 1, 2])
    assert prompt_groups(one.input_ids, one.attention_mask, one.completion_mask, one.video_index) is None


def test_block_mask_is_prompt_causal_plus_own_completion():
    """Against its definition, slot by slot, on a layout with two groups of different lengths."""
    ids = torch.tensor([[7, 8, 9, 1, 2, 0], [7, 8, 9, 3, 0, 0], [5, 6, 4, 4, 4, 0], [5, 6, 3, 0, 0, 0]])
    am = (torch.arange(6)[None] < torch.tensor([5, 4, 5, 3])[:, None]).long()
    cm = am.clone()
    cm[:, :3] = 0
    cm[2:, 2] = 1
    gr = prompt_groups(ids, am, cm, torch.zeros(4, dtype=torch.long))
    mask = block_mask(gr, torch.float64, torch.device("cpu"))[:, 0]
    U, Lg = gr.segment.shape
    for u in range(U):
        for i in range(Lg):
            for j in range(Lg):
                si, sj, vi, vj = int(gr.segment[u, i]), int(gr.segment[u, j]), bool(gr.valid[u, i]), bool(gr.valid[u, j])
                ok = (vi and vj and j <= i and (sj == 0 or sj == si)) or (not vi and i == j)
                assert (mask[u, i, j] == 0) == ok, (u, i, j)


def _norms_in_input_dtype(model):
    """HF's RMSNorms compute in fp32 whatever the model's dtype: a prompt's summed gradient is then rounded to
    fp32 once where the per-row forward rounds each row's, a 1e-8 difference that is HF's, not the layout's. In
    the model's own dtype the two forwards must agree to fp64 rounding."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    n = 0
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = types.MethodType(forward, mod)
            n += 1
    assert n >= 5


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_shared_prompts_equal_one_row_per_completion_fp64(tok_and_base, kind):
    """Hidden states of the scored tokens and the gradients of every parameter (vision tower included) equal the
    per-row forward's to fp64 rounding; Qwen3-VL's deepstack features enter each prompt copy once."""
    tok, _ = tok_and_base
    model = _model(kind, tok_and_base).double()
    _norms_in_input_dtype(model)
    x = rollout_batch(Policy(model), tok, kind)
    x.pixel_values_videos = x.pixel_values_videos.double()
    r = None
    out = {}
    for share in (False, True):
        pol = Policy(model, share_prompts=share)
        assert pol.share_prompts == share
        model.zero_grad(set_to_none=True)
        h = pol(x, lambda h, w, b: h)
        if r is None:
            r = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)
        (h * r).sum().backward()
        out[share] = h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (h0, g0), (h1, g1) = out[False], out[True]
    assert h1.shape == (int(x.completion_mask[:, 1:].sum()), h1.shape[1])
    torch.testing.assert_close(h1, h0, rtol=1e-12, atol=1e-12)
    assert set(g0) == set(g1) and any(n.startswith("model.visual") for n in g0)
    for n in g0:
        assert float((g1[n] - g0[n]).norm()) <= 1e-12 * float(g0[n].norm()) + 1e-300, n


def test_shared_prompt_loss_within_fp32_error(tok_and_base):
    """The update's loss (strive_kernels.fused_logprob_loss through policy_loss) in fp32 with HF's own norms:
    loss and gradients differ from fp64 by no more than the per-row forward's fp32 error does (x4)."""
    tok, base = tok_and_base
    x = rollout_batch(Policy(base), tok, "qwen2_5_vl", seed=1)
    targets = x.targets()
    N = len(targets)
    g = torch.Generator().manual_seed(2)
    old, adv = -5 + torch.rand(N, generator=g), torch.randn(N, generator=g)
    seq = torch.repeat_interleave(torch.arange(x.num_rows), x.completion_mask[:, 1:].sum(1))

    def run(model, share):
        model.zero_grad(set_to_none=True)
        xx = copy.copy(x)
        xx.pixel_values_videos = x.pixel_values_videos.to(next(model.parameters()).dtype)
        loss, _ = Policy(model, share_prompts=share)(xx, lambda h, w, b: policy_loss(
            h, w, targets, old.to(h.dtype), adv.to(h.dtype), torch.ones(N, dtype=h.dtype), LossSpec(max_new_tokens=8), float(N),
            seq_ids=seq, bias=b))
        loss.backward()
        return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    l64, g64 = run(copy.deepcopy(base).double(), False)
    m32 = copy.deepcopy(base)
    (l_row, g_row), (l_shared, g_shared) = run(m32, False), run(m32, True)
    err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert abs(float(l_shared - l64)) <= 4 * max(abs(float(l_row - l64)), 1e-7) * max(1.0, abs(float(l64)))
    for n in g64:
        assert err(g_shared[n], g64[n]) <= 4 * max(err(g_row[n], g64[n]), 1e-6), n


def test_flash_attention_takes_one_row_per_completion(tok_and_base):
    _, base = tok_and_base
    model = copy.deepcopy(base)
    model.config._attn_implementation = "flash_attention_2"  # no forward runs: flash-attn need not be installed
    assert Policy(model).share_prompts is False
    assert Policy(base).share_prompts is True and Policy(base, share_prompts=False).share_prompts is False


@pytest.mark.gpu
def test_shared_prompts_on_cuda_bf16_within_the_rows_error(tok_and_base):
    """On CUDA in bf16 (the training dtype; SDPA's masked kernels with an additive bias, rows padded to 16 keys):
    hidden states and gradients of the shared layout are as close to fp32 as the per-row bf16 forward's are."""
    tok, base = tok_and_base
    x = rollout_batch(Policy(base), tok, "qwen2_5_vl", seed=2).to("cuda")

    def run(dtype, share):
        model = copy.deepcopy(base).to("cuda", dtype)
        xx = copy.copy(x)
        xx.pixel_values_videos = x.pixel_values_videos.to(dtype)
        h = Policy(model, share_prompts=share)(xx, lambda h, w, b: h)
        r = torch.randn(h.shape, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)
        (h * r).sum().backward()
        return h.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    h32, g32 = run(torch.float32, False)
    (h_row, g_row), (h_sh, g_sh) = run(torch.bfloat16, False), run(torch.bfloat16, True)
    err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert err(h_sh, h32) <= 4 * max(err(h_row, h32), 1e-3)
    for n in g32:
        assert err(g_sh[n], g32[n]) <= 4 * max(err(g_row[n], g32[n]), 1e-3), n
