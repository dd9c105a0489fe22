"""The update's micro-batches sized by memory (strive_engine.micro_batches): whole prompt groups, the fewest
micro-batches whose predicted activations fit the budget, predicted from the sizes the forward itself reports to
the memory plan; nothing is recomputed in them, and training is the same as with one micro-batch."""
import dataclasses

import pytest
import torch

from strive_engine import split_attention
from strive_engine.micro_batches import by_memory, forward_sizes, pack, row_groups
from strive_engine.policy import Policy
from strive_engine.recompute import Recompute
from test_decode import tiny  # noqa: F401  (tiny: a fixture)
from test_prompt_sharing import _model, rollout_batch, tok_and_base  # noqa: F401  (tok_and_base: a fixture)
from test_train import _trainer, dist_cleanup, syn_dir  # noqa: F401  (dist_cleanup, syn_dir: fixtures)

CPU = torch.device("cpu")


def _head(h, w, b):
    return (h.double() @ w.double().t()).logsumexp(-1).sum()


def test_pack_fewest_parts_in_order_then_balanced():
    costs = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    cap = lambda p: sum(costs[i] for i in p) <= 6  # noqa: E731
    parts = pack(costs, cap)
    # greedy in order gives [0, 1], [2, 3, 4, 5] (6 and 4); the even re-cut at 5 / 10 keeps two parts that fit
    assert [i for p in parts for i in p] == list(range(6)) and len(parts) == 2
    assert all(cap(p) for p in parts)
    # the fewest parts: no two consecutive parts could merge
    assert not any(cap(a + b) for a, b in zip(parts, parts[1:]))
    # an item over the cap alone is a part of its own; nothing is dropped or reordered
    costs2 = [2.0, 9.0, 2.0, 2.0]
    parts2 = pack(costs2, lambda p: sum(costs2[i] for i in p) <= 4)
    assert parts2 == [[0], [1], [2, 3]]
    # balancing: greedy [0..3] (4), [4] (1) becomes [0, 1, 2], [3, 4] (3 and 2)
    costs3 = [1.0] * 5
    assert pack(costs3, lambda p: len(p) <= 4) == [[0, 1, 2], [3, 4]]
    assert pack([], lambda p: True) == []
    assert pack([3.0, 3.0], lambda p: True) == [[0, 1]]


def _setup(tok_and_base, kind="qwen2_5_vl", attention="auto", budget_gib=1.0, device=CPU):
    tok, _ = tok_and_base
    model = _model(kind, tok_and_base)
    model.eval()
    if device.type == "cuda":
        model.to(device, torch.bfloat16)
    pol = Policy(model, shared_attention=attention)
    pol.recompute = Recompute.build(model, "auto", budget_gib, device, compute_bytes=4 if device == CPU else 2)
    rec = pol.recompute
    rec.measure_paths(pol, lambda x: pol(x, _head), rec.probe_inputs(pol, tok, "video_r1"))
    return pol, tok, rec




@pytest.mark.parametrize("kind,attention,split_at,device",
                         [("qwen2_5_vl", "auto", 0, CPU), ("qwen2_5_vl", "auto", 10**12, CPU),
                          ("qwen2_5_vl", "masked", None, CPU), ("qwen3_vl", "split", None, CPU),
                          pytest.param("qwen2_5_vl", "split", None, torch.device("cuda"), id="cuda",
                                       marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))])
def test_sizes_are_what_the_forward_reports_to_the_plan(kind, attention, split_at, device, tok_and_base,
                                                        monkeypatch):
    """For subsets of a batch (whole prompt groups, rows of several groups in any order, rows that share no
    prompt, the prompt-only row), the packer's sizes and predicted bytes equal those `Policy.forward` gives the
    memory plan when the selection runs; on CUDA in bf16, where one prompt's key rows stay grouped (flash) and
    several prompts' are repeated, so the mask flag changes the bytes."""
    if split_at is not None:
        monkeypatch.setattr(split_attention, "MIN_SAVED_PAIRS", split_at)
    pol, tok, rec = _setup(tok_and_base, kind, attention, device=device)
    x = rollout_batch(pol, tok, kind).to(device)
    if device.type == "cuda":
        x = dataclasses.replace(x, pixel_values_videos=x.pixel_values_videos.bfloat16())
    rows = torch.arange(x.num_rows)
    rg = row_groups(x, rows)
    assert sorted(m for g in rg.members for m in g) == rows.tolist()
    assert len(rg.members) == 3 and sorted(len(g) for g in rg.members) == [3, 3, 4]   # + the prompt-only row
    for groups in ([0, 1, 2], [0], [2, 0], [1]):
        _check(pol, rec, x, [m for g in groups for m in rg.members[g]], forward_sizes(rg, groups, True, attention))
    # one row of each group (nothing shared: rows at their trimmed width), and rows 0-2 whatever their groups
    for picked in ([g[0] for g in rg.members], [0, 1, 2]):
        sub = row_groups(x, torch.tensor(picked))
        _check(pol, rec, x, picked, forward_sizes(sub, list(range(len(sub.members))), True, attention))
    # two prompts on one video (a question's rows whose first prompt token differs): the video runs once
    ids = x.input_ids.clone()
    g0 = rg.members[0]
    first = int(x.attention_mask[g0[1]].nonzero()[0])
    ids[g0[1:], first] += 1
    y = dataclasses.replace(x, input_ids=ids)
    ry = row_groups(y, rows)
    assert len(ry.members) == 4 and len(set(ry.video)) == 3
    _check(pol, rec, y, [m for g in ry.members for m in g], forward_sizes(ry, list(range(4)), True, attention))
    # one row per answer (share_prompts off, as under flash_attention_2): whole groups, rows at their trimmed width
    pol.share_prompts = False
    for groups in ([0, 2], [1]):
        _check(pol, rec, x, [m for g in groups for m in rg.members[g]], forward_sizes(rg, groups, False, attention))


def _check(pol, rec, x, picked, sizes):
    tokens, patches, mask_elems, split = sizes
    sel = x.select(torch.tensor(picked))
    with torch.enable_grad():
        pol(sel, _head)
    seen = rec._seen
    kv = 0 if split is None else split[0] * (rec.kv_row_bytes if split[1] else rec.kv_row_bytes_grouped)
    assert (tokens, patches, mask_elems, kv, "one" if split is None else "split") == seen, picked
    # the plan's predicted peak for that forward (nothing recomputed: 1 GiB holds it) = resident + these bytes
    # (on the CPU, where the resident bytes do not move with the forward's own allocations)
    assert rec.history[-1]["recomputed_layers"] == 0
    if sel.input_ids.device.type == "cpu":
        want = rec.history[-1]["predicted_peak_gib"] * 2**30 - rec.resident_bytes()
        assert rec.activation_bytes(tokens, patches, mask_elems, split) == pytest.approx(want, rel=1e-12)


def test_micro_batches_are_the_fewest_that_fit_and_recompute_nothing(tok_and_base):
    pol, tok, rec = _setup(tok_and_base)
    x = rollout_batch(pol, tok, "qwen2_5_vl")
    rows = torch.arange(x.num_rows)
    rg = row_groups(x, rows)
    need = [rec.activation_bytes(*forward_sizes(rg, [g], True, "auto")) for g in range(3)]
    both = rec.activation_bytes(*forward_sizes(rg, [0, 1], True, "auto"))
    whole = rec.activation_bytes(*forward_sizes(rg, [0, 1, 2], True, "auto"))
    resident = rec.state_bytes()          # what the packer subtracts (held: 0 here)
    # a budget for the largest single group but not for two: one group per micro-batch
    rec.budget = int(resident + (max(need) + min(both, whole)) / 2)
    assert max(need) < min(both, whole)
    parts = by_memory(x, rows, rec, True, "auto", vision_runs=True)
    assert sorted(p.numel() for p in parts) == [3, 3, 4]
    assert sorted(torch.cat(parts).tolist()) == rows.tolist()
    for p in parts:                        # each part one prompt group, and its forward recomputes nothing
        assert len(row_groups(x, p).members) == 1
        with torch.enable_grad():
            pol(x.select(p), _head)
        assert rec.history[-1]["recomputed_layers"] == 0 and rec.history[-1]["recomputed_blocks"] == 0
    # a budget for the whole batch: one micro-batch; kept rows only (a subset), never a row outside it
    rec.budget = int(resident + whole * 1.01)
    assert [p.tolist() for p in by_memory(x, rows, rec, True, "auto", vision_runs=True)] == \
        [[m for g in rg.members for m in g]]
    some = torch.tensor([4, 1, 7])
    assert sorted(torch.cat(by_memory(x, some, rec, True, "auto", vision_runs=True)).tolist()) == [1, 4, 7]
    # a budget below every group: each alone (its forward's plan then recomputes layers)
    rec.budget = int(resident + min(need) / 4)
    assert len(by_memory(x, rows, rec, True, "auto", vision_runs=True)) == 3
    # nothing to plan by: no budget, or no plan
    rec.budget = None
    assert by_memory(x, rows, rec, True, "auto", vision_runs=True) is None
    assert by_memory(x, rows, None, True, "auto", vision_runs=True) is None


def test_a_trainer_runs_one_micro_batch_per_group_under_a_small_budget_and_trains_the_same(tmp_path, syn_dir,
                                                                                          monkeypatch, dist_cleanup):
    """The engine's path (FSDP2 world of 1, fused loss, prompt sharing, gathered once): under a budget no group
    fits, every kept prompt group is a micro-batch of its own (never split, never dropped), and the losses,
    gradient norms and weights equal those of the same update in one micro-batch (fp32 summation order aside;
    both recompute every layer)."""
    import strive_engine.step as step_mod
    import strive_engine.update as update_mod

    tight = ["--parallel.memory_budget_gib=0.01"]
    one = _trainer(tmp_path / "one", syn_dir, extra=[*tight, "--parallel.micro_batch_size=100"])
    packed = _trainer(tmp_path / "packed", syn_dir, extra=tight)
    seen = []
    real = update_mod._micro_batches

    def spy(t, rb, rows):
        parts = real(t, rb, rows)
        seen.append((t is packed, rb, rows, parts))
        return parts

    monkeypatch.setattr(update_mod, "_micro_batches", spy)
    for step in (0, 1):   # the first step's learning rate is 0 (warm-up): the second one moves the weights
        a, b = step_mod.rl_step(one, step), step_mod.rl_step(packed, step)
        (_, _, rows_a, parts_a), (is_packed, rb, rows, parts) = seen[-2:]
        assert is_packed and [p.tolist() for p in parts_a] == [rows_a.tolist()]
        groups = row_groups(rb.inputs, rows).members
        assert [p.tolist() for p in parts] == groups and b["update/micro_batches"] == len(groups)
        assert a["update/micro_batches"] == 1 and b["memory/recomputed_layers"] == a["memory/recomputed_layers"] > 0
        for k in ("loss", "grad_norm", "rollout/logp_mismatch_mean"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (step, k)
    assert len(groups) == packed.cfg.variants.num_variants * packed.cfg.data.batch_size   # 2: the test means it
    for (n, p), q in zip(one.root.named_parameters(), packed.root.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode,threshold", [("split", None), ("masked", None), ("auto", 0), ("auto", 2_000)])
def test_split_shape_from_lengths_is_the_layout_choose_builds(mode, threshold, monkeypatch):
    """Random layouts (1-4 groups, prompts of 0-40 tokens, 1-4 answers of 0-12 tokens each, some prompts of one
    length): the key rows and the mask flag from the lengths equal the index tensors `choose` builds."""
    if threshold is not None:
        monkeypatch.setattr(split_attention, "MIN_SAVED_PAIRS", threshold)
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(60):
        U = int(torch.randint(1, 5, (1,), generator=g))
        prompts = torch.randint(0, 41, (U,), generator=g).tolist()
        if torch.rand(1, generator=g) < 0.3:
            prompts = [prompts[0]] * U
        answers = [torch.randint(0, 13, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(U)]
        Lg = -(-max(max(p + sum(a) for p, a in zip(prompts, answers)), 1) // 16) * 16
        segment = torch.full((U, Lg), -1, dtype=torch.long)
        for u, (p, a) in enumerate(zip(prompts, answers)):
            segment[u, :p] = 0
            at = p
            for k, n in enumerate(a, start=1):
                segment[u, at:at + n] = k
                at += n
        layout = split_attention.choose(segment, mode, CPU)
        got = split_attention.split_shape(prompts, answers, Lg, mode)
        want = None if layout is None else (layout.k_index.numel(), layout.mask is not None)
        assert got == want, (prompts, answers)
        kinds.add("none" if got is None else "mask" if got[1] else "grouped")
    assert kinds == ({"none"} if mode == "masked" else {"none", "mask", "grouped"})


def _two_ranks_worker(rank, out_dir):
    """Two RL steps on each rank of a gloo group (FSDP2 gathering per micro-batch), under one small budget (the
    start-up probe is a collective forward: every rank has the same budget). "packed" sizes micro-batches by memory:
    rank 0 finds room for one prompt group at a time (2 micro-batches), rank 1 is given room for all of them (one,
    as a rank with less resident memory would), so it must run a zero-weight micro-batch to match rank 0's
    collectives; "one" runs one micro-batch on both."""
    import os

    import strive_engine.step as step_mod
    from strive_engine.config import load_config
    from strive_engine.parallel import init_distributed
    from strive_engine.trainer import build_trainer
    from test_train import SMALL

    out = {}
    for run in ("packed", "one"):
        extra = ["--parallel.accumulate_unsharded=false", "--parallel.memory_budget_gib=0.01"]
        if run == "one":
            extra.append("--parallel.micro_batch_size=100")
        cfg = load_config([*SMALL, f"--data.synthetic_dir={os.path.join(out_dir, 'syn')}",
                           f"--run.output_dir={os.path.join(out_dir, run)}", *extra])
        t = build_trainer(cfg, init_distributed("gloo"))
        if rank == 1:
            t.policy.recompute.packing_free = lambda held=0: 1e15
        rows = [step_mod.rl_step(t, step) for step in (0, 1)]
        out[run] = {"micro": [r["update/micro_batches"] for r in rows], "loss": [r["loss"] for r in rows],
                    "params": [p.detach().to_local().clone() for p in t.root.parameters()]}
    return out


@pytest.mark.timeout(600)
def test_ranks_that_pack_different_micro_batch_counts_stay_in_step(tmp_path):
    """Each rank sizes its own micro-batches; the count is agreed (the most of any rank) and a rank with fewer runs
    zero-weight passes, so no rank waits on a collective the other does not make, and training equals the run in
    one micro-batch per rank (fp32 summation order aside)."""
    from sharded import run_ranks

    res = run_ranks(_two_ranks_worker, tmp_path)
    for r in res:
        assert r["packed"]["micro"] == [2, 2] and r["one"]["micro"] == [1, 1]
        assert r["packed"]["loss"] == pytest.approx(r["one"]["loss"], rel=1e-5, abs=1e-7)
        assert len(r["packed"]["params"]) > 10
        for a, b in zip(r["packed"]["params"], r["one"]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_fixed_size_that_splits_prompt_groups_is_named(tmp_path, syn_dir, caplog, dist_cleanup):
    """parallel.micro_batch_size not a multiple of G splits each group's rows across micro-batches (its prompt and
    video then run in each part): the trainer says so once, at build; a multiple of G or 0 says nothing."""
    import logging

    with caplog.at_level(logging.WARNING, logger="strive_engine.trainer"):
        _trainer(tmp_path / "three", syn_dir, extra=["--parallel.micro_batch_size=3"])   # SMALL: G = 2
    said = [r.getMessage() for r in caplog.records if "micro_batch_size" in r.getMessage()]
    assert len(said) == 1 and "micro_batch_size=3" in said[0] and "num_generations=2" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="strive_engine.trainer"):
        _trainer(tmp_path / "four", syn_dir, extra=["--parallel.micro_batch_size=4"])
        _trainer(tmp_path / "zero", syn_dir)
    assert not [r for r in caplog.records if "micro_batch_size" in r.getMessage()]


def test_the_packing_budget_counts_the_state_by_design(tmp_path, syn_dir, dist_cleanup):
    """What the packer subtracts from the budget is the update's state counted from sizes: every parameter shard,
    two AdamW moments and a gradient per trainable one (whole-size gradients and the weights gathered in the
    compute dtype while the update accumulates unsharded), the rollout batch and a reference model; the same before
    the first optimizer step and after it, whatever the allocator holds (so identical runs cut identical
    micro-batches)."""
    import strive_engine.step as step_mod
    from strive_engine.micro_batches import held_bytes

    t = _trainer(tmp_path / "t", syn_dir, extra=["--parallel.memory_budget_gib=1000"])
    rec = t.policy.recompute
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    every = [local(p) for p in t.root.parameters()]
    trained = [local(p) for p in t.params]
    nbytes = lambda ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    want = nbytes(every) + 3 * nbytes(trained)
    assert rec.state_bytes() == want and len(trained) > 10
    assert rec.packing_free(123) == rec.budget - want - 123
    rec.expect_unsharded_gradients(1)          # the update's window on a world of one: weights gathered whole
    gathered = sum(x.numel() for x in every) * rec.compute_bytes
    assert rec.state_bytes() == want + gathered
    rec.expect_unsharded_gradients(0)          # after the first backward: still the same
    assert rec.state_bytes() == want + gathered
    rec.expect_unsharded_gradients(None)
    for step in (0, 1):                        # AdamW's moments exist after the first step: nothing changes
        step_mod.rl_step(t, step)
        assert rec.state_bytes() == want and t.optim.optimizer.state
    x = rollout_batch(t.policy, t.tokenizer, "qwen2_5_vl")
    assert held_bytes(x) == nbytes([x.input_ids, x.attention_mask, x.completion_mask, x.pixel_values_videos,
                                    x.video_grid_thw, x.second_per_grid_ts, x.video_index])
    assert held_bytes(x, t.root) == held_bytes(x) + nbytes(every)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_packing_does_not_follow_what_else_is_allocated(tok_and_base):
    """On CUDA the memory plan reads the allocator; the packer does not: a 1 GiB tensor alive elsewhere (a
    prefetched video) changes the plan's resident count and not the micro-batches."""
    pol, tok, rec = _setup(tok_and_base, device=torch.device("cuda"))
    x = rollout_batch(pol, tok, "qwen2_5_vl").to("cuda")
    rows = torch.arange(x.num_rows)
    rg = row_groups(x, rows)
    need = [rec.activation_bytes(*forward_sizes(rg, [g], True, "auto")) for g in range(3)]
    pairs = [rec.activation_bytes(*forward_sizes(rg, p, True, "auto")) for p in ([0, 1], [1, 2])]
    assert max(need) < min(pairs)
    rec.budget = int(rec.state_bytes() + (max(need) + min(pairs)) / 2)      # one group at a time
    before, live = by_memory(x, rows, rec, True, "auto", vision_runs=True), rec.resident_bytes()
    junk = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    after = by_memory(x, rows, rec, True, "auto", vision_runs=True)
    assert rec.resident_bytes() >= live + 2**30
    assert [p.tolist() for p in after] == [p.tolist() for p in before] and len(before) == 3
    del junk
