"""NVDEC decoding through FFmpeg (PyAV's CUDA hwaccel): NV12 stays on the GPU and is converted to RGB there
exactly as PyAV converts on the CPU, so a pool is the same tensor whichever path decoded it.

    src = NVDECSource("cuda", workers=16)
    pools = src.read_batch([(path, None, 64), ...])   # DecodedVideo (frames on the GPU) | VideoError per slot

Why not DALI's NVDEC output. DALI's mixed `fn.decoders.video` returns RGB only (no YUV/NV12 option in 2.4),
made by its own kernel: BT.601, chroma *bilinearly interpolated* at centre siting. PyAV's swscale replicates
chroma over each 2x2 block. On saturated colour edges the two differ by up to ~110 levels (measured: mean
5.7 levels on the colour-bar test clip, 0.8 away from edges; the H200 run saw 5.97), and nothing after the
fact can recover the replicated result from interpolated, rounded, clipped RGB. So the NV12 is taken from
FFmpeg's NVDEC hwaccel instead (the same demuxer and decoder front end as `PyAVSource`: identical frame
numbering, timestamps and errors) and converted by `colour.yuv420_to_rgb`, which reproduces PyAV's
conversion bit for bit.

How. Each file is opened with `HWAccel("cuda", is_hw_owned=True)` in torch's CUDA context (`_hwaccel`):
decoded frames are CUDA NV12 surfaces owned by FFmpeg. `pyav.decode_frames` walks the stream (the PyAV
backend's loop) and, for each wanted frame, the planes are imported with DLPack and copied into a staging
buffer; after the last wanted frame all of them are converted in one batched call. FFmpeg writes its frames
on CUDA's legacy default stream, so the copies run on torch's default stream (the same one): ordered after
FFmpeg's writes, and before any reuse of the buffer. The worker synchronises that stream before it returns,
so the frames are ready on any stream. The price: the legacy stream also orders against other work on it,
so a trainer running on the default stream makes the decode workers wait for its queued kernels (correct,
less overlap; PyAV offers no way to give FFmpeg another stream).

Concurrency. `read_batch` decodes up to `workers` files at once (one FFmpeg decoder and one NVDEC session
each; FFmpeg releases the GIL): a step's videos share the card's NVDEC engines instead of queueing.

Fallbacks. A stream FFmpeg's NVDEC cannot take (an unsupported profile or size) is decoded by FFmpeg's
software decoder inside the same call and converted the same way (`stats["software_frames"]`). A frame
`yuv420_to_rgb` cannot reproduce (not 8-bit 4:2:0, odd size, a matrix PyAV refuses) sends the file to PyAV
(`stats["pyav_unconvertible"]`). When the NVDEC path raises, PyAV decodes the file: if PyAV fails too, its
typed error is the file's (exactly the error the CPU path reports); otherwise it was an NVDEC failure, and
after `max_failures` of those the source disables itself (`read_batch` raises `NVDECDisabled`, the routing
source then decodes everything with PyAV).

device="cpu" runs the same path with FFmpeg's software decoder and the conversion on the CPU: how the CPU
tests exercise everything but the hardware itself.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import tempfile
import threading
from typing import Sequence

import av
import numpy as np
import torch

from strive_engine.video.base import DecodedVideo, VideoError, VideoInfo, VideoSource, resolve_indices
from strive_engine.video.colour import YUVSpec, yuv420_to_rgb, yuv_spec
from strive_engine.video.pyav import PyAVSource, decode_frames
from strive_engine.video.scan import canonical_codec

log = logging.getLogger(__name__)

__all__ = ["NVDECSource", "NVDECDisabled", "NVDEC_CODECS"]

# Codecs FFmpeg has an NVDEC hwaccel for (what the card cannot do, FFmpeg decodes in software, still exact).
NVDEC_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mjpeg", "mpeg1video", "mpeg2video", "mpeg4", "vc1"})


class NVDECDisabled(RuntimeError):
    """The NVDEC source switched itself off after repeated failures; decode with PyAV instead."""


class _Unconvertible(Exception):
    """A decoded frame `yuv420_to_rgb` cannot convert like PyAV; the file goes to PyAV."""


def _hwaccel(index: int):
    """PyAV's CUDA hwaccel for card `index`, decoding into FFmpeg-owned CUDA frames in the *current* context.

    Not the primary-context option PyAV defaults to with is_hw_owned: FFmpeg then insists on the primary
    context's BLOCKING_SYNC flag and refuses ("Primary context already active with incompatible flags") once
    torch has started it with its own flags. With current_ctx FFmpeg adopts the context current on the calling
    thread, torch's (the caller makes it current first: `_current_context`), so DLPack pointers are torch's."""
    from av.codec.hwaccel import HWAccel

    return HWAccel("cuda", device=str(index), is_hw_owned=True, options={"primary_ctx": "0", "current_ctx": "1"})


_bound = threading.local()  # per thread: the card whose (torch) context this thread has made current


@functools.lru_cache(maxsize=1)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def _driver_context() -> int:
    """The CUDA driver's current context on this thread (0 when none)."""
    ctx = ctypes.c_void_p()
    _libcuda().cuCtxGetCurrent(ctypes.byref(ctx))
    return ctx.value or 0


def _current_context(device: torch.device) -> None:
    """Make torch's (primary) context of `device` current on this thread, as FFmpeg's current_ctx needs. On a
    fresh thread torch.cuda.set_device alone may not: it skips cudaSetDevice when cudaGetDevice already names
    the card, and no context is bound until a runtime call needs one."""
    torch.cuda.set_device(device)
    if getattr(_bound, "index", None) == device.index:
        return
    torch.cuda.default_stream(device).query()  # a runtime call on the card: binds its primary context here
    if not _driver_context():
        torch.cuda.synchronize(device)
    if not _driver_context():
        raise RuntimeError(f"no CUDA context is current on this thread for {device}")
    _bound.index = device.index


def _check_nvdec(device: torch.device) -> None:
    """Raise RuntimeError unless FFmpeg can use torch's CUDA context on `device` and the NVDEC library loads."""
    from av.codec.hwaccel import hwdevices_available

    if "cuda" not in hwdevices_available():
        raise RuntimeError(f"this FFmpeg build (PyAV {av.__version__}) has no CUDA hwaccel")
    try:
        ctypes.CDLL("libnvcuvid.so.1")
    except OSError as e:
        raise RuntimeError(f"the NVDEC library libnvcuvid.so.1 cannot be loaded ({e})") from None
    try:
        _current_context(device)
        _hwaccel(device.index).create(av.codec.Codec("h264", "r"))
    except Exception as e:  # noqa: BLE001 - FFmpegError, NotImplementedError: no usable device
        raise RuntimeError(f"FFmpeg cannot use CUDA device {device.index}: {type(e).__name__}: {e}") from None


class _Staging:
    """The wanted frames' planes, copied out of the decoder's buffers as they are decoded.
    y: uint8 (n, H, W); uv: uint8 (n, H/2, W/2, 2) (NV12 order); specs[k]: the conversion of slot k."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.device = n, device
        self.y = self.uv = None
        self.specs: list[YUVSpec] = []
        self.hw = self.sw = 0  # frames that came from NVDEC / from FFmpeg's software decoder

    def take(self, frame) -> int:
        hw = frame.format.name == "cuda"
        fmt = frame.sw_format.name if hw else frame.format.name
        spec = yuv_spec(frame.colorspace, frame.color_range, fmt, frame.width, frame.height)
        if isinstance(spec, str):
            raise _Unconvertible(spec)
        k = len(self.specs)
        if self.y is None:
            h, w = frame.height, frame.width
            self.y = torch.empty(self.n, h, w, dtype=torch.uint8, device=self.device)
            self.uv = torch.empty(self.n, h // 2, w // 2, 2, dtype=torch.uint8, device=self.device)
        if hw:  # CUDA NV12 owned by FFmpeg: zero-copy views, copied on the legacy default stream FFmpeg writes on
            self.y[k].copy_(torch.from_dlpack(frame.planes[0].__dlpack__()))   # (H, W), pitched
            self.uv[k].copy_(torch.from_dlpack(frame.planes[1].__dlpack__()))  # (H/2, W/2, 2)
            self.hw += 1
        else:  # a software frame: planar yuv420p / yuvj420p in host memory
            h, w = self.y.shape[1:]
            for plane, dst, ph, pw in ((0, self.y[k], h, w), (1, self.uv[k, ..., 0], h // 2, w // 2),
                                       (2, self.uv[k, ..., 1], h // 2, w // 2)):
                p = frame.planes[plane]
                dst.copy_(torch.from_numpy(np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:ph, :pw]))
            self.sw += 1
        self.specs.append(spec)
        return k

    def to_rgb(self) -> torch.Tensor:
        """uint8 (len(specs), H, W, 3) RGB of the staged frames, in staging order."""
        m = len(self.specs)
        y, u, v = self.y[:m], self.uv[:m, ..., 0], self.uv[:m, ..., 1]
        if all(s == self.specs[0] for s in self.specs):
            return yuv420_to_rgb(y, u, v, self.specs[0])
        out = torch.empty(m, *y.shape[1:], 3, dtype=torch.uint8, device=y.device)
        for spec in set(self.specs):  # tags that change mid-stream: convert each group with its own matrix
            rows = torch.tensor([k for k, s in enumerate(self.specs) if s == spec], device=y.device)
            out[rows] = yuv420_to_rgb(y[rows], u[rows], v[rows], spec)
        return out


class NVDECSource(VideoSource):
    """Files decoded by FFmpeg's NVDEC hwaccel (or, with device="cpu", its software decoder) and converted to
    RGB like PyAV. workers: files decoded at once by `read_batch`. threads: PyAV fallback decoder threads.
    max_failures: NVDEC failures (PyAV decoded the file where NVDEC raised) before the source disables itself."""

    name = "nvdec"
    Disabled = NVDECDisabled

    def __init__(self, device="cuda", workers: int = 16, threads: int = 2, max_failures: int = 2,
                 fallback: PyAVSource | None = None):
        self.device = torch.device(device)
        for key, v, lo in (("workers", workers, 1), ("threads", threads, 1), ("max_failures", max_failures, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"NVDECSource: {key} must be an integer >= {lo}, got {v!r}")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"NVDECSource: device {device!r} asked for but CUDA is not available")
            self.device = torch.device("cuda", self.device.index if self.device.index is not None
                                       else torch.cuda.current_device())
            self.decoder = "nvdec"
        elif self.device.type == "cpu":
            self.decoder = "software"
        else:
            raise ValueError(f"NVDECSource: device must be 'cpu' or a CUDA device, got {device!r}")
        self.codecs = NVDEC_CODECS
        self.workers, self.threads, self.max_failures = workers, threads, max_failures
        self.fallback = fallback or PyAVSource(threads=threads, workers=min(workers, 4))
        self.failures, self.disabled = 0, False
        # videos: decoded on this path; hw_frames / software_frames: wanted frames NVDEC / FFmpeg's software
        # decoder produced; pyav_unconvertible / pyav_failed: files PyAV decoded instead (see the docstring).
        self.stats: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="nvdec")
        if self.decoder == "nvdec":  # on a pool thread: the caller's current device stays as it was
            self._pool.submit(_check_nvdec, self.device).result()
            self._pool.submit(self._self_test).result()

    def _self_test(self) -> None:
        """Decode a small generated H.264 clip on this path and compare it with PyAV: RuntimeError (so that
        build_source falls back) when NVDEC did not decode it or its frames are off by more than the issue's
        bound (mean 1.5 levels, max 6), instead of finding out mid-run."""
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "nvdec_self_test.mp4")
            with av.open(path, "w") as out:
                s = out.add_stream("libx264", rate=10)
                s.width, s.height, s.pix_fmt = 192, 128, "yuv420p"
                for _ in range(6):
                    img = np.repeat(np.repeat(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8), 8, 0), 8, 1)
                    out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
                out.mux(s.encode(None))
            info = self.fallback.probe(path)
            got, want = self._decode(info, [5, 0, 3]), self.fallback.read(path, indices=[5, 0, 3])
        hw, self.stats = self.stats["hw_frames"], collections.Counter()
        diff = (got.frames.cpu().int() - want.frames.int()).abs()
        log.info("NVDEC self-test on %s: %d of 3 frames from the hardware, max difference to PyAV %d levels",
                 self.device, hw, int(diff.max()))
        if hw != 3 or diff.float().mean() > 1.5 or diff.max() > 6:
            raise RuntimeError(f"NVDEC self-test failed: {hw} of 3 frames decoded by NVDEC, difference to PyAV "
                               f"mean {diff.float().mean():.2f} max {int(diff.max())} levels")

    @property
    def label(self) -> str:
        return f"NVDEC via FFmpeg on {self.device}" if self.decoder == "nvdec" else "FFmpeg software + NV12 path"

    def can_decode(self, codec: str) -> bool:
        return canonical_codec(codec) in self.codecs

    def probe(self, path) -> VideoInfo:
        return self.fallback.probe(path)

    def read(self, path, indices: Sequence[int] | None = None, num_frames: int | None = None) -> DecodedVideo:
        (result,) = self.read_batch([(path, indices, num_frames)])
        if isinstance(result, VideoError):
            raise result
        return result

    def read_batch(self, requests, device=None) -> list[DecodedVideo | VideoError]:
        """The base-class contract (a bad file's slot holds its VideoError); frames on `device` (default: the
        decoder's). Raises NVDECDisabled once the source is off; TypeError/ValueError for malformed requests."""
        device = self.device if device is None else torch.device(device)
        if self.disabled:
            raise NVDECDisabled("the NVDEC source was disabled for this run after repeated failures")
        for r in requests:  # malformed requests are programming errors: raise here, not in a worker
            if (r[1] is None) == (r[2] is None):
                raise TypeError(f"read: give exactly one of indices= or num_frames= (got {r[1]!r}, {r[2]!r})")
        out = list(self._pool.map(self._read_one, requests))
        return [r if isinstance(r, VideoError) or r.frames.device == device else r.to(device) for r in out]

    # ------------------------------------------------------------------------------------ one file

    def _read_one(self, request) -> DecodedVideo | VideoError:
        path, indices, num_frames = request
        try:
            info = self.fallback.probe(path)  # typed errors for missing / corrupt / empty / no-video files
            wanted = resolve_indices(info.path, info, indices, num_frames)
        except VideoError as e:
            return e
        try:
            video = self._decode(info, wanted)
        except _Unconvertible as e:
            log.debug("decoded with PyAV, not NVDEC: %s: %s", info.path, e)
            with self._lock:
                self.stats["pyav_unconvertible"] += 1
            return self._pyav(info.path, wanted)
        except Exception as err:  # noqa: BLE001 - the file's fault or NVDEC's: PyAV decides
            result = self._pyav(info.path, wanted)
            if not isinstance(result, VideoError):
                self._failed(info.path, err)
            return result
        with self._lock:
            self.stats["videos"] += 1
        return video

    def _pyav(self, path: str, wanted: list[int]) -> DecodedVideo | VideoError:
        try:
            return self.fallback.read(path, indices=wanted)
        except VideoError as e:
            return e

    def _failed(self, path: str, err: Exception) -> None:
        with self._lock:
            self.failures += 1
            self.stats["pyav_failed"] += 1
            if self.failures >= self.max_failures and not self.disabled:
                self.disabled = True
                log.warning("NVDEC failed again (%s: %s: %s); the NVDEC source is disabled for the rest of the run "
                            "and PyAV decodes every video", path, type(err).__name__, err)
            elif not self.disabled:
                log.warning("NVDEC failed on %s (%s: %s) where PyAV decodes it; PyAV decoded it (%d of %d failures)",
                            path, type(err).__name__, err, self.failures, self.max_failures)

    def _decode(self, info: VideoInfo, wanted: list[int]) -> DecodedVideo:
        cuda = self.device.type == "cuda"
        staging = _Staging(len(set(wanted)), self.device)
        with contextlib.ExitStack() as stack:
            hwaccel = None
            if cuda:
                _current_context(self.device)  # a pool thread: FFmpeg adopts the context current here
                hwaccel = _hwaccel(self.device.index)
                stack.enter_context(torch.cuda.stream(torch.cuda.default_stream(self.device)))
            got, size = decode_frames(info, wanted, staging.take, threads=self.threads, hwaccel=hwaccel)
            rgb = staging.to_rgb()                                              # (U, H, W, 3), decode order
            slots = [got[i][0] for i in wanted]
            frames = rgb if slots == list(range(len(slots))) else rgb[torch.tensor(slots, device=rgb.device)]
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()  # ready for consumers on any stream
        self._note_software(info, staging)
        if size != (info.width, info.height):  # trust the pixels over the header, as PyAV does
            info = dataclasses.replace(info, width=size[0], height=size[1])
        return DecodedVideo(frames=frames.contiguous(), indices=torch.tensor(wanted, dtype=torch.int64),   # (P,)
                            timestamps=torch.tensor([got[i][1] for i in wanted], dtype=torch.float64), info=info)

    def _note_software(self, info: VideoInfo, staging: _Staging) -> None:
        with self._lock:
            self.stats["hw_frames"] += staging.hw
            self.stats["software_frames"] += staging.sw
            codec = canonical_codec(info.codec)
            if self.decoder == "nvdec" and staging.sw and codec not in self._warned:
                self._warned.add(codec)
                log.warning("NVDEC did not take %s (%dx%d, %s); FFmpeg decoded it in software (same frames, slower)",
                            info.path, info.width, info.height, codec)

    def __repr__(self) -> str:
        return f"NVDECSource(device={str(self.device)!r}, workers={self.workers}, disabled={self.disabled})"
