"""Stage 2: video decoding into candidate pools (uint8 (P, H, W, 3) frames on the training device).

    from strive_engine.video import build_source, sample_indices, VideoError
    source = build_source(cfg.video, device)                   # a VideoSource
    pool = source.read(path, num_frames=cfg.video.pool_frames)  # DecodedVideo

`base` holds the contract shared by every backend (index convention, argument checks, typed errors);
`pyav` decodes every codec on the CPU; `dali` (optional, nvidia-dali) decodes with NVDEC on CUDA and VP8/VP9/
MJPEG on the CPU. `RoutingSource` (what `build_source` returns for video.backend=auto|dali when DALI is
installed) sends each file to DALI where it can decode the file's codec on this device, to PyAV otherwise,
and keeps the run going on PyAV if DALI fails for good. Every backend has the same `probe` / `read` /
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

__all__ = [
    "sample_indices", "resolve_indices", "VideoInfo", "DecodedVideo", "VideoSource", "PyAVSource", "RoutingSource",
    "build_source",
    "VideoError", "VideoNotFound", "VideoCorrupt", "NoVideoStream", "UnsupportedCodec", "EmptyVideo",
    "NotEnoughFrames", "FrameIndexError", "FrameSizeChanged",
]


def _dali_module():
    """(strive_engine.video.dali, None), or (None, why) when it or nvidia-dali cannot be imported."""
    try:
        return importlib.import_module("strive_engine.video.dali"), None
    except Exception as e:  # noqa: BLE001 - ImportError, but also a DALI/CUDA library that fails to load
        return None, f"{type(e).__name__}: {e}"


def _dali_source_class():
    """DALISource from strive_engine.video.dali, or None when the module or nvidia-dali is missing."""
    module, _ = _dali_module()
    return None if module is None else module.DALISource


class RoutingSource(VideoSource):
    """Per-file choice between a DALISource and its PyAV fallback.

    mode "auto": DALI for every file whose codec (read by PyAV's cached probe) DALI decodes on this device,
    PyAV for the rest. mode "dali": the same, but a codec DALI cannot decode here is an UnsupportedCodec
    error in that file's slot (H.264 on a CPU-only machine, say), so a misconfigured run is loud; streams
    DALI would number or colour differently are still decoded by PyAV (see strive_engine.video.dali). In
    both modes, once the DALI source has disabled itself after repeated pipeline failures, PyAV decodes
    every file and the run goes on. The decision is logged once per codec (and again if it changes).
    `counts` tallies the decoded videos per route (dali / pyav) for the step metrics; `dali.stats` says how
    many of the DALI-routed ones PyAV decoded after all (streams DALI must not decode, failed runs).
    """

    name = "routing"

    def __init__(self, dali, mode: str = "auto"):
        if mode not in ("auto", "dali"):
            raise ValueError(f"RoutingSource: mode must be 'auto' or 'dali', got {mode!r}")
        self.dali, self.mode, self.pyav = dali, mode, dali.fallback
        self.counts: collections.Counter = collections.Counter()
        self._logged: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(2, dali.threads), thread_name_prefix="video-route")

    def probe(self, path) -> VideoInfo:
        return self.pyav.probe(path)

    def backend_for(self, info: VideoInfo) -> str:
        """"dali" or "pyav" for a probed file; UnsupportedCodec in mode "dali" when DALI cannot decode it."""
        if self.dali.disabled:
            return self._decide(info.codec, "pyav", "DALI was disabled after pipeline failures")
        if self.dali.can_decode(info.codec):
            return self._decide(info.codec, "dali", f"DALI {self.dali.decoder} on {self.dali.device}")
        where = "on the CPU" if self.dali.decoder == "cpu" else "with NVDEC"
        if self.mode == "dali":
            raise UnsupportedCodec(info.path, f"video.backend='dali' but DALI cannot decode {info.codec} {where} "
                                              f"(it decodes {', '.join(sorted(self.dali.codecs))}); set "
                                              f"video.backend=auto to let PyAV decode it")
        return self._decide(info.codec, "pyav", f"DALI cannot decode {info.codec} {where}")

    def _decide(self, codec: str, backend: str, why: str) -> str:
        with self._lock:
            if self._logged.get(codec) != backend:
                self._logged[codec] = backend
                log.info("video decoding: %s files -> %s (%s)", codec, "DALI" if backend == "dali" else "PyAV", why)
        return backend

    def _route(self, path) -> str | VideoError:
        try:
            return self.backend_for(self.pyav.probe(path))
        except VideoError as e:
            return e

    def read(self, path, indices: Sequence[int] | None = None, num_frames: int | None = None) -> DecodedVideo:
        device = self.dali.device if self.dali.decoder == "mixed" else "cpu"
        (result,) = self.read_batch([(path, indices, num_frames)], device=device)
        if isinstance(result, VideoError):
            raise result
        return result

    def read_batch(self, requests, device="cpu") -> list[DecodedVideo | VideoError]:
        device = torch.device(device)
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = {"dali": [], "pyav": []}
        # Probes open each file (tens of ms in FFmpeg, GIL released): files in parallel; they are cached.
        for slot, route in enumerate(self._pool.map(self._route, [r[0] for r in requests])):
            if isinstance(route, VideoError):
                out[slot] = route
            else:
                groups[route].append(slot)
        if groups["dali"]:
            try:
                results = self.dali.read_batch([requests[i] for i in groups["dali"]], device=device)
                self.counts["dali"] += sum(not isinstance(r, VideoError) for r in results)
                for slot, res in zip(groups["dali"], results):
                    out[slot] = res
            except self.dali.Disabled:
                groups["pyav"] = sorted(groups["pyav"] + groups["dali"])
        if groups["pyav"]:
            results = self.pyav.read_batch([requests[i] for i in groups["pyav"]], device=device)
            self.counts["pyav"] += sum(not isinstance(r, VideoError) for r in results)
            for slot, res in zip(groups["pyav"], results):
                out[slot] = res
        return out

    def __repr__(self) -> str:
        return f"RoutingSource(mode={self.mode!r}, dali={self.dali!r})"


def build_source(cfg, device="cpu") -> VideoSource:
    """The decoder `cfg.backend` asks for (`cfg` is a VideoConfig: backend, decode_threads, ...).

    pyav: PyAVSource(threads=cfg.decode_threads). auto / dali: a RoutingSource over
    `DALISource.from_config(cfg, device)` (DALI where it decodes the codec on `device`, PyAV otherwise).
    When DALI cannot be imported or set up, auto falls back to PyAV with a log line, while dali raises
    (ImportError with the install hint, or the set-up error): the user asked for it explicitly.
    """
    backend = cfg.backend
    if backend not in ("auto", "dali", "pyav"):
        raise ValueError(f"video.backend: {backend!r} is not one of 'auto', 'dali', 'pyav'")
    if backend in ("auto", "dali"):
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
        log.info("video decoding: PyAV on the CPU (%d threads per file); DALI is not available (%s)",
                 cfg.decode_threads, why)
    return PyAVSource(threads=cfg.decode_threads, workers=cfg.decode_workers)
