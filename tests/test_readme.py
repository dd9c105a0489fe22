"""The README's commands run as written after `make test` (issue 18 item 3).

Every shell command of the README (its ```bash blocks, and inline `...` commands) goes through the project's
.venv or a make target; every strive_engine option it uses is a real config field. The cheap ones run: each
`--help`, the synthetic-set generator, `make demo`'s training command, evaluate on that run's model, and
bench/throughput.py for one step. Where a command would take minutes (800 synthetic clips, 100 RL steps) it runs
with small `--section.field=value` overrides appended, which the README says every entry point takes; each
token a test replaces must be in the README's command, so a changed README fails here instead of being skipped.
"""
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VENV_BIN = ROOT / ".venv" / "bin"
SMALL = ["--data.synthetic_size=24", "--data.synthetic_tasks=brief_colour,flash_count", "--data.batch_size=1",
         "--variants.num_variants=2", "--rollout.num_generations=2", "--rollout.max_new_tokens=8",
         "--model.tiny_hidden_size=64", "--model.tiny_vision_hidden_size=32", "--video.backend=pyav"]
needs_venv = pytest.mark.skipif(not (VENV_BIN / "python").exists(), reason="no .venv: run `make test`")


def shell_commands(text: str = README) -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            cmd = re.split(r"\s+#", line.strip(), maxsplit=1)[0].strip()
            if cmd and not cmd.startswith("#"):
                out += [c.strip() for c in cmd.split("&&")]
    return out


def inline_commands(text: str = README) -> list[str]:
    """`...` spans of the prose that are commands (start with a program that runs Python or installs)."""
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    cmds = [c.strip() for s in spans for c in s.split("&&")]
    return [c for c in cmds if re.match(r"(\.venv/bin/\S+|python3?|torchrun|pip|make|bash) ", c)]


def readme_command(prefix: str) -> list[str]:
    """The README's one shell command starting with `prefix`, split like a shell would."""
    found = [c for c in shell_commands() if c.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return shlex.split(found[0])


def substituted(argv: list[str], replace: dict[str, str], extra=()) -> list[str]:
    for old in replace:
        assert old in argv, f"{old!r} is no longer in the README's command {argv}"
    return [replace.get(a, a) for a in argv] + list(extra)


def run(argv: list[str], timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{argv}\n{(res.stdout + res.stderr)[-4000:]}"
    return res.stdout + res.stderr


def last_json(text: str) -> dict:
    """The last stdout/stderr line that is a JSON object (the entry points' result line)."""
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_every_command_uses_the_venv_or_make():
    cmds = shell_commands() + inline_commands()
    assert len(shell_commands()) >= 10, shell_commands()
    makefile = (ROOT / "Makefile").read_text()
    for cmd in cmds:
        prog = shlex.split(cmd)[0]
        if prog == "make":
            for target in shlex.split(cmd)[1:]:
                assert re.search(rf"^{target}:", makefile, re.M), (cmd, "no such make target")
        elif cmd.startswith("python3 -m venv "):
            continue  # creating the venv itself
        else:
            assert prog.startswith(".venv/bin/") or prog == "bash", f"{cmd!r}: run it through .venv/bin/ or make"
        for script in re.findall(r"(?:^|\s)((?:bench|tests)/\S+\.(?:py|sh))", cmd):
            assert (ROOT / script).is_file(), (cmd, script)
    assert any(c.startswith(".venv/bin/torchrun") for c in cmds) and any(c.startswith("make test") for c in cmds)


def test_every_engine_option_in_the_readme_is_a_config_field():
    from strive_engine.config import load_config

    checked = 0
    for cmd in shell_commands() + inline_commands():
        argv = shlex.split(cmd)
        if "-m" not in argv or not argv[argv.index("-m") + 1].startswith("strive_engine"):
            continue
        module = argv[argv.index("-m") + 1]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), (cmd, module)
        if module in ("strive_engine.train", "strive_engine.evaluate", "strive_engine.sft"):
            load_config([a for a in argv[argv.index("-m") + 2:] if a != "--help"])  # ConfigError if not
            checked += 1
    assert checked >= 6


@needs_venv
@pytest.mark.slow
def test_the_cheap_readme_commands_run_as_written(tmp_path):
    # --help, exactly as written: the values that will run, the recipe's marked.
    for cmd in shell_commands():
        if cmd.endswith("--help"):
            argv = shlex.split(cmd)
            recipe = argv[argv.index("--recipe") + 1] if "--recipe" in argv else "debug_cpu"
            text = run(argv)
            assert f"run with --recipe {recipe} " in text and f"[recipe {recipe};" in text, cmd

    # The synthetic set on its own (6 clips instead of 240, into a temporary folder).
    syn = tmp_path / "synthetic"
    text = run(substituted(readme_command(".venv/bin/python -m strive_engine.synthetic"),
                           {"runs/synthetic": str(syn), "240": "6"}))
    assert (syn / "meta.json").is_file() and "synthetic set: 100%" in text

    # make demo's training command (named in the README), 2 SFT + 1 RL steps; then evaluate on its model.
    demo = shlex.split(re.search(r"trains the embedded default: (.+)$", README, re.M).group(1))
    run_dir = tmp_path / "run"
    assert demo[0] == ".venv/bin/torchrun"
    run([*demo, *SMALL, f"--data.synthetic_dir={tmp_path / 'syn'}", f"--run.output_dir={run_dir}", "--run.steps=1",
         "--sft.steps=2", "--sft.batch_size=2", "--logging.progress=false"])
    assert (run_dir / "hf" / "config.json").is_file()
    text = run(substituted(readme_command(".venv/bin/python -m strive_engine.evaluate"),
                           {"--model.path=runs/debug_cpu/hf": f"--model.path={run_dir / 'hf'}"},
                           [*SMALL, f"--data.synthetic_dir={tmp_path / 'syn'}", "--eval.max_records=3",
                            f"--run.output_dir={tmp_path / 'eval_run'}"]))
    report = last_json(text)
    assert report["num_scored"] == 3 and 0.0 <= report["accuracy"] <= 1.0
    assert "evaluate: 100%" in text  # its progress bar
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])  # the held-out point of the run
    assert last["phase"] == "eval" and last["eval/accuracy"] == report["accuracy"]

    # The throughput bench, one step; it leaves the tracked results alone.
    tracked = subprocess.run(["git", "status", "--porcelain", "--", "bench/results"], cwd=ROOT, capture_output=True,
                             text=True).stdout
    text = run(substituted(readme_command(".venv/bin/python bench/throughput.py"), {},
                           ["--steps", "1", "--warmup", "0", "--skip-checkpoint", "--out", str(tmp_path / "bench"),
                            f"--data.synthetic_dir={tmp_path / 'syn'}", "--data.synthetic_size=24"]))
    assert last_json(text)["bench"] == "throughput"
    assert subprocess.run(["git", "status", "--porcelain", "--", "bench/results"], cwd=ROOT, capture_output=True,
                          text=True).stdout == tracked
