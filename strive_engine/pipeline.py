"""Stages 2–4 for one batch: decode each video once, pick K keyframe sets, build K variants → rollout requests.

Every rank always produces exactly B question slots, so every rank makes the same sequence of calls into the
sharded policy (FSDP2 collectives must match across ranks). A slot whose video cannot be decoded is *skipped and
counted*: it is filled with a placeholder (a black pool and the failed record's question) whose rows carry no
loss and no statistics (`valid[b] = False`). The batch therefore runs short rather than being refilled: refilling
from the loader would make ranks' data positions diverge and break exact resume.

Short videos. A video with fewer frames than `video.pool_frames` is not skipped: its pool holds every frame it has
(P_b = its frame count; pools are ragged anyway). Keyframe sampling draws F of them when P_b >= F; when P_b < F the
frames repeat (`keyframes.select_keyframes`). Only a video that cannot be decoded at all is skipped.

`SkipTally` counts what was skipped and why over a run (by error type, with the first message of each), and the
records file's own load report; `train.py` prints its summary at the end of every run and stops with
`NoValidSamples` (listing it) when `data.max_empty_steps` steps in a row had no valid sample on any rank.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from strive_engine.config import Config
from strive_engine.data import RecordFileError, VideoQA
from strive_engine.keyframes import FrameScorer, select_keyframes
from strive_engine.metrics import StageTimer
from strive_engine.rollout import RolloutRequest
from strive_engine.variants import sample_crop_boxes
from strive_engine.views import ViewBuilder
from strive_engine.video import DecodedVideo, NotEnoughFrames, VideoError, VideoInfo, VideoSource

log = logging.getLogger(__name__)


@dataclass
class DecodedBatch:
    records: list[VideoQA]                 # B records, placeholders included
    pools: list[DecodedVideo]              # B candidate pools, uint8 (P_b, H, W, 3)
    valid: torch.Tensor                    # (B,) bool
    skipped: Counter = field(default_factory=Counter)  # error type -> count
    errors: list[VideoError] = field(default_factory=list)  # the skipped slots' errors (file and reason)
    short: int = 0                         # valid pools holding fewer frames than asked (the whole video)


def _placeholder(record: VideoQA, pool_frames: int, device: str | torch.device = "cpu", side: int = 56
                 ) -> DecodedVideo:
    """Where the good pools are (a CPU placeholder among CUDA pools broke the step's torch.cat of their pixels)."""
    frames = torch.zeros(pool_frames, side, side, 3, dtype=torch.uint8, device=device)
    info = VideoInfo(path=record.path, num_frames=pool_frames, fps=1.0, duration=float(pool_frames),
                     width=side, height=side, codec="placeholder")
    return DecodedVideo(frames=frames, indices=torch.arange(pool_frames),
                        timestamps=torch.arange(pool_frames, dtype=torch.float64), info=info)


def decode_batch(records: list[VideoQA], source: VideoSource, pool_frames: int, device: str | torch.device = "cpu",
                 log_errors: bool = True) -> DecodedBatch:
    """Candidate pool of P frames spread over each video (all of a shorter video's frames); videos that cannot be
    decoded become counted placeholders."""
    results = source.read_batch([(r.path, None, pool_frames) for r in records], device=device)
    # A video shorter than the pool: ask again for every frame it has (its probe is cached: no second demux).
    short = [b for b, res in enumerate(results) if isinstance(res, NotEnoughFrames) and (res.available or 0) >= 1]
    if short:
        again = source.read_batch([(records[b].path, None, results[b].available) for b in short], device=device)
        for b, res in zip(short, again):
            results[b] = res
    batch = DecodedBatch(list(records), [], torch.zeros(0, dtype=torch.bool))
    valid = []
    for rec, res in zip(records, results):
        if isinstance(res, VideoError):
            batch.skipped[type(res).__name__] += 1
            batch.errors.append(res)
            if log_errors:
                log.warning("skipping %s (%s): %s", rec.source, type(res).__name__, res)
            batch.pools.append(_placeholder(rec, pool_frames, device))
            valid.append(False)
        else:
            batch.pools.append(res)
            batch.short += int(res.frames.shape[0] < pool_frames)
            valid.append(True)
    batch.valid = torch.tensor(valid, dtype=torch.bool)
    return batch


def prepare_batch(decoded: DecodedBatch, scorer: FrameScorer, views: ViewBuilder, cfg: Config, seed: int,
                  timer: StageTimer | None = None) -> list[RolloutRequest]:
    """Keyframes (stage 3) and variants (stage 4) for a decoded batch -> B*K rollout requests, question-major then
    variant: K keyframe sets per question (variant 0 the canonical frames) and K crop boxes (box 0 the full frame).

    `seed` fixes the keyframe quantile offsets and the crop boxes (derive it from (run seed, step, rank)).
    """
    K = cfg.variants.num_variants
    time = timer or (lambda _: contextlib.nullcontext())
    with time("keyframes"):
        sel = select_keyframes(scorer, [p.frames for p in decoded.pools], [r.question for r in decoded.records],
                               cfg.keyframes, num_variants=K, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with time("variants"):
        boxes = [sample_crop_boxes(K, p.frames.shape[1], p.frames.shape[2], cfg.variants, gen)  # (K, 4) each
                 for p in decoded.pools]
        return views.build(decoded.records, decoded.pools, list(sel.indices), boxes)


class NoValidSamples(RecordFileError):
    """`data.max_empty_steps` steps in a row had no valid sample on any rank; the message lists what was skipped."""


def _reason_names() -> list[str]:
    """Every VideoError subclass name, sorted: the fixed layout of the counts summed over ranks."""
    seen, todo = set(), [VideoError]
    while todo:
        for c in todo.pop().__subclasses__():
            if c.__name__ not in seen:
                seen.add(c.__name__)
                todo.append(c)
    return sorted(seen) + ["VideoError"]


class SkipTally:
    """What a run skipped and why, on this rank: videos by error type (with the first message of each), and the
    pools that were shorter than asked (not skipped: shown whole). `add` takes each DecodedBatch a step consumed;
    `global_counts` sums over ranks (a collective: every rank calls it at the same point); `summary` is the line a
    run ends with. `empty_step(valid)` tracks the steps in a row without a valid sample on any rank."""

    def __init__(self, max_empty_steps: int = 0, load_report=None):
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.short = 0
        self.max_empty_steps = max_empty_steps
        self.empty_streak = 0
        self.load_report = load_report  # strive_engine.data.LoadReport of the records file

    def add(self, decoded: DecodedBatch) -> None:
        self.counts.update(decoded.skipped)
        for e in decoded.errors:
            self.examples.setdefault(type(e).__name__, str(e))
        self.short += decoded.short

    def global_counts(self) -> Counter:
        from strive_engine.parallel import all_reduce

        names = _reason_names() + ["short"]
        mine = dict(self.counts, short=self.short)
        other = sum(v for k, v in mine.items() if k not in names)
        vec = torch.tensor([float(mine.get(n, 0)) for n in names] + [float(other)])
        vec = all_reduce(vec)
        return Counter({n: int(v) for n, v in zip(names + ["other"], vec.tolist()) if v})

    def num_skipped(self, counts: Counter) -> int:
        """Videos skipped (from global_counts) plus records rejected at load."""
        rejected = sum(self.load_report.skipped.values()) if self.load_report is not None else 0
        return sum(v for k, v in counts.items() if k != "short") + rejected

    def summary(self, counts: Counter | None = None) -> str:
        """One line: records rejected at load, videos skipped by reason (with an example), short videos."""
        counts = Counter(self.global_counts() if counts is None else counts)
        short = counts.pop("short", 0)
        parts = []
        if self.load_report is not None:
            parts.append(f"records {self.load_report.summary()}")
        if counts:
            by = ", ".join(f"{k} x{v}" + (f" (e.g. {self.examples[k]})" if k in self.examples else "")
                           for k, v in counts.most_common())
            parts.append(f"videos skipped (undecodable): {sum(counts.values())}: {by}")
        else:
            parts.append("videos skipped: none")
        if short:
            parts.append(f"{short} pool(s) from videos shorter than video.pool_frames used every frame the video has "
                         f"(not skipped)")
        return "; ".join(parts)

    def empty_step(self, valid_samples: int, phase: str, step: int) -> None:
        """Count a step (its valid samples summed over ranks); raise NoValidSamples, with the summary, when
        max_empty_steps steps in a row had none. Every rank sees the same global count, so all raise together."""
        self.empty_streak = 0 if valid_samples > 0 else self.empty_streak + 1
        if self.max_empty_steps and self.empty_streak >= self.max_empty_steps:
            raise NoValidSamples(f"no valid sample in {self.empty_streak} steps in a row (the last: {phase} step "
                                 f"{step}; data.max_empty_steps={self.max_empty_steps}): {self.summary()}")
