"""Small encoded test clips shared by the decoder tests (test_video.py, test_dali.py); importable because
pytest's `pythonpath` option puts tests/ on sys.path.

Frame i carries its own number as a 6-bit code of black/white blocks along the top row (survives lossy
coding), so a test can check that "frame i" really is the i-th frame. Codecs and encoder settings are the
synthetic generator's (`strive_engine.synthetic.CODECS`)."""
from __future__ import annotations

from fractions import Fraction
from typing import Callable

import av
import numpy as np

from strive_engine.synthetic import CODECS  # noqa: F401  (re-exported: name -> (encoder, format, suffix, pix, options))

BLOCK = 16  # code blocks of 16 x 16 px; frames at least 6 * 16 = 96 px wide


def stamp_code(img: np.ndarray, i: int) -> np.ndarray:
    """Write frame number i (< 64) into the top BLOCK rows of an (H, W, 3) uint8 image, in place."""
    for bit in range(6):
        if i >> bit & 1:
            img[:BLOCK, bit * BLOCK:(bit + 1) * BLOCK] = 255
    return img


def read_code(frame: np.ndarray) -> int:
    return sum(1 << b for b in range(6) if frame[BLOCK // 2, b * BLOCK + BLOCK // 2].mean() > 128)


def write_clip(path, codec: str, frame_fn: Callable[[int, int, int], np.ndarray], n: int, w: int, h: int,
               fps: int, fmt: str | None = None, options: dict | None = None, colorspace=None) -> str:
    """Encode frames frame_fn(i, w, h), i < n, single-threaded; n == 0 writes a header-only file."""
    encoder, cfmt, _, pix, opts = CODECS[codec]
    with av.open(str(path), "w", format=fmt or cfmt, options=options or {}) as out:
        s = out.add_stream(encoder, rate=Fraction(fps), options=dict(opts))
        s.width, s.height, s.pix_fmt = w, h, pix
        s.codec_context.thread_count = 1
        if colorspace is not None:
            s.codec_context.colorspace = colorspace
        if n == 0:
            out.start_encoding()
        for i in range(n):
            out.mux(s.encode(av.VideoFrame.from_ndarray(frame_fn(i, w, h), format="rgb24")))
        if n:
            out.mux(s.encode(None))
    return str(path)
