"""The decoding contract every video backend honours (stage 2 of the data flow).

A `VideoSource` turns a file path into a candidate pool: `frames` uint8 `(P, H, W, 3)` RGB at the
requested frame numbers, with their timestamps and the file's `VideoInfo`. Backends (PyAV on CPU now,
DALI later) differ in speed only: the frame numbering, the index convention (`sample_indices`), the
argument checks (`resolve_indices`) and the typed errors live here so that every backend returns the
same frames for the same request and fails the same way on the same bad file.

Frame numbers count the frames a decoder outputs, in presentation order, from 0 to `num_frames - 1`.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "sample_indices", "resolve_indices", "VideoInfo", "DecodedVideo", "VideoSource",
    "VideoError", "VideoNotFound", "VideoCorrupt", "NoVideoStream", "UnsupportedCodec", "EmptyVideo",
    "NotEnoughFrames", "FrameIndexError", "FrameSizeChanged",
]


# ------------------------------------------------------------------------------------------- errors


class VideoError(Exception):
    """A video could not be decoded as asked. `path` is the file, `reason` says what is wrong; the
    message always starts with the path so a log line alone identifies the file."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):
        # Exceptions with a custom __init__ do not pickle by default; decode workers send them back.
        return (type(self), (self.path, self.reason))


class VideoNotFound(VideoError):
    """The path does not exist or is not a regular file."""


class VideoCorrupt(VideoError):
    """The container or the bitstream is truncated or cannot be parsed/decoded."""


class NoVideoStream(VideoError):
    """The container holds no video stream (audio only, subtitles, cover art only...)."""


class UnsupportedCodec(VideoError):
    """The video stream uses a codec this backend has no decoder for."""


class EmptyVideo(VideoError):
    """The video stream holds zero frames."""


class NotEnoughFrames(VideoError):
    """More frames were asked for (`num_frames=n`) than the video has; `available` is how many it has (a pool
    builder asks again for all of them: `strive_engine.pipeline.decode_batch`)."""

    def __init__(self, path, reason: str, available: int | None = None):
        super().__init__(path, reason)
        self.available = available

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.available))


class FrameIndexError(VideoError):
    """A requested frame number is negative or beyond the last frame."""


class FrameSizeChanged(VideoError):
    """The decoded frame size changes mid-stream, so the frames cannot form one (P, H, W, 3) tensor."""


# ------------------------------------------------------------------------------------------ indices


def sample_indices(total_frames: int, n: int) -> list[int]:
    """`n` frame numbers spread evenly over `total_frames`, exactly as qwen-vl-utils picks them:
    `torch.linspace(0, total_frames - 1, n).round().long()`.

    The arithmetic is float32 (qwen-vl-utils runs under torch's default dtype) and `round` is round
    half to even, so e.g. (total 6, n 3) -> [0, 2, 5] and not [0, 3, 5]. In about 1% of (total, n)
    pairs float32 rounding moves an exact .5 tie one step (total 48, n 23: frame 23 where exact
    rationals give 24); we keep that so the same frames are chosen as by the qwen-vl-utils pipeline.
    For n <= total_frames the result is strictly increasing (the step is >= 1).

    Raises ValueError when n < 1 or total_frames < 1. Asking for more frames than the video has is the
    source's concern (`NotEnoughFrames`, which names the file), not this function's.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_indices: n must be an integer >= 1, got {n!r}")
    if isinstance(total_frames, bool) or not isinstance(total_frames, int) or total_frames < 1:
        raise ValueError(f"sample_indices: total_frames must be an integer >= 1, got {total_frames!r}")
    # dtype pinned: a user's torch.set_default_dtype(float64) must not change which frames are read.
    return torch.linspace(0, total_frames - 1, n, dtype=torch.float32).round().long().tolist()


def resolve_indices(path, info: "VideoInfo", indices: Sequence[int] | None, num_frames: int | None) -> list[int]:
    """Check a read request against the video and return the frame numbers to decode.

    Exactly one of `indices` (explicit frame numbers, any order, repeats allowed) or `num_frames`
    (`sample_indices(info.num_frames, num_frames)`) must be given (TypeError otherwise).
    Raises EmptyVideo (0 frames), NotEnoughFrames (num_frames > info.num_frames), FrameIndexError
    (an index < 0 or >= info.num_frames, or not an integer) and ValueError (num_frames < 1, no indices).
    Shared by every backend so that they accept and reject exactly the same requests.
    """
    if (indices is None) == (num_frames is None):
        raise TypeError("read: give exactly one of indices= or num_frames= "
                        f"(got indices={indices!r}, num_frames={num_frames!r})")
    if info.num_frames == 0:
        raise EmptyVideo(path, "the video stream has 0 frames")
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"read {path}: num_frames must be an integer >= 1, got {num_frames!r}")
        if num_frames > info.num_frames:
            raise NotEnoughFrames(path, f"asked for {num_frames} frames but the video has only {info.num_frames}",
                                  available=info.num_frames)
        return sample_indices(info.num_frames, num_frames)
    if isinstance(indices, torch.Tensor):
        indices = indices.reshape(-1).tolist()
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                as_int = int(i)  # numpy / torch integer scalars
            except (TypeError, ValueError):
                raise FrameIndexError(path, f"frame index {i!r} is not an integer") from None
            if as_int != i:
                raise FrameIndexError(path, f"frame index {i!r} is not an integer")
            i = as_int
        if not 0 <= i < info.num_frames:
            raise FrameIndexError(path, f"frame index {i} is out of range: the video has {info.num_frames} "
                                        f"frames (valid 0..{info.num_frames - 1})")
        out.append(i)
    if not out:
        raise ValueError(f"read {path}: indices is empty")
    return out


# -------------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns without decoding.

    num_frames: exact number of decodable frames (see the backend for how it is counted).
    fps: frames per second of the stream. duration: num_frames / fps, in seconds (the span of the
    frame timeline, the same on every backend). width, height: coded frame size in pixels.
    codec: FFmpeg codec name of the video stream, e.g. "h264", "vp9", "mjpeg" (what DALI routing reads).
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str


@dataclass
class DecodedVideo:
    """A candidate pool. frames: uint8 (P, H, W, 3) RGB, contiguous; indices: int64 (P,) frame numbers
    in request order; timestamps: float64 (P,) seconds from the first frame of the stream."""

    frames: torch.Tensor
    indices: torch.Tensor
    timestamps: torch.Tensor
    info: VideoInfo

    def __post_init__(self):
        p = self.indices.shape[0]
        if self.frames.dtype != torch.uint8 or self.frames.dim() != 4 or self.frames.shape[-1] != 3:
            raise ValueError(f"DecodedVideo.frames must be uint8 (P, H, W, 3), got {self.frames.dtype} "
                             f"{tuple(self.frames.shape)} for {self.info.path}")
        if self.frames.shape[0] != p or self.timestamps.shape != (p,):
            raise ValueError(f"DecodedVideo: {self.frames.shape[0]} frames, {p} indices and "
                             f"{tuple(self.timestamps.shape)} timestamps disagree for {self.info.path}")

    def to(self, device, non_blocking: bool = False) -> "DecodedVideo":
        """The same pool with `frames` on `device` (indices/timestamps stay on the CPU: they are metadata)."""
        return DecodedVideo(self.frames.to(device, non_blocking=non_blocking), self.indices, self.timestamps,
                            self.info)


def frame_rate(values: Sequence[float | None]) -> float | None:
    """The first finite, positive rate among `values` (container metadata in order of trust)."""
    for v in values:
        if v is not None:
            f = float(v)
            if math.isfinite(f) and f > 0:
                return f
    return None


# ----------------------------------------------------------------------------------------- interface


ReadRequest = tuple[str, "Sequence[int] | None", "int | None"]


class VideoSource(abc.ABC):
    """A video decoding backend. Subclasses implement `probe` and `read`; `read_batch` loops by default
    (a backend that decodes a batch at once, like DALI, overrides it with the same contract)."""

    name: str = "abstract"

    @abc.abstractmethod
    def probe(self, path) -> VideoInfo:
        """Frame count, rate, size and codec of the file's video stream. Raises a VideoError subclass."""

    @abc.abstractmethod
    def read(self, path, indices: Sequence[int] | None = None, num_frames: int | None = None) -> DecodedVideo:
        """Decode the frames `indices` (in that order, repeats allowed) or `num_frames` frames spread
        evenly (`sample_indices`). Exactly one of the two. Raises a VideoError subclass naming the path;
        TypeError/ValueError for a malformed request."""

    def read_batch(self, requests: Sequence[ReadRequest], device="cpu") -> list[DecodedVideo | VideoError]:
        """Decode several `(path, indices, num_frames)` requests; frames are moved to `device`.

        Never raises for a bad item: its slot holds the VideoError instead, so one corrupt file costs one
        sample, not the batch. Malformed requests (both or neither of indices/num_frames) are programming
        errors and do raise.
        """
        device = torch.device(device)
        pin = device.type == "cuda"
        out: list[DecodedVideo | VideoError] = []
        for path, indices, num_frames in requests:
            try:
                video = self.read(path, indices=indices, num_frames=num_frames)
            except VideoError as e:
                out.append(e)
                continue
            if device.type != "cpu":
                frames = video.frames.pin_memory() if pin else video.frames
                video = DecodedVideo(frames.to(device, non_blocking=pin), video.indices, video.timestamps,
                                     video.info)
            out.append(video)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
