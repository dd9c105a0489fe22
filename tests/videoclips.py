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

# Codecs the synthetic generator does not write but the decoder tests need (NVDEC decodes HEVC).
EXTRA_CODECS = {"hevc": ("libx265", "mp4", ".mp4", "yuv420p", {"crf": "18", "preset": "veryfast",
                                                               "x265-params": "log-level=error"})}

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
               fps: int, fmt: str | None = None, options: dict | None = None, colorspace=None,
               color_range=None) -> str:
    """Encode frames frame_fn(i, w, h), i < n, single-threaded; n == 0 writes a header-only file.
    colorspace / color_range: AVColorSpace / AVColorRange tags for the encoder (and its RGB->YUV conversion)."""
    encoder, cfmt, _, pix, opts = {**CODECS, **EXTRA_CODECS}[codec]
    with av.open(str(path), "w", format=fmt or cfmt, options=options or {}) as out:
        s = out.add_stream(encoder, rate=Fraction(fps), options=dict(opts))
        s.width, s.height, s.pix_fmt = w, h, pix
        s.codec_context.thread_count = 1
        if colorspace is not None:
            s.codec_context.colorspace = colorspace
        if color_range is not None:
            s.codec_context.color_range = color_range
        if n == 0:
            out.start_encoding()
        for i in range(n):
            out.mux(s.encode(av.VideoFrame.from_ndarray(frame_fn(i, w, h), format="rgb24")))
        if n:
            out.mux(s.encode(None))
    return str(path)


def write_size_change(path, codec: str, frame_fn: Callable[[int, int, int], np.ndarray], fps: int, first: int = 10,
                      then: int = 10, sizes=((96, 48), (64, 32)), fmt: str | None = None) -> str:
    """One stream whose packets come from two encoders of different frame sizes (as spliced footage):
    frames 0..first-1 at sizes[0], then `then` frames at sizes[1] (frame numbers keep counting)."""
    encoder, cfmt, _, pix, opts = {**CODECS, **EXTRA_CODECS}[codec]
    packets = []
    for k, (n, (w, h)) in enumerate(zip((first, then), sizes)):
        cc = av.CodecContext.create(encoder, "w")
        cc.width, cc.height, cc.pix_fmt = w, h, pix
        cc.time_base, cc.framerate, cc.thread_count = Fraction(1, fps), Fraction(fps), 1
        cc.options = dict(opts, **({"bf": "0"} if codec == "h264" else {}))
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_fn(k * first + i, w, h), format="rgb24")
            frame.pts = i
            packets += cc.encode(frame)
        packets += cc.encode(None)
    with av.open(str(path), "w", format=fmt or cfmt) as out:
        s = out.add_stream(encoder, rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = *sizes[0], pix
        for j, p in enumerate(packets):
            p.stream, p.time_base, p.pts, p.dts = s, Fraction(1, fps), j, j
            out.mux(p)
    return str(path)


# Every bad input the decoder tests cover (test_video.py's and test_dali.py's), the typed error each must give.
BAD_TYPES = {"missing": "VideoNotFound", "directory": "VideoNotFound", "zero_bytes": "VideoCorrupt",
             "random": "VideoCorrupt", "trunc_mp4": "VideoCorrupt", "trunc_faststart": "VideoCorrupt",
             "trunc_webm": "VideoCorrupt", "unknown_codec": "UnsupportedCodec", "audio_m4a": "NoVideoStream",
             "audio_webm": "NoVideoStream", "zero_frames": "EmptyVideo", "size_h264": "FrameSizeChanged",
             "size_vp9": "FrameSizeChanged", "size_mjpeg": "FrameSizeChanged", "bitrot_vp9": "VideoCorrupt"}


def _audio(path, fmt: str, codec: str, rate: int, n: int, layout_fmt: str) -> str:
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream(codec, rate=rate)
        for k in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format=layout_fmt, layout="mono")
            fr.sample_rate, fr.pts = rate, k * n
            out.mux(s.encode(fr))
        out.mux(s.encode(None))
    return str(path)


def bad_files(d, frame_fn: Callable[[int, int, int], np.ndarray], w: int, h: int, fps: int = 10, n: int = 37,
              small: tuple[int, int] = (64, 32)) -> dict[str, str]:
    """The BAD_TYPES files in folder `d` (a pathlib.Path), cut from clips of w x h (GPU tests: at least NVDEC's
    minimum size, so that the files reach the hardware decoder). Size changes go from w x h to `small`."""
    mp4 = open(write_clip(d / "good.mp4", "h264", frame_fn, n, w, h, fps), "rb").read()
    webm_path = write_clip(d / "good.webm", "vp9", frame_fn, n, w, h, fps)
    webm = open(webm_path, "rb").read()
    files = {"missing": str(d / "nope.mp4"), "directory": str(d)}
    rnd = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    for key, name, data in (("zero_bytes", "zero.webm", b""), ("random", "random.mp4", rnd),
                            ("trunc_mp4", "trunc.mp4", mp4[: len(mp4) // 2]),      # moov atom (at the end) lost
                            ("trunc_webm", "trunc.webm", webm[: len(webm) // 2])):  # DALI alone decodes black frames
        (d / name).write_bytes(data)
        files[key] = str(d / name)
    fast = open(write_clip(d / "fast.mp4", "h264", frame_fn, n, w, h, fps, options={"movflags": "faststart"}),
                "rb").read()  # index first, then the data is cut
    (d / "trunc_fast.mp4").write_bytes(fast[: len(fast) * 2 // 3])
    files["trunc_faststart"] = str(d / "trunc_fast.mp4")
    at = mp4.index(b"avc1", mp4.index(b"stsd"))  # the sample entry (the ftyp brand list has one too)
    (d / "unknown.mp4").write_bytes(mp4[:at] + b"zzzz" + mp4[at + 4:])  # FFmpeg finds no decoder for "zzzz"
    files["unknown_codec"] = str(d / "unknown.mp4")
    files["audio_m4a"] = _audio(d / "audio.m4a", "mp4", "aac", 16000, 1024, "fltp")
    files["audio_webm"] = _audio(d / "audio.webm", "webm", "libopus", 48000, 960, "flt")
    files["zero_frames"] = write_clip(d / "empty.avi", "mjpeg", frame_fn, 0, w, h, fps)
    a = write_clip(d / "a.h264", "h264", frame_fn, 10, w, h, fps, fmt="h264")  # two raw streams back to back
    b = write_clip(d / "b.h264", "h264", frame_fn, 10, *small, fps, fmt="h264")
    (d / "size.h264").write_bytes(open(a, "rb").read() + open(b, "rb").read())
    files["size_h264"] = str(d / "size.h264")
    files["size_vp9"] = write_size_change(d / "size.webm", "vp9", frame_fn, fps, sizes=((w, h), small))
    files["size_mjpeg"] = write_size_change(d / "size.avi", "mjpeg", frame_fn, fps, sizes=((w, h), small))
    # VP9 packet 20 cut after its first 4 bytes: the container and the frame-size part of the header are fine
    # (probe and scan pass), every decoder rejects the rest of the header (DALI fails its whole batch).
    with av.open(webm_path) as c:
        packets = [(bytes(p), p.pts) for p in c.demux(video=0) if p.size]
    with av.open(str(d / "bitrot.webm"), "w", format="webm") as out:
        s = out.add_stream("libvpx-vp9", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for j, (data, pts) in enumerate(packets):
            p = av.Packet(data[:4] if j == 20 else data)
            p.stream, p.time_base, p.pts, p.dts = s, Fraction(1, 1000), pts, pts
            out.mux(p)
    files["bitrot_vp9"] = str(d / "bitrot.webm")
    return files
