"""The optimizer step shared by RL and SFT: AdamW, the learning-rate schedule, clipping, skip on non-finite.

    opt = TrainOptimizer.build(params, lr=cfg.optim.lr, schedule=LRSchedule.for_rl(cfg.optim, updates), ...)
    loss.backward()
    grad_norm, ok = opt.step(loss)        # clip, step (or skip and count), zero the grads, advance the schedule

A non-finite loss (on any rank) or gradient norm never reaches AdamW: the step is skipped on every rank and
counted (`nonfinite_skips`), the schedule advances as if it had run. Every rank takes the same decision: the
gradient norm is global already (clip_grad_norm_ over DTensor shards), the loss flag is all-reduced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from strive_engine.parallel import all_reduce


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the peak learning rate at optimizer step i (0-based): linear warmup (i + 1) / warmup over the
    first `warmup` steps, then constant, or a cosine from 1 at `decay_start` to `min_ratio` at `decay_end`
    (progress clamped to [0, 1])."""

    warmup: int
    cosine: bool
    min_ratio: float
    decay_start: int
    decay_end: int

    @classmethod
    def for_rl(cls, optim, total_updates: int) -> "LRSchedule":
        """`optim: OptimConfig`: optim.warmup_steps of warmup, then cosine to min_lr_ratio over the run's updates
        (the floor is reached one step past the last update) or constant."""
        return cls(optim.warmup_steps, optim.schedule == "cosine", optim.min_lr_ratio, optim.warmup_steps,
                   total_updates)

    @classmethod
    def for_sft(cls, sft) -> "LRSchedule":
        """`sft: SFTConfig`: warmup over the first 10% of the steps, then cosine to min_lr_ratio *at* the last step,
        or constant. The decay makes where SFT lands far less sensitive to the noise of the last few hundred steps
        (demo recipe, 600 steps, seeds 0/1/2 on the same data: held-out 0.53/0.88/0.89 with a constant 1e-3,
        0.87/0.92/0.96 with the cosine)."""
        warm = max(1, sft.steps // 10)
        return cls(warm, sft.schedule == "cosine", sft.min_lr_ratio, warm - 1, sft.steps - 1)

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / self.warmup
        if not self.cosine:
            return 1.0
        p = min(1.0, (i - self.decay_start) / max(1, self.decay_end - self.decay_start))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class TrainOptimizer:
    """AdamW over `params` with an LRSchedule, gradient clipping and the skip-on-non-finite step."""

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                 grad_clip: float):
        self.params = params
        self.optimizer = optimizer
        self.schedule = schedule
        # A plain function, not the schedule object: LambdaLR would save a callable object's fields with its state
        # and restore them on resume, overriding a schedule changed by --checkpoint.allow_changes=run.steps.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule(i))
        self.grad_clip = grad_clip
        self.nonfinite_skips = 0  # optimizer steps skipped for a non-finite loss or gradient norm

    @classmethod
    def build(cls, params: list[nn.Parameter], *, lr: float, schedule: LRSchedule, grad_clip: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
              fused: bool | None = None) -> "TrainOptimizer":
        """fused None: torch's fused AdamW (one pass over parameter, gradient and both moments; FSDP2's DTensor
        shards included) where every parameter is on CUDA, as torchtitan runs it; the multi-tensor ("foreach")
        path elsewhere, whose seven passes over the state read and write ~70 bytes per parameter against ~28
        (~40 ms of each gpu_3b optimizer step at 3.75 B parameters, estimated). The CPU keeps foreach: its
        results (and the demo's metrics) stay what they were."""
        if fused is None:
            fused = bool(params) and all(p.device.type == "cuda" for p in params)
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                **({"fused": True} if fused else {}))
        return cls(params, opt, schedule, grad_clip)

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.scheduler.get_last_lr()[0]

    def step(self, loss: Tensor) -> tuple[Tensor, bool]:
        """After backward: clip (grad_clip 0 = off) and step unless `loss` (on any rank) or the gradient norm is
        not finite. Returns (global gradient norm before clipping, whether the step was taken)."""
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        bad = all_reduce(torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0]), "max")
        ok = bool(torch.isfinite(gn)) and bad.item() == 0
        if ok:
            self.optimizer.step()
        else:
            self.nonfinite_skips += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return gn, ok

    def state_dict(self) -> dict:
        """What a checkpoint's trainer.json keeps (AdamW's tensors go through DCP)."""
        return {"scheduler": self.scheduler.state_dict(), "nonfinite_skips": self.nonfinite_skips}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.nonfinite_skips = state["nonfinite_skips"]
