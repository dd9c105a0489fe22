"""The entry points' command line (strive_engine.cli): user errors are one line with exit status 2, in train,
evaluate and sft, alone and under a 2-process torchrun (rank 0 alone prints it); --debug / STRIVE_DEBUG=1 show the
traceback; a failed start leaves the output folder as it was."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOG_LINE = re.compile(r"^\[rank\d+\] \d\d:\d\d:\d\d \S+ (DEBUG|INFO|WARNING): ")  # logging records
ERROR_LINE = re.compile(r"^(\[rank\d+\] )?[a-z]+ error: ")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "STRIVE_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _run(module, args, nproc=0, timeout=300, **env):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc else [sys.executable])
    res = subprocess.run([*launcher, "-m", module, *args], cwd=ROOT, env=_env(**env), capture_output=True,
                         text=True, timeout=timeout)
    return res.returncode, res.stdout + res.stderr


def _own_lines(out: str) -> list[str]:
    """What the engine printed besides its log records (progress bars are off in these runs)."""
    return [line for line in out.splitlines() if line.strip() and not LOG_LINE.match(line)]


def _folder_without_weights(tmp_path: Path) -> Path:
    d = tmp_path / "no_weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return d


def test_train_missing_records_file_is_one_line_and_leaves_the_output_folder_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"phase": "rl", "step": 0}\n')  # an earlier run's log
    missing = tmp_path / "nope.json"
    rc, text = _run("strive_engine.train", [f"--data.path={missing}", f"--run.output_dir={out}",
                                            "--logging.progress=false"])
    assert rc == 2, text[-3000:]
    assert _own_lines(text) == [f"data error: records file {missing} does not exist (--debug or STRIVE_DEBUG=1 "
                                f"shows the traceback)"], text[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # nothing moved aside, no config.json


@pytest.mark.parametrize("case", ["missing", "no_weights"])
def test_evaluate_bad_model_folder_is_one_line_and_touches_no_predictions(tmp_path, case):
    model = tmp_path / "nope" if case == "missing" else _folder_without_weights(tmp_path)
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "predictions.rank0.jsonl").write_text('{"id": "1", "key": "another model"}\n')
    rc, text = _run("strive_engine.evaluate", [f"--model.path={model}", f"--eval.output_dir={ev}",
                                               "--logging.progress=false"])
    assert rc == 2, text[-3000:]
    lines = _own_lines(text)
    assert len(lines) == 1 and lines[0].startswith("model error: ") and str(model) in lines[0], text[-3000:]
    assert ("is not a directory" if case == "missing" else "has no safetensors weights") in lines[0]
    assert sorted(p.name for p in ev.iterdir()) == ["predictions.rank0.jsonl"]  # not moved to superseded/


def test_sft_and_resume_errors_are_one_line(tmp_path):
    folder = tmp_path / "records_folder"
    folder.mkdir()
    rc, text = _run("strive_engine.train", [f"--data.path={folder}", f"--run.output_dir={tmp_path / 'a'}",
                                            "--run.steps=0"])
    assert rc == 2 and _own_lines(text) == [f"data error: records file {folder} is not a regular file (--debug or "
                                            f"STRIVE_DEBUG=1 shows the traceback)"], text[-3000:]
    rc, text = _run("strive_engine.train", ["--checkpoint.resume=true", f"--run.output_dir={tmp_path / 'b'}"])
    lines = _own_lines(text)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("checkpoint error: checkpoint.resume=true, but "), text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    missing = tmp_path / "nope.json"
    args, env = [f"--data.path={missing}", f"--run.output_dir={tmp_path / 'run'}"], {}
    if how == "flag":
        args.append("--debug")
    else:
        env["STRIVE_DEBUG"] = "1"
    rc, text = _run("strive_engine.train", args, **env)
    assert rc == 1 and "Traceback (most recent call last)" in text, text[-3000:]
    assert f"strive_engine.data.RecordFileError: records file {missing} does not exist" in text


@pytest.mark.slow
@pytest.mark.parametrize("module", ["strive_engine.train", "strive_engine.evaluate"])
def test_under_torchrun_rank0_alone_prints_the_error(tmp_path, module):
    bad = [f"--data.path={tmp_path / 'nope.json'}"] if module.endswith("train") else \
        [f"--model.path={tmp_path / 'nope'}", f"--eval.output_dir={tmp_path / 'eval'}"]
    rc, text = _run(module, [*bad, f"--run.output_dir={tmp_path / 'run'}", "--logging.progress=false"], nproc=2)
    assert rc == 1, text[-4000:]  # torchrun's own status when a worker fails
    ours = [line for line in text.splitlines() if ERROR_LINE.match(line)]
    assert len(ours) == 1 and str(tmp_path / "nope") in ours[0], text[-4000:]  # one line, from rank 0 (no prefix)
    assert not re.search(r"^\[rank\d\]:", text, re.M), text[-4000:]  # no worker traceback
    # torchrun's report: rank 0 is the root cause, with our exit status.
    root = text.split("Root Cause")[1]
    assert re.search(r"rank\s+: 0 ", root) and re.search(r"exitcode\s+: 2 ", root), text[-4000:]
