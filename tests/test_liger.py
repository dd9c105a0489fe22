"""liger-kernel's patches (strive_engine.model.apply_liger): on CUDA the patched model computes what the plain one
does; the patch stays on the instance, so models built afterwards in the process are transformers' own."""
import contextlib
import copy
import importlib.util
import sys

import pytest
import torch

from strive_engine.config import ModelConfig
from strive_engine.model import apply_liger, build_model
from strive_engine.policy import Policy
from test_model import SPECS, TINY, make_batch


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok") / "tokenizer")


@contextlib.contextmanager
def restored_transformers_modules():
    """Whatever liger leaves in transformers' Qwen modules (e.g. its mRoPE function, which transformers 5.x no
    longer calls) is undone afterwards, so later tests in this process see transformers as imported."""
    mods = [m for name, m in list(sys.modules.items()) if name.startswith("transformers.models.qwen")]
    saved = [(m, dict(vars(m))) for m in mods]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in set(vars(m)) - set(attrs):
                delattr(m, k)
            for k, v in attrs.items():
                setattr(m, k, v)


def test_the_patch_stays_on_the_instance(tok_dir):
    """A model patched by liger runs liger's RMSNorm / SwiGLU forwards; a model built after it in the same process
    is built from transformers' own classes (liger rebinds them in the family's module: on a GPU machine a later
    CPU model then ran liger's Triton kernels on CPU tensors and failed). Patched here on the CPU (no kernel runs)."""
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel not installed")
    torch.manual_seed(0)
    first, _ = build_model(ModelConfig(tokenizer_dir=tok_dir, liger=False, **TINY), "cpu")
    family = sys.modules[type(first).__module__]
    before = {k: v for k, v in vars(family).items() if isinstance(v, type)}
    norm_cls, mlp_cls = type(first.model.language_model.norm), type(first.model.language_model.layers[0].mlp)
    with restored_transformers_modules():
        assert apply_liger(first, "cuda") is True                      # the device only gates it; nothing runs
        assert first.model.language_model.norm._get_name() == "LigerRMSNorm"
        assert first.model.language_model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
        assert {k: v for k, v in vars(family).items() if isinstance(v, type)} == before
        second, _ = build_model(ModelConfig(tokenizer_dir=tok_dir, liger=False, **TINY), "cpu")
        assert type(second.model.language_model.norm) is norm_cls
        assert type(second.model.language_model.layers[0].mlp) is mlp_cls
        assert second.model.language_model.norm._get_name() == norm_cls.__name__


@pytest.mark.gpu
def test_cuda_defaults_bf16_sdpa_and_liger_matches_plain(tok_dir):
    torch.manual_seed(5)
    auto, _ = build_model(ModelConfig(tokenizer_dir=tok_dir, liger=False, **TINY), "cuda")
    assert next(auto.parameters()).dtype == torch.bfloat16  # dtype auto = bf16 on CUDA
    plain, _ = build_model(ModelConfig(tokenizer_dir=tok_dir, dtype="float32", liger=False, **TINY), "cuda")
    inp, _ = make_batch(plain, SPECS)
    inp = inp.to("cuda")
    with torch.no_grad():
        a = Policy(plain)(inp, lambda h, w, b: h)
        half = Policy(auto)(inp, lambda h, w, b: h)
    assert torch.isfinite(half).all() and float((half.float() - a).norm() / a.norm()) < 0.05  # bf16-level error
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel not installed")
    with restored_transformers_modules():
        patched = copy.deepcopy(plain)
        assert apply_liger(patched, "cuda") is True
        with torch.no_grad():
            b = Policy(patched)(inp, lambda h, w, b: h)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _rotary_inputs(B=2, H=4, Hk=2, L=5, D=16, seed=0):
    """q, k as HF's attention has them (B, heads, L, D views of (B, L, heads, D) projections) and cos / sin
    (B, L, D) that differ per batch row, as transformers 5.x's mRoPE module gives them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, L, Hk, D, generator=g).transpose(1, 2)
    ang = torch.randn(B, L, D // 2, generator=g) * 3
    emb = torch.cat([ang, ang], -1)
    return q, k, emb.cos(), emb.sin()


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_the_text_rotary_is_fused_on_cuda_and_transformers_own_elsewhere(tok_dir, kind):
    """transformers 5.x's Qwen2-VL / Qwen2.5-VL text attention calls `apply_rotary_pos_emb`, which liger 0.8.5 does
    not replace (it replaces the mRoPE function that 5.x no longer calls): after apply_liger it is liger's fused
    rope for CUDA tensors, with cos / sin per batch row (run here through the Triton interpreter), and
    transformers' own for the others, so that a CPU model built later in the process computes what it did
    before, bitwise; a second patched model keeps that dispatch. Qwen3-VL's, which liger replaces itself,
    dispatches the same way."""
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel not installed")
    from test_rollout import _tiny_other

    from strive_engine.tokenizer import build_tokenizer

    def build():
        torch.manual_seed(0)
        if kind == "qwen2_5_vl":
            return build_model(ModelConfig(tokenizer_dir=tok_dir, liger=False, **TINY), "cpu")[0]
        return _tiny_other(kind, build_tokenizer(ModelConfig(tokenizer_dir=tok_dir))).hf

    first = build()
    family = sys.modules[type(first).__module__]
    hf_rotary = family.apply_rotary_pos_emb
    forward = kind != "qwen3_vl"  # make_batch's videos are 14-pixel patches
    if forward:
        inp, _ = make_batch(first, SPECS)
        with torch.no_grad():
            want = Policy(build())(inp, lambda h, w, b: h)
    with restored_transformers_modules():
        assert apply_liger(first, "cuda") is True
        rotary = family.apply_rotary_pos_emb
        assert rotary._strive_hf is hf_rotary and "apply_multimodal_rotary_pos_emb" not in vars(family)
        q, k, cos, sin = _rotary_inputs()
        dev = "cuda" if torch.cuda.is_available() else "cpu"   # liger's kernel: compiled on a GPU, interpreted here
        on = [t.to(dev) for t in (q, k, cos, sin)]
        for got, ref in zip(rotary._strive_on_cuda(on[0].clone(), on[1].clone(), on[2], on[3]),
                            hf_rotary(q, k, cos, sin)):
            torch.testing.assert_close(got.cpu(), ref, rtol=1e-6, atol=1e-6)         # liger's kernel
        for got, ref in zip(rotary(q, k, cos, sin), hf_rotary(q, k, cos, sin)):     # CPU tensors: transformers'
            assert torch.equal(got, ref)
        if kind == "qwen3_vl":  # liger's vision rotary too
            assert family.apply_rotary_pos_emb_vision._strive_hf.__module__ == family.__name__
        if forward:
            with torch.no_grad():
                assert torch.equal(Policy(build())(inp, lambda h, w, b: h), want)
        assert apply_liger(build(), "cuda") is True
        assert family.apply_rotary_pos_emb is rotary
    assert family.apply_rotary_pos_emb is hf_rotary
