"""The benchmark scripts as users run them: bench/throughput.py end to end (tiny shapes, both backends, the
β>0 reference path) and bench/ablation.py's report from a saved record. Timings are not asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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


def _tracked_files_state() -> dict[str, tuple[int, int]] | None:
    """(mtime_ns, size) of the files git tracks where benches write records (bench/results, runs), or None outside
    a git checkout. (Not the whole tree: other people's edits of the source during the test are not the bench's.)"""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "bench/results", "runs"], cwd=ROOT, capture_output=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    state = {}
    for name in filter(None, out.decode().split("\0")):
        try:
            st = (ROOT / name).stat()
        except FileNotFoundError:
            continue
        state[name] = (st.st_mtime_ns, st.st_size)
    return state


@pytest.mark.slow
def test_throughput_compare_with_kl_reference():
    """Both backends end to end with the defaults a user gets, plus the old log-probs as their own forward (the
    default takes them from the update's forward when ppo_epochs = minibatches = 1; tests/test_train.py): the
    record goes to runs/bench (ignored by git), no tracked file changes, every device stage is explained (bound,
    rate, fraction of this run's ceilings), MFU in both definitions, a profiler trace of one more step names the
    stages."""
    before = _tracked_files_state()
    with tempfile.TemporaryDirectory() as tmp:
        syn = Path(tmp) / "syn"
        res = _script("bench/throughput.py", ["--steps", "2", "--warmup", "0", "--compare", "--profile",
                                              "--count-ops", *TINY,
                                              f"--data.synthetic_dir={syn}", "--algorithm.beta=0.05",
                                              "--algorithm.old_logp_forward=true"])
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    # the fast column also on a line of its own, printed before the reference run started (a time limit that cuts
    # the reference run keeps it)
    first = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("{")))
    assert first["partial"] == "fast column only" and first["fast"] == rec["fast"]
    assert res.stdout.count("rollout backend:") == 2                      # its table too, then both columns'
    for side in ("fast", "reference"):
        r = rec[side]
        assert set(r["stages_s"]) >= {"decode", "keyframes", "variants", "rollout", "old_logp", "ref_logp", "update",
                                      "checkpoint"}
        assert r["stages_s"]["ref_logp"] > 0 and r["stages_s"]["update"] > 0
        assert r["rollouts_per_s"] > 0 and r["gen_tokens_per_s"] > 0
        # every update forwards prompt + video + completion tokens: more than the completion tokens alone
        assert r["update_seq_tokens_per_s"] > r["train_tokens_per_s"] > 0
        assert r["shape"] == {"B": 1, "K": 2, "G": 2, "F": 4, "P": 8, "max_new_tokens": 8, "device": "cpu"}
        c = r["ceilings"]
        assert c["device"] == "cpu" and c["dtype"] == "float32" and c["matmul_flops_per_s"] > 1e9
        for s in ("rollout", "old_logp", "ref_logp", "update", "optimizer", "variants"):
            st = r["stages"][s]
            assert st["bound"] in ("FLOPs", "bytes") and 0 < st["fraction"] < 1, (s, st)
            assert st["floor_s"] == pytest.approx(st["fraction"] * sum(st["s_steps"]) / 2, rel=1e-6)
            assert len(st["s_steps"]) == 2 and st["s"] == pytest.approx(sum(st["s_steps"]) / 2)
        assert r["stages"]["update"]["bound"] == "FLOPs" and r["stages"]["optimizer"]["bound"] == "bytes"
        assert r["stages"]["reward"]["bound"] == "host: Python" and "fraction" not in r["stages"]["reward"]
        # update = 3 x the reference's forward on the same rows (vision trained, so both run the tower); the
        # old log-probs reuse the rollout's visual tokens: the same rows without the vision tower
        up, old, ref = (r["stages"][s]["flops"] for s in ("update", "old_logp", "ref_logp"))
        assert up == pytest.approx(3 * ref, rel=1e-9)
        assert 0 < old < ref
        assert r["stages"]["rollout"]["decode_steps"] >= 1 and r["stages"]["rollout"]["requests"] == 2
        # the native engine's parts of the rollout stage fit inside it; the host's rest (prompts, positions,
        # detokenising) is what remains
        e = r["stages"]["rollout"]["engine_ms"]
        assert list(e)[:2] == ["prefill_ms", "first_token_ms"] and e["decode_steps"] >= 1 and e["decode_ms"] > 0
        assert e["decode_timed_steps"] == e["decode_steps"]   # no warm-up step timed apart off CUDA
        assert 0 < e["host_ms"] < 1e3 * r["stages"]["rollout"]["s"]
        assert r["mfu"]["update_PT"] > 0 and r["mfu"]["update_model"] == r["stages"]["update"]["fraction"]
        assert r["backend"]["kernels"] == ("auto" if side == "fast" else "reference")
        assert sum(v["share"] for v in r["stages"].values()) < 1.05
        ops = r["ops"]  # --count-ops: one more step, per stage
        assert {"keyframes", "rollout", "old_logp", "update", "optimizer"} <= set(ops)
        assert ops["update"]["ops"] > ops["old_logp"]["ops"] > 0 and ops["optimizer"]["host_reads"] >= 0
        prof = r["profile"]  # --profile: the profiled step's stages, its ops attributed to them
        assert {"rollout", "old_logp", "update", "optimizer"} <= set(prof)
        assert prof["update"]["host_ops"] > prof["optimizer"]["host_ops"] > 0 and prof["update"]["wall_ms"] > 0
        # peak memory: per stage it is the CUDA allocator's (BenchTimer), so on the CPU no stage claims one (not a 0
        # that reads as measured) and the record has the process's peak RSS instead, in GiB
        assert [s for s, st in r["stages"].items() if "peak_gib" in st] == []
        mem = r["memory"]
        assert not {"peak_gib", "reserved_gib", "allocator", "state_gib"} & set(mem), mem
        assert 0.05 < mem["peak_rss_gib"] < 64, mem
    assert rec["speedup_step"] == pytest.approx(rec["reference"]["step_s"] / rec["fast"]["step_s"])
    assert {"torch", "git_sha", "date", "cpu_count"} <= set(rec)
    assert "ref_logp" in res.stdout and "speed-up" in res.stdout and "rollout backend:" in res.stdout
    assert "rollout parts (ms): prefill" in res.stdout
    assert "peak GiB" in res.stdout and "memory: peak_rss_gib" in res.stdout  # the column, blank here, and the RSS
    assert "ATen ops (not views)" in res.stdout and "profiled step:" in res.stdout and "update most frequent" in res.stdout
    # the record and the traces went to runs/bench, which git ignores; no tracked file changed
    written = [Path(p) for p in rec["written_to"]]
    assert written == [ROOT / "runs" / "bench" / "throughput.jsonl"]
    traces = [Path(rec[side]["trace"]) for side in ("fast", "reference")]
    assert all(p.parent == ROOT / "runs" / "bench" for p in traces) and traces[0] != traces[1]
    assert all("stage/update" in p.read_text() and "stage/rollout" in p.read_text() for p in traces)
    for p in traces:
        p.unlink()  # ~10 MB each
    if before is not None:
        after = _tracked_files_state()
        changed = [f for f in set(before) | set(after) if before.get(f) != after.get(f)]
        assert not changed, f"the bench changed tracked files: {changed}"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(written[0])], cwd=ROOT).returncode
        assert ignored == 0


def test_timed_steps_are_added_until_the_rollout_median_repeats(monkeypatch):
    """--max-steps: after --steps timed steps the loop adds steps, up to the cap, until the medians of the two
    halves of the rollout's times agree within 10 % of the whole's median (a spread, max - min, would only grow);
    stationary times stop it at --steps, a drifting stage runs to the cap, a cap of 0 keeps --steps exactly, and
    the step indices run on without a gap. rl_step and the shape recorder are stand-ins."""
    import types

    import strive_engine.step

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib

    tp = importlib.import_module("throughput")
    assert tp.repeats([1.0, 1.05, 0.98, 1.02]) and not tp.repeats([1.0, 1.0, 1.2, 1.2])
    assert not tp.repeats([1.0, 1.0, 1.0])                                # fewer than 4: no two halves of 2
    assert tp.repeats([1.0, 5.0, 1.0, 1.0, 1.0, 1.0])                     # one outlier: the medians still agree
    assert tp._halves([1.0, 2.0, 3.0, 4.0, 5.0]) == [1.5, 4.0]

    class Recorder:
        def __init__(self, policies, timer):
            pass

        def collect(self):
            return [], []
    monkeypatch.setattr(tp, "WorkRecorder", Recorder)
    t = types.SimpleNamespace(policy=None, reference=None, timer=None)

    def run(times, steps, max_steps):
        seen = []

        def rl_step(trainer, step, batches):
            seen.append(step)
            return {"time/rollout": times[step - 2] if step >= 2 else 50.0}  # 2 warm-up steps: not timed
        monkeypatch.setattr(strive_engine.step, "rl_step", rl_step)
        rows, works, _ = tp._trainer_step_loop(t, None, None, 2, steps, None, iter(()), max_steps=max_steps)
        assert len(works) == len(rows) and seen == list(range(2 + len(rows)))
        return [r["time/rollout"] for r in rows]

    steady = [1.0, 1.02, 0.99, 1.01, 1.0, 1.03, 0.98, 1.0, 1.01, 1.0]
    drift = [1.0 + 0.1 * i for i in range(10)]                            # every half later than the first
    noisy_start = [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert len(run(steady, 4, 10)) == 4
    assert len(run(drift, 4, 10)) == 10
    assert len(run(drift, 4, 0)) == 4                                     # off: exactly --steps
    got = run(noisy_start, 4, 10)                                         # stops at the first count that repeats
    assert tp.repeats(got) and not any(tp.repeats(noisy_start[:n]) for n in range(4, len(got)))


def test_throughput_refuses_a_max_steps_without_two_halves():
    """--max-steps under 4 (or under --steps) is refused with a message naming it, before anything is built."""
    res = subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--steps", "2", "--max-steps", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--max-steps must be 0 (off) or >= max(--steps, 4), got 3" in res.stderr


def test_op_counter_counts_launches_and_host_reads_per_stage(monkeypatch):
    """--count-ops' counter: non-view ATen ops and host reads, attributed to the timer's current stage."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib

    tp = importlib.import_module("throughput")
    timer = tp.BenchTimer(sync=False)
    counter = tp.OpCounter(timer)
    with counter:
        with timer("keyframes"):
            a = torch.ones(6)                      # ones
            b = (a.view(2, 3) + 1).t()             # add (view and t are views: not launches)
            float(b.sum())                         # sum, _local_scalar_dense (a host read)
        with timer("update"):
            (a * 2).nonzero()                      # mul, nonzero (a host read: its size)
        torch.zeros(1)                             # outside any stage
    assert counter.record() == {"keyframes": {"ops": 4, "host_reads": 1}, "update": {"ops": 2, "host_reads": 1},
                                "other": {"ops": 1, "host_reads": 0}}


def test_bench_timer_keeps_each_stages_peak_cuda_memory(monkeypatch):
    """BenchTimer's per-stage peak (the record's stages[s]["peak_gib"] on CUDA), with the allocator's counters
    faked (no GPU here): reset on entering a stage, read on leaving it, the largest over a stage's entries kept;
    the reserved peak is the largest of all."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib

    tp = importlib.import_module("throughput")
    mem = {"now": 0, "peak": 0, "reserved": 0}

    def use(nbytes):  # allocate then free nbytes: only the peak keeps it
        mem["peak"] = max(mem["peak"], mem["now"] + nbytes)
        mem["reserved"] = max(mem["reserved"], mem["now"] + nbytes + 512)

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: mem.update(peak=mem["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: mem["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: mem["reserved"])
    timer = tp.BenchTimer(sync=False)
    timer.cuda = True
    mem["now"] = 1000                                  # held across stages (weights)
    with timer("rollout"):
        use(5000)
    with timer("update"):
        use(3000)
    with timer("rollout"):                             # a later, smaller entry keeps the larger peak
        use(100)
    assert dict(timer.peak_bytes) == {"rollout": 6000, "update": 4000} and timer.peak_reserved == 6512
    mem["now"] = 0
    with timer("optimizer"):                           # without the reset it would read the rollout's 6000
        use(10)
    assert timer.peak_bytes["optimizer"] == 10


def test_stage_profile_attributes_host_ops_and_device_time_per_stage(monkeypatch):
    """--profile's per-stage table: host ATen calls go to the innermost stage range holding their start (a real
    CPU profile); device events (faked: no GPU here) go by their device start, graph kernels that no host op
    owns included, device-side copies of the stage annotations left out; busy = device time / wall."""
    from types import SimpleNamespace as NS

    from torch.profiler import ProfilerActivity, profile, record_function

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib

    bp = importlib.import_module("_profile")
    x = torch.randn(48, 48, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("stage/update"):
            (x @ x).relu().sum().backward()
            with record_function("stage/optimizer"):
                x.data.add_(x.grad)
        torch.ones(3)                                      # outside every stage: left out
        with record_function("stage/old_logp"):
            torch.mm(x, x)
    p = bp.stage_profile(prof.events())
    assert set(p) == {"update", "optimizer", "old_logp"}
    assert "mm" in dict(p["update"]["top_ops"]) and "mm" in dict(p["old_logp"]["top_ops"])
    assert dict(p["optimizer"]["top_ops"]).keys() == {"add_"} and "add_" not in dict(p["old_logp"]["top_ops"])
    assert all(v["device_ms"] == 0 and v["kernels"] == 0 and v["wall_ms"] > 0 for v in p.values())
    assert p["update"]["wall_ms"] > p["optimizer"]["wall_ms"]

    def ev(name, start, end, dev="CPU"):
        return NS(name=name, time_range=NS(start=start, end=end), device_type=f"DeviceType.{dev}",
                  self_cpu_time_total=0.0 if dev != "CPU" else end - start, cpu_children=[],
                  is_user_annotation=name.startswith("stage/"))
    fake = [ev("stage/rollout", 0, 1000), ev("stage/update", 1000, 3000), ev("aten::mm", 10, 20),
            ev("stage/rollout", 5, 990, "CUDA"),                          # the annotation's device copy
            ev("gemm_a", 30, 530, "CUDA"), ev("gemm_a", 600, 700, "CUDA"),  # graph replay: no host op
            ev("softmax", 1500, 1600, "CUDA"), ev("late", 3500, 3600, "CUDA")]
    q = bp.stage_profile(fake)
    assert q["rollout"]["device_ms"] == pytest.approx(0.6) and q["rollout"]["kernels"] == 2
    assert q["rollout"]["busy"] == pytest.approx(0.6) and q["rollout"]["top_kernels"] == [["gemm_a", 0.6]]
    assert q["update"]["kernels"] == 1 and q["update"]["busy"] == pytest.approx(0.05)
    assert q["rollout"]["host_ops"] == 1 and q["update"]["host_ops"] == 0
    lines = bp.format_stage_profile(q, device=True)
    assert len(lines) == 3 and [ln.split()[0] for ln in lines[1:]] == ["update", "rollout"]  # by wall time
    assert "gemm_a 0.60 ms" in lines[2] and "softmax 0.10 ms" in lines[1]


def test_throughput_save_appends_to_results_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib

    tp = importlib.import_module("throughput")
    out, results = tmp_path / "runs", tmp_path / "results"
    assert tp.write_record({"n": 1}, out, None) == [out / "throughput.jsonl"]
    assert not results.exists()
    assert tp.write_record({"n": 2}, out, results) == [out / "throughput.jsonl", results / "throughput.jsonl"]
    assert [json.loads(x)["n"] for x in (out / "throughput.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["n"] for x in (results / "throughput.jsonl").read_text().splitlines()] == [2]


def test_flop_models_equal_torch_flop_counter(tmp_path, monkeypatch):
    """bench/flops.py against torch.utils.flop_counter on a real HF Qwen2.5-VL (tiny widths, 3 vision blocks with
    window and full attention, GQA): the vision tower exactly, the language model's linear part exactly and its
    attention as the causal half of the full score matmuls that eager attention runs, the head exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    from strive_engine.config import ModelConfig
    from strive_engine.model import build_model

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib

    fl = importlib.import_module("flops")
    arch = {"model_type": "qwen2_5_vl", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1500, "tie_word_embeddings": True,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "vision_config": {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4,
                              "out_hidden_size": 64, "window_size": 112, "fullatt_block_indexes": [1]}}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    model, _ = build_model(ModelConfig(arch=str(tmp_path / "arch.json"), attn_implementation="eager"), "cpu")
    shape = fl.model_shape(model)
    assert shape.params == sum(p.numel() for p in model.parameters()) and shape.vis_full_blocks == 1
    for grid in ((2, 16, 12), (1, 6, 10)):  # 8 x 6 merged: windows 4x4, 4x2; 3 x 5: windows 3x4, 3x1
        pix = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.model.visual(pix, grid_thw=torch.tensor([grid]))
        assert fc.get_total_flops() == sum(fl.vision_flops(shape, grid)), grid
    for s in (1, 37):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.model.language_model(inputs_embeds=torch.randn(1, s, 64), attention_mask=torch.ones(1, s).long())
        lin, attn = fl.lm_flops(shape, s)
        assert fc.get_total_flops() == lin + 2 * attn, s
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.lm_head(torch.randn(9, 64))
    assert fc.get_total_flops() == fl.head_flops(shape, 9)
    # one prompt of 6 tokens shared by completions of 3 and 5 (strive_engine.prompt_sharing): 14 tokens run, the
    # linear part as counted; eager runs the whole 14 x 14 score matrix under the block mask, the model counts the
    # pairs the mask allows
    rec = fl.CallRecord("update", seq_lens=[9, 11], scored=[3, 5], shared=[(6, [3, 5])])
    assert rec.forwarded == 14
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.model.language_model(inputs_embeds=torch.randn(1, 14, 64), attention_mask=torch.zeros(1, 1, 14, 14))
    lin, attn = fl.lm_flops(shape, 14)
    assert fc.get_total_flops() == lin + 2 * attn
    pairs = 6 * 6 / 2 + (3 * 6 + 3 * 3 / 2) + (5 * 6 + 5 * 5 / 2)
    assert fl.policy_call_flops(shape, rec) == lin + 4 * shape.layers * shape.attn_width * pairs + fl.head_flops(shape, 8)


def test_rollout_work_by_hand(monkeypatch):
    """Two requests (prompts of 10 and 20 tokens), G=2 rows each with 3, 1 and 2, 2 completion tokens; 100
    weights of 1 byte, 2 bytes of K/V per token, attention width 1, one layer, no vision."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib

    fl = importlib.import_module("flops")
    shape = fl.ModelShape(params=100, trainable=100, lm_linear=100, head=0, layers=1, attn_width=1, kv_width=1)
    rec = fl.CallRecord("old_logp", seq_lens=[13, 11, 22, 22], scored=[3, 1, 2, 2], video_index=[0, 0, 1, 1],
                        grids=[(1, 2, 2), (1, 2, 2)])
    one = fl.rollout_work(shape, [rec], max_batch=0, elem=1)
    # one generate call, 3 steps: each reads 100 weight bytes + both prompts' K/V once (30 x 2) + the rows' own
    # K/V so far: step 0: 0, step 1: 4 rows x 1 token x 2, step 2: (2 + 1 + 2 + 2) x 2  -> 160 + 168 + 174
    assert (one["bytes"], one["decode_steps"], one["requests"]) == (502, 3, 2)
    # prefill: 2 x 100 x s + 2 x 1 x 1 x s^2 for s = 10, 20; decode: 2 x 100 x 8 generated tokens
    assert one["flops"] == 2200 + 4800 + 1600 and one["prompt_tokens_mean"] == 15
    two = fl.rollout_work(shape, [rec], max_batch=2, elem=1)
    # two calls: request 0 for 3 steps (100 + 20 each, own 0, 4, 6), request 1 for 2 steps (100 + 40, own 0, 4)
    assert (two["bytes"], two["decode_steps"]) == (370 + 284, 5)
    # max_batch 3: the native engine takes whole requests (3 // 2 = 1 per call): the same two calls
    assert fl.rollout_work(shape, [rec], max_batch=3, elem=1)["bytes"] == 370 + 284
    # HF generate cuts rows anywhere: rows (3, 1, 2) then (2): 3 x (100 + 60) + own 3 x 2 + 5 x 2, then
    # 2 x (100 + 40) + own 2 -> 496 + 282
    hf = fl.rollout_work(shape, [rec], max_batch=3, elem=1, whole_requests=False)
    assert (hf["bytes"], hf["decode_steps"]) == (496 + 282, 5)


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
    out = mod.bench_cuda(200, quick=True, device="cpu", sets=2)
    assert len(seen["graph_sets"]) == 2 * 2  # layouts x modes
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
    (tmp_path / "bench_throughput.json").write_text(json.dumps({"fast": {
        "stages": {"update": {"s": 2.5, "share": 0.41, "spread": 0.03, "fraction": 0.38, "bound": "FLOPs"}},
        "mfu": {"update_PT": 0.44}, "steps": 8}}))
    (tmp_path / "bench_broken.json").write_text("Traceback (most recent call last):")
    res = _script("bench/gpu_table.py", [str(tmp_path)])
    rows = [line for line in res.stdout.splitlines() if line.startswith("| bench_")]
    assert "| bench_keyframe | kernel_device_graph.median_us | 20.5 |" in rows
    assert "| bench_keyframe | sweep_device_graph.rows16_warps1 | 18.25 |" in rows
    assert "| bench_keyframe | sweep_device_graph.rows0_warps1 | error: ZeroDivisionError('a/b') |" in rows
    assert "| bench_keyframe | fwd_bwd.peer.error | ImportError('liger') |" in rows
    assert "| bench_broken | (no JSON: see bench_broken.log) | |" in rows
    for leaf, value in (("stages.update.share", "0.41"), ("stages.update.spread", "0.03"),
                        ("stages.update.fraction", "0.38"), ("mfu.update_PT", "0.44")):
        assert f"| bench_throughput | fast.{leaf} | {value} |" in rows
    assert not any("fast.steps" in r or "stages.update.s |" in r for r in rows)
    assert not any("shape" in r or "note" in r or "input_sets" in r for r in rows)


def test_vision_and_rollout_benches_run_tiny(tmp_path):
    """bench_vision.py and bench_rollout.py --tiny as users run them: the segmented vision attention makes fewer
    SDPA calls than transformers' loop for the same (bitwise, on the CPU) output, and the rollout bench's JSON
    carries both vision timings next to the native engine's and HF's. Under the interpreter the rollout bench also
    runs, untimed, the GPU-only micro-benches' calls (the decode attention with both split plans, the sampler's
    checks), so that a mistake in them shows here and not in a GPU lease."""
    _script("bench/bench_vision.py", ["--width", "16", "--heads", "2", "--videos", "2", "--grid", "2,20,12",
                                      "--reps", "1", "--backward", "--out", str(tmp_path / "v.json")])
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["segmented_calls"] < v["hf_loop_calls"] and v["max_abs_diff"] == 0.0
    assert v["segmented_fwd_bwd_ms"] > 0 and v["hf_loop_fwd_bwd_ms"] > 0
    _script("bench/bench_rollout.py", ["--tiny", "--out", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["vision_tower"]["segmented_ms"] > 0 and r["vision_tower"]["hf_loop_ms"] > 0
    assert r["native"]["decode_steps"] > 0 and r["hf"]["decode_steps_timed"] > 0
    assert r["native_rope_launch"]["decode_steps"] == r["native"]["decode_steps"]   # the step with rope_cache too
    assert r["logits_check"]["max_rel_err"] < 1e-4


def test_accumulation_bench_runs_tiny(tmp_path):
    """bench_accumulation.py as users run it, at a tiny width: both modes timed, and the weights gathered once copy
    fewer bytes per optimizer step than FSDP2's default (a gather in every forward and backward)."""
    _script("bench/bench_accumulation.py", ["--layers", "2", "--width", "32", "--mlp", "64", "--vision-blocks", "2",
                                            "--vision-width", "16", "--vocab", "100", "--micro", "3", "--reps", "1",
                                            "--out", str(tmp_path / "a.json")])
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["gathered_once_ms"] > 0 and a["per_micro_batch_ms"] > 0 and a["micro"] == 3
    assert 0 < a["gathered_once_copied_gb"] < a["per_micro_batch_copied_gb"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles for sm_90 with a stand-in driver: a CPU check")
def test_kernel_resources_counts_spills(tmp_path):
    """The spill column is ptxas's count, so it can say something: the prefix kernel in fp32 at the 3B shape spills
    (its bf16 tiles of 64 x 128 do not fit 255 fp32 registers); cuobjdump's LOCAL, read before, was 0 for it too."""
    pytest.importorskip("triton.backends.nvidia")
    script = f"""
import sys, json, pathlib, torch
sys.path.insert(0, {str(ROOT / "bench")!r})
import kernel_resources as kr
import strive_kernels.decode_attention as da
from strive_kernels import _backend
R, G, Hq, Hkv, D, Lp, T = 16, 8, 16, 2, 128, 2112, 256
kp, ks = torch.empty(R, Hkv, Lp, D), torch.empty(R, G, Hkv, T, D)
record = []
with kr.compile_only(90, record), kr._patched(_backend, "sm_count", lambda device: 132):
    da.shared_prefix_attention_triton(torch.empty(R, G, Hq, D), kp, kp, torch.zeros(R, dtype=torch.int32), ks, ks,
                                      torch.tensor([T // 2], dtype=torch.int32))
k = next(kernel for name, _, kernel, _, _ in record if name == "_prefix_kernel")
w = pathlib.Path({str(tmp_path)!r})
print(json.dumps([kr.ptx_spills(k.asm["ptx"], w), kr.cubin_resources(k.asm["cubin"], w).get("LOCAL", 0)]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    spills, local = json.loads(res.stdout.strip().splitlines()[-1])
    assert spills > 0 and local == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles for sm_90 with a stand-in driver: a CPU check")
def test_kernel_resources_of_the_decode_kernels_on_sm90(tmp_path):
    """bench/kernel_resources.py compiles the decode kernels for an H100 / H200 through the engine's launch code
    (no GPU): nothing spills, and the prefix kernel fits the PREFIX_PROGRAMS_PER_SM that plan_splits assumes, so
    its grid at the 3B rollout shape fills one wave (the number the planner uses is the compiled kernel's); the
    same for the one-pass sampler and its PROGRAMS_PER_SM."""
    pytest.importorskip("triton.backends.nvidia")
    import strive_kernels.sampling as smp
    from strive_kernels.decode_attention import PREFIX_PROGRAMS_PER_SM

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench/kernel_resources.py"), "--only", "decode", "--out",
                          str(tmp_path / "k.json")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    rec = json.loads((tmp_path / "k.json").read_text())
    by = {x["kernel"]: x for x in rec["launches"]}
    assert set(by) == {"_prefix_kernel", "_suffix_kernel", "_add_rmsnorm_kernel", "_rope_cache_kernel",
                       "_silu_mul_kernel", "_sample_kernel", "_merge_kernel"}
    assert all(x["spill_bytes"] == 0 and 0 < x["regs"] <= 255 for x in rec["launches"])
    # the engine's call (the rotary in the prologue, its register cap), with Qwen3-VL's norms, and the plain call
    prefix = [x for x in rec["launches"] if x["kernel"] == "_prefix_kernel"]
    assert sorted(x["note"] for x in prefix) == ["rope_... qk-norm", "rope_shared_prefix_attention",
                                                  "shared_prefix_attention"]
    for pre in prefix:
        assert pre["blocks_per_sm"] == PREFIX_PROGRAMS_PER_SM, pre
        assert pre["grid"] == [32, 7, 1] and pre["waves"] <= 1.0, pre
        # the occupancy arithmetic on the compiled numbers: registers per warp in units of 256, 1 KiB reserved
        per_warp = -(-pre["regs"] * 32 // 256) * 256
        fit = min(65_536 // per_warp // pre["num_warps"], 233_472 // (pre["smem_bytes"] + 1024),
                  2048 // (32 * pre["num_warps"]))
        assert fit == pre["blocks_per_sm"]
    assert "_prefix_kernel" in res.stdout and "waves" in res.stdout
    # the sampler over (128, 151,936) logits: the split plan's PROGRAMS_PER_SM is the compiled kernel's, one wave
    draw = next(x for x in rec["launches"] if x["note"] == "sample_tokens" and x["kernel"] == "_sample_kernel")
    assert draw["blocks_per_sm"] == smp.PROGRAMS_PER_SM and draw["grid"] == [128, 4, 1] and draw["waves"] <= 1.0
