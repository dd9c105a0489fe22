"""DALI backend and backend routing: same frames as PyAV, every bad input typed and skipped, DALI failures
absorbed (rebuild, then PyAV for the rest of the run).

Clips are written here with PyAV. Frame i carries its number as 6 black/white blocks (luma only, so colour
conversion cannot change it) above a band of saturated colour bars that move with i (sharp chroma edges,
where DALI's and PyAV's RGB conversions differ most)."""
import logging
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia.dali cannot be imported (optional extra [dali]): DALI tests skipped",
                    exc_type=ImportError)

from av.video.reformatter import Interpolation  # noqa: E402

from strive_engine.config import VideoConfig  # noqa: E402
from strive_engine.video import (EmptyVideo, FrameIndexError, FrameSizeChanged, NoVideoStream,  # noqa: E402
                                 NotEnoughFrames, PyAVSource, RoutingSource, UnsupportedCodec, VideoCorrupt,
                                 VideoNotFound, build_source, sample_indices)
from strive_engine.video import scan as scan_mod  # noqa: E402
from strive_engine.video.dali import DALIDisabled, DALISource, scan_stream  # noqa: E402
import videoclips  # noqa: E402
from videoclips import BLOCK, CODECS, read_code, stamp_code, write_clip  # noqa: E402

pytestmark = pytest.mark.timeout(120)

N, W, H, FPS = 37, 96, 48, 10
GPU_W, GPU_H = 256, 160  # GPU clips: above NVDEC's minimum frame size for H.264, HEVC and VP9
BARS = np.array([(230, 20, 30), (20, 220, 40), (30, 40, 230), (240, 230, 20), (200, 30, 210)], np.uint8)
# DALI's CPU conversion (frames_decoder_cpu.cc): swscale with these flags, default (BT.601) matrix.
DALI_FLAGS = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


def coded_frame(i: int, w: int = W, h: int = H) -> np.ndarray:
    img = np.full((h, w, 3), 16, np.uint8)  # (H, W, 3)
    x = np.arange(w)
    img[BLOCK:] = BARS[((x + 3 * i) // 10) % len(BARS)][None]  # bars 10 px wide, moving 3 px per frame
    return stamp_code(img, i)


def write(path, codec="vp9", n=N, w=W, h=H, colorspace=None):
    return write_clip(path, codec, coded_frame, n, w, h, FPS, colorspace=colorspace)


def write_size_change(path, codec, sizes=((96, 48), (64, 32)), fmt=None):
    """One stream whose packets come from two encoders of different frame sizes (as spliced footage)."""
    return videoclips.write_size_change(path, codec, coded_frame, FPS, sizes=sizes, fmt=fmt)


def pyav_frames(path, indices, flags=None):
    """Every frame decoded by PyAV, converted with `flags` (None: PyAV's default), at `indices`."""
    with av.open(path) as c:
        frames = list(c.decode(video=0))
    kw = {} if flags is None else {"interpolation": flags}
    return torch.from_numpy(np.stack([frames[i].to_ndarray(format="rgb24", **kw) for i in indices]))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali_clips")
    return {c: write(d / f"clip{spec[2]}", c) for c, spec in CODECS.items()}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, clips):
    d = tmp_path_factory.mktemp("dali_bad")
    webm = open(clips["vp9"], "rb").read()
    mp4 = open(clips["h264"], "rb").read()
    files = {"missing": str(d / "nope.webm"), "zero_bytes": str(d / "zero.webm")}
    (d / "zero.webm").write_bytes(b"")
    (d / "random.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    files["random"] = str(d / "random.webm")
    (d / "trunc.webm").write_bytes(webm[: len(webm) // 2])  # DALI alone decodes this into black frames
    files["truncated"] = str(d / "trunc.webm")
    at = mp4.index(b"avc1", mp4.index(b"stsd"))
    (d / "unknown.mp4").write_bytes(mp4[:at] + b"zzzz" + mp4[at + 4:])
    files["unknown_codec"] = str(d / "unknown.mp4")
    with av.open(str(d / "audio.webm"), "w", format="webm") as out:
        s = out.add_stream("libopus", rate=48000)
        for k in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="flt", layout="mono")
            fr.sample_rate, fr.pts = 48000, k * 960
            out.mux(s.encode(fr))
        out.mux(s.encode(None))
    files["audio_only"] = str(d / "audio.webm")
    files["zero_frames"] = write(d / "empty.avi", "mjpeg", n=0)
    files["size_vp9"] = write_size_change(d / "size.webm", "vp9")
    files["size_mjpeg"] = write_size_change(d / "size.avi", "mjpeg")
    # VP9 packet 20 cut after its first 4 bytes: the container and the frame-size part of the header are
    # fine (probe and scan pass), both decoders reject the rest of the header. DALI fails the whole batch.
    with av.open(clips["vp9"]) as c:
        packets = [(bytes(p), p.pts) for p in c.demux(video=0) if p.size]
    with av.open(str(d / "bitrot.webm"), "w", format="webm") as out:
        s = out.add_stream("libvpx-vp9", rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for j, (data, pts) in enumerate(packets):
            if j == 20:
                data = data[:4]
            p = av.Packet(data)
            p.stream, p.time_base, p.pts, p.dts = s, Fraction(1, 1000), pts, pts
            out.mux(p)
    files["bitrot"] = str(d / "bitrot.webm")
    return files


@pytest.fixture(scope="module")
def src():
    return DALISource("cpu", threads=2)


# ---------------------------------------------------------------------------------- same frames


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_is_bit_identical_to_pyav_decode_with_dalis_conversion(src, clips, codec):
    """Same frames, same decoder output; with DALI's swscale flags the RGB matches bit for bit."""
    req = [36, 0, 17, 17, 5, 30, 1] + list(range(N))  # any order, repeats, every frame
    video = src.read(clips[codec], indices=req)
    assert video.frames.dtype == torch.uint8 and video.frames.shape == (len(req), H, W, 3)
    assert video.frames.is_contiguous() and video.frames.device.type == "cpu"
    assert [read_code(f) for f in video.frames.numpy()] == req
    assert torch.equal(video.frames, pyav_frames(clips[codec], req, DALI_FLAGS))
    ref = PyAVSource().read(clips[codec], indices=req)
    assert video.info == ref.info and torch.equal(video.indices, ref.indices)
    assert torch.equal(video.timestamps, ref.timestamps)  # exact: same rational arithmetic


def away_from_edges(frames: torch.Tensor, step: int = 24, reach: int = 2) -> torch.Tensor:
    """(P, H, W) bool: pixels more than `reach` px from any jump of > `step` levels in `frames` (P, H, W, 3):
    beyond the reach of 4:2:0 chroma upsampling, where only rounding can tell two conversions apart."""
    f = frames.float()
    jump_x = (f[:, :, 1:] - f[:, :, :-1]).abs().amax(-1) > step
    jump_y = (f[:, 1:] - f[:, :-1]).abs().amax(-1) > step
    edge = torch.zeros(frames.shape[:3], dtype=torch.bool)
    edge[:, :, 1:] |= jump_x
    edge[:, :, :-1] |= jump_x
    edge[:, 1:] |= jump_y
    edge[:, :-1] |= jump_y
    return torch.nn.functional.max_pool2d(edge.float()[:, None], 2 * reach + 1, 1, reach)[:, 0] == 0


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_against_pyav_source_differs_only_by_conversion(src, clips, codec):
    """What "equal" to PyAVSource (swscale's default path) means: the same frame numbers, timestamps and
    frame content; RGB within rounding away from colour edges; no bound at the edges themselves (chroma
    interpolated by DALI, replicated by PyAV's default path: up to ~110 levels on these hard-edged bars)."""
    for n in (1, 8, N):
        a, b = src.read(clips[codec], num_frames=n), PyAVSource().read(clips[codec], num_frames=n)
        assert a.indices.tolist() == b.indices.tolist() == sample_indices(N, n)
        assert torch.equal(a.timestamps, b.timestamps)
        assert [read_code(f) for f in a.frames.numpy()] == sample_indices(N, n)
    d = (a.frames.int() - b.frames.int()).abs().amax(-1)   # (N, H, W), all N frames
    flat = away_from_edges(b.frames)
    assert flat.float().mean() > 0.2  # enough flat area for the check to mean something
    # Measured here (largest channel error per pixel): 99 % of flat pixels within 4, max 9; edges up to ~110.
    assert torch.quantile(d[flat].float(), 0.99) <= 5 and d[flat].max() <= 16, (d[flat].max(), d.max())
    assert d.max() > 16  # the edges do differ: the documented tolerance is not vacuous


def test_bt709_tagged_stream_is_recoloured_like_pyav(src, tmp_path):
    """DALI converts with BT.601; PyAV honours a BT.709 tag. The 3x3 fix brings DALI to within +-1 of
    PyAV with the same swscale flags away from edges (at edges, values BT.601 clipped to [0, 255] before
    the fix cannot be recovered exactly: measured max 7); without it the colours are off by 10-25."""
    path = write(tmp_path / "bt709.webm", colorspace=1)  # AVCOL_SPC_BT709
    scan = scan_stream(path)
    assert scan.unsafe is None and scan.recolour is not None
    got = src.read(path, indices=[0, 12, 36]).frames
    ref = pyav_frames(path, [0, 12, 36], DALI_FLAGS)  # PyAV 17+ applies the tagged matrix
    d = (got.int() - ref.int()).abs().amax(-1)  # (3, H, W)
    assert d[away_from_edges(ref)].max() <= 1 and (d <= 1).float().mean() > 0.97 and d.max() <= 8
    plain = scan.recolour @ np.linalg.inv(scan.recolour)  # sanity of the matrix itself
    np.testing.assert_allclose(plain, np.eye(3), atol=1e-5)
    untagged = src.read(write(tmp_path / "plain.webm"), indices=[12]).frames
    assert (untagged.int() - ref[1:2].int()).abs().max() >= 10  # the correction is not a no-op


def test_outputs_stay_valid_after_later_runs(src, clips):
    """Zero-copy outputs must not be recycled by DALI (exec_dynamic): a held pool survives more runs."""
    first = src.read(clips["vp9"], indices=[3, 9])
    keep = first.frames.clone()
    for _ in range(3):
        src.read_batch([(clips["mjpeg"], [0, 1, 2], None), (clips["vp9"], [30, 31], None)])
    assert torch.equal(first.frames, keep)


def test_read_batch_chunks_and_keeps_order(clips):
    src = DALISource("cpu", threads=2, batch_size=2, max_batch_size=2)  # cannot grow: chunks of 2
    req = [(clips["vp9"], [i], None) for i in (4, 8)] + [(clips["mjpeg"], [i, i + 1], None) for i in (0, 20, 35)]
    out = src.read_batch(req)
    assert [[read_code(f) for f in v.frames.numpy()] for v in out] == [[4], [8], [0, 1], [20, 21], [35, 36]]
    assert src.stats["dali_runs"] == 3 and src.stats["dali_videos"] == 5


def test_a_steps_videos_are_one_dali_batch(tmp_path, clips):
    """Concurrent decoding: a step's B videos, each with its own frame list, go through one pipeline run (DALI
    decodes a batch's samples in parallel, one per thread), not one run per video or per chunk of the initial
    batch size. The same path decodes with NVDEC on CUDA (test_dali_mixed_decodes_a_step_in_one_batch)."""
    from strive_engine.data import VideoQA
    from strive_engine.pipeline import decode_batch

    short = write(tmp_path / "short.webm", n=23)  # another length: another sample_indices list
    paths = [clips["vp9"], short, clips["mjpeg"], short, clips["vp9"], clips["h264"]]
    recs = [VideoQA(id=str(i), path=p, question="q?", options=(), answer="1", solution="", problem_type="numerical",
                    data_type="video", source=f"r:{i}") for i, p in enumerate(paths)]
    source = build_source(VideoConfig(backend="auto"), "cpu")
    source.primary.batch_size = 2  # a small initial pipeline: the step must grow it, not run in chunks
    source.primary._pipe = source.primary._new_pipeline()
    out = decode_batch(recs, source, pool_frames=12, log_errors=False)
    assert out.valid.all()
    for p, pool in zip(paths, out.pools):
        assert [read_code(f) for f in pool.frames.numpy()] == sample_indices(23 if p == short else N, 12), p
    assert source.primary.stats["dali_runs"] == 1 and source.primary.stats["dali_videos"] == 5  # H.264: PyAV
    assert source.primary.batch_size == 5 and source.counts == {"dali": 5, "pyav": 1}
    assert source.primary.pipeline_threads == source.primary.threads  # on the CPU: as configured


def test_dali_source_arguments():
    with pytest.raises(ValueError, match="threads"):
        DALISource("cpu", threads=0)
    with pytest.raises(ValueError, match="device"):
        DALISource("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            DALISource("cuda")


# -------------------------------------------------------------------------------------- routing


def test_auto_routes_h264_to_pyav_and_logs_once_per_codec(clips, caplog):
    src = build_source(VideoConfig(backend="auto"), "cpu")
    assert isinstance(src, RoutingSource) and isinstance(src.primary, DALISource)
    req = [(clips[c], None, 8) for c in ("h264", "vp9", "mjpeg", "h264")]
    with caplog.at_level(logging.INFO, logger="strive_engine.video"):
        out = src.read_batch(req)
        src.read_batch(req)
    assert src.counts == {"dali": 4, "pyav": 4}
    assert torch.equal(out[0].frames, PyAVSource().read(clips["h264"], num_frames=8).frames)
    for v in out:
        assert [read_code(f) for f in v.frames.numpy()] == sample_indices(N, 8)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("video decoding:")]
    assert sorted(lines) == sorted(["video decoding: h264 files -> PyAV (DALI cpu on cpu cannot decode h264)",
                                    "video decoding: vp9 files -> DALI (DALI cpu on cpu)",
                                    "video decoding: mjpeg files -> DALI (DALI cpu on cpu)"])


def test_forced_dali_rejects_h264_on_cpu_per_sample(clips):
    src = build_source(VideoConfig(backend="dali"), "cpu")
    out = src.read_batch([(clips["vp9"], None, 4), (clips["h264"], None, 4), (clips["mjpeg"], None, 4)])
    assert isinstance(out[1], UnsupportedCodec) and out[1].path == clips["h264"]
    assert str(out[1]).startswith(clips["h264"]) and "h264" in str(out[1]) and "backend=auto" in str(out[1])
    assert [read_code(f) for f in out[0].frames.numpy()] == sample_indices(N, 4)
    assert [read_code(f) for f in out[2].frames.numpy()] == sample_indices(N, 4)
    with pytest.raises(UnsupportedCodec):
        src.read(clips["h264"], num_frames=4)


def test_build_source_backends(monkeypatch):
    assert type(build_source(VideoConfig(backend="pyav"))) is PyAVSource
    import strive_engine.video as video
    monkeypatch.setattr(video, "_dali_module", lambda: (None, "ImportError: no module named nvidia.dali"))
    assert type(build_source(VideoConfig(backend="auto"))) is PyAVSource
    with pytest.raises(ImportError, match=r"no module named nvidia.dali.*pip install -e .\.\[dali\]"):
        build_source(VideoConfig(backend="dali"))


# ------------------------------------------------------------------------------------ bad input

EXPECTED = {"missing": VideoNotFound, "zero_bytes": VideoCorrupt, "random": VideoCorrupt, "truncated": VideoCorrupt,
            "unknown_codec": UnsupportedCodec, "audio_only": NoVideoStream, "zero_frames": EmptyVideo,
            "size_vp9": FrameSizeChanged, "size_mjpeg": FrameSizeChanged, "bitrot": VideoCorrupt}


@pytest.mark.parametrize("mode", ["auto", "dali"])
def test_every_bad_input_is_typed_named_and_skipped(clips, bad, mode):
    src = build_source(VideoConfig(backend=mode), "cpu")
    names = list(EXPECTED)
    req = [(clips["vp9"], None, 8)] + [(bad[k], None, 20) for k in names] + [
        (clips["mjpeg"], [0, N], None),        # index beyond the last frame
        (clips["mjpeg"], None, N + 1),         # more frames than the video has
        (clips["mjpeg"], None, 8)]
    out = src.read_batch(req)
    assert [read_code(f) for f in out[0].frames.numpy()] == sample_indices(N, 8)   # good files decoded
    assert [read_code(f) for f in out[-1].frames.numpy()] == sample_indices(N, 8)
    for k, res in zip(names, out[1:]):
        assert type(res) is EXPECTED[k], (k, res)
        assert res.path == bad[k] and str(res).startswith(bad[k]), (k, str(res))
    assert type(out[-3]) is FrameIndexError and "out of range" in str(out[-3])
    assert type(out[-2]) is NotEnoughFrames
    assert src.primary.failures == 0 and not src.primary.disabled  # bad files never count against DALI
    assert src.primary.stats["bad_file_failures"] == 1  # the bit-rotted file reached DALI and was blamed


def test_size_change_only_matters_past_the_change(src, bad):
    for key in ("size_vp9", "size_mjpeg"):
        ok = src.read(bad[key], indices=[0, 5, 9])  # frames before the switch decode fine, as with PyAV
        assert [read_code(f) for f in ok.frames.numpy()] == [0, 5, 9]
        assert torch.equal(ok.indices, PyAVSource().read(bad[key], indices=[0, 5, 9]).indices)
        with pytest.raises(FrameSizeChanged, match="frame 10 is coded at 64x32"):
            src.read(bad[key], indices=[0, 10])
        with pytest.raises(FrameSizeChanged):
            PyAVSource().read(bad[key], indices=[0, 10])


def test_decode_batch_counts_skipped_samples(clips, bad):
    from strive_engine.data import VideoQA
    from strive_engine.pipeline import decode_batch

    def rec(path):
        return VideoQA(id=os.path.basename(path), path=path, question="q?", options=(), answer="1", solution="",
                       problem_type="numerical", data_type="video", source=f"{path}:line 1")
    recs = [rec(clips["vp9"]), rec(bad["truncated"]), rec(clips["h264"]), rec(bad["size_vp9"]), rec(bad["missing"])]
    out = decode_batch(recs, build_source(VideoConfig(backend="auto"), "cpu"), pool_frames=16, log_errors=False)
    assert out.valid.tolist() == [True, False, True, False, False]
    assert out.skipped == {"VideoCorrupt": 1, "FrameSizeChanged": 1, "VideoNotFound": 1}


def test_prefetched_decoding_keeps_going_over_bad_files(clips, bad):
    """The trainer's loop: Prefetcher over the loader, decode_batch through the routing source."""
    from strive_engine.data import RecordLoader, VideoQA
    from strive_engine.pipeline import decode_batch
    from strive_engine.video.prefetch import Prefetcher

    paths = [clips["vp9"], bad["truncated"], clips["mjpeg"], bad["size_vp9"], clips["h264"], clips["mjpeg"]]
    recs = [VideoQA(id=str(i), path=p, question="q?", options=(), answer="1", solution="", problem_type="numerical",
                    data_type="video", source=f"r:{i}") for i, p in enumerate(paths)]
    source = build_source(VideoConfig(backend="auto"), "cpu")
    skipped, valid = {}, 0
    with Prefetcher(RecordLoader(recs, batch_size=2, seed=0), lambda r: decode_batch(r, source, 8, log_errors=False),
                    depth=2) as p:
        for _ in range(6):  # two epochs of 3 batches
            _, batch, _ = p.next()
            valid += int(batch.valid.sum())
            for k, v in batch.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"VideoCorrupt": 2, "FrameSizeChanged": 2} and valid == 8  # 12 slots, 4 bad
    assert source.counts["dali"] >= 6 and source.counts["pyav"] >= 2  # (+ up to 2 batches decoded ahead)


# --------------------------------------------------------------------------------- failure policy


def _fail_next_runs(monkeypatch, src, n):
    """Make the next `n` DALI runs raise like a broken pipeline; count pipeline builds."""
    calls = {"fail": n, "builds": 0}
    run, build = DALISource._run, DALISource._new_pipeline

    def flaky(self, jobs):
        if calls["fail"] > 0:
            calls["fail"] -= 1
            raise RuntimeError("Critical error in pipeline:\nencountered:\n injected NVDEC failure")
        return run(self, jobs)

    def counted(self):
        calls["builds"] += 1
        return build(self)
    monkeypatch.setattr(DALISource, "_run", flaky)
    monkeypatch.setattr(DALISource, "_new_pipeline", counted)
    return calls


def test_pipeline_failure_rebuilds_once_then_hands_over_to_pyav(clips, monkeypatch, caplog):
    src = build_source(VideoConfig(backend="dali"), "cpu")
    dali = src.primary
    req = [(clips["vp9"], None, 8), (clips["mjpeg"], [2, 36], None)]
    want = [sample_indices(N, 8), [2, 36]]
    calls = _fail_next_runs(monkeypatch, dali, 1)
    with caplog.at_level(logging.WARNING):
        out = src.read_batch(req)
    assert [[read_code(f) for f in v.frames.numpy()] for v in out] == want  # PyAV decoded the failed batch
    assert dali.failures == 1 and not dali.disabled and calls["builds"] == 1 and dali.stats["rebuilds"] == 1
    assert "injected NVDEC failure" in caplog.text and "rebuilding" in caplog.text
    out = src.read_batch(req)  # the rebuilt pipeline works
    assert [[read_code(f) for f in v.frames.numpy()] for v in out] == want and dali.stats["dali_runs"] == 1

    calls["fail"] = 1  # a second DALI failure: disabled for the run
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out = src.read_batch(req)
        assert [[read_code(f) for f in v.frames.numpy()] for v in out] == want
        assert dali.disabled and "disabled for the rest of the run" in caplog.text
        with pytest.raises(DALIDisabled):
            dali.read_batch(req)
        out = src.read_batch(req + [(clips["h264"], None, 8)])  # forced mode too: PyAV takes over everything
    assert [[read_code(f) for f in v.frames.numpy()] for v in out] == want + [sample_indices(N, 8)]
    assert "vp9 files -> PyAV (DALI was disabled after repeated failures)" in caplog.text
    assert dali.stats["dali_runs"] == 1 and dali.stats["pyav_failed_run"] == 4


def test_failed_rebuild_disables_at_once(clips, monkeypatch):
    src = DALISource("cpu")
    monkeypatch.setattr(DALISource, "_run", lambda self, jobs: (_ for _ in ()).throw(RuntimeError("run broke")))
    monkeypatch.setattr(DALISource, "_new_pipeline", lambda self: (_ for _ in ()).throw(RuntimeError("no build")))
    out = src.read_batch([(clips["vp9"], [1, 2], None)])
    assert [read_code(f) for f in out[0].frames.numpy()] == [1, 2] and src.disabled


# ------------------------------------------------------------------------------------------ scan


def test_scan_matches_pyav_timestamps_with_b_frames(clips):
    ref = PyAVSource().read(clips["h264"], indices=list(range(N)))  # libx264 veryfast: B-frames, pts != dts
    scan = scan_stream(clips["h264"])
    assert scan.unsafe is None and scan.size_change is None
    assert torch.equal(torch.from_numpy(scan.timestamps), ref.timestamps)


def test_scan_flags_sequence_parameter_changes(tmp_path):
    changed = write_size_change(tmp_path / "size.ts", "h264", fmt="mpegts")
    assert "sequence parameters change" in scan_stream(changed).unsafe
    with pytest.raises(FrameSizeChanged):
        PyAVSource().read(changed, indices=[0, 15])
    same = write_size_change(tmp_path / "same.ts", "h264", sizes=((96, 48), (96, 48)), fmt="mpegts")
    assert scan_stream(same).unsafe is None  # repeated but identical in-band SPS are fine
    with av.open(write(tmp_path / "c.mp4", "h264")) as c:
        watch = scan_mod._SpsWatch("h264", c.streams.video[0].codec_context.extradata)
    assert watch.length_size == 4 and len(watch.seen) == 1  # the avcC record's SPS


def test_vp9_superframe_and_show_existing_headers(clips):
    with av.open(clips["vp9"]) as c:
        key, inter = [bytes(p) for _, p in zip(range(2), c.demux(video=0))]
    refs = [None] * 8
    assert scan_mod._vp9_shown_size(key, refs) == (W, H) and refs == [(W, H)] * 8
    # Superframe: two frames and an index (marker 0b110_mm_fff: 4-byte sizes, 2 frames).
    marker = 0xC0 | (3 << 3) | 1
    sizes = len(inter).to_bytes(4, "little") + (1).to_bytes(4, "little")
    show_existing = bytes([0b10_0_0_1_010 << 0])  # marker 2, profile 0, show_existing_frame, slot 2
    sf = inter + show_existing + bytes([marker]) + sizes + bytes([marker])
    assert scan_mod._vp9_subframes(sf) == [inter, show_existing]
    refs[2] = (10, 20)
    assert scan_mod._vp9_shown_size(sf, refs) == (10, 20)  # the shown frame is the existing slot 2
    assert scan_mod._vp9_subframes(inter) == [inter]


# ------------------------------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def gpu_clips(tmp_path_factory):
    """Colour-bar clips above NVDEC's minimum frame size (HEVC 144x144, VP9 128x128): smaller ones go to PyAV."""
    d = tmp_path_factory.mktemp("dali_gpu")
    return {c: write_clip(d / f"g_{c}.{s}", c, coded_frame, N, GPU_W, GPU_H, FPS)
            for c, s in (("h264", "mp4"), ("hevc", "mp4"), ("vp9", "webm"))}


@pytest.mark.gpu
def test_dali_mixed_colour_is_its_kernel(gpu_clips):
    """The diagnosis of the H200 run (mean 5.97 levels from PyAV on H.264), checked on the card: DALI's NVDEC
    RGB is the model of its CUDA kernel (BT.601 limited, chroma bilinear at centre siting) applied to the
    stream's own YCbCr, so the difference to PyAV is the chroma upsampling (PyAV replicates). Away from
    saturated edges DALI is within the issue's bound; at the edges it is not (the NVDEC source is: test_nvdec)."""
    from colour_models import agreement, dali_cuda_rgb, frame_planes

    src = DALISource("cuda", threads=2)
    for codec, path in gpu_clips.items():
        got = src.read(path, num_frames=16)
        assert got.frames.is_cuda and [read_code(f) for f in got.frames.cpu().numpy()] == sample_indices(N, 16)
        with av.open(path) as c:
            frames = list(c.decode(video=0))
        wanted = [frames[i] for i in sample_indices(N, 16)]
        ref = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in wanted]))
        models = {t: torch.from_numpy(np.stack([dali_cuda_rgb(*frame_planes(f), truncate=t) for f in wanted]))
                  for t in (False, True)}
        fit = {t: agreement(got.frames, m) for t, m in models.items()}
        vs_pyav = agreement(got.frames, ref)
        print(f"DALI NVDEC {codec}: vs kernel model {fit}; vs PyAV {vs_pyav}")
        t = min(fit, key=lambda k: fit[k]["mean"])
        close = ((got.frames.cpu().int() - models[t].int()).abs() <= 2).float().mean().item()
        assert fit[t]["mean"] <= 0.5 and close >= 0.999, (codec, fit, close)  # the model is DALI's conversion
        assert vs_pyav["p99_flat"] <= 6, (codec, vs_pyav)


@pytest.mark.gpu
def test_dali_mixed_bad_input(tmp_path, gpu_clips):
    """Every bad file of the CPU tests, at NVDEC's sizes, through video.backend=dali on CUDA: the error type
    PyAV gives, in its slot, naming the file; skipped and counted by decode_batch; DALI stays on."""
    from strive_engine.data import VideoQA
    from strive_engine.pipeline import decode_batch

    src = build_source(VideoConfig(backend="dali"), "cuda")
    bad = videoclips.bad_files(tmp_path, coded_frame, GPU_W, GPU_H, small=(192, 144))
    names = list(videoclips.BAD_TYPES)
    req = [(gpu_clips["h264"], None, 8)] + [(bad[k], None, 20) for k in names] + [(gpu_clips["vp9"], None, 8)]
    out = src.read_batch(req, device="cuda")
    ref = PyAVSource().read_batch(req)
    for k, got, want in zip(names, out[1:-1], ref[1:-1]):
        assert type(got).__name__ == videoclips.BAD_TYPES[k] and type(got) is type(want), (k, got, want)
        assert got.path == bad[k] and str(got).startswith(bad[k]), (k, str(got))
    for got in (out[0], out[-1]):
        assert got.frames.is_cuda and [read_code(f) for f in got.frames.cpu().numpy()] == sample_indices(N, 8)
    assert src.primary.failures == 0 and not src.primary.disabled, src.primary.stats
    recs = [VideoQA(id=k, path=p, question="q?", options=(), answer="1", solution="", problem_type="numerical",
                    data_type="video", source=k) for k, p in [("good", gpu_clips["hevc"])] + list(bad.items())]
    batch = decode_batch(recs, src, pool_frames=20, device="cuda", log_errors=False)
    assert batch.valid.tolist() == [True] + [False] * len(bad)
    assert all(p.frames.is_cuda for p in batch.pools)   # the placeholders too: the step concatenates them
    assert sum(batch.skipped.values()) == len(bad) and set(batch.skipped) == set(videoclips.BAD_TYPES.values())
    print(f"DALI NVDEC bad-input stats: {dict(src.primary.stats)}")


@pytest.mark.gpu
def test_dali_mixed_decodes_a_step_in_one_batch(gpu_clips):
    """A step's 8 videos (own frame lists) in one DALI run with a thread (an NVDEC session) per video."""
    src = DALISource("cuda", threads=2, batch_size=2)
    paths = list(gpu_clips.values()) * 3
    req = [(p, None, 4 + k) for k, p in enumerate(paths[:8])]
    out = src.read_batch(req)
    assert src.stats["dali_runs"] == 1 and src.batch_size == 8 and src.pipeline_threads == 8
    for (p, _, n), v in zip(req, out):
        assert v.frames.is_cuda and [read_code(f) for f in v.frames.cpu().numpy()] == sample_indices(N, n)
