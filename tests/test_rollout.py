"""Prompts and rollout: Video-R1 prompt text, video-token expansion, generate bookkeeping, determinism,
and that the rollout's own sampling log-probs equal Policy.forward's on the returned PolicyInputs."""
import types

import pytest
import torch

from strive_engine import prompts
from strive_engine.config import ModelConfig, RolloutConfig
from strive_engine.model import build_model
from strive_engine.policy import Policy
from strive_engine.rollout import (RolloutRequest, _generation_config, encode_prompts, generate_rollouts,
                                   second_per_grid, shuffle_frames)
from strive_engine.sampling import SamplingSpec, filter_logits
from strive_engine.tokenizer import special_token_ids

MCQ = dict(question="What colour is the shape that appears only briefly?",
           options=["A. red", "B. green", "C. blue", "D. yellow"], problem_type="multiple choice")
NUMQ = types.SimpleNamespace(question="How many times does the square flash?", options=(), problem_type="numerical")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(99)
    cfg = ModelConfig(tokenizer_dir=str(tmp_path_factory.mktemp("tok") / "t"), tiny_hidden_size=64, tiny_layers=1,
                      tiny_heads=4, tiny_vision_depth=1, tiny_vision_hidden_size=32)
    model, tok = build_model(cfg, "cpu")
    return Policy(model), tok


def requests(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [RolloutRequest(MCQ, torch.randn(32, 1176, generator=g), torch.tensor([[2, 4, 4]]), 1.0),
            RolloutRequest(NUMQ, torch.randn(72, 1176, generator=g), torch.tensor([2, 6, 6]), 0.25),
            RolloutRequest(MCQ, torch.randn(16, 1176, generator=g), torch.tensor([1, 4, 4]), 2.0)]


# ------------------------------------------------------------------------------------------- prompts


def test_video_r1_prompt_text():
    text = prompts.format_question(MCQ["question"], MCQ["options"], "multiple choice", "video_r1")
    assert text.startswith("What colour is the shape that appears only briefly?Options:\nA. red\nB. green\n"
                           "C. blue\nD. yellow\n\nPlease think about this question as if you were a human")
    assert text.endswith("between the <answer> </answer> tags. Please provide only the single option letter "
                         "(e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    num = prompts.format_question(NUMQ.question, (), "numerical", "video_r1")
    assert num.startswith("How many times does the square flash?\nPlease think")
    assert num.endswith("Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.")
    short = prompts.format_question(NUMQ.question, (), "numerical", "short")
    assert "<think>" in short and "<answer>" in short and len(short) < 130
    with pytest.raises(prompts.PromptError, match="'essay'"):
        prompts.format_question("q", (), "essay")
    with pytest.raises(prompts.PromptError, match="'long'"):
        prompts.format_question("q", (), "numerical", "long")


def test_video_token_expansion(tiny):
    _, tok = tiny
    for grid, n in (((2, 4, 4), 8), ((4, 6, 10), 60), ((1, 2, 2), 1)):
        s = prompts.render_prompt(tok, MCQ, grid, style="short")
        assert s.count("<|video_pad|>") == n == prompts.num_video_tokens(grid)
        assert "<|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>" in s
        assert s.endswith("<|im_start|>assistant\n")
    q3 = prompts.expand_video_tokens("x<|vision_start|><|video_pad|><|vision_end|>y", (3, 4, 2), qwen3=True,
                                     timestamps=[0.25, 1.0, 2.04])
    assert q3 == ("x<0.2 seconds><|vision_start|>" + "<|video_pad|>" * 2 + "<|vision_end|>"
                  "<1.0 seconds><|vision_start|>" + "<|video_pad|>" * 2 + "<|vision_end|>"
                  "<2.0 seconds><|vision_start|>" + "<|video_pad|>" * 2 + "<|vision_end|>y")
    with pytest.raises(prompts.PromptError, match="exactly one"):
        prompts.expand_video_tokens("<|vision_start|><|video_pad|><|vision_end|>" * 2, (1, 2, 2))
    with pytest.raises(prompts.PromptError, match="divisible"):
        prompts.num_video_tokens((2, 3, 4))
    with pytest.raises(prompts.PromptError, match="timestamp"):
        prompts.expand_video_tokens("<|vision_start|><|video_pad|><|vision_end|>", (2, 2, 2), qwen3=True)


def test_variants_of_a_question_are_encoded_once(tiny):
    """K variants share their question's record and grid: one render + tokenize per distinct (record, grid), the
    ids equal encoding each request alone, and the rows do not alias one list."""
    pol, tok = tiny
    qa = dict(MCQ)
    reqs = [RolloutRequest(qa, torch.zeros(32, 1176), torch.tensor([2, 4, 4]), s) for s in (1.0, 0.5, 2.0)]
    reqs += [RolloutRequest(dict(MCQ), torch.zeros(32, 1176), torch.tensor([2, 4, 4]), 1.0),      # equal, not same
             RolloutRequest(qa, torch.zeros(72, 1176), torch.tensor([2, 6, 6]), 1.0)]             # another grid
    calls = []

    class Counting:  # the tokenizer, counting the chat-template renders
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            return tok(*a, **k)

        def apply_chat_template(self, *a, **k):
            calls.append(1)
            return tok.apply_chat_template(*a, **k)

    got = encode_prompts(pol, Counting(), reqs, "short")
    assert len(calls) == 3                                          # (qa, 2x4x4), (copy, 2x4x4), (qa, 2x6x6)
    assert got == [encode_prompts(pol, tok, [r], "short")[0] for r in reqs]
    got[0].append(-1)
    assert got[1][-1] != -1


def test_second_per_grid():
    assert second_per_grid([0.0, 0.5, 1.0, 1.5]) == pytest.approx(1.0)  # 2 frames per patch, 0.5 s apart
    assert second_per_grid(torch.arange(8) / 2.0) == pytest.approx(2 / 2.0)  # evenly at fps 2: qwen_vl_utils' 2/fps
    assert second_per_grid([0.0, 0.1, 2.0, 2.9]) == pytest.approx(2 * 2.9 / 3)  # uneven: mean spacing
    assert second_per_grid([3.0], fps=4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sorted"):
        second_per_grid([2.0, 1.0])


def _patchify(frames, tps=2, p=14):
    """Reference Qwen patch layout: frames (F, H, W, C) -> (F/tps * H/p * W/p, C*tps*p*p)."""
    F, H, W, C = frames.shape
    x = frames.permute(0, 3, 1, 2).reshape(F // tps, tps, C, H // p // 2, 2, p, W // p // 2, 2, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(F // tps * (H // p) * (W // p), C * tps * p * p)


def test_shuffle_frames_equals_patchify_of_permuted_frames():
    frames = torch.randn(6, 28, 56, 3)
    pv = _patchify(frames)
    shuffled, perm = shuffle_frames(pv, (3, 2, 4), torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == list(range(6)) and perm.tolist() != list(range(6))
    torch.testing.assert_close(shuffled, _patchify(frames[perm]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match grid"):
        shuffle_frames(pv, (3, 2, 2))


# ------------------------------------------------------------------------------------------- rollout


def test_rollout_rows_masks_and_policy_consistency(tiny):
    pol, tok = tiny
    cfg = RolloutConfig(num_generations=3, max_new_tokens=10, prompt="short", temperature=0.8, top_p=0.95,
                        max_batch=4)
    reqs = requests()
    b = generate_rollouts(pol, tok, reqs, cfg, generator_seed=11, return_logprobs=True)
    M, G = 9, 3
    assert b.request_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert b.sample_index.tolist() == [0, 1, 2] * 3
    inp = b.inputs
    assert inp.num_rows == M and inp.num_videos == 3 and inp.video_index.tolist() == b.request_index.tolist()
    Lp = b.prompt_length
    # prompts: left-padded, the same prompt for the G rows of a request, matching encode_prompts
    enc = encode_prompts(pol, tok, reqs, "short")
    for m in range(M):
        p = enc[m // G]
        assert inp.input_ids[m, Lp - len(p):Lp].tolist() == p
        assert inp.attention_mask[m, :Lp].sum() == len(p)
    torch.testing.assert_close(inp.completion_mask[:, Lp:], b.completion_mask)
    assert inp.completion_mask[:, :Lp].sum() == 0
    assert b.num_gen_tokens == int(b.completion_mask.sum())
    assert len(b.texts) == M and b.texts == tok.batch_decode(
        [c[m.bool()] for c, m in zip(b.completion_ids, b.completion_mask)], skip_special_tokens=True)
    inp.validate(pol.merge_size, pol.config.video_token_id)
    # the sampling log-probs are the trainer's logits (Policy.forward) under the same temperature and top-p
    tgt = inp.targets()
    spec = SamplingSpec.from_config(cfg)
    with torch.no_grad():
        lp = pol(inp, lambda h, w, bias: torch.log_softmax(filter_logits(h @ w.T, spec), -1).gather(1, tgt[:, None]))
    torch.testing.assert_close(lp.squeeze(1), b.sampling_logprobs[b.completion_mask.bool()], rtol=1e-4, atol=1e-4)


def test_rollout_deterministic_by_seed_and_leaves_global_rng(tiny):
    pol, tok = tiny
    cfg = RolloutConfig(num_generations=2, max_new_tokens=6, prompt="short")
    reqs = requests()[:2]
    torch.manual_seed(5)
    a = generate_rollouts(pol, tok, reqs, cfg, generator_seed=1)
    after_a = torch.rand(3)
    torch.manual_seed(5)
    b = generate_rollouts(pol, tok, reqs, cfg, generator_seed=1)
    after_b = torch.rand(3)
    torch.manual_seed(5)
    after_none = torch.rand(3)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert torch.equal(after_a, after_b) and torch.equal(after_a, after_none)  # global stream untouched
    c = generate_rollouts(pol, tok, reqs, cfg, generator_seed=2)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # G samples of one request differ (sampling, not G copies of one answer)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])


def test_eos_masking_and_truncation(tiny):
    """Post-processing on scripted generate outputs: mask up to and including the first eos, pad after it."""
    pol, tok = tiny
    ids = special_token_ids(tok)
    eos, pad = ids["eos_token_id"], ids["pad_token_id"]
    t = tok.convert_tokens_to_ids(["<think>", "</think>", "<answer>", "</answer>"])
    x = tok("A", add_special_tokens=False)["input_ids"][0]
    scripted = [[t[0], x, t[1], t[2], x, t[3], eos, pad],        # stops at 6 -> 7 tokens scored
                [x, x, x, x, x, x, x, x],                        # no eos: truncated, all 8 scored
                [eos, x, eos, x, x, x, x, x]]                    # eos first: 1 token scored, junk after it padded

    class Scripted:
        def __init__(self, p):
            self.p, self.hf, self.config, self.merge_size = p, p.hf, p.config, p.merge_size
            self.mm_token_type_ids, self.positions = p.mm_token_type_ids, p.positions

        def generate(self, input_ids, **kw):
            gen = torch.tensor(scripted[:input_ids.shape[0]])
            return types.SimpleNamespace(sequences=torch.cat([input_ids, gen], 1), logits=None)

    cfg = RolloutConfig(num_generations=3, max_new_tokens=8, prompt="short", backend="hf")
    b = generate_rollouts(Scripted(pol), tok, requests()[:1], cfg, generator_seed=0)
    assert b.completion_mask.sum(1).tolist() == [7, 8, 1]
    assert b.truncated.tolist() == [False, True, False]
    assert b.completion_ids[2].tolist() == [eos] + [pad] * 7
    assert b.completion_ids[0, 6] == eos and b.completion_ids[0, 7] == pad
    assert b.texts[0] == "<think>A</think><answer>A</answer>"
    assert b.texts[2] == ""
    assert b.num_gen_tokens == 16


def test_checkpoint_generation_defaults_do_not_leak(tiny):
    """A checkpoint's generation_config (Qwen2.5-VL: top_k=1, repetition_penalty=1.05) must not change sampling:
    generate's processed scores equal log_softmax(logits / T) exactly where nothing is filtered."""
    pol, tok = tiny
    gc = pol.hf.generation_config
    saved = (gc.top_k, gc.repetition_penalty, gc.temperature)
    gc.top_k, gc.repetition_penalty, gc.temperature = 1, 1.5, 0.01
    try:
        cfg = RolloutConfig(num_generations=4, max_new_tokens=5, prompt="short", temperature=1.3, backend="hf")
        ids = special_token_ids(tok)
        gen_cfg = _generation_config(cfg, [ids["eos_token_id"]], ids["pad_token_id"], output_logits=True)
        gen_cfg.output_scores = True
        r = requests()[0]
        x = torch.tensor([encode_prompts(pol, tok, [r], "short")[0]])
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out = pol.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values_videos=r.pixel_values,
                               video_grid_thw=r.grid()[None], second_per_grid_ts=torch.tensor([1.0]),
                               mm_token_type_ids=pol.mm_token_type_ids(x), generation_config=gen_cfg)
        for s, lg in zip(out.scores, out.logits):
            torch.testing.assert_close(torch.log_softmax(s, -1), torch.log_softmax(lg / 1.3, -1))
        b = generate_rollouts(pol, tok, [r], cfg, generator_seed=3)
        assert len({tuple(c.tolist()) for c in b.completion_ids}) > 1  # top_k=1 would make all 4 identical
    finally:
        gc.top_k, gc.repetition_penalty, gc.temperature = saved


def test_greedy_and_bad_requests(tiny):
    pol, tok = tiny
    cfg = RolloutConfig(num_generations=2, max_new_tokens=4, prompt="short", do_sample=False)
    b = generate_rollouts(pol, tok, requests()[2:], cfg, generator_seed=0)
    assert torch.equal(b.completion_ids[0], b.completion_ids[1])  # greedy: the G rows agree
    bad = RolloutRequest(MCQ, torch.randn(30, 1176), torch.tensor([2, 4, 4]), 1.0)
    with pytest.raises(ValueError, match="does not match pixel_values with 30 rows"):
        generate_rollouts(pol, tok, [bad], cfg, generator_seed=0)
    with pytest.raises(ValueError, match="no requests"):
        generate_rollouts(pol, tok, [], cfg, generator_seed=0)


def _tiny_other(kind, tok):
    """Tiny Qwen2-VL / Qwen3-VL with the offline tokenizer's ids (random init)."""
    transformers = pytest.importorskip("transformers")
    from strive_engine.model import init_weights

    cls_name = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}[kind]
    if not hasattr(transformers, cls_name):
        pytest.skip(f"this transformers has no {cls_name}")
    ids = special_token_ids(tok)
    common = dict(image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                  vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
                  tie_word_embeddings=True)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=ids["pad_token_id"])
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    if kind == "qwen3_vl":
        cfg = transformers.Qwen3VLConfig(
            text_config=dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True)),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1], patch_size=16), **common)
    else:
        cfg = transformers.Qwen2VLConfig(
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2), **common)
    model = getattr(transformers, cls_name)._from_config(cfg, attn_implementation="sdpa")
    init_weights(model, seed=4)
    model.generation_config.eos_token_id = [ids["eos_token_id"], ids["pad_token_id"]]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return Policy(model)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_other_qwen_vl_models_rollout_and_policy_agree(tiny, kind):
    """Qwen2-VL and Qwen3-VL (per-frame timestamp blocks in the prompt, deepstack features in Policy.forward):
    generate's log-probs equal Policy.forward's on the returned inputs."""
    _, tok = tiny
    pol = _tiny_other(kind, tok)
    d = 1536 if kind == "qwen3_vl" else 1176  # Qwen3-VL patches are 16 px
    g = torch.Generator().manual_seed(0)
    reqs = [RolloutRequest(MCQ, torch.randn(32, d, generator=g), torch.tensor([2, 4, 4]), 1.0),
            RolloutRequest(NUMQ, torch.randn(48, d, generator=g), torch.tensor([4, 2, 6]), 0.5,
                           timestamps=[0.1, 0.6, 1.1, 1.6])]
    b = generate_rollouts(pol, tok, reqs, RolloutConfig(num_generations=2, max_new_tokens=6, prompt="short"),
                          generator_seed=0, return_logprobs=True)
    if kind == "qwen3_vl":
        first = tok.decode(b.inputs.input_ids[0])
        assert "<0.2 seconds><|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|><1.2 seconds>" in first
        assert "<1.6 seconds><|vision_start|>" in tok.decode(b.inputs.input_ids[2])
    tgt = b.inputs.targets()
    with torch.no_grad():
        lp = pol(b.inputs, lambda h, w, bias: torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None]).squeeze(1))
    torch.testing.assert_close(lp, b.sampling_logprobs[b.completion_mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_rollout_matches_policy_forward(tmp_path):
    torch.manual_seed(3)
    cfg = ModelConfig(tokenizer_dir=str(tmp_path / "t"), dtype="float32", tiny_hidden_size=64, tiny_layers=1,
                      tiny_heads=4, tiny_vision_depth=1, tiny_vision_hidden_size=32)
    model, tok = build_model(cfg, "cuda")
    pol = Policy(model)
    rc = RolloutConfig(num_generations=4, max_new_tokens=8, prompt="video_r1", temperature=0.9)
    b = generate_rollouts(pol, tok, requests(), rc, generator_seed=1, return_logprobs=True)
    assert b.inputs.input_ids.is_cuda and b.inputs.num_rows == 12
    tgt = b.inputs.targets()
    with torch.no_grad():
        lp = pol(b.inputs, lambda h, w, bias: torch.log_softmax((h @ w.T).float() / 0.9, -1).gather(1, tgt[:, None]))
    ref = b.sampling_logprobs[b.completion_mask.bool()].to(lp.device)
    torch.testing.assert_close(lp.squeeze(1), ref, rtol=2e-3, atol=2e-3)


def test_generated_vision_tokens_are_text_like_in_generate(tiny):
    """A completion that contains <|video_pad|>, <|image_pad|>, <|vision_start|> (a random or confused model
    emits them) is scored by Policy.forward exactly as generate computed it: those tokens are plain text there."""
    from transformers import LogitsProcessor, LogitsProcessorList

    pol, tok = tiny
    ids = special_token_ids(tok)
    x = tok("A", add_special_tokens=False)["input_ids"][0]
    forced = [ids["video_token_id"], ids["image_token_id"], ids["vision_start_token_id"], x, ids["video_token_id"],
              ids["eos_token_id"]]

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, -float("inf"))
            out[:, forced[input_ids.shape[1] - Force.start]] = 0
            return out

    class Forcing:
        def __init__(self, p):
            self.hf, self.config, self.merge_size, self.mm_token_type_ids = p.hf, p.config, p.merge_size, \
                p.mm_token_type_ids
            self.positions = p.positions

        def generate(self, input_ids, **kw):
            Force.start = input_ids.shape[1]
            return pol.generate(input_ids=input_ids, logits_processor=LogitsProcessorList([Force()]), **kw)

    cfg = RolloutConfig(num_generations=2, max_new_tokens=8, prompt="short", backend="hf")
    b = generate_rollouts(Forcing(pol), tok, requests()[:2], cfg, generator_seed=0, return_logprobs=True)
    assert b.completion_ids[0, :6].tolist() == forced and b.completion_mask.sum(1).tolist() == [6] * 4
    tgt = b.inputs.targets()
    with torch.no_grad():
        lp = pol(b.inputs, lambda h, w, bias: torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None]).squeeze(1))
    torch.testing.assert_close(lp, b.sampling_logprobs[b.completion_mask.bool()], rtol=1e-4, atol=1e-4)


def _hf_rollout_collectives(rank, out_dir):
    """One rank of test_hf_rollout_runs_no_collective_per_token: a tiny FSDP2 policy, the HF backend inside the
    root's forward with the weights unsharded, answers of different lengths per rank."""
    import torch.distributed as dist
    from sharded import tiny_sharded_policy

    from strive_engine.parallel import unsharded

    model, tok, policy, root = tiny_sharded_policy(out_dir)
    vc = model.config.vision_config
    dim = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
    q = types.SimpleNamespace(question="What?", options=(), problem_type="free-form")
    req = RolloutRequest(q, torch.randn(4, dim), torch.tensor([1, 2, 2]), 1.0)
    cfg = RolloutConfig(num_generations=2, max_new_tokens=4 + 6 * rank, prompt="short", backend="hf")
    calls, real = [], dist.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def fn():
        with unsharded(root), torch.no_grad():
            dist.all_reduce = counting
            try:
                return generate_rollouts(policy, tok, [req], cfg, generator_seed=rank)
            finally:
                dist.all_reduce = real
    root(fn)
    return {"all_reduce_calls": len(calls)}


def test_hf_rollout_runs_no_collective_per_token(tmp_path):
    """rollout.backend=hf under FSDP2 with two ranks (gloo): transformers would turn synced_gpus on for a module
    FSDP2 manages and all-reduce on every token, holding the ranks in step; Policy.generate turns it off, so a
    rank whose answers end sooner stops, and no collective runs inside generate."""
    from sharded import run_ranks

    assert [r["all_reduce_calls"] for r in run_ranks(_hf_rollout_collectives, tmp_path)] == [0, 0]


def test_tgrpo_seeds_are_no_other_ranks_seed():
    """T-GRPO's permutation and sampling seeds, derived from a per-(step, rank) seed, are none of the step seeds
    of 8 ranks over 50 steps (they were seed + 1 and seed + 2: ranks r + 1's and r + 2's own), differ from each
    other, and repeat exactly (resume)."""
    from strive_engine.rollout import sub_seed
    from strive_engine.step import step_seed

    own = {step_seed(0, s, r) for s in range(50) for r in range(8)}
    derived = [sub_seed(x, p) for x in sorted(own) for p in ("tgrpo/permutation", "tgrpo/sampling")]
    assert not own & set(derived) and len(set(derived)) == len(derived)
    assert all(0 <= d < 2**31 - 1 for d in derived)
    assert sub_seed(12345, "tgrpo/sampling") == sub_seed(12345, "tgrpo/sampling")
