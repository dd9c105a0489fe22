"""Keyframe sampling properties (sorted/unique/in range, the coverage bound on adversarial scores, relevance
favoured, determinism, canonical view) and the engine side: PolicyScorer on a tiny random Qwen2.5-VL (also
under FSDP2), EncoderScorer on tiny random SigLIP/CLIP folders, select_keyframes, build_scorer."""
import json
import socket

import pytest
import torch

from strive_engine.config import KeyframeConfig
from strive_engine.keyframes import (
    EncoderScorer,
    KeyframeSelection,
    PolicyScorer,
    ScorerError,
    build_scorer,
    select_keyframes,
)
from strive_kernels import keyframe_sample


def _emb_from_scores(pool_scores):
    """2-D embeddings whose cosine with the question (1, 0) is exactly the given score per frame."""
    fe = torch.cat([torch.stack([s, torch.sqrt(1 - s * s)], 1) for s in pool_scores]).double()
    qe = torch.tensor([[1.0, 0.0]] * len(pool_scores), dtype=torch.float64)
    off = torch.tensor([0] + [len(s) for s in pool_scores]).cumsum(0)
    return fe, qe, off


def _peaked(P, peaks):
    s = torch.full((P,), -1.0, dtype=torch.float64)
    s[list(peaks)] = 1.0
    return s


def _gaps(idx, P):
    ext = torch.cat([torch.tensor([-1]), idx, torch.tensor([P])])
    return ext[1:] - ext[:-1]


def _check_sets(idx, sizes, F):
    assert idx.dtype == torch.int64 and idx.shape[-1] == F
    for b, P in enumerate(sizes):
        s = idx[b]
        assert torch.all(s[:, 1:] > s[:, :-1]), s  # sorted and unique
        assert s.min() >= 0 and s.max() < P


@pytest.mark.parametrize("lam", [0.02, 0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("F", [2, 3, 8, 16])
def test_coverage_bound_on_adversarial_scores(lam, F):
    # one frame scores +1, all others -1, tau = 0.01: softmax is one-hot to fp32 precision, the worst case
    pools = []
    for P in (37, 64, 200):
        for peaks in ([0], [P // 2], [P - 1], [P // 4, P // 4 + 1]):
            pools.append(_peaked(P, peaks))
    fe, qe, off = _emb_from_scores(pools)
    sizes = [len(p) for p in pools]
    for seed in range(4):
        idx, _, imp = keyframe_sample(fe, qe, off, 6, F, temperature=0.01, uniform_mix=lam, seed=seed)
        _check_sets(idx, sizes, F)
        for b, P in enumerate(sizes):
            assert imp[off[b]:off[b + 1]].min() >= lam / P * (1 - 1e-6)  # the premise of the bound
            for k in range(6):
                g = _gaps(idx[b, k], P)
                assert g.max() <= 2 * P / (lam * F), (P, F, lam, idx[b, k])  # the stated bound
                assert g.max() < 1 + P / (lam * F) * (1 + 1e-3)  # the tighter one the proof gives


def test_relevant_frames_favoured_when_scores_peak():
    # P = 64 frames, frames 40..43 score 0.9, the rest 0; tau = 0.1, lambda = 0.3: the relevant frames hold
    # ~72% of the importance; uniform sampling would pick 8 * 4 / 64 = 0.5 of them per variant on average
    P, F, K = 64, 8, 8
    s = torch.zeros(P, dtype=torch.float64)
    s[40:44] = 0.9
    fe, qe, off = _emb_from_scores([s])
    counts = {0.3: [], 1.0: []}
    for lam in counts:
        for seed in range(20):
            idx, _, imp = keyframe_sample(fe, qe, off, K, F, temperature=0.1, uniform_mix=lam, seed=seed)
            hit = ((idx[0, 1:] >= 40) & (idx[0, 1:] < 44)).sum(1).float()  # non-canonical variants
            counts[lam].append(hit)
    focused = torch.cat(counts[0.3]).mean().item()
    uniform = torch.cat(counts[1.0]).mean().item()
    assert focused >= 3.5 and uniform <= 1.0, (focused, uniform)
    assert imp[40:44].sum().item() == pytest.approx(4 / 64, abs=1e-6)  # lambda = 1: exactly uniform


def test_deterministic_by_seed_and_variants_differ():
    gen = torch.Generator().manual_seed(0)
    sizes = [30, 17, 64]
    fe, qe = torch.randn(sum(sizes), 16, generator=gen), torch.randn(3, 16, generator=gen)
    off = torch.tensor([0] + sizes).cumsum(0)
    a = keyframe_sample(fe, qe, off, 5, 6, temperature=0.3, seed=11)
    b = keyframe_sample(fe, qe, off, 5, 6, temperature=0.3, seed=11)
    c = keyframe_sample(fe, qe, off, 5, 6, temperature=0.3, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0][:, 1:], c[0][:, 1:])  # another seed, other offsets u_k
    assert torch.equal(a[0][:, 0], c[0][:, 0])  # the canonical view does not depend on the seed
    for bb in range(3):  # the K-1 sampled variants are not all the same set
        assert len({tuple(r.tolist()) for r in a[0][bb, 1:]}) > 1


def test_canonical_variant_is_evenly_spread():
    gen = torch.Generator().manual_seed(1)
    sizes = [5, 16, 37, 100]
    fe, qe = torch.randn(sum(sizes), 8, generator=gen), torch.randn(4, 8, generator=gen)
    off = torch.tensor([0] + sizes).cumsum(0)
    F = 5
    idx, _, _ = keyframe_sample(fe, qe, off, 3, F, temperature=0.01, uniform_mix=0.0, seed=3)
    for b, P in enumerate(sizes):
        assert idx[b, 0].tolist() == [(2 * j + 1) * P // (2 * F) for j in range(F)]
    idx, _, _ = keyframe_sample(fe, qe, off, 3, F, seed=3, canonical_first=False)
    _check_sets(idx, sizes, F)


def test_all_frames_when_F_equals_P():
    fe, qe, off = _emb_from_scores([_peaked(12, [3]), _peaked(7, [6])])
    idx, _, _ = keyframe_sample(fe, qe, torch.tensor([0, 12, 19]), 3, 7, temperature=0.01, uniform_mix=0.0)
    assert idx[1].tolist() == [list(range(7))] * 3


# ----------------------------------------------------------------------------------------- policy scorer


class CharTokenizer:
    """Stands in for the policy's tokenizer: one id per character."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 250 + 1 for c in t] for t in texts]}


@pytest.fixture(scope="module")
def tiny_qwen():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=64,
                  fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=290, video_token_id=291,
                           vision_start_token_id=292, vision_end_token_id=293)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _frames(P, H=70, W=90, seed=0):
    return torch.randint(0, 256, (P, H, W, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_policy_scorer_frames(tiny_qwen):
    fr = _frames(7)
    sc = PolicyScorer(tiny_qwen, CharTokenizer(), score_side=56)
    e = sc.embed_frames(fr)
    assert e.shape == (7, 64) and e.dtype == torch.float32 and torch.isfinite(e).all()
    # each frame is its own clip: batching and chunking do not mix frames
    alone = torch.cat([sc.embed_frames(fr[i:i + 1]) for i in range(7)])
    chunked = PolicyScorer(tiny_qwen, CharTokenizer(), score_side=56, frames_per_call=3).embed_frames(fr)
    assert torch.allclose(e, alone, atol=1e-5) and torch.allclose(e, chunked, atol=1e-5)
    # same as HF's own video path on the frame duplicated into a 2-frame clip; 70x90 at ~56^2 pixels is
    # smart_resize'd to 28x56, i.e. 2x4 patches, 1x2 merged tokens
    from strive_kernels.reference import variant_patchify_reference

    assert sc._out_hw(70, 90) == (28, 56)
    pv, grid = variant_patchify_reference(fr, torch.tensor([[2, 2]]), torch.tensor([[0.0, 0.0, 90.0, 70.0]]),
                                          torch.tensor([[28, 56]]))
    assert grid.tolist() == [[1, 2, 4]]
    out = tiny_qwen.model.get_video_features(pv, grid)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = torch.cat(tuple(feats)) if isinstance(feats, (tuple, list)) else feats
    assert feats.shape == (2, 64)
    assert torch.allclose(e[2], feats.float().mean(0), atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_policy_scorer_pools_in_one_tower_call(tiny_qwen, kind, tmp_path_factory, monkeypatch):
    """All pools of a step (different sizes and resolutions) in one vision-tower call, each run of frames one grid
    row (n, h, w): every frame's embedding equals the frame scored alone (fp32), for the three Qwen towers
    (Qwen2.5-VL's windows, Qwen3-VL's interpolated position embeddings); frames_per_call splits the calls."""
    if kind == "qwen2_5_vl":
        model = tiny_qwen
    else:
        from strive_engine.config import ModelConfig
        from strive_engine.model import build_model
        from test_rollout import _tiny_other

        _, tok = build_model(ModelConfig(tokenizer_dir=str(tmp_path_factory.mktemp("tok") / "t"), tiny_hidden_size=64,
                                         tiny_layers=1, tiny_heads=4, tiny_vision_depth=1,
                                         tiny_vision_hidden_size=32), "cpu")
        model = _tiny_other(kind, tok).hf.eval()
    pools = [_frames(5, seed=1), _frames(3, 56, 40, seed=2), _frames(6, 96, 128, seed=3)]
    sc = PolicyScorer(model, CharTokenizer(), score_side=56)
    calls = []
    real = sc.visual.forward
    monkeypatch.setattr(sc.visual, "forward", lambda pv, grid_thw, **kw: calls.append(grid_thw.tolist()) or
                        real(pv, grid_thw=grid_thw, **kw))
    got = sc.embed_pools(pools)
    assert len(calls) == 1 and [row[0] for row in calls[0]] == [5, 3, 6]
    for pool, e in zip(pools, got):
        alone = torch.cat([sc.embed_frames(pool[i:i + 1]) for i in range(pool.shape[0])])
        assert e.shape == alone.shape
        torch.testing.assert_close(e, alone, rtol=1e-5, atol=1e-5)
    calls.clear()
    split = PolicyScorer(model, CharTokenizer(), score_side=56, frames_per_call=4)
    monkeypatch.setattr(split.visual, "forward", lambda pv, grid_thw, **kw: calls.append(grid_thw.tolist()) or
                        real(pv, grid_thw=grid_thw, **kw))
    for e, f in zip(split.embed_pools(pools), got):
        torch.testing.assert_close(e, f, rtol=1e-5, atol=1e-5)
    assert [[row[0] for row in c] for c in calls] == [[4], [1, 3], [4], [2]]


def test_policy_scorer_text(tiny_qwen):
    sc = PolicyScorer(tiny_qwen, CharTokenizer())
    q = sc.embed_text(["ab", "", "b"])
    W = tiny_qwen.get_input_embeddings().weight
    a, b = ord("a") % 250 + 1, ord("b") % 250 + 1
    assert torch.allclose(q[0], (W[a] + W[b]) / 2, atol=1e-6)
    assert torch.all(q[1] == 0) and torch.allclose(q[2], W[b])


def test_select_keyframes_with_policy_scorer(tiny_qwen):
    sc = build_scorer(KeyframeConfig(num_frames=4), model=tiny_qwen, tokenizer=CharTokenizer())
    assert isinstance(sc, PolicyScorer)
    pools = [_frames(10, seed=1), _frames(6, 56, 40, seed=2), _frames(13, 33, 77, seed=3)]
    cfg = KeyframeConfig(num_frames=4, temperature=0.1, uniform_mix=0.3)
    sel = select_keyframes(sc, pools, ["what colour", "how many", "when"], cfg, num_variants=3, seed=5)
    assert isinstance(sel, KeyframeSelection) and sel.indices.shape == (3, 3, 4)
    _check_sets(sel.indices, [10, 6, 13], 4)
    assert [len(s) for s in sel.scores] == [10, 6, 13] and sel.offsets.tolist() == [0, 10, 16, 29]
    for imp in sel.importance:
        assert imp.sum().item() == pytest.approx(1.0, abs=1e-5) and imp.min() >= 0.3 / len(imp) * (1 - 1e-6)
    assert sel.indices[1, 0].tolist() == [0, 2, 3, 5]  # canonical: floor((2j+1) 6 / 8)
    again = select_keyframes(sc, pools, ["what colour", "how many", "when"], cfg, num_variants=3, seed=5)
    assert torch.equal(sel.indices, again.indices)
    # A pool shorter than F (a 6-frame video, F=8): every frame, repeated as the canonical view spreads them.
    short = select_keyframes(sc, pools, ["a", "b", "c"], KeyframeConfig(num_frames=8), num_variants=2, seed=0)
    assert short.indices[1].tolist() == [[0, 1, 1, 2, 3, 4, 4, 5]] * 2 and len(short.importance[1]) == 6
    with pytest.raises(ValueError, match="3 frame pools but 2 questions"):
        select_keyframes(sc, pools, ["a", "b"], cfg, num_variants=2, seed=0)
    with pytest.raises(ScorerError, match="uint8"):
        sc.embed_frames(pools[0].float())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_policy_scorer_under_fsdp2(tiny_qwen, monkeypatch):
    import copy

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    from strive_engine.policy import Policy
    from strive_engine.parallel import apply_fsdp, unsharded

    fr = _frames(5, seed=4)
    want = PolicyScorer(tiny_qwen, CharTokenizer())
    want_f, want_t = want.embed_frames(fr), want.embed_text(["what colour"])
    model = copy.deepcopy(tiny_qwen)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        root = apply_fsdp(Policy(model), model, mixed_precision="off", reshard_after_forward=True,
                          device=torch.device("cpu"))
        sc = PolicyScorer(model, CharTokenizer())

        def score():
            with unsharded(root):
                return sc.embed_frames(fr), sc.embed_text(["what colour"])

        got_f, got_t = root(score)  # as the trainer runs it: inside the root's forward
        assert torch.allclose(got_f, want_f, atol=1e-6) and torch.allclose(got_t, want_t, atol=1e-6)
        got_f2, _ = root(lambda: (sc.embed_frames(fr), None))  # vision blocks unshard through their own hooks
        assert torch.allclose(got_f2, want_f, atol=1e-6)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- encoder scorer


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

    words = ["[PAD]", "[UNK]", "what", "colour", "is", "the", "square", "how", "many", "times"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(small, vocab_size=len(words), max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    vision = dict(small, image_size=32, patch_size=8)
    torch.manual_seed(0)
    dirs = {}
    for kind, model in (("siglip", SiglipModel(SiglipConfig(text_config=text, vision_config=vision))),
                        ("clip", CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)))):
        d = tmp_path_factory.mktemp(kind)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        mean = [0.4, 0.5, 0.6] if kind == "siglip" else [0.48145466, 0.4578275, 0.40821073]
        std = [0.3, 0.5, 0.7] if kind == "siglip" else [0.26862954, 0.26130258, 0.27577711]
        size = {"height": 32, "width": 32} if kind == "siglip" else {"shortest_edge": 32}
        extra = {} if kind == "siglip" else {"crop_size": {"height": 32, "width": 32}, "do_center_crop": True}
        (d / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=mean, image_std=std, size=size, **extra)))
        dirs[kind] = (d, model)
    return dirs


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_encoder_scorer(encoder_dirs, kind):
    d, model = encoder_dirs[kind]
    sc = EncoderScorer(str(d), kind=kind)
    fr = _frames(4, 40, 60, seed=5)
    fr = torch.nn.functional.avg_pool2d(fr.permute(0, 3, 1, 2).float(), 5, 1, 2).round().byte()
    fr = fr.permute(0, 2, 3, 1).contiguous()  # smooth frames: resamplers then differ by ~1 level
    e = sc.embed_frames(fr)
    t = sc.embed_text(["what colour is the square", "how many times"])
    dim = 32 if kind == "siglip" else 24
    assert e.shape == (4, dim) and t.shape == (2, dim)
    sel = select_keyframes(sc, [fr, fr[:3]], ["what colour", "how many"], KeyframeConfig(num_frames=2), 2, seed=1)
    _check_sets(sel.indices, [4, 3], 2)
    assert sc.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6] if kind == "siglip" else
                                                       [0.48145466, 0.4578275, 0.40821073])  # read from the folder
    # our torch resize + normalise vs HF's PIL image processor (transformers >= 5 names it *ImageProcessorPil)
    pil = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip" if kind == "siglip"
                              else "transformers.models.clip.image_processing_pil_clip")
    from PIL import Image

    cls = pil.SiglipImageProcessorPil if kind == "siglip" else pil.CLIPImageProcessorPil
    proc = cls.from_pretrained(str(d))
    hf = proc([Image.fromarray(f.numpy()) for f in fr], return_tensors="pt")["pixel_values"]
    ours = sc._pixels(fr)
    assert ours.shape == hf.shape
    assert (ours - hf).abs().max().item() <= 3 / 255 / min(sc.std.flatten().tolist()) + 1e-6  # <= 3 uint8 levels
    feats = model.get_image_features(pixel_values=hf)
    feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    assert torch.allclose(e, feats, atol=0.05 * feats.abs().max().item())


def test_build_scorer_errors(tmp_path):
    with pytest.raises(ScorerError, match="needs the policy model"):
        build_scorer(KeyframeConfig(scorer="policy"))
    missing = str(tmp_path / "no_such_encoder")
    with pytest.raises(ScorerError, match="no_such_encoder"):
        build_scorer(KeyframeConfig(scorer="siglip", scorer_path=missing))
    with pytest.raises(ScorerError, match="no vision tower"):
        PolicyScorer(torch.nn.Linear(2, 2), CharTokenizer())
