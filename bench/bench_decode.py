"""Benchmark of video ingestion: pools per decoder, decoded frames/s for a step's batch, and the whole ingestion
of a step (decode + keyframes + variants -> pixel_values_videos) per engine path against the HF path.

    python bench/bench_decode.py [--quick] [--cache DIR] [--threads N] [--seconds S] [--budget S]

Clips, generated in the same run (cached in --cache by their parameters): 720p (and 1080p without --quick)
H.264, VP9 (and HEVC without --quick), 30 fps, drawn by strive_engine.synthetic's Canvas with texture 40 and
grain 3 (realistic bitrates and motion); 6 s with --quick on CUDA, 10 s without, 4 s on a CPU-only machine.

Decoder paths (those that exist here): "nvdec" = what video.backend=auto builds on CUDA (NVDEC through FFmpeg,
NV12 converted like PyAV on the GPU), "dali" = video.backend=dali (DALI's NVDEC on CUDA, its CPU decoder for
VP9 otherwise), "pyav" = PyAVSource with `decode_workers` files at once (CPU), each through `read_batch`, as
`pipeline.decode_batch` calls it. Probe/scan caches are cleared before every timed call: a step meets new files.

1. pools: ms per P=64 pool of one clip, per path, and the HF baseline (PyAV decode + HF processor on the P frames).
2. throughput: decoded frames/s for a batch of 8 and of 32 videos of 720p H.264 (pool frames, and frames the
   decoder walked through: every frame up to the last one asked for).
3. ingestion: 8 videos of 720p H.264 through decode_batch + prepare_batch (random-weight scorer: 56x56 pixels ->
   random projection to D=1152; Triton keyframe kernel; native variant op, K=4 x F=16) per path, against the HF
   path as qwen-vl-utils runs it: per video, PyAV decode of the pool, then the HF Qwen2VL image processor on
   the K*F cropped frames (the same crops). Target: >= 10x the HF path (CUDA).

--budget (default 100 s with --quick on CUDA): later sections are skipped, and listed under "not_measured",
once the run would overrun it. DALI is optional. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from strive_engine.config import Config, KeyframeConfig, VariantConfig, VideoConfig  # noqa: E402
from strive_engine.data import VideoQA  # noqa: E402
from strive_engine.synthetic import Canvas  # noqa: E402
from strive_engine.variants import sample_crop_boxes  # noqa: E402
from strive_engine.video import PyAVSource, RoutingSource, build_source, sample_indices  # noqa: E402
from strive_kernels.reference.variant import box_hull  # noqa: E402

from _timing import rss_mb, timeit  # noqa: E402

P, K, F, BATCH, FPS, D = 64, 4, 16, 8, 30, 1152
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
ENCODERS = {  # codec -> (encoder, suffix, options)
    "h264": ("libx264", ".mp4", {"crf": "18", "preset": "veryfast"}),
    "vp9": ("libvpx-vp9", ".webm", {"crf": "24", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}),
    "hevc": ("libx265", ".mp4", {"crf": "20", "preset": "ultrafast", "x265-params": "log-level=error"}),
}
CLIP_VERSION = 3


class Budget:
    """Wall-clock budget of the run: `left()` seconds remain; `allows(s)` when a section of about s fits."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# -------------------------------------------------------------------------------------------- clips


def make_clips(cache: Path, sizes: list[str], codecs: list[str], seconds: float, threads: int) -> dict[str, str]:
    """{"720p/h264": path, ...}: each size rendered once and encoded with every codec; cached by parameters."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for res in sizes:
        w, h = SIZES[res]
        paths = {c: cache / f"v{CLIP_VERSION}_{res}_{seconds:g}s_{c}{ENCODERS[c][1]}" for c in codecs}
        out.update({f"{res}/{c}": str(p) for c, p in paths.items()})
        if all(p.exists() for p in paths.values()):
            continue
        t0 = time.perf_counter()
        canvas = Canvas(w, h, texture=40, noise=3, rng=np.random.default_rng(0))
        n = round(seconds * FPS)
        for slot, (kind, colour) in enumerate([("circle", "red"), ("square", "green"), ("triangle", "blue")]):
            canvas.add(kind, colour, slot, [(slot * n // 5, slot * n // 5 + n // 2)])
        tmp = {c: p.with_suffix(f".tmp{os.getpid()}{p.suffix}") for c, p in paths.items()}
        containers = {c: av.open(str(tmp[c]), "w") for c in paths}
        streams = {}
        for c, container in containers.items():
            encoder, _, options = ENCODERS[c]
            s = container.add_stream(encoder, rate=Fraction(FPS), options=dict(options))
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.codec_context.thread_count = threads
            streams[c] = s
        for t in range(n):
            frame = av.VideoFrame.from_ndarray(canvas.frame(t), format="rgb24")
            for c, s in streams.items():
                containers[c].mux(s.encode(frame))
        for c, s in streams.items():
            containers[c].mux(s.encode(None))
            containers[c].close()
            os.replace(tmp[c], paths[c])
        print(f"generated {res} clips ({', '.join(codecs)}; {seconds:g} s) in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return out


# ------------------------------------------------------------------------------------------ sources


def build_paths(threads: int, device: torch.device, report: dict) -> dict:
    """{path name: VideoSource} for the decoder paths that can run here (see the module docstring)."""
    cfg = VideoConfig(decode_threads=threads)
    paths = {}
    cuda = device.type == "cuda"
    if cuda:
        src = build_source(VideoConfig(backend="auto", decode_threads=threads), device)
        if isinstance(src, RoutingSource) and src.primary.name == "nvdec":
            paths["nvdec"] = src
        else:
            report["not_measured"].append(f"NVDEC via FFmpeg: video.backend=auto built {src!r}")
    try:
        paths["dali"] = build_source(VideoConfig(backend="dali", decode_threads=threads), device)
    except Exception as e:  # noqa: BLE001 - ImportError, or a DALI that cannot start here
        report["not_measured"].append(f"DALI ({device}): {type(e).__name__}: {e}")
    paths["pyav"] = PyAVSource(threads=threads, workers=max(cfg.decode_workers, BATCH if cuda else 1))
    return paths


def fresh(source) -> None:
    """Forget cached probes and scans: a training step meets files it has not seen."""
    for s in (source, getattr(source, "pyav", None), getattr(source, "primary", None)):
        for cache in ("_cache", "_scans"):
            if s is not None and hasattr(s, cache):
                getattr(s, cache).clear()
        fb = getattr(s, "fallback", None)
        if fb is not None and fb is not s:
            fresh(fb)


def skip_reason(src, path: str) -> str | None:
    """Why decoder path `src` does not take `path` here (DALI's CPU decoder and H.264, say), else None."""
    if isinstance(src, RoutingSource) and src.mode == "dali":
        codec = PyAVSource().probe(path).codec
        if not src.primary.can_decode(codec):
            return f"{src.primary.label} does not decode {codec}"
    return None


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = VariantConfig()
    return Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


# -------------------------------------------------------------------------------------------- pools


def bench_pools(clips: dict, paths: dict, device, quick: bool, sync, report: dict) -> dict:
    """ms per P=64 pool of each clip, per decoder path and for the HF baseline, side by side."""
    hf_pyav = PyAVSource(threads=2)
    try:
        proc = hf_processor()
    except ImportError as e:
        proc = None
        report["not_measured"].append(f"HF baseline: {e}")
    out = {}
    for clip, path in clips.items():
        row = {}
        for name, src in paths.items():
            if skip_reason(src, path):
                row[name] = f"n/a: {skip_reason(src, path)}"
                continue

            def pool(src=src):
                fresh(src)
                (v,) = src.read_batch([(path, None, P)], device=device)
                if not hasattr(v, "frames"):
                    raise v
            try:
                t = timeit(pool, 2, warmup=1, sync=sync)
            except Exception as e:  # noqa: BLE001 - one path failing must not lose the others
                row[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
                continue
            row[name] = dict(t, pool_frames_per_s=P / (t["median_ms"] / 1e3))
        if proc is not None and (not quick or clip == "720p/h264"):
            def hf():
                hf_pyav._cache.clear()
                return proc(images=list(hf_pyav.read(path, num_frames=P).frames.numpy()), return_tensors="pt")
            row["hf_baseline"] = timeit(hf, 1, warmup=0)
            row["speedup_vs_hf_baseline"] = {n: row["hf_baseline"]["median_ms"] / r["median_ms"]
                                             for n, r in row.items() if isinstance(r, dict) and "median_ms" in r
                                             and n != "hf_baseline"}
        out[clip] = row
        cells = "  ".join(f"{n} {r['median_ms']:.0f} ms" if isinstance(r, dict) else f"{n} {r}"
                          for n, r in row.items() if n != "speedup_vs_hf_baseline")
        print(f"pool P={P} {clip}: {cells}", flush=True)
    return out


def bench_throughput(path: str, paths: dict, device, sync, budget: Budget, report: dict) -> dict:
    """Decoded frames/s for a batch of 8 and of 32 videos (the same clip, P=64 each), per decoder path."""
    total = PyAVSource().probe(path).num_frames
    walked = max(sample_indices(total, P)) + 1  # frames a sequential decoder goes through per video
    out = {"clip": os.path.basename(path), "P": P, "frames_walked_per_video": walked}
    for b in (8, 32):
        row = {}
        for name, src in paths.items():
            if skip_reason(src, path):
                row[name] = f"n/a: {skip_reason(src, path)}"
                continue
            if not budget.allows(15 if b == 8 else 30):
                report["not_measured"].append(f"throughput batch {b} {name}: over the time budget")
                continue

            def batch(src=src):
                fresh(src)
                res = src.read_batch([(path, None, P)] * b, device=device)
                bad = [r for r in res if not hasattr(r, "frames")]
                if bad:
                    raise bad[0]
            try:
                t = timeit(batch, 1, warmup=1, sync=sync)
            except Exception as e:  # noqa: BLE001
                row[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
                continue
            s = t["median_ms"] / 1e3
            row[name] = dict(t, pool_frames_per_s=b * P / s, decoded_frames_per_s=b * walked / s)
        out[f"batch_{b}"] = row
        cells = "  ".join(f"{n} {r['decoded_frames_per_s']:.0f} fps" for n, r in row.items() if isinstance(r, dict))
        print(f"throughput, {b} videos x P={P} ({walked} frames walked each): {cells}", flush=True)
    return out


# ---------------------------------------------------------------------------------------- ingestion


class RandomScorer:
    """Stand-in frame scorer: 56x56 area-downscaled frames -> fixed random projection to D (bf16)."""

    def __init__(self, device, side: int = 56):
        g = torch.Generator().manual_seed(0)
        self.side, self.device = side, torch.device(device)
        self.proj = (torch.randn(3 * side * side, D, generator=g) / (3 * side * side) ** 0.5).to(self.device,
                                                                                                  torch.bfloat16)

    def embed_frames(self, frames):  # uint8 (P, H, W, 3) -> (P, D)
        x = frames.to(self.device).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(self.side, self.side), mode="area") / 255
        return x.reshape(x.shape[0], -1).to(torch.bfloat16) @ self.proj

    def embed_text(self, texts):  # B strings -> (B, D)
        g = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), D, generator=g).to(self.device, torch.bfloat16)


def hf_ingestion(records, cfg, proc):
    """The HF path for a batch, as qwen-vl-utils + the HF processor run it: per video, decode the pool with
    PyAV, then per variant the processor on its F cropped frames (uniform frames, the engine's crop boxes)."""
    pyav = PyAVSource(threads=2)
    gen = torch.Generator().manual_seed(0)
    crops, outs = {}, []
    for r in records:
        pyav._cache.clear()
        frames = pyav.read(r.path, num_frames=P).frames                             # (P, H, W, 3) uint8
        _, h, w, _ = frames.shape
        if (h, w) not in crops:
            crops[(h, w)] = sample_crop_boxes(K, h, w, cfg.variants, gen)
        for box in crops[(h, w)]:
            x0, y0, x1, y1 = box_hull(box.tolist())
            sel = frames[sample_indices(P, F), y0:y1, x0:x1].numpy()
            outs.append(proc(images=list(sel), return_tensors="pt"))
    return outs


def bench_ingestion(path: str, paths: dict, threads: int, device, quick: bool, budget: Budget, report: dict) -> dict:
    """A step's ingestion of BATCH videos of one clip per decoder path, against the HF path."""
    from strive_engine.pipeline import decode_batch, prepare_batch
    from strive_engine.views import ViewBuilder, VisionGeometry

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = Config(video=VideoConfig(pool_frames=P, decode_threads=threads), keyframes=KeyframeConfig(num_frames=F))
    records = [VideoQA(id=str(i), path=path, question=f"what happens in clip {i}?", options=(), answer="1",
                       solution="", problem_type="numerical", data_type="video", source=f"bench:{i}")
               for i in range(BATCH)]
    scorer = RandomScorer(device)
    views = ViewBuilder(VisionGeometry(patch=14, merge=2, temporal_patch=2), cfg.variants)  # Qwen2.5-VL's
    res = {"clip": os.path.basename(path), "batch": BATCH, "K": K, "F": F, "P": P, "device": str(device),
           "stages": "decode_batch + prepare_batch (keyframes: Triton, variants: native op)", "paths": {}}
    for name, src in paths.items():
        if skip_reason(src, path):
            res["paths"][name] = f"n/a: {skip_reason(src, path)}"
            continue
        if not budget.allows(25):
            report["not_measured"].append(f"ingestion {name}: over the time budget")
            continue

        def engine(src=src):
            fresh(src)
            decoded = decode_batch(records, src, P, device=device, log_errors=False)
            if not bool(decoded.valid.all()):
                raise RuntimeError(f"{name}: skipped {dict(decoded.skipped)}")
            return prepare_batch(decoded, scorer, views, cfg, seed=0)
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = timeit(engine, 1 if quick else 3, warmup=1, sync=sync)
            if cuda:
                t["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            res["paths"][name] = dict(t, source=repr(src))
        except Exception as e:  # noqa: BLE001
            res["paths"][name] = f"error: {type(e).__name__}: {str(e)[:300]}"
        got = res["paths"][name]
        print(f"ingestion {name}: {got if isinstance(got, str) else '%.0f ms' % got['median_ms']}", flush=True)
    if not budget.allows(10 * BATCH / 8):
        report["not_measured"].append("ingestion HF baseline: over the time budget")
        return res
    try:
        proc = hf_processor()
    except ImportError as e:
        report["not_measured"].append(f"HF baseline: {e}")
        return res
    rss0 = rss_mb()
    res["hf_baseline"] = timeit(lambda: hf_ingestion(records, cfg, proc), 1, warmup=0)
    res["hf_baseline"]["rss_highwater_increase_mb"] = rss_mb() - rss0
    hf_ms = res["hf_baseline"]["median_ms"]
    res["speedup_vs_hf_baseline"] = {n: hf_ms / r["median_ms"] for n, r in res["paths"].items() if isinstance(r, dict)}
    res["target_speedup"] = 10.0
    res["meets_target"] = {n: s >= 10.0 for n, s in res["speedup_vs_hf_baseline"].items()}
    cells = "  ".join(f"{n} {s:.1f}x" for n, s in res["speedup_vs_hf_baseline"].items())
    print(f"ingestion of {BATCH} videos (K={K} x F={F} from P={P}): HF path {hf_ms:.0f} ms; speed-up {cells} "
          f"(target >= 10)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="720p clips of 6 s, fewer repetitions, a time budget")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/strive_engine/bench_decode"),
                    help="folder for the generated clips (reused across runs)")
    ap.add_argument("--threads", type=int, default=2, help="decoder threads per file (video.decode_threads)")
    ap.add_argument("--seconds", type=float, default=0, help="clip length (default 10 CUDA, 6 quick, 4 CPU)")
    ap.add_argument("--budget", type=float, default=0, help="wall-clock budget in s (default 100 quick on CUDA)")
    ap.add_argument("--cpu-ingestion", action="store_true",
                    help="without CUDA, still run the ingestion section on the CPU (slow; checks the code path)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    budget = Budget(args.budget or (100 if args.quick and cuda else 1e9))
    seconds = args.seconds or (4 if not cuda else 6 if args.quick else 10)
    report = {"bench": "decode", "quick": args.quick, "seconds": seconds, "fps": FPS, "P": P,
              "machine": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "av": av.__version__,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
              "threads_per_file": args.threads, "budget_s": budget.seconds, "not_measured": []}
    try:
        import nvidia.dali

        report["dali"] = nvidia.dali.__version__
    except ImportError:
        report["dali"] = None
    sizes, codecs = (["720p"], ["h264", "vp9"]) if args.quick or not cuda else (["720p", "1080p"], list(ENCODERS))
    t0 = time.perf_counter()
    clips = make_clips(Path(args.cache), sizes, codecs, seconds, threads=max(2, (os.cpu_count() or 2) // 2))
    report["clip_generation_s"] = time.perf_counter() - t0
    report["clip_mbit_per_s"] = {c: os.path.getsize(p) * 8 / seconds / 1e6 for c, p in clips.items()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    paths = build_paths(args.threads, device, report)
    report["paths"] = {n: repr(s) for n, s in paths.items()}
    if cuda or args.cpu_ingestion:
        report["ingestion"] = bench_ingestion(clips["720p/h264"], paths, args.threads, device, args.quick, budget,
                                              report)
    else:
        report["not_measured"].append("whole ingestion: needs CUDA (or --cpu-ingestion)")
    report["throughput"] = bench_throughput(clips["720p/h264"], paths, device, sync, budget, report)
    if budget.allows(20):
        report["pools"] = bench_pools(clips, paths, device, args.quick, sync, report)
    else:
        report["not_measured"].append("pools per clip: over the time budget")
    report["wall_s"] = time.perf_counter() - budget.t0
    for line in report["not_measured"]:
        print("not measured:", line)
    print(f"bench_decode finished in {report['wall_s']:.0f} s", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
