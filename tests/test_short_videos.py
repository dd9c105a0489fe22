"""Short videos and skipped samples (issue 19 item 1).

- a video with fewer frames than video.pool_frames is decoded whole (its pool = every frame), never skipped;
- keyframe sampling adapts: F of the P_b frames when P_b >= F; when P_b < F the frames repeat, spread as the
  canonical view spreads them, and the variants then differ by their crops only;
- only undecodable videos are skipped; the run's tally lists them by reason (with an example) and a run with no
  valid sample for data.max_empty_steps steps in a row stops with that list (exit 2);
- the prefetcher reports exactly the batches the trainer consumed.
"""
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from videoclips import read_code, stamp_code, write_clip

ROOT = Path(__file__).resolve().parent.parent


def coded(i, w, h):
    img = np.zeros((h, w, 3), np.uint8)
    img[16:] = (40, 200, 90)
    return stamp_code(img, i)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("short")
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return {"short": write_clip(d / "short.mp4", "h264", coded, 10, 96, 40, 10),
            "short_vp9": write_clip(d / "short.webm", "vp9", coded, 7, 96, 40, 10),
            "long": write_clip(d / "long.webm", "vp9", coded, 37, 96, 40, 10),
            "one": write_clip(d / "one.mp4", "h264", coded, 1, 96, 40, 10),
            "corrupt": str(d / "corrupt.mp4"), "dir": d}


def _records(paths):
    from strive_engine.data import VideoQA

    return [VideoQA(id=str(i), path=p, question="q", options=("A. x", "B. y"), answer="A",
                    solution="<answer>A</answer>", problem_type="multiple choice", data_type="video",
                    source=f"test:{i}") for i, p in enumerate(paths)]


def test_a_short_video_is_decoded_whole_and_only_undecodable_ones_are_skipped(clips):
    from strive_engine.pipeline import decode_batch
    from strive_engine.video import PyAVSource

    recs = _records([clips["short"], clips["long"], clips["corrupt"], clips["one"]])
    out = decode_batch(recs, PyAVSource(threads=1, workers=2), pool_frames=16, log_errors=False)
    assert out.valid.tolist() == [True, True, False, True]
    short, long_, _, one = out.pools
    assert [read_code(f) for f in short.frames.numpy()] == list(range(10))  # every frame, in order
    assert short.indices.tolist() == list(range(10)) and short.info.num_frames == 10
    assert long_.frames.shape[0] == 16 and one.frames.shape[0] == 1
    assert out.short == 2 and dict(out.skipped) == {"VideoCorrupt": 1}
    assert len(out.errors) == 1 and clips["corrupt"] in str(out.errors[0])


def test_a_skipped_videos_placeholder_is_where_the_good_pools_are(clips):
    """Decoding to a device (CUDA on a GPU; the meta device stands in here), the placeholder of an undecodable video
    lies beside the good pools: a CPU one among CUDA pools broke the step's concatenation of their pixels."""
    from strive_engine.pipeline import decode_batch
    from strive_engine.video import PyAVSource

    class ToDevice(PyAVSource):
        def read_batch(self, requests, device="cpu"):
            return [r if isinstance(r, Exception) else type(r)(**{**vars(r), "frames": r.frames.to(device)})
                    for r in super().read_batch(requests)]

    out = decode_batch(_records([clips["long"], clips["corrupt"]]), ToDevice(threads=1), pool_frames=16,
                       device="meta", log_errors=False)
    assert out.valid.tolist() == [True, False]
    assert [p.frames.device.type for p in out.pools] == ["meta", "meta"]


def test_short_videos_through_the_routing_source(clips):
    """video.backend=auto on this machine (DALI's CPU decoder for VP9 when installed, PyAV for H.264): the same."""
    from strive_engine.config import VideoConfig
    from strive_engine.pipeline import decode_batch
    from strive_engine.video import build_source

    recs = _records([clips["short_vp9"], clips["short"], clips["long"]])
    out = decode_batch(recs, build_source(VideoConfig(backend="auto", decode_threads=1), "cpu"), pool_frames=16,
                       log_errors=False)
    assert out.valid.all() and out.short == 2
    assert [[read_code(f) for f in p.frames.numpy()] for p in out.pools[:2]] == [list(range(7)), list(range(10))]


def test_not_enough_frames_says_how_many_there_are_and_pickles(clips):
    from strive_engine.video import NotEnoughFrames, PyAVSource

    with pytest.raises(NotEnoughFrames, match="asked for 16 frames but the video has only 10") as exc:
        PyAVSource(threads=1).read(clips["short"], num_frames=16)
    back = pickle.loads(pickle.dumps(exc.value))
    assert type(back) is NotEnoughFrames and back.available == 10 and str(back) == str(exc.value)


class _Scorer:
    """Frame embedding = (frame mean, row number): distinct per frame; the question embedding is fixed."""

    def embed_frames(self, frames):
        n = frames.shape[0]
        return torch.stack([frames.float().mean((1, 2, 3)) / 255, torch.arange(n).float() / 10, torch.ones(n)], 1)

    def embed_text(self, texts):
        return torch.tensor([[1.0, 0.5, 0.2]]).expand(len(texts), 3)


def test_keyframes_repeat_the_frames_of_a_pool_shorter_than_F():
    from strive_engine.config import KeyframeConfig, VariantConfig
    from strive_engine.keyframes import select_keyframes
    from strive_engine.variants import build_variants, sample_crop_boxes

    g = torch.Generator().manual_seed(0)
    pools = [torch.randint(0, 256, (P, 40, 56, 3), generator=g, dtype=torch.uint8) for P in (3, 12, 40, 1)]
    F, K = 8, 3
    sel = select_keyframes(_Scorer(), pools, ["q"] * 4, KeyframeConfig(num_frames=F), num_variants=K, seed=5)
    assert sel.indices.shape == (4, K, F) and sel.offsets.tolist() == [0, 3, 15, 55, 56]
    # P = 3 < F: each frame shown, repeated evenly (floor((j + 0.5) * 3 / 8)), the same in every variant.
    assert sel.indices[0].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]] * K
    assert sel.indices[3].tolist() == [[0] * F] * K
    for b in (1, 2):  # P >= F: F distinct sorted frames (the 12-frame pool is shorter than video.pool_frames)
        for row in sel.indices[b].tolist():
            assert row == sorted(set(row)) and len(row) == F and max(row) < pools[b].shape[0]
    emb, q = _Scorer().embed_frames(pools[0]), _Scorer().embed_text(["q"])[0]
    want = torch.nn.functional.cosine_similarity(emb.double(), q.double()[None], dim=1)
    assert torch.allclose(sel.scores[0].double(), want, atol=1e-5)  # one score per real frame, not per repeat
    for b, p in enumerate(pools):
        assert sel.importance[b].shape == (p.shape[0],) and float(sel.importance[b].sum()) == pytest.approx(1.0)
    vcfg = VariantConfig(min_pixels=784, max_pixels=784)
    vb = build_variants(pools[0], sel.indices[0], sample_crop_boxes(K, 40, 56, vcfg, g), vcfg)
    assert vb.grid_thw.tolist() == [[F // 2, 2, 2]] * K  # F frames -> F/2 temporal patches, as for a long video
    # Frames 0,0 then 0,1: the patch of slots (2, 3) holds frames 0 and 1 of the pool.
    full = build_variants(pools[0], sel.indices[0][:1], torch.tensor([[0.0, 0.0, 56.0, 40.0]]), vcfg)
    ref = build_variants(pools[0], torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]]), torch.tensor([[0.0, 0.0, 56.0, 40.0]]),
                         vcfg)
    assert torch.equal(full.pixel_values, ref.pixel_values)


def test_skip_tally_lists_reasons_and_stops_after_max_empty_steps(clips):
    from strive_engine.data import LoadReport
    from strive_engine.pipeline import NoValidSamples, SkipTally, decode_batch
    from strive_engine.video import PyAVSource

    report = LoadReport(path="r.json", total=5, kept=4)
    report.skipped["missing video"] = 1
    tally = SkipTally(max_empty_steps=2, load_report=report)
    src = PyAVSource(threads=1)
    tally.add(decode_batch(_records([clips["corrupt"], clips["short"]]), src, 16, log_errors=False))
    tally.add(decode_batch(_records([clips["corrupt"], str(clips["dir"] / "gone.mp4")]), src, 16, log_errors=False))
    counts = tally.global_counts()
    assert counts == {"VideoCorrupt": 2, "VideoNotFound": 1, "short": 1} and tally.num_skipped(counts) == 4
    text = tally.summary(counts)
    assert "r.json: kept 4 of 5 records; skipped 1: missing video 1" in text
    assert f"VideoCorrupt x2 (e.g. {clips['corrupt']}" in text and "VideoNotFound x1" in text
    assert "1 pool(s) from videos shorter than video.pool_frames used every frame" in text
    tally.empty_step(0, "SFT", 0)
    tally.empty_step(3, "RL", 0)  # a step with valid samples resets the count
    tally.empty_step(0, "RL", 1)
    with pytest.raises(NoValidSamples, match=r"no valid sample in 2 steps in a row \(the last: RL step 2; "
                                             r"data.max_empty_steps=2\): .*VideoCorrupt x2"):
        tally.empty_step(0, "RL", 2)
    SkipTally(max_empty_steps=0).empty_step(0, "RL", 9)  # 0: never stops


def test_config_fields_are_checked():
    from strive_engine.config import ConfigError, load_config

    assert load_config([]).data.max_empty_steps == 3 and load_config([]).checkpoint.export_dtype == "source"
    with pytest.raises(ConfigError, match="data.max_empty_steps"):
        load_config(["--data.max_empty_steps=-1"])
    with pytest.raises(ConfigError, match="checkpoint.export_dtype"):
        load_config(["--checkpoint.export_dtype=fp8"])


def test_prefetcher_reports_the_batches_it_hands_over():
    from strive_engine.data import RecordLoader
    from strive_engine.video.prefetch import Prefetcher

    for depth in (0, 2):
        seen = []
        loader = RecordLoader(list(range(10)), batch_size=2, shuffle=False)
        with Prefetcher(loader, lambda recs: [r * 10 for r in recs], depth=depth,
                        on_next=lambda recs, dec: seen.append((recs, dec))) as pf:
            got = [pf.next()[:2] for _ in range(3)]
            # the worker may have decoded further ahead; only what next() returned was reported
            assert seen == [tuple(x) for x in got] == [([0, 1], [0, 10]), ([2, 3], [20, 30]), ([4, 5], [40, 50])]


@pytest.mark.slow
def test_a_run_without_decodable_videos_stops_with_the_reasons(tmp_path):
    """Every video corrupt: one SFT step and one RL step without a valid sample (max_empty_steps=2) stop the run
    with exit 2 and the reasons, instead of 'training' on nothing and exporting a model."""
    (tmp_path / "v").mkdir()
    rows = []
    for i in range(3):
        # an MP4 'ftyp' box, then seeded garbage: the probe settles on MOV and fails (VideoCorrupt). Bare random
        # bytes are not a fixed input: about 1 in 150 probes as an lrc subtitle file (NoVideoStream).
        (tmp_path / "v" / f"{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
                                                  + random.Random(i).randbytes(2000))
        rows.append({"problem": "q?", "problem_type": "multiple choice", "options": ["A. a", "B. b"],
                     "solution": "<answer>A</answer>", "path": f"v/{i}.mp4", "data_type": "video"})
    (tmp_path / "r.json").write_text(json.dumps(rows))
    args = ["--data.path", str(tmp_path / "r.json"), f"--run.output_dir={tmp_path / 'run'}", "--run.steps=5",
            "--sft.steps=1", "--sft.batch_size=2", "--data.batch_size=1", "--data.max_empty_steps=2",
            "--video.pool_frames=8", "--keyframes.num_frames=4", "--variants.num_variants=2",
            "--rollout.num_generations=2", "--rollout.max_new_tokens=4", "--model.tiny_hidden_size=64",
            "--model.tiny_vision_hidden_size=32", "--logging.progress=false", "--logging.plot=false",
            "--video.backend=pyav"]
    res = subprocess.run([sys.executable, "-m", "strive_engine.train", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert ("data error: no valid sample in 2 steps in a row (the last: RL step 0; data.max_empty_steps=2)"
            in res.stderr), res.stderr[-3000:]
    assert "VideoCorrupt x3" in res.stderr  # 2 in the SFT step, 1 in the RL step
    assert not (tmp_path / "run" / "hf").exists()  # nothing exported


def test_every_caller_decodes_to_the_runs_device():
    """Every call of pipeline.decode_batch in the engine (the RL step, the prefetcher, SFT, evaluation) names the
    device its pools go to: on a GPU run, pools decoded to the host would be cropped and patchified on the CPU and
    copied over (SFT and evaluation did so until 2026-12-07)."""
    import ast
    from pathlib import Path

    calls = []
    for path in sorted((Path(__file__).resolve().parent.parent / "strive_engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            fn, args = node.func, node.args
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name == "partial" and args and isinstance(args[0], ast.Name):
                name = args[0].id
            if name == "decode_batch":
                calls.append((path.name, node.lineno, {k.arg for k in node.keywords}))
    assert {c[0] for c in calls} >= {"step.py", "train.py", "sft.py", "evaluate.py"}, calls
    assert all("device" in kw for _, _, kw in calls), [c for c in calls if "device" not in c[2]]
