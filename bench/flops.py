"""FLOP and byte models of the RL step's stages and the ceilings they are measured against: the
implementation of the models written down in bench/throughput.py's docstring (matmul FLOPs, as
torch.utils.flop_counter counts them; tests/test_bench.py checks them against it on a real HF model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn


# ----------------------------------------------------------------------------------------------- shapes


def _linear_weights(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP/byte models need of a Qwen-VL model (read from the built HF model)."""

    params: int                 # every parameter (tied embeddings once)
    trainable: int              # parameters with requires_grad
    lm_linear: int              # P_lm
    head: int                   # P_head = V x H
    layers: int                 # L
    attn_width: int             # A = heads x head_dim
    kv_width: int               # kv_heads x head_dim
    vis_linear: int = 0         # P_vis (blocks)
    vis_patch: int = 0          # patch embedding weights (Conv3d)
    vis_merger: int = 0         # merger Linear weights
    vis_width: int = 0          # D
    vis_full_blocks: int = 0    # blocks with full attention (within each temporal patch)
    vis_window_blocks: int = 0  # blocks with window attention
    vis_window: int = 4         # window side in merged tokens
    vis_merge: int = 2          # spatial merge size
    vision_trained: bool = True

    def kv_bytes_per_token(self, elem: int) -> int:
        return 2 * self.layers * self.kv_width * elem


def model_shape(hf: nn.Module) -> ModelShape:
    """ModelShape of an HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (FSDP2-sharded or not: DTensor numel is global)."""
    inner = getattr(hf, "model", hf)
    lm = inner.language_model
    attn = lm.layers[0].self_attn
    head = hf.get_output_embeddings().weight
    seen, params, trainable = set(), 0, 0
    for p in hf.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    visual = getattr(inner, "visual", None)
    vc = getattr(hf.config, "vision_config", None)
    depth = len(getattr(visual, "blocks", []))
    full = getattr(vc, "fullatt_block_indexes", None)
    n_full = depth if full is None else len(full)
    window = getattr(vc, "window_size", 0) or 0
    patch = getattr(vc, "patch_size", 14)
    merge = getattr(vc, "spatial_merge_size", 2)
    return ModelShape(
        params=params, trainable=trainable, lm_linear=_linear_weights(lm.layers), head=head.numel(),
        layers=len(lm.layers), attn_width=attn.q_proj.out_features, kv_width=attn.k_proj.out_features,
        vis_linear=_linear_weights(getattr(visual, "blocks", None)),
        vis_patch=sum(p.numel() for n, p in visual.patch_embed.named_parameters() if n.endswith("weight"))
        if visual is not None else 0,
        vis_merger=_linear_weights(getattr(visual, "merger", None)),
        vis_width=getattr(vc, "hidden_size", 0) or 0, vis_full_blocks=n_full, vis_window_blocks=depth - n_full,
        vis_window=max(window // merge // patch, 1) if window else 0, vis_merge=merge,
        vision_trained=visual is not None and any(p.requires_grad for p in visual.parameters()))


# ------------------------------------------------------------------------------------------ FLOP models


def lm_flops(shape: ModelShape, seq_len: int) -> tuple[float, float]:
    """(linear, causal attention) forward FLOPs of the language model over one sequence of `seq_len` tokens."""
    return 2.0 * shape.lm_linear * seq_len, 2.0 * shape.layers * shape.attn_width * seq_len * seq_len


def head_flops(shape: ModelShape, scored: int) -> float:
    """Forward FLOPs of the logits for `scored` tokens."""
    return 2.0 * shape.head * scored


def _window_sides(n: int, w: int) -> list[int]:
    return [w] * (n // w) + ([n % w] if n % w else [])


def vision_flops(shape: ModelShape, grid: tuple[int, int, int]) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of the vision tower on one video of t x h x w patches."""
    t, h, w = (int(x) for x in grid)
    n = t * h * w
    m = shape.vis_merge
    linear = 2.0 * (shape.vis_patch + shape.vis_linear) * n + 2.0 * shape.vis_merger * n / (m * m)
    attn = shape.vis_full_blocks * t * 4.0 * (h * w) ** 2 * shape.vis_width
    if shape.vis_window_blocks:
        win = sum((a * b * m * m) ** 2 for a in _window_sides(h // m, shape.vis_window)
                  for b in _window_sides(w // m, shape.vis_window))
        attn += shape.vis_window_blocks * t * 4.0 * win * shape.vis_width
    return linear, attn


# -------------------------------------------------------------------------------------- work of a step


@dataclass
class CallRecord:
    """One Policy.forward (or vision tower) call as the bench saw it, on the host."""

    stage: str
    seq_lens: list[int] = field(default_factory=list)     # attention-mask tokens per row
    scored: list[int] = field(default_factory=list)       # completion tokens per row
    video_index: list[int] = field(default_factory=list)  # row -> video of this call
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    pixel_bytes: int = 0
    # when the call ran rows of one prompt as one sequence (strive_engine.prompt_sharing): per sequence, the
    # prompt's tokens and each completion's
    shared: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def forwarded(self) -> int:
        """Tokens the language model ran over."""
        if self.shared:
            return sum(p + sum(cs) for p, cs in self.shared)
        return sum(self.seq_lens)


def policy_call_flops(shape: ModelShape, rec: CallRecord) -> float:
    """Forward FLOPs of the language model and head for one Policy.forward call (vision counted apart). A shared
    prompt counts once; its attention counts the pairs its block mask allows (the prompt causal, each completion
    over the prompt and itself causal)."""
    if rec.shared:
        pairs = sum(p * p / 2 + sum(c * p + c * c / 2 for c in cs) for p, cs in rec.shared)
        lm = 2.0 * shape.lm_linear * rec.forwarded + 4.0 * shape.layers * shape.attn_width * pairs
    else:
        lm = sum(sum(lm_flops(shape, s)) for s in rec.seq_lens)
    return lm + head_flops(shape, sum(rec.scored))


def rollout_work(shape: ModelShape, rows: list[CallRecord], max_batch: int, elem: int,
                 whole_requests: bool = True) -> dict:
    """Prefill FLOPs and decode bytes of the rollout that produced `rows` (the old log-prob calls of the step:
    every rollout row once, request-major). A request = the rows of one video within a call. Generate calls as
    the backends cut them: whole requests, max(1, max_batch // G) per call (native engine), or max_batch rows
    cut anywhere (HF generate, whole_requests=False); max_batch 0 = one call."""
    prompts, comps, grids = [], [], []   # per request: prompt length, completion lengths of its rows, grid
    for rec in rows:
        by_video: dict[int, list[int]] = {}
        for m, v in enumerate(rec.video_index):
            by_video.setdefault(v, []).append(m)
        for v, ms in sorted(by_video.items()):
            prompts.append(rec.seq_lens[ms[0]] - rec.scored[ms[0]])
            comps.append([rec.scored[m] for m in ms])
            grids.append(rec.grids[v])
    flops = sum(sum(lm_flops(shape, p)) for p in prompts) + sum(sum(vision_flops(shape, g)) for g in grids)
    flops += 2.0 * (shape.lm_linear + shape.head) * sum(map(sum, comps))
    # decode: rows in request-major order, cut into generate calls
    row_req = [(r, c) for r, cs in enumerate(comps) for c in cs]
    size = max_batch or len(row_req) or 1
    if whole_requests and comps:
        size = max(1, size // len(comps[0])) * len(comps[0])
    kv = shape.kv_bytes_per_token(elem)
    weights = elem * (shape.lm_linear + shape.head)
    total_bytes, steps_total = 0.0, 0
    for lo in range(0, len(row_req), size):
        chunk = row_req[lo:lo + size]
        steps = max((c for _, c in chunk), default=0)
        reqs = {r for r, _ in chunk}
        prompt_kv = sum(prompts[r] for r in reqs) * kv
        own = sum(sum(min(t, c) for t in range(steps)) for _, c in chunk) * kv
        total_bytes += steps * (weights + prompt_kv) + own
        steps_total += steps
    return {"flops": flops, "bytes": total_bytes, "decode_steps": steps_total, "requests": len(prompts),
            "prompt_tokens_mean": sum(prompts) / max(len(prompts), 1)}


# --------------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """Matmul FLOP/s in `dtype` and device copy bytes/s (read + write), measured now on `device`.

    CUDA: an 8192^3 bf16 matmul and a 1 GiB copy, median of 10 after warm-up (CUDA events). CPU: a 1024^3
    matmul in the model's dtype and a 256 MiB copy (torch's threads) — the CPU model's own ceilings.
    """
    cuda = device.type == "cuda"
    n, copy_bytes, reps = (8192, 1 << 30, 10) if cuda else (1024, 1 << 28, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def timed(fn) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    mm = timed(lambda: torch.mm(a, b))
    cp = timed(lambda: dst.copy_(src))
    del a, b, src, dst
    if cuda:
        torch.cuda.empty_cache()
    return {"matmul_flops_per_s": 2.0 * n ** 3 / mm, "copy_bytes_per_s": 2.0 * copy_bytes / cp,
            "matmul_shape": n, "dtype": str(dtype).replace("torch.", ""), "device": device.type}
