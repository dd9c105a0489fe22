"""Stage 2: video decoding into candidate pools (uint8 (P, H, W, 3) frames on the training device).

    from strive_engine.video import build_source, sample_indices, VideoError
    source = build_source(cfg.video, device)                   # a VideoSource
    pool = source.read(path, num_frames=cfg.video.pool_frames)  # DecodedVideo

`base` holds the contract shared by every backend (index convention, argument checks, typed errors);
`pyav` decodes every codec on the CPU; `nvdec` decodes with NVDEC through FFmpeg (PyAV's CUDA hwaccel) and
converts NV12 to RGB on the GPU exactly as PyAV does (`colour`); `dali` (optional, nvidia-dali) decodes with
NVDEC on CUDA (its own RGB conversion: BT.601, interpolated chroma) and VP8/VP9/MJPEG on the CPU.
`RoutingSource` (what `build_source` returns for video.backend=auto|dali when a batch decoder is available)
sends each file to that decoder where it decodes the file's codec on this device, to PyAV otherwise, and
keeps the run going on PyAV if the decoder fails for good. Every backend has the same `probe` / `read` /
`read_batch` and raises the same typed errors.
"""
from __future__ import annotations

import collections
import concurrent.futures
import importlib
import logging
import threading
from typing import Sequence

import torch

from strive_engine.video.base import (DecodedVideo, EmptyVideo, FrameIndexError, FrameSizeChanged, NoVideoStream,
                                      NotEnoughFrames, UnsupportedCodec, VideoCorrupt, VideoError, VideoInfo,
                                      VideoNotFound, VideoSource, resolve_indices, sample_indices)
from strive_engine.video.pyav import PyAVSource

log = logging.getLogger(__name__)

# Files a step decodes at once on the NVDEC path (an H100/H200 has 7 NVDEC engines; more files than engines
# keep them fed while some threads demux or wait on the GIL).
NVDEC_WORKERS = 16
_SHOWN = {"dali": "DALI", "nvdec": "NVDEC", "pyav": "PyAV"}  # route names as log lines print them

__all__ = [
    "sample_indices", "resolve_indices", "VideoInfo", "DecodedVideo", "VideoSource", "PyAVSource", "RoutingSource",
    "build_source",
    "NVDEC_WORKERS", "VideoError", "VideoNotFound", "VideoCorrupt", "NoVideoStream", "UnsupportedCodec", "EmptyVideo",
    "NotEnoughFrames", "FrameIndexError", "FrameSizeChanged",
]


def _dali_module():
    """(strive_engine.video.dali, None), or (None, why) when it or nvidia-dali cannot be imported."""
    try:
        return importlib.import_module("strive_engine.video.dali"), None
    except Exception as e:  # noqa: BLE001 - ImportError, but also a DALI/CUDA library that fails to load
        return None, f"{type(e).__name__}: {e}"


class RoutingSource(VideoSource):
    """Per-file choice between a batch decoder (`primary`: an NVDECSource or a DALISource) and PyAV.

    mode "auto": the primary decoder for every file whose codec (read by PyAV's cached probe) it decodes on
    this device, PyAV for the rest. mode "dali": the same, but a codec the primary cannot decode here is an
    UnsupportedCodec error in that file's slot (H.264 with DALI on a CPU-only machine, say), so a
    misconfigured run is loud; streams it would number or colour differently are still decoded by PyAV (see
    the backends). In both modes, once the primary has disabled itself after repeated failures, PyAV decodes
    every file and the run goes on. The decision is logged once per codec (and again if it changes).
    `counts` tallies the decoded videos per route (the primary's name, or pyav) for the step metrics;
    `primary.stats` says how many of the routed ones PyAV decoded after all.

    A batch's two groups run at once: the PyAV group on a worker thread while the primary decodes its group.
    """

    name = "routing"

    def __init__(self, primary, mode: str = "auto"):
        if mode not in ("auto", "dali"):
            raise ValueError(f"RoutingSource: mode must be 'auto' or 'dali', got {mode!r}")
        self.primary, self.mode, self.pyav = primary, mode, primary.fallback
        self.counts: collections.Counter = collections.Counter()
        self._logged: dict[str, str] = {}
        self._lock = threading.Lock()
        # Probes (one demux pass per new file) for a whole step at once, as many as the primary decodes at once.
        width = max(2, primary.threads, getattr(primary, "workers", 0))
        self._pool = concurrent.futures.ThreadPoolExecutor(width, thread_name_prefix="video-route")

    def probe(self, path) -> VideoInfo:
        return self.pyav.probe(path)

    def backend_for(self, info: VideoInfo) -> str:
        """The primary's name or "pyav" for a probed file; UnsupportedCodec in mode "dali" when the primary
        cannot decode it."""
        p = self.primary
        if p.disabled:
            return self._decide(info.codec, "pyav", f"{_SHOWN[p.name]} was disabled after repeated failures")
        if p.can_decode(info.codec):
            return self._decide(info.codec, p.name, p.label)
        if self.mode == "dali":
            raise UnsupportedCodec(info.path, f"video.backend='dali' but {p.label} cannot decode {info.codec} "
                                              f"(it decodes {', '.join(sorted(p.codecs))}); set "
                                              f"video.backend=auto to let PyAV decode it")
        return self._decide(info.codec, "pyav", f"{p.label} cannot decode {info.codec}")

    def _decide(self, codec: str, backend: str, why: str) -> str:
        with self._lock:
            if self._logged.get(codec) != backend:
                self._logged[codec] = backend
                log.info("video decoding: %s files -> %s (%s)", codec, _SHOWN[backend], why)
        return backend

    def _route(self, path) -> str | VideoError:
        try:
            return self.backend_for(self.pyav.probe(path))
        except VideoError as e:
            return e

    def read(self, path, indices: Sequence[int] | None = None, num_frames: int | None = None) -> DecodedVideo:
        device = self.primary.device if self.primary.device.type == "cuda" else "cpu"
        (result,) = self.read_batch([(path, indices, num_frames)], device=device)
        if isinstance(result, VideoError):
            raise result
        return result

    def read_batch(self, requests, device="cpu") -> list[DecodedVideo | VideoError]:
        device = torch.device(device)
        out: list = [None] * len(requests)
        mine, theirs = [], []
        # Probes open each file (tens of ms in FFmpeg, GIL released): files in parallel; they are cached.
        for slot, route in enumerate(self._pool.map(self._route, [r[0] for r in requests])):
            if isinstance(route, VideoError):
                out[slot] = route
            else:
                (theirs if route == "pyav" else mine).append(slot)
        pending = self._pool.submit(self.pyav.read_batch, [requests[i] for i in theirs], device) if theirs else None
        if mine:
            try:
                results = self.primary.read_batch([requests[i] for i in mine], device=device)
                self.counts[self.primary.name] += sum(not isinstance(r, VideoError) for r in results)
                for slot, res in zip(mine, results):
                    out[slot] = res
            except self.primary.Disabled:
                results = self.pyav.read_batch([requests[i] for i in mine], device=device)
                self.counts["pyav"] += sum(not isinstance(r, VideoError) for r in results)
                for slot, res in zip(mine, results):
                    out[slot] = res
        if pending is not None:
            results = pending.result()
            self.counts["pyav"] += sum(not isinstance(r, VideoError) for r in results)
            for slot, res in zip(theirs, results):
                out[slot] = res
        return out

    def __repr__(self) -> str:
        return f"RoutingSource(mode={self.mode!r}, primary={self.primary!r})"


def build_source(cfg, device="cpu") -> VideoSource:
    """The decoder `cfg.backend` asks for (`cfg` is a VideoConfig: backend, decode_threads, decode_workers).

    pyav: PyAVSource(threads=cfg.decode_threads, workers=cfg.decode_workers).
    auto: on a CUDA device, a RoutingSource over an NVDECSource (NVDEC through FFmpeg, PyAV-exact colours),
    else over DALI's decoder for `device` (on a CPU: VP8/VP9/MJPEG), else PyAV; each step down is logged.
    dali: a RoutingSource over `DALISource.from_config(cfg, device)`; when DALI cannot be imported or set up
    this raises (ImportError with the install hint, or the set-up error): the user asked for it explicitly.
    """
    backend = cfg.backend
    if backend not in ("auto", "dali", "pyav"):
        raise ValueError(f"video.backend: {backend!r} is not one of 'auto', 'dali', 'pyav'")
    if backend == "pyav":
        return PyAVSource(threads=cfg.decode_threads, workers=cfg.decode_workers)
    whys = []
    if backend == "auto" and torch.device(device).type == "cuda":
        try:
            from strive_engine.video.nvdec import NVDECSource

            return RoutingSource(NVDECSource(device, workers=max(NVDEC_WORKERS, cfg.decode_workers),
                                             threads=cfg.decode_threads), mode="auto")
        except Exception as e:  # noqa: BLE001 - no CUDA hwaccel in this FFmpeg, no libnvcuvid, no device
            whys.append(f"NVDEC via FFmpeg: {type(e).__name__}: {e}")
            log.info("video decoding: NVDEC via FFmpeg is not available (%s); trying DALI", whys[-1])
    module, why = _dali_module()
    if module is None and backend == "dali":
        raise ImportError(f"video.backend='dali' cannot load the DALI backend ({why}); install it with "
                          f"pip install -e '.[dali]' or set --video.backend=pyav")
    if module is not None:
        try:
            return RoutingSource(module.DALISource.from_config(cfg, device), mode=backend)
        except Exception as e:  # noqa: BLE001 - e.g. no CUDA device for "mixed", a DALI build error
            if backend == "dali":
                raise
            why = f"set-up failed: {type(e).__name__}: {e}"
    whys.append(f"DALI: {why}")
    log.info("video decoding: PyAV on the CPU (%d threads per file); %s", cfg.decode_threads, "; ".join(whys))
    return PyAVSource(threads=cfg.decode_threads, workers=cfg.decode_workers)
