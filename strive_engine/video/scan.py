"""One demux pass over a video file, no decoding: what the DALI backend must know before it decodes.

`scan_stream(path)` reads packet timestamps, a mid-stream frame-size change (VP8/VP9 frame headers, JPEG SOF
markers, H.264/HEVC sequence parameters) and anything that would make DALI number or colour frames unlike
PyAV; `canonical_codec` names codecs; the colour helpers map DALI's BT.601 RGB to a stream's tagged matrix.
Split out of dali.py (pure PyAV/numpy: importable without DALI).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import av
import av.error
import numpy as np
import torch

from strive_engine.video.base import VideoCorrupt

@functools.lru_cache(maxsize=64)
def canonical_codec(name: str) -> str:
    """FFmpeg's codec name for a decoder name ("libdav1d" -> "av1", "libvpx-vp9" -> "vp9")."""
    try:
        return av.codec.Codec(name, "r").canonical_name
    except Exception:  # noqa: BLE001 - unknown names raise several PyAV types: keep the name
        return name


# ------------------------------------------------------------------------------------------ colour
# BT.601 RGB -> YCbCr -> RGB of the tagged matrix. Both sides apply the same range scaling and YCbCr =
# T @ RGB is linear with no offset in normalised units, so the fix is one 3x3 matrix inv(T_tag) @ T_601.
_KR_KB = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 7: (0.212, 0.087), 9: (0.2627, 0.0593)}  # AVColorSpace -> Kr, Kb
_BT601_TAGS = {2, 5, 6}  # unspecified (swscale and PyAV then use BT.601), bt470bg, smpte170m


def _rgb_to_ycbcr(kr: float, kb: float) -> np.ndarray:
    kg = 1.0 - kr - kb
    return np.array([[kr, kg, kb], [-kr / (2 - 2 * kb), -kg / (2 - 2 * kb), 0.5],
                     [0.5, -kg / (2 - 2 * kr), -kb / (2 - 2 * kr)]])


def _colour_plan(colorspace: int, color_range: int, pix_fmt: str | None) -> tuple[np.ndarray | None, str | None]:
    """(recolour matrix or None, reason DALI must not decode the stream or None) from its colour tags."""
    if pix_fmt not in ("yuv420p", "yuvj420p"):
        return None, f"pixel format {pix_fmt} (DALI's output is checked for 8-bit 4:2:0 only)"
    if color_range == 2 and pix_fmt == "yuv420p":  # AVCOL_RANGE_JPEG on a "limited" pixel format
        return None, "full-range yuv420p (DALI would expand it as limited range)"
    if colorspace in _BT601_TAGS:
        return None, None
    if colorspace not in _KR_KB:
        return None, f"colour matrix tag {colorspace} (DALI converts with BT.601)"
    return (np.linalg.inv(_rgb_to_ycbcr(*_KR_KB[colorspace])) @ _rgb_to_ycbcr(0.299, 0.114)).astype(np.float32), None


def _recolour_(frames: torch.Tensor, matrix: np.ndarray, chunk: int = 8) -> torch.Tensor:
    """Apply `matrix` to uint8 (P, H, W, 3) RGB in place, `chunk` frames at a time (bounded float temp)."""
    a_t = torch.from_numpy(matrix).to(frames.device).T  # (3, 3): pixels are row vectors
    for i in range(0, frames.shape[0], chunk):
        part = frames[i:i + chunk]                        # (c, H, W, 3)
        part.copy_((part.float() @ a_t).round_().clamp_(0, 255))
    return frames


# ----------------------------------------------------------------------------------- frame headers


def _bits(buf):
    """MSB-first bit reader over a bytes-like object: read(n) -> int (IndexError past the end)."""
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        v = 0
        for _ in range(n):
            v = v << 1 | buf[pos >> 3] >> (7 - (pos & 7)) & 1
            pos += 1
        return v
    return read


def _vp9_subframes(buf) -> list:
    """The frames of a VP9 packet: a superframe (hidden alt-ref + shown frame) ends with an index."""
    last = buf[-1]
    n, mag = (last & 7) + 1, (last >> 3 & 3) + 1
    size = 2 + mag * n
    if last & 0xE0 != 0xC0 or len(buf) < size or buf[-size] != last:
        return [buf]
    out, off, p = [], 0, len(buf) - size + 1
    for _ in range(n):
        fs = int.from_bytes(buf[p:p + mag], "little")
        out.append(buf[off:off + fs])
        off, p = off + fs, p + mag
    return out


def _vp9_shown_size(buf, refs: list) -> tuple[int, int] | None:
    """(w, h) of the frame a VP9 packet shows, from the uncompressed headers (VP9 spec 6.2), tracking the
    8 reference slots' sizes in `refs` (in place); None when the packet shows no frame."""
    shown = None
    for frame in _vp9_subframes(buf):
        f = _bits(frame)
        if f(2) != 2:
            raise ValueError("bad VP9 frame marker")
        profile = f(1) | f(1) << 1
        f(profile == 3)  # reserved_zero
        if f(1):  # show_existing_frame
            shown = refs[f(3)]
            continue
        key, show, error_resilient = f(1) == 0, f(1), f(1)
        intra_only = not key and not show and f(1)
        if not key and not error_resilient:
            f(2)  # reset_frame_context
        if key or intra_only:
            if (f(8), f(8), f(8)) != (0x49, 0x83, 0x42):
                raise ValueError("bad VP9 frame sync code")
            if key or profile > 0:  # color_config()
                f(profile >= 2)  # ten_or_twelve_bit
                odd = profile in (1, 3)
                f(1 + 3 * odd if f(3) != 7 else odd)  # YUV: range [+ subsampling x, y, reserved]; RGB: [reserved]
            refresh = 0xFF if key else f(8)
            size = (f(16) + 1, f(16) + 1)
        else:
            refresh = f(8)
            slots = [f(4) >> 1 for _ in range(3)]  # ref_frame_idx (3 bits) + sign bias (1 bit)
            found = next((i for i in slots if f(1)), -1)  # frame_size_with_refs: first found_ref
            size = refs[found] if found >= 0 else (f(16) + 1, f(16) + 1)
            if size is None:
                raise ValueError("VP9 inter frame takes its size from a slot no key frame filled")
        for i in range(8):
            if refresh >> i & 1:
                refs[i] = size
        shown = size if show else shown
    return shown


def _vp8_shown_size(buf, prev):
    if not buf[0] >> 4 & 1:
        return None  # an invisible (alt-ref) VP8 frame in its own packet: one packet is not one frame
    if buf[0] & 1:
        return prev  # inter frames keep the size of the last key frame
    if bytes(buf[3:6]) != b"\x9d\x01\x2a":
        raise ValueError("bad VP8 key frame start code")
    return int.from_bytes(buf[6:8], "little") & 0x3FFF, int.from_bytes(buf[8:10], "little") & 0x3FFF


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG start-of-frame markers (not DHT/JPG/DAC)


def _jpeg_size(buf, _prev=None) -> tuple[int, int]:
    """(w, h) from the SOF segment of one JPEG (an MJPEG packet), walking the marker segments."""
    if bytes(buf[:2]) != b"\xff\xd8":
        raise ValueError("MJPEG packet does not start with a JPEG SOI marker")
    i = 2
    while i + 9 <= len(buf) and buf[i] == 0xFF and buf[i + 1] != 0xDA:  # stop at the scan data (SOS)
        m = buf[i + 1]
        if m in _SOF:
            return int.from_bytes(buf[i + 7:i + 9], "big"), int.from_bytes(buf[i + 5:i + 7], "big")
        if m == 0xFF:
            i += 1  # fill byte
        else:  # standalone markers (TEM, RSTn, SOI) carry no length
            i += 2 if m == 0x01 or 0xD0 <= m <= 0xD8 else 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    raise ValueError("no JPEG SOF marker before the scan data")


def _nal_units(buf, length_size: int | None):
    """NAL unit payloads: length-prefixed (MP4 avcC/hvcC framing) or Annex-B start-code delimited."""
    i = 0
    if length_size:
        while i + length_size <= len(buf):
            n = int.from_bytes(buf[i:i + length_size], "big")
            yield buf[i + length_size:i + length_size + n]
            i += length_size + n
        return
    data = bytes(buf)
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        j = data.find(b"\x00\x00\x01", i + 3)
        yield data[i + 3:j if j >= 0 else len(data)].rstrip(b"\x00")
        i = j


class _SpsWatch:
    """Collects the distinct H.264/HEVC sequence parameter sets (extradata and in-band): a second one can
    change the frame size, which DALI's NVDEC path does not report, so such a stream goes to PyAV."""

    def __init__(self, codec: str, extradata: bytes | None):
        self.h264, ed = codec == "h264", extradata or b""
        self.length_size, units = None, list(_nal_units(ed, None))  # Annex-B extradata (or none)
        if ed[:1] == b"\x01":  # ISO record. avcC: SPS count at byte 5, then [u16 size, SPS]...;
            # hvcC: numOfArrays at byte 22, then arrays of [type, u16 count, [u16 size, NAL unit]...]
            self.length_size = (ed[4 if self.h264 else 21] & 3) + 1
            counts, p, units = ([ed[5] & 0x1F], 6, []) if self.h264 else ([], 23, [])
            for _ in range(0 if self.h264 else ed[22]):
                counts.append(int.from_bytes(ed[p + 1:p + 3], "big"))
                p = _skip_units(ed, p + 3, counts[-1], units)
            if self.h264:
                _skip_units(ed, p, counts[0], units)
        self.seen = {bytes(u) for u in units if u and self._is_sps(u)}

    def _is_sps(self, nal) -> bool:
        return nal[0] & 0x1F == 7 if self.h264 else nal[0] >> 1 & 0x3F == 33

    def changed(self, buf) -> bool:
        self.seen.update(bytes(n) for n in _nal_units(buf, self.length_size) if n and self._is_sps(n))
        return len(self.seen) > 1


def _skip_units(ed, p: int, count: int, units: list) -> int:
    """Append `count` [u16 size, payload] units of a config record starting at `p`; return the end."""
    for _ in range(count):
        n = int.from_bytes(ed[p:p + 2], "big")
        units.append(ed[p + 2:p + 2 + n])
        p += 2 + n
    return p


# ------------------------------------------------------------------------------------- stream scan


@dataclasses.dataclass(frozen=True)
class StreamScan:
    """What one demux pass learns. timestamps: float64 (num_frames,) seconds in PyAV's convention
    ((pts - start_time) * time_base, presentation order). size_change: (frame, (w, h) before, (w, h) at it)
    for the first frame coded at another size, else None. unsafe: why DALI must not decode this file (its
    frame numbering or colours could differ from PyAV's), else None. recolour: float32 (3, 3) matrix from
    DALI's BT.601 RGB to the stream's tagged matrix, else None."""

    timestamps: np.ndarray
    size_change: tuple[int, tuple[int, int], tuple[int, int]] | None = None
    unsafe: str | None = None
    recolour: np.ndarray | None = None


def scan_stream(path) -> StreamScan:
    """Demux the first video stream of `path` once, without decoding (frames counted by PyAV's probe rule:
    packets neither empty nor flagged discard). VideoCorrupt if it cannot be demuxed; probe with PyAV first."""
    path = os.fspath(path)
    pts, unsafe, size_change, size = [], None, None, None
    try:
        with av.open(path, mode="r", metadata_errors="ignore") as container:
            videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
            if not videos:
                raise VideoCorrupt(path, "no video stream to scan")
            stream, ctx = videos[0], videos[0].codec_context
            if len(videos) > 1:
                unsafe = f"{len(videos)} video streams (DALI might pick another one than PyAV)"
            codec = canonical_codec(ctx.name)
            # PyAV < 13 exposes no tags (and converts with BT.601 itself): read them as "unspecified".
            recolour, why = _colour_plan(getattr(ctx, "colorspace", 2), getattr(ctx, "color_range", 0),
                                         ctx.format and ctx.format.name)
            unsafe = unsafe or why
            refs: list = [None] * 8  # VP9 reference slot sizes
            header = {"vp9": lambda buf, _: _vp9_shown_size(buf, refs), "vp8": _vp8_shown_size,
                      "mjpeg": _jpeg_size}.get(codec)
            try:
                sps = _SpsWatch(codec, ctx.extradata) if codec in ("h264", "hevc") else None
            except IndexError:
                sps, unsafe = None, unsafe or f"unreadable {codec} extradata"
            for packet in container.demux(stream):
                if packet.size == 0 and packet.pts is None and packet.dts is None:
                    continue  # PyAV's end-of-stream flush packet
                ours = not (packet.size == 0 or packet.is_discard)  # what PyAV's probe counts
                t = packet.pts if packet.pts is not None else packet.dts
                if ours != (t is not None and t >= 0):  # DALI indexes every packet with pts (or dts) >= 0
                    unsafe = unsafe or "empty, discarded or negative-time packets (DALI counts frames differently)"
                if not ours:
                    continue
                if packet.pts is None:
                    unsafe = unsafe or "packets without presentation timestamps"
                    continue
                pts.append(packet.pts)
                if unsafe is not None:
                    continue  # PyAV decodes it anyway: no need to read headers
                k, buf = len(pts) - 1, memoryview(packet)
                try:
                    if header is not None:
                        new = header(buf, size)
                        if new is None:
                            unsafe = f"{codec} packet {k} shows no frame"
                        elif size is not None and new != size and size_change is None:
                            size_change = (k, size, new)
                        size = size if size_change else new
                    elif sps is not None and sps.changed(buf):
                        unsafe = f"the {codec} sequence parameters change mid-stream (the frame size may change)"
                except (ValueError, IndexError) as e:
                    unsafe = f"unreadable {codec} frame header in packet {k} ({e})"
            start, tb = stream.start_time or 0, stream.time_base
    except (av.error.FFmpegError, OSError, EOFError) as e:
        raise VideoCorrupt(path, f"demuxing failed while scanning: {e}") from None
    # Exact rational arithmetic, then one rounding: the same float64 PyAV's read computes per frame.
    times = np.array([float((p - start) * tb) for p in sorted(pts)], dtype=np.float64)
    return StreamScan(times, size_change, unsafe, recolour)


# ------------------------------------------------------------------------------------------- source
