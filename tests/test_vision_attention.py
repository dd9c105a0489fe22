"""The vision tower's attention batched by segment length (strive_engine.vision_attention) against transformers' own
per-segment loop, on the real HF vision towers of Qwen2-VL, Qwen2.5-VL (windows of several sizes) and Qwen3-VL."""
import copy

import pytest
import torch
import torch.nn.functional as F

from strive_engine import vision_attention as va
from strive_engine.config import ModelConfig

transformers = pytest.importorskip("transformers")

# (t, h, w) in patches: Qwen2.5-VL's 8-patch windows come out 8, 4 and 2 patches wide at these edges
GRIDS = torch.tensor([[2, 10, 18], [4, 6, 8], [2, 20, 4]])


def _tower(kind: str):
    """A real HF vision tower at tiny width, random weights large enough that attention is far from uniform."""
    if kind == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
        cfg = transformers.Qwen2_5_VLConfig(vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48, window_size=112,
            fullatt_block_indexes=[1])).vision_config
        cls, patch = m.Qwen2_5_VisionTransformerPretrainedModel, 14
    elif kind == "qwen2_vl":
        from transformers.models.qwen2_vl import modeling_qwen2_vl as m
        cfg = transformers.Qwen2VLConfig(vision_config=dict(
            depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2)).vision_config
        cls, patch = m.Qwen2VisionTransformerPretrainedModel, 14
    else:
        m = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
        cfg = transformers.Qwen3VLConfig(vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48, num_position_embeddings=64,
            deepstack_visual_indexes=[0], patch_size=16)).vision_config
        cls, patch = m.Qwen3VLVisionModel, 16
    torch.manual_seed(0)
    tower = cls._from_config(cfg, attn_implementation="sdpa").eval()
    for p in tower.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return tower, 3 * 2 * patch * patch


def _out(tower, x):
    o = tower(x, grid_thw=GRIDS.to(x.device))
    parts = [o] if torch.is_tensor(o) else [t for t in (o.last_hidden_state, getattr(o, "pooler_output", None))
                                             if torch.is_tensor(t)]
    return torch.cat([p.reshape(-1) for p in parts])


def _fwd_bwd(tower, x, w):
    x = x.clone().requires_grad_(True)
    y = _out(tower, x)
    (y * w).sum().backward()
    qkv = [m.qkv.weight.grad.reshape(-1) for m in tower.modules() if hasattr(m, "qkv")]
    return y.detach(), x.grad, torch.cat(qkv)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_segmented_equals_the_hf_loop_forward_and_backward(kind):
    """Forward and backward (input and qkv-weight gradients) against an fp64 run of transformers' loop: the
    segmented fp32 error is within 2x the loop's own fp32 error (both far below 1e-3 here)."""
    hf, d = _tower(kind)
    ref64 = copy.deepcopy(hf).double()
    seg = copy.deepcopy(hf)
    assert va.install(seg) == sum(1 for m in hf.modules() if type(m).__name__ in va.SUPPORTED) > 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(int(GRIDS.prod(1).sum()), d, generator=g)
    w = torch.randn(_out(hf, x).shape, generator=g)
    ref = _fwd_bwd(ref64, x.double(), w.double())
    loop = _fwd_bwd(hf, x, w)
    ours = _fwd_bwd(seg, x, w)
    for name, r, a, b in zip(("output", "d input", "d qkv"), ref, loop, ours):
        err_loop = (a.double() - r).abs().max().item()
        err_ours = (b.double() - r).abs().max().item()
        assert err_ours <= 2 * err_loop + 1e-12, (name, err_ours, err_loop)
        assert err_ours < 1e-3 * r.abs().max().item(), name


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_one_attention_call_per_block_and_segment_length(kind, monkeypatch):
    """transformers' loop makes one SDPA call per segment; the segmented forward one per (block, distinct length),
    counted from the loop's own calls."""
    tower, d = _tower(kind)
    x = torch.randn(int(GRIDS.prod(1).sum()), d)
    block = [None]
    for i, m in enumerate(m for m in tower.modules() if type(m).__name__ in va.SUPPORTED):
        m.register_forward_pre_hook(lambda mod, args, i=i: block.__setitem__(0, i))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *a, **k):
        calls.append((block[0], q.shape[-2]))
        return sdpa(q, *a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        _out(tower, x)
        loop_calls = list(calls)
        calls.clear()
        va.install(tower)
        _out(tower, x)
    assert len(calls) == len(set(loop_calls)) < len(loop_calls)
    assert set(calls) == set(loop_calls)


def _loop_reference(q, k, v, cu, scale):
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            s = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * scale
            out[a:b] = torch.einsum("hij,jhd->ihd", s.softmax(-1), v[a:b])
    return out


@pytest.mark.parametrize("lengths", [[5, 3, 5, 0, 7, 3, 5], [4, 4, 4], [1], [6, 2, 2, 6, 1], [0, 0], []])
def test_segment_attention_against_a_loop_in_fp64(lengths, monkeypatch):
    """Unordered lengths, empty segments, single tokens; and the per-call score budget split into several calls."""
    cu = torch.tensor([0] + lengths).cumsum(0)
    g = torch.Generator().manual_seed(len(lengths))
    q, k, v = (torch.randn(int(cu[-1]), 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = _loop_reference(q, k, v, cu, 0.3)
    torch.testing.assert_close(va.segment_attention(q, k, v, cu, 0.3), ref, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(va, "SCORE_BUDGET", 1)  # one segment per call
    monkeypatch.setattr(va, "_PLANS", {})
    torch.testing.assert_close(va.segment_attention(q, k, v, cu.clone(), 0.3), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("one_segment_per_call", [False, True])
def test_segment_attention_backward_equals_the_loop_and_slices_nothing(one_segment_per_call, monkeypatch):
    """Gradients of q, k, v equal the loop's (fp64) with several lengths, and with several calls per length; the
    groups and calls are split, not sliced: no SliceBackward in the graph (each slice's backward zero-fills a
    full-size gradient, copies into it, and the pieces' gradients are then summed)."""
    lengths = [5, 3, 5, 0, 7, 3, 5]
    cu = torch.tensor([0] + lengths).cumsum(0)
    if one_segment_per_call:
        monkeypatch.setattr(va, "SCORE_BUDGET", 1)
    monkeypatch.setattr(va, "_PLANS", {})
    g = torch.Generator().manual_seed(3)
    leaves = [torch.randn(int(cu[-1]), 3, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.randn(int(cu[-1]), 3, 8, generator=g, dtype=torch.float64)
    grads = []
    for fn in (va.segment_attention, _loop_reference):
        qkv = [t.clone().requires_grad_() for t in leaves]
        out = fn(*qkv, cu, 0.3)
        if fn is va.segment_attention:
            kinds, todo, seen = set(), [out.grad_fn], set()
            while todo:
                node = todo.pop()
                if node is not None and node not in seen:
                    seen.add(node)
                    kinds.add(type(node).__name__)
                    todo += [f for f, _ in node.next_functions]
            assert "SliceBackward0" not in kinds and "SplitWithSizesBackward0" in kinds, kinds
        grads.append(torch.autograd.grad((out * w).sum(), qkv))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_cu_seqlens_are_named():
    q = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="covers 5 tokens but the sequence has 6"):
        va.segment_attention(q, q, q, torch.tensor([0, 2, 5]), 1.0)
    with pytest.raises(ValueError, match="must start at 0"):
        va.segment_attention(q, q, q, torch.tensor([1, 6]), 1.0)
    with pytest.raises(ValueError, match="not decrease"):
        va.segment_attention(q, q, q, torch.tensor([0, 4, 3, 6]), 1.0)


@pytest.mark.parametrize("choice,attn,segmented", [("segmented", "sdpa", True), ("hf", "sdpa", False),
                                                   ("segmented", "eager", False)])
def test_build_model_installs_it_under_sdpa_only(tmp_path, choice, attn, segmented):
    from strive_engine.model import build_model

    cfg = ModelConfig(tokenizer_dir=str(tmp_path / "tok"), vision_attention=choice, attn_implementation=attn)
    model, _ = build_model(cfg, "cpu")
    names = {type(m).__name__ for m in model.model.visual.modules() if "Attention" in type(m).__name__}
    assert names == ({"SegmentedQwen2_5_VLVisionAttention"} if segmented else {"Qwen2_5_VLVisionAttention"})
    if segmented:
        assert va.uninstall(model) == cfg.tiny_vision_depth
        assert {type(m).__name__ for m in model.model.visual.modules() if "Attention" in type(m).__name__} == \
            {"Qwen2_5_VLVisionAttention"}


def test_bad_choice_is_refused():
    from strive_engine.config import ConfigError

    with pytest.raises(ConfigError, match="model.vision_attention"):
        ModelConfig(vision_attention="windowed")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_segmented_on_cuda_in_bf16_is_as_close_as_the_loop(kind):
    """On CUDA in bf16 (the kernels SDPA picks may differ between one batched call and many small ones): the
    segmented error against an fp64 CPU run stays within 2x the loop's, forward and backward."""
    hf, d = _tower(kind)
    ref64 = copy.deepcopy(hf).double()
    loop = copy.deepcopy(hf).to("cuda", torch.bfloat16)
    seg = copy.deepcopy(loop)
    va.install(seg)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(int(GRIDS.prod(1).sum()), d, generator=g)
    w = torch.randn(_out(hf, x).shape, generator=g)
    ref = _fwd_bwd(ref64, x.double(), w.double())
    a = _fwd_bwd(loop, x.to("cuda", torch.bfloat16), w.to("cuda", torch.bfloat16))
    b = _fwd_bwd(seg, x.to("cuda", torch.bfloat16), w.to("cuda", torch.bfloat16))
    for name, r, ta, tb in zip(("output", "d input", "d qkv"), ref, a, b):
        err_loop = (ta.double().cpu() - r).abs().max().item()
        err_ours = (tb.double().cpu() - r).abs().max().item()
        assert err_ours <= 2 * err_loop + 1e-3 * r.abs().max().item(), (name, err_ours, err_loop)
