"""Pure-torch twin of `strive_kernels.variant_patchify`: the oracle of the C++/CUDA op and its CPU fallback.

One call turns a decoded candidate pool into Qwen2-VL / Qwen2.5-VL `pixel_values_videos` for K variants:

    frames  uint8 (P, H, W, 3)  ->  crop box_k  ->  PIL bicubic resize to out_hw[k]  ->  (u8/255 - mean)/std
            ->  rows (t, h/(p*m), w/(p*m), m, m), features (C, tps, p, p)   (p = patch 14, m = merge 2)

Arithmetic (bit-exact with Pillow's `Image.resize(..., BICUBIC)` and HF's `Qwen2VLImageProcessorPil`):

* Filter weights are Pillow's `precompute_coeffs` in float64 (a = -0.5, support 2 * max(scale, 1), each
  output's taps normalised to sum 1), turned into integers with 22 fractional bits
  (`PRECISION_BITS = 32 - 8 - 2`) and rounded half away from zero, as `normalize_coeffs_8bpc` does.
* Two separable passes, horizontal first: `clip((2**21 + sum u8 * w) >> 22, 0, 255)` each, so the
  intermediate image is rounded to uint8 exactly like Pillow's (int32 sums; exact, order-free).
* Normalise with HF's float32 arithmetic: `x = f32(u8 * (1/255 in f64)); y = (x - f32(mean)) / f32(std)`;
  it depends only on (channel, u8 value), so it is a (3, 256) table (`normalize_lut`).

Box semantics: box = (x0, y0, x1, y1) in source pixels (float32). The filter reads only the box's integer
hull [floor(x0), ceil(x1)) x [floor(y0), ceil(y1)); inside it the result is Pillow's
`crop(hull).resize(out, BICUBIC, box=box - hull origin)`. For an integer box this is exactly
"crop, then resize the crop" (never reads a pixel outside the box).

Frames: variant k uses rows `indices[k]` of `frames`; F odd (or not a multiple of `temporal_patch`) is
padded by repeating the last index, as HF's Qwen2-VL video processor does. A batch of same-size pools is a
concatenation along P: add pool b's offset to its variants' indices.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISION_BITS = 22  # Pillow: 32 - 8 - 2 (8 bits of result, 2 bits of headroom for negative lobes)
BICUBIC_SUPPORT = 2.0
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------ validation


def check_variant_inputs(frames, indices, boxes, out_hw, mean, std, temporal_patch, patch, merge, out_dtype):
    """Validate the op's inputs; return (indices (K, F) int64 CPU, boxes (K, 4) float32 CPU, out_hw list).

    Raises TypeError (dtype), ValueError (shape, size, box, parameter) or IndexError (frame index), each
    naming the argument and the offending value. Shared by the reference and the native front end so that
    both paths reject the same inputs with the same messages (the C++ op re-checks on its own).
    """
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8 (decoded RGB), got {frames.dtype}")
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (P, H, W, 3), got {tuple(frames.shape)}")
    P, H, W, _ = frames.shape
    if P < 1 or H < 1 or W < 1:
        raise ValueError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
    for name, v in (("temporal_patch", temporal_patch), ("patch", patch), ("merge", merge)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3:
            raise ValueError(f"{name} must have 3 values (R, G, B), got {list(v)}")
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be > 0, got {list(std)}")

    indices = torch.as_tensor(indices)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor (int64), got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[1] < 1:
        raise ValueError(f"indices must have shape (K, F) with F >= 1, got {tuple(indices.shape)}")
    indices = indices.to("cpu", torch.int64)
    K = indices.shape[0]
    if K and (indices.min() < 0 or indices.max() >= P):
        bad = indices[(indices < 0) | (indices >= P)][0].item()
        raise IndexError(f"indices must be in [0, P={P}), got {bad}")

    boxes = torch.as_tensor(boxes)
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"boxes must be a float32 (or integer) tensor, got {boxes.dtype}")
    if boxes.shape != (K, 4):
        raise ValueError(f"boxes must have shape (K={K}, 4) as (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    boxes = boxes.to("cpu", torch.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ok = all(map(math.isfinite, (x0, y0, x1, y1)))
        if not (ok and 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise ValueError(f"boxes[{k}] = {(x0, y0, x1, y1)} must satisfy 0 <= x0 < x1 <= W={W} and "
                             f"0 <= y0 < y1 <= H={H}")

    if isinstance(out_hw, torch.Tensor):
        if out_hw.dtype.is_floating_point:
            raise TypeError(f"out_hw must be integer, got {out_hw.dtype}")
        out_hw = out_hw.tolist()
    out_hw = [tuple(hw) for hw in out_hw]
    if len(out_hw) != K:
        raise ValueError(f"out_hw must have one (h, w) per variant (K={K}), got {len(out_hw)}")
    factor = patch * merge
    for k, hw in enumerate(out_hw):
        ints = len(hw) == 2 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in hw)
        if not (ints and all(v > 0 and v % factor == 0 for v in hw)):
            raise ValueError(f"out_hw[{k}] = {hw} must be two positive multiples of patch*merge={factor}")
    return indices, boxes, [(int(h), int(w)) for h, w in out_hw]


# ----------------------------------------------------------------------------------- Pillow's arithmetic


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic_filter (a = -0.5) on float64, same operation order as the C source."""
    x = x.abs()
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def pil_bicubic_coeffs(in_size: int, in0: float, in1: float, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.

    Resamples the input span [in0, in1) (float32 values, as Pillow's box) of an axis of `in_size` pixels to
    `out_size` pixels. Returns bounds (out, 2) int64 = (first tap, number of taps) and weights
    (out, ksize) int32 with 22 fractional bits (taps past the count are 0).
    """
    in0, in1 = np.float32(in0), np.float32(in1)
    scale = float(in1 - in0) / out_size  # float32 subtraction, then double, as in C
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xx = torch.arange(out_size, dtype=torch.float64)
    center = float(in0) + (xx + 0.5) * scale  # (out,)
    ss = 1.0 / filterscale
    xmin = (center - support + 0.5).trunc().clamp(min=0)  # C's (int) truncates toward zero
    xmax = (center + support + 0.5).trunc().clamp(max=in_size)
    count = xmax - xmin  # (out,)
    taps = torch.arange(ksize, dtype=torch.float64)
    w = _bicubic(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss)  # (out, ksize)
    w = torch.where(taps[None, :] < count[:, None], w, torch.zeros_like(w))
    ww = torch.zeros(out_size, dtype=torch.float64)
    for j in range(ksize):  # sequential sum: same rounding as the C loop
        ww = ww + w[:, j]
    w = torch.where(ww[:, None] != 0.0, w / ww[:, None], w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = torch.where(w < 0, scaled - 0.5, scaled + 0.5).trunc().to(torch.int32)
    bounds = torch.stack([xmin, count], dim=1).to(torch.int64)
    return bounds, fixed


def box_hull(box: Sequence[float]) -> tuple[int, int, int, int]:
    """Integer hull (x0, y0, x1, y1) of a float box: the only pixels the filter may read."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def axis_plan(lo: float, hi: float, out_size: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Hull start, hull size, bounds and weights for one axis of a box [lo, hi) resized to out_size."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    start, stop = math.floor(lo32), math.ceil(hi32)
    # lo32 - start and hi32 - start are exact in float32 (same binade or smaller, integer start)
    bounds, weights = pil_bicubic_coeffs(stop - start, lo32 - np.float32(start), hi32 - np.float32(start), out_size)
    return start, stop - start, bounds, weights


def _resample_axis(src: torch.Tensor, bounds: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """One fixed-point pass along `dim` of a uint8 tensor: clip((2**21 + sum u8 * w) >> 22) -> uint8."""
    src = src.movedim(dim, -1)  # (..., n_in)
    acc = torch.full((*src.shape[:-1], bounds.shape[0]), 1 << (PRECISION_BITS - 1), dtype=torch.int32,
                     device=src.device)
    last = src.shape[-1] - 1
    for j in range(weights.shape[1]):
        w = weights[:, j]
        if not bool(w.any()):
            continue
        taps = (bounds[:, 0] + j).clamp(max=last)  # taps past the count carry weight 0
        acc += src.index_select(-1, taps.to(src.device)).to(torch.int32) * w.to(src.device)
    out = torch.div(acc, 1 << PRECISION_BITS, rounding_mode="floor").clamp_(0, 255).to(torch.uint8)
    return out.movedim(-1, dim)


def resize_box_reference(frames: torch.Tensor, box: Sequence[float], out_h: int, out_w: int) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> uint8 (n, out_h, out_w, 3): crop `box`, Pillow bicubic resize (see module doc)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    hx, hull_w, bh, wh = axis_plan(x0, x1, out_w)
    hy, hull_h, bv, wv = axis_plan(y0, y1, out_h)
    # Only the rows the vertical pass reads are resampled horizontally (Pillow's ybox_first/last).
    r0 = int(bv[0, 0])
    r1 = int(bv[-1, 0] + bv[-1, 1])
    src = frames[:, hy + r0:hy + r1, hx:hx + hull_w, :]  # (n, rows, hull_w, 3)
    tmp = _resample_axis(src, bh, wh, dim=2)  # (n, rows, out_w, 3)
    bv = bv.clone()
    bv[:, 0] -= r0
    return _resample_axis(tmp, bv, wv, dim=1)  # (n, out_h, out_w, 3)


def normalize_lut(mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(3, 256) float32: HF's `normalize(rescale(u8))` for every (channel, value), same float32 steps."""
    x = (torch.arange(256, dtype=torch.float64) * (1 / 255)).to(torch.float32)  # rescale: f64 product, f32
    m = torch.tensor(mean, dtype=torch.float64).to(torch.float32)[:, None]
    s = torch.tensor(std, dtype=torch.float64).to(torch.float32)[:, None]
    return (x[None, :] - m) / s


def grid_and_offsets(num_frames: int, out_hw, temporal_patch: int, patch: int) -> tuple[torch.Tensor, list[int]]:
    """grid_thw (K, 3) int64 and the first pixel_values row of each variant (plus the total at the end)."""
    t = -(-num_frames // temporal_patch)
    grid = torch.tensor([[t, h // patch, w // patch] for h, w in out_hw], dtype=torch.int64).reshape(-1, 3)
    offsets = [0]
    for g in grid.tolist():
        offsets.append(offsets[-1] + g[0] * g[1] * g[2])
    return grid, offsets


def patchify(video: torch.Tensor, temporal_patch: int, patch: int, merge: int) -> torch.Tensor:
    """(T, h, w, C) -> (T/tps * h/p * w/p, C*tps*p*p) in Qwen2-VL order (T already a multiple of tps)."""
    T, h, w, C = video.shape
    x = video.reshape(T // temporal_patch, temporal_patch, h // (patch * merge), merge, patch,
                      w // (patch * merge), merge, patch, C)
    # (t, s, bh, m1, py, bw, m2, px, c) -> (t, bh, bw, m1, m2, c, s, py, px)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return x.reshape(-1, C * temporal_patch * patch * patch)


# ------------------------------------------------------------------------------------------- the op


def variant_patchify_reference(frames, indices, boxes, out_hw, mean=CLIP_MEAN, std=CLIP_STD, temporal_patch=2,
                               patch=14, merge=2, out_dtype=torch.float32):
    """Reference of `strive_kernels.variant_patchify` (same contract; see the module docstring).

    frames uint8 (P, H, W, 3); indices int (K, F); boxes float (K, 4) (x0, y0, x1, y1); out_hw (K, 2) ints,
    multiples of patch*merge. Returns pixel_values (sum_k ceil(F/tps)*(h_k/p)*(w_k/p), 3*tps*p*p) in
    `out_dtype` on frames' device and grid_thw (K, 3) int64 = (ceil(F/tps), h/p, w/p) on the same device.
    """
    indices, boxes, out_hw = check_variant_inputs(frames, indices, boxes, out_hw, mean, std, temporal_patch,
                                                  patch, merge, out_dtype)
    K, F = indices.shape
    device = frames.device
    grid, offsets = grid_and_offsets(F, out_hw, temporal_patch, patch)
    lut = normalize_lut(mean, std).to(device)  # (3, 256)
    pad = -F % temporal_patch
    if pad:  # repeat the last frame, as HF's Qwen2-VL video processor does
        indices = torch.cat([indices, indices[:, -1:].expand(K, pad)], dim=1)
    channel = torch.arange(3, device=device)
    parts = []
    for k in range(K):
        h, w = out_hw[k]
        uniq, inverse = torch.unique(indices[k], return_inverse=True)  # each source frame resized once
        resized = resize_box_reference(frames[uniq.to(device)], boxes[k].tolist(), h, w)  # (u, h, w, 3)
        values = lut[channel, resized.long()]  # (u, h, w, 3) float32
        video = values[inverse.to(device)]  # (T*tps, h, w, 3)
        parts.append(patchify(video, temporal_patch, patch, merge).to(out_dtype))
    width = 3 * temporal_patch * patch * patch
    pixel_values = torch.cat(parts) if parts else torch.empty(0, width, dtype=out_dtype, device=device)
    assert pixel_values.shape[0] == offsets[-1]
    return pixel_values, grid.to(device)
