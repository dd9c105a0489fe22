"""bench/throughput.py's human-readable report: the stage table of a record (fast vs reference), MFU, tokens
run, the rollout's parts and spread, memory, op counts, the profiled step and the rates. The record (JSON) is
throughput.py's; this only formats it."""
from __future__ import annotations

from _profile import format_stage_profile

from strive_engine.metrics import STAGES


def _rate(v: dict) -> str:
    if "fraction" not in v:
        return ""
    return f"{v['tflops_per_s']:.2f} TFLOP/s" if v["bound"] == "FLOPs" else f"{v['gb_per_s']:.1f} GB/s"


def table(fast: dict, ref: dict | None, stable: float) -> str:
    """The stage table (fast column, and the reference's when compared) and the lines under it."""
    c = fast["ceilings"]
    b = fast["backend"]
    lines = [f"rollout backend: {b['rollout']}{' (CUDA graph)' if b['cuda_graph'] else ''}; kernels: "
             f"{b['kernels']}{' vs reference' if ref else ''}; {fast['steps']} timed steps; ceilings ({c['device']}, "
             f"{c['dtype']}): matmul {c['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, copy "
             f"{c['copy_bytes_per_s'] / 1e9:.0f} GB/s",
             f"{'stage':<11} {'s':>8} {'spread':>7} {'share':>6}  {'bound':<20} {'achieved':>15} {'of ceil':>8} "
             f"{'peak GiB':>8}" + (f" {'ref s':>8} {'ratio':>6}" if ref else "")]
    for s in STAGES:
        if s not in fast["stages_s"]:
            continue
        v = fast["stages"].get(s, {"s": fast["stages_s"][s], "spread": 0.0, "share": 0.0, "bound": "disk"})
        frac = f"{100 * v['fraction']:.1f}%" if "fraction" in v else ""
        peak = f"{v['peak_gib']:.2f}" if "peak_gib" in v else ""
        row = (f"{s:<11} {v['s']:>8.4f} {100 * v['spread']:>6.1f}% {100 * v['share']:>5.1f}%  {v['bound']:<20} "
               f"{_rate(v):>15} {frac:>8} {peak:>8}")
        if ref:
            r = ref["stages_s"].get(s, 0.0)
            row += f" {r:>8.4f} " + (f"{r / v['s']:>5.2f}x" if v["s"] > 0 else f"{'-':>6}")
        lines.append(row)
    if "error" in fast.get("checkpoint", {}):
        lines.append(f"checkpoint save FAILED (not timed): {fast['checkpoint']['error']}")
    for k, v in fast["mfu"].items():
        lines.append(f"MFU {k:<22} {100 * v:>6.1f}%")
    run = {s: v for s, v in fast["stages"].items() if v.get("row_tokens")}
    if run:  # fewer than the rows' when prompts are shared (model.share_prompts)
        lines.append("tokens run / rows' tokens per step: " + ", ".join(
            f"{s} {v['tokens']:.0f} / {v['row_tokens']:.0f}" for s, v in run.items()))
    ro = fast["stages"].get("rollout", {})
    if ro.get("engine_ms"):
        e = ro["engine_ms"]
        # decode_ms times the steps after the warm-up one (on CUDA that step is timed apart, as warmup_step_ms)
        timed = e.get("decode_timed_steps", e.get("decode_steps", 0.0))
        per = e.get("decode_ms", 0.0) / max(timed, 1.0)
        lines.append("rollout parts (ms): " + ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in e.items()
                                                        if k.endswith("_ms")) +
                     f"; {e.get('decode_steps', 0):.0f} decode steps, {timed:.0f} of them in decode at {per:.3f} ms")
    halves = " / ".join(f"{x:.4f}" for x in fast.get("rollout_halves_s", []))
    lines.append(f"rollout over {fast['steps']} steps: spread {100 * ro.get('spread', 0):.1f}%, medians of the two "
                 f"halves {halves or '-'} s: " +
                 ("ok" if fast["rollout_repeatable"] else
                  f"noisy (the halves > {100 * stable:.0f}% apart, or < 4 steps): use more --steps or --max-steps")
                 + (f"; reference's rollout {ref['stages_s'].get('rollout', 0):.4f} s" if ref else ""))
    mem = fast["memory"]
    lines.append("memory: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}"
                                        for k, v in mem.items()))
    if "ops" in fast:
        where = "device->host reads" if fast["shape"]["device"].startswith("cuda") else \
            "host reads (CPU run: host bookkeeping included)"
        lines.append(f"ATen ops (not views) / {where}, one step: " + ", ".join(
            f"{s} {v['ops']}/{v['host_reads']}" for s, v in sorted(fast["ops"].items(), key=lambda kv: -kv[1]["ops"])))
        for s in ("update", "old_logp", "keyframes"):
            if s in fast.get("ops_top", {}):
                lines.append(f"  {s} most frequent: " + ", ".join(f"{n} {c}" for n, c in fast["ops_top"][s][:8]))
    if "profile" in fast:
        lines += format_stage_profile(fast["profile"], fast["shape"]["device"].startswith("cuda"))
    for k in ("step_s", "questions_per_s", "rollouts_per_s", "gen_tokens_per_s", "train_tokens_per_s",
              "update_seq_tokens_per_s"):
        row = f"{k:<24} {fast[k]:>10.3f}"
        if ref:
            ratio = ref[k] / fast[k] if k == "step_s" else fast[k] / ref[k]
            row += f"   reference {ref[k]:>10.3f}   speed-up {ratio:.2f}x"
        lines.append(row)
    return "\n".join(lines)
