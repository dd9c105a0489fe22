"""Models of how a decoder may turn 4:2:0 YCbCr into RGB, for the colour tests (test_colour.py, test_dali.py,
test_nvdec.py): each one predicts a decoder's RGB from the YCbCr planes of a real decoded frame, so a
measured difference can be attributed to the matrix, the range or the chroma upsampling.

    y, u, v = frame_planes(frame)                     # uint8 (H, W), (H/2, W/2), (H/2, W/2) of a PyAV frame
    dali_cuda_rgb(y, u, v)                            # DALI 2.x's CUDA conversion (VideoColorSpaceConversionKernel)
    textbook_rgb(y, u, v, "709", full_range=False, chroma="replicate")   # a float reference of any hypothesis
"""
from __future__ import annotations

import numpy as np
import torch

KR_KB = {"601": (0.299, 0.114), "709": (0.2126, 0.0722)}


def frame_planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, Cb, Cr of a yuv420p/yuvj420p PyAV frame, cropped to the picture (the planes are row-padded)."""
    out = []
    for i, p in enumerate(frame.planes):
        h, w = (frame.height, frame.width) if i == 0 else ((frame.height + 1) // 2, (frame.width + 1) // 2)
        out.append(np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:h, :w].copy())
    return tuple(out)


def _bilinear_centre(c: np.ndarray, H: int, W: int, truncate: bool) -> np.ndarray:
    """Chroma (h, w) sampled at each luma pixel's centre (chroma sited at the centre of its 2x2 block),
    bilinear with clamped borders, float32 as DALI's sampler computes it."""
    h2, w2 = c.shape
    f = np.float32
    cx = (np.arange(W) // 2).astype(f) + (np.arange(W) % 2) * f(0.5) + f(0.25) - f(0.5)  # DALI: halfx + j/2 + 1/4
    cy = (np.arange(H) // 2).astype(f) + (np.arange(H) % 2) * f(0.5) + f(0.25) - f(0.5)  # minus the sampler's 1/2
    x0, y0 = np.floor(cx).astype(int), np.floor(cy).astype(int)
    qx, qy = (cx - x0).astype(f), (cy - y0).astype(f)
    c = c.astype(f)
    X0, X1 = np.clip(x0, 0, w2 - 1), np.clip(x0 + 1, 0, w2 - 1)
    Y0, Y1 = np.clip(y0, 0, h2 - 1), np.clip(y0 + 1, 0, h2 - 1)
    s0 = c[Y0][:, X0] * (1 - qx) + c[Y0][:, X1] * qx
    s1 = c[Y1][:, X0] * (1 - qx) + c[Y1][:, X1] * qx
    out = s0 + (s1 - s0) * qy[:, None]
    return np.floor(np.clip(out, 0, 255)) if truncate else out


def dali_cuda_rgb(y, u, v, full_range: bool = False, truncate: bool = False) -> np.ndarray:
    """DALI's mixed-backend RGB: luma nearest, chroma bilinear at centre siting (`truncate`: the variant whose
    sampler writes uint8, which truncates), then BT.601 limited (1.164/1.596/0.813/0.392/2.017) or JPEG full
    range, rounded to nearest. uint8 (H, W, 3)."""
    H, W = y.shape
    U, V = _bilinear_centre(u, H, W, truncate), _bilinear_centre(v, H, W, truncate)
    Y = y.astype(np.float32)
    if full_range:
        cb, cr = U - 128, V - 128
        rgb = [Y + 1.402 * cr, Y - 0.34413629 * cb - 0.71413629 * cr, Y + 1.772 * cb]
    else:
        ty, cb, cr = 1.164 * (Y - 16), U - 128, V - 128
        rgb = [ty + 1.596 * cr, ty - 0.813 * cr - 0.392 * cb, ty + 2.017 * cb]
    return np.clip(np.rint(np.stack(rgb, -1)), 0, 255).astype(np.uint8)


def textbook_rgb(y, u, v, matrix: str = "601", full_range: bool = False, chroma: str = "replicate") -> np.ndarray:
    """The float64 textbook conversion with `matrix` (601 | 709), range and chroma upsampling (replicate |
    bilinear at centre siting), rounded once. uint8 (H, W, 3)."""
    H, W = y.shape
    if chroma == "replicate":
        U, V = (np.repeat(np.repeat(c, 2, 0), 2, 1)[:H, :W].astype(np.float64) for c in (u, v))
    else:
        U, V = (_bilinear_centre(c, H, W, False).astype(np.float64) for c in (u, v))
    kr, kb = KR_KB[matrix]
    kg = 1 - kr - kb
    m = np.array([[1, 0, 2 * (1 - kr)], [1, -2 * (1 - kb) * kb / kg, -2 * (1 - kr) * kr / kg], [1, 2 * (1 - kb), 0]])
    Y = y.astype(np.float64)
    ycc = (np.stack([Y / 255, (U - 128) / 255, (V - 128) / 255], -1) if full_range else
           np.stack([(Y - 16) / 219, (U - 128) / 224, (V - 128) / 224], -1))
    return np.clip(np.rint(ycc @ m.T * 255), 0, 255).astype(np.uint8)


def away_from_edges(frames: torch.Tensor, step: int = 24, reach: int = 2) -> torch.Tensor:
    """(P, H, W) bool: pixels more than `reach` px from any jump of > `step` levels in `frames` (P, H, W, 3):
    beyond the reach of 4:2:0 chroma upsampling, where only matrix, range and rounding tell conversions apart."""
    f = frames.float()
    jump_x = (f[:, :, 1:] - f[:, :, :-1]).abs().amax(-1) > step
    jump_y = (f[:, 1:] - f[:, :-1]).abs().amax(-1) > step
    edge = torch.zeros(frames.shape[:3], dtype=torch.bool)
    edge[:, :, 1:] |= jump_x
    edge[:, :, :-1] |= jump_x
    edge[:, 1:] |= jump_y
    edge[:, :-1] |= jump_y
    return torch.nn.functional.max_pool2d(edge.float()[:, None], 2 * reach + 1, 1, reach)[:, 0] == 0


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """The issue's fidelity numbers for uint8 (P, H, W, 3) frames: mean absolute difference over all values,
    the 99th percentile and max of each pixel's largest channel difference away from saturated edges, the
    overall max, and the fraction of values that are identical."""
    d = (got.cpu().int() - ref.cpu().int()).abs()
    flat = away_from_edges(ref.cpu())
    px = d.amax(-1)[flat].float()
    return {"mean": d.float().mean().item(), "p99_flat": float(np.quantile(px.numpy(), 0.99)) if px.numel() else 0.0,
            "max_flat": px.max().item() if px.numel() else 0.0, "max": d.max().item(),
            "identical": (d == 0).float().mean().item(), "flat_fraction": flat.float().mean().item()}
