"""strive_kernels.group_advantages: the Triton kernels (interpreter on CPU, compiled on CUDA) against the
float64 reference, on ragged batches with weird sizes, groups of size 1, long groups, all-equal rewards, NaN/inf,
in one program and over many (small blocks). Error bound: |triton - fp64| <= 4 x the error of plain PyTorch in
fp32 (the same formulas evaluated in float32) + a few ulps."""
import pytest
import torch

from strive_kernels import _backend
from strive_kernels._backend import BackendError
from strive_kernels.advantage import group_advantages, group_advantages_forward
from strive_kernels.reference.advantage import (
    ADVANTAGE_MODES,
    AdvantageInputError,
    group_advantages_reference,
)


@pytest.fixture
def small_blocks(monkeypatch):
    """Programs own 8 answers and see 16 (questions of at most 9 answers): a batch of more than 16 answers is
    several programs and the merge, small enough for the interpreter."""
    monkeypatch.setattr(_backend, "MAX_QUESTION", 9)


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
    "long_groups": dict(sizes=[2, 40, 1, 33, 3], variants_per_group=4, nan_at=(3, 50)),
    "all_equal": dict(sizes=[4, 6, 1, 5, 8], equal_groups=(0, 1, 3)),
    "singletons": dict(sizes=[1] * 30),
    "one_group": dict(sizes=[57], variants_per_group=5),
    "negative_ids": dict(sizes=[3, 5, 8, 13], ids_offset=-20, seed=1),
}
# questions of at most 9 answers: the cases that also run over many programs of 8 answers
MANY = ("all_equal", "singletons", "negative_ids_short", "ragged_short")
CASES["negative_ids_short"] = dict(sizes=[3, 5, 8, 9, 1, 9], ids_offset=-20, seed=1)
CASES["ragged_short"] = dict(sizes=[1, 3, 7, 2, 9, 1, 5, 2, 9, 4, 8, 9, 9], nan_at=(5,), inf_at=(20,),
                             equal_groups=(4,))


def _check_against_reference(r, g, v, mode, adv, st):
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


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_reference(case, mode, device):
    """One program (every case is <= 2 * 1,024 answers): any question length."""
    r, g, v = _batch(**CASES[case])
    adv, st = _on(device, group_advantages_forward, r, g, v, mode, 1e-6)
    _check_against_reference(r, g, v, mode, adv, st)


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("case", MANY)
def test_many_programs_match_reference_and_one_program(case, mode, device, monkeypatch):
    """The same batches over many programs of 8 answers and their merge: the reference's numbers, and each
    question's advantages bit for bit those of the one-program run (one program computes each question, by
    the same scan steps whatever the tiling; batch_std also depends on the merged std: to the last bits)."""
    r, g, v = _batch(**CASES[case])
    one, st1 = _on(device, group_advantages_forward, r, g, v, mode, 1e-6)
    monkeypatch.setattr(_backend, "MAX_QUESTION", 9)
    assert r.numel() > 16  # several programs
    adv, st = _on(device, group_advantages_forward, r, g, v, mode, 1e-6)
    _check_against_reference(r, g, v, mode, adv, st)
    if mode == "batch_std":
        torch.testing.assert_close(adv, one, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(adv, one)
    assert st.num_groups.item() == st1.num_groups.item() and st.nan_count.item() == st1.nan_count.item()


def test_question_as_long_as_the_window_allows(device, small_blocks):
    """Questions of the limit's 9 answers starting at the last answer of a program's block (7, 15, ...), next to
    short ones: each lies whole in its owner's window, and answers before a window's first question start (the
    previous program's) are left to that program."""
    sizes = [7, 9, 9, 1, 9, 2, 9, 9]
    r, g, v = _batch(sizes=sizes, variants_per_group=3, seed=4, nan_at=(30,))
    starts = torch.tensor([0] + sizes).cumsum(0)[:-1]
    assert {7, 16}.issubset(set(starts.tolist()))
    for mode in ADVANTAGE_MODES:
        adv, st = _on(device, group_advantages_forward, r, g, v, mode, 1e-6)
        _check_against_reference(r, g, v, mode, adv, st)


def test_too_long_question_is_named(device, small_blocks):
    """Over several programs a question longer than MAX_QUESTION does not fit one window: validate names it;
    the resolver, told the longest question, keeps auto on the reference and refuses triton."""
    r, g, v = _batch(sizes=[3, 10, 4, 5], seed=2)
    with pytest.raises(AdvantageInputError, match=r"question 7 \(answers 3..12\) has 10 answers.*at most 9"):
        group_advantages(r, g, v, backend="triton")
    r2, g2, v2 = _batch(sizes=[3, 10], seed=2)  # 13 answers: one program, no limit
    adv, st = group_advantages(r2, g2, v2, backend="triton")
    _check_against_reference(r2, g2, v2, "joint", adv, st)
    assert _backend.resolve("group_advantages", "auto", "cuda", n=22, longest=10) == "reference"
    assert _backend.resolve("group_advantages", "auto", "cuda", n=22, longest=9) == "triton"
    assert _backend.resolve("group_advantages", "auto", "cuda", n=16, longest=16) == "triton"
    with pytest.raises(BackendError, match="questions of at most 9 answers, got 10"):
        _backend.resolve("group_advantages", "triton", "cuda", n=22, longest=10)


def test_dead_groups_are_exactly_zero(device):
    r, g, v = _batch(sizes=[3, 40, 2], equal_groups=(0, 1, 2))
    for mode in ADVANTAGE_MODES:
        adv, st = _on(device, group_advantages_forward, r, g, v, mode, 1e-6)
        assert torch.all(adv == 0), mode
        assert st.zero_var_frac.item() == 1.0 and st.zero_var_frac_per_variant.item() == 1.0


def test_dtypes_and_empty(device):
    r, g, v = _batch(sizes=[4, 3, 6])
    ref, _ = group_advantages_reference(r.bfloat16().double(), g, v, "joint")
    adv, _ = _on(device, group_advantages_forward, r.bfloat16(), g.int(), v.int(), "joint", 1e-6)
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
    with pytest.raises(BackendError, match=r"backend must be one of auto\|triton\|native\|reference, got 'cuda'"):
        group_advantages(r, g, v, backend="cuda")
    with pytest.raises(BackendError, match="group_advantages has no 'native' backend"):
        group_advantages(r, g, v, backend="native")
    with pytest.raises(BackendError, match="at most 65536 rewards"):
        group_advantages(torch.zeros(65_537), torch.zeros(65_537, dtype=torch.long),
                         torch.zeros(65_537, dtype=torch.long), backend="triton")
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
    """The largest batch the Triton path takes (64 programs), ragged questions up to the 1,025-answer limit."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 300, (400,), generator=gen).tolist() + [1025, 1025]
    while sum(sizes) > 65_536:
        sizes.pop(0)
    r, g, v = _batch(sizes, variants_per_group=4, seed=2, nan_at=(3, 1000, 7777))
    adv, st = group_advantages(r.cuda(), g.cuda(), v.cuda(), mode=mode, backend="triton", validate=True)
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

main = {"r_ptr": "*fp32", "g_ptr": "*i64", "v_ptr": "*i64", "adv_ptr": "*fp32", "part_ptr": "*fp32",
        "stats_ptr": "*fp32", "count_ptr": "*i64", "N": "i32", "eps": "fp32"}
for mode in (0, 1, 3):  # the constexpr branches: by question, by variant, batch_std's in-place scaling
    build(A._advantage_kernel, main, {"MODE": mode, "BLOCK": 1024, "WIN": 2048, "ONE_PROGRAM": False}, 8)
    build(A._advantage_kernel, main, {"MODE": mode, "BLOCK": 128, "WIN": 128, "ONE_PROGRAM": True}, 1)
build(A._finalize_kernel, {"part_ptr": "*fp32", "stats_ptr": "*fp32", "count_ptr": "*i64", "adv_ptr": "*fp32",
                           "T": "i32", "N": "i32", "eps": "fp32"}, {"MODE": 3, "TP": 64}, 4)
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
