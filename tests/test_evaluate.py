"""`python -m strive_engine.train --run.steps=0` (warm start only, HF export) and `python -m strive_engine.evaluate`
on its export: report fields, per-type/category accuracy, resumption after an interruption, a bad video skipped
and counted."""
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
    _run("strive_engine.train", [*SMALL, f"--data.synthetic_dir={syn}", "--sft.steps=3", "--sft.batch_size=2",
                                 f"--run.output_dir={d / 'run'}", "--run.steps=0"])
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
    from strive_engine.optim import LRSchedule

    cos = SFTConfig(steps=100, schedule="cosine", min_lr_ratio=0.1)
    f = [LRSchedule.for_sft(cos)(i) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)       # warmup: (i + 1) / 10
    assert all(a >= b for a, b in zip(f[9:], f[10:]))                       # never increases after warmup
    assert f[99] == pytest.approx(0.1) and f[54] == pytest.approx(0.55, abs=0.02)  # midpoint of the cosine
    const = SFTConfig(steps=100, schedule="constant")
    assert [LRSchedule.for_sft(const)(i) for i in (9, 50, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="sft.schedule"):
        SFTConfig(steps=10, schedule="linear")


def _other_model(exported, dest):
    """A second model: the export's files with every weight perturbed (same architecture, other weights)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(exported / "run" / "hf", dest)
    sd = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: (v + 0.5 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v
               for k, v in sd.items()}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.slow
def test_evaluate_never_credits_another_models_predictions(exported, tmp_path, caplog):
    import logging

    from strive_engine.evaluate import main

    other = _other_model(exported, tmp_path / "other")
    common = [*SMALL, f"--data.synthetic_dir={exported / 'syn'}", "--eval.batch_size=4"]
    shared = tmp_path / "shared"
    with caplog.at_level(logging.INFO, logger="strive_engine.evaluate"):
        assert main([*common, f"--model.path={exported / 'run' / 'hf'}", f"--eval.output_dir={shared}"]) == 0
        caplog.clear()
        # Model N into the folder that holds model A's predictions: afresh, with a warning; A's files kept aside.
        assert main([*common, f"--model.path={other}", f"--eval.output_dir={shared}"]) == 0
        assert "(0 already done)" in caplog.text and "held predictions that are not resumed" in caplog.text
        assert main([*common, f"--model.path={other}", f"--eval.output_dir={tmp_path / 'alone'}"]) == 0
    got = json.loads((shared / "report.json").read_text())
    alone = json.loads((tmp_path / "alone" / "report.json").read_text())
    assert got["model"] == str(other) and got["num_scored"] == 4
    for key in ("accuracy", "format", "per_problem_type", "identity"):
        assert got[key] == alone[key], key
    old = json.loads((shared / "superseded" / "1" / "report.json").read_text())
    assert old["model"] == str(exported / "run" / "hf")


def test_model_identity_follows_the_weights(tmp_path):
    """Same folder, other weights (same size and header, rewritten) -> another identity; untouched -> the same."""
    import os

    import torch
    from safetensors.torch import save_file

    from strive_engine.config import ModelConfig
    from strive_engine.evaluate import model_identity

    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    cfg = ModelConfig(path=str(tmp_path))
    a = model_identity(cfg)
    assert a == model_identity(cfg) and a["path"] == str(tmp_path.resolve())
    st = (tmp_path / "model.safetensors").stat()
    save_file({"w": torch.ones(4, 4)}, tmp_path / "model.safetensors")  # same header and size, new bytes
    os.utime(tmp_path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    b = model_identity(cfg)

    def header(ident):
        return ident["files"]["model.safetensors"]["header_sha256"]

    assert b != a and header(b) == header(a)
    save_file({"w": torch.ones(4, 5)}, tmp_path / "model.safetensors")  # another shape: another header
    assert header(model_identity(cfg)) != header(b)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    assert model_identity(cfg)["config_sha256"] != a["config_sha256"]


@pytest.mark.slow
def test_tiny_export_is_complete_and_evaluation_defaults_to_its_folder(exported):
    """The random-weight model's export loads with the Auto classes too (its tokenizer, a Qwen2-VL image processor
    config from its vision tower and pixel bounds), carries the run's settings, and evaluate without
    --eval.output_dir writes into the model's own folder with those settings."""
    import torch
    from safetensors import safe_open
    from transformers import AutoImageProcessor, AutoTokenizer

    from strive_engine.evaluate import main

    hf = exported / "run" / "hf"
    ip = AutoImageProcessor.from_pretrained(hf, local_files_only=True)
    assert ip.to_dict()["merge_size"] == 2 and ip.to_dict()["patch_size"] == 14
    assert len(AutoTokenizer.from_pretrained(hf, local_files_only=True)) > 1000
    with safe_open(str(hf / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}  # trained dtype kept
    saved = json.loads((hf / "strive_settings.json").read_text())["config"]
    assert saved["rollout"]["prompt"] == "short" and saved["keyframes"]["num_frames"] == 4
    assert main([f"--data.synthetic_dir={exported / 'syn'}", f"--model.path={hf}", "--eval.max_records=2",
                 "--logging.progress=false", "--data.synthetic_size=20",
                 "--data.synthetic_tasks=brief_colour,flash_count", "--video.backend=pyav"]) == 0
    report = json.loads((hf / "eval" / "report.json").read_text())
    assert report["settings"]["from"]["keyframes.num_frames"] == "training" and report["num_frames"] == 4
    assert report["settings"]["from"]["video.pool_frames"] == "training" and report["settings"]["pool_frames"] == 8
