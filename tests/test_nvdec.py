"""NVDEC source (FFmpeg's hwaccel, NV12 converted like PyAV): the same pools and the same typed errors as
PyAVSource, a step's files decoded concurrently, failures handed over to PyAV.

On the CPU the source runs with FFmpeg's software decoder (device="cpu"): the same probe, frame walk,
staging, conversion, thread pool and failure policy, everything but the hardware. The GPU tests (marked gpu)
run the hardware path on clips at least NVDEC's minimum size (HEVC 144x144, VP9 128x128)."""
import logging
import time

import numpy as np
import pytest
import torch

from colour_models import agreement
from strive_engine.config import VideoConfig
from strive_engine.video import PyAVSource, RoutingSource, VideoError, build_source, sample_indices
from strive_engine.video.nvdec import NVDECDisabled, NVDECSource
from videoclips import BAD_TYPES, BLOCK, bad_files, read_code, stamp_code, write_clip

pytestmark = pytest.mark.timeout(120)

N, FPS = 37, 10
BARS = np.array([(230, 20, 30), (20, 220, 40), (30, 40, 230), (240, 230, 20), (200, 30, 210)], np.uint8)
SUFFIX = {"h264": "mp4", "hevc": "mp4", "vp9": "webm", "mjpeg": "avi"}
GPU_W, GPU_H = 256, 160  # above NVDEC's minimum frame size for every codec here


def bars(i: int, w: int, h: int) -> np.ndarray:
    """Frame number i in luma blocks above saturated colour bars moving 3 px per frame (sharp chroma edges)."""
    img = np.full((h, w, 3), 16, np.uint8)  # (H, W, 3)
    img[BLOCK:] = BARS[((np.arange(w) + 3 * i) // 10) % len(BARS)][None]
    return stamp_code(img, i)


def make_clips(d, w, h, **tags):
    return {c: write_clip(d / f"clip_{c}_{w}.{SUFFIX[c]}", c, bars, N, w, h, FPS, **tags) for c in SUFFIX}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_clips(tmp_path_factory.mktemp("nvdec_clips"), 96, 48)


@pytest.fixture(scope="module")
def src():
    return NVDECSource("cpu", workers=4)


def assert_same_pool(got, ref):
    assert torch.equal(got.frames.cpu(), ref.frames) and got.frames.is_contiguous()
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.timestamps, ref.timestamps)
    assert got.info == ref.info


@pytest.mark.parametrize("codec", list(SUFFIX))
def test_same_pools_as_pyav(src, clips, codec):
    ref = PyAVSource()
    for req in ({"num_frames": 1}, {"num_frames": 16}, {"num_frames": N}, {"indices": [36, 0, 17, 17, 5, 1]}):
        got = src.read(clips[codec], **req)
        assert_same_pool(got, ref.read(clips[codec], **req))
        want = req.get("indices") or sample_indices(N, req["num_frames"])
        assert [read_code(f) for f in got.frames.numpy()] == want
    assert src.stats["software_frames"] > 0 and src.stats["hw_frames"] == 0 and src.stats["pyav_unconvertible"] == 0


def test_tagged_and_full_range_streams(src, tmp_path):
    for tags in ({"colorspace": 1}, {"colorspace": 9}, {"colorspace": 6, "color_range": 2}):
        path = write_clip(tmp_path / f"t{len(tags)}{tags['colorspace']}.mp4", "h264", bars, 12, 96, 48, FPS, **tags)
        assert_same_pool(src.read(path, num_frames=6), PyAVSource().read(path, num_frames=6))


class _AsHardwareFrame:
    """A host NV12 frame dressed as FFmpeg's CUDA frame (format "cuda", sw_format nv12): its planes export
    through the same DLPack call, so the staging code for hardware frames runs on the CPU."""

    def __init__(self, nv12):
        self._f = nv12
        self.format = type("Fmt", (), {"name": "cuda"})()
        self.sw_format = nv12.format

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_nv12_hardware_frame_path_on_host_frames(clips):
    """The branch that takes FFmpeg's CUDA NV12 frames (DLPack planes: Y (H, W), UV (H/2, W/2, 2), pitched),
    fed with host NV12 frames: the same RGB as PyAV's own conversion of the decoded yuv420p frames."""
    import av

    from strive_engine.video.nvdec import _Staging

    with av.open(clips["hevc"]) as c:
        frames = [f for _, f in zip(range(5), c.decode(video=0))]
    staging = _Staging(len(frames), torch.device("cpu"))
    for f in frames:
        nv12 = f.reformat(format="nv12")  # lossless: the same samples, interleaved chroma
        assert nv12.planes[0].line_size >= f.width  # pitched rows, as NVDEC's surfaces are
        staging.take(_AsHardwareFrame(nv12))
    assert staging.hw == len(frames) and staging.sw == 0
    want = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in frames])
    assert torch.equal(staging.to_rgb(), want)


def test_streams_it_cannot_convert_go_to_pyav(tmp_path):
    src = NVDECSource("cpu", workers=2)
    odd = write_clip(tmp_path / "odd.webm", "vp9", bars, 8, 97, 51, FPS)      # swscale interpolates odd heights
    ycgco = write_clip(tmp_path / "ycgco.mp4", "h264", bars, 8, 96, 48, FPS, colorspace=8)  # PyAV refuses it
    got = src.read_batch([(odd, None, 4), (ycgco, None, 4)])
    assert_same_pool(got[0], PyAVSource().read(odd, num_frames=4))
    with pytest.raises(VideoError) as ref:
        PyAVSource().read(ycgco, num_frames=4)
    assert type(got[1]) is type(ref.value) and str(got[1]) == str(ref.value)
    assert src.stats["pyav_unconvertible"] == 2 and src.failures == 0


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_files(tmp_path_factory.mktemp("nvdec_bad"), bars, 96, 48)


def check_bad_inputs(source, bad, good, device=None):
    """Every bad file gives PyAV's typed error (type and message), in its slot, named; good ones decode."""
    names = list(BAD_TYPES)
    req = [(good, None, 8)] + [(bad[k], None, 20) for k in names] + [(good, [0, N], None), (good, None, N + 1),
                                                                      (good, None, 8)]
    out = source.read_batch(req, device=device or "cpu")
    ref = PyAVSource().read_batch(req)
    for k, got, want in zip(["good"] + names + ["index", "count", "good"], out, ref):
        if isinstance(want, VideoError):
            assert type(got) is type(want) and str(got) == str(want) and got.path == want.path, (k, got, want)
            assert type(got).__name__ == BAD_TYPES.get(k, type(want).__name__), k
        else:
            assert_same_pool(got, want)
    assert [type(r).__name__ for r in out[-3:-1]] == ["FrameIndexError", "NotEnoughFrames"]
    return out


def test_every_bad_input_is_typed_named_and_skipped(src, bad, clips):
    check_bad_inputs(src, bad, clips["h264"])
    assert src.failures == 0 and not src.disabled  # bad files never count against the decoder


def test_failure_policy_hands_over_to_pyav(clips, monkeypatch, caplog):
    """An exception on the NVDEC path where PyAV decodes the file: PyAV's frames, a failure counted; at
    max_failures the source disables itself and the routing source decodes everything with PyAV."""
    nv = NVDECSource("cpu", workers=2, max_failures=2)
    routing = RoutingSource(nv, mode="auto")
    monkeypatch.setattr(NVDECSource, "_decode", lambda self, info, wanted: (_ for _ in ()).throw(
        RuntimeError("injected NVDEC failure")))
    req = [(clips["vp9"], None, 8), (clips["h264"], [3, 1], None)]
    with caplog.at_level(logging.WARNING):
        out = routing.read_batch(req)
    assert [[read_code(f) for f in v.frames.numpy()] for v in out] == [sample_indices(N, 8), [3, 1]]
    assert nv.failures == 2 and nv.disabled and "injected NVDEC failure" in caplog.text
    assert "disabled for the rest of the run" in caplog.text
    with pytest.raises(NVDECDisabled):
        nv.read_batch(req)
    out = routing.read_batch(req)
    assert [[read_code(f) for f in v.frames.numpy()] for v in out] == [sample_indices(N, 8), [3, 1]]
    assert routing.counts == {"nvdec": 2, "pyav": 2}  # the first batch was NVDEC-routed (PyAV decoded it)


def test_workers_decode_files_at_once(clips, monkeypatch):
    """read_batch runs its files on `workers` threads at once (one decoder each), results in their slots."""
    import strive_engine.video.nvdec as nvdec_mod

    src = NVDECSource("cpu", workers=4)
    live, peak = [0], [0]
    real = nvdec_mod.decode_frames

    def counting(*a, **k):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        time.sleep(0.05)  # hold the slot so overlapping calls are seen
        try:
            return real(*a, **k)
        finally:
            live[0] -= 1
    monkeypatch.setattr(nvdec_mod, "decode_frames", counting)
    paths = [clips[c] for c in ("h264", "vp9", "hevc", "mjpeg")] * 2
    out = src.read_batch([(p, [k, k + 1], None) for k, p in enumerate(paths)])
    assert [[read_code(f) for f in v.frames.numpy()] for v in out] == [[k, k + 1] for k in range(8)]
    assert peak[0] >= 2  # files overlapped (4 workers)


def test_routing_runs_the_pyav_group_alongside(clips, monkeypatch):
    """A batch's PyAV-routed files decode on a worker thread while the primary decodes its own files."""
    nv = NVDECSource("cpu", workers=2)
    nv.codecs = frozenset({"h264"})  # the rest goes to PyAV
    routing = RoutingSource(nv, mode="auto")
    spans = {}

    def timed(name, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            time.sleep(0.2)
            out = fn(*a, **k)
            spans[name] = (t0, time.perf_counter())
            return out
        return run
    monkeypatch.setattr(nv, "read_batch", timed("nvdec", nv.read_batch))
    monkeypatch.setattr(routing.pyav, "read_batch", timed("pyav", routing.pyav.read_batch))
    out = routing.read_batch([(clips["h264"], [1, 2], None), (clips["vp9"], [3], None), (clips["h264"], [4], None)])
    assert [[read_code(f) for f in v.frames.numpy()] for v in out] == [[1, 2], [3], [4]]
    assert routing.counts == {"nvdec": 2, "pyav": 1}
    (a0, a1), (b0, b1) = spans["nvdec"], spans["pyav"]
    assert a0 < b1 and b0 < a1  # the two groups overlapped in time


def test_self_test_rejects_a_path_the_hardware_does_not_decode():
    """The start-up check (run for device="cuda") compares a generated clip with PyAV and insists that NVDEC
    decoded it: FFmpeg's software path, as here, makes build_source fall back to DALI or PyAV."""
    src = NVDECSource("cpu")
    with pytest.raises(RuntimeError, match="0 of 3 frames decoded by NVDEC, difference to PyAV mean 0.00 max 0"):
        src._self_test()
    assert src.stats == {}  # the check's own frames are not counted


def test_build_source_on_cpu_keeps_pyav_or_dali():
    src = build_source(VideoConfig(backend="auto"), "cpu")
    assert not isinstance(getattr(src, "primary", None), NVDECSource)  # NVDEC is a CUDA-only choice
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            NVDECSource("cuda")
    with pytest.raises(ValueError, match="workers"):
        NVDECSource("cpu", workers=0)


# ------------------------------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def gpu_clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("nvdec_gpu")
    out = make_clips(d, GPU_W, GPU_H)
    out["h264_bt709"] = write_clip(d / "bt709.mp4", "h264", bars, N, GPU_W, GPU_H, FPS, colorspace=1)
    out["h264_full"] = write_clip(d / "full.mp4", "h264", bars, N, GPU_W, GPU_H, FPS, colorspace=6, color_range=2)
    return out


@pytest.mark.gpu
def test_nvdec_frames_match_pyav(gpu_clips):
    """The issue's bound (mean <= 1.5 levels; 99th percentile <= 6 away from saturated edges) on H.264, HEVC
    and VP9, through what video.backend=auto builds on CUDA; expected: identical frames."""
    src = build_source(VideoConfig(backend="auto"), "cuda")
    assert isinstance(src, RoutingSource) and isinstance(src.primary, NVDECSource), src
    ref = PyAVSource()
    for name in ("h264", "hevc", "vp9", "h264_bt709", "h264_full"):
        got, want = src.read(gpu_clips[name], num_frames=16), ref.read(gpu_clips[name], num_frames=16)
        assert got.frames.is_cuda and torch.equal(got.indices, want.indices)
        assert torch.equal(got.timestamps, want.timestamps)
        assert [read_code(f) for f in got.frames.cpu().numpy()] == sample_indices(N, 16)
        a = agreement(got.frames, want.frames)
        print(f"NVDEC vs PyAV {name}: {a}")
        assert a["mean"] <= 1.5 and a["p99_flat"] <= 6, (name, a)
    hw = src.primary.stats
    print(f"NVDEC stats: {dict(hw)}")
    assert hw["hw_frames"] >= 5 * 16 and hw["software_frames"] == 0, hw  # the hardware decoded, not FFmpeg's CPU


@pytest.mark.gpu
def test_nvdec_bad_input(tmp_path, gpu_clips):
    """Every bad file of the CPU tests, at NVDEC's sizes, behaves on the GPU path as on PyAV: typed (same
    type and message), named, skipped; the good files around them decode; nothing counts as an NVDEC failure."""
    src = build_source(VideoConfig(backend="auto"), "cuda")
    bad = bad_files(tmp_path, bars, GPU_W, GPU_H, small=(192, 144))
    out = check_bad_inputs(src, bad, gpu_clips["h264"], device="cuda")
    assert out[0].frames.is_cuda and src.primary.failures == 0 and not src.primary.disabled
    from strive_engine.data import VideoQA
    from strive_engine.pipeline import decode_batch

    recs = [VideoQA(id=k, path=p, question="q?", options=(), answer="1", solution="", problem_type="numerical",
                    data_type="video", source=k) for k, p in [("good", gpu_clips["vp9"])] + list(bad.items())]
    batch = decode_batch(recs, src, pool_frames=20, device="cuda", log_errors=False)
    assert batch.valid.tolist() == [True] + [False] * len(bad)
    assert all(p.frames.is_cuda for p in batch.pools)   # the placeholders too: the step concatenates them
    want: dict = {}
    for k in bad:
        want[BAD_TYPES[k]] = want.get(BAD_TYPES[k], 0) + 1
    assert dict(batch.skipped) == want  # counted per type for data/skipped_videos


@pytest.mark.gpu
def test_nvdec_decodes_a_step_concurrently(gpu_clips):
    """8 files through decode_batch: one read_batch, up to NVDEC_WORKERS decoders at once; same pools."""
    from strive_engine.data import VideoQA
    from strive_engine.pipeline import decode_batch

    src = build_source(VideoConfig(backend="auto"), "cuda")
    paths = [gpu_clips[c] for c in ("h264", "hevc", "vp9", "h264_bt709")] * 2
    recs = [VideoQA(id=str(i), path=p, question="q?", options=(), answer="1", solution="", problem_type="numerical",
                    data_type="video", source=str(i)) for i, p in enumerate(paths)]
    decode_batch(recs[:1], src, pool_frames=16, device="cuda")  # warm-up (CUDA context, first decoder)
    t0 = time.perf_counter()
    batch = decode_batch(recs, src, pool_frames=16, device="cuda")
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in recs:
        src.read(r.path, num_frames=16)
    t_serial = time.perf_counter() - t0
    print(f"8 videos: one batch {t_batch * 1e3:.0f} ms, one after another {t_serial * 1e3:.0f} ms")
    assert batch.valid.all() and src.counts["nvdec"] >= 8
    for p, pool in zip(paths, batch.pools):
        assert torch.equal(pool.frames.cpu(), PyAVSource().read(p, num_frames=16).frames)
