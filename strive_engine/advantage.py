"""Stage 7: rewards (B, K, G) -> advantages (B, K, G) and the zero-variance statistics STRIVE is about.

    res = compute_advantages(rewards, mode="joint", eps=1e-6)    # res.advantages (B, K, G), res.metrics
    keep = dynamic_sampling_keep(accuracy, mode="per_variant")   # DAPO: bool (B, K, G)

Question b, variant k, answer g. The modes (strive_engine/algorithms.py) differ only in how answers are
grouped and whether the std divides:
    joint        one group of K*G per question (STRIVE)
    per_variant  K groups of G per question (GRPO on each view; K = 1 is plain GRPO)
    mean_only    joint grouping, no std (Dr.GRPO)
    batch_std    joint mean, std over the whole batch
The work is done by `strive_kernels.group_advantages` (Triton on CUDA, its pure-torch twin on CPU), which
also handles ragged groups; here the layout is the dense (B, K, G) of one training step.

metrics (host floats, one sync), the numbers the training loop logs each step:
    reward_mean, reward_std       finite rewards of the batch (population std)
    adv_std                       std of the advantages of finite-reward answers (population std)
    zero_var_frac                 fraction of dead groups (all finite rewards equal) under the chosen mode
    zero_var_frac_per_variant     the same for (question, variant) groups whatever the mode: what GRPO
                                  would waste; STRIVE's joint groups exist to make zero_var_frac smaller
    num_groups, nan_count         groups under the chosen mode; non-finite rewards (advantage 0, excluded)

Over several batches (the ranks of a step: step.py logs adv/* global over ranks) the same metrics come from
sums that add up: `advantage_sums(rewards, res)` (a device tensor, no sync; zeros for a rank without a
question), summed (all-reduced), then `metrics_from_sums` — on one batch, res.metrics to float tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from strive_kernels import ADVANTAGE_MODES, GroupStats, group_advantages, resolve


@dataclass
class AdvantageResult:
    advantages: Tensor  # (B, K, G) float32, on the rewards' device
    metrics: dict[str, float]  # see the module docstring
    stats: GroupStats  # the same numbers as 0-d device tensors (no sync needed to keep them)


def _check_bkg(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, K, G) tensor, got {shape}")


def layout_ids(B: int, K: int, G: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """group_ids and variant_ids (B*K*G,) int64 of the flattened (B, K, G) layout."""
    b = torch.arange(B, device=device).repeat_interleave(K * G)
    k = torch.arange(K, device=device).repeat_interleave(G).repeat(B)
    return b, k


def compute_advantages(rewards: Tensor, mode: str, eps: float = 1e-6, backend: str = "auto") -> AdvantageResult:
    """Advantages (B, K, G) of rewards (B, K, G) under `mode`; NaN/inf rewards get 0 and are counted."""
    _check_bkg(rewards, "rewards")
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    B, K, G = rewards.shape
    g, v = layout_ids(B, K, G, rewards.device)
    # The layout is ours: sorted, questions of K*G answers. Told the longest question, the resolver keeps the
    # Triton path to the layouts it takes, so the ids need no check (which would read them back: a sync).
    backend = resolve("group_advantages", backend, rewards.device, n=B * K * G, longest=K * G)
    adv, stats = group_advantages(rewards.reshape(-1), g, v, mode=mode, eps=eps, backend=backend, validate=False)
    return AdvantageResult(adv.view(B, K, G), stats.to_dict(), stats)


def dynamic_sampling_keep(accuracy: Tensor, mode: str) -> Tensor:
    """DAPO dynamic sampling: bool (B, K, G), False for every answer of a group to drop.

    A group — the whole question (K*G answers) for joint / mean_only / batch_std, each (question, variant)
    (G answers) for per_variant — is dropped when its *raw accuracy* (not the shaped reward: format and
    temporal bonuses must not keep a group alive) is all 0 or all 1: it has no accuracy signal to learn
    from. Non-finite accuracies are ignored; a group without any finite accuracy is dropped.
    Under joint grouping a question survives if *any* variant disagrees — STRIVE keeps more data.
    """
    _check_bkg(accuracy, "accuracy")
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    B, K, G = accuracy.shape
    acc = accuracy.reshape(B, K * G) if mode != "per_variant" else accuracy.reshape(B * K, G)
    fin = torch.isfinite(acc)
    all0 = torch.where(fin, acc == 0, True).all(dim=1)
    all1 = torch.where(fin, acc == 1, True).all(dim=1)
    keep = ~(all0 | all1)  # a group with no finite entry is all0 and all1 at once -> dropped
    keep = keep.view(B, 1, 1) if mode != "per_variant" else keep.view(B, K, 1)
    return keep.expand(B, K, G).clone()


# Counts and sums behind the metrics, in this order (`advantage_sums`); each adds up over batches and ranks.
ADV_SUM_FIELDS = ("num_groups", "dead_groups", "variant_groups", "dead_variant_groups", "finite", "reward_sum",
                  "reward_sumsq", "adv_sum", "adv_sumsq", "nan_count")


def advantage_sums(rewards: Tensor, res: AdvantageResult) -> Tensor:
    """(len(ADV_SUM_FIELDS),) float64 on the rewards' device, no host sync: groups under the mode and dead ones
    (from res.stats: fraction x count), (question, variant) groups (B*K) and dead ones, the count, sum and sum of
    squares of the finite rewards, the sum and sum of squares of those answers' advantages (their count is the
    finite count: non-finite rewards have advantage 0 and are excluded), and the non-finite count."""
    _check_bkg(rewards, "rewards")
    B, K, _ = rewards.shape
    st = res.stats
    r = rewards.to(torch.float64)
    fin = torch.isfinite(r)
    zero = torch.zeros((), dtype=torch.float64, device=r.device)
    r = torch.where(fin, r, zero)
    a = torch.where(fin, res.advantages.to(device=r.device, dtype=torch.float64), zero)
    groups = st.num_groups.to(r.device, torch.float64)
    variants = torch.full((), float(B * K), dtype=torch.float64, device=r.device)
    return torch.stack([groups, torch.round(st.zero_var_frac.to(r.device, torch.float64) * groups), variants,
                        torch.round(st.zero_var_frac_per_variant.to(r.device, torch.float64) * variants),
                        fin.sum().to(torch.float64), r.sum(), (r * r).sum(), a.sum(), (a * a).sum(),
                        st.nan_count.to(r.device, torch.float64)])


def empty_advantage_sums(device: torch.device | str = "cpu") -> Tensor:
    """advantage_sums of no question: zeros."""
    return torch.zeros(len(ADV_SUM_FIELDS), dtype=torch.float64, device=device)


def metrics_from_sums(sums: Tensor) -> dict[str, float]:
    """The metrics of the module docstring (the same keys and formulas as compute_advantages' metrics:
    population stds, fractions of the group counts, 0 where there is nothing to count) from advantage_sums,
    summed over any number of batches or ranks. One host read of `sums`."""
    s = dict(zip(ADV_SUM_FIELDS, sums.double().cpu().tolist()))
    n = max(s["finite"], 1.0)
    r_mean, a_mean = s["reward_sum"] / n, s["adv_sum"] / n
    return {"reward_mean": r_mean,
            "reward_std": math.sqrt(max(s["reward_sumsq"] / n - r_mean * r_mean, 0.0)),
            "adv_std": math.sqrt(max(s["adv_sumsq"] / n - a_mean * a_mean, 0.0)),
            "zero_var_frac": s["dead_groups"] / max(s["num_groups"], 1.0),
            "zero_var_frac_per_variant": s["dead_variant_groups"] / max(s["variant_groups"], 1.0),
            "num_groups": s["num_groups"], "nan_count": s["nan_count"]}
