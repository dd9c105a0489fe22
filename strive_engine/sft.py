"""Supervised warm start (the SFT stage of the Video-R1 recipe), chained before RL by `sft.steps > 0`.

Why it exists: the embedded default is a tiny Qwen2.5-VL with *random* weights. Pure RL from random weights
cannot discover the `<think>…</think><answer>…</answer>` format, let alone the answer, inside a CPU budget of
minutes: almost every group would have zero reward variance. Video-R1 itself runs SFT on its CoT data (the
`process` + `solution` fields) before RL; we do the same, on the canonical view (evenly spaced frames, full
frame; views.ViewBuilder.canonical), with teacher-forced cross-entropy on the target tokens.

SFT alone, then the HF export (a run of zero RL steps):

    torchrun --nproc_per_node 2 -m strive_engine.train --run.steps=0 [--sft.steps=200 ...]
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from strive_engine.data import RecordLoader
from strive_engine.optim import LRSchedule, TrainOptimizer
from strive_engine.parallel import accumulation, all_reduce
from strive_engine.pipeline import DecodedBatch, decode_batch
from strive_engine.policy import Policy, PolicyInputs
from strive_engine.rollout import RolloutRequest, encode_prompts
from strive_engine.tokenizer import special_token_ids
from strive_engine.trainer import Trainer


def sft_target(record) -> str:
    """`process` (a <think>…</think> rationale, when the data has one) followed by `solution`."""
    think = record.process.strip() or "<think></think>"
    return f"{think}{record.solution.strip()}"


def build_sft_inputs(policy: Policy, tokenizer, requests: list[RolloutRequest], targets: list[str],
                     style: str) -> PolicyInputs:
    """Prompt (left-padded) + target + eos (right-padded); completion_mask marks target and eos tokens."""
    ids = special_token_ids(tokenizer)
    prompts = encode_prompts(policy, tokenizer, requests, style)
    answers = [tokenizer(t, add_special_tokens=False)["input_ids"] + [ids["eos_token_id"]] for t in targets]
    Lp, La = max(map(len, prompts)), max(map(len, answers))
    R = len(requests)
    input_ids = torch.full((R, Lp + La), ids["pad_token_id"], dtype=torch.long)
    attn = torch.zeros(R, Lp + La, dtype=torch.long)
    comp = torch.zeros(R, Lp + La, dtype=torch.long)
    for r, (p, a) in enumerate(zip(prompts, answers)):
        input_ids[r, Lp - len(p):Lp] = torch.tensor(p)
        input_ids[r, Lp:Lp + len(a)] = torch.tensor(a)
        attn[r, Lp - len(p):Lp + len(a)] = 1
        comp[r, Lp:Lp + len(a)] = 1
    return PolicyInputs(input_ids=input_ids, attention_mask=attn, completion_mask=comp,
                        pixel_values_videos=torch.cat([q.pixel_values for q in requests]),
                        video_grid_thw=torch.stack([q.grid() for q in requests]),
                        second_per_grid_ts=torch.tensor([q.second_per_grid_ts for q in requests], dtype=torch.float32),
                        video_index=torch.arange(R))


def masked_ce(hidden, weight, bias, targets, token_w, chunk: int = 2048):
    """Weighted mean token cross-entropy; logits materialised `chunk` tokens at a time (SFT targets are short)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for lo in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[lo:lo + chunk], weight, bias).float()
        ce = F.cross_entropy(logits, targets[lo:lo + chunk], reduction="none")
        total = total + (ce * token_w[lo:lo + chunk]).sum()
    return total / token_w.sum().clamp_min(1.0)


def run_sft(t: Trainer, log_fn: Callable[[dict], None] | None = None,
            on_decoded: Callable[[DecodedBatch], None] | None = None) -> dict[str, Any]:
    """`sft.steps` supervised steps on the policy of `t` over its training records (t.loader.records), with a
    loader of its own (seed run.seed + 7919) and its own AdamW (LRSchedule.for_sft; the RL optimizer is
    untouched); clipping and the skip on a non-finite loss or gradient as in RL (optim.TrainOptimizer: counted in
    `nonfinite_skipped_updates/_total`). Metrics are global over ranks. `on_decoded(decoded)` sees each step's
    DecodedBatch (the run's skip tally). Returns the last step's metrics."""
    cfg = t.cfg
    s = cfg.sft
    opt = TrainOptimizer.build(t.params, lr=s.lr, schedule=LRSchedule.for_sft(s), grad_clip=cfg.optim.grad_clip)
    loader = RecordLoader(t.loader.records, s.batch_size, t.env.rank, t.env.world_size, seed=cfg.run.seed + 7919)
    device = t.env.device
    last: dict[str, Any] = {}
    for step in range(s.steps):
        t0 = time.perf_counter()
        decoded = decode_batch(loader.next_batch(), t.source, cfg.video.pool_frames, device=device)
        if on_decoded is not None:
            on_decoded(decoded)
        reqs = t.views.canonical(decoded.records, decoded.pools, cfg.keyframes.num_frames)
        inputs = build_sft_inputs(t.policy, t.tokenizer, reqs, [sft_target(r) for r in decoded.records],
                                  cfg.rollout.prompt).to(device)
        targets = inputs.targets()
        # zero weight for placeholder rows (bad videos): drop their tokens from the loss
        row_w = decoded.valid.float().repeat_interleave(inputs.completion_mask[:, 1:].sum(1).cpu()).to(device)
        with accumulation(t.root, t.gather_once) as micro:  # one micro-batch: gathered for forward and backward
            micro(True)
            loss = t.root(t.policy, inputs, lambda h, w, b: masked_ce(h, w, b, targets, row_w))
            loss.backward()
        gn, ok = opt.step(loss)
        skipped_videos = int(all_reduce(torch.tensor([float((~decoded.valid).sum())])).item())
        last = {"phase": "sft", "step": step, "loss": float(loss.detach()), "grad_norm": float(gn),
                "lr": opt.lr, "data/skipped_videos": skipped_videos,
                "nonfinite_skipped_updates": 0 if ok else 1, "nonfinite_skipped_total": opt.nonfinite_skips,
                "time/step": round(time.perf_counter() - t0, 4)}
        if log_fn is not None:
            log_fn(last)
    return last


if __name__ == "__main__":  # one training entry point (train imports this module, so this one cannot run it)
    print("strive_engine.sft is not an entry point: run SFT alone with `python -m strive_engine.train "
          "--run.steps=0` and the same options", file=sys.stderr)
    sys.exit(2)
