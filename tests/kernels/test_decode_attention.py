"""shared_prefix_attention: the twin against plain attention over the prefix copied G times (fp64), and the
Triton kernel (interpreter on CPU, compiled on CUDA) against fp64 with an error bound relative to torch's own."""
import pytest
import torch

from strive_kernels import shared_prefix_attention
from strive_kernels.reference.decode_attention import DecodeAttentionInputError, shared_prefix_attention_reference


def make(R, G, Hq, Hkv, D, Lp, T, n, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    start = torch.randint(0, Lp, (R,), generator=g).to(device)
    return dict(q=r(R, G, Hq, D), k_prefix=r(R, Hkv, Lp, D), v_prefix=r(R, Hkv, Lp, D), prefix_start=start,
                k_suffix=r(R, G, Hkv, T, D), v_suffix=r(R, G, Hkv, T, D),
                suffix_len=torch.tensor([n], device=device))


def expanded(x):
    """Plain attention, fp64: each row's prefix copied out (left padding dropped) and concatenated with its
    suffix, then SDPA with GQA repeat — the computation a non-sharing engine would do."""
    q, kp, vp, st = x["q"].double(), x["k_prefix"].double(), x["v_prefix"].double(), x["prefix_start"]
    ks, vs, n = x["k_suffix"].double(), x["v_suffix"].double(), int(x["suffix_len"])
    R, G, Hq, D = q.shape
    rep = Hq // kp.shape[1]
    out = torch.empty_like(q)
    for r in range(R):
        s = int(st[r])
        for g in range(G):
            k = torch.cat([kp[r, :, s:], ks[r, g, :, :n]], 1).repeat_interleave(rep, 0)  # (Hq, L, D)
            v = torch.cat([vp[r, :, s:], vs[r, g, :, :n]], 1).repeat_interleave(rep, 0)
            out[r, g] = torch.nn.functional.scaled_dot_product_attention(q[r, g][:, None], k, v)[:, 0]
    return out


@pytest.mark.parametrize("R,G,Hq,Hkv,D,Lp,T,n", [(2, 3, 4, 2, 16, 37, 9, 1), (3, 2, 6, 3, 32, 70, 11, 11),
                                                 (1, 5, 2, 1, 16, 5, 4, 3), (2, 1, 8, 2, 64, 129, 7, 5)])
def test_twin_equals_attention_over_copied_prefix(R, G, Hq, Hkv, D, Lp, T, n):
    x = make(R, G, Hq, Hkv, D, Lp, T, n, dtype=torch.float64, seed=R * 7 + n)
    torch.testing.assert_close(shared_prefix_attention_reference(**x), expanded(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("R,G,Hq,Hkv,D,Lp,T,n", [(2, 3, 4, 2, 16, 37, 9, 1), (1, 2, 8, 2, 32, 200, 40, 33)])
def test_triton_matches_fp64_within_torch_error(R, G, Hq, Hkv, D, Lp, T, n, device):
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        x = make(R, G, Hq, Hkv, D, Lp, T, n, dtype=dtype, device=device, seed=n)
        want = expanded({k: v.cpu() for k, v in x.items()})
        got = shared_prefix_attention(**x, backend="triton").double().cpu()
        ours = (got - want).norm() / want.norm()
        # torch's own error at this dtype: SDPA on the dtype's inputs, expanded the same way
        plain = expanded({k: (v.to(dtype).double() if v.is_floating_point() else v).cpu() for k, v in x.items()})
        twin = shared_prefix_attention_reference(**x).double().cpu()
        torch_err = max(float((twin - want).norm() / want.norm()), float((plain - want).norm() / want.norm()),
                        1e-7 if dtype == torch.float32 else 1e-3)
        assert ours <= 4 * torch_err, (dtype, ours, torch_err)


def test_all_padding_but_one_column_and_long_suffix(device):
    """A prompt of one token at the end of a wide padded prefix; a suffix longer than one block."""
    x = make(2, 2, 4, 2, 16, 150, 70, 70, device=device, seed=3)
    x["prefix_start"] = torch.tensor([149, 0], device=device)
    want = expanded({k: v.cpu() for k, v in x.items()})
    torch.testing.assert_close(shared_prefix_attention(**x, backend="triton").double().cpu(), want,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared_prefix_attention(**x, backend="reference").double().cpu(), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [(1, 192), (3, 64), (2, 128), (4, 64)])
def test_triton_any_split_plan_equals_fp64(splits, device):
    """The result does not depend on how the prefix is split: one split, one block per split, a last split of
    padding only (the left-padded prompt starts after it), more splits than the planner would choose."""
    x = make(2, 3, 4, 2, 16, 150, 9, 4, device=device, seed=11)
    x["prefix_start"] = torch.tensor([140, 3], device=device)
    want = expanded({k: v.cpu() for k, v in x.items()})
    from strive_kernels.decode_attention import shared_prefix_attention_triton
    got = shared_prefix_attention_triton(**x, splits=splits).double().cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_split_plans_that_miss_the_prefix_are_refused():
    from strive_kernels.decode_attention import shared_prefix_attention_triton
    x = make(1, 2, 2, 1, 16, 150, 4, 1)
    with pytest.raises(DecodeAttentionInputError, match=r"splits \(2, 64\) do not cover the prefix of 150"):
        shared_prefix_attention_triton(**x, splits=(2, 64))


def _waves(programs: int, slots: int) -> int:
    return -(-programs // slots)


def test_split_plan_fills_whole_waves():
    """plan_splits: every split non-empty and a multiple of the block, the prefix covered, and at the 3B rollout
    shape (16 requests x 2 K/V heads, prompts of 2,112, 132 SMs x 2 programs) one wave of 224 programs of 5
    blocks, where the previous plan (splits of 4 blocks for about 2 programs per SM) launched 288: 1.09 waves."""
    from strive_kernels.decode_attention import PREFIX_PROGRAMS_PER_SM as per_sm, plan_splits

    assert plan_splits(16, 2, 2112, 64, 132) == (7, 320)
    for R, Hkv, Lp, sms in [(16, 2, 2112, 132), (1, 1, 1, 132), (3, 4, 777, 114), (64, 8, 9000, 132),
                            (1, 2, 200, 4), (8, 2, 64 * 33, 132), (2, 2, 0, 4)]:
        S, split = plan_splits(R, Hkv, Lp, 64, sms)
        assert split % 64 == 0 and S * split >= Lp and (S - 1) * split < max(Lp, 1), (R, Hkv, Lp, S, split)
        # the cheapest plan under the planner's model: waves x (blocks per split + the fixed cost of 2)
        blocks = max(1, -(-Lp // 64))
        cost = _waves(R * Hkv * S, sms * per_sm) * (split // 64 + 2)
        assert all(cost <= _waves(R * Hkv * -(-blocks // p), sms * per_sm) * (p + 2) for p in range(1, blocks + 1))


def test_bad_inputs_are_named():
    x = make(2, 2, 4, 2, 16, 8, 4, 2)
    with pytest.raises(DecodeAttentionInputError, match="multiple of the K/V heads"):
        shared_prefix_attention(**{**x, "q": torch.randn(2, 2, 3, 16)})
    with pytest.raises(DecodeAttentionInputError, match="k_suffix must be"):
        shared_prefix_attention(**{**x, "k_suffix": torch.randn(2, 3, 2, 4, 16)})
    with pytest.raises(DecodeAttentionInputError, match="share one dtype"):
        shared_prefix_attention(**{**x, "v_prefix": x["v_prefix"].double()})
    with pytest.raises(DecodeAttentionInputError, match="suffix_len must be one integer"):
        shared_prefix_attention(**{**x, "suffix_len": torch.tensor([1.0])})
    with pytest.raises(ValueError, match="backend must be"):
        shared_prefix_attention(**x, backend="cuda")


def _projections(M, Hq, Hkv, D, g, device, dtype):
    """q, k, v as the engine has them: strided views of one (M, (Hq + 2 Hkv) * D) projection output."""
    proj = torch.randn(M, (Hq + 2 * Hkv) * D, generator=g).to(device, dtype)
    q, k, v = proj.split([Hq * D, Hkv * D, Hkv * D], 1)
    return q.view(M, Hq, D), k.view(M, Hkv, D), v.view(M, Hkv, D)


@pytest.mark.parametrize("norm", [False, True], ids=["qwen2", "qk-norm"])
@pytest.mark.parametrize("R,G,Hq,Hkv,D,Lp,T,t", [(2, 3, 4, 2, 16, 37, 9, 4), (1, 5, 6, 3, 32, 70, 6, 0),
                                                 (3, 2, 8, 1, 16, 150, 70, 69), (2, 1, 2, 2, 16, 9, 3, 1)])
def test_rope_attention_equals_rotary_then_attention(R, G, Hq, Hkv, D, Lp, T, t, norm, device):
    """rope_shared_prefix_attention (the rotary and the K/V write inside the attention kernels) gives what
    rope_cache followed by shared_prefix_attention gives — the same bits where the arithmetic is the same — and its
    twin's result; it writes slot t of the suffix caches and nothing else, and slots after t are not attended.
    q, k, v are strided views of one projection (the engine's layout), G is not a power of two in one case, the
    suffix is longer than a block in another, G = 1 (evaluation) in the last, and the prompts are left-padded at
    random."""
    from strive_kernels import rope_cache, rope_shared_prefix_attention

    for dtype in [torch.float32] + ([torch.bfloat16] if device == "cuda" else []):
        g = torch.Generator().manual_seed(R * 100 + t + norm)
        M = R * G
        x = make(R, G, Hq, Hkv, D, Lp, T, t + 1, dtype=dtype, device=device, seed=t)
        q, k, v = _projections(M, Hq, Hkv, D, g, device, dtype)
        pos = torch.randint(0, 3000, (R,), generator=g).to(device)
        tt = torch.tensor([t], device=device)
        inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
        qn, kn = ((1 + 0.1 * torch.randn(D, generator=g)).to(device, dtype) for _ in range(2)) if norm else (None,
                                                                                                               None)
        common = dict(k_prefix=x["k_prefix"], v_prefix=x["v_prefix"], prefix_start=x["prefix_start"])
        caches = {name: (x["k_suffix"].clone(), x["v_suffix"].clone()) for name in ("fused", "two", "twin")}
        fused = rope_shared_prefix_attention(q, k, v, pos, tt, inv, 0.9, **common, k_suffix=caches["fused"][0],
                                             v_suffix=caches["fused"][1], q_norm=qn, k_norm=kn, backend="triton")
        ks, vs = caches["two"]
        qr = rope_cache(q.clone(), k, v, pos.repeat_interleave(G), tt, inv, 0.9, ks.view(M, Hkv, T, D),
                        vs.view(M, Hkv, T, D), qn, kn, backend="triton")
        two = shared_prefix_attention(qr.view(R, G, Hq, D), **common, k_suffix=ks, v_suffix=vs, suffix_len=tt + 1,
                                      backend="triton")
        twin = rope_shared_prefix_attention(q, k, v, pos, tt, inv, 0.9, **common, k_suffix=caches["twin"][0],
                                            v_suffix=caches["twin"][1], q_norm=qn, k_norm=kn, backend="reference")
        if dtype == torch.float32 and not (norm and device == "cuda"):  # a norm's sum may be reduced in another order
            assert torch.equal(fused, two) and torch.equal(caches["fused"][0], caches["two"][0])
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(fused, two, **tol)
        torch.testing.assert_close(fused, twin, **tol)
        torch.testing.assert_close(caches["fused"][0], caches["twin"][0], **tol)
        for name in ("fused", "twin"):
            kc, vc = caches[name]
            assert torch.equal(vc[:, :, :, t], v.view(R, G, Hkv, D))                      # v copied into slot t
            other = torch.arange(T, device=device) != t
            assert torch.equal(kc[:, :, :, other], x["k_suffix"][:, :, :, other])          # nothing else written
            assert torch.equal(vc[:, :, :, other], x["v_suffix"][:, :, :, other])
        # slots after t hold stale values: changing them changes nothing
        if t + 1 < T:
            kc, vc = caches["fused"][0].clone(), caches["fused"][1].clone()
            kc[:, :, :, t + 1:] = 1e3
            again = rope_shared_prefix_attention(q, k, v, pos, tt, inv, 0.9, **common, k_suffix=kc, v_suffix=vc,
                                                 q_norm=qn, k_norm=kn, backend="triton")
            assert torch.equal(again, fused)


def test_rope_attention_bad_inputs_are_named():
    from strive_kernels import rope_shared_prefix_attention

    x = make(2, 2, 4, 2, 16, 8, 4, 2)
    q, k, v = _projections(4, 4, 2, 16, torch.Generator().manual_seed(0), "cpu", torch.float32)
    args = dict(k_prefix=x["k_prefix"], v_prefix=x["v_prefix"], prefix_start=x["prefix_start"],
                k_suffix=x["k_suffix"], v_suffix=x["v_suffix"])
    pos, t, inv = torch.zeros(2, dtype=torch.long), torch.tensor([1]), torch.ones(8)
    for backend in ("triton", "reference"):
        with pytest.raises(DecodeAttentionInputError, match=r"pos must be \(R = 2,\) integers"):
            rope_shared_prefix_attention(q, k, v, torch.zeros(4, dtype=torch.long), t, inv, 1.0, **args,
                                         backend=backend)
        with pytest.raises(DecodeAttentionInputError, match=r"q must be \(R \* G = 4, Hq, 16\)"):
            rope_shared_prefix_attention(q[:3], k[:3], v[:3], pos, t, inv, 1.0, **args, backend=backend)
        with pytest.raises(DecodeAttentionInputError, match="q_norm and k_norm come together"):
            rope_shared_prefix_attention(q, k, v, pos, t, inv, 1.0, **args, q_norm=torch.ones(16), backend=backend)


_SM90_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from strive_kernels import decode_attention as A, decode_layer as L

def build(fn, sig, consts, warps):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return k

for dt in ("bf16", "fp32"):
    p = f"*{dt}"
    ieee = dt == "fp32"
    for rope, norm, gb in ((False, False, 8), (True, False, 8), (True, True, 8), (True, False, 1)):
        rot = {"scaling": "fp32", "eps": "fp32", "pos_ptr": "*i64", "inv_ptr": "*fp32", "qn_ptr": p}
        build(A._prefix_kernel, {"q_ptr": p, "k_ptr": p, "v_ptr": p, "start_ptr": "*i32", "m_ptr": "*fp32",
                                 "l_ptr": "*fp32", "acc_ptr": "*fp32", "Lp": "i32", "HKV": "i32", "GN": "i32",
                                 "SPLIT": "i32", "scale": "fp32", "t_ptr": "*i64", "kn_ptr": p, "nk_ptr": p,
                                 "nv_ptr": p, "kc_ptr": p, "vc_ptr": p, **rot,
                                 **{n: "i32" for n in ("sq_r", "sq_g", "sq_h", "sk_r", "sk_h", "sk_n", "sv_r", "sv_h",
                                                       "sv_n", "snk_m", "snk_h", "snv_m", "snv_h", "sc_r", "sc_g",
                                                       "sc_h", "sc_t", "svc_r", "svc_g", "svc_h", "svc_t")}},
              {"N_REP": 8, "QB": 64, "D": 128, "BLOCK_N": 64, "IEEE": ieee, "ROPE": rope, "HAS_NORM": norm,
               "GB": gb}, 8)
        build(A._suffix_kernel, {"q_ptr": p, "k_ptr": p, "v_ptr": p, "len_ptr": "*i64", "m_ptr": "*fp32",
                                 "l_ptr": "*fp32", "acc_ptr": "*fp32", "o_ptr": p, "G": "i32", "HKV": "i32",
                                 "S": "i32", "scale": "fp32", **rot,
                                 **{n: "i32" for n in ("sq_r", "sq_g", "sq_h", "sk_r", "sk_g", "sk_h", "sk_t", "sv_r",
                                                       "sv_g", "sv_h", "sv_t", "so_r", "so_g", "so_h")}},
              {"N_REP": 8, "QS": 16, "QB": 64, "D": 128, "BLOCK_T": 32, "IEEE": ieee, "ROPE": rope,
               "HAS_NORM": norm}, 4)
    build(L._add_rmsnorm_kernel, {"x_ptr": p, "d_ptr": p, "w_ptr": p, "y_ptr": p, "h_ptr": p, "H": "i32", "eps": "fp32"},
          {"HAS_DELTA": True, "BLOCK": 2048}, 4)
    for norm in (False, True):
        build(L._rope_cache_kernel, {"q_ptr": p, "k_ptr": p, "v_ptr": p, "pos_ptr": "*i64", "t_ptr": "*i64",
                                     "inv_ptr": "*fp32", "kc_ptr": p, "vc_ptr": p, "qn_ptr": p, "kn_ptr": p,
                                     "HQ": "i32", "HKV": "i32", "T": "i32", "scaling": "fp32", "eps": "fp32",
                                     **{n: "i32" for n in ("sq_m", "sq_h", "sk_m", "sk_h", "sv_m", "sv_h")}},
              {"D": 128, "HAS_NORM": norm}, 1)
    build(L._silu_mul_kernel, {"g_ptr": p, "u_ptr": p, "y_ptr": p, "N": "i32"}, {"BLOCK": 1024}, 4)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the kernels")
@pytest.mark.timeout(300)
def test_decode_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (non-constexpr globals, dot shapes): compile the
    decode kernels (attention and the fused elementwise ones, bf16 and fp32) for an H100/H200 offline."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
