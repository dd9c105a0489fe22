"""Supervised warm start (the SFT stage of the Video-R1 recipe), chained before RL by `sft.steps > 0`.

Why it exists: the embedded default is a tiny Qwen2.5-VL with *random* weights. Pure RL from random weights
cannot discover the `<think>…</think><answer>…</answer>` format, let alone the answer, inside a CPU budget of
minutes: almost every group would have zero reward variance. Video-R1 itself runs SFT on its CoT data (the
`process` + `solution` fields) before RL; we do the same, on the canonical view (evenly spaced frames, full
frame), with teacher-forced cross-entropy on the target tokens.

    torchrun --nproc_per_node 2 -m strive_engine.sft [--sft.steps=200 ...]   # SFT only, then the HF export
    python -m strive_engine.sft --model.path=/ckpt --data.path=/data/cot.json   # one process
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from strive_engine.data import RecordLoader
from strive_engine.model import Policy, PolicyInputs
from strive_engine.parallel import all_reduce
from strive_engine.pipeline import decode_batch
from strive_engine.rollout import RolloutRequest, encode_prompts, second_per_grid
from strive_engine.tokenizer import special_token_ids
from strive_engine.variants import build_variants

log = logging.getLogger(__name__)


def canonical_indices(pool_size: int, num_frames: int) -> torch.Tensor:
    """(1, F) the canonical view's frames: uniform importance sampled at quantiles (j + 0.5)/F, i.e. the
    inverse CDF floor((j + 0.5) P / F) — the same frames as variant 0 of the keyframe sampler."""
    j = torch.arange(num_frames, dtype=torch.float64)
    return ((j + 0.5) * pool_size / num_frames).floor().long().clamp_max(pool_size - 1)[None]


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


def sft_lr_factor(i: int, s) -> float:
    """Multiplier of sft.lr at step i (0-based): linear warmup over the first 10% of the steps, then constant or
    a cosine to min_lr_ratio at the last step. The decay makes where SFT lands far less sensitive to the noise of
    the last few hundred steps (demo recipe, 600 steps, seeds 0/1/2 on the same data: held-out 0.53/0.88/0.89
    with a constant 1e-3, 0.87/0.92/0.96 with the cosine)."""
    warm = max(1, s.steps // 10)
    if i < warm:
        return (i + 1) / warm
    if s.schedule == "constant":
        return 1.0
    p = min(1.0, (i + 1 - warm) / max(1, s.steps - warm))
    return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def run_sft(t, records, log_fn=None, on_decoded=None) -> dict[str, Any]:
    """`t`: the step.Trainer of the run (its root/policy/source/config). Own AdamW (linear warmup, then cosine
    decay or constant: `sft_lr_factor`); the RL optimizer is untouched. A non-finite loss or gradient skips the
    optimizer step on every rank (counted: `nonfinite_skipped_updates/_total`). Metrics are global over ranks.
    `on_decoded(decoded)` sees each step's DecodedBatch (the run's skip tally). Returns the last step's metrics."""
    cfg = t.cfg
    s = cfg.sft
    params = t.params
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: sft_lr_factor(i, s))
    loader = RecordLoader(records, s.batch_size, t.env.rank, t.env.world_size, seed=cfg.run.seed + 7919)
    F_ = cfg.keyframes.num_frames
    device = t.env.device
    last: dict[str, Any] = {}
    skipped = 0  # optimizer steps skipped for a non-finite loss or gradient
    for step in range(s.steps):
        t0 = time.perf_counter()
        batch = loader.next_batch()
        decoded = decode_batch(batch, t.source, cfg.video.pool_frames)
        if on_decoded is not None:
            on_decoded(decoded)
        reqs, tgts, weights = [], [], []
        for rec, pool, ok in zip(batch, decoded.pools, decoded.valid.tolist()):
            P, H, W, _ = pool.frames.shape
            idx = canonical_indices(P, F_)
            box = torch.tensor([[0.0, 0.0, float(W), float(H)]])
            vb = build_variants(pool.frames, idx, box, cfg.variants)
            pix, grid = vb.split()[0]
            reqs.append(RolloutRequest(question=rec, pixel_values=pix, grid_thw=grid,
                                       second_per_grid_ts=second_per_grid(pool.timestamps[idx[0]], 2, pool.info.fps)))
            tgts.append(sft_target(rec))
            weights.append(1.0 if ok else 0.0)
        inputs = build_sft_inputs(t.policy, t.tokenizer, reqs, tgts, cfg.rollout.prompt).to(device)
        targets = inputs.targets()
        # zero weight for placeholder rows (bad videos): drop their tokens from the loss
        row_w = torch.tensor(weights).repeat_interleave(inputs.completion_mask[:, 1:].sum(1).cpu()).to(device)
        loss = t.root(t.policy, inputs, lambda h, w, b: masked_ce(h, w, b, targets, row_w))
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        # Every rank takes the same decision (the grad norm is global; the loss and the skipped-video count are
        # all-reduced): a rank-local NaN loss must not step some shards and not others.
        flags = all_reduce(torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0,
                                         float((~decoded.valid).sum())]))
        ok = bool(torch.isfinite(gn)) and flags[0].item() == 0
        if ok:
            opt.step()
        else:
            skipped += 1
        opt.zero_grad(set_to_none=True)
        sched.step()
        last = {"phase": "sft", "step": step, "loss": float(loss.detach()), "grad_norm": float(gn),
                "lr": sched.get_last_lr()[0], "data/skipped_videos": int(flags[1].item()),
                "nonfinite_skipped_updates": 0 if ok else 1, "nonfinite_skipped_total": skipped,
                "time/step": round(time.perf_counter() - t0, 4)}
        if log_fn is not None:
            log_fn(last)
    return last


def main(argv: list[str] | None = None) -> int:
    """SFT only: the trainer's set-up, `sft.steps` supervised steps, the HF export (train.py with run.steps=0)."""
    from strive_engine.train import main as train_main

    argv = sys.argv[1:] if argv is None else list(argv)
    return train_main([*argv, "--run.steps=0"])


if __name__ == "__main__":
    sys.exit(main())
