"""Stages 2–4 for one batch: decode each video once, pick K keyframe sets, build K variants → rollout requests.

Every rank always produces exactly B question slots, so every rank makes the same sequence of calls into the
sharded policy (FSDP2 collectives must match across ranks). A slot whose video cannot be decoded is *skipped and
counted*: it is filled with a placeholder (a black pool and the failed record's question) whose rows carry no
loss and no statistics (`valid[b] = False`). The batch therefore runs short rather than being refilled: refilling
from the loader would make ranks' data positions diverge and break exact resume.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from strive_engine.config import Config
from strive_engine.data import VideoQA
from strive_engine.keyframes import select_keyframes
from strive_engine.rollout import RolloutRequest, second_per_grid
from strive_engine.variants import build_variants, sample_crop_boxes
from strive_engine.video import DecodedVideo, VideoError, VideoInfo, VideoSource

log = logging.getLogger(__name__)


@dataclass
class DecodedBatch:
    records: list[VideoQA]                 # B records, placeholders included
    pools: list[DecodedVideo]              # B candidate pools, uint8 (P_b, H, W, 3)
    valid: torch.Tensor                    # (B,) bool
    skipped: Counter = field(default_factory=Counter)  # error type -> count


@dataclass
class PreparedBatch:
    decoded: DecodedBatch
    requests: list[RolloutRequest]         # B*K, question-major then variant
    indices: torch.Tensor                  # (B, K, F) chosen pool rows
    importance: list[torch.Tensor]         # per question (P_b,)


def _placeholder(record: VideoQA, pool_frames: int, side: int = 56) -> DecodedVideo:
    frames = torch.zeros(pool_frames, side, side, 3, dtype=torch.uint8)
    info = VideoInfo(path=record.path, num_frames=pool_frames, fps=1.0, duration=float(pool_frames),
                     width=side, height=side, codec="placeholder")
    return DecodedVideo(frames=frames, indices=torch.arange(pool_frames),
                        timestamps=torch.arange(pool_frames, dtype=torch.float64), info=info)


def decode_batch(records: list[VideoQA], source: VideoSource, pool_frames: int, device: str | torch.device = "cpu",
                 log_errors: bool = True) -> DecodedBatch:
    """Candidate pool of P frames spread over each video; bad videos become counted placeholders."""
    results = source.read_batch([(r.path, None, pool_frames) for r in records], device=device)
    pools, valid, skipped = [], [], Counter()
    for rec, res in zip(records, results):
        if isinstance(res, VideoError):
            skipped[type(res).__name__] += 1
            if log_errors:
                log.warning("skipping %s (%s): %s", rec.source, type(res).__name__, res)
            pools.append(_placeholder(rec, pool_frames))
            valid.append(False)
        else:
            pools.append(res)
            valid.append(True)
    return DecodedBatch(list(records), pools, torch.tensor(valid, dtype=torch.bool), skipped)


def prepare_batch(decoded: DecodedBatch, scorer, cfg: Config, seed: int, out_dtype: torch.dtype = torch.float32,
                  timer=None) -> PreparedBatch:
    """Keyframes (stage 3) and variants (stage 4) for a decoded batch → B*K rollout requests.

    `seed` fixes the keyframe quantile offsets and the crop boxes (derive it from (run seed, step, rank)).
    """
    K = cfg.variants.num_variants
    time = timer or (lambda _: _NullCtx())
    with time("keyframes"):
        sel = select_keyframes(scorer, [p.frames for p in decoded.pools], [r.question for r in decoded.records],
                               cfg.keyframes, num_variants=K, seed=seed)
    requests, importance = [], []
    gen = torch.Generator().manual_seed(seed)
    with time("variants"):
        for b, (rec, pool) in enumerate(zip(decoded.records, decoded.pools)):
            _, H, W, _ = pool.frames.shape
            idx = sel.indices[b].to(torch.long)                                     # (K, F) pool rows
            boxes = sample_crop_boxes(K, H, W, cfg.variants, gen)                   # (K, 4)
            vb = build_variants(pool.frames, idx.to(pool.frames.device), boxes, cfg.variants, out_dtype=out_dtype)
            for k, (pix, grid) in enumerate(vb.split()):
                ts = pool.timestamps[idx[k].cpu()]
                requests.append(RolloutRequest(question=rec, pixel_values=pix, grid_thw=grid,
                                               second_per_grid_ts=second_per_grid(ts, 2, pool.info.fps)))
            importance.append(sel.importance[b] if isinstance(sel.importance, list) else sel.importance)
    return PreparedBatch(decoded, requests, sel.indices, importance)


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
