"""Stage 3: question-aware keyframes. Score every candidate frame against the question, then draw K index
sets of F frames each with `strive_kernels.keyframe_sample` (one Triton launch for the whole batch on CUDA).

    scorer = build_scorer(cfg.keyframes, model=hf_model, tokenizer=tokenizer)
    sel = select_keyframes(scorer, pools, questions, cfg.keyframes, num_variants=K, seed=step_seed)
    sel.indices          # (B, K, F) int64, rows of each pool, sorted and unique per variant (a pool of fewer than
                         # F frames: every frame, repeated; see select_keyframes)

Knobs (KeyframeConfig):
    num_frames   F, frames per variant (even: Qwen pairs frames into temporal patches)
    temperature  tau of softmax(cos / tau); cosines live in [-1, 1], so tau = 0.1 turns a 0.3 cosine gap
                 into a e^3 = 20x weight ratio; lower = more peaked
    uniform_mix  lambda, weight of the uniform distribution mixed in: keeps the whole timeline covered,
                 no gap between chosen frames exceeds 2P/(lambda F) (proof in strive_kernels.reference.keyframe);
                 0 = pure relevance, 1 = uniform stratified sampling
    scorer       policy: the policy's own vision tower (pooled merged tokens) vs the mean of its input
                 embeddings of the question — free, no extra model, but only as relevant as the policy is
                 aligned; siglip / clip: a frozen dual encoder from scorer_path (local folder), whose
                 image and text embeddings are trained to be compared by cosine
    score_side   policy scorer: each frame is embedded at about score_side^2 pixels (a 2-frame clip of
                 itself), cheap next to the rollout; the encoders use their own input size
Variant 0 is the canonical view: evenly spread frames, identical every step (the model always also sees
the plain uniform sampling); variants 1..K-1 use the importance, with their own Philox offsets u_k.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from strive_engine.config import KeyframeConfig
from strive_engine.scorer_base import FrameScorer, ScorerError  # noqa: F401 (part of this module's API)
from strive_engine.variants import pixel_norm
from strive_kernels import CLIP_MEAN, CLIP_STD, keyframe_sample, variant_patchify


def _features(out) -> Tensor:
    """HF feature calls return a tensor (transformers 4.x), a ModelOutput with pooler_output (5.x) or a
    (features, extras) tuple (Qwen3-VL's vision tower): the pooled features as one tensor."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)):
        pooled = out[0]
    if isinstance(pooled, (tuple, list)):
        pooled = torch.cat(tuple(pooled), 0)
    if not isinstance(pooled, Tensor):
        raise ScorerError(f"cannot find features in the model output of type {type(out).__name__}")
    return pooled


def _check_frames(frames: Tensor) -> None:
    if not isinstance(frames, Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        desc = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, Tensor) else type(frames).__name__
        raise ScorerError(f"frames must be uint8 (P, H, W, 3), got {desc}")


class PolicyScorer:
    """The policy's own embeddings: vision tower (incl. its merger) pooled per frame vs mean input
    embedding of the question tokens. Both live in the LLM's embedding space.

    Calls modules only, under no_grad, so it works on CPU or CUDA and under FSDP2 when called inside the
    root's forward (see strive_engine.parallel: the trainer runs scoring inside `root(fn)`).
    `model` is a Qwen-VL ForConditionalGeneration (or a wrapper with `.hf`); `patchify` overrides the
    frames -> pixel_values op (same signature as strive_kernels.variant_patchify).
    """

    def __init__(self, model: nn.Module, tokenizer, score_side: int = 56, frames_per_call: int = 256,
                 patchify=None):
        hf = getattr(model, "hf", model)
        inner = getattr(hf, "model", hf)
        self.visual = getattr(inner, "visual", None)
        if self.visual is None:
            raise ScorerError(f"{type(hf).__name__} has no vision tower at .model.visual (policy scorer needs a "
                              f"Qwen-VL model)")
        vc = hf.config.vision_config
        self.patch, self.merge = int(vc.patch_size), int(vc.spatial_merge_size)
        self.temporal_patch = int(getattr(vc, "temporal_patch_size", 2))
        self.mean, self.std = pixel_norm(hf.config)
        self.embed = hf.get_input_embeddings()
        self.tokenizer = tokenizer
        self.score_side = int(score_side)
        self.frames_per_call = int(frames_per_call)
        self.patchify = patchify

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        from strive_engine.variants import smart_resize

        px = self.score_side ** 2
        return smart_resize(h, w, factor=self.patch * self.merge, min_pixels=px, max_pixels=px)

    @torch.no_grad()
    def embed_frames(self, frames: Tensor) -> Tensor:
        """uint8 (P, H, W, 3) -> float32 (P, hidden): each frame as a 2-frame clip of itself at ~score_side^2
        pixels, vision tower, mean over the frame's merged tokens."""
        return self.embed_pools([frames])[0]

    @torch.no_grad()
    def embed_pools(self, pools: Sequence[Tensor]) -> list[Tensor]:
        """`embed_frames` of every pool, in as few vision-tower calls as frames_per_call allows. A run of n frames
        of one pool enters the tower as one grid row (n, h, w): each frame is a temporal patch (itself twice),
        and the Qwen towers attend, window and place rotary angles within a temporal patch, so this is the tower
        on n one-frame clips — with HF's per-grid-row Python loops (rotary and window indices) run once per run
        instead of once per frame (keyframe stage at gpu_small: 4,364 -> 1,168 ops; bench/TUNING.md)."""
        for frames in pools:
            _check_frames(frames)
        patchify = self.patchify or variant_patchify  # the C++/CUDA op; its own twin where the op is not built
        weight = self.visual.patch_embed.proj.weight if hasattr(self.visual, "patch_embed") else None
        device = weight.device if weight is not None else next(self.visual.parameters()).device
        runs = []                                   # (pool, n frames, pixel values, grid row [n, h, w] in patches)
        for b, frames in enumerate(pools):
            P, H, W, _ = frames.shape
            h, w = self._out_hw(H, W)
            for p0 in range(0, P, self.frames_per_call):
                n = min(self.frames_per_call, P - p0)
                idx = torch.arange(p0, p0 + n).repeat_interleave(self.temporal_patch).view(n, self.temporal_patch)
                boxes = torch.tensor([[0.0, 0.0, float(W), float(H)]]).expand(n, 4).contiguous()
                out_hw = torch.tensor([[h, w]], dtype=torch.int64).expand(n, 2).contiguous()
                pv, grid = patchify(frames, idx, boxes, out_hw, self.mean, self.std,
                                    temporal_patch=self.temporal_patch, patch=self.patch, merge=self.merge)
                runs.append((b, n, pv, [n, int(grid[0, 1]), int(grid[0, 2])]))
        sums: list[list[Tensor]] = [[] for _ in pools]
        start = 0
        while start < len(runs):                    # calls of up to frames_per_call frames, runs kept whole
            stop, frames_in = start, 0
            while stop < len(runs) and (stop == start or frames_in + runs[stop][1] <= self.frames_per_call):
                frames_in += runs[stop][1]
                stop += 1
            call = runs[start:stop]
            pv = torch.cat([r[2] for r in call]).to(device=device, dtype=weight.dtype if weight is not None else None)
            grid = torch.tensor([r[3] for r in call], dtype=torch.int64)
            tokens = _features(self.visual(pv, grid_thw=grid.to(device)))  # (sum n * tokens_per_frame, hidden)
            per_run = (grid.prod(-1) // self.merge ** 2).tolist()
            for (b, n, _, _), t in zip(call, tokens.float().split(per_run)):
                sums[b].append(t.view(n, -1, t.shape[-1]).mean(dim=1))  # (n, hidden)
            start = stop
        return [torch.cat(parts) for parts in sums]

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """B strings -> float32 (B, hidden): mean input embedding of each question's tokens (0 if empty)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        L = max(1, max((len(x) for x in ids), default=1))
        tok = torch.zeros(len(ids), L, dtype=torch.long)
        mask = torch.zeros(len(ids), L)
        for i, x in enumerate(ids):
            tok[i, :len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        weight = self.embed.weight
        emb = self.embed(tok.to(weight.device)).float()  # (B, L, hidden)
        mask = mask.to(emb.device)[..., None]
        return (emb * mask).sum(1) / mask.sum(1).clamp_min(1)


class EncoderScorer:
    """A frozen SigLIP / CLIP dual encoder loaded from a local HF folder (never the hub).

    Frames are resized and normalised here in torch (bicubic, antialiased; SigLIP squashes to its square
    input size, CLIP resizes the short side and centre-crops, as their HF processors do), with mean/std
    from the folder's preprocessor_config.json — so neither torchvision nor a particular transformers
    image-processor class is needed. Text goes through the folder's tokenizer.
    """

    def __init__(self, path: str, kind: str = "siglip", device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        if kind not in ("siglip", "clip"):
            raise ScorerError(f"encoder kind must be 'siglip' or 'clip', got {kind!r}")
        folder = Path(path).expanduser()
        if not path or not (folder / "config.json").is_file():
            raise ScorerError(f"keyframes.scorer_path={path!r}: no HF model folder (config.json) there; "
                              f"{kind} scoring needs a local copy of the encoder")
        from transformers import AutoModel, AutoTokenizer

        try:
            self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ScorerError(f"cannot load the {kind} encoder from {folder}: {e}") from e
        if device is not None:
            self.model.to(device)
        self.kind = kind
        pre_file = folder / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        default_mean = (0.5, 0.5, 0.5) if kind == "siglip" else CLIP_MEAN
        default_std = (0.5, 0.5, 0.5) if kind == "siglip" else CLIP_STD
        self.mean = torch.tensor(pre.get("image_mean", default_mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", default_std), dtype=torch.float32).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        self.max_text = int(getattr(self.model.config.text_config, "max_position_embeddings", 64))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, frames: Tensor) -> Tensor:
        x = frames.to(self.device).permute(0, 3, 1, 2).float()  # (P, 3, H, W) in [0, 255]
        S = self.size
        if self.kind == "siglip":
            x = TF.interpolate(x, size=(S, S), mode="bicubic", antialias=True, align_corners=False)
        else:
            H, W = x.shape[-2:]
            scale = S / min(H, W)
            h, w = max(S, round(H * scale)), max(S, round(W * scale))
            x = TF.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            top, left = (h - S) // 2, (w - S) // 2
            x = x[..., top:top + S, left:left + S]
        x = x.clamp(0, 255).round() / 255.0
        return ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(next(self.model.parameters()).dtype)

    @torch.no_grad()
    def embed_frames(self, frames: Tensor) -> Tensor:
        _check_frames(frames)
        return _features(self.model.get_image_features(pixel_values=self._pixels(frames))).float()

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> Tensor:
        if self.kind == "siglip":  # SigLIP was trained on max_length padding, without attention mask
            enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_text,
                                 return_tensors="pt")
            out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device))
        else:
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text,
                                 return_tensors="pt")
            out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                               attention_mask=enc["attention_mask"].to(self.device))
        return _features(out).float()


def build_scorer(cfg: KeyframeConfig, model: nn.Module | None = None, tokenizer=None) -> FrameScorer:
    """The scorer named by cfg.scorer: policy (needs model and tokenizer) | siglip | clip | learned (cfg.scorer_path;
    learned: a strive_engine.learned_scorer folder)."""
    if cfg.scorer == "policy":
        if model is None or tokenizer is None:
            raise ScorerError("keyframes.scorer='policy' needs the policy model and its tokenizer")
        return PolicyScorer(model, tokenizer, score_side=cfg.score_side)
    device = None
    if model is not None:
        device = next(model.parameters()).device
    if cfg.scorer == "learned":
        from strive_engine.learned_scorer import LearnedScorer

        return LearnedScorer.load(cfg.scorer_path, device=device)
    return EncoderScorer(cfg.scorer_path, kind=cfg.scorer, device=device)


@dataclass
class KeyframeSelection:
    indices: Tensor  # (B, K, F) int64, local rows of each pool, sorted and unique per (b, k) (repeats: P_b < F)
    scores: list[Tensor]  # B x (P_b,) float32 cosine(frame, question)
    importance: list[Tensor]  # B x (P_b,) float32 sampling distribution (sums to 1 per pool)
    offsets: Tensor  # (B+1,) int64: pool b is rows offsets[b]:offsets[b+1] of the flat tensors


@torch.no_grad()
def select_keyframes(scorer: FrameScorer, pools: Sequence[Tensor], questions: Sequence[str], cfg: KeyframeConfig,
                     num_variants: int, seed: int, backend: str = "auto",
                     canonical_first: bool = True) -> KeyframeSelection:
    """K keyframe sets of cfg.num_frames frames for each of the B pools (uint8 (P_b, H_b, W_b, 3)).

    seed: Philox key of the variants' quantile offsets (derive it from (run seed, step, rank) so a resumed
    run draws the same frames); variant 0 is the canonical evenly spread set (unless canonical_first=False,
    e.g. evaluation with one importance-sampled view). Pools may differ in size and resolution.

    Short pools (P_b < F: a video with fewer frames than F; see strive_engine.pipeline): F stays, and the frames
    repeat. Every variant shows every frame, frame j of the F slots being pool row floor((j + 0.5) P_b / F) (the
    canonical view's spread, which covers each row once or more, in order), so the variants of that question
    differ by their crops only. qwen-vl-utils instead caps its frame count at the video's (in fps mode) and
    repeats the last frame to an even count; a fixed F keeps every question's visual token count and the
    (B, K, F) layout of the batch. Those rows of `indices` are sorted but not unique; `scores`/`importance`
    still have one entry per pool row (importance summed over a row's repeats).
    """
    if len(pools) != len(questions):
        raise ValueError(f"{len(pools)} frame pools but {len(questions)} questions")
    if not pools:
        raise ValueError("select_keyframes needs at least one pool")
    F = cfg.num_frames
    sizes = [int(p.shape[0]) for p in pools]
    # A short pool enters the sampler as F rows (its frames repeated): the sampler then takes all F rows in every
    # variant, and row r of the padded pool is frame spread[r] of the real one.
    spreads = [canonical_indices(P, F)[0] if P < F else None for P in sizes]
    embed_pools = getattr(scorer, "embed_pools", None)   # the policy scorer: all pools in one tower call
    raw = embed_pools(pools) if embed_pools is not None else [scorer.embed_frames(p) for p in pools]
    embs = []
    for e, spread in zip(raw, spreads):                          # (P_b, D): each distinct frame once
        embs.append(e if spread is None else e[spread.to(e.device)])
    frame_emb = torch.cat(embs)                                      # (sum max(P_b, F), D)
    q_emb = scorer.embed_text(list(questions)).to(frame_emb.device)  # (B, D)
    rows = [F if sp is not None else P for P, sp in zip(sizes, spreads)]
    idx, scores, imp = keyframe_sample(frame_emb, q_emb, torch.tensor([0] + rows).cumsum(0), num_variants, F,
                                       temperature=cfg.temperature, uniform_mix=cfg.uniform_mix,
                                       seed=int(seed) % 2**63, canonical_first=canonical_first, backend=backend)
    scores, imp = list(scores.split(rows)), list(imp.split(rows))
    for b, spread in enumerate(spreads):
        if spread is None:
            continue
        sp = spread.to(idx.device)
        idx[b] = sp[idx[b]]                                          # padded rows -> real pool rows (repeats)
        first = torch.searchsorted(spread, torch.arange(sizes[b]))  # the first padded row of each frame
        scores[b] = scores[b][first.to(scores[b].device)]
        imp[b] = torch.zeros(sizes[b], dtype=imp[b].dtype, device=imp[b].device).index_add_(0, sp.to(imp[b].device),
                                                                                         imp[b])
    return KeyframeSelection(idx, scores, imp, torch.tensor([0] + sizes).cumsum(0))


def canonical_indices(pool_size: int, num_frames: int) -> Tensor:
    """(1, num_frames) int64 pool rows of the canonical view, one index set: floor((j + 0.5) P / F), uniform
    importance sampled at quantiles (j + 0.5) / F — the frames of variant 0 of the keyframe sampler; evenly spread
    and sorted; for P < F every row appears (repeated)."""
    j = torch.arange(num_frames, dtype=torch.float64)
    return ((j + 0.5) * pool_size / num_frames).floor().long().clamp_max(pool_size - 1)[None]
