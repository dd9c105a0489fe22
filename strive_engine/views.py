"""Views of a video -> rollout requests: the one builder of the model's vision inputs.

A view of a question's video is (F frame indices into its decoded pool, a crop box). The RL step asks for K views
per question (keyframe sets and random crops, strive_engine.pipeline), the SFT warm start and uniform evaluation
for the canonical view (evenly spread frames, full frame), importance evaluation for one question-aware frame set
at full frame. All of them go through `ViewBuilder`:

    views = ViewBuilder.for_model(policy.config, cfg.variants)  # vision geometry read from the model, once
    reqs = views.build(records, pools, indices, boxes)         # B questions x K views -> B*K RolloutRequests
    reqs = views.canonical(records, pools, num_frames)         # one canonical view per question

The geometry is the model's (`VisionGeometry`): Qwen2-VL and Qwen2.5-VL cut 14-pixel patches, Qwen3-VL 16-pixel
ones (and normalise pixels with 0.5 / 0.5 where the older two use CLIP's mean / std); both merge 2x2 patches into
one token and pair frames into temporal patches of 2. Output frame sizes are
multiples of patch * merge (smart_resize within variants.min_pixels / max_pixels), patch rows hold
3 * temporal_patch * patch^2 values, and `second_per_grid_ts` is temporal_patch times the frames' mean spacing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from strive_engine.config import VariantConfig
from strive_engine.keyframes import canonical_indices
from strive_engine.rollout import RolloutRequest, second_per_grid
from strive_engine.variants import build_variants, pixel_norm
from strive_engine.video import DecodedVideo
from strive_kernels import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class VisionGeometry:
    """How the model's vision tower cuts a video: `patch` pixels square, `merge` x `merge` patches per token,
    `temporal_patch` frames per temporal patch; pixels normalised with `mean` / `std` (the family's processor's)."""

    patch: int
    merge: int
    temporal_patch: int
    mean: tuple[float, ...] = tuple(CLIP_MEAN)
    std: tuple[float, ...] = tuple(CLIP_STD)

    @classmethod
    def from_config(cls, config: Any) -> "VisionGeometry":
        """From an HF Qwen-VL config (its `vision_config`; the normalisation from its `model_type`)."""
        vc = config.vision_config
        mean, std = pixel_norm(config)
        return cls(patch=int(vc.patch_size), merge=int(vc.spatial_merge_size),
                   temporal_patch=int(getattr(vc, "temporal_patch_size", 2)), mean=mean, std=std)


def full_frame(pool: DecodedVideo) -> Tensor:
    """(1, 4) float32 crop box (x0, y0, x1, y1) of the whole frame."""
    _, H, W, _ = pool.frames.shape
    return torch.tensor([[0.0, 0.0, float(W), float(H)]])


class ViewBuilder:
    """Records + decoded pools + (frame indices, crop boxes) -> RolloutRequests, in the model's vision geometry."""

    def __init__(self, geometry: VisionGeometry, variants: VariantConfig):
        self.geometry = geometry
        self.cfg = variants

    @classmethod
    def for_model(cls, model_config: Any, variants: VariantConfig) -> "ViewBuilder":
        """In the geometry of an HF Qwen-VL config (the policy's `config`)."""
        return cls(VisionGeometry.from_config(model_config), variants)

    def views(self, record: Any, pool: DecodedVideo, indices: Tensor, boxes: Tensor) -> list[RolloutRequest]:
        """The K views of one question: indices (K, F) rows of `pool` (uint8 frames (P, H, W, 3)), boxes (K, 4).
        All K are patchified in one op call (strive_engine.variants.build_variants)."""
        g = self.geometry
        indices = indices.to(torch.long)
        vb = build_variants(pool.frames, indices.to(pool.frames.device), boxes, self.cfg,
                            temporal_patch=g.temporal_patch, patch=g.patch, merge=g.merge, mean=g.mean, std=g.std)
        out = []
        for k, (pix, grid) in enumerate(vb.split()):
            ts = pool.timestamps[indices[k].cpu()]                                # (F,) seconds of the shown frames
            out.append(RolloutRequest(question=record, pixel_values=pix, grid_thw=grid,
                                      second_per_grid_ts=second_per_grid(ts, g.temporal_patch, pool.info.fps)))
        return out

    def build(self, records: Sequence[Any], pools: Sequence[DecodedVideo], indices: Sequence[Tensor],
              boxes: Sequence[Tensor]) -> list[RolloutRequest]:
        """B questions: records[b], pools[b], indices[b] (K, F), boxes[b] (K, 4) -> B*K requests, question-major
        then view."""
        if not (len(records) == len(pools) == len(indices) == len(boxes)):
            raise ValueError(f"ViewBuilder.build: {len(records)} records, {len(pools)} pools, {len(indices)} index "
                             f"sets and {len(boxes)} box sets; need one of each per question")
        return [r for rec, pool, idx, box in zip(records, pools, indices, boxes)
                for r in self.views(rec, pool, idx, box)]

    def canonical(self, records: Sequence[Any], pools: Sequence[DecodedVideo], num_frames: int) -> list[RolloutRequest]:
        """One canonical view per question: `num_frames` evenly spread frames (keyframes.canonical_indices), full
        frame — what the keyframe sampler's variant 0 shows."""
        return self.build(records, pools, [canonical_indices(p.frames.shape[0], num_frames) for p in pools],
                          [full_frame(p) for p in pools])
