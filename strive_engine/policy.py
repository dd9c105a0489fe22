"""The policy: the HF Qwen-VL model with the whole update (vision, language model, loss head) in one forward.

    policy = Policy(model)                                       # the trainer's FSDP2 root wraps it
    out = policy(inputs, head_fn)                                # head_fn(hidden (N, H), W (V, H), bias) -> Any

`Policy.forward` runs vision tower, language model and the loss head inside one call because FSDP2 unshards
the root module's own parameters (embeddings, final norm, lm_head) only inside the root's forward. It runs
the vision tower once per *distinct* video (the G rows of one (question, variant) share it), copies the
merged visual tokens into the `<|video_pad|>` slots of every row that uses the video, builds mRoPE positions
(`Policy.positions`), and hands the hidden states that predict completion tokens to `head_fn` packed as (N, H)
— the [N, V] logits are the head's business (strive_kernels.fused_logprob_loss). Rows that share a prompt (the G
answers of a (question, variant)) run as one sequence with the prompt once (`share_prompts`, the default under
sdpa / eager: strive_engine.prompt_sharing; the same hidden states and gradients).

Positions, one rule for every forward (rollout prefill, old log-probs, reference, update, SFT): a row's prompt
(its attended tokens before its first completion token) is placed by the model's own `get_rope_index` (each
family's rules: Qwen2.5-VL's seconds per temporal patch, Qwen3-VL's timestamps), and every token after it is text
at the prompt's last position + 1 + j — where HF generate and the native decode engine put generated tokens, and
what `get_rope_index` over the whole row gives. The prompt's positions are computed on the host once per distinct
prompt (the G rows of a request share one, instead of HF's Python loop with 4 device syncs per row), and a
rollout batch carries them (`PolicyInputs.position_ids`) for the step's other forwards (tests/test_positions.py).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from strive_engine import split_attention
from strive_engine.prompt_sharing import PromptGroups, block_mask, group_by_prompt, prompt_groups


def video_token_index(video_grid_thw: Tensor, video_index: Tensor, merge_size: int) -> Tensor:
    """(sum_m n_{v(m)},) index into the merged visual tokens of the videos of `video_grid_thw` (V, 3), sequence
    after sequence: sequence m takes the n_v tokens of its video v = video_index[m]."""
    n = video_grid_thw.prod(-1) // merge_size**2                                 # (V,) merged tokens per video
    offs = torch.cumsum(n, 0) - n                                                # (V,) first token of each video
    lens = n[video_index]                                                        # (M,)
    starts = torch.cumsum(lens, 0) - lens                                        # (M,) first slot of each row
    total = int(lens.sum())
    ar = torch.arange(total, device=n.device)
    return ar - starts.repeat_interleave(lens, output_size=total) + offs[video_index].repeat_interleave(
        lens, output_size=total)


@dataclass
class VisualTokens:
    """The merged visual tokens of V videos, video after video: merged (sum_v n_v, H); deepstack: Qwen3-VL's
    features injected into the first decoder layers, one (sum_v n_v, H) tensor per layer, or None."""

    merged: Tensor
    deepstack: list[Tensor] | None = None

    def to(self, device: torch.device | str) -> "VisualTokens":
        return VisualTokens(self.merged.to(device), None if self.deepstack is None else
                            [d.to(device) for d in self.deepstack])

    def take(self, index: Tensor) -> "VisualTokens":
        return VisualTokens(self.merged[index], None if self.deepstack is None else [d[index] for d in self.deepstack])

    @staticmethod
    def cat(parts: list["VisualTokens"]) -> "VisualTokens":
        deep = None if parts[0].deepstack is None else [torch.cat(ds) for ds in zip(*(p.deepstack for p in parts))]
        return VisualTokens(torch.cat([p.merged for p in parts]), deep)


@dataclass
class PolicyInputs:
    """One batch for `Policy.forward`: M rows (prompt + completion), V distinct videos.

    input_ids (M, L) int64; attention_mask (M, L) (prompts left-padded, completions right-padded);
    completion_mask (M, L): 1 on the completion tokens to score, in full-sequence coordinates (never column 0);
    pixel_values_videos (sum_v t_v*h_v*w_v, 3*2*14*14) in Qwen patch order; video_grid_thw (V, 3) int64;
    second_per_grid_ts (V,) float seconds per temporal patch; video_index (M,) int64: the video of each row.
    visual: the videos' merged visual tokens when already computed with the current vision weights (the
    forward then skips the vision tower; see the module docstring), else None.
    position_ids: (3, M, L) int64 mRoPE positions by `Policy.positions` when already computed, else None.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    pixel_values_videos: Tensor
    video_grid_thw: Tensor
    second_per_grid_ts: Tensor
    video_index: Tensor
    visual: VisualTokens | None = None
    position_ids: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_videos(self) -> int:
        return int(self.video_grid_thw.shape[0])

    def targets(self) -> Tensor:
        """(N,) the scored completion tokens, in the packing order of `Policy.forward` (row-major)."""
        return self.input_ids[:, 1:][self.completion_mask[:, 1:].bool()]

    def to(self, device: torch.device | str) -> "PolicyInputs":
        return PolicyInputs(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                               for f in fields(self)})

    def without_visual(self) -> "PolicyInputs":
        """The same batch with the vision tower to be run again (gradients reach it, or other weights)."""
        return replace(self, visual=None)

    def row_token_index(self, merge_size: int = 2) -> Tensor:
        """(sum_m n_{v(m)},) index into the merged visual tokens of all videos, row after row: row m takes
        the n_v tokens of its video v = video_index[m] (so rows sharing a video share its tokens)."""
        return video_token_index(self.video_grid_thw, self.video_index, merge_size)

    def select(self, rows: Tensor | list[int]) -> "PolicyInputs":
        """The sub-batch of `rows` (e.g. a micro-batch): only the videos they use are kept (re-indexed), and
        columns that are padding in every kept row are trimmed. Positions are unchanged by the trimming
        (they come from the attention mask), so the result scores exactly as inside the full batch."""
        # The bookkeeping runs on host copies (three small reads; on CUDA an int() per video was a sync each).
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu()
        if rows.numel() == 0:
            raise ValueError("PolicyInputs.select: no rows selected")
        dev = self.input_ids.device
        vids, new_index = torch.unique(self.video_index.cpu()[rows], sorted=True, return_inverse=True)
        patches = self.video_grid_thw.cpu().prod(-1)                             # (V,) pixel rows per video
        offs = torch.cumsum(patches, 0) - patches
        starts, lens = offs[vids], patches[vids]
        pix = torch.arange(int(lens.sum())) - (torch.cumsum(lens, 0) - lens).repeat_interleave(lens) \
            + starts.repeat_interleave(lens)                                     # the kept videos' pixel rows
        rows_d = rows.to(dev)
        am = self.attention_mask[rows_d]
        used = am.bool().any(0).cpu().nonzero().flatten()
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, am.shape[1])
        visual = None
        if self.visual is not None:  # the kept videos' tokens: patches / merge^2 rows each
            merge2 = int(patches.sum()) // self.visual.merged.shape[0]
            tok = pix.view(-1, merge2)[:, 0] // merge2                            # token rows of the kept videos
            visual = self.visual.take(tok.to(self.visual.merged.device))
        pos = None if self.position_ids is None else self.position_ids[:, rows.to(self.position_ids.device), lo:hi]
        vids_d = vids.to(self.video_grid_thw.device)
        return PolicyInputs(input_ids=self.input_ids[rows_d, lo:hi], attention_mask=am[:, lo:hi],
                            completion_mask=self.completion_mask[rows_d, lo:hi],
                            pixel_values_videos=self.pixel_values_videos[pix.to(self.pixel_values_videos.device)],
                            video_grid_thw=self.video_grid_thw[vids_d],
                            second_per_grid_ts=self.second_per_grid_ts[vids.to(self.second_per_grid_ts.device)],
                            video_index=new_index.to(self.video_index.device), visual=visual, position_ids=pos)

    def validate(self, merge_size: int = 2, video_token_id: int | None = None) -> None:
        """Shape and consistency checks; ValueError naming the first inconsistency."""
        M, L = self.input_ids.shape
        for name in ("attention_mask", "completion_mask"):
            if tuple(getattr(self, name).shape) != (M, L):
                raise ValueError(f"PolicyInputs.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"input_ids has {(M, L)}")
        V = self.num_videos
        if tuple(self.video_grid_thw.shape) != (V, 3) or tuple(self.second_per_grid_ts.shape) != (V,):
            raise ValueError(f"PolicyInputs: video_grid_thw {tuple(self.video_grid_thw.shape)} / second_per_grid_ts "
                             f"{tuple(self.second_per_grid_ts.shape)} must be (V, 3) / (V,)")
        if tuple(self.video_index.shape) != (M,) or (M and (int(self.video_index.min()) < 0
                                                            or int(self.video_index.max()) >= V)):
            raise ValueError(f"PolicyInputs.video_index must be (M,)={M} values in [0, {V}), got "
                             f"{self.video_index.tolist()}")
        n_pix = int(self.video_grid_thw.prod(-1).sum())
        if self.pixel_values_videos.shape[0] != n_pix:
            raise ValueError(f"PolicyInputs.pixel_values_videos has {self.pixel_values_videos.shape[0]} rows, "
                             f"video_grid_thw implies {n_pix}")
        if self.visual is not None and self.visual.merged.shape[0] * merge_size**2 != n_pix:
            raise ValueError(f"PolicyInputs.visual has {self.visual.merged.shape[0]} tokens, video_grid_thw implies "
                             f"{n_pix // merge_size**2}")
        if self.position_ids is not None and tuple(self.position_ids.shape) != (3, M, L):
            raise ValueError(f"PolicyInputs.position_ids has shape {tuple(self.position_ids.shape)}, want {(3, M, L)}")
        if M and bool(self.completion_mask[:, 0].any()):
            raise ValueError("PolicyInputs.completion_mask[:, 0] must be 0 (the first token has no predecessor)")
        if bool((self.completion_mask.bool() & ~self.attention_mask.bool()).any()):
            raise ValueError("PolicyInputs.completion_mask marks tokens outside attention_mask")
        if video_token_id is not None:
            have = ((self.input_ids == video_token_id) & self.attention_mask.bool()).sum(1)  # (M,)
            want = self.tokens_per_row(merge_size)
            bad = (have < want).nonzero().flatten()
            if bad.numel():
                r = int(bad[0])
                v = int(self.video_index[r])
                raise ValueError(f"PolicyInputs row {r} has {int(have[r])} video tokens, its video {v} "
                                 f"(grid {self.video_grid_thw[v].tolist()}) needs {int(want[r])}")

    def tokens_per_row(self, merge_size: int = 2) -> Tensor:
        """(M,) merged visual tokens of each row's video: t*h*w / merge_size**2."""
        return (self.video_grid_thw.prod(-1) // merge_size**2)[self.video_index]

    def video_slots(self, video_token_id: int, merge_size: int = 2) -> Tensor:
        """(M, L) bool: the `<|video_pad|>` positions that receive the video — the first n_v of each row.

        A `<|video_pad|>` the model *generated* later in the row is an ordinary text token, exactly as HF
        generate treated it (visual features enter only at prefill; new tokens are typed text)."""
        is_vid = (self.input_ids == video_token_id) & self.attention_mask.bool()
        return is_vid & (is_vid.cumsum(1) <= self.tokens_per_row(merge_size)[:, None])


class Policy(nn.Module):
    """The HF model with the whole update (vision, LM, head) in one forward; the FSDP2 root."""

    def __init__(self, hf_model: nn.Module, share_prompts: bool = True, shared_attention: str = "auto"):
        super().__init__()
        self.hf = hf_model
        # one copy of each prompt per forward (strive_engine.prompt_sharing); its block mask needs sdpa / eager
        attn = getattr(hf_model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
        self.share_prompts = bool(share_prompts) and attn in ("sdpa", "eager")
        # its attention as a causal call for the prompts and one for the answers (strive_engine.split_attention):
        # auto (by shape) | split | masked
        self.shared_attention = shared_attention if self.share_prompts and attn == "sdpa" and \
            split_attention.install() else "masked"
        self.recompute: Any = None    # strive_engine.recompute.Recompute: which layers a forward with grad recomputes
        self._qwen3 = hf_model.config.model_type == "qwen3_vl"
        params = inspect.signature(hf_model.model.get_rope_index).parameters
        self._rope_kwargs = set(params) | ({"*"} if any(p.kind == p.VAR_KEYWORD for p in params.values()) else set())

    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def merge_size(self) -> int:
        return int(self.hf.config.vision_config.spatial_merge_size)

    def generate(self, **kw: Any) -> Any:
        """HF generate on the (unsharded) model. synced_gpus off: transformers turns it on for any module FSDP2
        manages in a world of several ranks, and then all-reduces on every token so that every rank runs as many
        forwards as the longest; the engine unshards before generating, so nothing inside needs the ranks in step
        (and an error on one rank would leave the others waiting in that all-reduce)."""
        kw.setdefault("synced_gpus", False)
        return self.hf.generate(**kw)

    def mm_token_type_ids(self, input_ids: Tensor, video_slots: Tensor | None = None) -> Tensor:
        """(M, L) int32 modality types for get_rope_index / generate: 2 on the video slots (default: every
        `<|video_pad|>`, right for prompts), 0 elsewhere. No image inputs exist here, so an `<|image_pad|>` in
        the text is typed text."""
        slots = input_ids == self.hf.config.video_token_id if video_slots is None else video_slots
        return slots.to(torch.int32) * 2

    def rope_index(self, input_ids: Tensor, attention_mask: Tensor, video_grid_thw: Tensor,
                   second_per_grid_ts: Tensor, video_slots: Tensor | None = None) -> Tensor:
        """(3, M, L) mRoPE positions from the model's get_rope_index over whole rows (0 where attention_mask is 0);
        grid/seconds given per row (M, 3), (M,). The forwards use `positions`, which applies it to the prompts."""
        wanted = dict(input_ids=input_ids, attention_mask=attention_mask, video_grid_thw=video_grid_thw,
                      image_grid_thw=None, second_per_grid_ts=second_per_grid_ts,
                      mm_token_type_ids=self.mm_token_type_ids(input_ids, video_slots))
        kw = {k: v for k, v in wanted.items() if k in self._rope_kwargs or "*" in self._rope_kwargs}
        if self._qwen3:
            kw.pop("second_per_grid_ts", None)  # Qwen3-VL encodes time as timestamp text instead
        pos, _ = self.hf.model.get_rope_index(**kw)
        return pos

    def positions(self, inputs: PolicyInputs, video_slots: Tensor | None = None) -> Tensor:
        """(3, M, L) int64 mRoPE positions of `inputs` on its device (those it carries, else computed): the
        prompt by `rope_index`, once per distinct prompt, the tokens after it at the prompt's last position + 1 + j;
        0 on padding (the module docstring has the rule)."""
        if inputs.position_ids is not None:
            return inputs.position_ids
        slots = inputs.video_slots(self.hf.config.video_token_id, self.merge_size) if video_slots is None \
            else video_slots
        host = torch.stack([inputs.input_ids.long(), inputs.attention_mask.long(), inputs.completion_mask.long(),
                            slots.long()]).cpu()                                  # one copy to the host
        ids, mask, comp, slots = host[0], host[1].bool(), host[2].bool(), host[3].bool()
        M, L = ids.shape
        vid = inputs.video_index.cpu()
        prompt, members = group_by_prompt(ids, mask, comp, vid)                  # rows by their distinct prompt
        lead, first = [0] * M, [g[0] for g in members]   # row -> its distinct prompt; the first row of each prompt
        for u, g in enumerate(members):
            for m in g:
                lead[m] = u
        lead, first = torch.tensor(lead), torch.tensor(first)
        pos = torch.zeros(3, len(first), L, dtype=torch.long)
        has = prompt[first].any(1)
        if bool(has.any()):
            u = first[has]
            pos[:, has] = self.rope_index(ids[u], prompt[u].long(), inputs.video_grid_thw.cpu()[vid[u]],
                                          inputs.second_per_grid_ts.cpu()[vid[u]], slots[u] & prompt[u]).cpu()
        last = L - 1 - prompt[first].flip(1).int().argmax(1)                     # (U,) last prompt column
        nxt = pos[:, torch.arange(len(first)), last].amax(0) + has.long()        # (U,) last prompt position + 1
        out = pos[:, lead]                                                         # (3, M, L)
        after = mask & ~prompt                                                     # (M, L) the tokens after it
        j = after.long().cumsum(1) - 1
        out = torch.where(after[None], (nxt[lead][:, None] + j)[None], out)
        return out.to(inputs.input_ids.device)

    def video_features(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, list[Tensor] | None]:
        """Vision tower over all distinct videos at once -> merged tokens (sum_v n_v, H) and, for Qwen3-VL,
        the deepstack features (one (sum_v n_v, H) tensor per injected layer)."""
        out = self.hf.model.get_video_features(pixel_values, grid_thw)
        deep = None
        if hasattr(out, "pooler_output"):  # transformers >= 5.x: a ModelOutput
            merged = out.pooler_output
            ds = getattr(out, "deepstack_features", None)
            if ds is not None:
                deep = [torch.cat(tuple(d), 0) if isinstance(d, (tuple, list)) else d for d in ds]
        elif self._qwen3 and isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):
            merged, deep = out  # older Qwen3-VL API: (per-video embeds, deepstack list)
        else:
            merged = out
        merged = torch.cat(tuple(merged), 0) if isinstance(merged, (tuple, list)) else merged
        return merged, deep

    def visual_tokens(self, inputs: PolicyInputs) -> VisualTokens:
        """The batch's visual tokens: those it carries, or the vision tower run once over its distinct videos."""
        if inputs.visual is not None:
            return inputs.visual
        merged, deep = self.video_features(inputs.pixel_values_videos, inputs.video_grid_thw)
        return VisualTokens(merged, deep)

    def input_embeddings(self, inputs: PolicyInputs) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The language model's inputs for `inputs`: token embeddings with each row's merged visual tokens in its
        video slots (M, L, H), mRoPE positions (3, M, L), and the extra keyword arguments of the language model
        (Qwen3-VL's deepstack features). The vision tower runs once per distinct video."""
        inputs.validate(self.merge_size, self.hf.config.video_token_id)
        video_mask = inputs.video_slots(self.hf.config.video_token_id, self.merge_size)  # (M, L)
        embeds, extra = self._embed(inputs, inputs.input_ids, video_mask, inputs.video_index)
        return embeds, self.positions(inputs, video_mask), extra

    def _embed(self, inputs: PolicyInputs, ids: Tensor, video_mask: Tensor, video_index: Tensor
               ) -> tuple[Tensor, dict[str, Any]]:
        """Embeddings of the sequences `ids` (S, L) with the merged visual tokens of video video_index[s] in the
        video slots of sequence s (video_mask (S, L)), and the language model's extra arguments (deepstack)."""
        vis = self.visual_tokens(inputs)
        tok = video_token_index(inputs.video_grid_thw, video_index, self.merge_size)  # (sum_s n_{v(s)},)
        embeds = self.hf.model.get_input_embeddings()(ids)                       # (S, L, H)
        embeds = embeds.masked_scatter(video_mask.unsqueeze(-1), vis.merged[tok].to(embeds.dtype))
        extra: dict[str, Any] = {}
        if vis.deepstack is not None:
            extra = dict(visual_pos_masks=video_mask, deepstack_visual_embeds=[d[tok] for d in vis.deepstack])
        return embeds, extra

    def forward(self, inputs: PolicyInputs, head_fn: Callable[[Tensor, Tensor, Tensor | None], Any]) -> Any:
        """Hidden states predicting the completion tokens, packed (N, H), passed to
        head_fn(hidden, lm_head.weight (V, H), lm_head.bias or None); returns what head_fn returns. Rows that
        share a prompt run as one sequence when `share_prompts` (same result: strive_engine.prompt_sharing)."""
        groups = prompt_groups(inputs.input_ids, inputs.attention_mask, inputs.completion_mask,
                               inputs.video_index) if self.share_prompts else None
        layout = split_attention.choose(groups.segment, self.shared_attention, inputs.input_ids.device) \
            if groups is not None else None
        if self.recompute is None or not torch.is_grad_enabled():
            return self._forward(inputs, groups, layout, head_fn)
        M, L = inputs.input_ids.shape                              # the layers to recompute: from the tokens
        U, Lg = groups.src.shape if groups is not None else (M, L)  # run, the patches, the mask's elements
        self.recompute.plan(U * Lg, inputs.pixel_values_videos.shape[0] if inputs.visual is None else 0, U * Lg * Lg,
                            layout)
        try:
            return self._forward(inputs, groups, layout, head_fn)
        finally:                # backward recomputes what the forward chose; no later call may find the switches on
            self.recompute.set_all(False)                          # (a prefill would lose its cache)

    def _forward(self, inputs: PolicyInputs, groups: PromptGroups | None, layout: Any,
                 head_fn: Callable[..., Any]) -> Any:
        if groups is not None:
            packed = self._shared_hidden(inputs, groups, layout)
        else:
            embeds, pos, extra = self.input_embeddings(inputs)
            out = self.hf.model.language_model(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                                               position_ids=pos, use_cache=False, **extra)
            hidden = out.last_hidden_state                                       # (M, L, H), final norm applied
            # Position t predicts token t+1: keep the positions whose *next* token is a scored completion token.
            sel = inputs.completion_mask[:, 1:].bool()                           # (M, L-1)
            packed = hidden[:, :-1][sel]                                         # (N, H)
        head = self.hf.lm_head
        return head_fn(packed, head.weight, head.bias)

    def _shared_hidden(self, inputs: PolicyInputs, groups: PromptGroups,
                       layout: split_attention.SplitLayout | None) -> Tensor:
        """(N, H) the scored tokens' predicting hidden states, the rows of each prompt run as one sequence."""
        inputs.validate(self.merge_size, self.hf.config.video_token_id)
        dev = inputs.input_ids.device
        src, valid = groups.src.to(dev), groups.valid.to(dev)                   # (U, Lg)
        row_slots = inputs.video_slots(self.hf.config.video_token_id, self.merge_size)  # (M, L)
        video_mask = row_slots.reshape(-1)[src] & valid                          # (U, Lg): in the prompts only
        pos = self.positions(inputs, row_slots)                                  # (3, M, L)
        pos = pos.reshape(3, -1)[:, src] * valid                                 # (3, U, Lg)
        embeds, extra = self._embed(inputs, inputs.input_ids.reshape(-1)[src], video_mask,
                                    groups.video.to(inputs.video_index.device))  # (U, Lg, H)
        mask = split_attention.attach(block_mask(groups, embeds.dtype, dev), layout)  # (U, 1, Lg, Lg)
        out = self.hf.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                           use_cache=False, **extra)
        hidden = out.last_hidden_state                                           # (U, Lg, H)
        return hidden.reshape(-1, hidden.shape[-1])[groups.predictor.to(dev)]
