"""The update's micro-batches sized by memory: whole prompt groups, as many per micro-batch as the budget holds.

    parallel.micro_batch_size = 0       (the default: by memory; N > 0: N rows per micro-batch, in row order)

Why. A micro-batch's forward and backward launch about the same number of kernels whatever its size, so at a
small model the update is bound by launches and host work, not by the GPU (gpu_small on an H200, 2026-12-04: the
update at ~5 % of the matmul rate, ~11-12 k ATen ops per update in four micro-batches of 32 rows). Fewer, larger
micro-batches cut that in proportion and give the matmuls larger M; the limit is memory, which at a real model's
shape (gpu_3b: ~39 GB of activations per prompt group) allows one group. A fixed row count is right for one
shape only; the activations a micro-batch keeps are known before it runs (`strive_engine.recompute` measures
bytes per token and patch on the run's device at start-up), so the engine sizes each micro-batch itself, as verl's
`use_dynamic_bsz` packs by a token budget, but from the memory the run has rather than a number the user guesses.

How. The rows of a mini-batch are grouped by prompt (`prompt_sharing.group_by_prompt`, the grouping the forward
uses): a group's rows share one prompt, which the forward runs once, so a group is never split across
micro-batches. Groups are packed in order, greedily, while the predicted activations of the candidate
micro-batch (`Recompute.activation_bytes`, with the forward's own sizes: the shared layout's padded tokens, its
mask, the split attention's key rows, the videos' patches) fit what the budget leaves (`Recompute.packing_free`:
the budget minus what the update holds by design, counted from sizes: weights, AdamW moments, gradients, gathered
weights, the rollout batch, a reference model); then the same number of micro-batches is re-cut to balance their
tokens where every part still fits. Sizes, not the allocator's live count: that count also holds whatever else is
alive at the moment (the next step's prefetched videos), so identical runs, and a resumed one, could cut different
micro-batches and sum their gradients in a different order. The live count still guards memory: each forward's
plan checks it and recomputes layers when the rest does not fit, as it does for a group that does not fit alone
(a micro-batch of its own). Without a budget (the CPU; `activation_checkpointing` other than auto) a mini-batch is
one micro-batch, as 0 meant before.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from strive_engine import split_attention
from strive_engine.prompt_sharing import group_by_prompt, host_rows


@dataclass
class RowGroups:
    """The prompt groups of some rows of a batch, from host copies: rows (batch indices) per group, in order of
    their first row; each group's prompt tokens, its rows' completion tokens and its video's patches; each row's
    first and last attended column (the trimmed width of a selection without shared prompts)."""

    members: list[list[int]]
    prompt: list[int]
    answers: list[list[int]]
    patches: list[int]
    video: list[int]
    first_col: dict[int, int]
    last_col: dict[int, int]

    def tokens(self, g: int) -> int:
        return self.prompt[g] + sum(self.answers[g])


def row_groups(inputs, rows: Tensor) -> RowGroups:
    """`rows` (batch indices) of `inputs` (PolicyInputs) grouped by prompt, with their sizes (one copy to the host)."""
    rows = rows.reshape(-1).cpu()
    L = inputs.input_ids.shape[1]
    ids, mask, comp, vid = (t[rows] for t in host_rows(inputs.input_ids, inputs.attention_mask,
                                                       inputs.completion_mask, inputs.video_index))
    prompt, members = group_by_prompt(ids, mask, comp, vid)
    after = (mask & ~prompt).sum(1).tolist()
    plen = prompt.sum(1).tolist()
    per_video = inputs.video_grid_thw.cpu().prod(-1).tolist()
    cols = torch.arange(L)
    first = torch.where(mask, cols, L).min(1).values.tolist()
    last = torch.where(mask, cols, -1).max(1).values.tolist()
    r = rows.tolist()
    return RowGroups(members=[[r[i] for i in g] for g in members], prompt=[plen[g[0]] for g in members],
                     answers=[[after[i] for i in g] for g in members],
                     patches=[per_video[int(vid[g[0]])] for g in members], video=[int(vid[g[0]]) for g in members],
                     first_col=dict(zip(r, first)), last_col=dict(zip(r, last)))


def forward_sizes(rg: RowGroups, groups: list[int], share_prompts: bool, shared_attention: str
                  ) -> tuple[int, int, int, tuple[int, bool] | None]:
    """(tokens, patches, mask elements, the split attention's (key rows, boolean mask)) that `Policy.forward`
    reports to the memory plan for a micro-batch of these groups: the shared layout's U x Lg slots (Lg the longest
    group, padded to 16) when some rows share a prompt, else the rows at their trimmed width. From the lengths
    alone (host integers: no tensor work per candidate)."""
    rows = [m for g in groups for m in rg.members[g]]
    patches = sum(rg.patches[g] for g in {rg.video[g]: g for g in groups}.values())   # each video once
    if not share_prompts or all(len(rg.members[g]) == 1 for g in groups):
        width = max(rg.last_col[m] for m in rows) - min(rg.first_col[m] for m in rows) + 1
        return len(rows) * width, patches, len(rows) * width * width, None
    U, Lg = len(groups), -(-max(max(rg.tokens(g) for g in groups), 1) // 16) * 16   # as prompt_groups pads
    split = split_attention.split_shape([rg.prompt[g] for g in groups], [rg.answers[g] for g in groups], Lg,
                                        shared_attention)
    return U * Lg, patches, U * Lg * Lg, split


def pack(costs: list[float], fits: Callable[[list[int]], bool]) -> list[list[int]]:
    """Consecutive items (groups) into as few parts as `fits` allows, greedily in order (an item that does not fit
    alone is a part of its own); then the same number of parts re-cut at equal shares of the summed `costs`, kept
    when every part fits and the largest part is smaller."""
    parts: list[list[int]] = []
    for i in range(len(costs)):
        if parts and fits(parts[-1] + [i]):
            parts[-1].append(i)
        else:
            parts.append([i])
    n = len(parts)
    if n < 2:
        return parts
    total, acc, cuts = sum(costs), 0.0, []
    for i, c in enumerate(costs[:-1]):
        acc += c
        if len(cuts) < n - 1 and acc >= total * (len(cuts) + 1) / n:
            cuts.append(i + 1)
    bounds = [0, *cuts, len(costs)]
    even = [list(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
    largest = lambda ps: max(sum(costs[i] for i in p) for p in ps)                     # noqa: E731
    if len(even) == n and all(fits(p) for p in even) and largest(even) < largest(parts):
        return even
    return parts


def held_bytes(inputs, *modules) -> int:
    """Bytes the update holds besides the policy's state: the rollout batch's tensors (`inputs`, a PolicyInputs,
    with its visual tokens) and every parameter (local shard) of `modules` (a KL reference)."""
    tensors = [getattr(inputs, f.name) for f in fields(inputs) if f.name != "visual"]
    if inputs.visual is not None:
        tensors += [inputs.visual.merged, *(inputs.visual.deepstack or [])]
    total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    for m in modules:
        for p in m.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
    return total


def by_memory(inputs, rows: Tensor, recompute, share_prompts: bool, shared_attention: str,
              vision_runs: bool, held: int = 0) -> list[Tensor] | None:
    """The micro-batches (row tensors) of a mini-batch's `rows` sized by the memory plan, or None when there is no
    plan to size them by (no budget, or activation checkpointing not auto): then the mini-batch is one micro-batch.
    vision_runs: the forward runs the vision tower (its patches count); held: `held_bytes`."""
    free = None if recompute is None else recompute.packing_free(held)
    if free is None or rows.numel() == 0:
        return None
    rg = row_groups(inputs, rows)

    def fits(groups: list[int]) -> bool:
        tokens, patches, mask_elems, split = forward_sizes(rg, groups, share_prompts, shared_attention)
        return recompute.activation_bytes(tokens, patches if vision_runs else 0, mask_elems, split) <= free

    parts = pack([float(rg.tokens(g)) for g in range(len(rg.members))], fits)
    return [torch.tensor([m for g in p for m in rg.members[g]], dtype=torch.long) for p in parts]
