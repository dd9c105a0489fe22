"""Rollout (stage 5): G sampled completions for each (question, variant) request.

    batch = generate_rollouts(policy, tokenizer, requests, cfg.rollout, generator_seed=seed(step, rank))
    # batch.inputs (PolicyInputs) -> Policy.forward for old / new log-probs; batch.texts -> rewards

Rows are ordered request-major, then sample: row m = request m // G, sample m % G. Each request carries its own
video (one variant); its G rows share it, and `batch.inputs` holds each video once (`video_index` = request).

Two backends behind one call (`rollout.backend`):
  * "native" (default): `strive_engine.decode` — each request's video and prompt prefilled once, its K/V shared
    by its G rows, sampling and stopping on the device, the decode step replayed as a CUDA graph on CUDA.
  * "hf": HF `generate`, the oracle and fallback. G samples by explicit repetition (each request's prompt
    repeated G times) rather than `num_return_sequences`: the row order is ours, `max_batch` chunks cut
    anywhere, and nothing depends on how a transformers version expands `pixel_values_videos`. It prefills
    every prompt and its video G times. A fresh GenerationConfig with every logits processor neutral (no
    repetition penalty, top-k 0 = off unless asked): a checkpoint's generation_config.json (Qwen2.5-VL ships
    top_k=1, repetition_penalty=1.05) would otherwise make rollouts off-policy — the loss scores tokens under
    softmax(logits / temperature) only. The native engine applies no processor but temperature/top-k/top-p.

Both: sampling is seeded by `generator_seed` inside `torch.random.fork_rng` (the caller passes a seed that
differs per rank and step, runs repeat exactly, the global RNG stream outside is untouched); no collective
inside: call it with the policy's parameters already unsharded (the trainer wraps it), so ranks that stop at
different lengths never wait on each other. `sampling_logprobs` are each token's log-prob under the
distribution it was sampled from (softmax(logits / T) after top-k / top-p); the native engine always returns
them, HF only with return_logprobs=True.

second_per_grid_ts. qwen_vl_utils sets it to temporal_patch_size / fps for frames sampled evenly at `fps`.
Importance-sampled frames are not evenly spaced; we use temporal_patch_size * (mean spacing of the chosen
frames in seconds) = temporal_patch * (t_last - t_first) / (F - 1) (`second_per_grid`): the mean time one
temporal patch covers, which equals qwen_vl_utils' value when the frames are evenly spaced.
"""
from __future__ import annotations

import hashlib
import inspect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from strive_engine import prompts
from strive_engine.policy import Policy, PolicyInputs, VisualTokens
from strive_engine.sampling import SamplingSpec, filter_logits
from strive_engine.tokenizer import special_token_ids


@dataclass
class RolloutRequest:
    """One (question, variant): the question (VideoQA-like: question, options, problem_type) and its video.

    pixel_values (n, 3*2*14*14) in Qwen patch order; grid_thw (1, 3) or (3,) with n = t*h*w;
    second_per_grid_ts seconds per temporal patch (see `second_per_grid`); timestamps: Qwen3-VL only, the centre
    time in seconds of each temporal patch (default: (i + 0.25) * second_per_grid_ts).
    """

    question: Any
    pixel_values: Tensor
    grid_thw: Tensor
    second_per_grid_ts: float
    timestamps: Sequence[float] | None = None

    def grid(self) -> Tensor:
        g = torch.as_tensor(self.grid_thw, dtype=torch.long).reshape(-1)
        if g.numel() != 3 or int(g.prod()) != self.pixel_values.shape[0]:
            raise ValueError(f"RolloutRequest: grid_thw {g.tolist()} does not match pixel_values with "
                             f"{self.pixel_values.shape[0]} rows (need t*h*w rows)")
        return g


@dataclass
class RolloutBatch:
    """M = len(requests) * G sampled completions.

    inputs: PolicyInputs of prompt (left-padded) + completion (right-padded); inputs.completion_mask covers the
    completion tokens up to and including eos; inputs.visual: the prefill's merged visual tokens (native backend),
    so the old log-probs of the step do not run the vision tower again. completion_ids / completion_mask (M, Lc): the same, completion
    part only (after eos: pad id, mask 0). texts: decoded completions without special tokens. request_index,
    sample_index (M,) int64; truncated (M,) bool: no eos within max_new_tokens. num_gen_tokens: sum of the mask.
    sampling_logprobs (M, Lc) or None: the rollout's own log-probs of the sampled tokens under the sampling
    distribution (native: always; hf: with return_logprobs=True) — a diagnostic (rollout/trainer mismatch),
    never the old log-probs (the trainer computes those with Policy.forward). `inputs` lives on the policy's device, the other
    tensors on CPU. engine_ms (native backend): where the rollout's device time went, summed over the engine's
    calls: prefill_ms, first_token_ms, warmup_step_ms, capture_ms (CUDA graph), decode_ms, decode_steps (every step
    after the first token) and decode_timed_steps (those inside decode_ms: on CUDA the warm-up step is timed apart).
    """

    inputs: PolicyInputs
    completion_ids: Tensor
    completion_mask: Tensor
    texts: list[str]
    request_index: Tensor
    sample_index: Tensor
    truncated: Tensor
    num_gen_tokens: int
    prompt_length: int
    sampling_logprobs: Tensor | None = None
    engine_ms: dict[str, float] | None = None  # native: the decode engine's parts summed over its calls (ms, steps)


def second_per_grid(timestamps: Sequence[float] | Tensor, temporal_patch: int = 2, fps: float | None = None) -> float:
    """Seconds per temporal patch for frames shown at `timestamps` (seconds, sorted): temporal_patch * mean spacing.

    One frame (no spacing): temporal_patch / fps when fps is given, else temporal_patch * 1 s.
    """
    t = torch.as_tensor(timestamps, dtype=torch.float64).reshape(-1)
    if t.numel() >= 2:
        span = float(t[-1] - t[0])
        if span < 0:
            raise ValueError(f"second_per_grid: timestamps must be sorted, got {t.tolist()}")
        return temporal_patch * span / (t.numel() - 1)
    return temporal_patch / fps if fps else float(temporal_patch)


def shuffle_frames(pixel_values: Tensor, grid_thw: Tensor | Sequence[int], generator: torch.Generator | None = None,
                   temporal_patch: int = 2, channels: int = 3) -> tuple[Tensor, Tensor]:
    """T-GRPO's shuffled view: the same frames in a random order, directly in Qwen patch layout.

    pixel_values (t*h*w, channels*temporal_patch*p*p) rows ordered (t, h/2, w/2, 2, 2), each row holding the
    temporal_patch frames of its patch; frames are f = temporal_patch * t_idx + s. Returns (shuffled pixel
    values, perm (t*temporal_patch,)): shuffled frame f is original frame perm[f]. No re-decoding or resizing.
    """
    t, h, w = (int(x) for x in torch.as_tensor(grid_thw).reshape(-1))
    n, d = pixel_values.shape
    p2 = d // (channels * temporal_patch)
    if n != t * h * w or p2 * channels * temporal_patch != d:
        raise ValueError(f"shuffle_frames: pixel_values {tuple(pixel_values.shape)} does not match grid {(t, h, w)} "
                         f"with {channels} channels x temporal patch {temporal_patch}")
    x = pixel_values.reshape(t, h * w, channels, temporal_patch, p2)              # (T, HW, C, tps, p*p)
    frames = x.permute(0, 3, 1, 2, 4).reshape(t * temporal_patch, h * w, channels, p2)  # (F, HW, C, p*p)
    perm = torch.randperm(t * temporal_patch, generator=generator)
    y = frames[perm.to(frames.device)].reshape(t, temporal_patch, h * w, channels, p2).permute(0, 2, 3, 1, 4)
    return y.reshape(n, d), perm


def shuffled_rollouts(policy: Policy, tokenizer: Any, requests: Sequence[RolloutRequest], cfg: Any, seed: int,
                      temporal_patch: int = 2) -> RolloutBatch:
    """T-GRPO (Video-R1): G answers to each request with its frames in a random order (`shuffle_frames`, one
    permutation per request), each draw from a seed of its own derived from `seed` (`sub_seed`). The trainer
    passes the canonical view of each question; rewards.step_rewards compares the answers' accuracy with the
    ordered views' (the temporal bonus)."""
    gen = torch.Generator().manual_seed(sub_seed(seed, "tgrpo/permutation"))
    shuffled = [replace(r, pixel_values=shuffle_frames(r.pixel_values, r.grid_thw, gen, temporal_patch)[0])
                for r in requests]
    return generate_rollouts(policy, tokenizer, shuffled, cfg, sub_seed(seed, "tgrpo/sampling"))


def sub_seed(seed: int, purpose: str) -> int:
    """A seed for a second use of a per-(step, rank) seed, hashed with the purpose: not another rank's or step's
    own seed (T-GRPO's sampling seed was seed + 2, rank r + 2's: rank r's shuffled answers drew the sampling noise
    of rank r + 2's ordered ones at the same step)."""
    digest = hashlib.blake2b(f"{seed}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def _generation_config(cfg: Any, eos_ids: list[int], pad_id: int, output_logits: bool) -> Any:
    """Sampling exactly from softmax(logits / temperature) (+ top-p / top-k when asked), every other logits
    processor explicitly neutral so that no value of the checkpoint's generation_config.json leaks in."""
    from transformers import GenerationConfig

    sample = getattr(cfg, "do_sample", True)
    neutral = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, typical_p=1.0,
                   epsilon_cutoff=0.0, eta_cutoff=0.0, min_new_tokens=0, length_penalty=1.0,
                   num_beams=1, num_return_sequences=1)
    if sample:
        knobs = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    else:  # greedy: HF's defaults, which it ignores without sampling (anything else draws a warning)
        knobs = dict(temperature=1.0, top_p=1.0, top_k=50)
    return GenerationConfig(do_sample=sample, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids,
                            pad_token_id=pad_id, bos_token_id=None, use_cache=True, return_dict_in_generate=True,
                            output_logits=output_logits, **knobs, **neutral)


def encode_prompts(policy: Policy, tokenizer: Any, requests: Sequence[RolloutRequest], style: str) -> list[list[int]]:
    """Token ids of each request's prompt (chat template, video placeholder expanded for its grid). The K variants of
    a question share its record and one grid, so (Qwen2-VL, Qwen2.5-VL: timestamps are not in the text) one prompt:
    each distinct (record, grid, timestamps) is rendered and tokenized once (~1 ms of host time each)."""
    qwen3 = policy.config.model_type == "qwen3_vl"
    out = []
    seen: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        g = r.grid()
        ts = r.timestamps
        if qwen3 and ts is None:
            ts = [(i + 0.25) * r.second_per_grid_ts for i in range(int(g[0]))]
        key = (id(r.question), tuple(g.tolist()), tuple(ts) if qwen3 else None)   # variants share the record
        if key in seen:
            out.append(list(seen[key]))
            continue
        text = prompts.render_prompt(tokenizer, r.question, g.tolist(), style=style, merge_size=policy.merge_size,
                                     qwen3=qwen3, timestamps=ts)
        ids = seen[key] = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = prompts.num_video_tokens(g.tolist(), policy.merge_size)
        if ids.count(policy.config.video_token_id) != n:  # e.g. a literal "<|video_pad|>" in the question text
            raise prompts.PromptError(f"prompt of request {i} encodes {ids.count(policy.config.video_token_id)} "
                                      f"video tokens, its grid {g.tolist()} needs {n}: {text[:200]!r}")
        out.append(ids)
    return out


@torch.no_grad()
def generate_rollouts(policy: Policy, tokenizer: Any, requests: Sequence[RolloutRequest], cfg: Any,
                      generator_seed: int, *, return_logprobs: bool = False) -> RolloutBatch:
    """`cfg: RolloutConfig` -> RolloutBatch of len(requests) * cfg.num_generations rows (see module docstring).

    cfg.backend: "native" (strive_engine.decode: each request prefilled once, its G rows decoded against the
    shared prompt; sampling log-probs always returned) or "hf" (HF generate; log-probs with return_logprobs)."""
    if not requests:
        raise ValueError("generate_rollouts: no requests")
    G = cfg.num_generations
    R = len(requests)
    device = next(policy.hf.parameters()).device
    ids = special_token_ids(tokenizer)
    pad_id = ids["pad_token_id"]
    eos = policy.hf.generation_config.eos_token_id
    eos_ids = sorted({ids["eos_token_id"], *([eos] if isinstance(eos, int) else (eos or []))})

    # ---- prompts, left-padded to one width Lp (so every chunk shares the prompt columns)
    prompt_lists = encode_prompts(policy, tokenizer, requests, getattr(cfg, "prompt", "video_r1"))
    Lp = max(len(p) for p in prompt_lists)
    prompt_ids = torch.full((R, Lp), pad_id, dtype=torch.long)                  # (R, Lp)
    prompt_mask = torch.zeros(R, Lp, dtype=torch.long)
    for r, p in enumerate(prompt_lists):
        prompt_ids[r, Lp - len(p):] = torch.tensor(p)
        prompt_mask[r, Lp - len(p):] = 1
    grids = torch.stack([r.grid() for r in requests])                            # (R, 3)
    spgt = torch.tensor([float(r.second_per_grid_ts) for r in requests], dtype=torch.float32)  # (R,)
    pixels = [r.pixel_values for r in requests]
    prompts = PolicyInputs(input_ids=prompt_ids, attention_mask=prompt_mask, completion_mask=torch.zeros_like(prompt_ids),
                           pixel_values_videos=torch.cat(pixels), video_grid_thw=grids, second_per_grid_ts=spgt,
                           video_index=torch.arange(R))

    # ---- G completions per request (row m: request m // G, sample m % G), sampled under a per-call seed
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(generator_seed)
        if getattr(cfg, "backend", "native") == "native":
            comp, logprobs, visual, parts = _generate_native(policy, prompts, cfg, eos_ids, pad_id, device)
        else:
            comp, logprobs = _generate_hf(policy, prompts, cfg, eos_ids, pad_id, device, return_logprobs)
            visual, parts = None, None
    batch = _assemble(tokenizer, prompts, comp, logprobs, G, eos_ids, pad_id, device)
    batch.engine_ms = parts
    batch.inputs.visual = visual  # the prefill's visual tokens: the old log-probs skip the vision tower
    batch.inputs.position_ids = policy.positions(batch.inputs)  # once per step, for every later forward
    return batch


def _chunks(R: int, G: int, max_batch: int) -> list[Tensor]:
    """Requests per generate call: all, or as many whole requests as fit max_batch rows (at least one)."""
    per = max(1, max_batch // G) if max_batch else R
    return list(torch.arange(R).split(per))


def _generate_native(policy: Policy, prompts: PolicyInputs, cfg: Any, eos_ids: list[int], pad_id: int,
                     device: torch.device) -> tuple[Tensor, Tensor, VisualTokens, dict[str, float]]:
    """-> completions (M, Lc) and their sampling log-probs (M, Lc) on the host, Lc = the longest row, the
    requests' merged visual tokens (on the device) from the prefill, and the engine's timings summed over calls."""
    from strive_engine.decode import DecodeEngine

    engine = DecodeEngine(policy)
    spec = SamplingSpec.from_config(cfg)
    G = cfg.num_generations
    engine.check(prompts.attention_mask.sum(1).tolist(), cfg.max_new_tokens)   # every request, before compute
    toks, lps, vis, parts = [], [], [], Counter()
    for rr in _chunks(prompts.num_rows, G, cfg.max_batch):
        sub = prompts.select(rr).to(device)        # trims the columns that are padding in every row of the chunk
        out = engine.generate(sub, G, spec, cfg.max_new_tokens, eos_ids, pad_id, cuda_graph=cfg.cuda_graph,
                              check_every=cfg.stop_check_every)
        toks.append(out.tokens)
        lps.append(out.logprobs)
        vis.append(out.visual)
        parts.update({f"{k}_ms": v for k, v in (out.timings_ms or {}).items()})
        parts["decode_steps"] += out.steps
        parts["decode_timed_steps"] += out.steps - ("warmup_step" in (out.timings_ms or {}))
    comp, logprobs = torch.cat(toks), torch.cat(lps)                             # (M, T)
    # HF generate's width: it stops once every row has an EOS, so Lc = the longest row (its EOS included)
    ended = torch.isin(comp, torch.tensor(eos_ids))
    last = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.full((comp.shape[0],), comp.shape[1]))
    Lc = int(last.max())
    return comp[:, :Lc], logprobs[:, :Lc], VisualTokens.cat(vis), dict(parts)


def _generate_hf(policy: Policy, prompts: PolicyInputs, cfg: Any, eos_ids: list[int], pad_id: int,
                 device: torch.device, return_logprobs: bool) -> tuple[Tensor, Tensor | None]:
    """HF generate over rows repeated G times, chunked by cfg.max_batch rows; the oracle and fallback."""
    G, R = cfg.num_generations, prompts.num_rows
    req_of_row = torch.arange(R).repeat_interleave(G)                            # (M,)
    M = R * G
    step = cfg.max_batch or M
    fwd = inspect.signature(policy.hf.forward).parameters
    gen_cfg = _generation_config(cfg, eos_ids, pad_id, return_logprobs)
    spec = SamplingSpec.from_config(cfg)
    Lp = prompts.input_ids.shape[1]
    pixel_rows = prompts.video_grid_thw.prod(-1)
    offs = torch.cumsum(pixel_rows, 0) - pixel_rows
    pixels = [prompts.pixel_values_videos[int(o):int(o + n)] for o, n in zip(offs, pixel_rows)]
    chunks, chunk_lp = [], []
    for lo in range(0, M, step):
        rr = req_of_row[lo:lo + step]
        x = prompts.input_ids[rr].to(device)
        kw: dict[str, Any] = dict(input_ids=x, attention_mask=prompts.attention_mask[rr].to(device),
                                  pixel_values_videos=torch.cat([pixels[r] for r in rr.tolist()]).to(device),
                                  video_grid_thw=prompts.video_grid_thw[rr].to(device))
        if "second_per_grid_ts" in fwd and policy.config.model_type != "qwen3_vl":
            kw["second_per_grid_ts"] = prompts.second_per_grid_ts[rr].to(device)
        if "mm_token_type_ids" in fwd:
            kw["mm_token_type_ids"] = policy.mm_token_type_ids(x)
        out = policy.generate(**kw, generation_config=gen_cfg)
        chunks.append(out.sequences[:, Lp:].cpu())                              # (m, lc) with lc <= max_new_tokens
        if return_logprobs:
            # softmax(logits / T) after top-k / top-p, as the native engine reports it (from the raw logits, so
            # a caller's own logits processor does not enter)
            lg = torch.stack(out.logits, 1).float()                              # (m, lc, V) raw logits
            lp = torch.log_softmax(filter_logits(lg.flatten(0, 1), spec), -1).view_as(lg)
            chunk_lp.append(lp.gather(-1, out.sequences[:, Lp:, None]).squeeze(-1).cpu())
    Lc = max(c.shape[1] for c in chunks)
    comp = torch.cat([torch.nn.functional.pad(c, (0, Lc - c.shape[1]), value=pad_id) for c in chunks])
    logprobs = torch.cat([torch.nn.functional.pad(c, (0, Lc - c.shape[1])) for c in chunk_lp]) if chunk_lp else None
    return comp, logprobs


def _assemble(tokenizer: Any, prompts: PolicyInputs, comp: Tensor, logprobs: Tensor | None, G: int,
              eos_ids: list[int], pad_id: int, device: torch.device) -> RolloutBatch:
    """Completions (M, Lc) -> RolloutBatch: mask up to and including the first EOS, pad after it."""
    R, Lp = prompts.input_ids.shape
    M, Lc = comp.shape
    req_of_row = torch.arange(R).repeat_interleave(G)                            # (M,)
    is_eos = torch.isin(comp, torch.tensor(eos_ids))
    has_eos = is_eos.any(1)                                                      # (M,)
    first = torch.where(has_eos, is_eos.int().argmax(1), torch.full((M,), Lc))   # (M,) index of eos or Lc
    comp_mask = (torch.arange(Lc)[None] <= first[:, None]).long()
    # A row without eos ran to max_new_tokens, so it is Lc wide: the mask never covers padding.
    comp = comp.masked_fill(comp_mask == 0, pad_id)
    texts = tokenizer.batch_decode([c[m.bool()].tolist() for c, m in zip(comp, comp_mask)], skip_special_tokens=True)
    if logprobs is not None:
        logprobs = logprobs * comp_mask
    inputs = PolicyInputs(
        input_ids=torch.cat([prompts.input_ids[req_of_row], comp], 1).to(device),      # (M, Lp + Lc)
        attention_mask=torch.cat([prompts.attention_mask[req_of_row], comp_mask], 1).to(device),
        completion_mask=torch.cat([torch.zeros(M, Lp, dtype=torch.long), comp_mask], 1).to(device),
        pixel_values_videos=prompts.pixel_values_videos.to(device), video_grid_thw=prompts.video_grid_thw.to(device),
        second_per_grid_ts=prompts.second_per_grid_ts.to(device), video_index=req_of_row.to(device))
    return RolloutBatch(inputs=inputs, completion_ids=comp, completion_mask=comp_mask, texts=texts,
                        request_index=req_of_row, sample_index=torch.arange(G).repeat(R), truncated=~has_eos,
                        num_gen_tokens=int(comp_mask.sum()), prompt_length=Lp, sampling_logprobs=logprobs)
