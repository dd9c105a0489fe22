"""Benchmark of strive_kernels.group_advantages at the sizes the engine feeds it (B x K x G rewards per step).

    python bench/bench_advantage.py [--quick] [--n N]
    python bench/bench_advantage.py --engine-sizes    # only the public call vs the kernels at the engine's sizes

The engine normalises a few hundred to a few thousand rewards per step; the Triton path takes at most 65,536
(strive_kernels._backend.MAX_REWARDS). Two tables:

  engine sizes  the dense (B, K, G) layout from 4 x 4 x 8 = 128 to 128 x 4 x 16 = 8,192 rewards (one launch
                up to 2,048, then one program per 1,024 answers and the merge): the kernels' device time from
                CUDA-graph replays over two input sets (no host launch overhead), the public call with its
                default checks (none that read device data) with events around it (do_bench) and as
                back-to-back host wall time. Next to them, the same columns measured on an H200 before the
                kernel was resized (issue 16; the old kernel: 768-answer tiles with halos, a canonical
                recompute for long groups, a separate finalize, six tuning knobs), read from --baseline when
                the device name matches: "as fast" is the new kernel's device time <= 1.1 x the old one's.
                Issue 14's target is public call <= 2x the kernels' device time.
  --n layouts   dense (B, K, G) = (N / 16, 4, 4) and ragged questions of 1..64 answers with 1..4 variants, at N
                (default 65,536, the largest the Triton path takes): kernels' graph device time, the eager
                call, the public call without and with layout validation (one host sync), the pure-torch
                reference on the same GPU, achieved GB/s on the bytes moved (rewards fp32 + two int64 id
                arrays read, fp32 advantages written) against a device copy of the same bytes, peak extra
                memory, and the max |difference| to the fp64 reference.
CPU: a small batch through the Triton interpreter and the reference, only to show the path runs. Last stdout
line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton kernels are defined

import triton  # noqa: E402

from strive_kernels.advantage import group_advantages, group_advantages_forward  # noqa: E402
from strive_kernels.reference.advantage import group_advantages_reference  # noqa: E402

from _timing import cuda_time_us, graph_time_us, host_time_us, peak_extra_mb, timeit  # noqa: E402

MODES = ("joint", "per_variant", "batch_std")
# (B, K, G) of the engine's dense layout: 128 rewards (gpu_small / gpu_3b: 4 questions x 4 x 8) to 8,192
ENGINE_SIZES = ((4, 4, 8), (16, 4, 8), (64, 4, 8), (128, 4, 16))
# the old kernel's engine-size table on the H200 (2026-12-04, torch 2.11, triton 3.6): its last line is the JSON
BASELINE = Path(__file__).parent / "results" / "h200-2026-12-04b" / "bench_advantage_engine.log"


def make_layout(n: int, ragged: bool, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if ragged:
        sizes = torch.randint(1, 65, (n // 16 + 64,), generator=g)
        sizes = sizes[: int((sizes.cumsum(0) < n).sum()) + 1]
        sizes[-1] -= int(sizes.sum()) - n
        gid = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        nv = torch.randint(1, 5, (len(sizes),), generator=g)
        pos = torch.arange(n) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
        vid = pos * torch.repeat_interleave(nv, sizes) // torch.repeat_interleave(sizes, sizes)
    else:  # (B, K, G) = (n / 16, 4, 4)
        gid = torch.arange(n) // 16
        vid = (torch.arange(n) // 4) % 4
    r = (torch.rand(n, generator=g) < 0.4).float() + 0.5 * (torch.rand(n, generator=g) < 0.8).float()
    return r.to(device), gid.to(device), vid.to(device)


def bench_cuda(n: int, quick: bool, device: str = "cuda", sets: int = 4) -> dict:
    out = {"n": n}
    src = torch.empty(6 * n, dtype=torch.float32, device=device)  # 24 bytes per answer, like the kernel moves
    dst = torch.empty_like(src)
    copy = cuda_time_us(lambda: dst.copy_(src), quick)
    out["copy_24B_per_answer"] = dict(copy, GBps_read_write=2 * src.numel() * 4 / (copy["median_us"] * 1e-6) / 1e9)
    moved = 24 * n  # r (4) + g (8) + v (8) read, adv (4) written
    for layout in ("dense_BKG", "ragged"):
        inputs = [make_layout(n, layout == "ragged", device, seed=i) for i in range(sets)]
        r, g, v = inputs[0]
        res = {}
        for mode in MODES:
            kern = lambda: group_advantages_forward(r, g, v, mode, 1e-6)  # noqa: E731
            t = graph_time_us([lambda x=x: group_advantages_forward(*x, mode, 1e-6) for x in inputs],
                              2 if quick else 4)
            ref = lambda: group_advantages_reference(r, g, v, mode, 1e-6, validate=False)  # noqa: E731
            a, _ = kern()
            ra, _ = group_advantages_reference(r.double(), g, v, mode, 1e-6)
            res[mode] = {
                "kernel_device_graph": dict(t, GBps=moved / (t["median_us"] * 1e-6) / 1e9,
                                            peak_extra_MB=peak_extra_mb(kern)),
                "kernel_eager_do_bench": cuda_time_us(kern, quick),
                "public_call": cuda_time_us(lambda: group_advantages(r, g, v, mode=mode, backend="triton"), quick),
                "public_call_validated": cuda_time_us(  # the layout check reads the ids: one host sync
                    lambda: group_advantages(r, g, v, mode=mode, backend="triton", validate=True), quick),
                "reference": dict(cuda_time_us(ref, True), peak_extra_MB=peak_extra_mb(ref)),
                "max_abs_diff_vs_fp64": (a.double() - ra).abs().max().item(),
            }
            res[mode]["speedup_kernel_vs_reference"] = res[mode]["reference"]["median_us"] / t["median_us"]
        out[layout] = res
    return out


def load_baseline(path: Path, device_name: str) -> dict[int, dict]:
    """n -> the old kernel's engine-size row, when `path` holds a run on the same device (else {})."""
    try:
        last = json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}
    if last.get("device") != device_name:
        return {}
    return {row["n"]: row for row in last.get("engine_sizes", [])}


def engine_sizes(quick: bool, device: str = "cuda", sizes=ENGINE_SIZES, mode: str = "joint",
                 baseline: dict[int, dict] | None = None) -> list[dict]:
    """Public call vs the kernels alone on the dense (B, K, G) layout, per size (and the old kernel's numbers)."""
    rows = []
    for B, K, G in sizes:
        n = B * K * G
        sets = [make_layout(n, False, device, seed=i) for i in range(2)]
        gid = torch.arange(n, device=device) // (K * G)
        vid = (torch.arange(n, device=device) // G) % K
        sets = [(r, gid, vid) for r, _, _ in sets]

        def public(x=sets[0]):
            return group_advantages(*x, mode=mode)
        k = graph_time_us([lambda x=x: group_advantages_forward(*x, mode, 1e-6) for x in sets], 2 if quick else 4)
        pub = cuda_time_us(public, quick)
        host = host_time_us(public, 50 if quick else 200)
        row = {"B": B, "K": K, "G": G, "n": n, "kernel_device_graph_us": k["median_us"],
               "public_call_events_us": pub["median_us"], "public_call_host_us": host["median_us"],
               "ratio_events": pub["median_us"] / k["median_us"], "ratio_host": host["median_us"] / k["median_us"],
               "meets_2x": pub["median_us"] <= 2 * k["median_us"]}
        old = (baseline or {}).get(n)
        if old:
            row.update(before_kernel_us=old["kernel_device_graph_us"],
                       before_public_events_us=old["public_call_events_us"],
                       before_public_host_us=old["public_call_host_us"],
                       as_fast=k["median_us"] <= 1.1 * old["kernel_device_graph_us"])
        rows.append(row)
    return rows


def print_engine_sizes(rows: list[dict]) -> None:
    print(f"{'n':>6} {'kernels us':>11} {'public (events)':>16} {'public (host)':>14} {'<=2x':>5}"
          f" {'before: kernels':>16} {'public (events)':>16} {'(host)':>8} {'as fast':>8}")
    for r in rows:
        line = (f"{r['n']:>6} {r['kernel_device_graph_us']:>11.1f} {r['public_call_events_us']:>10.1f}"
                f" ({r['ratio_events']:.1f}x) {r['public_call_host_us']:>8.1f} ({r['ratio_host']:.1f}x)"
                f" {'yes' if r['meets_2x'] else 'NO':>5}")
        if "before_kernel_us" in r:
            line += (f" {r['before_kernel_us']:>16.1f} {r['before_public_events_us']:>16.1f}"
                     f" {r['before_public_host_us']:>8.1f} {'yes' if r['as_fast'] else 'NO':>8}")
        print(line)


def bench_cpu(quick: bool) -> dict:
    n = 512
    r, g, v = make_layout(n, True, "cpu")
    reps = 1 if quick else 3

    def timed(fn):
        return timeit(fn, reps, warmup=1, unit="us")

    a, _ = group_advantages_forward(r, g, v, "joint", 1e-6)
    ra, _ = group_advantages_reference(r.double(), g, v, "joint")
    return {"n": n, "triton_interpreter": timed(lambda: group_advantages_forward(r, g, v, "joint", 1e-6)),
            "reference": timed(lambda: group_advantages_reference(r, g, v, "joint")),
            "max_abs_diff_vs_fp64": (a.double() - ra).abs().max().item(),
            "note": "CPU: interpreter timing is not a speed measurement"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a short GPU run)")
    ap.add_argument("--n", type=int, default=65_536, help="number of rewards of the layout tables (GPU)")
    ap.add_argument("--sets", type=int, default=4, help="input sets the device-time graph rotates over (GPU)")
    ap.add_argument("--engine-sizes", action="store_true", help="only the public call vs kernels at engine sizes")
    ap.add_argument("--baseline", type=Path, default=BASELINE, help="the old kernel's engine-size run (its log)")
    args = ap.parse_args()
    report = {"bench": "group_advantages", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
        report["engine_sizes"] = engine_sizes(args.quick, baseline=load_baseline(args.baseline, report["device"]))
        print_engine_sizes(report["engine_sizes"])
        if not args.engine_sizes:
            report.update(bench_cuda(args.n, args.quick, sets=args.sets))
            for layout in ("dense_BKG", "ragged"):
                kern = {m: round(report[layout][m]["kernel_device_graph"]["median_us"], 1) for m in MODES}
                print(layout, args.n, kern, "us (kernels, device);",
                      {m: round(report[layout][m]["reference"]["median_us"]) for m in MODES}, "us (reference)")
    else:
        report["device"] = "cpu (" + platform.machine() + ")"
        report.update(bench_cpu(args.quick))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
