"""Benchmark of strive_kernels.variant_patchify: K=4 variants x 16 frames from a 720p pool of 32 frames.

    python bench/bench_variant_patchify.py [--quick] [--threads N]

CPU (always): the C++ op vs the pure-torch reference vs HF `Qwen2VLImageProcessorPil` (each output frame as
an image: HF's reference pipeline), per output frame, ratios measured in the same run. HF's
`Qwen2VLVideoProcessor` needs torchvision; it is reported as skipped when torchvision is not installed.
CUDA (when available): the CUDA op (target: all 64 output frames <= 2 ms on an H100/H200), plain torch on the
GPU (crop + interpolate(bicubic, antialias) + normalise + patchify per variant), HF's torchvision processor
with device="cuda" if torchvision exists, and the op's achieved GB/s against a measured device copy.
Times: median with p20/p80 over repetitions after warm-up. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import torch

from strive_engine.config import VariantConfig
from strive_engine.variants import sample_crop_boxes, variant_sizes
from strive_kernels.reference.variant import CLIP_MEAN, CLIP_STD, box_hull
from strive_kernels.variant import has_native, variant_patchify

from _timing import rss_mb, summarise, timeit

K, F, POOL, H, W = 4, 16, 32, 720, 1280


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def make_inputs(seed: int = 0):
    """Pool (32, 720, 1280, 3) uint8 with smooth content + noise, K index sets, crop boxes, output sizes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, H)[:, None]
    x = torch.linspace(0, 1, W)[None, :]
    base = torch.stack([x.expand(H, W), y.expand(H, W), (x * y)], -1) * 200
    noise = torch.randint(0, 56, (POOL, H, W, 3), generator=g, dtype=torch.uint8)
    pool = (base[None].to(torch.uint8) + noise).contiguous()
    cfg = VariantConfig()  # max_pixels = 256 * 28 * 28: a 720p frame -> 336 x 588 (the anchors' "448x448 pixels")
    boxes = sample_crop_boxes(K, H, W, cfg, g)
    indices = torch.stack([torch.linspace(0, POOL - 1, F).round().long()] +
                          [torch.randperm(POOL, generator=g)[:F].sort().values for _ in range(K - 1)])
    return pool, indices, boxes, variant_sizes(boxes, cfg)


def hf_crops(pool, indices, boxes, limit: int):
    """The (variant, frame) crops as HF receives images: uint8 HWC numpy arrays (views)."""
    crops = []
    for k in range(K):
        x0, y0, x1, y1 = box_hull(boxes[k].tolist())
        for f in indices[k].tolist():
            crops.append(pool[f, y0:y1, x0:x1].numpy())
    return crops[:limit]


def timeit_interleaved(fns: dict, reps: dict, warmup: int = 1) -> dict:
    """Time several implementations round-robin (one call each per round), so that all of them see the same
    background load on a shared machine; an implementation stops after its own number of repetitions."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(max(reps.values())):
        for name, fn in fns.items():
            if r < reps[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: summarise(ts, "ms") for name, ts in times.items()}


def bench_cpu(pool, indices, boxes, out_hw, quick: bool) -> dict:
    out_frames = K * F
    cfg = VariantConfig()
    fns = {"op": lambda: variant_patchify(pool, indices, boxes, out_hw, backend="native"),
           "reference": lambda: variant_patchify(pool, indices, boxes, out_hw, backend="reference")}
    res = {"threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}
    n_hf = 16 if quick else out_frames
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        proc = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        crops = hf_crops(pool, indices, boxes, n_hf)
        fns = {"op": fns["op"], "hf_pil": lambda: proc(images=crops, return_tensors="pt"),
               "reference": fns["reference"]}
    except ImportError as e:
        res["hf_pil"] = f"skipped: {e}"
    # peak host memory: ru_maxrss is a high-water mark, so measure in increasing order of expected peak
    rss = {}
    for name, fn in fns.items():
        before = rss_mb()
        fn()
        rss[name] = rss_mb() - before
    reps = {"op": 5 if quick else 15, "hf_pil": 3 if quick else 5, "reference": 2 if quick else 3}
    res.update(timeit_interleaved(fns, {name: reps[name] for name in fns}))
    for name in fns:
        res[name]["rss_highwater_increase_mb"] = rss[name]
    if "hf_pil" in fns:
        res["hf_pil"]["output_frames"] = n_hf
    per = {name: res[name]["median_ms"] / res[name].get("output_frames", out_frames) for name in fns}
    res["ms_per_output_frame"] = per
    res["speedup_vs_hf_pil"] = per["hf_pil"] / per["op"] if "hf_pil" in per else None
    res["speedup_vs_reference"] = per["reference"] / per["op"]
    res["hf_video_processor"] = ("skipped: Qwen2VLVideoProcessor needs torchvision"
                                 if importlib.util.find_spec("torchvision") is None else "not measured")
    return res


def torch_gpu_baseline(pool, indices, boxes, out_hw):
    """Plain torch on the GPU: per variant crop -> interpolate(bicubic, antialias) -> normalise -> patchify."""
    mean = torch.tensor(CLIP_MEAN, device=pool.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=pool.device)[:, None, None]
    outs = []
    for k in range(K):
        x0, y0, x1, y1 = box_hull(boxes[k].tolist())
        h, w = out_hw[k]
        video = pool[indices[k], y0:y1, x0:x1].permute(0, 3, 1, 2).float()  # (F, 3, hh, ww)
        video = torch.nn.functional.interpolate(video, size=(h, w), mode="bicubic", antialias=True)
        video = (video.clamp(0, 255).round() / 255 - mean) / std
        x = video.reshape(F // 2, 2, 3, h // 28, 2, 14, w // 28, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        outs.append(x.reshape(-1, 1176))
    return torch.cat(outs)


def bench_cuda(pool, indices, boxes, out_hw, quick: bool) -> dict:
    reps = 20 if quick else 100
    dev = torch.device("cuda")
    gpool = pool.to(dev)
    sync = torch.cuda.synchronize
    res = {"device": torch.cuda.get_device_name(dev)}
    hw = [tuple(v) for v in out_hw.tolist()]

    # device-to-device copy bandwidth (read + write) of a 1 GiB buffer
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), reps, warmup=3, sync=sync)
    res["copy_gbps"] = 2 * a.numel() / (t["median_ms"] * 1e-3) / 1e9
    del a, b

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res["op"] = timeit(lambda: variant_patchify(gpool, indices, boxes, hw, backend="native"), reps, warmup=3, sync=sync)
    res["op"]["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    res["op_bf16"] = timeit(lambda: variant_patchify(gpool, indices, boxes, hw, out_dtype=torch.bfloat16,
                                                     backend="native"), reps, warmup=3, sync=sync)
    # bytes: every variant reads its hull rows of its frames once and writes its output
    read = 0
    for k in range(K):
        x0, y0, x1, y1 = box_hull(boxes[k].tolist())
        read += len(set(indices[k].tolist())) * (y1 - y0) * (x1 - x0) * 3
    written = sum(F // 2 * (h // 14) * (w // 14) for h, w in hw) * 1176 * 4
    res["op"]["achieved_gbps"] = (read + written) / (res["op"]["median_ms"] * 1e-3) / 1e9
    res["op"]["fraction_of_copy_bw"] = res["op"]["achieved_gbps"] / res["copy_gbps"]

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gidx = indices.to(dev)
    res["torch_gpu"] = timeit(lambda: torch_gpu_baseline(gpool, gidx, boxes, hw), reps, warmup=3, sync=sync)
    res["torch_gpu"]["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    res["speedup_vs_torch_gpu"] = res["torch_gpu"]["median_ms"] / res["op"]["median_ms"]
    if importlib.util.find_spec("torchvision") is not None:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        cfg = VariantConfig()
        proc = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        crops = [torch.from_numpy(c.copy()).permute(2, 0, 1).to(dev) for c in hf_crops(pool, indices, boxes, K * F)]
        res["hf_cuda"] = timeit(lambda: proc(images=crops, return_tensors="pt", device="cuda"), max(3, reps // 10),
                                sync=sync)
        res["speedup_vs_hf_cuda"] = res["hf_cuda"]["median_ms"] / res["op"]["median_ms"]
    else:
        res["hf_cuda"] = "skipped: HF's CUDA image processor needs torchvision"
    res["target_ms"] = 2.0
    res["meets_target"] = res["op"]["median_ms"] <= 2.0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, HF on 16 of the 64 frames")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not has_native("cpu"):
        raise SystemExit("strive_kernels._C is not built: pip install --no-build-isolation -e .")
    pool, indices, boxes, out_hw = make_inputs()
    report = {
        "bench": "variant_patchify", "shape": f"K={K} x F={F} from a {POOL}-frame {H}x{W} pool",
        "out_hw": out_hw.tolist(), "boxes": boxes.tolist(), "quick": args.quick,
        "machine": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "native_cuda": has_native("cuda"),
    }
    report["cpu"] = bench_cpu(pool, indices, boxes, out_hw, args.quick)
    c = report["cpu"]
    per = c["ms_per_output_frame"]
    hf = (f"HF PIL {per['hf_pil']:.3f} -> {c['speedup_vs_hf_pil']:.1f}x HF (target >= 10), " if "hf_pil" in per
          else "HF PIL skipped -> ")
    print(f"CPU ({c['threads']} threads, load {c['load_average'][0]:.1f}), ms per output frame: op {per['op']:.3f}  "
          f"reference {per['reference']:.3f}  {hf}{c['speedup_vs_reference']:.1f}x reference (target >= 2)")
    if torch.cuda.is_available() and has_native("cuda"):
        report["cuda"] = bench_cuda(pool, indices, boxes, out_hw, args.quick)
        g = report["cuda"]
        print(f"CUDA {g['device']}: op {g['op']['median_ms']:.3f} ms for {K * F} frames (target <= 2), "
              f"{g['op']['achieved_gbps']:.0f} GB/s = {100 * g['op']['fraction_of_copy_bw']:.0f}% of copy, "
              f"{g['speedup_vs_torch_gpu']:.1f}x plain torch GPU")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
