"""Timing and memory helpers shared by the bench scripts. They run as `python bench/NAME.py`, which puts this
folder on sys.path, so `from _timing import ...` works from any of them."""
from __future__ import annotations

import resource
import statistics
import time

_SCALE = {"ms": 1e3, "us": 1e6}


def summarise(times_s: list[float], unit: str = "ms") -> dict:
    """Median and p20/p80 of wall times (seconds) in `unit` ("ms" or "us"), and the number of samples."""
    k = _SCALE[unit]
    q = statistics.quantiles(times_s, n=10) if len(times_s) >= 2 else times_s * 9
    return {f"median_{unit}": k * statistics.median(times_s), f"p20_{unit}": k * q[1], f"p80_{unit}": k * q[7],
            "reps": len(times_s)}


def emit(rec: dict, out: str = "") -> dict:
    """A bench's record: written to `out` when given, and printed as the last stdout line (one JSON object)."""
    import json
    from pathlib import Path

    if out:
        Path(out).write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec))
    return rec


def timeit(fn, reps: int, warmup: int = 1, sync=lambda: None, unit: str = "ms") -> dict:
    """Host wall time of fn() over `reps` calls after `warmup` ones; `sync` (e.g. torch.cuda.synchronize) ends
    each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return summarise(times, unit)


def cuda_time_us(fn, quick: bool) -> dict:
    """Device time of fn() with triton.testing.do_bench (median, p20, p80 in microseconds)."""
    import triton

    ms = triton.testing.do_bench(fn, warmup=10 if quick else 50, rep=50 if quick else 300, quantiles=[0.5, 0.2, 0.8])
    return {"median_us": 1e3 * ms[0], "p20_us": 1e3 * ms[1], "p80_us": 1e3 * ms[2]}


def host_time_us(fn, reps: int = 200, rounds: int = 5) -> dict:
    """Wall time per call of fn() issued back to back, one synchronize after each round of `reps` calls
    (median, p20, p80 over rounds, in µs): the larger of the host launch path and the device time, i.e.
    what a caller that does nothing else between calls pays. A sync inside fn() shows up here in full."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / reps)
    return summarise(times, "us")


def graph_time_us(calls, rounds: int = 4, reps: int = 30) -> dict:
    """Device time per call of µs-scale GPU work, free of host launch overhead (median, p20, p80 in µs).

    `calls`: callables doing the same work on different input sets (rotating among sets whose bytes
    together exceed the L2 cache keeps repeated calls from re-reading L2). Each is run once (compile,
    allocate) on a side stream, then `rounds` passes over all of them are captured into one CUDA graph,
    and the graph is replayed `reps` times between events: time per replay / calls per replay. The
    calls must not sync with the host. do_bench (cuda_time_us) instead records events around one eager
    call, so for work shorter than its Python launch path it times the host, not the GPU. If the capture
    fails, the eager do_bench numbers of the first call come back instead, with `graph_capture_failed`.
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                for fn in calls:
                    fn()
    except Exception as ex:  # noqa: BLE001 -- a capture failure must not lose the bench's other numbers
        torch.cuda.synchronize()
        eager = cuda_time_us(calls[0], True)
        return dict(eager, graph_capture_failed=repr(ex)[:300], input_sets=1)
    per_replay = rounds * len(calls)
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) * 1e-3 / per_replay for start, end in events]  # seconds per call
    del graph
    return dict(summarise(times, "us"), calls_per_replay=per_replay, input_sets=len(calls))


def sweep_point(measure) -> float | str:
    """median_us of one sweep configuration (`measure()` -> a graph_time_us dict), or why it has none: one
    tiling that fails to compile or capture must not lose the others."""
    try:
        r = measure()
    except Exception as ex:  # noqa: BLE001
        return f"error: {repr(ex)[:200]}"
    if "graph_capture_failed" in r:
        return f"eager {r['median_us']:.2f} (graph capture failed)"
    return r["median_us"]


def peak_extra_mb(fn) -> float:
    """CUDA memory allocated by one call of fn() beyond what was allocated before it, at its peak (MiB)."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rss_mb() -> float:
    """High-water resident set size of this process (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
