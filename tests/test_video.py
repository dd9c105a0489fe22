"""PyAV backend: frame numbering and index convention, reproducibility, and one typed error per bad file.

Clips are written with PyAV (tests/videoclips.py): frame i carries its own number as a 6-bit code of black/white blocks
(survives lossy coding), so a test can check that "frame i" really is the i-th frame."""
import os
import pickle

import av
import numpy as np
import pytest
import torch

from strive_engine.video import (DecodedVideo, EmptyVideo, FrameIndexError, FrameSizeChanged, NoVideoStream,
                                 NotEnoughFrames, PyAVSource, UnsupportedCodec, VideoCorrupt, VideoError,
                                 VideoInfo, VideoNotFound, sample_indices)
from videoclips import BLOCK, CODECS, read_code, stamp_code, write_clip

pytestmark = pytest.mark.timeout(120)  # a hang on a bad file fails instead of blocking CI

N, W, H, FPS = 37, 96, 40, 10  # odd frame count on purpose; 6 code blocks of 16 px per row


def coded_frame(i: int, w: int = W, h: int = H) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)  # (H, W, 3)
    img[BLOCK:, :] = (40, 200, 90)
    return stamp_code(img, i)


def write(path, codec="h264", n=N, w=W, h=H, fmt=None, options=None):
    return write_clip(path, codec, coded_frame, n, w, h, FPS, fmt=fmt, options=options)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {c: write(d / f"clip{spec[2]}", c) for c, spec in CODECS.items()}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, clips):
    d = tmp_path_factory.mktemp("bad")
    mp4 = open(clips["h264"], "rb").read()
    webm = open(clips["vp9"], "rb").read()
    files = {"missing": str(d / "nope.mp4"), "directory": str(d)}
    (d / "zero.mp4").write_bytes(b"")
    files["zero"] = str(d / "zero.mp4")
    (d / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    files["random"] = str(d / "random.mp4")
    (d / "trunc.mp4").write_bytes(mp4[: len(mp4) // 2])  # moov atom (at the end) lost
    files["trunc_mp4"] = str(d / "trunc.mp4")
    fast = write(d / "fast.mp4", options={"movflags": "faststart"})  # index first, then the data is cut
    data = open(fast, "rb").read()
    (d / "trunc_fast.mp4").write_bytes(data[: len(data) * 2 // 3])
    files["trunc_faststart"] = str(d / "trunc_fast.mp4")
    (d / "trunc.webm").write_bytes(webm[: len(webm) // 2])
    files["trunc_webm"] = str(d / "trunc.webm")
    # The H.264 sample entry renamed to an unknown fourcc: FFmpeg finds no decoder.
    at = mp4.index(b"avc1", mp4.index(b"stsd"))  # the sample entry (the ftyp brand list has one too)
    (d / "unknown_codec.mp4").write_bytes(mp4[:at] + b"zzzz" + mp4[at + 4:])
    files["unknown_codec"] = str(d / "unknown_codec.mp4")
    with av.open(str(d / "audio.m4a"), "w", format="mp4") as out:
        s = out.add_stream("aac", rate=16000)
        for k in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, k * 1024
            out.mux(s.encode(fr))
        out.mux(s.encode(None))
    files["audio_only"] = str(d / "audio.m4a")
    files["empty"] = write(d / "empty.avi", "mjpeg", n=0)  # a video stream with zero frames
    # Two raw H.264 streams of different sizes back to back: the decoder switches size at frame 10.
    a = write(d / "a.h264", n=10, fmt="h264")
    b = write(d / "b.h264", n=10, w=48, h=32, fmt="h264")
    (d / "size.h264").write_bytes(open(a, "rb").read() + open(b, "rb").read())
    files["size_change"] = str(d / "size.h264")
    return files


# ------------------------------------------------------------------------------------------ indices


def test_sample_indices_is_the_qwen_expression():
    for total in (1, 2, 5, 6, 16, 37, 48, 100, 301, 1799):
        for n in sorted({1, 2, 3, 4, 7, 16, 23, 32, total // 2 + 1, total}):
            if n > total:
                continue
            got = sample_indices(total, n)
            assert got == torch.linspace(0, total - 1, n).round().long().tolist(), (total, n)
            assert got[0] == 0 and (n == 1 or got[-1] == total - 1)
            assert all(b > a for a, b in zip(got, got[1:])), (total, n, got)  # unique when n <= total


def test_sample_indices_rounds_half_to_even():
    assert sample_indices(6, 3) == [0, 2, 5]   # 2.5 -> 2 (half-up would give 3)
    assert sample_indices(4, 3) == [0, 2, 3]   # 1.5 -> 2
    assert sample_indices(8, 3) == [0, 4, 7]   # 3.5 -> 4
    assert sample_indices(10, 1) == [0]


def test_sample_indices_ignores_default_dtype():
    expected = sample_indices(48, 23)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert sample_indices(48, 23) == expected
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("total,n", [(0, 1), (5, 0), (5, -2), (5, 2.0), (True, 1)])
def test_sample_indices_rejects_bad_arguments(total, n):
    with pytest.raises(ValueError):
        sample_indices(total, n)


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("codec", list(CODECS))
def test_probe(clips, codec):
    info = PyAVSource().probe(clips[codec])
    assert info == VideoInfo(path=clips[codec], num_frames=N, fps=float(FPS), duration=N / FPS, width=W, height=H,
                             codec=codec)


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_frame_has_its_number(clips, codec):
    src = PyAVSource(threads=2)
    video = src.read(clips[codec], indices=list(range(N)))
    assert video.frames.shape == (N, H, W, 3) and video.frames.dtype == torch.uint8
    assert video.frames.is_contiguous()
    assert [read_code(f) for f in video.frames.numpy()] == list(range(N))
    assert video.indices.dtype == torch.int64 and video.timestamps.dtype == torch.float64
    torch.testing.assert_close(video.timestamps, torch.arange(N, dtype=torch.float64) / FPS)


@pytest.mark.parametrize("codec", list(CODECS))
def test_num_frames_uses_sample_indices_and_reads_are_identical(clips, codec):
    src = PyAVSource()
    for n in (1, 4, 16, N):
        a = src.read(clips[codec], num_frames=n)
        assert a.indices.tolist() == sample_indices(N, n)
        assert [read_code(f) for f in a.frames.numpy()] == sample_indices(N, n)
    a = PyAVSource(threads=1).read(clips[codec], num_frames=9)
    b = PyAVSource(threads=3).read(clips[codec], num_frames=9)  # fresh source: no shared cache
    assert torch.equal(a.frames, b.frames) and torch.equal(a.indices, b.indices)


def test_indices_keep_request_order_and_repeats(clips):
    src = PyAVSource()
    req = [30, 2, 2, 36, 0, 17]
    video = src.read(clips["vp9"], indices=req)
    assert video.indices.tolist() == req
    assert [read_code(f) for f in video.frames.numpy()] == req
    full = src.read(clips["vp9"], indices=list(range(N)))
    assert torch.equal(video.frames, full.frames[req])  # same pixels as a full sequential decode
    np_req = src.read(clips["vp9"], indices=np.array(req, dtype=np.int64))
    assert torch.equal(np_req.frames, video.frames)


def test_request_must_name_exactly_one_of_indices_and_num_frames(clips):
    src = PyAVSource()
    with pytest.raises(TypeError, match="exactly one"):
        src.read(clips["h264"])
    with pytest.raises(TypeError, match="exactly one"):
        src.read(clips["h264"], indices=[0], num_frames=2)
    with pytest.raises(ValueError, match="num_frames"):
        src.read(clips["h264"], num_frames=0)
    with pytest.raises(ValueError):
        PyAVSource(threads=0)


def test_probe_cache_sees_a_rewritten_file(tmp_path):
    path = write(tmp_path / "c.mp4", n=12)
    src = PyAVSource()
    assert src.probe(path).num_frames == 12
    os.remove(path)
    write(path, n=20)
    assert src.probe(path).num_frames == 20
    assert src.read(path, num_frames=20).frames.shape[0] == 20


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kind,error", [
    ("missing", VideoNotFound), ("directory", VideoNotFound), ("zero", VideoCorrupt), ("random", VideoCorrupt),
    ("trunc_mp4", VideoCorrupt), ("trunc_faststart", VideoCorrupt), ("trunc_webm", VideoCorrupt),
    ("unknown_codec", UnsupportedCodec), ("audio_only", NoVideoStream), ("empty", EmptyVideo),
    ("size_change", FrameSizeChanged),
])
def test_bad_file_raises_its_typed_error(bad, kind, error):
    src = PyAVSource()
    with pytest.raises(error) as exc:
        src.read(bad[kind], num_frames=1 if kind != "size_change" else 12)
    assert exc.value.path == bad[kind]
    assert str(exc.value).startswith(bad[kind])  # the message names the file
    assert isinstance(exc.value, VideoError)


def test_size_change_only_matters_when_reached(bad):
    # Frames 0..9 share one size: a request that stops before the switch succeeds.
    video = PyAVSource().read(bad["size_change"], indices=[0, 5, 9])
    assert [read_code(f) for f in video.frames.numpy()] == [0, 5, 9]
    with pytest.raises(FrameSizeChanged, match="frame 10"):
        PyAVSource().read(bad["size_change"], indices=[0, 10])


def test_too_many_frames_and_out_of_range_index(clips):
    src = PyAVSource()
    path = clips["h264"]
    with pytest.raises(NotEnoughFrames, match=f"{N + 1}.*{N}") as exc:
        src.read(path, num_frames=N + 1)
    assert exc.value.path == path
    for idx in ([N], [0, -1], [N + 100]):
        with pytest.raises(FrameIndexError) as exc:
            src.read(path, indices=idx)
        assert str(exc.value).startswith(path)
    with pytest.raises(FrameIndexError, match="not an integer"):
        src.read(path, indices=[1.5])


def test_errors_pickle(bad):
    err = VideoCorrupt(bad["zero"], "the file is empty (0 bytes)")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is VideoCorrupt and back.path == err.path and str(back) == str(err)


@pytest.mark.parametrize("workers", [1, 3])
def test_read_batch_returns_errors_in_their_slots(clips, bad, workers):
    src = PyAVSource(workers=workers)  # workers > 1: files decoded concurrently, same order and slots
    out = src.read_batch([
        (clips["h264"], None, 4),
        (bad["random"], None, 4),
        (clips["vp9"], [3, 1], None),
        (clips["mjpeg"], None, N + 5),
        (bad["missing"], [0], None),
    ])
    assert isinstance(out[0], DecodedVideo) and out[0].indices.tolist() == sample_indices(N, 4)
    assert isinstance(out[1], VideoCorrupt) and out[1].path == bad["random"]
    assert isinstance(out[2], DecodedVideo) and [read_code(f) for f in out[2].frames.numpy()] == [3, 1]
    assert isinstance(out[3], NotEnoughFrames)
    assert isinstance(out[4], VideoNotFound)


@pytest.mark.gpu
def test_read_batch_to_cuda(clips):
    out = PyAVSource().read_batch([(clips["h264"], None, 8), (clips["vp9"], None, 8)], device="cuda")
    cpu = PyAVSource().read(clips["h264"], num_frames=8)
    assert out[0].frames.is_cuda and torch.equal(out[0].frames.cpu(), cpu.frames)
    assert out[1].frames.shape == (8, H, W, 3)


def test_build_source_follows_the_config():
    from strive_engine.config import VideoConfig
    from strive_engine.video import VideoSource, build_source
    from strive_engine.video import _dali_module

    src = build_source(VideoConfig(backend="pyav", decode_threads=3))
    assert isinstance(src, PyAVSource) and src.threads == 3
    assert isinstance(build_source(VideoConfig(backend="auto")), VideoSource)
    if _dali_module()[0] is None:
        assert type(build_source(VideoConfig(backend="auto"))) is PyAVSource
        with pytest.raises(ImportError, match="backend='dali'"):
            build_source(VideoConfig(backend="dali"))
