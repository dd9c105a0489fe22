"""bench/throughput.py's record when a stage fails after the timed steps (the rest: tests/test_bench.py)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_failed_checkpoint_save_keeps_the_timed_steps(monkeypatch):
    """The checkpoint save is timed after the steps: if it raises (async DCP on CUDA did on 2026-12-04), the save's
    entry names the error instead of the exception ending the run (and taking the timed steps with it)."""
    import importlib
    import types

    import strive_engine.checkpoint as ckm

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    tp = importlib.import_module("throughput")

    class Broken:
        def __init__(self, folder, env, keep=1, async_save=True):
            pass

        def save_trainer(self, step, trainer, loader_state):
            raise AttributeError("'NoneType' object has no attribute 'values'")
    monkeypatch.setattr(ckm, "Checkpointer", Broken)
    t = types.SimpleNamespace(timer=tp.BenchTimer(sync=False), loader=types.SimpleNamespace(state_dict=dict))
    cfg = types.SimpleNamespace(checkpoint=types.SimpleNamespace(async_save=True))
    got = tp._checkpoint_seconds(t, cfg, None, 3)
    assert got == {"error": "AttributeError: 'NoneType' object has no attribute 'values'"}
    assert not t.timer.seconds and not t.timer.stack                      # the timer was reset all the same
