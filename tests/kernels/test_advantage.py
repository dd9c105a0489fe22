"""strive_kernels.group_advantages: the Triton kernels (interpreter on CPU, compiled on CUDA) against the
float64 reference, on ragged batches with weird sizes, groups of size 1, groups longer than the kernel's
halo (its canonical path), all-equal rewards, NaN/inf. Error bound: |triton - fp64| <= 4 x the error of
plain PyTorch in fp32 (the same formulas evaluated in float32) + a few ulps."""
import pytest
import torch

from strive_kernels.advantage import group_advantages, group_advantages_forward
from strive_kernels.reference.advantage import (
    ADVANTAGE_MODES,
    AdvantageInputError,
    group_advantages_reference,
)

# tiny tiles so the interpreter stays fast and several programs, halos and cut groups are exercised
TINY = dict(block=24, halo=4, side=8, num_warps=1)


def _batch(sizes, variants_per_group=3, seed=0, levels=3, nan_at=(), inf_at=(), equal_groups=(), ids_offset=0):
    g = torch.cat([torch.full((s,), i * 7 + ids_offset, dtype=torch.int64) for i, s in enumerate(sizes)])
    v = torch.cat([torch.arange(s) * variants_per_group // max(s, 1) for s in sizes]).to(torch.int64)
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, levels, (g.numel(),), generator=gen).float() * 0.5 + \
        torch.rand(g.numel(), generator=gen) * (seed % 2) * 0.1
    starts = torch.tensor([0] + list(sizes)).cumsum(0)
    for q in equal_groups:
        r[starts[q]:starts[q + 1]] = 0.1  # 0.1 is inexact in binary: means of it round
    r[list(nan_at)] = float("nan")
    r[list(inf_at)] = float("inf")
    return r, g, v


def _on(device, fn, *tensors_then_args, **kw):
    """fn(*args) with the tensor arguments moved to `device`; tensor results come back to the CPU."""
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in tensors_then_args]
    out = fn(*args, **kw)
    adv, st = out
    return adv.cpu(), type(st)(*(t.cpu() for t in st))


def _plain_fp32_error(r, g, v, mode):
    """Error of plain PyTorch at the kernel's precision: the reference's formulas evaluated in float32."""
    ref, _ = group_advantages_reference(r.double(), g, v, mode)
    ref32, _ = group_advantages_reference(r, g, v, mode, compute_dtype=torch.float32)
    return (ref32.double() - ref).abs().max().item(), ref


CASES = {
    "ragged": dict(sizes=[1, 3, 7, 2, 16, 1, 5, 2, 9, 4], nan_at=(5,), inf_at=(20,)),
    "long_groups": dict(sizes=[2, 40, 1, 33, 3], variants_per_group=4, nan_at=(3, 50)),  # > halo: canonical
    "all_equal": dict(sizes=[4, 6, 1, 5, 8], equal_groups=(0, 1, 3)),
    "singletons": dict(sizes=[1] * 30),
    "one_group": dict(sizes=[57], variants_per_group=5),
    "negative_ids": dict(sizes=[3, 5, 8, 13], ids_offset=-20, seed=1),
}


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_reference(case, mode, device):
    r, g, v = _batch(**CASES[case])
    adv, st = _on(device, group_advantages_forward, r, g, v, mode, 1e-6, **TINY)
    torch_err, ref = _plain_fp32_error(r, g, v, mode)
    _, rst = group_advantages_reference(r.double(), g, v, mode)
    err = (adv.double() - ref).abs().max().item()
    assert err <= 4 * torch_err + 4e-7 * max(1.0, ref.abs().max().item()), (err, torch_err)
    fin = torch.isfinite(r)
    assert torch.all(adv[~fin] == 0)
    for name in ("reward_mean", "reward_std", "adv_std", "zero_var_frac", "zero_var_frac_per_variant"):
        assert getattr(st, name).item() == pytest.approx(getattr(rst, name).item(), rel=2e-6, abs=2e-7), name
    assert st.num_groups.item() == rst.num_groups.item()
    assert st.nan_count.item() == rst.nan_count.item() == int((~fin).sum())
    assert st.num_groups.dtype == st.nan_count.dtype == torch.int64


@pytest.mark.parametrize("mode", ["joint", "batch_std"])
def test_finalize_over_several_row_tiles(mode, device):
    """The finalize program reads the per-tile partial rows a few at a time (here 2 of 7, the last tile
    ragged): the merged statistics equal the reference's and those of a one-tile read."""
    r, g, v = _batch(sizes=[1, 3, 7, 2, 16, 1, 5, 2, 9, 4, 12, 20, 3, 1, 8, 11, 9, 17, 20], nan_at=(5, 40), seed=5)
    assert -(-r.numel() // TINY["block"]) == 7
    adv, st = _on(device, group_advantages_forward, r, g, v, mode, 1e-6, **TINY, finalize_block=2, finalize_warps=1)
    adv1, st1 = _on(device, group_advantages_forward, r, g, v, mode, 1e-6, **TINY, finalize_block=8)
    _, rst = group_advantages_reference(r.double(), g, v, mode)
    for name in ("reward_mean", "reward_std", "adv_std", "zero_var_frac", "zero_var_frac_per_variant"):
        assert getattr(st, name).item() == pytest.approx(getattr(rst, name).item(), rel=2e-6, abs=2e-7), name
        assert getattr(st, name).item() == pytest.approx(getattr(st1, name).item(), rel=1e-6, abs=1e-7), name
    assert st.num_groups.item() == st1.num_groups.item() == rst.num_groups.item() == 19
    assert st.nan_count.item() == 2
    assert torch.equal(adv, adv1) if mode == "joint" else torch.allclose(adv, adv1, rtol=1e-6, atol=1e-7)


def test_dead_groups_are_exactly_zero(device):
    r, g, v = _batch(sizes=[3, 40, 2], equal_groups=(0, 1, 2))  # 40 > halo: both paths
    for mode in ADVANTAGE_MODES:
        adv, st = _on(device, group_advantages_forward, r, g, v, mode, 1e-6, **TINY)
        assert torch.all(adv == 0), mode
        assert st.zero_var_frac.item() == 1.0 and st.zero_var_frac_per_variant.item() == 1.0


def test_tile_size_does_not_change_results_beyond_rounding(device):
    r, g, v = _batch(sizes=[5, 1, 12, 7, 30, 2, 2, 9], seed=3, nan_at=(0, 17))
    a1, s1 = _on(device, group_advantages_forward, r, g, v, "joint", 1e-6, **TINY)
    a2, s2 = _on(device, group_advantages_forward, r, g, v, "joint", 1e-6, block=48, halo=8, side=16, num_warps=1)
    assert torch.allclose(a1, a2, rtol=1e-6, atol=1e-6)
    assert s1.zero_var_frac.item() == s2.zero_var_frac.item()


def test_group_spanning_many_tiles_gets_one_set_of_statistics(device):
    # one group of 100 over 5 tiles: every tile recomputes it canonically -> bit-identical mean/std
    g = torch.zeros(100, dtype=torch.int64)
    v = torch.arange(100) // 25
    r = torch.linspace(0, 1, 100) ** 2
    adv, _ = _on(device, group_advantages_forward, r, g, v, "joint", 1e-6, **TINY)
    # advantages are an affine function of r with one (mean, std): recover it from two points, check all
    a = (adv[99] - adv[0]) / (r[99] - r[0])
    assert torch.allclose(adv, adv[0] + a * (r - r[0]), atol=2e-6)


def test_dtypes_and_empty(device):
    r, g, v = _batch(sizes=[4, 3, 6])
    ref, _ = group_advantages_reference(r.bfloat16().double(), g, v, "joint")
    adv, _ = _on(device, group_advantages_forward, r.bfloat16(), g.int(), v.int(), "joint", 1e-6, **TINY)
    assert adv.dtype == torch.float32 and torch.allclose(adv.double(), ref, atol=1e-5)
    empty = torch.empty(0, dtype=torch.int64)
    adv, st = _on(device, group_advantages, torch.empty(0), empty, empty, backend="triton")
    assert adv.numel() == 0 and st.num_groups.item() == 0 and st.nan_count.item() == 0


def test_public_function_routes_and_validates(device):
    r, g, v = _batch(sizes=[2, 3])
    a_ref, _ = group_advantages(r, g, v, backend="reference")
    a_auto, _ = group_advantages(r, g, v)  # CPU tensors -> reference
    assert torch.equal(a_ref, a_auto) and a_ref.dtype == torch.float32
    a_tri, _ = _on(device, group_advantages, r, g, v, backend="triton")
    assert torch.allclose(a_tri, a_ref, atol=1e-6)
    with pytest.raises(AdvantageInputError, match="backend"):
        group_advantages(r, g, v, backend="cuda")
    with pytest.raises(AdvantageInputError, match=r"group_ids\[2\]=7 > group_ids\[3\]=0"):
        group_advantages(r, torch.tensor([0, 0, 7, 0, 7]), v, backend="triton")
    with pytest.raises(AdvantageInputError, match="variant_ids must be non-decreasing within a question"):
        group_advantages(r, g, torch.tensor([0, 1, 1, 0, 2]), backend="triton")


def test_layout_check_runs_on_host_data_and_in_debug_mode(device, monkeypatch):
    """The ordering check reads the ids (a sync on CUDA): by default it runs on host tensors only; with
    STRIVE_KERNELS_DEBUG=1 also on the device; validate=True/False overrides both."""
    r, _, v = _batch(sizes=[2, 3])
    g = torch.tensor([0, 0, 7, 0, 7])
    monkeypatch.delenv("STRIVE_KERNELS_DEBUG", raising=False)
    args = [t.to(device) for t in (r, g, v)]
    if device == "cpu":
        with pytest.raises(AdvantageInputError, match=r"group_ids\[2\]=7 > group_ids\[3\]=0"):
            group_advantages(*args, backend="triton")
    else:
        adv, _ = group_advantages(*args)  # no sync, no check: unspecified values
        assert adv.shape == r.shape
    group_advantages(*args, backend="triton", validate=False)
    monkeypatch.setenv("STRIVE_KERNELS_DEBUG", "1")
    for backend in ("triton", "reference"):
        with pytest.raises(AdvantageInputError, match=r"group_ids\[2\]=7 > group_ids\[3\]=0"):
            group_advantages(*args, backend=backend)
    with pytest.raises(TypeError, match="True, False or None"):
        group_advantages(*args, validate=1)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_cuda_matches_reference_large_ragged(mode):
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 300, (4000,), generator=gen).tolist() + [5000]  # one group longer than the halo
    r, g, v = _batch(sizes, variants_per_group=4, seed=2, nan_at=(3, 1000, 7777))
    adv, st = group_advantages(r.cuda(), g.cuda(), v.cuda(), mode=mode, backend="triton")
    torch_err, ref = _plain_fp32_error(r, g, v, mode)
    _, rst = group_advantages_reference(r.double(), g, v, mode)
    assert (adv.cpu().double() - ref).abs().max().item() <= 4 * torch_err + 1e-6
    assert st.num_groups.item() == rst.num_groups.item() and st.nan_count.item() == rst.nan_count.item()
    assert st.zero_var_frac.item() == pytest.approx(rst.zero_var_frac.item(), abs=1e-6)
    assert st.adv_std.item() == pytest.approx(rst.adv_std.item(), rel=1e-4)


_SM90_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from strive_kernels import advantage as A

def build(fn, sig, consts, warps):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

for mode in (0, 1):  # the two constexpr branches: question groups, variant groups
    build(A._adv_main_kernel, {"r_ptr": "*fp32", "g_ptr": "*i64", "v_ptr": "*i64", "adv_ptr": "*fp32",
                               "part_ptr": "*fp32", "N": "i32", "eps": "fp32"},
          {"MODE": mode, "BLOCK": 768, "HALO": 128, "WIN": 1024, "SIDE": 128, "NP": 10}, 8)
build(A._adv_finalize_kernel, {"part_ptr": "*fp32", "stats_ptr": "*fp32", "count_ptr": "*i64", "T": "i32",
                               "eps": "fp32"}, {"MODE": 3, "TB": 1024, "NP": 10, "NPB": 16}, 8)
build(A._adv_scale_kernel, {"adv_ptr": "*fp32", "stats_ptr": "*fp32", "N": "i32", "eps": "fp32"}, {"BLOCK": 4096}, 4)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the kernels")
@pytest.mark.timeout(300)
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (globals, loop-carried types): compile the
    kernels for an H100 (sm_90) offline, in a process without TRITON_INTERPRET, down to a cubin."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
