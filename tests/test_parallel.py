"""strive_engine.parallel's process set-up: the CUDA caching allocator's configuration (expandable segments unless
the user chose otherwise); FSDP2's bf16 mixed precision (on the CPU, a gloo world of 1): what reaches the root's
callable, and activation checkpointing's recompute under it."""
import dataclasses

import pytest
import torch

from strive_engine import parallel


def _allocator_settings() -> str | None:
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)   # torch >= 2.13
    return get() if get is not None else None


@pytest.fixture
def allocator_env(monkeypatch):
    """No allocator configuration in the environment; the process's allocator config restored afterwards."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    before = _allocator_settings()
    yield monkeypatch
    if before is not None:
        torch._C._accelerator_setAllocatorSettings(before or "expandable_segments:False")


def test_expandable_segments_unless_the_user_configured_the_allocator(allocator_env):
    assert parallel.configure_cuda_allocator() == "expandable_segments:True"
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"   # child processes inherit it
    settings = _allocator_settings()
    if settings is not None:                                   # torch 2.11 has no getter: the environment only
        assert "expandable_segments:True" in settings
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        allocator_env.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        allocator_env.setenv(name, "")                          # set, even empty: the user's choice stands
        assert parallel.configure_cuda_allocator() is None
        assert os.environ[name] == ""
        allocator_env.delenv(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_segments_are_expandable_after_init_distributed(allocator_env):
    """On CUDA the process's allocations come from expandable segments after the engine's set-up (also when CUDA
    was initialised before it, as earlier tests in this process may have done)."""
    env = parallel.init_distributed("auto")
    try:
        a = torch.empty(2**30, dtype=torch.uint8, device=env.device)
        b = torch.empty(2**30, dtype=torch.uint8, device=env.device)
        segments = [s for s in torch.cuda.memory_snapshot() if s["device"] == env.device.index]
        assert any(s.get("is_expandable", False) for s in segments), segments[:2]
        del a, b
    finally:
        parallel.destroy_distributed()


@pytest.fixture
def gloo_world():
    env = parallel.init_distributed("gloo")
    yield env
    parallel.destroy_distributed()


@dataclasses.dataclass
class _Pool:
    frames: torch.Tensor
    timestamps: torch.Tensor


def test_the_roots_callable_gets_its_arguments_untouched_under_bf16(tmp_path, gloo_world):
    """`root(fn, *args)` under bf16 mixed precision: fn receives the very objects passed, float64 timestamps
    included (FSDP2's input cast copied dataclasses and rounded their floats to bf16: 123.456 s -> 123.5 s), while
    the root's weights are still gathered in bf16."""
    from sharded import tiny_sharded_policy

    model, _, pol, root = tiny_sharded_policy(str(tmp_path), vision_depth=1, precision="bf16")
    pool = _Pool(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.tensor([0.0, 123.456, 300.7], dtype=torch.float64))
    seen = {}

    def fn(p, x):
        seen["pool"], seen["x"], seen["w"] = p, x, model.lm_head.weight.dtype
        return x.sum()

    root(fn, pool, torch.ones(3, dtype=torch.float64))
    assert seen["pool"] is pool and pool.timestamps.dtype == torch.float64
    assert pool.timestamps.tolist() == [0.0, 123.456, 300.7]
    assert seen["x"].dtype == torch.float64
    assert seen["w"] == torch.bfloat16


def test_recomputed_blocks_see_the_forwards_inputs_under_bf16(tmp_path, gloo_world, monkeypatch):
    """Every layer recomputed in backward gives the gradients of the plain backward, bitwise, under bf16 mixed
    precision. torch < 2.13's FSDP2 does not cast a block's inputs when it recomputes it (patched in here on newer
    torch): the vision blocks' fp32 rotary tables then differed from the forward's bf16 ones (2.11: 20 of 56
    gradients off) until the blocks cast their own float inputs (parallel._cast_float_inputs)."""
    from sharded import tiny_sharded_policy
    from test_prompt_sharing import rollout_batch

    from strive_engine.recompute import Recompute

    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        pytest.skip("this torch's FSDP2 internals moved")
    cast = getattr(FSDPState, "_cast_forward_inputs", None)
    if cast is not None:   # torch >= 2.13 casts in the recompute too: take that away, as torch 2.11 has it

        def no_cast_in_recompute(self, args, kwargs):
            return (args, kwargs) if self._training_state == TrainingState.PRE_BACKWARD else cast(self, args, kwargs)

        monkeypatch.setattr(FSDPState, "_cast_forward_inputs", no_cast_in_recompute)
    head = lambda h, w, b: (h.float() @ w.float().t()).logsumexp(-1).sum()  # noqa: E731
    grads = {}
    for mode in ("false", "true"):
        model, tok, pol, root = tiny_sharded_policy(
            str(tmp_path), precision="bf16",
            recompute=lambda m, md=mode: Recompute.build(m, md, 0.0, torch.device("cpu"), 2))
        calls = []
        model.model.visual.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        loss = root(pol, rollout_batch(pol, tok, "qwen2_5_vl", seed=0), head)
        loss.backward()
        assert len(calls) == (2 if mode == "true" else 1)   # "true": the block ran again in backward
        grads[mode] = {n: p.grad.to_local() for n, p in root.named_parameters() if p.grad is not None}
    assert grads["true"].keys() == grads["false"].keys() and any("visual.blocks" in n for n in grads["true"])
    differ = [n for n in grads["false"] if not torch.equal(grads["false"][n], grads["true"][n])]
    assert not differ, differ


def _agree(rank, out_dir):
    return {"mixed": parallel.all_agree(rank == 0), "all": parallel.all_agree(True), "none": parallel.all_agree(False)}


def test_ranks_agree_on_a_choice_only_when_every_rank_makes_it(tmp_path):
    """all_agree (gloo, two ranks): the update's gather-once choice, made per rank from its own shard sizes, is one
    choice for all ranks: true only where every rank says true."""
    from sharded import run_ranks

    got = run_ranks(_agree, tmp_path)
    assert got == [{"mixed": False, "all": True, "none": False}] * 2
