"""Stage 2: video decoding into candidate pools (uint8 (P, H, W, 3) frames on the training device).

    from strive_engine.video import build_source, sample_indices, VideoError
    source = build_source(cfg.video, device)                   # a VideoSource
    pool = source.read(path, num_frames=cfg.video.pool_frames)  # DecodedVideo

`base` holds the contract shared by every backend (index convention, argument checks, typed errors);
`pyav` decodes every codec on the CPU. A DALI backend (GPU NVDEC, CPU VP9/MJPEG; issue 7) plugs in as
another `VideoSource` with the same `probe` / `read` / `read_batch` and the same errors.
"""
from __future__ import annotations

import importlib
import logging

from strive_engine.video.base import (DecodedVideo, EmptyVideo, FrameIndexError, FrameSizeChanged, NoVideoStream,
                                      NotEnoughFrames, UnsupportedCodec, VideoCorrupt, VideoError, VideoInfo,
                                      VideoNotFound, VideoSource, resolve_indices, sample_indices)
from strive_engine.video.pyav import PyAVSource

log = logging.getLogger(__name__)

__all__ = [
    "sample_indices", "resolve_indices", "VideoInfo", "DecodedVideo", "VideoSource", "PyAVSource", "build_source",
    "VideoError", "VideoNotFound", "VideoCorrupt", "NoVideoStream", "UnsupportedCodec", "EmptyVideo",
    "NotEnoughFrames", "FrameIndexError", "FrameSizeChanged",
]


def _dali_source_class():
    """DALISource from strive_engine.video.dali, or None when the module or nvidia-dali is missing."""
    try:
        return importlib.import_module("strive_engine.video.dali").DALISource
    except (ImportError, AttributeError):
        return None


def build_source(cfg, device="cpu") -> VideoSource:
    """The decoder `cfg.backend` asks for (`cfg` is a VideoConfig: backend, decode_threads, ...).

    pyav: PyAVSource(threads=cfg.decode_threads). dali: the DALI backend, built by
    `DALISource.from_config(cfg, device)`; ImportError with the install hint when it is unavailable
    (the user asked for it explicitly). auto: DALI when it is available, PyAV otherwise (the DALI
    source itself routes codecs it cannot decode on this device to PyAV).
    """
    backend = cfg.backend
    if backend not in ("auto", "dali", "pyav"):
        raise ValueError(f"video.backend: {backend!r} is not one of 'auto', 'dali', 'pyav'")
    if backend in ("auto", "dali"):
        dali = _dali_source_class()
        if dali is not None:
            return dali.from_config(cfg, device)
        if backend == "dali":
            raise ImportError("video.backend='dali' needs the DALI backend (strive_engine.video.dali) and "
                              "nvidia-dali: pip install -e '.[dali]'; or set --video.backend=pyav")
        log.info("video decoding: PyAV on the CPU (%d threads per file); DALI is not available", cfg.decode_threads)
    return PyAVSource(threads=cfg.decode_threads)
