"""The view builder: records + decoded pools + (frame indices, crop boxes) -> rollout requests in the model's own
vision geometry, and a tiny Qwen3-VL (16-pixel patches) through the RL step, the SFT warm start and evaluate."""
import json
import math

import pytest
import torch

from strive_engine.config import VariantConfig
from strive_engine.keyframes import canonical_indices
from strive_engine.video import DecodedVideo, VideoInfo
from strive_engine.views import ViewBuilder, VisionGeometry, full_frame
from strive_kernels.reference import variant_patchify_reference

# A tiny Qwen3-VL (model.arch takes a config.json; the token ids and vocabulary come from the offline tokenizer).
QWEN3_TINY = {
    "model_type": "qwen3_vl", "tie_word_embeddings": True,
    "text_config": {"vocab_size": 1, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3],
                                        "mrope_interleaved": True}},
    "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
                      "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1], "patch_size": 16},
}


def _pool(P=12, H=40, W=72, fps=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (P, H, W, 3), generator=g, dtype=torch.uint8)
    ts = torch.arange(P, dtype=torch.float64) * 2 / fps  # every other frame of the video
    info = VideoInfo(path="v.mp4", num_frames=2 * P, fps=fps, duration=2 * P / fps, width=W, height=H, codec="h264")
    return DecodedVideo(frames=frames, indices=torch.arange(0, 2 * P, 2), timestamps=ts, info=info)


def _qwen3_config():
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen3_vl", **json.loads(json.dumps({k: v for k, v in QWEN3_TINY.items()
                                                                     if k != "model_type"})))


def test_export_of_a_random_weight_qwen3_vl_declares_its_processor(tmp_path):
    """The preprocessor config written for a random-weight export carries the model's patch and normalisation,
    and HF's image processor loads it with them."""
    from types import SimpleNamespace

    from transformers import AutoImageProcessor

    from strive_engine.checkpoint import _write_processor_config

    _write_processor_config(tmp_path, SimpleNamespace(config=_qwen3_config()), None)
    proc = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True, use_fast=False)
    assert proc.patch_size == 16 and list(proc.image_mean) == [0.5] * 3 and list(proc.image_std) == [0.5] * 3


def test_geometry_is_the_models():
    from strive_engine.config import ModelConfig
    from strive_engine.model import build_tiny_config
    from strive_engine.tokenizer import build_tokenizer

    from transformers.image_utils import (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN,
                                          OPENAI_CLIP_STD)

    q3 = _qwen3_config()
    # the normalisation of each family's HF processor: Qwen3-VL's (Qwen3VLVideoProcessor) IMAGENET_STANDARD,
    # Qwen2-VL's and Qwen2.5-VL's OPENAI_CLIP
    assert VisionGeometry.from_config(q3) == VisionGeometry(patch=16, merge=2, temporal_patch=2,
                                                            mean=tuple(IMAGENET_STANDARD_MEAN),
                                                            std=tuple(IMAGENET_STANDARD_STD))
    mc = ModelConfig()
    q25 = build_tiny_config(mc, build_tokenizer(mc))
    assert VisionGeometry.from_config(q25) == VisionGeometry(patch=14, merge=2, temporal_patch=2,
                                                             mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD))


@pytest.mark.parametrize("patch,norm", [(14, "clip"), (16, "half")])
def test_views_in_the_models_geometry(patch, norm):
    """Every view is patchified at the builder's geometry (rows of 3 * 2 * patch^2 values, output sizes multiples
    of patch * merge, the geometry's normalisation), equal to the op's twin on the same frames and boxes; seconds
    per temporal patch from the shown frames' timestamps."""
    cfg = VariantConfig(min_pixels=28 * 28, max_pixels=64 * 64)
    mean_std = {"clip": {}, "half": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}[norm]
    views = ViewBuilder(VisionGeometry(patch=patch, merge=2, temporal_patch=2, **mean_std), cfg)
    pools = [_pool(seed=0), _pool(P=6, H=64, W=48, seed=1)]
    idx = [torch.tensor([[0, 3, 5, 11], [1, 2, 7, 9]]), canonical_indices(6, 4)]
    boxes = [torch.tensor([[0.0, 0.0, 72.0, 40.0], [10.0, 4.0, 50.0, 36.0]]), full_frame(pools[1])]
    reqs = views.build(["q0", "q1"], pools, idx, boxes)
    assert [r.question for r in reqs] == ["q0", "q0", "q1"]  # question-major, then view
    k = 0
    for b, pool in enumerate(pools):
        for v in range(idx[b].shape[0]):
            r = reqs[k]
            t, h, w = r.grid().tolist()
            assert r.pixel_values.shape == (t * h * w, 3 * 2 * patch * patch) and t == 2
            assert h % 2 == 0 and w % 2 == 0  # whole merged tokens: output size multiple of patch * 2
            out_hw = torch.tensor([[h * patch, w * patch]])
            want, grid = variant_patchify_reference(pool.frames, idx[b][v:v + 1], boxes[b][v:v + 1], out_hw,
                                                    temporal_patch=2, patch=patch, merge=2, **mean_std)
            torch.testing.assert_close(r.pixel_values, want, rtol=0, atol=1e-6)
            if norm == "half":  # (x / 255 - 0.5) / 0.5 spans [-1, 1]; CLIP's would reach beyond 1.9
                assert r.pixel_values.min() >= -1 - 1e-6 and r.pixel_values.max() <= 1 + 1e-6
            shown = pool.timestamps[idx[b][v]]
            assert r.second_per_grid_ts == pytest.approx(2 * float(shown[-1] - shown[0]) / 3)
            k += 1
    with pytest.raises(ValueError, match="2 records, 2 pools, 1 index sets"):
        views.build(["q0", "q1"], pools, idx[:1], boxes)


def test_canonical_view_is_variant_zero_of_the_sampler():
    """The canonical view: evenly spread frames (floor((j + 0.5) P / F)) — variant 0 of the keyframe sampler,
    whatever the scores — at full frame."""
    from strive_kernels import keyframe_sample

    views = ViewBuilder(VisionGeometry(14, 2, 2), VariantConfig())
    pool = _pool(P=10)
    (r,) = views.canonical(["q"], [pool], 4)
    assert canonical_indices(10, 4).tolist() == [[1, 3, 6, 8]]
    (same,) = views.build(["q"], [pool], [torch.tensor([[1, 3, 6, 8]])], [full_frame(pool)])
    assert torch.equal(r.pixel_values, same.pixel_values) and r.second_per_grid_ts == same.second_per_grid_ts
    g = torch.Generator().manual_seed(0)
    sizes = [10, 37, 8]
    idx, _, _ = keyframe_sample(torch.randn(sum(sizes), 16, generator=g), torch.randn(3, 16, generator=g),
                                torch.tensor([0] + sizes).cumsum(0), 3, 8, seed=5, backend="reference")
    for b, P in enumerate(sizes):
        assert idx[b, 0].tolist() == canonical_indices(P, 8)[0].tolist()
    assert canonical_indices(3, 4).tolist() == [[0, 1, 1, 2]]  # a short pool: every frame, repeated


@pytest.mark.slow
def test_qwen3_vl_gets_16_pixel_patches_through_rl_sft_and_evaluate(tmp_path, monkeypatch):
    """A tiny Qwen3-VL (model.arch=config.json): the RL step, the SFT warm start and evaluate (uniform and
    importance frames) all build 16-pixel patches (3 * 2 * 16 * 16 = 1,536 values a row), and the model takes
    them. The 14-pixel rows every builder made before (1,176 values) do not fit its vision tower."""
    from test_train import SMALL

    import strive_engine.views as views_mod
    from strive_engine.config import load_config
    from strive_engine.evaluate import main as evaluate_main
    from strive_engine.parallel import destroy_distributed, init_distributed
    from strive_engine.sft import run_sft
    from strive_engine.step import rl_step
    from strive_engine.trainer import build_trainer

    arch = tmp_path / "qwen3_vl.json"
    arch.write_text(json.dumps(QWEN3_TINY))
    built = []
    real = views_mod.build_variants

    def spy(*a, **k):
        vb = real(*a, **k)
        built.append((k["patch"], vb.pixel_values.shape[1], vb.grid_thw, vb.out_hw, tuple(k["mean"] + k["std"])))
        return vb

    monkeypatch.setattr(views_mod, "build_variants", spy)
    args = [*SMALL, f"--data.synthetic_dir={tmp_path / 'syn'}", f"--model.arch={arch}", "--rollout.max_new_tokens=4"]

    def check(stage, n):
        assert len(built) == n, (stage, built)
        for patch, width, grid, out_hw, mean_std in built:
            assert patch == 16 and width == 1536 and mean_std == (0.5,) * 6, stage  # Qwen3-VL's normalisation
            assert torch.equal(grid[:, 1:] * 16, out_hw) and bool((out_hw % 32 == 0).all()), stage
        built.clear()

    cfg = load_config([*args, f"--run.output_dir={tmp_path / 'run'}", "--sft.steps=1"])
    env = init_distributed("gloo")
    try:
        t = build_trainer(cfg, env)
        assert t.policy.config.model_type == "qwen3_vl" and t.views.geometry.patch == 16
        m = rl_step(t, 0)
        assert m["data/valid_samples"] == 4 and math.isfinite(m["loss"])  # 1 question x 2 views x 2 answers
        check("rl", cfg.data.batch_size)                                   # one op call per question
        last = run_sft(t)
        assert math.isfinite(last["loss"]) and last["nonfinite_skipped_total"] == 0
        check("sft", cfg.sft.batch_size)
        old = ViewBuilder(VisionGeometry(14, 2, 2), cfg.variants).canonical(t.loader.records[:1],
                                                                             [_pool(H=56, W=56)], 4)
        assert old[0].pixel_values.shape[1] == 1176
        built.clear()
        with pytest.raises(RuntimeError):
            t.policy.video_features(old[0].pixel_values, old[0].grid_thw)
    finally:
        destroy_distributed()
    for frames in ("uniform", "importance"):
        out = tmp_path / "eval" / frames
        rc = evaluate_main([*args, f"--eval.output_dir={out}", "--eval.max_records=2", f"--eval.frames={frames}"])
        assert rc == 0
        assert json.loads((out / "report.json").read_text())["num_scored"] == 2
        check(f"evaluate ({frames})", 2)
