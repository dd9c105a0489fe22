"""One copy of each prompt per forward: the G completions of a (question, variant) after a single prompt.

A rollout batch holds G rows per (question, variant) that differ only after the prompt, and the prompt is most
of each row (at bench_rollout.py's Qwen2.5-VL-3B shape 2,062 prompt tokens, 1,560 of them video, against 256
new ones). A forward over the rows runs the language model over every prompt G times. Here the rows of one prompt
become one sequence

    [ prompt | completion 1 | completion 2 | ... | completion G | padding ]

under a block mask: a prompt token sees the prompt before it (causal), a completion token the whole prompt and
its own completion before it (causal), nothing of the other completions. Positions are the rows' own (each
completion starts at the prompt's last position + 1), so every completion token sees exactly the keys, values
and positions it sees in its own row: the same hidden states, and the prompt's gradient is the sum of its G
rows' gradients, as in the per-row forward. Exact up to floating-point summation order
(tests/test_prompt_sharing.py: fp64 hidden states and gradients equal the per-row forward's).

Cost: the model runs U * Lg tokens (U prompts, Lg = the longest prompt + its completions) instead of M * L; at
that shape with G = 8, 4,110 instead of 18,544 per prompt (4.5x fewer). The attention takes a dense additive
mask (U, 1, Lg, Lg) (34 MB per prompt in bf16 there), so it runs SDPA's masked kernels rather than its causal
flash path, and the attention FLOPs are Lg^2 per prompt instead of G * L^2. flash_attention_2 cannot take the mask: under it
the policy forwards one row per completion (`Policy.share_prompts` is off).

Rows group by (video, prompt tokens at their columns), the key `Policy.positions` uses; rows whose prompt no other row shares
are groups of one (their sequence is the row itself). Rows of one prompt need not be adjacent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PromptGroups:
    """Where each token of the shared layout comes from, and where each scored token's predictor lands.

    src (U, Lg) int64: flat index into the rows' (M * L) tokens of the token each slot holds (0 on padding);
    valid (U, Lg) bool; segment (U, Lg) int64: 0 prompt, k >= 1 the group's k-th completion, -1 padding;
    predictor (N,) int64: flat index into (U * Lg) of the slot whose hidden state predicts each scored token, in
    `PolicyInputs.targets()` order (row-major); video (U,) int64: each group's video (index into the batch's);
    first_row (U,) int64: the row each group's prompt is copied from. All on the host."""

    src: Tensor
    valid: Tensor
    segment: Tensor
    predictor: Tensor
    video: Tensor
    first_row: Tensor

    @property
    def num_groups(self) -> int:
        return int(self.src.shape[0])

    @property
    def tokens(self) -> int:
        """Tokens the model runs over in this layout (padding excluded)."""
        return int(self.valid.sum())


def host_rows(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, video_index: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ids (M, L) int64, mask / comp (M, L) bool, vid (M,) on the host, in one copy (one sync on CUDA)."""
    L = input_ids.shape[1]
    host = torch.cat([input_ids.long(), attention_mask.long(), completion_mask.long(),
                      video_index.long().to(input_ids.device)[:, None]], 1).cpu()
    return host[:, :L], host[:, L:2 * L].bool(), host[:, 2 * L:3 * L].bool(), host[:, 3 * L]


def group_by_prompt(ids: Tensor, mask: Tensor, comp: Tensor, vid: Tensor) -> tuple[Tensor, list[list[int]]]:
    """Host tensors ids (M, L), mask / comp (M, L) bool, vid (M,) -> each row's prompt (M, L) bool (its attended
    tokens before its first scored completion token; all of them when it has none), and the rows grouped by
    (video, prompt tokens at their columns), groups in order of their first row. The one grouping rule of the
    policy's positions (`Policy.positions`, once per prompt) and of the shared layout."""
    M, L = ids.shape
    end = torch.where(comp.any(1), comp.int().argmax(1), torch.full((M,), L))   # (M,) first completion column
    prompt = mask & (torch.arange(L)[None] < end[:, None])
    key_of: dict[tuple, int] = {}
    members: list[list[int]] = []
    for m, (v, row) in enumerate(zip(vid.tolist(), ids.masked_fill(~prompt, -1).numpy())):
        u = key_of.setdefault((v, row.tobytes()), len(key_of))
        if u == len(members):
            members.append([])
        members[u].append(m)
    return prompt, members


def prompt_groups(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, video_index: Tensor
                  ) -> PromptGroups | None:
    """The shared layout of a batch of M rows (M, L), or None when no two rows share a prompt (nothing to gain).

    A row's prompt: its attended tokens before its first scored completion token (all of it when it has none);
    its completion: the attended tokens from there on."""
    M, L = input_ids.shape
    ids, mask, comp, vid = host_rows(input_ids, attention_mask, completion_mask, video_index)
    prompt, members = group_by_prompt(ids, mask, comp, vid)
    after = mask & ~prompt
    if len(members) == M:
        return None
    p_cols = [prompt[g[0]].nonzero().flatten() for g in members]               # the prompt's columns, first row
    c_cols = [after[m].nonzero().flatten() for m in range(M)]                  # each row's completion columns
    lens = [len(p) + sum(len(c_cols[m]) for m in g) for p, g in zip(p_cols, members)]
    U, Lg = len(members), -(-max(max(lens), 1) // 16) * 16  # SDPA's masked CUDA kernels want rows of 16 keys
    src = torch.zeros(U, Lg, dtype=torch.long)
    segment = torch.full((U, Lg), -1, dtype=torch.long)
    slot_of = torch.full((M, L), -1, dtype=torch.long)                          # (row, column) -> layout slot
    for u, (p, g) in enumerate(zip(p_cols, members)):
        n = len(p)
        src[u, :n] = g[0] * L + p
        segment[u, :n] = 0
        for m in g:                                                             # every row's prompt -> one copy
            slot_of[m, prompt[m].nonzero().flatten()] = u * Lg + torch.arange(n)
        at = n
        for k, m in enumerate(g, start=1):
            c = c_cols[m]
            src[u, at:at + len(c)] = m * L + c
            segment[u, at:at + len(c)] = k
            slot_of[m, c] = u * Lg + at + torch.arange(len(c))
            at += len(c)
    sel = comp[:, 1:]                                                           # (M, L-1) token c+1 is scored
    predictor = slot_of[:, :-1][sel]                                            # row-major, as targets()
    if bool((predictor < 0).any()):
        raise ValueError("PolicyInputs: a scored completion token follows a column outside attention_mask")
    return PromptGroups(src, segment >= 0, segment, predictor,
                        vid[torch.tensor([g[0] for g in members])], torch.tensor([g[0] for g in members]))


def block_mask(groups: PromptGroups, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(U, 1, Lg, Lg) additive attention mask of the shared layout: 0 where a query slot may attend a key slot
    (key not after the query, both real, key in the prompt or in the query's own completion), the dtype's
    minimum elsewhere; a padding slot attends itself only (no empty softmax rows)."""
    seg = groups.segment.to(device)
    valid = groups.valid.to(device)
    Lg = seg.shape[1]
    idx = torch.arange(Lg, device=device)
    causal = idx[None, :] <= idx[:, None]                                       # (Lg, Lg) key <= query
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])        # (U, Lg q, Lg k)
    ok = causal[None] & same & valid[:, None, :] & valid[:, :, None]
    ok |= torch.eye(Lg, dtype=torch.bool, device=device)[None] & ~valid[:, :, None]
    out = torch.zeros(ok.shape, dtype=dtype, device=device)
    return out.masked_fill_(~ok, torch.finfo(dtype).min)[:, None]
