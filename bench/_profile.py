"""Where one profiled step's time goes, stage by stage: the measured answer to "what bounds this stage".

`bench/throughput.py --profile` runs one more step under torch.profiler; every stage of it is a `stage/<name>`
record_function range (BenchTimer), and on CUDA the timer synchronises at both ends of a stage, so every kernel a
stage launched also ran inside its host range. `stage_profile(prof.events())` attributes

- each host event (ATen ops, runtime calls) by its start to the innermost stage range that holds it: ops launched
  and their self time;
- each device event (kernels, copies, memsets; CUDA-graph replays included, which no host op owns) by its device
  start, the same way: kernel time and count,

and reports per stage its wall time, device time, **busy = device time / wall** (near 1: the device bounds the
stage, and a kernel can win; near 0: the host does, and only fewer launches or syncs can), and the top kernels and
ops. Kernels on overlapping streams can make busy exceed 1. On the CPU there are no device events: wall and the
host ops only.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Iterable

STAGE = "stage/"


def _device_event(e: Any) -> bool:
    return str(getattr(e, "device_type", "")).split(".")[-1] != "CPU"


def stage_ranges(events: Iterable[Any]) -> list[tuple[float, float, str]]:
    """(start_us, end_us, stage) of every host-side stage range, sorted by start."""
    return sorted((e.time_range.start, e.time_range.end, e.name[len(STAGE):]) for e in events
                  if e.name.startswith(STAGE) and not _device_event(e))


def _innermost(t: float, ranges: list[tuple[float, float, str]]) -> str | None:
    """The stage whose range holds t and started last (stages nest, e.g. a sub-stage inside the update)."""
    best = None
    for start, end, name in ranges:
        if start > t:
            break
        if t < end:
            best = name
    return best


def stage_profile(events: Iterable[Any], top: int = 5) -> dict[str, dict]:
    """Per stage: wall_ms (summed over its ranges), device_ms, busy, kernels, host_ops (ATen calls, nested ones
    included: `--count-ops` counts launches), host_op_ms (self time of every host event), and the `top` kernels
    (by device ms) and ATen ops (by self host ms) as [name, ms] pairs. Events outside every stage are left out."""
    events = list(events)
    ranges = stage_ranges(events)
    annotations = {e.name for e in events if getattr(e, "is_user_annotation", False)} | {r[2] for r in ranges}
    acc: dict[str, dict] = defaultdict(lambda: {"wall_us": 0.0, "device_us": 0.0, "kernels": 0, "host_ops": 0,
                                                "host_op_us": 0.0, "k": Counter(), "o": Counter()})
    for start, end, name in ranges:
        acc[name]["wall_us"] += end - start
    for e in events:
        if e.name.startswith(STAGE) or e.name in annotations:
            continue
        stage = _innermost(e.time_range.start, ranges)
        if stage is None:
            continue
        a = acc[stage]
        if _device_event(e):
            dur = e.time_range.end - e.time_range.start
            a["device_us"] += dur
            a["kernels"] += 1
            a["k"][e.name] += dur
        else:
            a["host_op_us"] += e.self_cpu_time_total
            if e.name.startswith("aten::"):
                a["host_ops"] += 1  # every ATen call, composites and the ops they call (views too)
                a["o"][e.name[len("aten::"):]] += e.self_cpu_time_total
    out = {}
    for name, a in sorted(acc.items(), key=lambda kv: -kv[1]["wall_us"]):
        wall = a["wall_us"]
        out[name] = {"wall_ms": wall / 1e3, "device_ms": a["device_us"] / 1e3,
                     "busy": a["device_us"] / wall if wall > 0 else 0.0, "kernels": a["kernels"],
                     "host_ops": a["host_ops"], "host_op_ms": a["host_op_us"] / 1e3,
                     "top_kernels": [[k, round(v / 1e3, 4)] for k, v in a["k"].most_common(top)],
                     "top_ops": [[k, round(v / 1e3, 4)] for k, v in a["o"].most_common(top)]}
    return out


def format_stage_profile(prof: dict[str, dict], device: bool) -> list[str]:
    """Table lines: one per stage, then each stage's top kernel (device) or ops (host)."""
    lines = ["profiled step: stage       wall ms   device ms   busy  kernels ATen calls  top kernels (device) / ops (host)"]
    for name, p in prof.items():
        if device:
            what = ", ".join(f"{k[:48]} {v:.2f} ms" for k, v in p["top_kernels"][:2])
        else:
            what = ", ".join(f"{k} {v:.2f} ms" for k, v in p["top_ops"][:3])
        lines.append(f"  {name:<22}{p['wall_ms']:>10.2f}{p['device_ms']:>12.2f}{100 * p['busy']:>6.0f}%"
                     f"{p['kernels']:>9}{p['host_ops']:>10}   {what}")
    return lines
