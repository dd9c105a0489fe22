"""The native decode engine (strive_engine.decode) against HF generate, and its sampling, stopping, compile and
FSDP2 behaviour. The HF model classes are the real ones (tiny random configs); logits are compared in fp32."""
import contextlib
import inspect
import os

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from strive_engine import decode as decode_mod
from strive_engine.config import ModelConfig, RolloutConfig
from strive_engine.decode import DecodeEngine, DecodeError
from strive_engine.model import build_model
from strive_engine.policy import Policy, PolicyInputs
from strive_engine.rollout import RolloutRequest, _generation_config, encode_prompts, generate_rollouts
from strive_engine.sampling import SamplingSpec
from strive_engine.tokenizer import special_token_ids
from test_rollout import MCQ, NUMQ, _tiny_other

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(7)
    cfg = ModelConfig(tokenizer_dir=str(tmp_path_factory.mktemp("tok") / "t"), tiny_hidden_size=64, tiny_layers=2,
                      tiny_heads=4, tiny_vision_depth=1, tiny_vision_hidden_size=32)
    model, tok = build_model(cfg, "cpu")
    return Policy(model), tok


@contextlib.contextmanager
def sharpened(pol, factor=5.0):
    """Scale the decoder blocks' matrices so a random model's continuations vary from step to step (at init
    scale its tied embeddings make it repeat one token); the weights are restored afterwards."""
    params = [p for p in pol.hf.model.language_model.layers.parameters() if p.dim() == 2]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.mul_(factor)
    try:
        yield pol
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _requests(kind, seed=0, long=False):
    """Three requests of different prompt lengths; long: videos of 8 / 6 / 4 temporal patches, 8 s each, whose
    temporal positions (Qwen2.5-VL) run past the text after them."""
    d = 1536 if kind == "qwen3_vl" else 1176
    g = torch.Generator().manual_seed(seed)
    if long:
        return [RolloutRequest(q, torch.randn(t * h * h, d, generator=g), torch.tensor([t, h, h]), 8.0,
                               timestamps=[8.0 * i + 2.0 for i in range(t)] if kind == "qwen3_vl" else None)
                for q, t, h in ((MCQ, 8, 4), (NUMQ, 6, 6), (NUMQ, 4, 4))]
    return [RolloutRequest(MCQ, torch.randn(32, d, generator=g), torch.tensor([2, 4, 4]), 1.0,
                           timestamps=[0.1, 1.1] if kind == "qwen3_vl" else None),
            RolloutRequest(NUMQ, torch.randn(72, d, generator=g), torch.tensor([2, 6, 6]), 0.5,
                           timestamps=[0.3, 0.9] if kind == "qwen3_vl" else None),
            RolloutRequest(NUMQ, torch.randn(16, d, generator=g), torch.tensor([1, 4, 4]), 2.0,
                           timestamps=[0.0] if kind == "qwen3_vl" else None)]


def _prompts(pol, tok, reqs):
    ids = encode_prompts(pol, tok, reqs, "short")
    Lp = max(map(len, ids))
    pad = special_token_ids(tok)["pad_token_id"]
    x = torch.full((len(ids), Lp), pad)
    m = torch.zeros(len(ids), Lp, dtype=torch.long)
    for r, p in enumerate(ids):
        x[r, Lp - len(p):] = torch.tensor(p)
        m[r, Lp - len(p):] = 1
    return PolicyInputs(input_ids=x, attention_mask=m, completion_mask=torch.zeros_like(x),
                        pixel_values_videos=torch.cat([r.pixel_values for r in reqs]),
                        video_grid_thw=torch.stack([r.grid() for r in reqs]),
                        second_per_grid_ts=torch.tensor([r.second_per_grid_ts for r in reqs]),
                        video_index=torch.arange(len(reqs)))


def _hf_generate(pol, prompts, G, T, eos, pad, forced=None, temperature=1.0):
    """HF generate over each prompt repeated G times; with `forced` (M, T) tokens, a logits processor makes HF
    emit exactly those tokens, so its raw per-step logits are conditioned on the native engine's samples."""
    rows = torch.arange(prompts.num_rows).repeat_interleave(G)
    x = prompts.input_ids[rows]
    pix_rows = prompts.video_grid_thw.prod(-1)
    offs = torch.cumsum(pix_rows, 0) - pix_rows
    pix = torch.cat([prompts.pixel_values_videos[int(offs[r]):int(offs[r] + pix_rows[r])] for r in rows.tolist()])
    kw = dict(input_ids=x, attention_mask=prompts.attention_mask[rows], pixel_values_videos=pix,
              video_grid_thw=prompts.video_grid_thw[rows])
    fwd = inspect.signature(pol.hf.forward).parameters
    if "mm_token_type_ids" in fwd:  # transformers >= 5.2x; older ones find the video tokens themselves
        kw["mm_token_type_ids"] = pol.mm_token_type_ids(x)
    if "second_per_grid_ts" in fwd and pol.config.model_type != "qwen3_vl":
        kw["second_per_grid_ts"] = prompts.second_per_grid_ts[rows]
    cfg = RolloutConfig(num_generations=G, max_new_tokens=T, do_sample=False)
    gen_cfg = _generation_config(cfg, eos, pad, output_logits=True)
    procs = None
    if forced is not None:
        start = x.shape[1]

        class Force(LogitsProcessor):
            def __call__(self, input_ids, scores):
                out = torch.full_like(scores, -float("inf"))
                out[torch.arange(len(out)), forced[:, input_ids.shape[1] - start]] = 0
                return out
        procs = LogitsProcessorList([Force()])
    out = pol.generate(**kw, generation_config=gen_cfg, logits_processor=procs)
    return out.sequences[:, x.shape[1]:], torch.stack(out.logits, 1).float()


@pytest.mark.parametrize("long", [False, True], ids=["short-video", "long-video"])
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_logits_match_hf_generate(tiny, kind, long):
    """Per-step fp32 logits equal HF generate's (output_logits) for 3 requests of different prompt lengths, G=2,
    24 steps: greedy (identical tokens) and sampled at T=1.3 (HF forced along the native samples). A wrong
    decode position changes the logits even where the greedy token survives; the long videos are the case where
    the prompt's maximum position is not its last (the engine decoded from the maximum before)."""
    pol0, tok = tiny
    pol = pol0 if kind == "qwen2_5_vl" else _tiny_other(kind, tok)
    ids = special_token_ids(tok)
    eos, pad = [ids["eos_token_id"]], ids["pad_token_id"]
    reqs = _requests(kind, long=long)
    prompts = _prompts(pol, tok, reqs)
    assert len(set(prompts.attention_mask.sum(1).tolist())) == 3        # three prompt lengths
    G, T = 2, 25
    engine = DecodeEngine(pol)
    with torch.no_grad(), sharpened(pol):
        for spec in (SamplingSpec(greedy=True), SamplingSpec(temperature=1.3)):
            torch.manual_seed(1)
            out = engine.generate(prompts, G, spec, T, eos, pad, keep_logits=True, check_every=1000)
            assert out.steps == T - 1
            forced = None if spec.greedy else out.tokens
            hf_tokens, hf_logits = _hf_generate(pol, prompts, G, T, eos, pad, forced)
            n = hf_logits.shape[1]
            assert n >= 21                                             # >= 20 decode steps compared
            torch.testing.assert_close(out.logits[:, :n], hf_logits, **TOL)
            assert torch.equal(out.tokens[:, :n], hf_tokens[:, :n])
            assert len(set(out.tokens[0, :n].tolist())) > 5            # the comparison covers varied tokens


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_stacked_qkv_equals_three_projections(tiny, kind):
    """pack_qkv (one GEMM per layer over the stacked q/k/v weights and biases; q, k, v strided views of its output)
    gives the logits and tokens of the three projections, with Qwen2's biases and Qwen3-VL's q/k norms; the copy
    is taken per generate call, so a changed weight is used by the same engine's next call."""
    pol0, tok = tiny
    pol = pol0 if kind == "qwen2_5_vl" else _tiny_other(kind, tok)
    attn = pol.hf.model.language_model.layers[-1].self_attn
    assert (attn.k_proj.bias is not None) == (kind != "qwen3_vl")
    ids = special_token_ids(tok)
    eos, pad = [ids["eos_token_id"]], ids["pad_token_id"]
    prompts = _prompts(pol, tok, _requests(kind))
    packed, plain = DecodeEngine(pol), DecodeEngine(pol, pack_qkv=False)

    def both():
        runs = []
        for engine in (packed, plain):
            torch.manual_seed(2)
            runs.append(engine.generate(prompts, 2, SamplingSpec(temperature=1.3), 12, eos, pad, keep_logits=True,
                                        check_every=1000))
        torch.testing.assert_close(runs[0].logits, runs[1].logits, **TOL)
        torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, **TOL)
        assert torch.equal(runs[0].tokens, runs[1].tokens)
        return runs[0]

    with torch.no_grad(), sharpened(pol):
        st = packed.new_state(packed.prefill(prompts), 2, 4, SamplingSpec(), eos, pad)
        assert len(st.qkv) == len(packed.layers) and st.qkv[0][0].shape[0] == (
            packed.num_heads + 2 * packed.num_kv_heads) * packed.head_dim
        first = both()
        saved = attn.v_proj.weight.detach().clone()
        attn.v_proj.weight.mul_(-2.0)                  # v only: the last block of the stacked copy
        try:
            second = both()
        finally:
            attn.v_proj.weight.copy_(saved)
    assert (first.logits - second.logits).abs().max() > 1e-3   # the change reached the packed engine


def test_rollout_native_equals_hf_greedy_and_scores_match_policy(tiny):
    """generate_rollouts with either backend: identical greedy batches; native sampling log-probs equal
    Policy.forward's on the returned inputs (the trainer's old log-probs)."""
    pol, tok = tiny
    reqs = _requests("qwen2_5_vl")
    b = {}
    stack = contextlib.ExitStack()
    stack.enter_context(sharpened(pol))
    for backend in ("hf", "native"):
        cfg = RolloutConfig(num_generations=2, max_new_tokens=12, prompt="short", do_sample=False, backend=backend,
                            max_batch=4)
        b[backend] = generate_rollouts(pol, tok, reqs, cfg, 0, return_logprobs=True)
    stack.close()
    assert torch.equal(b["hf"].completion_ids, b["native"].completion_ids)
    assert torch.equal(b["hf"].inputs.input_ids, b["native"].inputs.input_ids)
    torch.testing.assert_close(b["hf"].sampling_logprobs, b["native"].sampling_logprobs, **TOL)
    cfg = RolloutConfig(num_generations=3, max_new_tokens=10, prompt="short", temperature=0.7, top_p=0.9)
    nb = generate_rollouts(pol, tok, reqs, cfg, 5)
    tgt = nb.inputs.targets()
    with torch.no_grad():
        lp = pol(nb.inputs, lambda h, w, bias: torch.log_softmax(h @ w.T / 0.7, -1).gather(1, tgt[:, None]))
    sel = nb.completion_mask.bool()
    # top-p renormalises: the sampling log-prob is >= the unfiltered one, equal where nothing was cut
    assert (nb.sampling_logprobs[sel] >= lp.squeeze(1) - 1e-5).all()


# ------------------------------------------------------------------------------------------- sampling
# (the sampler's distribution and its top-k / top-p masks: tests/test_sampling_filters.py)


def test_sampling_seeds_reproduce(tiny):
    pol, tok = tiny
    cfg = RolloutConfig(num_generations=3, max_new_tokens=8, prompt="short", top_k=50)
    reqs = _requests("qwen2_5_vl")[:2]
    torch.manual_seed(5)
    a = generate_rollouts(pol, tok, reqs, cfg, 11)
    after_a = torch.rand(2)
    b = generate_rollouts(pol, tok, reqs, cfg, 11)
    c = generate_rollouts(pol, tok, reqs, cfg, 12)
    torch.manual_seed(5)
    assert torch.equal(after_a, torch.rand(2))                         # the global RNG stream is untouched
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampling_logprobs, b.sampling_logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])  # G rows are sampled independently
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingSpec(temperature=0.0)


# ------------------------------------------------------------------------------------------- stopping


def test_rows_stop_independently_and_are_masked(tiny, monkeypatch):
    """A scripted sampler: row m emits EOS at step stop[m] (never for the last row). Tokens after EOS are pad
    with log-prob 0, the others keep going, the truncated row is flagged, and the loop ends early once every row
    is done (at the next check)."""
    pol, tok = tiny
    ids = special_token_ids(tok)
    eos, pad = ids["eos_token_id"], ids["pad_token_id"]
    stop = torch.tensor([2, 5, 0, 9, 3, 4])
    calls = {"n": 0}

    def scripted(logits, spec, **_):
        t = calls["n"]
        calls["n"] += 1
        token = torch.full((logits.shape[0],), 7, dtype=torch.long)
        token[stop == t] = eos
        return token, torch.full((logits.shape[0],), -0.5)

    monkeypatch.setattr(decode_mod, "sample_next", scripted)
    reqs = _requests("qwen2_5_vl")
    prompts = _prompts(pol, tok, reqs)
    with torch.no_grad():
        out = DecodeEngine(pol).generate(prompts, 2, SamplingSpec(), 16, [eos], pad, check_every=4)
    for m, s in enumerate(stop.tolist()):
        assert out.tokens[m, s] == eos and (out.tokens[m, :s] == 7).all() and (out.tokens[m, s + 1:] == pad).all()
        assert (out.logprobs[m, :s + 1] == -0.5).all() and (out.logprobs[m, s + 1:] == 0).all()
    assert out.finished.all() and out.steps == 12                      # all done after step 9: stopped at 12 < 15
    # at rollout level: a row that never emits EOS is truncated and fully scored
    stop[5] = 99
    calls["n"] = 0
    cfg = RolloutConfig(num_generations=2, max_new_tokens=12, prompt="short", stop_check_every=2)
    b = generate_rollouts(pol, tok, reqs, cfg, 0)
    assert b.truncated.tolist() == [False] * 5 + [True]
    assert b.completion_mask.sum(1).tolist() == [3, 6, 1, 10, 4, 12]
    assert (b.completion_ids[2, 1:] == pad).all()


def test_generated_vision_tokens_are_plain_text(tiny, monkeypatch):
    """Vision tokens the model generates are embedded as text (as HF generate does): Policy.forward scores the
    native rollout's forced completions exactly as the engine computed them."""
    pol, tok = tiny
    ids = special_token_ids(tok)
    forced = [ids["video_token_id"], ids["image_token_id"], ids["vision_start_token_id"], ids["video_token_id"],
              ids["eos_token_id"]]
    step = {"n": 0}

    def forcing(logits, spec, **_):
        token = torch.full((logits.shape[0],), forced[min(step["n"], len(forced) - 1)], dtype=torch.long)
        step["n"] += 1
        return token, torch.log_softmax(logits.float(), -1).gather(1, token[:, None]).squeeze(1)

    monkeypatch.setattr(decode_mod, "sample_next", forcing)
    b = generate_rollouts(pol, tok, _requests("qwen2_5_vl")[:2], RolloutConfig(num_generations=2, max_new_tokens=8,
                                                                            prompt="short"), 0)
    assert b.completion_ids[0, :5].tolist() == forced and b.completion_mask.sum(1).tolist() == [5] * 4
    tgt = b.inputs.targets()
    with torch.no_grad():
        lp = pol(b.inputs, lambda h, w, bias: torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None]).squeeze(1))
    torch.testing.assert_close(lp, b.sampling_logprobs[b.completion_mask.bool()], **TOL)


def test_bad_requests_fail_before_compute(tiny, monkeypatch):
    pol, tok = tiny
    reqs = _requests("qwen2_5_vl")
    lens = [len(p) for p in encode_prompts(pol, tok, reqs, "short")]
    called = []
    monkeypatch.setattr(pol, "video_features", lambda *a: called.append(1))
    ctx = pol.hf.config.get_text_config().max_position_embeddings
    longest = max(range(3), key=lens.__getitem__)
    assert sorted(lens)[1] < lens[longest]
    cfg = RolloutConfig(num_generations=2, max_new_tokens=ctx - lens[longest] + 1, prompt="short")
    with pytest.raises(DecodeError, match=rf"request {longest}: prompt of \d+ tokens \+ max_new_tokens"):
        generate_rollouts(pol, tok, reqs, cfg, 0)
    monkeypatch.setattr(pol.hf.config.get_text_config(), "max_position_embeddings", lens[longest] - 1)
    with pytest.raises(DecodeError, match=f"request {longest}: its prompt has .* longer than the model's context"):
        generate_rollouts(pol, tok, reqs, RolloutConfig(num_generations=2, max_new_tokens=4, prompt="short"), 0)
    assert not called                                                  # nothing ran
    with pytest.raises(ValueError, match="rollout.backend"):
        RolloutConfig(backend="vllm")


def test_caches_are_freed_when_generate_returns(tiny, monkeypatch):
    """The prefix caches (prefill's K/V) and the suffix caches (allocated per call by new_state from the batch's
    sizes) are freed when generate returns, while the engine lives on, and the rollout batch keeps none of them:
    the update's memory is not shared with dead K/V. Checked with weak references to every cache tensor of each
    call, with the cyclic garbage collector off (on CUDA a cycle would hold the memory until it ran)."""
    import gc
    import weakref

    pol, tok = tiny
    ids = special_token_ids(tok)
    made = []
    real = DecodeEngine.new_state

    def tracked(self, prefix, *args, **kwargs):
        st = real(self, prefix, *args, **kwargs)
        caches = [*st.k_suffix, *st.v_suffix, *st.prefix.keys, *st.prefix.values]
        made.append([weakref.ref(c if c._base is None else c._base) for c in caches])   # a view's owner
        return st

    monkeypatch.setattr(DecodeEngine, "new_state", tracked)
    engine = DecodeEngine(pol)
    reqs = _requests("qwen2_5_vl")[:2]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad():
            out = engine.generate(_prompts(pol, tok, reqs), 2, SamplingSpec(temperature=1.3), 4,
                                  [ids["eos_token_id"]], ids["pad_token_id"])
            assert len(made) == 1 and len(made[0]) == 4 * len(engine.layers)
            assert [r for r in made[0] if r() is not None] == []             # freed, the engine still alive
            cfg = RolloutConfig(num_generations=2, max_new_tokens=4, prompt="short", max_batch=2)
            b = generate_rollouts(pol, tok, reqs, cfg, 0)                    # one generate call per request
        assert len(made) == 3
        assert [r for refs in made[1:] for r in refs if r() is not None] == []
    finally:
        if was_enabled:
            gc.enable()
    assert out.tokens.shape == (4, 4) and b.completion_ids.shape[0] == 4   # the outputs themselves survive


# ------------------------------------------------------------------------------------------- compile


@pytest.mark.parametrize("spec", [SamplingSpec(greedy=True), SamplingSpec(temperature=1.3, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_decode_step_compiles_fullgraph(tiny, spec):
    """No graph break and no host sync inside the step: torch.compile(fullgraph=True) traces it, and the
    compiled steps give the eager steps' tokens and log-probs. Also for a sampled spec with temperature, top-k
    and top-p (the filtering's topk / sort / scatter and the exponential race inside the graph), from the same
    seeds: the compiled step draws the eager step's noise."""
    pol, tok = tiny
    ids = special_token_ids(tok)
    prompts = _prompts(pol, tok, _requests("qwen2_5_vl")[:2])
    engine = DecodeEngine(pol)
    with torch.no_grad():
        prefix = engine.prefill(prompts)
        states = []
        for _ in range(2):
            torch.manual_seed(3)                                               # token 0: the same draw
            states.append(engine.new_state(prefix, 2, 6, spec, [ids["eos_token_id"]], ids["pad_token_id"]))
        torch._dynamo.reset()
        compiled = torch.compile(engine.step, fullgraph=True, backend="aot_eager")
        for st, step in ((states[0], engine.step), (states[1], compiled)):
            torch.manual_seed(4)
            for _ in range(5):
                step(st)
    assert torch.equal(states[0].tokens, states[1].tokens)
    torch.testing.assert_close(states[0].logprobs, states[1].logprobs)
    assert int(states[1].t) == 5
    if not spec.greedy:  # the draws vary: equality is not that of a constant token
        assert len(set(states[0].tokens.flatten().tolist())) > 3


def test_step_computes_its_counter_once_whatever_the_depth(tiny):
    """The completion index is advanced by one op per step and the suffix length it implies is computed once,
    not once per layer: on CUDA each such op is a node of the replayed graph (38 per step at the 3B shape's 36
    layers before). Counted as the ops (views aside) whose result is a one-element int64 tensor, over one eager step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            kernel = not func.is_view and func is not torch.ops.aten.scalar_tensor.default  # a wrapped Python int
            if kernel and isinstance(out, torch.Tensor) and out.dtype == torch.long and out.numel() == 1:
                self.ops.append(str(func))
            return out

    pol, tok = tiny
    assert len(pol.hf.model.language_model.layers) >= 2
    ids = special_token_ids(tok)
    engine = DecodeEngine(pol)
    with torch.no_grad():
        prefix = engine.prefill(_prompts(pol, tok, _requests("qwen2_5_vl")[:2]))
        st = engine.new_state(prefix, 2, 4, SamplingSpec(greedy=True), [ids["eos_token_id"]], ids["pad_token_id"])
        with Counter() as c:
            engine.step(st)
    assert sorted(c.ops) == ["aten.add.Tensor", "aten.add_.Tensor"], c.ops   # n = t + 1; t += 1
    assert int(st.t) == 1


# ------------------------------------------------------------------------------------------- FSDP2


def _fsdp_worker(rank, out_dir):
    from sharded import tiny_sharded_policy
    from strive_engine.parallel import unsharded

    model, tok, policy, root = tiny_sharded_policy(out_dir, vision_depth=1)
    opt = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=3e-2)
    reqs = _requests("qwen2_5_vl", seed=rank)[:2]
    rc = RolloutConfig(num_generations=2, max_new_tokens=8, prompt="short")

    def rollout(seed):
        with unsharded(root), torch.no_grad():
            return generate_rollouts(policy, tok, reqs, rc, seed)

    def score(b):
        tgt = b.inputs.targets()
        return policy(b.inputs, lambda h, w, bias: torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None])[:, 0])

    before = root(rollout, 1)
    loss = -root(score, before).sum()                            # one training step on the samples
    loss.backward()
    opt.step()
    opt.zero_grad()
    after = root(rollout, 1)                                     # the same seed: only the weights differ
    with torch.no_grad():
        train_lp = root(score, after)                            # a training forward on the new samples
        stale_lp = root(score, before)
    sel = after.completion_mask.bool()
    return {"rollout": after.sampling_logprobs[sel], "train": train_lp,
            "old_rollout": before.sampling_logprobs[before.completion_mask.bool()], "old_train": stale_lp}


@pytest.mark.timeout(300)
def test_rollout_follows_fsdp2_weights_after_an_optimizer_step(tmp_path):
    """2 processes, gloo, FSDP2: after an optimizer step the native rollout decodes with the new weights — its
    sampling log-probs equal a training forward's on the same tokens (fp32, 1e-5) — and not the old ones."""
    from sharded import run_ranks

    for res in run_ranks(_fsdp_worker, tmp_path):
        torch.testing.assert_close(res["rollout"], res["train"], **TOL)
        # the step moved the policy: stale weights would have given the old log-probs on the old samples
        assert (res["old_rollout"] - res["old_train"]).abs().max() > 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the interpreter; on CUDA "
                    "test_cuda_graph_decode_matches_hf runs the compiled kernels")
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_triton_kernels_in_the_step_match_the_twins(tiny, kind, monkeypatch):
    """The whole decode step with every Triton kernel (the interpreter here, compiled on CUDA) gives the logits
    and tokens of the step built from the torch twins: strides, cache layout and slot indexing agree, with the
    rotary inside the attention kernels (the default) and as its own launch (fuse_rope=False), and with
    Qwen3-VL's per-head q / k norms. Greedy tokens come from the one-pass sampler (strive_kernels.sample_tokens)
    in the Triton runs."""
    import functools

    import strive_engine.sampling as sampling_mod
    import strive_kernels.decode_attention as da
    import strive_kernels.decode_layer as dl
    import strive_kernels.sampling as ks

    pol0, tok = tiny
    pol = pol0 if kind == "qwen2_5_vl" else _tiny_other(kind, tok)
    ids = special_token_ids(tok)
    prompts = _prompts(pol, tok, _requests(kind)[:2])
    runs = []
    with torch.no_grad(), sharpened(pol):
        for triton_kernels, fuse_rope in ((False, True), (True, True), (True, False)):
            with monkeypatch.context() as mp:
                if triton_kernels:
                    mp.setattr(dl, "_use_triton", lambda backend, *t: True)
                    for name in ("shared_prefix_attention", "rope_shared_prefix_attention"):
                        mp.setattr(decode_mod, name, functools.partial(getattr(da, name), backend="triton"))
                    mp.setattr(sampling_mod, "sample_tokens", functools.partial(ks.sample_tokens, backend="triton"))
                engine = DecodeEngine(pol, fuse_rope=fuse_rope)
                runs.append(engine.generate(prompts, 2, SamplingSpec(greedy=True), 4, [ids["eos_token_id"]],
                                            ids["pad_token_id"], keep_logits=True))
    for run in runs[1:]:
        assert torch.equal(runs[0].tokens, run.tokens)
        torch.testing.assert_close(runs[0].logits, run.logits, **TOL)
        torch.testing.assert_close(runs[0].logprobs, run.logprobs, **TOL)
    # the fused kernels compute the rotary the launch before them computed: the same bits
    assert torch.equal(runs[1].logits, runs[2].logits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_matches_hf(tmp_path, dtype):
    """On CUDA: the graph-replayed step (compiled Triton kernels) gives HF generate's logits, and a run that
    stops early (every row at EOS) stops within two check windows and pads the rest."""
    torch.manual_seed(3)
    cfg = ModelConfig(tokenizer_dir=str(tmp_path / "t"), dtype="float32" if dtype == torch.float32 else "bfloat16",
                      tiny_hidden_size=128, tiny_layers=2, tiny_heads=4, tiny_vision_depth=1,
                      tiny_vision_hidden_size=32)
    model, tok = build_model(cfg, "cuda")
    pol = Policy(model)
    ids = special_token_ids(tok)
    eos, pad = [ids["eos_token_id"]], ids["pad_token_id"]
    prompts = _prompts(pol, tok, _requests("qwen2_5_vl")).to("cuda")
    prompts.pixel_values_videos = prompts.pixel_values_videos.to(dtype)
    engine = DecodeEngine(pol)
    with torch.no_grad(), sharpened(pol):
        torch.manual_seed(0)
        out = engine.generate(prompts, 3, SamplingSpec(temperature=1.2), 24, eos, pad, keep_logits=True,
                              check_every=4)
        assert "capture" in out.timings_ms                                       # the graph path ran
        _, hf = _hf_generate(pol, prompts, 3, 24, eos, pad, forced=out.tokens.cuda())
    n = hf.shape[1]
    a, b = out.logits[:, :n].double(), hf.double().cpu()
    rel = (a - b).norm() / b.norm()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel
    # the fused sampler (a seed per call, the completion index as its step): the recorded log-probs are the
    # kept logits' log_softmax at T = 1.2, a re-seeded run repeats exactly, another seed differs
    live = out.tokens != pad
    want = torch.log_softmax(out.logits.double() / 1.2, -1).gather(2, out.tokens[..., None]).squeeze(2)
    torch.testing.assert_close(out.logprobs[live].double(), want[live], rtol=0, atol=1e-5)
    with torch.no_grad(), sharpened(pol):
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(engine.generate(prompts, 3, SamplingSpec(temperature=1.2), 24, eos, pad, check_every=4))
    assert torch.equal(runs[0].tokens, out.tokens) and torch.equal(runs[1].tokens, out.tokens)
    assert torch.equal(runs[1].logprobs, out.logprobs) and not torch.equal(runs[2].tokens, out.tokens)
    # a capture that fails (refused here) finishes the call eagerly, from the warm-up step's state: the same draws

    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused by the test")

    with torch.no_grad(), sharpened(pol), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda.CUDAGraph, "capture_begin", refuse)
        mp.setitem(decode_mod._CAPTURE, "failed", False)             # restored on exit: later tests capture again
        torch.manual_seed(0)
        eager = engine.generate(prompts, 3, SamplingSpec(temperature=1.2), 24, eos, pad, check_every=4)
        assert torch.cuda.current_stream() == torch.cuda.default_stream()     # not left on a capture stream
        again = engine.generate(prompts, 3, SamplingSpec(temperature=1.2), 8, eos, pad, check_every=4)
        assert "capture_failed" not in again.timings_ms and "capture" not in again.timings_ms   # no retry
    assert "capture_failed" in eager.timings_ms and "capture" not in eager.timings_ms
    assert torch.equal(eager.tokens, out.tokens)
    torch.testing.assert_close(eager.logprobs, out.logprobs, rtol=0, atol=1e-5)
    # early stop: force EOS from step 5 on through a huge logit; the loop ends at most 2 windows later
    with torch.no_grad():
        lm_bias = torch.zeros(pol.hf.lm_head.weight.shape[0], device="cuda", dtype=dtype)
        lm_bias[eos[0]] = 1e4
        pol.hf.lm_head.bias = torch.nn.Parameter(lm_bias)
        try:
            stop = engine.generate(prompts, 3, SamplingSpec(), 64, eos, pad, check_every=4)
        finally:
            pol.hf.lm_head.bias = None
    assert stop.finished.all() and (stop.tokens[:, 0] == eos[0]).all() and (stop.tokens[:, 1:] == pad).all()
    assert stop.steps <= 1 + 3 * 4


@pytest.mark.slow
def test_evaluate_agrees_across_backends(tmp_path):
    """`python -m strive_engine.evaluate` gives the same greedy predictions with --rollout.backend=native and
    --rollout.backend=hf (a checkpoint whose continuations vary, on the synthetic test split)."""
    import json
    import subprocess
    import sys

    from test_evaluate import ROOT, SMALL

    torch.manual_seed(11)
    cfg = ModelConfig(tokenizer_dir=str(tmp_path / "tok"), tiny_hidden_size=64, tiny_vision_hidden_size=32)
    model, tok = build_model(cfg, "cpu")
    with sharpened(Policy(model)):
        model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tok.save_pretrained(tmp_path / "model")
    preds = {}
    for backend in ("native", "hf"):
        out = tmp_path / f"eval_{backend}"
        args = [*SMALL, f"--data.synthetic_dir={tmp_path / 'syn'}", f"--model.path={tmp_path / 'model'}",
                f"--eval.output_dir={out}", "--eval.batch_size=3", "--rollout.prompt=short",
                "--rollout.max_new_tokens=16", f"--rollout.backend={backend}"]
        res = subprocess.run([sys.executable, "-m", "strive_engine.evaluate", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        rows = [json.loads(x) for x in (out / "predictions.rank0.jsonl").read_text().splitlines()]
        preds[backend] = {r["id"]: r["prediction"] for r in rows}
    assert len(preds["native"]) == 4 and preds["native"] == preds["hf"]
    assert len(set(preds["native"].values())) > 1 and all(len(p) > 5 for p in preds["native"].values())
