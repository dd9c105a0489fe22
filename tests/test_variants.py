"""strive_engine.variants: smart_resize == HF's, crop-box sampling, build_variants / VariantBatch."""
import math

import numpy as np
import pytest
import torch

import strive_engine.variants as variants
from strive_engine.config import VariantConfig
from strive_engine.variants import VariantBatch, build_variants, sample_crop_boxes, smart_resize, variant_sizes
from strive_kernels.reference.variant import variant_patchify_reference


def hf_smart_resize(*args):
    """HF's smart_resize (the oracle), imported lazily: skip, not fail, where transformers lacks the module."""
    return pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize(*args)


def test_smart_resize_equals_hf():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 199), (27, 29), (28, 28), (41, 42), (720, 1280), (1080, 1920), (2160, 3840), (480, 37)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    bounds = [(56 * 56, 28 * 28 * 1280), (16 * 784, 256 * 784), (784, 784), (100 * 784, 101 * 784)]
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(h, w)
            continue
        for mn, mx in bounds:
            ours = smart_resize(h, w, 28, mn, mx)
            assert ours == hf_smart_resize(h, w, 28, mn, mx), (h, w, mn, mx)
            assert ours[0] % 28 == 0 and ours[1] % 28 == 0
            checked += 1
    assert checked > 1000
    with pytest.raises(ValueError, match="height and width"):
        smart_resize(0, 10)


@pytest.mark.parametrize("height,width", [(720, 1280), (37, 53), (1, 1), (5, 900), (900, 5)])
def test_sample_crop_boxes_properties(height, width):
    cfg = VariantConfig()
    boxes = sample_crop_boxes(16, height, width, cfg, torch.Generator().manual_seed(3))
    assert boxes.shape == (16, 4) and boxes.dtype == torch.float32
    assert boxes[0].tolist() == [0, 0, width, height]  # the canonical view
    assert torch.equal(boxes, boxes.round())  # integer-aligned
    x0, y0, x1, y1 = boxes.unbind(1)
    assert bool(((0 <= x0) & (x0 < x1) & (x1 <= width) & (0 <= y0) & (y0 < y1) & (y1 <= height)).all())


def test_sample_crop_boxes_ranges_and_determinism():
    cfg = VariantConfig(crop_area_min=0.3, crop_area_max=0.6, crop_aspect_min=0.5, crop_aspect_max=2.0)
    H, W = 720, 1280
    boxes = sample_crop_boxes(200, H, W, cfg, torch.Generator().manual_seed(0))[1:]
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, aspect = w * h / (H * W), w / h
    # integer rounding of w and h moves area and aspect by at most ~1 pixel per side
    assert bool((area >= 0.3 - 3e-3).all() and (area <= 0.6 + 3e-3).all())
    assert bool((aspect >= 0.5 * 0.99).all() and (aspect <= 2.0 * 1.01).all())
    assert area.std() > 0.05 and aspect.log().std() > 0.2  # spread over the ranges, not a constant
    assert torch.equal(boxes, sample_crop_boxes(200, H, W, cfg, torch.Generator().manual_seed(0))[1:])
    assert not torch.equal(boxes, sample_crop_boxes(200, H, W, cfg, torch.Generator().manual_seed(1))[1:])
    with pytest.raises(ValueError, match="num_variants"):
        sample_crop_boxes(0, H, W, cfg, torch.Generator())


@pytest.fixture
def pool():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 90, 158, 3), dtype=np.uint8))


def test_build_variants(pool):
    cfg = VariantConfig(min_pixels=4 * 784, max_pixels=12 * 784)
    boxes = sample_crop_boxes(3, 90, 158, cfg, torch.Generator().manual_seed(1))
    indices = torch.tensor([[0, 2, 4, 5, 5], [1, 1, 3, 4, 5], [0, 1, 2, 3, 4]])  # F = 5 (odd)
    batch = build_variants(pool, indices, boxes, cfg)
    assert isinstance(batch, VariantBatch)
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        h, w = smart_resize(round(y1 - y0), round(x1 - x0), 28, cfg.min_pixels, cfg.max_pixels)
        assert batch.out_hw[k].tolist() == [h, w]
        assert batch.grid_thw[k].tolist() == [3, h // 14, w // 14]
        assert cfg.min_pixels <= h * w <= cfg.max_pixels
    assert batch.pixel_values.shape == (int(batch.grid_thw.prod(1).sum()), 1176)
    ref, ref_grid = variant_patchify_reference(pool, indices, boxes, batch.out_hw)
    assert torch.equal(batch.pixel_values, ref) and torch.equal(batch.grid_thw, ref_grid)

    parts = batch.split()
    assert len(parts) == 3
    for k, (pv, grid) in enumerate(parts):
        assert grid.shape == (1, 3) and pv.shape == (int(grid.prod()), 1176)
        assert pv.untyped_storage().data_ptr() == batch.pixel_values.untyped_storage().data_ptr()  # views
    assert torch.equal(torch.cat([pv for pv, _ in parts]), batch.pixel_values)

    half = build_variants(pool, indices, boxes, cfg, out_dtype=torch.bfloat16)
    assert half.pixel_values.dtype == torch.bfloat16
    assert torch.equal(half.pixel_values, ref.to(torch.bfloat16))


@pytest.mark.parametrize("backend,expected", [("auto", "auto"), ("native", "native"), ("reference", "reference")])
def test_build_variants_uses_config_backend(pool, monkeypatch, backend, expected):
    seen = {}
    real = variants.variant_patchify

    def spy(*args, **kwargs):
        seen["backend"] = kwargs["backend"]
        return real(*args, **kwargs)

    monkeypatch.setattr(variants, "variant_patchify", spy)
    cfg = VariantConfig(backend=backend, min_pixels=784, max_pixels=4 * 784)
    batch = build_variants(pool, torch.tensor([[0, 1]]), torch.tensor([[0.0, 0.0, 158.0, 90.0]]), cfg)
    assert seen["backend"] == expected and batch.grid_thw.tolist()[0][0] == 1


def test_variant_sizes_of_tiny_and_qwen3_crops():
    cfg = VariantConfig()
    sizes = variant_sizes(torch.tensor([[5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1280.0, 720.0]]), cfg, factor=32)
    assert sizes.tolist() == [list(hf_smart_resize(1, 1, 32, cfg.min_pixels, cfg.max_pixels)),
                              list(hf_smart_resize(720, 1280, 32, cfg.min_pixels, cfg.max_pixels))]
    assert all(v % 32 == 0 for v in sizes.flatten().tolist()) and math.prod(sizes[0].tolist()) >= cfg.min_pixels
