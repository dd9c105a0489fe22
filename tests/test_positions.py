"""One position rule for every forward (strive_engine.policy, `Policy.positions`): the prompt by the model's own
get_rope_index, the tokens after it at the prompt's last position + 1 + j, where generation put them; computed
once per distinct prompt and carried by rollout batches. Real HF classes (tiny random configs), fp32 on the CPU."""
import dataclasses

import pytest
import torch

from strive_engine.config import RolloutConfig
from strive_engine.rollout import RolloutRequest, generate_rollouts
from test_decode import sharpened, tiny  # noqa: F401 (fixture)
from test_rollout import MCQ, NUMQ, _tiny_other


def _long_video(kind, seconds_per_patch, seed=3):
    """One request whose 8 temporal patches span 8 x seconds_per_patch seconds: with 8 s per patch (16 frames of a
    64 s clip) its temporal positions run past the text that follows the video."""
    d = 1536 if kind == "qwen3_vl" else 1176
    g = torch.Generator().manual_seed(seed)
    ts = [(i + 0.25) * seconds_per_patch for i in range(8)] if kind == "qwen3_vl" else None
    return [RolloutRequest(MCQ, torch.randn(8 * 16, d, generator=g), torch.tensor([8, 4, 4]), seconds_per_patch,
                           timestamps=ts),
            RolloutRequest(NUMQ, torch.randn(4 * 16, d, generator=g), torch.tensor([4, 4, 4]), seconds_per_patch,
                           timestamps=ts[:4] if ts else None)]


def _score(pol, inputs, temperature=1.0):
    tgt = inputs.targets()
    with torch.no_grad():
        return pol(inputs, lambda h, w, b: torch.log_softmax(h @ w.T / temperature, -1).gather(1, tgt[:, None])[:, 0])


def _whole_row_rope(pol, inputs):
    """HF get_rope_index over whole rows (prompt + completion): the positions the forwards used before."""
    v = inputs.video_index
    return pol.rope_index(inputs.input_ids, inputs.attention_mask, inputs.video_grid_thw[v],
                          inputs.second_per_grid_ts[v], inputs.video_slots(pol.config.video_token_id, pol.merge_size))


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("backend", ["native", "hf"])
def test_completions_are_scored_where_they_were_sampled(tiny, kind, backend):
    """A long video: the trainer's log-probs of the sampled tokens equal the sampler's (native engine and HF
    generate), its positions are HF's get_rope_index over the whole rows, and the completion continues from the
    prompt's last position. For Qwen2.5-VL the case is one where the prompt's maximum lies above its last position
    (the native engine decoded at max + 1 before: 0.17 nats off on this model)."""
    pol0, tok = tiny
    pol = pol0 if kind == "qwen2_5_vl" else _tiny_other(kind, tok)
    cfg = RolloutConfig(num_generations=3, max_new_tokens=10, prompt="short", temperature=1.0, backend=backend)
    with sharpened(pol):
        rb = generate_rollouts(pol, tok, _long_video(kind, 8.0), cfg, 5, return_logprobs=True)
        fresh = dataclasses.replace(rb.inputs, position_ids=None, visual=None)
        lp = _score(pol, fresh)
    sel = rb.completion_mask.bool()
    torch.testing.assert_close(lp, rb.sampling_logprobs[sel], rtol=1e-5, atol=1e-5)
    pos = pol.positions(fresh)
    assert torch.equal(pos, rb.inputs.position_ids)                       # what the rollout batch carries
    assert torch.equal(pos, _whole_row_rope(pol, fresh))
    Lp = rb.prompt_length
    assert torch.equal(pos[:, :, Lp], (pos[:, :, Lp - 1] + 1))            # the prompt ends with text
    if kind == "qwen2_5_vl":
        assert bool((pos[:, :, :Lp].amax(dim=(0, 2)) > pos[0, :, Lp - 1]).all())


@pytest.mark.parametrize("seconds", [0.5, 8.0])
def test_positions_equal_hf_get_rope_index(tiny, seconds):
    """Positions equal HF's whole-row get_rope_index, padding included, for short and long videos: computing
    them once per distinct prompt changes no value."""
    pol, tok = tiny
    cfg = RolloutConfig(num_generations=2, max_new_tokens=6, prompt="short")
    with sharpened(pol):
        rb = generate_rollouts(pol, tok, _long_video("qwen2_5_vl", seconds), cfg, 1)
    fresh = dataclasses.replace(rb.inputs, position_ids=None)
    assert torch.equal(pol.positions(fresh), _whole_row_rope(pol, fresh))


def test_carried_positions_select_and_score_like_fresh_ones(tiny):
    """A rollout batch's positions, sliced by `select` (micro-batches trim padding columns), equal positions
    computed from scratch on the sub-batch, and scoring with them is bitwise the same."""
    pol, tok = tiny
    cfg = RolloutConfig(num_generations=3, max_new_tokens=8, prompt="short")
    with sharpened(pol):
        rb = generate_rollouts(pol, tok, _long_video("qwen2_5_vl", 8.0), cfg, 2)
        for rows in (torch.tensor([0, 4]), torch.tensor([3, 4, 5]), torch.arange(6)):
            sub = rb.inputs.select(rows)
            fresh = dataclasses.replace(sub, position_ids=None)
            assert torch.equal(sub.position_ids, pol.positions(fresh))
            assert torch.equal(_score(pol, sub), _score(pol, fresh))


def test_rows_sharing_a_video_keep_their_own_prompts(tiny):
    """Positions are computed once per distinct prompt, not per video: two questions on one video (different
    prompt lengths) in one batch get the positions each row gets alone."""
    pol, tok = tiny
    reqs = _long_video("qwen2_5_vl", 8.0)
    same = [reqs[0], dataclasses.replace(reqs[0], question=NUMQ)]
    cfg = RolloutConfig(num_generations=2, max_new_tokens=5, prompt="short")
    with sharpened(pol):
        rb = generate_rollouts(pol, tok, same, cfg, 4)
    inputs = rb.inputs
    inputs = dataclasses.replace(inputs, position_ids=None, visual=None,
                                 video_index=torch.zeros_like(inputs.video_index))  # both requests: video 0
    prompt_len = inputs.attention_mask[:, :rb.prompt_length].sum(1)
    assert len(set(prompt_len.tolist())) == 2
    batch = pol.positions(inputs)
    for m in range(inputs.num_rows):
        alone = dataclasses.replace(inputs.select([m]), position_ids=None)
        mask, alone_mask = inputs.attention_mask[m].bool(), alone.attention_mask[0].bool()
        assert torch.equal(batch[:, m][:, mask], pol.positions(alone)[:, 0][:, alone_mask])
        assert not bool(batch[:, m][:, ~mask].any())
    assert torch.equal(batch, _whole_row_rope(pol, inputs))


def test_bad_carried_positions_are_named(tiny):
    pol, tok = tiny
    cfg = RolloutConfig(num_generations=2, max_new_tokens=4, prompt="short")
    rb = generate_rollouts(pol, tok, _long_video("qwen2_5_vl", 1.0), cfg, 0)
    bad = dataclasses.replace(rb.inputs, position_ids=rb.inputs.position_ids[:, :, 1:])
    with pytest.raises(ValueError, match="position_ids has shape"):
        _score(pol, bad)
