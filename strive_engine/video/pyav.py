"""PyAV (FFmpeg) decoding backend: decodes every codec FFmpeg knows, on the CPU.

    src = PyAVSource(threads=2)
    info = src.probe("clip.webm")                  # VideoInfo(num_frames=48, fps=8.0, codec="vp9", ...)
    pool = src.read("clip.webm", num_frames=16)    # frames uint8 (16, H, W, 3), indices, timestamps

How the frame count is found. `stream.frames` comes from the container index and is 0 for WebM/MKV
and raw streams, so `probe` counts the video stream's packets by demuxing the file (no decoding: it
reads the file once, about as fast as the disk). One packet is one frame for every codec this engine
meets (H.264/HEVC/AV1 in MP4, VP8/VP9 in WebM, where hidden VP9 frames travel inside a displayed
frame's superframe; MJPEG). Packets flagged `discard` (pre-roll cut by an edit list) and empty
packets (AVI "dropped frame" chunks) are not counted. The packet count is checked against the
container's own index where there is one: fewer packets than the index lists means the file was
truncated (`VideoCorrupt`). `read` decodes sequentially from the start and stops after the last
requested frame; if the decoder yields fewer frames than counted, that is also `VideoCorrupt`.
Probes are cached per (path, size, mtime), so a `read` right after a `probe` demuxes only once.

Frames are converted with PyAV's `to_ndarray(format="rgb24")` (FFmpeg swscale, honouring each
frame's colour matrix and range flags). Display rotation metadata is not applied (as in qwen-vl-utils/decord).
Timestamps: `(pts - stream.start_time) * time_base`, or `index / fps` when the stream has no pts
(raw elementary streams).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading
from typing import Any, Callable, Sequence

import av
import av.error
import numpy as np
import torch

from strive_engine.video.base import (DecodedVideo, EmptyVideo, FrameSizeChanged, NoVideoStream,
                                      UnsupportedCodec, VideoCorrupt, VideoInfo, VideoNotFound,
                                      VideoSource, frame_rate, resolve_indices)

# A container without a per-stream index (WebM) is called truncated when its packets cover less than
# this fraction of the duration its header declares (headers round; VFR rates are averages).
_TRUNCATION_TOLERANCE = 0.9
_PROBE_CACHE_SIZE = 4096


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoNotFound(path, "no such file")
    if not os.path.isfile(path):
        # A directory, FIFO or device: opening a FIFO would block forever.
        raise VideoNotFound(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoCorrupt(path, "the file is empty (0 bytes)")
    return path


def _open(path: str, hwaccel=None):
    try:
        return av.open(path, mode="r", metadata_errors="ignore", hwaccel=hwaccel)
    except av.error.FileNotFoundError:
        raise VideoNotFound(path, "no such file") from None
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoCorrupt(path, f"cannot open the container: {e}") from None


def _video_stream(container, path: str):
    """The first real video stream (cover art in audio files is a 'video' stream marked attached_pic)."""
    for s in container.streams.video:
        if not (s.disposition & av.stream.Disposition.attached_pic):
            return s
    kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
    raise NoVideoStream(path, f"the container ({container.format.name}) has no video stream; streams: {kinds}")


def _codec_name(container, stream, path: str) -> str:
    # PyAV builds no codec context when FFmpeg has no decoder for the stream (unknown fourcc/codec ID).
    ctx = stream.codec_context
    if ctx is None or not ctx.name:
        raise UnsupportedCodec(path, f"video stream #{stream.index} of the {container.format.name} container "
                                     "uses a codec this FFmpeg build cannot decode")
    return ctx.name


class PyAVSource(VideoSource):
    """CPU decoding with PyAV. `threads`: FFmpeg decoder threads per open file; `workers`: files of a
    `read_batch` decoded concurrently (Python threads: PyAV releases the GIL while FFmpeg decodes)."""

    name = "pyav"

    def __init__(self, threads: int = 2, workers: int = 1):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"PyAVSource: threads must be an integer >= 1, got {threads!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"PyAVSource: workers must be an integer >= 1, got {workers!r}")
        self.threads = threads
        self.workers = workers
        self._pool = None
        self._cache: collections.OrderedDict[tuple, VideoInfo] = collections.OrderedDict()
        self._lock = threading.Lock()

    def read_batch(self, requests, device="cpu"):
        """The base contract (errors in their slots, order kept), with up to `workers` files at once."""
        if self.workers == 1 or len(requests) < 2:
            return super().read_batch(requests, device)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pyav")
        parts = self._pool.map(lambda r: super(PyAVSource, self).read_batch([r], device)[0], requests)
        return list(parts)

    # ------------------------------------------------------------------------------------- probe

    def probe(self, path) -> VideoInfo:
        path = _check_file(path)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return dataclasses.replace(self._cache[key], path=path)
        info = self._probe_uncached(path)
        with self._lock:
            self._cache[key] = info
            while len(self._cache) > _PROBE_CACHE_SIZE:
                self._cache.popitem(last=False)
        return info

    def _probe_uncached(self, path: str) -> VideoInfo:
        with _open(path) as container:
            stream = _video_stream(container, path)
            codec = _codec_name(container, stream, path)
            width, height = stream.codec_context.width, stream.codec_context.height
            n_all = n_frames = 0
            first_pts = last_pts = None
            try:
                for packet in container.demux(stream):
                    if packet.size == 0 and packet.pts is None and packet.dts is None:
                        continue  # PyAV's end-of-stream flush packet
                    n_all += 1  # every packet the index may list, for the truncation check
                    if packet.size == 0 or packet.is_discard:
                        continue  # AVI "dropped frame" chunks, edit-list pre-roll: no output frame
                    n_frames += 1
                    if packet.pts is not None:
                        first_pts = packet.pts if first_pts is None else min(first_pts, packet.pts)
                        last_pts = packet.pts if last_pts is None else max(last_pts, packet.pts)
            except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
                raise VideoCorrupt(path, f"demuxing failed after {n_all} packets: {e}") from None

            fps = frame_rate([stream.average_rate, stream.guessed_rate, stream.base_rate])
            if fps is None and n_frames > 1 and last_pts is not None and last_pts > first_pts:
                fps = (n_frames - 1) / float((last_pts - first_pts) * stream.time_base)
            if fps is None:
                if n_frames == 0:
                    fps = 0.0  # an empty stream: reported as EmptyVideo by read
                else:
                    raise VideoCorrupt(path, "the video stream declares no frame rate and has no timestamps")
            self._check_truncation(path, container, stream, n_all, fps)
        if n_frames > 0 and (width <= 0 or height <= 0):
            raise VideoCorrupt(path, f"the video stream declares an invalid frame size {width}x{height}")
        return VideoInfo(path=path, num_frames=n_frames, fps=fps, duration=n_frames / fps if fps else 0.0,
                         width=width, height=height, codec=codec)

    @staticmethod
    def _check_truncation(path, container, stream, n_all: int, fps: float) -> None:
        declared = stream.frames  # from the container index (MP4 stsz, AVI idx1); 0 when unknown
        if declared > 0:
            if n_all < declared:
                raise VideoCorrupt(path, f"truncated: the container index lists {declared} frames but the "
                                         f"file holds only {n_all}")
            return
        # No per-stream index (WebM/MKV): compare with the container duration, but only when the video is
        # the sole stream, since a longer audio track legitimately extends the container duration.
        if len(container.streams) == 1 and container.duration and fps > 0:
            expected = container.duration / av.time_base * fps
            if n_all < _TRUNCATION_TOLERANCE * expected - 1:
                raise VideoCorrupt(path, f"truncated: the header declares {container.duration / av.time_base:.3f} s "
                                         f"(about {expected:.0f} frames) but the file holds only {n_all}")

    # -------------------------------------------------------------------------------------- read

    def read(self, path, indices: Sequence[int] | None = None, num_frames: int | None = None) -> DecodedVideo:
        info = self.probe(path)
        wanted = resolve_indices(info.path, info, indices, num_frames)
        got, size = decode_frames(info, wanted, lambda frame: frame.to_ndarray(format="rgb24"), self.threads)
        if size != (info.width, info.height):
            # The header's size disagrees with what the bitstream decodes to: trust the pixels.
            info = dataclasses.replace(info, width=size[0], height=size[1])
        frames = torch.from_numpy(np.stack([got[i][0] for i in wanted]))          # (P, H, W, 3) uint8
        return DecodedVideo(
            frames=frames.contiguous(),
            indices=torch.tensor(wanted, dtype=torch.int64),                        # (P,)
            timestamps=torch.tensor([got[i][1] for i in wanted], dtype=torch.float64),  # (P,)
            info=info,
        )

    def __repr__(self) -> str:
        return f"PyAVSource(threads={self.threads}, workers={self.workers})"


def decode_frames(info: VideoInfo, wanted: Sequence[int], take: Callable, threads: int = 1,
                  hwaccel=None) -> tuple[dict[int, tuple[Any, float]], tuple[int, int]]:
    """Decode `info.path` from its first frame up to the last of `wanted` (frame numbers already checked by
    `resolve_indices`), calling `take(frame)` once for each distinct wanted frame, in decoding order.

    Returns ({frame number: (take's result, timestamp in s)}, (width, height) the frames decode to). Raises
    FrameSizeChanged, VideoCorrupt, EmptyVideo, UnsupportedCodec naming the file. Shared by PyAVSource
    (take = RGB conversion) and the NVDEC source (hwaccel = a PyAV HWAccel; take = NV12 planes to the GPU),
    so that both number, time and reject frames identically.
    """
    path, targets = info.path, set(wanted)
    last = max(targets)
    got: dict[int, tuple[Any, float]] = {}
    size = None
    idx = -1
    with _open(path, hwaccel) as container:
        stream = _video_stream(container, path)
        ctx = stream.codec_context
        # FFmpeg's frame threads; with a hardware decoder one thread parses (the card decodes) and a step's
        # many concurrent files must not each start a thread per core.
        ctx.thread_type = "AUTO" if hwaccel is None else "SLICE"
        ctx.thread_count = threads if hwaccel is None else 1
        tb = stream.time_base
        start = stream.start_time
        try:
            for frame in container.decode(stream):
                idx += 1
                if size is None:
                    size = (frame.width, frame.height)
                elif (frame.width, frame.height) != size:
                    raise FrameSizeChanged(path, f"frame {idx} decodes to {frame.width}x{frame.height} but "
                                                 f"the frames before it are {size[0]}x{size[1]}")
                if idx in targets:
                    if frame.pts is not None and tb is not None:
                        t = float((frame.pts - (start or 0)) * tb)
                    else:
                        t = idx / info.fps
                    got[idx] = (take(frame), t)
                if idx >= last:
                    break
        except av.error.DecoderNotFoundError as e:
            raise UnsupportedCodec(path, f"no decoder for codec {info.codec!r}: {e}") from None
        except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
            raise VideoCorrupt(path, f"decoding failed after {idx + 1} of {info.num_frames} frames: {e}") from None
    if idx < last:
        if idx < 0:
            raise EmptyVideo(path, f"the decoder produced no frame (the container lists {info.num_frames})")
        raise VideoCorrupt(path, f"the decoder produced only {idx + 1} frames but the container holds "
                                 f"{info.num_frames}; frame {last} was requested")
    return got, size
