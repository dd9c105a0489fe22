"""Wiring of the kernel benches' engine-size tables (bench_keyframe.py, bench_advantage.py --engine-sizes) on
the CPU: the CUDA timers are stand-ins (test_bench._bench_module), the calls are the real public functions."""
import torch

from test_bench import ROOT, _bench_module


def _with_host_timer(mod, monkeypatch):
    calls = []

    def host_time_us(fn, reps=200, rounds=5):
        calls.append(fn())
        return {"median_us": 3.0, "p20_us": 3.0, "p80_us": 3.0, "reps": rounds}
    monkeypatch.setattr(mod, "host_time_us", host_time_us)
    return calls


def test_keyframe_engine_sizes_table(monkeypatch):
    mod, seen = _bench_module("bench_keyframe", monkeypatch)
    public = _with_host_timer(mod, monkeypatch)
    rows = mod.engine_sizes(quick=True, D=24, device="cpu", sizes=((2, 20), (3, 16)))
    assert [(r["B"], r["P"]) for r in rows] == [(2, 20), (3, 16)]
    for r, (idx, scores, _) in zip(rows, public):  # the public call ran on that size
        assert idx.shape == (r["B"], mod.K, mod.F) and scores.shape == (r["B"] * r["P"],)
        assert r["ratio_events"] == 2.0 and r["ratio_host"] == 3.0 and r["meets_2x"]
    assert [len(s) for s in seen["graph_sets"]] == [2, 2]  # the kernel alone over two input sets per size
    mod.print_engine_sizes(rows)


def test_advantage_engine_sizes_table(monkeypatch):
    mod, seen = _bench_module("bench_advantage", monkeypatch)
    public = _with_host_timer(mod, monkeypatch)
    old = {"n": 64, "kernel_device_graph_us": 0.9, "public_call_events_us": 40.0, "public_call_host_us": 70.0}
    rows = mod.engine_sizes(quick=True, device="cpu", sizes=((2, 4, 8), (5, 3, 4)), baseline={64: old})
    assert [r["n"] for r in rows] == [64, 60]
    assert rows[0]["before_kernel_us"] == 0.9 and not rows[0]["as_fast"] and "as_fast" not in rows[1]
    for r, (adv, _) in zip(rows, public):
        assert adv.shape == (r["n"],) and r["meets_2x"]
    for (kern_a, _), (adv, _) in zip((s[0] for s in seen["graph_sets"]), public):  # same rewards, same answer
        torch.testing.assert_close(kern_a, adv, rtol=0, atol=1e-6)
    mod.print_engine_sizes(rows)


def test_logprob_engine_shapes_on_cpu(monkeypatch, capsys):
    """bench_logprob.py --engine on the CPU at toy sizes: every case of both shapes has a time, the ragged
    micro-batches all ran on both paths, and the last stdout line is the JSON record."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib
    mod = importlib.import_module("bench_logprob")
    monkeypatch.setattr(mod, "ENGINE_SHAPES", {"gpu_small": ((0,) * 4, (64, 16, 1028, 4)),
                                               "head_7b": ((0,) * 4, (32, 16, 3000, 2))})
    monkeypatch.setattr(mod, "RAGGED", ((2048, 4), (1000, 3), (64, 1)))
    mod.main(["--engine", "--quick"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("gpu_small", "head_7b"):
        fb = rec[name]["fwd_bwd"]
        cases = {"fast", "reference_twin", "plain_pytorch"} | ({"fast_chunk1024"} if name == "head_7b" else set())
        assert set(fb) == cases and all(fb[c]["ms"] > 0 for c in cases)
        assert set(rec[name]["no_grad"]) == {"fast", "reference_twin"}
    for path in ("ragged_fast", "ragged_reference_twin"):
        assert len(rec["gpu_small"][path]["fwd_bwd_ms"]) == 3 and len(rec["gpu_small"][path]["no_grad_ms"]) == 3


def test_logprob_chunk_matmuls_measure_the_split_k_candidates(monkeypatch):
    """bench_logprob.chunk_matmuls (run by --engine at the 7B head's 1,024-token point on CUDA) on the CPU, with
    torch.bmm's CUDA-only fp32-output overload stood in by an fp32 bmm: every split-K candidate runs (the vocabulary
    in S slices of the (C, V) dlogits), with the partial buffer it reports."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib
    mod = importlib.import_module("bench_logprob")
    real_bmm, seen = torch.bmm, []

    def bmm(a, b, *, out_dtype=None, out=None):
        seen.append((tuple(a.shape), tuple(b.shape), out_dtype, out.dtype))
        if out_dtype is None:
            return real_bmm(a, b, out=out)
        return out.copy_(real_bmm(a.to(out_dtype), b.to(out_dtype)))
    monkeypatch.setattr(torch, "bmm", bmm)
    x = mod.Inputs(64, 24, 96, torch.bfloat16, "cpu", seqs=2)
    res = mod.chunk_matmuls(x, 48, 0, 1, "cpu")
    assert {k for k in res if k.startswith("grad_hidden_splitk")} == {
        "grad_hidden_splitk8_bf16_partials", "grad_hidden_splitk2_fp32_partials", "grad_hidden_splitk4_fp32_partials",
        "grad_hidden_splitk8_fp32_partials"}
    assert res["grad_hidden_splitk4_fp32_partials"]["extra_MiB"] == round(4 * 48 * 24 * 4 / 2**20, 1)
    assert set(seen) == {((s, 48, 96 // s), (s, 96 // s, 24), dt, dt or torch.bfloat16)
                         for s, dt in ((8, None), (2, torch.float32), (4, torch.float32), (8, torch.float32))}
