"""`python -m strive_engine.sft` (warm start only, HF export) and `python -m strive_engine.evaluate` on its export:
report fields, per-type/category accuracy, resumption after an interruption, a bad video skipped and counted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from strive_engine.evaluate import summarise

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--data.synthetic_size=20", "--data.synthetic_tasks=brief_colour,flash_count", "--video.pool_frames=8",
         "--keyframes.num_frames=4", "--rollout.max_new_tokens=8", "--model.tiny_hidden_size=64",
         "--model.tiny_vision_hidden_size=32", "--logging.progress=false", "--video.backend=pyav"]


def _run(module, args, timeout=600):
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    syn = d / "syn"
    _run("strive_engine.sft", [*SMALL, f"--data.synthetic_dir={syn}", "--sft.steps=3", "--sft.batch_size=2",
                               f"--run.output_dir={d / 'run'}"])
    rows = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["sft"] * 3  # SFT only: no RL step ran
    assert (d / "run" / "hf" / "model.safetensors").exists()
    return d


@pytest.mark.slow
def test_evaluate_report_and_resume(exported):
    common = [*SMALL, f"--data.synthetic_dir={exported / 'syn'}", f"--model.path={exported / 'run' / 'hf'}",
              f"--eval.output_dir={exported / 'eval'}", "--eval.batch_size=3"]
    _run("strive_engine.evaluate", common)
    report = json.loads((exported / "eval" / "report.json").read_text())
    assert report["num_scored"] == report["num_records"] == 4  # the 20% test split of 20
    assert set(report["per_problem_type"]) <= {"multiple choice", "numerical"}
    assert set(report["per_category"]) <= {"brief_colour", "flash_count"}
    assert 0.0 <= report["accuracy"] <= 1.0 and report["greedy"] is True
    # An interrupted run: drop two predictions; the rerun evaluates only those and the report is the same.
    preds = exported / "eval" / "predictions.rank0.jsonl"
    lines = preds.read_text().splitlines()
    preds.write_text("\n".join(lines[:2]) + "\n")
    res = _run("strive_engine.evaluate", common)
    assert "(2 already done)" in res.stderr + res.stdout
    again = json.loads((exported / "eval" / "report.json").read_text())
    assert again["accuracy"] == report["accuracy"] and again["num_scored"] == 4


def test_summarise_counts_skipped_and_groups():
    rows = [{"id": "1", "category": "a", "problem_type": "numerical", "accuracy": 1.0, "format": 1.0},
            {"id": "2", "category": "a", "problem_type": "multiple choice", "accuracy": 0.0, "format": 1.0},
            {"id": "3", "category": "", "problem_type": "numerical", "accuracy": 0.5, "format": 0.0},
            {"id": "4", "category": "b", "problem_type": "OCR", "error": "undecodable video"}]
    s = summarise(rows)
    assert s["num_records"] == 4 and s["num_scored"] == 3 and s["skipped"] == {"undecodable video": 1}
    assert s["accuracy"] == pytest.approx(0.5) and s["format"] == pytest.approx(2 / 3)
    assert s["per_problem_type"]["numerical"] == {"n": 2, "accuracy": 0.75}
    assert s["per_category"]["(none)"]["n"] == 1 and "b" not in s["per_category"]


def test_sft_lr_schedule():
    """Linear warmup over 10% of the steps, then cosine down to min_lr_ratio at the last step (or constant)."""
    from strive_engine.config import SFTConfig
    from strive_engine.sft import sft_lr_factor

    cos = SFTConfig(steps=100, schedule="cosine", min_lr_ratio=0.1)
    f = [sft_lr_factor(i, cos) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)       # warmup: (i + 1) / 10
    assert all(a >= b for a, b in zip(f[9:], f[10:]))                       # never increases after warmup
    assert f[99] == pytest.approx(0.1) and f[54] == pytest.approx(0.55, abs=0.02)  # midpoint of the cosine
    const = SFTConfig(steps=100, schedule="constant")
    assert [sft_lr_factor(i, const) for i in (9, 50, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="sft.schedule"):
        SFTConfig(steps=10, schedule="linear")
