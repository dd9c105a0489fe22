"""The update's micro-batches under FSDP2 with every weight gathered once per optimizer step and the gradients
reduced once (`parallel.accumulation`, `parallel.accumulate_unsharded`): the same training as FSDP2's default
(bitwise on a world of one; to fp32 rounding on two ranks), one gather and one reduce-scatter per group instead of
one per micro-batch, the memory plan's gradients counted once, and `auto`'s choice by world size and memory."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from strive_engine.config import ConfigError, load_config
from strive_engine.parallel import gathers_once, unsharded_extra_bytes
from test_train import _trainer, dist_cleanup  # noqa: F401  (dist_cleanup: a fixture)


def _spread_rewards(monkeypatch):
    """A random tiny model earns nothing: give the answers different rewards, so the update has a gradient."""
    import strive_engine.rewards as rewards_mod

    real = rewards_mod.compute_rewards

    def spread(*a, **k):
        out = real(*a, **k)
        out.reward.copy_(torch.arange(out.reward.numel(), dtype=out.reward.dtype).reshape(out.reward.shape) % 3)
        return out

    monkeypatch.setattr(rewards_mod, "compute_rewards", spread)


def test_configuration_of_accumulate_unsharded():
    """auto: on a world of one; on more ranks where holding everything whole takes at most a tenth of the memory
    budget (none on the CPU: no limit). The extra bytes per rank: whole weights (compute dtype) and fp32 gradients,
    less the fp32 shard gradients."""
    assert load_config([]).parallel.accumulate_unsharded == "auto"
    gib = 2**30
    assert gathers_once("auto", 1, 50 * gib, 10 * gib)                   # a world of one: always
    assert gathers_once("auto", 2, 1 * gib, 127 * gib)                   # a small model on two ranks
    assert not gathers_once("auto", 8, 20 * gib, 127 * gib)              # 3.75 B on eight GPUs: 24 GiB whole
    assert gathers_once("auto", 8, 20 * gib, None)                       # no budget (the CPU)
    assert gathers_once("true", 8, 20 * gib, 127 * gib) and not gathers_once("false", 1)
    shards = [torch.zeros(10), torch.zeros(5)]                           # 15 local elements of a world of 4
    assert unsharded_extra_bytes(shards, 4, 2) == 15 * (4 * (2 + 4) - 4)
    assert unsharded_extra_bytes(shards, 1, 2) == 15 * 2                 # one rank: the bf16 copy only
    with pytest.raises(ConfigError, match="parallel.accumulate_unsharded"):
        load_config(["--parallel.accumulate_unsharded=sometimes"])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["off", "bf16"])   # bf16: fp32 masters, gradients accumulated in fp32
def test_gathering_once_trains_bitwise_like_gathering_per_micro_batch(precision, tmp_path, monkeypatch, dist_cleanup):
    """A world of one, micro-batches of one row: two SFT steps, then three RL steps (the first at learning rate 0,
    the second moves the weights, the third's rollout must see them) with the weights gathered once per step and with
    FSDP2's default give bitwise the same metrics and weights, and every group is sharded again after each
    update (a group left gathered would hand the next rollout stale weights)."""
    import strive_engine.step as step_mod

    _spread_rewards(monkeypatch)
    syn = str(tmp_path / "syn")
    extra = ["--parallel.micro_batch_size=1", f"--parallel.mixed_precision={precision}"]
    once = _trainer(tmp_path / "once", syn, extra=[*extra, "--parallel.accumulate_unsharded=true"])
    each = _trainer(tmp_path / "each", syn, extra=[*extra, "--parallel.accumulate_unsharded=false"])
    fresh = {n: p.detach().full_tensor().clone() for n, p in once.root.named_parameters()}
    from strive_engine.sft import run_sft

    a, b = run_sft(once), run_sft(each)             # SFT too: one micro-batch, gathered for forward and backward
    assert {k: v for k, v in a.items() if k != "time/step"} == {k: v for k, v in b.items() if k != "time/step"}
    for step in range(3):
        a, b = step_mod.rl_step(once, step), step_mod.rl_step(each, step)
        assert a["data/kept_rows"] > 1        # several micro-batches per optimizer step
        for k in a:
            if not (k.startswith("time/") or k.startswith("rollout/engine_")):
                assert a[k] == b[k], (step, k)
        assert all(type(p).__name__ == "DTensor" for p in once.root.parameters())
    other = dict(each.root.named_parameters())
    moved = 0
    for n, p in once.root.named_parameters():
        assert torch.equal(p.detach().full_tensor(), other[n].detach().full_tensor()), n
        moved += not torch.equal(p.detach().full_tensor(), fresh[n])
    assert moved > 10


class _Collectives(TorchDispatchMode):
    """c10d collectives by name (what torch's CommDebugMode counts, without its module hooks)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            name = func.__name__.split(".")[0]
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class _CopiedBytes(TorchDispatchMode):
    """Bytes written by copy_ (FSDP2's gathers, reduce copy-ins and copy-outs are copies on a world of one)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] == "copy_":
            self.bytes += out.numel() * out.element_size()
        return out


@pytest.mark.slow
def test_gathering_once_copies_the_weights_once_per_optimizer_step(tmp_path, monkeypatch, dist_cleanup):
    """The bytes FSDP2 copies in one update: with the weights gathered once they do not grow with the number of
    micro-batches (one gather per optimizer step, one accumulate per micro-batch, one reduce); with FSDP2's
    default each micro-batch copies the weights again, in forward, in backward and in the reduce."""
    import strive_engine.step as step_mod
    import strive_engine.update as update_mod

    _spread_rewards(monkeypatch)
    t = _trainer(tmp_path / "t", str(tmp_path / "syn"))
    assert t.gather_once                            # auto on a world of one
    seen = {}
    real = step_mod.policy_update
    monkeypatch.setattr(step_mod, "policy_update", lambda *a, **k: seen.setdefault("args", (a, k)) and real(*a, **k))
    step_mod.rl_step(t, 0)                          # learning rate 0: the weights stay where they are
    (_, *args), kw = seen["args"]
    rows = int(args[3].sum())                       # row_keep
    assert rows >= 3
    param_bytes = sum(p.to_local().numel() * p.element_size() for p in t.params)
    copied = {}
    for mode in ("true", "false"):
        for mbs in (0, 1):                          # one micro-batch, or one per row
            t.cfg = dataclasses.replace(t.cfg, parallel=dataclasses.replace(t.cfg.parallel, micro_batch_size=mbs))
            t.gather_once = mode == "true"
            with _CopiedBytes() as c:
                update_mod.policy_update(t, *args, **kw)
            copied[mode, mbs] = c.bytes / param_bytes
    assert copied["true", 1] < copied["true", 0] + 0.5, copied         # not per micro-batch
    assert copied["false", 1] > copied["false", 0] + 2 * (rows - 1), copied  # >= 2 copies per extra micro-batch
    assert copied["true", 0] < copied["false", 0], copied               # one gather, not two, for one micro-batch


@pytest.mark.slow
def test_the_memory_plan_counts_unsharded_gradients_once(tmp_path, monkeypatch, dist_cleanup):
    """Under a budget the plan adds the gradients backward will still allocate. Gathered once, the shards' .grad
    stays None through the window while FSDP2's full-size accumulators exist: the first micro-batch counts them,
    the later ones do not (the allocator holds them), exactly as FSDP2's default counts its shard gradients."""
    import strive_engine.step as step_mod

    _spread_rewards(monkeypatch)
    pending = {}
    for mode in ("true", "false"):
        t = _trainer(tmp_path / mode, str(tmp_path / "syn"), extra=[
            "--parallel.micro_batch_size=1", "--parallel.memory_budget_gib=0.01",
            f"--parallel.accumulate_unsharded={mode}"])
        rec = t.policy.recompute
        assert rec.active and t.gather_once == (mode == "true")
        seen = pending[mode] = []
        real = rec.plan

        def plan(*a, rec=rec, real=real, seen=seen, **k):
            if torch.is_grad_enabled():
                seen.append(rec.pending_gradients())
            return real(*a, **k)

        monkeypatch.setattr(rec, "plan", plan)
        m = step_mod.rl_step(t, 0)
        total = sum(p.to_local().numel() * 4 for p in t.params)
        assert len(seen) == m["data/kept_rows"] >= 3
        assert seen == [total] + [0] * (len(seen) - 1), (mode, seen, total)
        assert rec.pending_gradients() == total     # the window closed, the optimizer stepped and freed them
    assert pending["true"] == pending["false"]


def _two_rank_worker(rank, out_dir):
    """One model per mode from one seed under FSDP2 (gloo), three micro-batches of rank-specific rows, one SGD
    step; the collectives each mode issues are counted."""
    from sharded import tiny_sharded_policy
    from strive_engine.parallel import accumulation
    from test_prompt_sharing import rollout_batch

    out = {}
    for precision, gather_once in ((p, g) for p in ("off", "bf16") for g in (True, False)):
        _, tok, pol, root = tiny_sharded_policy(out_dir, precision=precision)
        opt = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=1e-2)
        before = [p.detach().to_local().clone() for p in root.parameters()]
        with _Collectives() as comm:
            with accumulation(root, gather_once) as micro:
                for i in range(3):
                    micro(i == 2)
                    x = rollout_batch(pol, tok, "qwen2_5_vl", seed=3 * rank + i)
                    root(pol, x, lambda h, w, b: (h.double() @ w.double().t()).logsumexp(-1).sum()).backward()
        opt.step()
        out[precision, gather_once] = {
            "comm": comm.counts, "before": before,
            "params": [p.detach().to_local().clone() for p in root.parameters()],
            "sharded": all(type(p).__name__ == "DTensor" for p in root.parameters())}
    return out


@pytest.mark.timeout(300)
def test_two_ranks_gathering_once_reduce_once_and_train_the_same(tmp_path):
    """Two ranks, three micro-batches each: gathered once, every group is all-gathered and reduce-scattered once
    (FSDP2's default: three times each, plus the backward's gathers); the weights after the step equal the
    default's to fp32 rounding (the ranks' sums are added in another order), and every group is sharded again."""
    from sharded import run_ranks

    res = run_ranks(_two_rank_worker, tmp_path)
    for r, precision in ((r, p) for r in res for p in ("off", "bf16")):
        once, each = r[precision, True], r[precision, False]
        assert once["sharded"] and each["sharded"]
        gather = lambda c: sum(v for k, v in c.items() if "gather" in k)  # noqa: E731
        scatter = lambda c: sum(v for k, v in c.items() if "reduce_scatter" in k)  # noqa: E731
        groups = scatter(once["comm"])
        assert groups == 5, once["comm"]                      # 2 vision blocks, 2 decoder layers, the root
        assert gather(once["comm"]) == groups, once["comm"]
        assert scatter(each["comm"]) == 3 * groups, each["comm"]
        # forward: every group; backward: all but the root and the last decoder layer, kept after forward
        assert gather(each["comm"]) == 3 * groups + 3 * (groups - 2), each["comm"]
        moved = 0
        for a, b, p0 in zip(once["params"], each["params"], once["before"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            moved += not torch.equal(a, p0)
        assert moved > 0.9 * len(once["params"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_gathering_once_trains_like_the_default(tmp_path):
    """On CUDA (NCCL, a world of one, bf16 gathers and fp32 reduces as the engine runs): three micro-batches'
    gradients on the shards equal FSDP2's default (on the CPU bitwise), and every group is sharded again after the
    window. The bound is relative to each gradient's norm, 1e-3: SDPA's flash and memory-efficient backward add
    into dq with atomics, so two bf16 runs of the same mode may differ in a last bit (~1e-4 of a weight's gradient),
    while a micro-batch lost or counted twice moves it by about a third."""
    from sharded import tiny_sharded_policy
    from strive_engine.parallel import accumulation, destroy_distributed, init_distributed
    from test_prompt_sharing import rollout_batch

    env = init_distributed("auto")
    try:
        grads = {}
        for once in (True, False):
            _, tok, pol, root = tiny_sharded_policy(str(tmp_path), precision="bf16", device=str(env.device))
            with accumulation(root, once) as micro:
                for i in range(3):
                    micro(i == 2)
                    x = rollout_batch(pol, tok, "qwen2_5_vl", seed=i).to(env.device)
                    root(pol, x, lambda h, w, b: (h.float() @ w.float().t()).logsumexp(-1).sum()).backward()
            assert all(type(p).__name__ == "DTensor" for p in root.parameters())
            grads[once] = [p.grad.to_local().clone() for p in root.parameters() if p.grad is not None]
        assert len(grads[True]) == len(grads[False]) > 10
        for a, b in zip(grads[True], grads[False]):
            assert a.dtype == torch.float32
            assert float((a - b).norm()) <= 1e-3 * float(b.norm()) + 1e-7, (a - b).norm() / b.norm()
    finally:
        destroy_distributed()
