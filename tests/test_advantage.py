"""strive_engine.advantage: every mode on hand-worked examples (expected numbers written out by hand),
NaN/inf, size-1 and zero-variance groups, and DAPO dynamic sampling. Both the reference (CPU path) and the
Triton kernel under the interpreter are checked against the same hand numbers. eps = 1e-8 (below fp32
resolution at these stds) so that the eps-free hand numbers hold to fp32 rounding."""
import math

import pytest
import torch

from strive_engine.advantage import compute_advantages, dynamic_sampling_keep, layout_ids
from strive_kernels import group_advantages

EPS = 1e-8
S3 = math.sqrt(3.0)
# Question 0: variant 0 answers (1, 0), variant 1 answers (1, 1).  Question 1: all four answers 0.
REWARDS = torch.tensor([[[1.0, 0.0], [1.0, 1.0]],
                        [[0.0, 0.0], [0.0, 0.0]]])
# joint: q0 mean 3/4, population var (3 * 1/16 + 9/16) / 4 = 3/16, std sqrt(3)/4 -> 1/sqrt(3) and -sqrt(3);
# q1 is dead (all equal) -> 0
JOINT = [[[1 / S3, -S3], [1 / S3, 1 / S3]], [[0, 0], [0, 0]]]
# per_variant: (1, 0) has mean 1/2, std 1/2 -> (1, -1); (1, 1) and q1's variants are dead -> 0
PER_VARIANT = [[[1, -1], [0, 0]], [[0, 0], [0, 0]]]
# mean_only (Dr.GRPO): r - 3/4 in q0; q1 dead -> 0
MEAN_ONLY = [[[0.25, -0.75], [0.25, 0.25]], [[0, 0], [0, 0]]]
# batch_std: batch mean 3/8, var 3/8 - 9/64 = 15/64, std sqrt(15)/8; q0: (r - 3/4) * 8 / sqrt(15)
BS = 8 / math.sqrt(15.0)
BATCH_STD = [[[0.25 * BS, -0.75 * BS], [0.25 * BS, 0.25 * BS]], [[0, 0], [0, 0]]]

EXPECTED = {  # mode -> (advantages, zero_var_frac, num_groups, adv_std)
    "joint": (JOINT, 1 / 2, 2, math.sqrt(0.5)),  # adv^2: 3 * 1/3 + 3 = 4 over 8 answers
    "per_variant": (PER_VARIANT, 3 / 4, 4, 0.5),  # 1 + 1 over 8
    "mean_only": (MEAN_ONLY, 1 / 2, 2, math.sqrt(0.75 / 8)),
    "batch_std": (BATCH_STD, 1 / 2, 2, math.sqrt((3 * 0.0625 + 0.5625) * 64 / 15 / 8)),
}


def _run(rewards, mode, backend, device="cpu"):
    if backend == "engine":
        res = compute_advantages(rewards, mode, eps=EPS)
        return res.advantages, res.metrics
    B, K, G = rewards.shape
    g, v = layout_ids(B, K, G, device)
    adv, st = group_advantages(rewards.reshape(-1).to(device), g, v, mode=mode, eps=EPS, backend=backend)
    return adv.view(B, K, G).cpu(), st.to_dict()


@pytest.mark.parametrize("backend", ["engine", "triton"])
@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_hand_worked_modes(mode, backend, device):
    adv, m = _run(REWARDS, mode, backend, device)
    want, zvf, ngroups, adv_std = EXPECTED[mode]
    assert torch.allclose(adv, torch.tensor(want, dtype=torch.float32), atol=2e-6), adv
    assert m["reward_mean"] == pytest.approx(3 / 8, abs=1e-7)
    assert m["reward_std"] == pytest.approx(math.sqrt(15) / 8, abs=1e-6)
    assert m["zero_var_frac"] == pytest.approx(zvf)
    assert m["zero_var_frac_per_variant"] == pytest.approx(3 / 4)  # whatever the mode
    assert m["num_groups"] == ngroups and m["nan_count"] == 0
    assert m["adv_std"] == pytest.approx(adv_std, abs=2e-6)


@pytest.mark.parametrize("backend", ["engine", "triton"])
def test_nan_and_inf_are_zero_excluded_and_counted(backend, device):
    # one question, one variant, answers (1, NaN, 0, 1, inf): finite (1, 0, 1): mean 2/3, var 2/9
    r = torch.tensor([[[1.0, float("nan"), 0.0, 1.0, float("inf")]]])
    adv, m = _run(r, "joint", backend, device)
    s = math.sqrt(2 / 9)
    assert torch.allclose(adv, torch.tensor([[[(1 / 3) / s, 0, (-2 / 3) / s, (1 / 3) / s, 0]]]), atol=2e-6)
    assert m["nan_count"] == 2
    assert m["reward_mean"] == pytest.approx(2 / 3) and m["reward_std"] == pytest.approx(s)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ragged_groups_of_size_one_and_all_equal(backend, device):
    # questions of 1, 3 and 2 answers: (5), (0.1, 0.1, 0.1) — inexact in binary, so r - mean is not 0 in
    # floating point — and (2, 4)
    r = torch.tensor([5.0, 0.1, 0.1, 0.1, 2.0, 4.0], device=device)
    g = torch.tensor([0, 1, 1, 1, 2, 2], device=device)
    v = torch.tensor([0, 0, 1, 1, 0, 1], device=device)
    adv, st = group_advantages(r, g, v, mode="joint", eps=EPS, backend=backend)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # exactly: dead groups are never divided by eps
    assert adv[4:].tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)  # mean 3, std 1
    assert st.zero_var_frac.item() == pytest.approx(2 / 3) and st.num_groups.item() == 3
    # variant groups: (5) | (0.1) (0.1, 0.1) | (2) (4): every one is dead
    assert st.zero_var_frac_per_variant.item() == 1.0
    adv, st = group_advantages(r, g, v, mode="per_variant", backend=backend)
    assert torch.all(adv == 0) and st.num_groups.item() == 5 and st.zero_var_frac.item() == 1.0


def test_strive_revives_groups_per_variant_grpo_kills():
    # every variant group is all-correct or all-wrong, but the question's K*G answers disagree
    r = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    grpo = compute_advantages(r, "per_variant")
    strive = compute_advantages(r, "joint", eps=EPS)
    assert torch.all(grpo.advantages == 0) and grpo.metrics["zero_var_frac"] == 1.0
    assert strive.metrics["zero_var_frac"] == 0.0 and strive.metrics["zero_var_frac_per_variant"] == 1.0
    assert torch.allclose(strive.advantages, torch.tensor([[[1.0] * 3, [-1.0] * 3]]), atol=1e-5)


def test_dynamic_sampling_keep():
    acc = torch.tensor([[[1.0, 1.0], [1.0, 1.0]],   # all correct -> dropped in every mode
                        [[1.0, 1.0], [0.0, 0.0]],   # joint: mixed -> kept; per variant: both dropped
                        [[0.0, 0.0], [0.0, 1.0]],   # joint kept; per variant: v0 dropped, v1 kept
                        [[0.5, 0.5], [0.5, 0.5]]])  # partial credit everywhere: not all 0 / all 1 -> kept
    keep = dynamic_sampling_keep(acc, "joint")
    assert keep.shape == acc.shape and keep.dtype == torch.bool
    assert keep[:, 0, 0].tolist() == [False, True, True, True] and torch.all(keep == keep[:, :1, :1])
    keep = dynamic_sampling_keep(acc, "per_variant")
    assert keep[:, :, 0].tolist() == [[False, False], [False, False], [False, True], [True, True]]
    nan = torch.tensor([[[float("nan"), 1.0]], [[float("nan"), float("nan")]]])
    assert dynamic_sampling_keep(nan, "joint")[:, 0, 0].tolist() == [False, False]


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(B, K, G\)"):
        compute_advantages(torch.zeros(4, 2), "joint")
    with pytest.raises(ValueError, match="mode must be one of"):
        compute_advantages(torch.zeros(1, 2, 2), "grpo")
    with pytest.raises(ValueError, match="eps must be"):
        compute_advantages(torch.zeros(1, 2, 2), "joint", eps=0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        dynamic_sampling_keep(torch.zeros(1, 2, 2), "dapo")


def test_engine_layout_beyond_the_triton_limit_is_refused_not_miscomputed(monkeypatch):
    """compute_advantages skips the ids check (its layout is sorted by construction) but tells the resolver how
    long its questions are (K*G): a layout the Triton path cannot hold whole in one program's window is refused
    there (auto takes the twin) instead of being computed wrong. Programs of 8 answers here (limit 9)."""
    from strive_kernels import BackendError, _backend

    monkeypatch.setattr(_backend, "MAX_QUESTION", 9)
    rewards = torch.rand(3, 2, 6, generator=torch.Generator().manual_seed(0))  # questions of 12 > 9, 36 > 16 answers
    with pytest.raises(BackendError, match="questions of at most 9 answers, got 12"):
        compute_advantages(rewards, "joint", backend="triton")
    ref = compute_advantages(rewards, "joint", backend="reference")
    fits = rewards[:, :, :4].contiguous()  # questions of 8: several programs, all fine
    tri = compute_advantages(fits, "joint", backend="triton")
    want = compute_advantages(fits, "joint", backend="reference")
    torch.testing.assert_close(tri.advantages, want.advantages, rtol=1e-5, atol=1e-6)
    assert ref.advantages.shape == (3, 2, 6)
