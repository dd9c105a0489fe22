"""8-bit 4:2:0 YCbCr -> RGB exactly as PyAV's `frame.to_ndarray(format="rgb24")` computes it, in torch.

    spec = yuv_spec(frame.colorspace, frame.color_range, "yuv420p", frame.width, frame.height)  # YUVSpec | str
    rgb = yuv420_to_rgb(y, u, v, spec)      # uint8 (..., H, W) / (..., H/2, W/2) x2 -> (..., H, W, 3), any device

Why: the NVDEC path (strive_engine.video.nvdec) gets NV12 from the hardware decoder and must produce the frames
PyAV's CPU path produces, bit for bit, so that a pool does not depend on the machine that decoded it.

What PyAV does. `to_ndarray("rgb24")` calls swscale (`sws_scale_frame`) with SWS_BILINEAR and no other flag.
For 4:2:0 input of even height and no scaling, swscale takes its unscaled special converter (libswscale
yuv2rgb, SIMD on x86): chroma is *replicated* (each Cb/Cr sample covers its 2x2 luma block, no interpolation,
no siting), and the arithmetic is 16-bit fixed point with truncating multiplies (pmulhw):

    Y' = ((max(8 Y - 8 oy, 0)) * cy) >> 16     U' = 8 Cb - 1024,  V' = 8 Cr - 1024
    R = Y' + (V' cvr >> 16),  G = Y' + (U' cug >> 16) + (V' cvg >> 16),  B = Y' + (U' cub >> 16),  clamp 0..255

with the coefficients swscale derives from its per-matrix table (`ff_yuv2rgb_coeffs`, 16.16 fixed point) and
the range (limited: Y scaled by 255/219 with offset 16; full: chroma scaled by 224/255). The matrix is the
frame's `colorspace` tag (BT.601 when unspecified), the range its `color_range` (full for yuvj formats).
Measured here (PyAV 18.1 / FFmpeg 8.1, x86 AVX2): 0 of every pixel differs on H.264, HEVC, VP9 and MJPEG
clips, untagged, BT.709/FCC/SMPTE-240M/BT.2020-tagged, limited and full range, 96x48 to 1920x1080, odd
widths (tests/test_colour.py). Odd heights take swscale's generic scaler instead (interpolated chroma): not
emulated; `yuv_spec` reports them, and the matrices PyAV itself refuses (YCgCo, BT.2020-CL, ICtCp), as
unsupported so the caller decodes such files with PyAV.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["YUVSpec", "yuv_spec", "yuv420_to_rgb"]

# swscale's inverse-matrix table (libswscale/yuv2rgb.c ff_yuv2rgb_coeffs): (crv, cbu, cgu, cgv) * 65536 for
# AVColorSpace tags; every other supported tag (unspecified, reserved, BT.470BG, SMPTE-170M, "RGB") is BT.601.
_BT601 = (104597, 132201, 25675, 53279)
_INV_TABLE = {1: (117489, 138438, 13975, 34925),   # BT.709
              4: (104448, 132798, 24759, 53109),   # FCC
              7: (117579, 136230, 16907, 35559),   # SMPTE-240M
              9: (110013, 140363, 12277, 42626)}   # BT.2020 non-constant luminance
_BT601_TAGS = frozenset({0, 2, 3, 5, 6})
_FORMATS = {"yuv420p": False, "yuvj420p": True, "nv12": False}  # pixel format -> full range implied


@dataclass(frozen=True)
class YUVSpec:
    """How swscale converts one stream's frames: `matrix` (AVColorSpace tag after defaulting) and range."""

    matrix: int
    full_range: bool

    def fixed_point(self) -> tuple[int, int, int, int, int, int]:
        """(cy, oy, cvr, cub, cug, cvg): the int16 multipliers and luma offset swscale's x86 converter uses."""
        crv, cbu, cgu, cgv = _INV_TABLE.get(self.matrix, _BT601)
        cgu, cgv = -cgu, -cgv
        if self.full_range:  # chroma scaled by 224/255 in C integer arithmetic (truncation toward zero)
            cy, oy = 1 << 16, 0
            crv, cbu, cgu, cgv = (_cdiv(c * 224, 255) for c in (crv, cbu, cgu, cgv))
        else:  # luma scaled by 255/219 around 16
            cy, oy = (1 << 16) * 255 // 219, 16 << 16

        def r16(v: int) -> int:  # swscale's roundToInt16 of a value scaled by 2^13
            return (v * (1 << 13) + (1 << 15)) >> 16
        return r16(cy), (oy * 8 + (1 << 15)) >> 16, r16(crv), r16(cbu), r16(cgu), r16(cgv)


def _cdiv(a: int, b: int) -> int:
    """C's integer division (truncation toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def yuv_spec(colorspace: int, color_range: int, pix_fmt: str, width: int, height: int) -> YUVSpec | str:
    """The conversion PyAV applies to frames with these tags, or a sentence saying why `yuv420_to_rgb`
    cannot reproduce it (then decode the file with PyAV). `pix_fmt`: the decoded (software) pixel format."""
    if pix_fmt not in _FORMATS:
        return f"pixel format {pix_fmt} (only 8-bit 4:2:0 is converted here)"
    if height % 2 or width % 2:
        return f"odd frame size {width}x{height} (swscale converts it with its interpolating scaler)"
    colorspace = int(colorspace)
    if colorspace not in _INV_TABLE and colorspace not in _BT601_TAGS:
        return f"colour matrix tag {colorspace} (not one swscale converts to RGB)"
    return YUVSpec(colorspace, _FORMATS[pix_fmt] or int(color_range) == 2)


def yuv420_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, spec: YUVSpec, chunk: int = 8) -> torch.Tensor:
    """uint8 Y (..., H, W), Cb and Cr (..., H/2, W/2) (views of an NV12 chroma plane are fine) -> contiguous
    uint8 RGB (..., H, W, 3) on their device, bit-identical to PyAV's to_ndarray("rgb24") (see the module
    docstring). H and W even. Works `chunk` frames at a time to bound the int32 temporaries."""
    if y.dtype != torch.uint8 or u.dtype != torch.uint8 or v.dtype != torch.uint8:
        raise TypeError(f"yuv420_to_rgb: planes must be uint8, got {y.dtype}, {u.dtype}, {v.dtype}")
    H, W = y.shape[-2:]
    if H % 2 or W % 2 or u.shape[-2:] != (H // 2, W // 2) or v.shape != u.shape or y.shape[:-2] != u.shape[:-2]:
        raise ValueError(f"yuv420_to_rgb: planes {tuple(y.shape)}, {tuple(u.shape)}, {tuple(v.shape)} are not "
                         "4:2:0 of one even-sized frame batch")
    lead = y.shape[:-2]
    y, u, v = y.reshape(-1, H, W), u.reshape(-1, H // 2, W // 2), v.reshape(-1, H // 2, W // 2)
    cy, oy, cvr, cub, cug, cvg = spec.fixed_point()
    out = torch.empty(y.shape[0], H, W, 3, dtype=torch.uint8, device=y.device)
    for i in range(0, y.shape[0], chunk):
        s = slice(i, i + chunk)
        luma = ((y[s].int() * 8 - oy).clamp_(min=0) * cy) >> 16                     # (c, H, W)
        cb, cr = u[s].int() * 8 - 1024, v[s].int() * 8 - 1024                       # (c, H/2, W/2)
        # Chroma terms at chroma resolution, then replicated over their 2x2 luma blocks.
        terms = torch.stack([(cr * cvr) >> 16, ((cb * cug) >> 16) + ((cr * cvg) >> 16), (cb * cub) >> 16], -1)
        terms = terms.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)         # (c, H, W, 3)
        out[s] = (luma[..., None] + terms).clamp_(0, 255).to(torch.uint8)
    return out.reshape(*lead, H, W, 3)
