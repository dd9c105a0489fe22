"""Stage 4: spatiotemporal variants of one video -> Qwen2-VL / Qwen2.5-VL vision inputs.

A variant is (index set, crop box): `indices[k]` (F frames of the decoded pool, from the keyframe sampler)
and `boxes[k]` (a random resized crop; variant 0 is always the full frame, the canonical view). Each
variant is resized to `smart_resize(crop_h, crop_w)` (multiples of 28 within min/max pixels, as HF's
processor picks) and patchified by `strive_kernels.variant_patchify` (C++/CUDA op, Pillow-exact bicubic):

    boxes = sample_crop_boxes(K, H, W, cfg.variants, generator)          # (K, 4), boxes[0] = full frame
    batch = build_variants(pool, indices, boxes, cfg.variants)           # pool uint8 (P, H, W, 3)
    for pv, grid in batch.split(): model(..., pixel_values_videos=pv, video_grid_thw=grid)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from strive_engine.config import VariantConfig
from strive_kernels import CLIP_MEAN, CLIP_STD, variant_patchify


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """HF Qwen2-VL's output size for an image of (height, width): both multiples of `factor`, about the same
    aspect, area within [min_pixels, max_pixels] (nearest multiples first, then scaled down / up).

    Same arithmetic as `transformers...qwen2_vl.image_processing_qwen2_vl.smart_resize` (Python's round is
    half-to-even there too). Raises ValueError for an empty size or an aspect ratio above 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"smart_resize: height and width must be >= 1, got ({height}, {width})")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"smart_resize: absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)} for ({height}, {width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_crop_boxes(num_variants: int, height: int, width: int, cfg: VariantConfig,
                      generator: torch.Generator) -> torch.Tensor:
    """(K, 4) float32 integer-aligned crop boxes (x0, y0, x1, y1); row 0 is the full frame.

    Rows 1.. are random resized crops (torchvision's RandomResizedCrop procedure): area fraction uniform in
    [crop_area_min, crop_area_max], aspect w/h log-uniform in [crop_aspect_min, crop_aspect_max], position
    uniform; up to 10 draws, then the largest centred crop with the aspect clamped into range (it may miss
    the area range when the frame's own aspect is far outside the aspect range). Deterministic given the
    generator's state; every box satisfies 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height.
    """
    if num_variants < 1:
        raise ValueError(f"sample_crop_boxes: num_variants must be >= 1, got {num_variants}")
    if height < 1 or width < 1:
        raise ValueError(f"sample_crop_boxes: frame size must be >= 1, got ({height}, {width})")
    boxes = [(0, 0, width, height)]
    area = height * width
    log_lo, log_hi = math.log(cfg.crop_aspect_min), math.log(cfg.crop_aspect_max)
    for _ in range(1, num_variants):
        box = None
        for _attempt in range(10):
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target = area * (cfg.crop_area_min + u[0] * (cfg.crop_area_max - cfg.crop_area_min))
            aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x0 = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                y0 = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                box = (x0, y0, x0 + w, y0 + h)
                break
        if box is None:  # fallback: centred crop, aspect clamped into range
            ratio = width / height
            if ratio < cfg.crop_aspect_min:
                w, h = width, max(1, min(height, round(width / cfg.crop_aspect_min)))
            elif ratio > cfg.crop_aspect_max:
                w, h = max(1, min(width, round(height * cfg.crop_aspect_max))), height
            else:
                w, h = width, height
            x0, y0 = (width - w) // 2, (height - h) // 2
            box = (x0, y0, x0 + w, y0 + h)
        boxes.append(box)
    return torch.tensor(boxes, dtype=torch.float32)


@dataclass
class VariantBatch:
    """The K variants of one video, ready for the vision tower.

    pixel_values  (N, 3 * tps * p * p) = (N, 1176) for Qwen2/2.5-VL, all variants concatenated
    grid_thw      (K, 3) int64 (t, h/14, w/14) per variant (the model's `video_grid_thw`)
    out_hw        (K, 2) int64 output (h, w) per variant
    boxes         (K, 4) float32 crop boxes; indices (K, F) int64 pool rows
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    out_hw: torch.Tensor
    boxes: torch.Tensor
    indices: torch.Tensor

    def split(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-variant (pixel_values_k (N_k, D), grid_thw_k (1, 3)): views, no copies."""
        counts = self.grid_thw.prod(dim=1).tolist()
        parts = torch.split(self.pixel_values, counts, dim=0)
        return [(pv, self.grid_thw[k:k + 1]) for k, pv in enumerate(parts)]


def variant_sizes(boxes: torch.Tensor, cfg: VariantConfig, factor: int = 28) -> torch.Tensor:
    """(K, 2) int64 output size per box: smart_resize of the crop's (rounded) size within cfg's pixels."""
    sizes = []
    for x0, y0, x1, y1 in boxes.tolist():
        crop_h, crop_w = max(1, round(y1 - y0)), max(1, round(x1 - x0))
        sizes.append(smart_resize(crop_h, crop_w, factor, cfg.min_pixels, cfg.max_pixels))
    return torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)


# HF's processors normalise Qwen3-VL's pixels with IMAGENET_STANDARD_MEAN/STD (0.5), Qwen2-VL's and Qwen2.5-VL's
# with OPENAI_CLIP_MEAN/STD (transformers.image_utils).
HALF = (0.5, 0.5, 0.5)


def pixel_norm(model_config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model family's HF processor normalises pixels with: Qwen3-VL 0.5 / 0.5, Qwen2-VL and
    Qwen2.5-VL the OpenAI CLIP values."""
    if str(getattr(model_config, "model_type", "")).startswith("qwen3_vl"):
        return HALF, HALF
    return tuple(CLIP_MEAN), tuple(CLIP_STD)


def build_variants(frames: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, cfg: VariantConfig,
                   out_dtype: torch.dtype = torch.float32, *, temporal_patch: int = 2, patch: int = 14,
                   merge: int = 2, mean=CLIP_MEAN, std=CLIP_STD) -> VariantBatch:
    """Crop, resize, normalise (mean/std: the model's, see `pixel_norm`) and patchify every variant in one op call.

    frames uint8 (P, H, W, 3) on CPU or CUDA; indices (K, F); boxes (K, 4) (see `sample_crop_boxes`).
    Output size per variant = smart_resize(crop h, crop w, patch * merge, cfg.min_pixels, cfg.max_pixels);
    the backend is cfg.backend (auto | native | reference, strive_kernels' vocabulary). Qwen3-VL: patch=16.
    """
    indices = torch.as_tensor(indices).to("cpu", torch.int64)
    boxes = torch.as_tensor(boxes).to("cpu", torch.float32)
    out_hw = variant_sizes(boxes, cfg, patch * merge)
    pixel_values, grid_thw = variant_patchify(frames, indices, boxes, out_hw, mean, std, temporal_patch=temporal_patch,
                                              patch=patch, merge=merge, out_dtype=out_dtype,
                                              backend=cfg.backend)
    return VariantBatch(pixel_values, grid_thw, out_hw, boxes, indices)
