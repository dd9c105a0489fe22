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

Colour. DALI converts with BT.601: on the CPU with swscale `BILINEAR|FULL_CHR_H_INT|ACCURATE_RND` (range from
the pixel format), on CUDA with its own kernel (`VideoColorSpaceConversionKernel`: luma nearest, chroma
*bilinearly interpolated* at centre siting, BT.601 limited or JPEG full range from the stream's range flag;
no option returns YUV). PyAV honours the matrix tag and *replicates* chroma (swscale's default path). BT.709/
FCC/240M/BT.2020-tagged streams are mapped to their matrix after decoding (one 3x3 product: within +-1 of
PyAV with the same flags away from clipped values). So DALI's RGB equals PyAV's on flat colour (rounding: a
few levels) but not on sharp chroma edges (up to ~110 levels, mean 5.7 on the colour-bar test clip; the H200
run measured 5.97 for NVDEC): the chroma upsampling, not the matrix or the range (tests/test_dali.py checks
this diagnosis against an emulation of DALI's kernel on the GPU). Where PyAV-exact frames matter on CUDA,
`video.backend=auto` uses `strive_engine.video.nvdec` (NV12 from FFmpeg's NVDEC, converted like PyAV).

Concurrency. One `read_batch` runs its videos as one DALI batch (the pipeline grows to the request, up to
`max_batch_size`); DALI decodes the samples of a batch in parallel, one per thread: on CUDA the pipeline gets
a thread per video (up to 16), so the videos of a step use the card's several NVDEC engines at once.
NVDEC refuses frames below its minimum size (HEVC 144x144, VP9/AV1 128x128, ...), which would fail the whole
batch: such files go to PyAV.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
from typing import Sequence

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
# NVDEC's smallest decodable frame per codec (width, height; NVIDIA Video Codec SDK decoder capabilities).
NVDEC_MIN_SIZE = {"h264": (48, 16), "hevc": (144, 144), "vp8": (48, 16), "vp9": (128, 128), "mjpeg": (64, 64)}
MIXED_PARALLEL = 16  # most videos one mixed-backend run decodes at once (one DALI thread, one NVDEC session each)
_SCAN_CACHE_SIZE = 1024


class DALIDisabled(RuntimeError):
    """DALI was switched off for this run after repeated pipeline failures; decode with PyAV instead."""


from strive_engine.video.scan import StreamScan, _recolour_, canonical_codec, scan_stream  # noqa: F401


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
    chunks). threads: DALI CPU threads (each decodes one video of a batch at a time; on CUDA the pipeline
    gets at least one per video of a batch, up to MIXED_PARALLEL). batch_size: videos per pipeline run at
    first; a longer request grows the pipeline up to max_batch_size (longer still: chunks of that size).
    max_rebuilds: DALI failures absorbed by rebuilding the pipeline before DALI is disabled.
    fallback: the PyAVSource that probes files and decodes what DALI must not (shared probe cache)."""

    name = "dali"
    Disabled = DALIDisabled  # so callers can catch it without importing this optional module

    def __init__(self, device="cpu", threads: int = 2, batch_size: int = 8, max_rebuilds: int = 1,
                 fallback: PyAVSource | None = None, workers: int = 1, max_batch_size: int = 64):
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
        for key, v, lo in (("threads", threads, 1), ("batch_size", batch_size, 1), ("max_rebuilds", max_rebuilds, 0),
                           ("max_batch_size", max_batch_size, batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"DALISource: {key} must be an integer >= {lo}, got {v!r}")
        self.threads, self.batch_size, self.max_rebuilds = threads, batch_size, max_rebuilds
        self.max_batch_size = max_batch_size
        self.fallback = fallback or PyAVSource(threads=threads, workers=workers)
        self.failures, self.disabled = 0, False
        # dali_videos / dali_runs: decoded by DALI; pyav_unsafe: streams DALI must not decode; pyav_failed_run:
        # videos re-decoded by PyAV after a failed run; bad_file_failures: runs failed because of a bad file.
        self.stats: collections.Counter = collections.Counter()
        self._scans: collections.OrderedDict[tuple, StreamScan] = collections.OrderedDict()
        self._lock = threading.RLock()  # one pipeline: runs are serialised
        self._scan_lock = threading.Lock()
        # Probe + scan (demux passes) of a step's files at once; on CUDA as many as the pipeline decodes at once.
        width = max(2, threads) if self.decoder == "cpu" else max(threads, MIXED_PARALLEL)
        self._pool = concurrent.futures.ThreadPoolExecutor(width, thread_name_prefix="dali-probe")
        self._pipe = self._new_pipeline()  # built now, so a broken install fails at set-up, not mid-run

    @classmethod
    def from_config(cls, cfg, device="cpu") -> "DALISource":
        """From a VideoConfig: decode_threads DALI CPU threads (and PyAV threads for the fallback)."""
        return cls(device, threads=cfg.decode_threads, workers=cfg.decode_workers)

    @property
    def label(self) -> str:
        return f"DALI {self.decoder} on {self.device}"

    @property
    def pipeline_threads(self) -> int:
        """DALI threads of the pipeline: `threads`, or on CUDA one per video of a batch (up to MIXED_PARALLEL)."""
        return self.threads if self.decoder == "cpu" else max(self.threads, min(self.batch_size, MIXED_PARALLEL))

    def can_decode(self, codec: str) -> bool:
        """Whether this source's DALI decoder handles `codec` (an FFmpeg codec or decoder name)."""
        return canonical_codec(codec) in self.codecs

    # -------------------------------------------------------------------------------- pipeline

    def _new_pipeline(self):
        @pipeline_def(batch_size=self.batch_size, num_threads=self.pipeline_threads,
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
        low = NVDEC_MIN_SIZE.get(codec, (0, 0)) if self.decoder == "mixed" else (0, 0)
        if scan.unsafe is None and (info.width < low[0] or info.height < low[1]):
            scan = dataclasses.replace(scan, unsafe=f"{info.width}x{info.height} is below NVDEC's {codec} minimum "
                                                    f"{low[0]}x{low[1]}")
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
            self._grow(len(jobs))
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

    def _grow(self, n: int) -> None:
        """Rebuild the pipeline for batches of min(n, max_batch_size) videos if it is smaller (one run per step)."""
        n = min(n, self.max_batch_size)
        if n <= self.batch_size or self.disabled:
            return
        old = self.batch_size
        self.batch_size = n
        try:
            self._pipe = self._new_pipeline()
            log.debug("DALI pipeline grown from %d to %d videos per run (%d threads)", old, n, self.pipeline_threads)
        except Exception as e:  # noqa: BLE001 - keep the old pipeline: smaller runs still work
            self.batch_size = old
            log.warning("DALI pipeline could not grow to %d videos per run (%s); keeping %d", n, _short(e), old)

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
        return (f"DALISource(device={str(self.device)!r}, decoder={self.decoder!r}, threads={self.pipeline_threads}, "
                f"batch_size={self.batch_size}, disabled={self.disabled})")
