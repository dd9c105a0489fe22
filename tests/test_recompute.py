"""Activation checkpointing by memory (strive_engine.recompute) on the real HF model classes: the probe's bytes per
token / patch predict what a real micro-batch keeps, a plan checkpoints the fewest layers that fit, a checkpointed
layer keeps only its input in the engine's eval mode, and the choice changes no loss or gradient."""
import dataclasses

import pytest
import torch

from strive_engine.config import ConfigError, load_config
from strive_engine import split_attention
from strive_engine.policy import Policy
from strive_engine.recompute import Recompute, saved_bytes
from test_decode import tiny  # noqa: F401  (tiny: a fixture)
from test_prompt_sharing import _model, rollout_batch, tok_and_base  # noqa: F401  (tok_and_base: a fixture)
from test_train import _trainer, dist_cleanup  # noqa: F401  (dist_cleanup: a fixture)

CPU = torch.device("cpu")
KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _head(h, w, b):  # a loss that reaches every scored hidden state and the head's weight
    return (h.double() @ w.double().t()).logsumexp(-1).sum()


def _setup(kind, tok_and_base, mode="auto", budget_gib=1.0, device=CPU, attention="split"):
    tok, _ = tok_and_base
    model = _model(kind, tok_and_base)
    model.eval()                                              # as build_model leaves it
    if device.type == "cuda":
        model.to(device, torch.bfloat16)
    pol = Policy(model, shared_attention=attention)        # split: the split attention's key rows are modelled too
    pol.recompute = Recompute.build(model, mode, budget_gib, device, compute_bytes=4 if device == CPU else 2)
    return pol, tok


DEVICES = [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA device"))]


def _groups(rec):
    return {u.name: u.modules for u in rec.units}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,one_prompt,attention", [(k, False, "split") for k in KINDS]
                         + [("qwen2_5_vl", True, "split"), ("qwen2_5_vl", False, "auto")])
def test_probe_predicts_what_a_real_micro_batch_keeps(kind, one_prompt, attention, device, tok_and_base,
                                                      monkeypatch):
    """Bytes per token (patch) from the probe's small forward x a real batch's tokens (patches) = what each of
    its layers keeps for backward (3 prompts x 3 answers, shuffled rows, videos of 16-72 patches; or one prompt's
    rows: the split attention without a boolean mask, its K/V heads grouped on CUDA); on CUDA in bf16 with the
    attention kernels the GPU picks. Under shared_attention = auto both paths are probed (the probe's own layout
    is too small to split) and a forward is predicted from the path it takes."""
    pol, tok = _setup(kind, tok_and_base, device=device, attention=attention)
    rec = pol.recompute
    rec.measure_paths(pol, lambda x: pol(x, _head), rec.probe_inputs(pol, tok, "video_r1"))
    assert rec.measured and all(u.kept > u.boundary > 0 for u in rec.units)
    assert rec.paths.keys() == ({"one", "split"} if attention == "auto" else {"split"})
    assert pol.shared_attention == attention
    if device.type == "cuda":       # flash takes the tiny model's 4 / 2 heads grouped: half the key rows' bytes
        assert rec.kv_row_bytes_grouped * 2 == rec.kv_row_bytes
    x = rollout_batch(pol, tok, kind)
    if one_prompt:                  # request 0's rows only (one prompt length)
        keep = (x.video_index == 0).nonzero().flatten()
        x = dataclasses.replace(x, input_ids=x.input_ids[keep], attention_mask=x.attention_mask[keep],
                                completion_mask=x.completion_mask[keep], video_index=x.video_index[keep])
    x = x.to(device)
    if device.type == "cuda":
        x = dataclasses.replace(x, pixel_values_videos=x.pixel_values_videos.bfloat16())
    # auto: this batch split (as a real-sized one would), then in one call
    for threshold, want in ([(0, "split"), (10**12, "one")] if attention == "auto" else [(None, "split")]):
        if threshold is not None:
            monkeypatch.setattr(split_attention, "MIN_SAVED_PAIRS", threshold)
        _, kept = saved_bytes(lambda: pol(x, _head), _groups(rec))
        _check_prediction(rec, kept, want, one_prompt)


def _check_prediction(rec, kept, path_taken, one_prompt):
    tokens, patches, mask, kv_bytes, path = rec._seen
    assert path == path_taken
    assert tokens > (100 if one_prompt else 300) and patches > 100     # the probe: 208 tokens, 64 patches
    # the split attention's per-answer keys, counted apart: over 10 % of a layer, so that counting their K/V heads
    # repeated where they are grouped (or the reverse: 2x at the tiny models' 4 / 2 heads) misses the 5 % below
    assert kv_bytes > 0.1 * min(kept["decoder"]) if path == "split" else kv_bytes == 0
    for u in rec.units:
        n = tokens if u.name == "decoder" else patches
        rows = kv_bytes if u.name == "decoder" else 0
        assert u.kept * n + rows == pytest.approx(min(kept[u.name]), rel=0.05), u.name        # one layer's own
        assert (u.kept * n + rows) * len(u.modules) + u.shared * n \
            + (mask * rec.compute_bytes if u.name == "decoder" else 0) \
            == pytest.approx(sum(kept[u.name]), rel=0.05), u.name                         # all of them
    # the whole prediction bounds everything the forward kept (the head's buffers on top)
    assert rec.predict({}, tokens, patches, mask * rec.compute_bytes, kv_bytes) >= sum(sum(v) for v in kept.values())


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_checkpointed_layers_keep_only_their_input_and_gradients_do_not_change(kind, tok_and_base):
    pol, tok = _setup(kind, tok_and_base, mode="auto")
    rec = pol.recompute
    x = rollout_batch(pol, tok, kind)
    params = [p for p in pol.hf.parameters() if p.requires_grad]

    def run(n_dec, n_vis):
        rec.set(rec.units[0], n_dec)
        rec.set(rec.units[1], n_vis)
        for p in params:
            p.grad = None
        loss, kept = saved_bytes(lambda: pol(x, _head), _groups(rec))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params], kept

    ref_loss, ref_grads, ref_kept = run(0, 0)
    L, B = len(rec.units[0].modules), len(rec.units[1].modules)
    for n_dec, n_vis in ((1, 0), (0, 1), (L, B)):
        loss, grads, kept = run(n_dec, n_vis)
        assert torch.equal(loss, ref_loss)                    # recomputing is exact: bitwise, fp64 head
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
        for u, n in ((rec.units[0], n_dec), (rec.units[1], n_vis)):
            got, ref = kept[u.name], ref_kept[u.name]
            assert all(got[i] * 10 < ref[i] for i in range(n)), (u.name, got, ref)   # checkpointed: ~its input
            shared = max(ref) - min(ref)   # what all layers read (mask, rotary tables): saved by the first that runs
            assert all(ref[i] <= got[i] <= ref[i] + shared for i in range(n, len(ref)))
            assert sum(got) <= sum(ref) - 0.9 * n * min(ref)
    # mode "true": every layer (Policy.forward switches them on), although the model is in eval mode
    rec.mode = "true"
    rec.set_all(False)
    _, kept = saved_bytes(lambda: pol(x, _head), _groups(rec))
    assert all(a * 10 < b for a, b in zip(kept["decoder"] + kept["vision"], ref_kept["decoder"] + ref_kept["vision"]))
    rec.mode = "false"
    rec.set_all(False)
    pol.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, kept = saved_bytes(lambda: pol(x, _head), _groups(rec))
    assert kept["decoder"] == ref_kept["decoder"]            # transformers' switch alone: eval mode ignores it


def test_a_plan_checkpoints_the_fewest_layers_that_fit(tok_and_base):
    pol, _ = _setup("qwen2_5_vl", tok_and_base)
    rec = pol.recompute
    dec, vis = rec.units
    dec.kept, dec.boundary, dec.flops = 1000.0, 100.0, 1e6     # 9e-4 bytes saved per FLOP
    vis.kept, vis.boundary, vis.flops = 500.0, 50.0, 1e6       # 4.5e-4: checkpointed only after every layer
    rec.other = 10.0
    tokens, patches, extra = 4000, 6000, 12345
    none = {"decoder": 0, "vision": 0}
    full = {"decoder": len(dec.modules), "vision": len(vis.modules)}
    assert rec.choose(tokens, patches, extra, rec.predict(none, tokens, patches, extra)) == none
    assert rec.choose(tokens, patches, extra, 0.0) == full      # nothing fits: everything recomputed
    seen = set()
    lo, hi = rec.predict(full, tokens, patches, extra), rec.predict(none, tokens, patches, extra)
    for i in range(60):
        free = lo + (hi - lo) * i / 59
        c = rec.choose(tokens, patches, extra, free)
        assert rec.predict(c, tokens, patches, extra) <= free
        assert c["vision"] == 0 or c["decoder"] == len(dec.modules)          # the better ratio first
        fewer = dict(c, vision=c["vision"] - 1) if c["vision"] else dict(c, decoder=c["decoder"] - 1)
        if c != none:
            assert rec.predict(fewer, tokens, patches, extra) > free           # one fewer would not fit
        seen.add(tuple(c.values()))
    assert len(seen) == len(dec.modules) + len(vis.modules) + 1               # every count on the way
    # a frozen tower keeps nothing: only decoder layers are ever chosen
    rec.vision_trained = False
    rec.measured = True
    rec.budget = int(lo) + 1
    rec.plan(tokens, patches, 0)
    assert rec.recomputed["vision"] == 0 and rec.history[-1]["recomputed_blocks"] == 0


def test_configuration_of_activation_checkpointing():
    cfg = load_config([])
    assert cfg.parallel.activation_checkpointing == "auto" and cfg.parallel.memory_budget_gib == 0.0
    assert load_config(["--parallel.activation_checkpointing=true"]).parallel.activation_checkpointing == "true"
    assert load_config(["--recipe", "gpu_3b"]).parallel.activation_checkpointing == "auto"
    with pytest.raises(ConfigError, match=r"parallel.activation_checkpointing: 'some' is not one of 'auto'"):
        load_config(["--parallel.activation_checkpointing=some"])
    with pytest.raises(ConfigError, match=r"parallel.memory_budget_gib: must be >= 0"):
        load_config(["--parallel.memory_budget_gib=-1"])
    with pytest.raises(ValueError, match=r"parallel.activation_checkpointing must be one of"):
        Recompute(torch.nn.Module(), "sometimes", None, CPU)


@pytest.mark.slow
def test_a_trainer_under_a_budget_recomputes_every_layer_and_trains_the_same(tmp_path, dist_cleanup, caplog):
    """The engine's path (FSDP2 world of 1, the fused loss, prompt sharing): a budget far below what the update
    needs makes every forward with grad recompute every layer; the steps' metrics and the weights are those of
    the run without a budget (nothing recomputed on the CPU), and only the budgeted run reports the plan."""
    import strive_engine.step as step_mod

    syn = str(tmp_path / "syn")
    one = ["--parallel.micro_batch_size=100"]   # one micro-batch in all three (0 would size them by the budget)
    free = _trainer(tmp_path / "free", syn, extra=one)
    tight = _trainer(tmp_path / "tight", syn, extra=[*one, "--parallel.memory_budget_gib=0.01"])
    every = _trainer(tmp_path / "every", syn, extra=[*one, "--parallel.activation_checkpointing=true"])
    rec = tight.policy.recompute
    assert not free.policy.recompute.active and rec.active and rec.measured
    # under FSDP2 the probe counts what the bare model keeps: the all-gathered weights a matmul saves are not
    # activations (counted, a 3B layer would look ~5x bigger)
    from strive_engine.model import build_model

    bare, tok = build_model(tight.cfg.model, "cpu")
    pol = Policy(bare)
    pol.recompute = Recompute.build(bare, "auto", 1.0, CPU, compute_bytes=4)
    pol.recompute.measure(lambda x: pol(x, _head), pol.recompute.probe_inputs(pol, tok, tight.cfg.rollout.prompt))
    layers = lambda r: {k: v for k, v in r.paths["one"].items() if k != "other"}  # noqa: E731 (other: the heads differ)
    assert layers(rec) == layers(pol.recompute) and rec.units[0].kept > 0
    assert rec.paths.keys() == {"one", "split"}          # shared_attention = auto: both paths probed
    # the probe's forward had no backward: every FSDP group is sharded again before the optimizer takes its params
    assert [id(p) for p in tight.params] == [id(p) for p in tight.root.parameters() if p.requires_grad]
    assert all(type(p).__name__ == "DTensor" for p in tight.params)
    # the gradients the plan counts as pending are those of the shards the optimizer steps (listed before any
    # forward: inside one, FSDP2's unsharded copies of the root group would be listed and never get a gradient)
    assert [id(p) for p, _ in rec._grad_bytes] == [id(p) for p in tight.params]
    assert rec.pending_gradients() == sum(p.to_local().numel() * 4 for p in tight.params)
    L, B = (len(u.modules) for u in rec.units)
    for step in (0, 1):   # the first step's learning rate is 0 (warm-up): the second one moves the weights
        a, b, c = (step_mod.rl_step(t, step) for t in (free, tight, every))
        assert not any(k.startswith("memory/") for k in a) and not any(k.startswith("memory/") for k in c)
        assert (b["memory/recomputed_layers"], b["memory/recomputed_blocks"]) == (L, B)
        assert b["memory/predicted_peak_gib"] > 0.01
        for k in ("loss", "grad_norm", "reward/mean", "rollout/gen_tokens"):
            assert a[k] == b[k] == c[k], (step, k)
    # a peak predicted above the budget even with everything recomputed is said, once
    over = [r for r in caplog.records if "above the 0.0 GiB budget" in r.getMessage()]
    assert len(over) == 1 and over[0].levelname == "WARNING", [r.getMessage() for r in caplog.records][-5:]
    for (n, p), q, r in zip(free.root.named_parameters(), tight.root.parameters(), every.root.parameters()):
        assert torch.equal(p.detach(), q.detach()) and torch.equal(p.detach(), r.detach()), n


def _ranks_worker(rank, out_dir):
    """Two models from one seed under FSDP2 (gloo): one where this rank's budget makes it recompute every layer
    (rank 0) or none (rank 1), one with nothing recomputed anywhere; one update on rank-specific rows each."""
    from sharded import tiny_sharded_policy
    from strive_engine.parallel import reshard_all

    out = {}
    for run, budget in (("mixed", 0.001 if rank == 0 else 100.0), ("none", None)):
        model, tok, pol, root = tiny_sharded_policy(out_dir, recompute=lambda m, b=budget: Recompute.build(
            m, "auto" if b else "false", b or 0.0, CPU, 4))
        pol.recompute.track_gradients(model.parameters())
        if pol.recompute.active:
            pol.recompute.measure_paths(pol, lambda x: root(pol, x, _head),
                                        pol.recompute.probe_inputs(pol, tok, "video_r1"), lambda: reshard_all(root))
        opt = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=1e-2)
        x = rollout_batch(pol, tok, "qwen2_5_vl", seed=rank)
        before = [p.detach().to_local().clone() for p in root.parameters()]
        root(pol, x, _head).backward()
        opt.step()
        plan = pol.recompute.history[-1] if pol.recompute.history else {}
        out[run] = {"recomputed": (plan.get("recomputed_layers"), plan.get("recomputed_blocks")),
                    "params": [p.detach().to_local().clone() for p in root.parameters()], "before": before}
    return out


@pytest.mark.timeout(300)
def test_ranks_that_recompute_different_layers_run_the_same_collectives(tmp_path):
    """Each rank plans its own recomputation (its own micro-batch, its own memory): rank 0 recomputes every
    layer, rank 1 none. FSDP2 unshards a layer for its backward before the recompute, so no rank waits on a
    collective the other does not make, and the weights after the update are bitwise those of a run where no rank
    recomputes anything."""
    from sharded import run_ranks

    res = run_ranks(_ranks_worker, tmp_path)
    assert res[0]["mixed"]["recomputed"] == (2, 2) and res[1]["mixed"]["recomputed"] == (0, 0)
    assert res[0]["none"]["recomputed"] == res[1]["none"]["recomputed"] == (None, None)
    for r in res:
        assert len(r["mixed"]["params"]) == len(r["none"]["params"]) > 10
        for a, b in zip(r["mixed"]["params"], r["none"]["params"]):
            assert torch.equal(a, b)
        moved = [not torch.equal(a, b) for a, b in zip(r["none"]["params"], r["none"]["before"])]
        assert sum(moved) > 0.9 * len(moved)                  # the update reached (nearly) every shard
