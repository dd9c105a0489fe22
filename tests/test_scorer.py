"""The learned frame scorer: trained on a small synthetic fixture's train split (real encoded videos of the
small-object family), saved as a folder, loaded through keyframes.build_scorer (keyframes.scorer = "learned"), and
measured on the fixture's test split: its keyframe views hold the evidence far more often than uniform ones."""
from __future__ import annotations

import json

import pytest
import torch

from strive_engine.config import ConfigError, KeyframeConfig
from strive_engine.keyframes import ScorerError, build_scorer
from strive_engine.learned_scorer import (LearnedScorer, LearnedScorerError, build_vocab, encode_texts,
                                          preprocess_frames, save_scorer, words)
from strive_engine.scorer_train import load_pools, pool_loss, retrieval_report, train_scorer
from strive_engine.synthetic import generate_synthetic

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """48 clips of 64 frames at 64x64 (36 train, 12 test), a scorer trained on the train split, saved."""
    d = tmp_path_factory.mktemp("scorer")
    train_json, test_json = generate_synthetic(d / "syn", 48, 1, tasks=("small_colour", "small_count"), seconds=8.0,
                                               width=64, height=64, test_fraction=0.25, codecs=("h264", "vp9"))
    train = load_pools(train_json, pool_frames=64, image_size=48)
    model, vocab, info = train_scorer(train, epochs=12, videos_per_step=6, frames_per_video=16, seed=0)
    folder = save_scorer(model, vocab, d / "scorer")
    test = load_pools(test_json, pool_frames=64, image_size=48, keep_full=True)
    return {"dir": d, "folder": folder, "model": model, "vocab": vocab, "info": info, "train": train, "test": test}


def test_loads_through_keyframes_scorer_and_beats_uniform_frames(fixture):
    scorer = build_scorer(KeyframeConfig(num_frames=8, scorer="learned", scorer_path=str(fixture["folder"])))
    assert isinstance(scorer, LearnedScorer)
    kcfg = KeyframeConfig(num_frames=8, temperature=0.1, uniform_mix=0.3)
    rep = retrieval_report(scorer, fixture["test"], kcfg, num_variants=4, seeds=4)
    assert rep["n"] == 12 and rep["settings"]["P"] == 64
    # uniform views of F=8 out of 64 frames hold one of the 1-2 evidence frames about 1/8-1/4 of the time
    assert rep["uniform_hit"] < 0.4 and rep["canonical_hit"] < 0.5, rep
    # the learned scorer's views hold it most of the time, the top-scored frame often is one
    assert rep["importance_hit"] >= 0.75 and rep["importance_hit"] > rep["uniform_hit"] + 0.4, rep
    assert rep["recall@8"] >= 0.75 and rep["recall@1"] > 0.3, rep


def _shown_colours(frames: torch.Tensor) -> set[str]:
    """Option colours some frame shows a patch of (the small squares are ~100 pixels at 64x64)."""
    from strive_engine.synthetic import COLOURS, FIXED_COLOURS

    out = set()
    for c in FIXED_COLOURS:
        diff = (frames.short() - torch.tensor(COLOURS[c], dtype=torch.int16)).abs().amax(-1)  # (P, H, W)
        if ((diff < 60).sum((1, 2)) >= 25).any():
            out.add(c)
    return out


def test_scores_follow_the_question(fixture):
    """The same frames rank differently for another question: naming the distractor square's colour instead of the
    target's moves the top frame off the evidence (a question-blind 'something flashed' detector would not)."""
    scorer = LearnedScorer.load(fixture["folder"])
    test = fixture["test"]
    true_top, swapped_top = [], []
    for frames, rel, q, task in zip(test.full_frames, test.relevant, test.questions, test.tasks):
        if task != "small_count":
            continue
        named = q.split("small ")[1].split(" square")[0]
        other, = _shown_colours(frames) - {named}  # the distractor square's colour
        f = scorer.embed_frames(frames)
        true_top.append(bool(rel[(f @ scorer.embed_text([q])[0]).argmax()]))
        swapped_top.append(bool(rel[(f @ scorer.embed_text([q.replace(named, other)])[0]).argmax()]))
    assert len(true_top) == 6
    assert sum(true_top) >= 5 and sum(swapped_top) <= 1, (true_top, swapped_top)


def test_saved_folder_round_trips(fixture):
    scorer = LearnedScorer.load(fixture["folder"])
    frames = fixture["test"].full_frames[0]
    model = fixture["model"].eval()
    with torch.no_grad():
        ref_f = model.frame(preprocess_frames(frames, model.cfg.image_size))
        ref_t = model.text(encode_texts(["What colour is the small cross that flashes?"], fixture["vocab"]))
    got_f = scorer.embed_frames(frames)
    assert got_f.shape == (64, 64) and got_f.dtype == torch.float32
    torch.testing.assert_close(got_f, ref_f, rtol=0, atol=0)
    torch.testing.assert_close(scorer.embed_text(["What colour is the small cross that flashes?"]), ref_t,
                               rtol=0, atol=0)
    assert torch.allclose(got_f.norm(dim=-1), torch.ones(64), atol=1e-5)
    cfg = json.loads((fixture["folder"] / "config.json").read_text())
    assert cfg["model_type"] == "strive_learned_scorer" and cfg["image_size"] == 48
    assert fixture["info"]["steps"] == 12 * 6 and fixture["info"]["loss"][-1][1] < fixture["info"]["loss"][0][1]


def test_pool_loss_against_a_float64_reference():
    """The multi-positive InfoNCE over one pool equals -log(sum of softmax(cos / tau) over the evidence rows)."""
    from strive_engine.learned_scorer import DualEncoder, DualEncoderConfig

    torch.manual_seed(0)
    model = DualEncoder(DualEncoderConfig(vocab_size=5, image_size=16, channels=(4, 4, 4, 4), embed_dim=8))
    frames = torch.randint(0, 256, (2, 5, 16, 16, 3), dtype=torch.uint8)
    rel = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    ids = torch.tensor([[2, 3], [4, 0]])
    loss = pool_loss(model, frames, rel, ids, temperature=0.1)
    with torch.no_grad():
        f = model.frame(preprocess_frames(frames.flatten(0, 1), 16)).view(2, 5, -1).double()
        q = model.text(ids).double()
        p = torch.softmax((f @ q[..., None]).squeeze(-1) / 0.1, dim=1)
        ref = -(torch.log((p * rel).sum(1))).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_vocabulary_and_text_encoding():
    vocab = build_vocab(["How many times does the small red square flash?", "What colour is the small circle?"])
    assert vocab["<pad>"] == 0 and vocab["<unk>"] == 1 and words("Red, SQUARE!") == ["red", "square"]
    ids = encode_texts(["small red", "purple square flash"], vocab)
    assert ids.tolist() == [[vocab["small"], vocab["red"], 0], [1, vocab["square"], vocab["flash"]]]


def test_bad_folders_name_the_file(tmp_path, fixture):
    with pytest.raises(ScorerError, match="no such folder"):
        build_scorer(KeyframeConfig(scorer="learned", scorer_path=str(tmp_path / "missing")))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(LearnedScorerError, match="model_type is 'siglip'"):
        LearnedScorer.load(tmp_path / "hf")
    bad = tmp_path / "bad"
    save_scorer(fixture["model"], fixture["vocab"], bad)
    (bad / "vocab.json").write_text(json.dumps({"<pad>": 0}))
    with pytest.raises(LearnedScorerError, match="vocab.json"):
        LearnedScorer.load(bad)
    save_scorer(fixture["model"], fixture["vocab"], bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LearnedScorerError, match="model.safetensors"):
        LearnedScorer.load(bad)
    with pytest.raises(LearnedScorerError, match="uint8"):
        LearnedScorer.load(fixture["folder"]).embed_frames(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ConfigError, match="keyframes.scorer_path"):
        KeyframeConfig(scorer="learned")


def test_records_without_evidence_are_refused(tmp_path, fixture):
    recs = json.loads((fixture["dir"] / "syn" / "test.json").read_text())
    for r in recs:
        r.pop("evidence")
    path = fixture["dir"] / "syn" / "no_evidence.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(LearnedScorerError, match="without 'evidence'"):
        load_pools(path, pool_frames=64, image_size=48)
