"""The vision tower's attention: batched by segment length (strive_engine.vision_attention) vs transformers' loop.

    python bench/bench_vision.py                       # GPU: Qwen2.5-VL-3B's tower (32 blocks of 1,280, bf16)
    python bench/bench_vision.py --width 64 --videos 4 # CPU: the same geometry at a narrow width

The tower has the 3B model's geometry at any width: 32 blocks, full attention in blocks 7/15/23/31 and 112-pixel
windows in the others, over `--videos` videos of `--grid` patches (8 x 30 x 26 = the rollout bench's 16 frames at
420 x 364). Random weights. Both ways run in one process on the same tower and inputs; reported: median ms of a
no-grad forward (and of forward + backward with --backward), SDPA calls per forward, the max difference between
the two outputs. Last line: JSON.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _timing import emit, timeit  # noqa: E402


def median_ms(fn, reps: int) -> float:
    """Median wall ms of fn() over reps calls after one warm-up call, synchronised after each on CUDA."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return timeit(fn, reps, warmup=1, sync=sync)["median_ms"]


def count_sdpa_calls(fn) -> int:
    calls = [0]
    orig = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    F.scaled_dot_product_attention = spy
    try:
        fn()
    finally:
        F.scaled_dot_product_attention = orig
    return calls[0]


def main(argv=None) -> dict:
    import transformers
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    from strive_engine import vision_attention

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--grid", default="8,30,26", help="t,h,w in patches (h, w even)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward (the update's pass)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = transformers.Qwen2_5_VLConfig(vision_config=dict(
        depth=32, hidden_size=args.width, intermediate_size=args.width * 27 // 10, num_heads=args.heads,
        out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])).vision_config
    torch.manual_seed(0)
    with torch.device(device):
        tower = m.Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    grid = torch.tensor([[int(v) for v in args.grid.split(",")]] * args.videos, device=device)
    x = torch.randn(int(grid.prod(1).sum()), 3 * 2 * 14 * 14, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return tower(x, grid_thw=grid)

    def fwd_bwd():
        out = tower(x, grid_thw=grid)
        out = getattr(out, "pooler_output", out)
        out.float().square().mean().backward()

    rec = {"bench": "vision_attention", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": torch.cuda.get_device_name() if device.type == "cuda" else
        platform.processor() or "cpu", "dtype": str(dtype), "width": args.width, "videos": args.videos,
        "grid": args.grid, "patches": x.shape[0]}
    outs = {}
    for name in ("hf_loop", "segmented"):
        (vision_attention.install if name == "segmented" else vision_attention.uninstall)(tower)
        o = fwd()
        outs[name] = getattr(o, "pooler_output", o).float()
        rec[f"{name}_calls"] = count_sdpa_calls(fwd)
        rec[f"{name}_fwd_ms"] = median_ms(fwd, args.reps)
        if args.backward:
            rec[f"{name}_fwd_bwd_ms"] = median_ms(fwd_bwd, args.reps)
    rec["max_abs_diff"] = (outs["hf_loop"] - outs["segmented"]).abs().max().item()
    rec["fwd_speedup"] = rec["hf_loop_fwd_ms"] / rec["segmented_fwd_ms"]
    print(f"{'':16s}{'loop':>12s}{'segmented':>12s}")
    for key in ("calls", "fwd_ms") + (("fwd_bwd_ms",) if args.backward else ()):
        print(f"{key:16s}{rec['hf_loop_' + key]:12.1f}{rec['segmented_' + key]:12.1f}")
    print(f"forward {rec['fwd_speedup']:.2f}x; outputs differ by at most {rec['max_abs_diff']:.2e}")
    return emit(rec, args.out)


if __name__ == "__main__":
    main()
