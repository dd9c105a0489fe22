"""The benchmark scripts as users run them: bench/throughput.py end to end (tiny shapes, both backends, the
β>0 reference path) and bench/ablation.py's report from a saved record. Timings are not asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--data.batch_size=1", "--data.synthetic_size=24", "--data.synthetic_tasks=brief_colour,flash_count",
        "--video.pool_frames=8", "--keyframes.num_frames=4", "--variants.num_variants=2",
        "--rollout.num_generations=2", "--rollout.max_new_tokens=8", "--model.tiny_hidden_size=64",
        "--model.tiny_vision_hidden_size=32", "--video.backend=pyav"]


def _script(path, args, timeout=600, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, str(ROOT / path), *args], cwd=cwd, capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.mark.slow
def test_throughput_compare_with_kl_reference(tmp_path):
    syn = tmp_path / "syn"
    res = _script("bench/throughput.py", ["--steps", "1", "--warmup", "0", "--compare", "--no-save", *TINY,
                                          f"--data.synthetic_dir={syn}", "--algorithm.beta=0.05"])
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    for side in ("fast", "reference"):
        r = rec[side]
        assert set(r["stages_s"]) >= {"decode", "keyframes", "variants", "rollout", "old_logp", "ref_logp", "update"}
        assert r["stages_s"]["ref_logp"] > 0 and r["stages_s"]["update"] > 0
        assert r["rollouts_per_s"] > 0 and r["gen_tokens_per_s"] > 0
        # every update forwards prompt + video + completion tokens: more than the completion tokens alone
        assert r["update_seq_tokens_per_s"] > r["train_tokens_per_s"] > 0
        assert r["shape"] == {"B": 1, "K": 2, "G": 2, "F": 4, "P": 8, "max_new_tokens": 8, "device": "cpu"}
    assert rec["speedup_step"] == pytest.approx(rec["reference"]["step_s"] / rec["fast"]["step_s"])
    assert {"torch", "git_sha", "date", "cpu_count"} <= set(rec)
    assert "ref_logp" in res.stdout and "speed-up" in res.stdout


def test_ablation_report_from_saved_record(tmp_path, monkeypatch):
    """--from-json redraws the table and plot; the summary is recomputed from the per-step rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation", ROOT / "bench" / "ablation.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    monkeypatch.setattr(ab, "ROOT", tmp_path)

    def run(seed, acc, dead):
        return {"seed": seed, "steps": [0, 1, 2, 3], "reward": [1.0, 1.2, 1.1, 1.3], "accuracy": acc,
                "zero_var_chosen": dead, "zero_var_per_variant": [0.5, 0.5, None, 1.0], "adv_std": [1, 1, 1, 1],
                "heldout_accuracy": 0.5 + seed / 10}

    record = {"bench": "ablation", "date": "2000-01-01", "recipe": "debug_cpu", "steps": 4, "sft_steps": 1,
              "seeds": [0, 1], "K": 2, "G": 2, "extra": [],
              "runs": {"strive": [run(0, [0, 0, 1, 1], [0.0, 0.5, 0.5, 0.0]), run(1, [0, 1, 1, 0], [1, 1, 0, 0])]}}
    ab.report(record)
    saved = json.loads((tmp_path / "bench" / "results" / "ablation-2000-01-01.json").read_text())
    s = saved["summary"]["strive"]
    assert s["heldout"]["mean"] == pytest.approx(0.55)
    assert s["train_acc"]["values"] == [1.0, 0.5]            # mean over the last half of the steps
    assert s["dead_chosen"]["values"] == [0.25, 0.5]
    assert s["dead_per_variant"]["values"] == [pytest.approx(2 / 3)] * 2  # None rows are skipped
    assert (tmp_path / "bench" / "results" / "ablation-2000-01-01.png").stat().st_size > 1000


def _bench_module(name, monkeypatch):
    """bench/NAME.py imported as the script imports its helpers (bench/ on sys.path), with the CUDA timers
    replaced by stand-ins that run each callable once and record which inputs they were given."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    mod = importlib.import_module(name)
    seen = {"graph_sets": [], "eager": 0}

    def graph_time_us(calls, rounds=4, reps=30):
        outs = [fn() for fn in calls]
        seen["graph_sets"].append(outs)
        return {"median_us": 1.0, "p20_us": 1.0, "p80_us": 1.0, "reps": 0, "input_sets": len(calls)}

    def cuda_time_us(fn, quick):
        fn()
        seen["eager"] += 1
        return {"median_us": 2.0, "p20_us": 2.0, "p80_us": 2.0}

    def peak_extra_mb(fn):
        fn()
        return 0.0

    monkeypatch.setattr(mod, "graph_time_us", graph_time_us)
    monkeypatch.setattr(mod, "cuda_time_us", cuda_time_us)
    monkeypatch.setattr(mod, "peak_extra_mb", peak_extra_mb)
    return mod, seen


def test_keyframe_bench_wiring_on_cpu(monkeypatch):
    """The GPU branch of bench_keyframe.py run through the interpreter on tiny shapes: the device-time graph
    gets one call per input set, on different embeddings, and the kernel's indices equal the reference's."""
    mod, seen = _bench_module("bench_keyframe", monkeypatch)
    monkeypatch.setattr(mod, "SWEEP", ((16, 1), (0, 1)))  # 16 rows: two programs and the ticket; 0: invalid
    out = mod.bench_cuda(quick=True, sweep=True, B=2, P=20, D=24, device="cpu", sets=3)
    calls, swept = seen["graph_sets"]
    assert torch.equal(swept[0][0], calls[0][0])  # the tiling changes the schedule, not the indices
    assert out["sweep_device_graph"]["rows16_warps1"] == 1.0
    assert out["sweep_device_graph"]["rows0_warps1"].startswith("error: ")  # recorded, the others kept
    assert len(calls) == 3 and out["kernel_device_graph"]["input_sets"] == 3
    scores = [c[1] for c in calls]  # (indices, scores, importance) per input set
    assert not torch.equal(scores[0], scores[1]) and not torch.equal(scores[1], scores[2])
    assert out["indices_equal_reference"] and out["max_abs_score_diff"] < 1e-5
    assert out["meets_target"] and out["kernel_eager_do_bench"]["median_us"] == 2.0


def test_advantage_bench_wiring_on_cpu(monkeypatch):
    """Same for bench_advantage.py: per layout and mode a graph over the input sets, advantages close to fp64."""
    mod, seen = _bench_module("bench_advantage", monkeypatch)
    monkeypatch.setattr(mod, "MODES", ("joint", "batch_std"))
    fwd = mod.group_advantages_forward
    monkeypatch.setattr(mod, "group_advantages_forward",  # interpreter-sized tiles (the defaults are for GPUs)
                        lambda *a, **kw: fwd(*a, **{"block": 96, "halo": 16, "num_warps": 1, **kw}))
    monkeypatch.setattr(mod, "SWEEP", ((48, 8, 1, 2, 1), (48, 9, 1, 2, 1)))  # the second: window not a power of 2
    out = mod.bench_cuda(200, quick=True, sweep=True, device="cpu", sets=2)
    assert len(seen["graph_sets"]) == 2 * (2 + 1)  # layouts x (modes + the valid sweep point)
    for layout in ("dense_BKG", "ragged"):
        sw = out[layout]["sweep_joint_device_graph"]
        assert sw["win64_halo8_warps1_fin2x1"] == 1.0 and sw["win66_halo9_warps1_fin2x1"].startswith("error: ")
    for layout in ("dense_BKG", "ragged"):
        for mode in ("joint", "batch_std"):
            r = out[layout][mode]
            assert r["kernel_device_graph"]["input_sets"] == 2 and r["max_abs_diff_vs_fp64"] < 1e-5
    adv_a, adv_b = (c[0] for c in seen["graph_sets"][0])
    assert not torch.equal(adv_a, adv_b)  # two different reward sets


def test_gpu_table_lists_metrics_sweeps_and_errors(tmp_path):
    (tmp_path / "bench_keyframe.json").write_text(json.dumps({
        "bench": "keyframe_sample", "shape": {"B": 64}, "note": "not a metric",
        "kernel_device_graph": {"median_us": 20.5, "input_sets": 4},
        "sweep_device_graph": {"rows16_warps1": 18.25, "rows0_warps1": "error: ZeroDivisionError('a|b')"},
        "fwd_bwd": {"peer": {"error": "ImportError('liger')"}}}))
    (tmp_path / "bench_broken.json").write_text("Traceback (most recent call last):")
    res = _script("bench/gpu_table.py", [str(tmp_path)])
    rows = [line for line in res.stdout.splitlines() if line.startswith("| bench_")]
    assert "| bench_keyframe | kernel_device_graph.median_us | 20.5 |" in rows
    assert "| bench_keyframe | sweep_device_graph.rows16_warps1 | 18.25 |" in rows
    assert "| bench_keyframe | sweep_device_graph.rows0_warps1 | error: ZeroDivisionError('a/b') |" in rows
    assert "| bench_keyframe | fwd_bwd.peer.error | ImportError('liger') |" in rows
    assert "| bench_broken | (no JSON: see bench_broken.log) | |" in rows
    assert not any("shape" in r or "note" in r or "input_sets" in r for r in rows)
