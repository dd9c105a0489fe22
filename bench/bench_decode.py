"""Benchmark of video ingestion: each decode backend per candidate pool, and the whole ingestion of a batch.

    python bench/bench_decode.py [--quick] [--cache DIR] [--threads N] [--seconds S]

Clips: 720p and 1080p, H.264 and VP9, 30 fps, 30 s on CUDA (10 s with --quick, 4 s on a CPU-only machine),
drawn by strive_engine.synthetic's Canvas with texture 40 and grain 3 (realistic bitrates and motion) and
encoded with libx264 (veryfast, crf 18, default GOP) and libvpx-vp9 (crf 24, realtime, cpu-used 8 for encoding
speed; decoding is what is measured), cached in --cache.

Pools: P=64 frames spread over each clip (`sample_indices`), per backend side by side: PyAV, DALI CPU (VP9
only), DALI NVDEC (CUDA), and the baseline users have today, PyAV decode + HF `Qwen2VLImageProcessorPil` on
the 64 frames (qwen-vl-utils style, sized by the engine's VariantConfig pixels). ms per pool (median, p20,
p80) and pool frames per second.

Ingestion (CUDA only): a batch of 8 videos (2 of each clip) through `pipeline.decode_batch` (the source
`video.backend=auto` builds) and `pipeline.prepare_batch` (random-weight scorer: 56x56 pixels -> random
projection to D=1152; Triton keyframe kernel; native variant op, K=4 x F=16) against the baseline: for each
video, PyAV decode of the pool + HF PIL processor on the K*F cropped frames (uniform frames, the same crops).
Target: >= 10x. "pyav_threads" also times the engine path with the 8 videos decoded by PyAV in a thread pool
(what PyAVSource.read_batch could do; not the engine's path today). DALI is optional: numbers that need it
are listed under "not_measured" when it is missing. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import concurrent.futures
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
from strive_engine.video import PyAVSource, build_source, sample_indices  # noqa: E402
from strive_kernels.reference.variant import box_hull  # noqa: E402

from _timing import rss_mb, timeit  # noqa: E402

P, K, F, BATCH, FPS, D = 64, 4, 16, 8, 30, 1152
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
ENCODERS = {  # codec -> (encoder, suffix, options)
    "h264": ("libx264", ".mp4", {"crf": "18", "preset": "veryfast"}),
    "vp9": ("libvpx-vp9", ".webm", {"crf": "24", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}),
}
CLIP_VERSION = 2


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# -------------------------------------------------------------------------------------------- clips


def make_clips(cache: Path, seconds: float, threads: int) -> dict[str, str]:
    """{"720p/h264": path, ...}: each size rendered once and encoded with both codecs; cached by parameters."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for res, (w, h) in SIZES.items():
        paths = {c: cache / f"v{CLIP_VERSION}_{res}_{seconds:g}s{suffix}" for c, (_, suffix, _) in ENCODERS.items()}
        out.update({f"{res}/{c}": str(p) for c, p in paths.items()})
        if all(p.exists() for p in paths.values()):
            continue
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        canvas = Canvas(w, h, texture=40, noise=3, rng=rng)
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
        print(f"generated {res} clips ({seconds:g} s) in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------------- timing


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = VariantConfig()
    return Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


# -------------------------------------------------------------------------------------------- pools


def bench_pools(clips: dict, threads: int, quick: bool, sync, report: dict) -> dict:
    """ms per P=64 pool for every backend that exists here, side by side, per clip."""
    pyav = PyAVSource(threads=threads)
    backends = {"pyav": lambda path: pyav.read(path, num_frames=P)}
    try:
        from strive_engine.video.dali import DALISource

        dali_cpu = DALISource("cpu", threads=threads)
        backends["dali_cpu"] = lambda path: dali_cpu.read(path, num_frames=P)
        if torch.cuda.is_available():
            dali_gpu = DALISource("cuda", threads=threads)
            backends["dali_nvdec"] = lambda path: dali_gpu.read(path, num_frames=P)
    except Exception as e:  # noqa: BLE001 - ImportError, or a DALI that cannot start here
        report["not_measured"].append(f"DALI pools (CPU and NVDEC): DALI unavailable ({type(e).__name__}: {e})")
    try:
        proc = hf_processor()
        backends["hf_baseline"] = lambda path: proc(images=list(pyav.read(path, num_frames=P).frames.numpy()),
                                                    return_tensors="pt")
    except ImportError as e:
        report["not_measured"].append(f"HF baseline: {e}")
    out = {}
    for clip, path in clips.items():
        codec = clip.split("/")[1]
        row = {}
        for name, fn in backends.items():
            if name == "dali_cpu" and codec not in ("vp9", "vp8", "mjpeg"):
                row[name] = "n/a: DALI decodes only VP8/VP9/MJPEG on the CPU"
                continue
            reps = 2 if quick or name == "hf_baseline" else 3
            t = timeit(lambda: fn(path), reps, warmup=1, sync=sync)
            t["pool_frames_per_s"] = P / (t["median_ms"] / 1e3)
            row[name] = t
        if isinstance(row.get("hf_baseline"), dict):
            row["speedup_vs_hf_baseline"] = {n: row["hf_baseline"]["median_ms"] / r["median_ms"]
                                             for n, r in row.items() if isinstance(r, dict) and n != "hf_baseline"}
        out[clip] = row
        cells = "  ".join(f"{n} {r['median_ms']:.0f} ms" for n, r in row.items()
                          if isinstance(r, dict) and "median_ms" in r)
        print(f"pool P={P} {clip}: {cells}", flush=True)
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


def bench_ingestion(clips: dict, threads: int, quick: bool, report: dict, dev: str = "cuda") -> dict:
    from strive_engine.pipeline import DecodedBatch, decode_batch, prepare_batch

    dev = torch.device(dev)
    cuda = dev.type == "cuda"
    cfg = Config(video=VideoConfig(pool_frames=P, decode_threads=threads), keyframes=KeyframeConfig(num_frames=F))
    paths = [clips[c] for c in sorted(clips)] * (BATCH // len(clips))
    records = [VideoQA(id=str(i), path=p, question=f"what happens in clip {i}?", options=(), answer="1",
                       solution="", problem_type="numerical", data_type="video", source=f"bench:{i}")
               for i, p in enumerate(paths)]
    source = build_source(cfg.video, dev)
    scorer = RandomScorer(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"source": repr(source), "batch": BATCH, "K": K, "F": F, "P": P, "device": str(dev)}

    def engine():
        decoded = decode_batch(records, source, P, device=dev, log_errors=False)
        return prepare_batch(decoded, scorer, cfg, seed=0)

    pool_exec = concurrent.futures.ThreadPoolExecutor(max_workers=min(BATCH, max(1, (os.cpu_count() or 2) // 2)))
    pyav = PyAVSource(threads=threads)

    def engine_threads():  # the same stages, with the 8 PyAV decodes running concurrently
        pools = list(pool_exec.map(lambda r: pyav.read(r.path, num_frames=P).to(dev, non_blocking=False), records))
        decoded = DecodedBatch(records, pools, torch.ones(len(records), dtype=torch.bool))
        return prepare_batch(decoded, scorer, cfg, seed=0)

    proc = hf_processor()
    gen = torch.Generator().manual_seed(0)
    crops = {}

    def baseline():  # per video, as a qwen-vl-utils + HF processor loop does it: decode, crop, process
        outs = []
        for r in records:
            frames = pyav.read(r.path, num_frames=P).frames                         # (P, H, W, 3) uint8
            _, h, w, _ = frames.shape
            if (h, w) not in crops:
                crops[(h, w)] = sample_crop_boxes(K, h, w, cfg.variants, gen)
            for k, box in enumerate(crops[(h, w)]):
                x0, y0, x1, y1 = box_hull(box.tolist())
                sel = frames[sample_indices(P, F), y0:y1, x0:x1].numpy()
                outs.append(proc(images=list(sel), return_tensors="pt"))
        return outs

    reps = 2 if quick else 4
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res["engine"] = timeit(engine, reps, warmup=1, sync=sync)
    if cuda:
        res["engine"]["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    res["engine_stages"] = "decode_batch + prepare_batch (keyframes: Triton, variants: native op)"
    res["pyav_threads"] = timeit(engine_threads, reps, warmup=1, sync=sync)
    rss0 = rss_mb()
    res["hf_baseline"] = timeit(baseline, 1 if quick else 2, warmup=0)
    res["hf_baseline"]["rss_highwater_increase_mb"] = rss_mb() - rss0
    res["speedup_vs_hf_baseline"] = res["hf_baseline"]["median_ms"] / res["engine"]["median_ms"]
    res["speedup_pyav_threads_vs_hf_baseline"] = res["hf_baseline"]["median_ms"] / res["pyav_threads"]["median_ms"]
    res["target_speedup"] = 10.0
    res["meets_target"] = res["speedup_vs_hf_baseline"] >= 10.0
    if cuda and "DALI" not in res["source"]:
        report["not_measured"].append("whole ingestion with DALI NVDEC decoding: DALI is not installed on this "
                                      "machine; the engine row used " + res["source"])
    pool_exec.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 s clips on CUDA, fewer repetitions")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/strive_engine/bench_decode"),
                    help="folder for the generated clips (reused across runs)")
    ap.add_argument("--threads", type=int, default=2, help="decoder threads per file (video.decode_threads)")
    ap.add_argument("--seconds", type=float, default=0, help="clip length (default 30 CUDA, 10 quick, 4 CPU)")
    ap.add_argument("--cpu-ingestion", action="store_true",
                    help="without CUDA, still run the ingestion part on the CPU (slow; checks the code path only)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    seconds = args.seconds or (4 if not cuda else 10 if args.quick else 30)
    report = {"bench": "decode", "quick": args.quick, "seconds": seconds, "fps": FPS, "P": P,
              "machine": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "av": av.__version__,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
              "threads_per_file": args.threads, "not_measured": []}
    try:
        import nvidia.dali

        report["dali"] = nvidia.dali.__version__
    except ImportError:
        report["dali"] = None
    clips = make_clips(Path(args.cache), seconds, threads=max(2, (os.cpu_count() or 2) // 2))
    report["clip_mbit_per_s"] = {c: os.path.getsize(p) * 8 / seconds / 1e6 for c, p in clips.items()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    report["pools"] = bench_pools(clips, args.threads, args.quick, sync, report)
    if cuda or args.cpu_ingestion:
        report["ingestion"] = bench_ingestion(clips, args.threads, args.quick, report, "cuda" if cuda else "cpu")
        g = report["ingestion"]
        print(f"ingestion of {BATCH} videos (K={K} x F={F} from P={P}): engine {g['engine']['median_ms']:.0f} ms, "
              f"PyAV in threads {g['pyav_threads']['median_ms']:.0f} ms, "
              f"HF baseline {g['hf_baseline']['median_ms']:.0f} ms -> {g['speedup_vs_hf_baseline']:.1f}x "
              f"(target >= 10)", flush=True)
    else:
        report["not_measured"].append("whole ingestion (decode + keyframes + variants) needs CUDA")
    for line in report["not_measured"]:
        print("not measured:", line)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
