"""bench/ablation.py end to end at tiny size: the small-object task's data (brief set and warm-up set), the learned
scorer trained and measured, one shared warm start, every arm trained, exported and evaluated on the canonical
view, the record and its plot. Real processes, real encoded videos, real checkpoints; the sizes are tiny
so that it runs in minutes, and nothing about the numbers is asserted beyond what each must be."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("grpo", "per_variant", "strive", "strive_uniform_kf", "strive_no_crop")
TINY = ["--data.synthetic_size=10", "--data.batch_size=1", "--variants.num_variants=2", "--rollout.num_generations=2",
        "--rollout.max_new_tokens=6", "--model.tiny_hidden_size=32", "--model.tiny_vision_hidden_size=32",
        "--model.tiny_layers=1", "--model.tiny_vision_depth=1", "--video.backend=pyav", "--eval.max_records=2",
        "--checkpoint.async_save=false"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_arm_runs_end_to_end(tmp_path):
    out, results = tmp_path / "work", tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "ablation.py"), "--steps", "2", "--seeds", "0", "--sft-steps", "2",
           "--scorer-epochs", "1", "--out", str(out), "--results-dir", str(results), "--name", "tiny",
           "--no-eval-importance", *TINY]  # the scorer's-view evaluation is evaluate --eval.frames=importance
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads((results / "tiny.json").read_text())
    assert (results / "tiny.png").stat().st_size > 10_000
    assert json.loads(res.stdout.strip().splitlines()[-1])["bench"] == "ablation"

    # the learned scorer was trained on the train split and measured on the test split
    sc = rec["scorer"]
    assert sc["trained_on"]["records"] == str((out / "synthetic" / "train.json").resolve())
    assert sc["test"] == str((out / "synthetic" / "test.json").resolve()) and sc["n"] == 2
    assert {"recall@1", "recall@8", "canonical_hit", "uniform_hit", "importance_hit"} <= set(sc)
    # the warm start learned on the warm-up set (another seed, long events) and was evaluated on the arms' test split
    warm_cfg = json.loads((out / "warm_start" / "hf" / "strive_settings.json").read_text())["config"]["data"]
    assert warm_cfg["synthetic_tasks"] == "small_colour_long,small_count_long" and warm_cfg["synthetic_seed"] == 1
    assert rec["warm_start"]["heldout_n"] == 2 and "heldout_importance" not in rec["warm_start"]

    assert list(rec["runs"]) == list(ARMS) and rec["K"] == 2 and rec["G"] == 2
    for arm in ARMS:
        (run,) = rec["runs"][arm]
        assert run["steps"] == [0, 1] and len(run["grad_norm"]) == 2 and len(run["reward_std"]) == 2
        assert run["heldout_n"] == 2 and run["heldout_seen_n"] + run["heldout_missed_n"] == 2
        assert 0 <= run["heldout_accuracy"] <= 1
        assert run["wall_s"] >= run["train_s"] > 0
        s = rec["summary"][arm]
        assert {"heldout", "dead_chosen", "reward_std_step", "grad_norm_var", "wall_s"} <= set(s)
        # each arm trained with its own settings: the run's saved config says so
        cfg = json.loads((out / f"{arm}_seed0" / "hf" / "strive_settings.json").read_text())["config"]
        K, G = cfg["variants"]["num_variants"], cfg["rollout"]["num_generations"]
        assert K * G == 4  # matched rollouts per question
        assert (K, cfg["algorithm"]["advantage_mode"]) == {
            "grpo": (1, "per_variant"), "per_variant": (2, "per_variant")}.get(arm, (2, "joint"))
        assert cfg["keyframes"]["uniform_mix"] == (1.0 if arm == "strive_uniform_kf" else 0.3)
        assert cfg["variants"]["crop_area_min"] == (1.0 if arm == "strive_no_crop" else 0.5)
        assert cfg["keyframes"]["scorer"] == "learned"
    # the per-variant grouping of one view is GRPO's: the dead fraction of the per-view grouping equals the arm's
    for arm in ("grpo", "per_variant"):
        run = rec["runs"][arm][0]
        assert run["zero_var_chosen"] == run["zero_var_per_variant"]

    # --from-json redraws the same table from the record
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "ablation.py"), "--from-json",
                            str(results / "tiny.json"), "--results-dir", str(tmp_path / "again")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "tiny.json").read_text())["summary"] == rec["summary"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hold_warm_up_trains_the_warm_start_on_small_objects(tmp_path):
    """--warm-up hold: the warm start learns on small_*_hold (small objects, the distractor, long events) in a folder
    of its own, and the arms start from it."""
    out, results = tmp_path / "work", tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "ablation.py"), "--steps", "1", "--seeds", "0", "--sft-steps", "1",
           "--scorer-epochs", "1", "--arms", "strive", "--warm-up", "hold", "--out", str(out), "--results-dir",
           str(results), "--name", "tiny", "--no-eval-importance", *TINY]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=800,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads((results / "tiny.json").read_text())
    assert rec["warm_up"] == "hold" and not (out / "warm_start").exists()
    warm_cfg = json.loads((out / "warm_start_hold" / "hf" / "strive_settings.json").read_text())["config"]["data"]
    assert warm_cfg["synthetic_tasks"] == "small_colour_hold,small_count_hold" and warm_cfg["synthetic_seed"] == 1
    arm_cfg = json.loads((out / "strive_seed0" / "hf" / "strive_settings.json").read_text())["config"]
    assert arm_cfg["model"]["path"] == str(out / "warm_start_hold" / "hf")
    assert arm_cfg["data"]["synthetic_tasks"] == "small_colour,small_count"
