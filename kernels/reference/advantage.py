"""Pure-torch twin of `strive_kernels.group_advantages`: the oracle of the Triton kernel and its CPU fallback.

Rewards of N answers arrive flat, with the question each belongs to (`group_ids`) and the variant it was
generated under (`variant_ids`). Two groupings exist:

    question groups   maximal runs of equal group_ids                 (STRIVE's joint group of K*G answers)
    variant groups    maximal runs of equal (group_id, variant_id)    (GRPO's group of G answers per view)

Layout contract: group_ids are non-decreasing (the answers of one question are contiguous) and, inside a
question, variant_ids are non-decreasing (the answers of one (question, variant) are contiguous). This is
the flattened (B, K, G) layout of the engine; ragged groups and groups of size 1 are allowed.

Modes (see strive_engine/algorithms.py), with population statistics (divide by n, not n - 1):

    joint        A = (r - mean_q) / (std_q + eps)          q = the answer's question group
    per_variant  A = (r - mean_v) / (std_v + eps)          v = the answer's variant group
    mean_only    A = r - mean_q                            (Dr.GRPO)
    batch_std    A = (r - mean_q) / (std_batch + eps)      std over every finite reward of the batch

Conventions shared with the kernel (and tested):
  * Non-finite rewards (NaN, +-inf) get advantage 0, are left out of every statistic and are counted.
  * A group is *dead* (zero variance) when its finite rewards are all equal — including groups with 0 or 1
    finite reward. Dead groups get advantage exactly 0 (not (r - mean)/eps, whose rounding noise in
    `r - mean` would be amplified 1e6 times) and are what `zero_var_frac*` count.
  * Statistics are 0-d tensors on the rewards' device; nothing here or in the kernel syncs with the host
    except the optional layout validation.

GroupStats fields:
    reward_mean, reward_std    over all finite rewards of the batch (0 when there are none)
    adv_std                    population std of the returned advantages of the finite-reward answers
    zero_var_frac              dead groups / groups under the chosen grouping (variant groups for
                               per_variant, question groups otherwise)
    zero_var_frac_per_variant  dead variant groups / variant groups, whatever the mode: the number STRIVE
                               exists to reduce (a variant group dead under GRPO may be alive jointly)
    num_groups                 number of groups under the chosen grouping (int64)
    nan_count                  number of non-finite rewards (int64)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

ADVANTAGE_MODES = ("joint", "per_variant", "mean_only", "batch_std")


class AdvantageInputError(ValueError):
    """Bad input to group_advantages; the message names the argument and the offending value."""


class GroupStats(NamedTuple):
    """Per-batch statistics of a group_advantages call: 0-d tensors (float32, counts int64), no host sync."""

    reward_mean: Tensor
    reward_std: Tensor
    adv_std: Tensor
    zero_var_frac: Tensor
    zero_var_frac_per_variant: Tensor
    num_groups: Tensor
    nan_count: Tensor

    def to_dict(self) -> dict[str, float]:
        """Host floats for logging (one sync)."""
        return {k: float(v) for k, v in zip(self._fields, torch.stack([t.double() for t in self]).tolist())}


def check_advantage_inputs(rewards: Tensor, group_ids: Tensor, variant_ids: Tensor, mode: str, eps: float,
                           validate_layout: bool = True) -> None:
    """Shape/dtype/mode checks (no sync); with validate_layout also the ordering contract (one host sync)."""
    if mode not in ADVANTAGE_MODES:
        raise AdvantageInputError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    if not (isinstance(eps, (int, float)) and eps > 0 and eps == eps and eps != float("inf")):
        raise AdvantageInputError(f"eps must be a finite number > 0, got {eps!r}")
    for name, t in (("rewards", rewards), ("group_ids", group_ids), ("variant_ids", variant_ids)):
        if not isinstance(t, Tensor):
            raise AdvantageInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise AdvantageInputError(f"{name} must be 1-D (N,), got shape {tuple(t.shape)}")
    if not rewards.dtype.is_floating_point:
        raise AdvantageInputError(f"rewards must be a float tensor, got {rewards.dtype}")
    for name, t in (("group_ids", group_ids), ("variant_ids", variant_ids)):
        if t.dtype not in (torch.int64, torch.int32):
            raise AdvantageInputError(f"{name} must be int64, got {t.dtype}")
        if t.shape != rewards.shape:
            raise AdvantageInputError(f"{name} has shape {tuple(t.shape)} but rewards has {tuple(rewards.shape)}")
        if t.device != rewards.device:
            raise AdvantageInputError(f"{name} is on {t.device} but rewards is on {rewards.device}")
    if validate_layout and rewards.numel() > 1:
        g, v = group_ids, variant_ids
        down = g[1:] < g[:-1]
        vdown = (g[1:] == g[:-1]) & (v[1:] < v[:-1])
        bad = torch.stack([down.any(), vdown.any()]).tolist()  # the one host sync
        if bad[0]:
            i = int(torch.nonzero(down)[0]) + 1
            raise AdvantageInputError(
                f"group_ids must be non-decreasing (answers of one question contiguous); group_ids[{i - 1}]="
                f"{int(g[i - 1])} > group_ids[{i}]={int(g[i])}")
        if bad[1]:
            i = int(torch.nonzero(vdown)[0]) + 1
            raise AdvantageInputError(
                f"variant_ids must be non-decreasing within a question (answers of one variant contiguous); at "
                f"question {int(g[i])}: variant_ids[{i - 1}]={int(v[i - 1])} > variant_ids[{i}]={int(v[i])}")


def segment_ids(group_ids: Tensor, variant_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Dense run ids (N,) of question groups and of variant groups (0, 0, 1, 1, 1, 2, ...)."""
    n = group_ids.numel()
    q_start = torch.ones(n, dtype=torch.bool, device=group_ids.device)
    v_start = q_start.clone()
    if n > 1:
        q_start[1:] = group_ids[1:] != group_ids[:-1]
        v_start[1:] = q_start[1:] | (variant_ids[1:] != variant_ids[:-1])
    return torch.cumsum(q_start, 0) - 1, torch.cumsum(v_start, 0) - 1


def _group_moments(r: Tensor, fin: Tensor, seg: Tensor, num: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per segment (num,): finite count n, mean, population std, dead flag. r float64 with 0 at non-finite."""
    n = torch.zeros(num, dtype=r.dtype, device=r.device).index_add_(0, seg, fin.to(r.dtype))
    s = torch.zeros_like(n).index_add_(0, seg, r)
    mean = s / n.clamp_min(1)
    dev = torch.where(fin, r - mean[seg], torch.zeros_like(r))
    m2 = torch.zeros_like(n).index_add_(0, seg, dev * dev)
    inf = torch.full_like(n, float("inf"))
    mn = inf.scatter_reduce(0, seg, torch.where(fin, r, float("inf")), "amin", include_self=True)
    mx = (-inf).scatter_reduce(0, seg, torch.where(fin, r, -float("inf")), "amax", include_self=True)
    dead = (n <= 1) | (mn == mx)
    std = torch.where(dead, torch.zeros_like(n), torch.sqrt(m2 / n.clamp_min(1)))
    return n, mean, std, dead


def _pop_mean_std(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    n = mask.sum().to(x.dtype)
    mean = torch.where(mask, x, 0).sum() / n.clamp_min(1)
    var = torch.where(mask, (x - mean) ** 2, 0).sum() / n.clamp_min(1)
    return mean, var.sqrt()


def group_advantages_reference(rewards: Tensor, group_ids: Tensor, variant_ids: Tensor, mode: str = "joint",
                               eps: float = 1e-6, validate: bool = True,
                               compute_dtype: torch.dtype = torch.float64) -> tuple[Tensor, GroupStats]:
    """Advantages (N,) and GroupStats; see the module docstring for the contract.

    Computed in `compute_dtype` (float64; tests also run it in float32 as "plain PyTorch at the kernel's
    precision"); advantages are returned in float32, or float64 when rewards are float64 so that this
    function is also the high-precision oracle of the kernel's tests.
    """
    check_advantage_inputs(rewards, group_ids, variant_ids, mode, eps, validate_layout=validate)
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    dev = rewards.device
    r_in = rewards.to(compute_dtype)
    fin = torch.isfinite(r_in)
    r = torch.where(fin, r_in, torch.zeros_like(r_in))  # (N,)
    q_seg, v_seg = segment_ids(group_ids, variant_ids)
    nq = int(q_seg[-1]) + 1 if r.numel() else 0  # sizes of the two groupings (host ints: reference only)
    nv = int(v_seg[-1]) + 1 if r.numel() else 0

    _, v_mean, v_std, v_dead = _group_moments(r, fin, v_seg, nv)
    if mode == "per_variant":
        seg, mean, std, dead = v_seg, v_mean, v_std, v_dead
    else:
        _, mean, std, dead = _group_moments(r, fin, q_seg, nq)
        seg = q_seg
    centered = r - mean[seg]  # (N,)
    batch_mean, batch_std = _pop_mean_std(r, fin)
    if mode in ("joint", "per_variant"):
        adv = centered / (std[seg] + eps)
    elif mode == "mean_only":
        adv = centered
    else:  # batch_std
        adv = centered / (batch_std + eps)
    adv = torch.where(fin & ~dead[seg], adv, torch.zeros_like(adv))

    _, adv_std = _pop_mean_std(adv, fin)
    num = seg.new_tensor(dead.numel())
    f32 = dict(dtype=torch.float32, device=dev)
    stats = GroupStats(
        reward_mean=batch_mean.to(**f32),
        reward_std=batch_std.to(**f32),
        adv_std=adv_std.to(**f32),
        zero_var_frac=(dead.sum() / max(dead.numel(), 1)).to(**f32),
        zero_var_frac_per_variant=(v_dead.sum() / max(v_dead.numel(), 1)).to(**f32),
        num_groups=num.to(torch.int64),
        nan_count=(~fin).sum().to(torch.int64),
    )
    return adv.to(out_dtype), stats
