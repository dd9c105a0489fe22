"""The decode step's fused elementwise kernels (strive_kernels.decode_layer) against their torch twins, and the
twins against HF's own modules (RMSNorm, rotary, SwiGLU) — Triton on CUDA, the interpreter on CPU."""
import pytest
import torch
import torch.nn.functional as F

from strive_kernels.decode_layer import add_rmsnorm, rope_cache, silu_mul
from strive_kernels.reference.decode_layer import (add_rmsnorm_reference, rope_angles, rope_reference,
                                                   silu_mul_reference)


def _dtypes(device):
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


def test_twins_equal_hf_modules():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25
    from transformers.models.qwen3_vl import modeling_qwen3_vl as q3

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, generator=g)
    norm = q25.Qwen2_5_VLRMSNorm(48, eps=1e-6)
    norm.weight.data = torch.randn(48, generator=g)
    d = torch.randn(5, 48, generator=g)
    y, h = add_rmsnorm_reference(x, d, norm.weight, 1e-6)
    assert torch.equal(y, x + d) and torch.equal(h, norm(x + d))
    # rotary on equal mRoPE axes: HF's rotary module + apply_rotary_pos_emb at (3, M, 1) positions
    for mod, cfg in ((q25, q25.Qwen2_5_VLTextConfig(hidden_size=64, num_attention_heads=4,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                     "mrope_section": [2, 3, 3]})),
                     (q3, q3.Qwen3VLTextConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                               rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                "mrope_section": [2, 3, 3],
                                                                "mrope_interleaved": True}))):
        rot = (mod.Qwen2_5_VLRotaryEmbedding if mod is q25 else mod.Qwen3VLTextRotaryEmbedding)(cfg)
        pos = torch.tensor([0, 3, 17, 1000, 4095])
        q = torch.randn(5, 4, 16, generator=g)
        cos, sin = rot(q, pos.view(1, 5, 1).expand(3, 5, 1))                          # (5, 1, 16)
        c, s = rope_angles(pos, rot.inv_freq, rot.attention_scaling, q.dtype)
        torch.testing.assert_close(c, cos[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(s, sin[:, 0], rtol=0, atol=0)
        want = q * cos + mod.rotate_half(q) * sin                                      # HF's formula, (M,1,D) bcast
        torch.testing.assert_close(rope_reference(q, pos, rot.inv_freq, rot.attention_scaling), want, rtol=0, atol=0)
    mlp_gate, mlp_up = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    assert torch.equal(silu_mul_reference(mlp_gate, mlp_up), torch.nn.SiLU()(mlp_gate) * mlp_up)


@pytest.mark.parametrize("M,H", [(3, 48), (5, 200)])
def test_add_rmsnorm_kernel(M, H, device):
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(M)
        x, d = (torch.randn(M, H, generator=g).to(device, dtype) for _ in range(2))
        w = (1 + 0.1 * torch.randn(H, generator=g)).to(device, dtype)
        for delta in (d, None):
            y, h = add_rmsnorm(x, delta, w, 1e-6, backend="triton")
            ry, rh = add_rmsnorm_reference(x, delta, w, 1e-6)
            assert torch.equal(y, ry)
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
            torch.testing.assert_close(h, rh, **tol)


@pytest.mark.parametrize("norm", [False, True])
def test_rope_cache_kernel(norm, device):
    M, Hq, Hkv, D, T = 6, 4, 2, 16, 5
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(int(norm))
        q, k, v = (torch.randn(M, h, D, generator=g).to(device, dtype) for h in (Hq, Hkv, Hkv))
        base = torch.randint(0, 3000, (M,), generator=g).to(device)
        t = torch.tensor([3], device=device)
        inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
        qn, kn = ((1 + 0.1 * torch.randn(D, generator=g)).to(device, dtype) for _ in range(2)) if norm else (None, None)
        caches = [torch.zeros(M, Hkv, T, D, device=device, dtype=dtype) for _ in range(4)]
        got = rope_cache(q.clone(), k, v, base, t, inv, 1.0, caches[0], caches[1], qn, kn, 1e-6, backend="triton")
        want = rope_cache(q.clone(), k, v, base, t, inv, 1.0, caches[2], caches[3], qn, kn, 1e-6,
                          backend="reference")
        tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(caches[0], caches[2], **tol)
        assert torch.equal(caches[1], caches[3])                                  # v copied into slot t
        assert caches[0][:, :, [0, 1, 2, 4]].abs().sum() == 0                      # only slot t written
        torch.testing.assert_close(want, rope_reference(q, base + t, inv, 1.0, qn, 1e-6), rtol=0, atol=0)


def test_layouts_the_kernels_cannot_read_take_the_twin(device):
    """add_rmsnorm reads contiguous rows and rope_cache unit-stride heads: other layouts (a column-sliced x, a k
    whose head dimension is strided) are computed by the twins, not misread by the kernels."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 96, generator=g).to(device)
    x, d, w = wide[:, ::2], torch.randn(4, 48, generator=g).to(device), torch.rand(48, generator=g).to(device) + 0.5
    for got, want in zip(add_rmsnorm(x, d, w, 1e-6, backend="triton"),
                         add_rmsnorm_reference(x.contiguous(), d, w, 1e-6)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    M, Hq, Hkv, D, T = 3, 4, 2, 16, 4
    q = torch.randn(M, Hq, D, generator=g).to(device)
    k = torch.randn(M, Hkv, 2 * D, generator=g).to(device)[..., ::2]
    v = torch.randn(M, Hkv, D, generator=g).to(device)
    base, t = torch.arange(M).to(device) * 7, torch.tensor([1], device=device)
    inv = 1.0 / (1e4 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    caches = [torch.zeros(M, Hkv, T, D, device=device) for _ in range(4)]
    rope_cache(q.clone(), k, v, base, t, inv, 1.0, caches[0], caches[1], backend="triton")
    rope_cache(q.clone(), k.contiguous(), v, base, t, inv, 1.0, caches[2], caches[3], backend="reference")
    torch.testing.assert_close(caches[0], caches[2], rtol=1e-6, atol=1e-6)


def test_silu_mul_kernel(device):
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(1)
        a, b = (torch.randn(3, 1500, generator=g).to(device, dtype) * 4 for _ in range(2))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(silu_mul(a, b, backend="triton"), F.silu(a) * b, **tol)
