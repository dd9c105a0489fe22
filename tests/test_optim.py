"""The optimizer step RL and SFT share: the learning-rate schedules, clipping, the skip on non-finite values, and a
schedule state that resumes without overriding the run's own schedule."""
import math

import pytest
import torch

from strive_engine.config import OptimConfig, SFTConfig
from strive_engine.optim import LRSchedule, TrainOptimizer


def test_rl_schedule_warmup_then_cosine_over_the_updates():
    """Linear warmup (i + 1) / w, then cosine from 1 at step w to min_lr_ratio one step past the last update."""
    s = LRSchedule.for_rl(OptimConfig(warmup_steps=5, schedule="cosine", min_lr_ratio=0.1), total_updates=105)
    assert [s(i) for i in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    for i in (17, 55, 104):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 5) / 100))
        assert s(i) == pytest.approx(want, rel=1e-15)
    assert s(104) > 0.1 and s(105) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    const = LRSchedule.for_rl(OptimConfig(warmup_steps=0, schedule="constant"), total_updates=10)
    assert [const(i) for i in (0, 5, 50)] == [1.0, 1.0, 1.0]


def test_sft_schedule_reaches_its_floor_at_the_last_step():
    s = LRSchedule.for_sft(SFTConfig(steps=600, schedule="cosine", min_lr_ratio=0.1))
    assert s(0) == pytest.approx(1 / 60) and s(59) == 1.0 and s(599) == pytest.approx(0.1)
    assert s(329) == pytest.approx(0.55)  # halfway through the decay (steps 59..599)


def _opt(total=10, clip=1.0):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    params = list(lin.parameters())
    sched = LRSchedule.for_rl(OptimConfig(warmup_steps=2, min_lr_ratio=0.1), total)
    return lin, TrainOptimizer.build(params, lr=0.1, schedule=sched, grad_clip=clip)


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_counted_and_the_schedule_goes_on(bad):
    lin, opt = _opt()
    before = [p.detach().clone() for p in opt.params]
    loss = lin(torch.randn(2, 4)).square().sum()
    loss.backward()
    if bad == "grad":
        opt.params[0].grad[0, 0] = float("inf")
    gn, ok = opt.step(loss * float("nan") if bad == "loss" else loss.detach())
    assert not ok and opt.nonfinite_skips == 1
    assert all(torch.equal(p, q) for p, q in zip(opt.params, before)) and all(p.grad is None for p in opt.params)
    assert not opt.optimizer.state and opt.lr == pytest.approx(0.1)  # warmup step 2 of 2: the schedule advanced
    loss = lin(torch.randn(2, 4)).square().sum()
    loss.backward()
    gn, ok = opt.step(loss)
    assert ok and opt.nonfinite_skips == 1 and math.isfinite(float(gn))
    assert not all(torch.equal(p, q) for p, q in zip(opt.params, before))


def test_clipping_bounds_the_update_and_reports_the_norm_before_it():
    lin, opt = _opt(clip=0.5)
    loss = 100 * lin(torch.randn(8, 4)).sum()
    loss.backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in opt.params))
    gn, ok = opt.step(loss)
    assert ok and float(gn) == pytest.approx(float(norm), rel=1e-6) and float(gn) > 0.5


def test_schedule_state_resumes_under_the_runs_own_schedule():
    """A resumed run keeps its position in the schedule but not the saved schedule itself: a run lengthened with
    --checkpoint.allow_changes=run.steps decays over its new length. (LambdaLR would save and restore the fields of
    a callable object; the schedule is passed as a plain function so it never does.)"""
    _, a = _opt(total=10)
    for _ in range(4):
        a.scheduler.step()
    state = a.state_dict()
    assert state["scheduler"]["lr_lambdas"] == [None] and state["nonfinite_skips"] == 0
    _, b = _opt(total=40)
    b.load_state_dict({**state, "nonfinite_skips": 3})
    assert b.nonfinite_skips == 3 and b.scheduler.last_epoch == 4
    b.scheduler.step()
    assert b.lr == pytest.approx(0.1 * b.schedule(5)) and b.schedule.decay_end == 40
    assert b.lr != pytest.approx(0.1 * a.schedule(5))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_fused_adamw_on_the_shards_steps_as_foreach(device):
    """AdamW over FSDP2's DTensor shards (a world of one): torch's fused step, which the engine takes on CUDA,
    gives the multi-tensor step's weights to fp32 rounding (with weight decay, clipping, three steps); the CPU
    keeps the multi-tensor step by default, CUDA takes the fused one."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from strive_engine.parallel import destroy_distributed, init_distributed

    init_distributed("gloo" if device == "cpu" else "auto")   # (on a GPU machine the "cpu" case stays on the CPU)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (1,))        # FSDP2's default mesh would be CUDA's wherever CUDA exists
        weights = {}
        for fused in (False, True, None):
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)
            fully_shard(m[0], mesh=mesh)
            fully_shard(m, mesh=mesh)
            start = [p.detach().full_tensor().cpu().clone() for p in m.parameters()]
            opt = TrainOptimizer.build(list(m.parameters()), lr=1e-2, schedule=LRSchedule(0, False, 1.0, 0, 1),
                                       grad_clip=0.5, weight_decay=0.1, fused=fused)
            assert all(type(p).__name__ == "DTensor" for p in opt.params)
            if fused is None:
                assert bool(opt.optimizer.defaults.get("fused")) == (device == "cuda")
            x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1)).to(device)
            for _ in range(3):
                loss = m(x).square().sum()
                loss.backward()
                assert opt.step(loss)[1]
            weights[fused] = [p.detach().full_tensor().cpu().clone() for p in m.parameters()]
        for a, b, s in zip(weights[True], weights[False], start):   # every seed-0 model starts from `start`
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert not torch.equal(b, s)                               # the steps moved every tensor
    finally:
        destroy_distributed()
