"""NVIDIA DALI decoding backend: NVDEC on CUDA (`device="mixed"`), FFmpeg on the CPU for VP8/VP9/MJPEG.

    src = DALISource.from_config(cfg.video, "cuda")                 # or DALISource("cpu", threads=2)
    pools = src.read_batch([(path, None, 64), ...], device="cuda")  # DecodedVideo | VideoError per slot

One pipeline: `fn.external_source` (encoded file, frame numbers) -> `fn.decoders.video(frames=...,
pad_mode="none")`. Frame numbers come from `resolve_indices` on PyAV's probe, as in the PyAV backend (never
DALI's own sampling). Frames reach torch through DLPack without a copy (`exec_dynamic=True`: DALI never
recycles an output still referenced); CUDA frames are ready on the stream current at the call.

Vetting. DALI fails a whole batch (and its pipeline) for one bad sample, and misses some bad files: it
decodes a truncated WebM to black frames and a stream that changes frame size to garbage. So each file is
probed by PyAV (typed errors, frame count), then demuxed once by `scan_stream` (no decoding) for timestamps,
a mid-stream size change (VP8/VP9 frame headers, JPEG SOF markers: `FrameSizeChanged` once a requested frame
lies past it, as PyAV raises it) and whatever would make DALI number or colour frames unlike PyAV (empty,
discarded or untimed packets, several video streams, H.264/HEVC sequence parameters that change, not 8-bit
4:2:0, full-range yuv420p, unknown matrix tags): those files are decoded by PyAV (`stats["pyav_unsafe"]`).

Failures. If a DALI run fails anyway, PyAV decodes that chunk and the pipeline is rebuilt. If PyAV rejects a
file of the chunk too, the failure was that file's (its slot holds the typed error) and DALI stays on;
otherwise it is DALI's own: the first is absorbed by the rebuild, the next (`max_rebuilds=1`) disables DALI
for the run with a warning and `read_batch` raises `DALIDisabled`, so `RoutingSource` hands over to PyAV.

Colour. DALI converts with BT.601 (CPU: swscale `BILINEAR|FULL_CHR_H_INT|ACCURATE_RND`, range from the pixel
format; CUDA: its own kernel); PyAV honours the matrix tag, with swscale's default flags. BT.709/FCC/240M/
BT.2020-tagged streams are mapped to their matrix after decoding (one 3x3 product: within +-1 of PyAV with
the same flags away from clipped values). On the CPU, DALI's RGB equals PyAV's decode converted with DALI's
flags bit for bit; against `PyAVSource` it differs by rounding (a few levels) away from edges and by up to
~110 levels on the 1-2 pixels of a sharp saturated edge (chroma interpolated vs replicated); see test_dali.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading
from typing import Sequence

import av
import av.error
import numpy as np
import torch

from strive_engine.video.base import (DecodedVideo, FrameSizeChanged, UnsupportedCodec, VideoCorrupt, VideoError,
                                      VideoInfo, VideoNotFound, VideoSource, resolve_indices)
from strive_engine.video.pyav import PyAVSource

try:
    from nvidia.dali import fn, pipeline_def, types
except ImportError as e:  # build_source treats ImportError as "DALI not installed"
    raise ImportError(f"strive_engine.video.dali needs nvidia-dali ({e})") from e

log = logging.getLogger(__name__)

__all__ = ["DALISource", "DALIDisabled", "StreamScan", "scan_stream", "CPU_CODECS", "MIXED_CODECS"]

# What fn.decoders.video decodes per device (DALI 2.x), limited to the codecs scan_stream can vet: AV1 and
# MPEG-4 part 2 (mixed only) get no parameter-change check here, so they stay with PyAV.
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
MIXED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg"})
_SCAN_CACHE_SIZE = 1024


class DALIDisabled(RuntimeError):
    """DALI was switched off for this run after repeated pipeline failures; decode with PyAV instead."""


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


@dataclasses.dataclass
class _Job:
    slot: int
    info: VideoInfo
    wanted: list[int]
    scan: StreamScan
    data: np.ndarray | None = None  # (bytes,) uint8: the encoded file, read just before its chunk runs


def _read_bytes(path: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise VideoNotFound(path, "no such file") from None
    except OSError as e:
        raise VideoCorrupt(path, f"cannot read the file: {e}") from None


def _short(err: BaseException) -> str:
    """One line of a multi-line, traceback-laden DALI error: what follows "encountered:", if anything."""
    return f"{type(err).__name__}: {' '.join(str(err).split('encountered:', 1)[-1].split())[:300]}"


def _to_device(video: DecodedVideo, device: torch.device) -> DecodedVideo:
    if video.frames.device == device:
        return video
    pin = device.type == "cuda" and video.frames.device.type == "cpu"
    frames = video.frames.pin_memory() if pin else video.frames
    return DecodedVideo(frames.to(device, non_blocking=pin), video.indices, video.timestamps, video.info)


class DALISource(VideoSource):
    """Batched decoding with one DALI pipeline. device: "cpu" (FFmpeg in DALI's CPU threads; VP8/VP9/MJPEG)
    or a CUDA device ("mixed": NVDEC; H.264/HEVC/VP8/VP9/MJPEG). threads: DALI CPU threads (each decodes
    one video of a batch at a time). batch_size: videos per pipeline run (a longer request list runs in
    chunks). max_rebuilds: DALI failures absorbed by rebuilding the pipeline before DALI is disabled.
    fallback: the PyAVSource that probes files and decodes what DALI must not (shared probe cache)."""

    name = "dali"
    Disabled = DALIDisabled  # so callers can catch it without importing this optional module

    def __init__(self, device="cpu", threads: int = 2, batch_size: int = 8, max_rebuilds: int = 1,
                 fallback: PyAVSource | None = None, workers: int = 1):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"DALISource: device {device!r} asked for but CUDA is not available")
            self.device = torch.device("cuda", self.device.index if self.device.index is not None
                                       else torch.cuda.current_device())
            self.decoder, self.codecs = "mixed", MIXED_CODECS
        elif self.device.type == "cpu":
            self.decoder, self.codecs = "cpu", CPU_CODECS
        else:
            raise ValueError(f"DALISource: device must be 'cpu' or a CUDA device, got {device!r}")
        for key, v, lo in (("threads", threads, 1), ("batch_size", batch_size, 1), ("max_rebuilds", max_rebuilds, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"DALISource: {key} must be an integer >= {lo}, got {v!r}")
        self.threads, self.batch_size, self.max_rebuilds = threads, batch_size, max_rebuilds
        self.fallback = fallback or PyAVSource(threads=threads, workers=workers)
        self.failures, self.disabled = 0, False
        # dali_videos / dali_runs: decoded by DALI; pyav_unsafe: streams DALI must not decode; pyav_failed_run:
        # videos re-decoded by PyAV after a failed run; bad_file_failures: runs failed because of a bad file.
        self.stats: collections.Counter = collections.Counter()
        self._scans: collections.OrderedDict[tuple, StreamScan] = collections.OrderedDict()
        self._lock = threading.RLock()  # one pipeline: runs are serialised
        self._scan_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(2, threads), thread_name_prefix="dali-probe")
        self._pipe = self._new_pipeline()  # built now, so a broken install fails at set-up, not mid-run

    @classmethod
    def from_config(cls, cfg, device="cpu") -> "DALISource":
        """From a VideoConfig: decode_threads DALI CPU threads (and PyAV threads for the fallback)."""
        return cls(device, threads=cfg.decode_threads, workers=cfg.decode_workers)

    def can_decode(self, codec: str) -> bool:
        """Whether this source's DALI decoder handles `codec` (an FFmpeg codec or decoder name)."""
        return canonical_codec(codec) in self.codecs

    # -------------------------------------------------------------------------------- pipeline

    def _new_pipeline(self):
        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device.index if self.decoder == "mixed" else None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def video_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            # pad_mode="none": a frame number DALI thinks is out of range is an error, never a black frame.
            return fn.decoders.video(encoded, frames=frames, device=self.decoder, pad_mode="none", affine=False)

        pipe = video_pipeline()
        pipe.build()
        return pipe

    def _run(self, jobs: list[_Job]) -> list[torch.Tensor]:
        """(P_i, H_i, W_i, 3) uint8 frames per job, on the decoder's device, zero-copy (DLPack)."""
        self._pipe.feed_input("encoded", [j.data for j in jobs])
        self._pipe.feed_input("frames", [np.asarray(j.wanted, dtype=np.int32) for j in jobs])
        (videos,) = self._pipe.run()
        with torch.cuda.device(self.device) if self.decoder == "mixed" else contextlib.nullcontext():
            frames = [torch.from_dlpack(videos[i]) for i in range(len(jobs))]  # waits on the current stream
        for job, f in zip(jobs, frames):
            if f.dim() != 4 or f.shape[0] != len(job.wanted) or f.shape[3] != 3 or f.dtype != torch.uint8:
                raise RuntimeError(f"DALI returned {f.dtype} {tuple(f.shape)} for {len(job.wanted)} frames of "
                                   f"{job.info.path}")
        return frames

    def _pipeline_failed(self, err: Exception) -> None:
        self.failures += 1
        if self.failures > self.max_rebuilds:
            self.disabled, self._pipe = True, None
            log.warning("DALI failed again (%s); DALI is disabled for the rest of the run and PyAV decodes "
                        "every video", _short(err))
            return
        log.warning("DALI pipeline failed (%s); the batch was decoded with PyAV, rebuilding the pipeline "
                    "(%d of %d rebuilds)", _short(err), self.failures, self.max_rebuilds)
        try:
            self._pipe = self._new_pipeline()
            self.stats["rebuilds"] += 1
        except Exception as e:  # noqa: BLE001 - any build error means DALI is unusable here
            self.failures = self.max_rebuilds
            self._pipeline_failed(e)

    # ---------------------------------------------------------------------------------- reading

    def probe(self, path) -> VideoInfo:
        return self.fallback.probe(path)

    def scan(self, path) -> StreamScan:
        """`scan_stream` of the file, cached per (path, size, mtime) like the probe."""
        path = os.fspath(path)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        with self._scan_lock:
            if key in self._scans:
                self._scans.move_to_end(key)
                return self._scans[key]
        scan = scan_stream(path)
        with self._scan_lock:
            self._scans[key] = scan
            while len(self._scans) > _SCAN_CACHE_SIZE:
                self._scans.popitem(last=False)
        return scan

    def _prepare(self, slot: int, path, indices, num_frames) -> _Job:
        info = self.fallback.probe(path)  # VideoError for missing / corrupt / empty / no-video files
        path = info.path
        wanted = resolve_indices(path, info, indices, num_frames)
        codec = canonical_codec(info.codec)
        if codec not in self.codecs:
            where = "on the CPU" if self.decoder == "cpu" else f"with NVDEC ({self.device})"
            raise UnsupportedCodec(path, f"DALI cannot decode {codec} {where}; it decodes "
                                         f"{', '.join(sorted(self.codecs))} there (video.backend=auto lets PyAV "
                                         f"decode the others)")
        scan = self.scan(path)
        if scan.size_change is not None and max(wanted) >= scan.size_change[0]:
            k, (w0, h0), (w1, h1) = scan.size_change
            raise FrameSizeChanged(path, f"frame {k} is coded at {w1}x{h1} but the frames before it are {w0}x{h0}")
        return _Job(slot, info, wanted, scan)

    def _try_prepare(self, slot: int, request) -> _Job | VideoError:
        try:
            return self._prepare(slot, *request)
        except VideoError as e:
            return e

    def read(self, path, indices: Sequence[int] | None = None, num_frames: int | None = None) -> DecodedVideo:
        (result,) = self.read_batch([(path, indices, num_frames)], device=self.device)
        if isinstance(result, VideoError):
            raise result
        return result

    def read_batch(self, requests, device=None) -> list[DecodedVideo | VideoError]:
        """The base-class contract (a bad file's slot holds its VideoError). Frames are moved to `device`
        (default: the decoder's device, where DALI leaves them). Raises DALIDisabled once DALI is off."""
        device = self.device if device is None else torch.device(device)
        if self.disabled:
            raise DALIDisabled("DALI was disabled for this run after repeated pipeline failures")
        out: list = [None] * len(requests)
        jobs, unsafe = [], []
        # Probing and scanning open each file (~30-50 ms, mostly FFmpeg, GIL released): files in parallel.
        for slot, job in enumerate(self._pool.map(self._try_prepare, range(len(requests)), requests)):
            if isinstance(job, VideoError):
                out[slot] = job
                continue
            if job.scan.unsafe is None and len(job.scan.timestamps) != job.info.num_frames:
                job.scan = dataclasses.replace(job.scan, unsafe="the scan and the probe count different frames")
            (unsafe if job.scan.unsafe else jobs).append(job)
        with self._lock:
            for i in range(0, len(jobs), self.batch_size):
                if self.disabled:  # switched off by an earlier chunk of this call: nothing is lost
                    self._decode_with_pyav(jobs[i:i + self.batch_size], out)
                else:
                    self._decode_chunk(jobs[i:i + self.batch_size], out)
        if unsafe:
            log.debug("decoded with PyAV, not DALI: %s", "; ".join(f"{j.info.path}: {j.scan.unsafe}" for j in unsafe))
            self._decode_with_pyav(unsafe, out)
            self.stats["pyav_unsafe"] += len(unsafe)
        return [r if isinstance(r, VideoError) else _to_device(r, device) for r in out]

    def _decode_with_pyav(self, jobs: list[_Job], out: list) -> list:
        results = self.fallback.read_batch([(j.info.path, j.wanted, None) for j in jobs])
        for job, res in zip(jobs, results):
            out[job.slot] = res
        return results

    def _decode_chunk(self, jobs: list[_Job], out: list) -> None:
        for job in jobs:
            try:
                job.data = _read_bytes(job.info.path)
            except VideoError as e:
                out[job.slot] = e
        jobs = [j for j in jobs if j.data is not None]
        if not jobs:
            return
        try:
            frames = self._run(jobs)
        except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError; any failure is handled alike
            # The pipeline is invalid after an error: PyAV decodes this chunk, then decide whose fault it was.
            results = self._decode_with_pyav(jobs, out)
            self.stats["pyav_failed_run"] += len(jobs)
            bad = [r for r in results if isinstance(r, VideoError)]
            if bad:
                self.stats["bad_file_failures"] += 1
                log.warning("DALI failed on a batch holding a bad file (%s); rebuilding the pipeline", bad[0])
                try:
                    self._pipe = self._new_pipeline()
                except Exception as e:  # noqa: BLE001
                    self._pipeline_failed(e)
            else:
                self._pipeline_failed(err)
            return
        self.stats["dali_runs"] += 1
        self.stats["dali_videos"] += len(jobs)
        for job, f in zip(jobs, frames):
            job.data = None  # the encoded bytes are no longer needed
            if job.scan.recolour is not None:
                f = _recolour_(f, job.scan.recolour)
            info = job.info
            if tuple(f.shape[1:3]) != (info.height, info.width):
                # The header's size disagrees with what the bitstream decodes to: trust the pixels (as PyAV).
                info = dataclasses.replace(info, width=int(f.shape[2]), height=int(f.shape[1]))
            out[job.slot] = DecodedVideo(frames=f, indices=torch.tensor(job.wanted, dtype=torch.int64),   # (P,)
                                         timestamps=torch.from_numpy(job.scan.timestamps[job.wanted]),   # (P,)
                                         info=info)

    def __repr__(self) -> str:
        return (f"DALISource(device={str(self.device)!r}, decoder={self.decoder!r}, threads={self.threads}, "
                f"batch_size={self.batch_size}, disabled={self.disabled})")
