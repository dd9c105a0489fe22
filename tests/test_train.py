"""The training loop end to end: real torchrun processes, FSDP2 on gloo, real checkpoints on disk.

- a 2-process run trains, checkpoints asynchronously, and a run whose every process was SIGKILLed resumes to
  the same losses as an uninterrupted one; nothing is written after the kill;
- the same run's metrics are global over ranks, and only rank 0 reports bad records;
- resume=true without a checkpoint and a changed config fail with clear errors; earlier logs are never deleted;
- the demo recipe runs single-process for a few steps and writes metrics, a plot and an HF-loadable export;
- NaN losses never reach the optimizer (skipped and counted); a corrupt video mid-run is skipped and counted.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# A run small enough for CI: 1 question x 2 views x 2 answers per rank, a 2-layer tiny model.
SMALL = ["--data.batch_size=1", "--data.synthetic_size=24", "--data.synthetic_tasks=brief_colour,flash_count",
         "--video.pool_frames=8", "--keyframes.num_frames=4", "--variants.num_variants=2",
         "--rollout.num_generations=2", "--rollout.max_new_tokens=8", "--sft.steps=2", "--sft.batch_size=2",
         "--model.tiny_hidden_size=64", "--model.tiny_vision_hidden_size=32", "--logging.progress=false",
         "--logging.plot=false", "--video.backend=pyav"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(args, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "strive_engine.train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-4000:]
    return out.decode()


def _rl_rows(run_dir, phase="rl"):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if r.get("phase") == phase}


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun's workers run in sessions of their own, so killpg of torchrun's
    group misses them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_everything(proc) -> list[int]:
    """SIGKILL torchrun and every worker (each in its own process group); wait until all are gone."""
    pids = _descendants(proc.pid)
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), [p for p in pids if _alive(p)]
    return pids


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("syn"))


def _records_with_traps(syn_dir: str, folder: Path) -> Path:
    """The synthetic train split as a records file in `folder` (videos referenced in syn_dir, an extra root),
    plus two traps: the record rank 1 sees first in SFT points at a corrupt video, and a record points out of
    the video roots (skipped at load)."""
    from strive_engine.data import RecordLoader, load_records
    from strive_engine.synthetic import ensure_synthetic

    train, _ = ensure_synthetic(syn_dir, 24, 0, tasks=("brief_colour", "flash_count"))
    raw = json.loads(train.read_text())
    records, _ = load_records(train)
    first_on_rank1 = RecordLoader(records, 2, rank=1, world_size=2, seed=0 + 7919).next_batch()[0]
    folder.mkdir(parents=True)
    (folder / "broken.mp4").write_bytes(b"\x00garbage" * 100)
    for r in raw:
        r["path"] = str(train.parent / r["path"])
        if str(r["problem_id"]) == first_on_rank1.id:
            r["path"] = "broken.mp4"
    raw.append({**raw[0], "problem_id": "escape", "path": "../../../../../../etc/passwd"})
    out = folder / "train.json"
    out.write_text(json.dumps(raw, indent=1))
    return out


@pytest.mark.slow
def test_two_process_fsdp_run_killed_and_resumed_matches_uninterrupted(tmp_path, syn_dir, capsys, dist_cleanup):
    data = _records_with_traps(syn_dir, tmp_path / "data")
    common = [*SMALL, f"--data.path={data}", f"--data.extra_video_roots={syn_dir}", "--run.steps=6",
              "--checkpoint.every=2"]
    full = tmp_path / "full"
    log_full = _finish(_torchrun([*common, f"--run.output_dir={full}"]))
    ref = _rl_rows(full)
    assert sorted(ref) == list(range(6))
    assert (full / "checkpoints" / "step_000006" / "COMPLETE").exists()
    assert (full / "checkpoints" / "step_000006" / "MANIFEST.json").exists()
    assert (full / "hf" / "model.safetensors").exists()
    # Metrics are global: the corrupt video sits in rank 1's first SFT batch; kept rows are counted over ranks.
    assert _rl_rows(full, "sft")[0]["data/skipped_videos"] == 1
    assert all(r["data/kept_rows"] == r["data/valid_samples"] > 0 for r in ref.values())
    # Only rank 0 reports the records file's bad record.
    bad = [line for line in log_full.splitlines() if "video outside the video roots" in line]
    assert bad and all("[rank0]" in line for line in bad), bad

    # Same run, SIGKILLed (torchrun and every worker) once a checkpoint is complete.
    cut = tmp_path / "cut"
    proc = _torchrun([*common, f"--run.output_dir={cut}"])
    deadline = time.time() + 600
    while not list((cut / "checkpoints").glob("step_*/COMPLETE")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
        time.sleep(0.2)
    _kill_everything(proc)
    before = _snapshot(cut)
    time.sleep(3.0)
    assert _snapshot(cut) == before, "files changed after every process was killed"
    done = sorted(int(p.parent.name.split("_")[1]) for p in (cut / "checkpoints").glob("step_*/COMPLETE"))
    assert done and done[-1] < 6, f"the run was not interrupted before its end: {done}"

    _finish(_torchrun([*common, f"--run.output_dir={cut}", "--checkpoint.resume=true"]))
    got = _rl_rows(cut)
    assert sorted(got) == list(range(6)), sorted(got)  # rows logged after the checkpoint were recomputed
    timing = ("time/", "rollout/engine_")                            # wall-clock readings, not the run's state
    for step in range(done[-1], 6):                                  # every other value bitwise the uncut run's
        keys = {k for k in ref[step] if not k.startswith(timing)}
        assert {k for k in got[step] if not k.startswith(timing)} == keys and {"loss", "grad_norm", "lr"} <= keys
        assert {k: got[step][k] for k in keys} == {k: ref[step][k] for k in keys}, step
    assert json.loads((cut / "config.json").read_text())["checkpoint"]["resume"] == "false"  # the first one

    # A resume with another model layout or variant count is refused, listing the fields; nothing is touched.
    from strive_engine.train import main

    capsys.readouterr()
    metrics = (cut / "metrics.jsonl").read_text()
    assert main([*common, f"--run.output_dir={cut}", "--checkpoint.resume=true", "--model.tiny_heads=8",
                 "--variants.num_variants=1"]) == 2
    err = capsys.readouterr().err
    assert "model.tiny_heads: 4 -> 8" in err and "variants.num_variants: 2 -> 1" in err
    assert str(cut / "checkpoints" / "step_000006") in err
    assert (cut / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_demo_recipe_single_process_smoke(tmp_path, syn_dir):
    """The embedded default's code path (one process): metrics, plot, checkpoint and a loadable HF export."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "strive_engine.train", *SMALL, f"--data.synthetic_dir={syn_dir}", "--run.steps=2",
           f"--run.output_dir={out}", "--logging.plot=true"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rl_rows(out)
    assert sorted(rows) == [0, 1]
    for r in rows.values():
        assert 0.0 <= r["reward/accuracy"] <= 1.0 and r["rollout/gen_tokens"] > 0
        assert 0.0 <= r["adv/zero_var_frac"] <= r["adv/zero_var_frac_per_variant"] <= 1.0
    assert (out / "curves.png").stat().st_size > 1000
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "hf", local_files_only=True)
    assert AutoConfig.from_pretrained(out / "hf").model_type == "qwen2_5_vl"
    assert sum(p.numel() for p in model.parameters()) > 0


def test_resume_true_without_a_checkpoint_fails_clearly_and_keeps_the_logs(tmp_path, capsys, dist_cleanup):
    from strive_engine.train import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"phase": "rl", "step": 0}\n')
    assert main([*SMALL, f"--run.output_dir={out}", "--checkpoint.resume=true", "--run.steps=0", "--sft.steps=0",
                 "--checkpoint.export_hf=false"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.resume=true, but {out / 'checkpoints'} holds no complete checkpoint" in err
    assert (out / "metrics.jsonl").read_text() == '{"phase": "rl", "step": 0}\n'


def test_output_folder_never_loses_earlier_logs(tmp_path):
    """A fresh start moves an earlier run's metrics, config and checkpoints aside; a resume keeps the first
    config.json, adds its own when it differs, and keeps the full log before trimming the recomputed rows."""
    from strive_engine.checkpoint import ResumePoint
    from strive_engine.config import load_config
    from strive_engine.train import prepare_output

    out = tmp_path / "run"
    (out / "checkpoints" / "step_000002").mkdir(parents=True)
    rows = [{"phase": "sft", "step": 0}, {"phase": "rl", "step": 0}, {"phase": "rl", "step": 1},
            {"phase": "rl", "step": 2}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "config.json").write_text('{"old": 1}')
    cfg = load_config(["--optim.lr=1e-5"])
    prepare_output(out, cfg, None)
    assert (out / "metrics.jsonl.1").read_text().count("\n") == 4 and not (out / "metrics.jsonl").exists()
    assert (out / "config.json.1").read_text() == '{"old": 1}'
    assert (out / "checkpoints.1" / "step_000002").is_dir() and not (out / "checkpoints").exists()
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-5

    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = (out / "config.json").read_text()
    prepare_output(out, load_config(["--optim.lr=1e-5", "--checkpoint.resume=true"]),
                   ResumePoint(out / "checkpoints" / "step_000001", 1, {}))
    assert (out / "config.json").read_text() == first  # never overwritten
    assert json.loads((out / "config.resume_step1.json").read_text())["checkpoint"]["resume"] == "true"
    assert (out / "metrics.jsonl.2").read_text().count("\n") == 4  # the killed run's full log
    kept = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:2] and (out / "metrics.jsonl.1").exists()  # RL rows from step 1 on are recomputed


def test_cli_errors_are_clear():
    res = subprocess.run([sys.executable, "-m", "strive_engine.train", "--rollout.nope=1"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown field rollout.nope" in res.stderr
    res = subprocess.run([sys.executable, "-m", "strive_engine.train", "--help"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--algorithm.preset" in res.stdout


@pytest.mark.slow
def test_two_process_run_shows_progress_and_logs_each_line_once(tmp_path):
    """A 2-process run from a fresh synthetic folder: progress bars for generating the set, SFT and RL; every log
    message printed once (issue 18: `train.json: kept ...` came from strive_engine.data and again from
    strive_engine); with TensorBoard installed, <output_dir>/tb holds metrics.jsonl's scalars. A memory budget
    far below the update's needs makes both ranks measure their layers (a probe forward through FSDP2) and recompute
    every layer (strive_engine.recompute), in micro-batches of one row with every weight gathered once per optimizer
    step (parallel.accumulate_unsharded=true: under this budget auto would leave it off)."""
    import importlib.util
    import re
    from collections import Counter

    tb = importlib.util.find_spec("tensorboard") is not None
    out = tmp_path / "run"
    args = [*SMALL, f"--data.synthetic_dir={tmp_path / 'syn'}", "--run.steps=2", f"--run.output_dir={out}",
            "--logging.progress=true", "--logging.plot=true", f"--logging.tensorboard={str(tb).lower()}",
            "--parallel.memory_budget_gib=0.01", "--parallel.accumulate_unsharded=true", "--parallel.micro_batch_size=1"]
    text = _finish(_torchrun(args))
    assert all(r["memory/recomputed_layers"] == 2 for r in _rl_rows(out).values())
    pieces = [p.strip() for line in text.splitlines() for p in line.split("\r")]  # tqdm redraws with \r
    log_lines = [m.group(1) for p in pieces if (m := re.match(r"^\[rank\d+\] \d\d:\d\d:\d\d (.*)$", p))]
    messages = Counter(line.split(": ", 1)[1] for line in log_lines)  # without the logger's name
    assert [m for m, n in messages.items() if n > 1] == [], log_lines
    assert messages[f"{tmp_path / 'syn' / 'train.json'}: kept 19 of 19 records"] == 1, log_lines
    for bar in ("synthetic set: 100%|", "sft: 100%|", "strive: 100%|"):
        assert any(p.startswith(bar) for p in pieces), (bar, text[-3000:])
    assert any(p.startswith("synthetic set: 100%") and "24/24" in p for p in pieces)
    assert (out / "curves.png").stat().st_size > 1000
    if tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
        ea.Reload()
        for phase, rows in (("sft", _rl_rows(out, "sft")), ("rl", _rl_rows(out))):
            for key in ("loss", "grad_norm", "lr") + (("reward/mean", "adv/zero_var_frac") if phase == "rl" else ()):
                got = [(e.step, e.value) for e in ea.Scalars(f"{phase}/{key}")]
                assert got == [(s, pytest.approx(r[key], rel=1e-6)) for s, r in sorted(rows.items())], (phase, key)


# ------------------------------------------------------------------ non-finite values and bad videos


def _trainer(tmp_path, syn_dir, extra=()):
    from strive_engine.config import load_config
    from strive_engine.parallel import init_distributed
    from strive_engine.trainer import build_trainer

    cfg = load_config([*SMALL, f"--data.synthetic_dir={syn_dir}", f"--run.output_dir={tmp_path}", *extra])
    env = init_distributed("gloo")
    return build_trainer(cfg, env)


@pytest.fixture
def dist_cleanup():
    yield
    from strive_engine.parallel import destroy_distributed

    destroy_distributed()


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, syn_dir, monkeypatch, dist_cleanup):
    import strive_engine.update as update_mod
    from strive_engine.step import rl_step

    t = _trainer(tmp_path, syn_dir)
    before = {n: p.detach().clone() for n, p in t.root.named_parameters()}
    real = update_mod.policy_loss

    def nan_loss(*a, **k):
        loss, stats = real(*a, **k)
        return loss * float("nan"), stats

    monkeypatch.setattr(update_mod, "policy_loss", nan_loss)
    m = rl_step(t, 0)
    assert m["nonfinite_skipped_updates"] == 1 and t.optim.nonfinite_skips == 1
    for n, p in t.root.named_parameters():  # the optimizer never saw the NaN step
        assert torch.equal(p.detach(), before[n]), n
    assert not t.optim.optimizer.state  # AdamW creates its state at the first real step
    monkeypatch.setattr(update_mod, "policy_loss", real)
    m = rl_step(t, 1)
    assert m["nonfinite_skipped_updates"] == 0 and m["nonfinite_skipped_total"] == 1
    steps = {int(st["step"]) for st in t.optim.optimizer.state.values()}
    assert steps == {1}, steps  # exactly one optimizer step: the finite one


@pytest.mark.slow
def test_sft_skips_and_counts_nonfinite_updates(tmp_path, syn_dir, monkeypatch, dist_cleanup):
    import strive_engine.sft as sft_mod

    t = _trainer(tmp_path, syn_dir)
    before = {n: p.detach().clone() for n, p in t.root.named_parameters()}
    real = sft_mod.masked_ce
    monkeypatch.setattr(sft_mod, "masked_ce", lambda *a, **k: real(*a, **k) * float("nan"))
    rows = []
    sft_mod.run_sft(t, log_fn=rows.append)
    assert [r["nonfinite_skipped_updates"] for r in rows] == [1, 1]
    assert rows[-1]["nonfinite_skipped_total"] == 2
    for n, p in t.root.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


@pytest.mark.slow
def test_nan_rewards_get_zero_advantage_and_are_counted(tmp_path, syn_dir, monkeypatch, dist_cleanup):
    import strive_engine.rewards as rewards_mod
    import strive_engine.step as step_mod

    t = _trainer(tmp_path, syn_dir)
    real = rewards_mod.compute_rewards

    def some_nan(*a, **k):
        out = real(*a, **k)
        out.reward[0] = float("nan")
        return out

    monkeypatch.setattr(rewards_mod, "compute_rewards", some_nan)
    m = step_mod.rl_step(t, 0)
    assert m["adv/nan_count"] == 1 and m["nonfinite_skipped_updates"] == 0 and m["loss"] == m["loss"]


@pytest.mark.slow
def test_corrupt_video_mid_run_is_skipped_and_counted(tmp_path, dist_cleanup):
    from strive_engine.step import rl_step

    t = _trainer(tmp_path, str(tmp_path / "syn"))  # its own synthetic set: this test damages a file
    state = t.loader.state_dict()
    records = t.loader.next_batch()
    Path(records[0].path).write_bytes(b"\x00garbage" * 100)  # the next read of this video fails
    t.loader.load_state_dict(state)                           # rl_step reads that batch again
    m = rl_step(t, 0)
    assert m["data/skipped_videos"] == 1 and m["data/valid_samples"] == 0 and m["data/kept_rows"] == 0
    assert m["nonfinite_skipped_updates"] == 0


@pytest.mark.slow
def test_kl_to_frozen_reference(tmp_path, syn_dir, dist_cleanup):
    """beta > 0: a frozen copy of the policy gives ref log-probs; once the policy moves, the k3 KL is > 0 and
    the reference does not move with it."""
    import dataclasses

    import strive_engine.step as step_mod

    t = _trainer(tmp_path, syn_dir, extra=["--algorithm.beta=0.1"])
    assert t.reference is not None  # built with the trainer, complete
    with pytest.raises(ValueError, match=r"algorithm.beta = 0.1 > 0 needs the frozen reference"):
        dataclasses.replace(t, reference=None)  # a Trainer without it cannot exist
    m0 = step_mod.rl_step(t, 0)
    assert m0["loss/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    ref_before = {n: p.detach().clone() for n, p in t.reference.root.named_parameters()}
    with torch.no_grad():
        for p in t.root.parameters():  # move the policy (as training would)
            p.add_(0.05 * torch.randn_like(p))
    m1 = step_mod.rl_step(t, 1)
    assert m1["loss/kl"] > 1e-4
    for n, p in t.reference.root.named_parameters():
        assert torch.equal(p.detach(), ref_before[n]), n
    assert all(not p.requires_grad for p in t.reference.root.parameters())
    t.reference.copy_from(t.root)  # what a fresh run does after the warm start: the KL is 0 again
    assert step_mod.rl_step(t, 2)["loss/kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_on_policy_old_logprobs_come_from_the_update_forward(tmp_path, syn_dir, monkeypatch, dist_cleanup):
    """ppo_epochs = minibatches = 1: no separate old-log-prob forward; the update's own forward gives them. The
    step's loss, gradient norm, mismatch metric and updated weights equal those of a run that computes them with
    their own forward (algorithm.old_logp_forward=true), the same weights either way."""
    import strive_engine.step as step_mod
    from strive_engine.update import on_policy

    import strive_engine.rewards as rewards_mod

    calls = []
    real = step_mod.policy_logprobs
    monkeypatch.setattr(step_mod, "policy_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_rewards = rewards_mod.compute_rewards

    def spread_rewards(*a, **k):  # a random tiny model earns nothing: give the answers different rewards
        out = real_rewards(*a, **k)
        out.reward.copy_(torch.arange(out.reward.numel(), dtype=out.reward.dtype).reshape(out.reward.shape) % 3)
        return out

    monkeypatch.setattr(rewards_mod, "compute_rewards", spread_rewards)
    t_on = _trainer(tmp_path / "on", syn_dir)
    t_fwd = _trainer(tmp_path / "fwd", syn_dir, extra=["--algorithm.old_logp_forward=true"])
    assert on_policy(t_on.cfg) and not on_policy(t_fwd.cfg)
    for step in (0, 1):  # the first step's learning rate is 0 (warm-up): the second one moves the weights
        m_on = step_mod.rl_step(t_on, step)
        assert calls == [] and m_on.get("time/old_logp", 0.0) == 0.0
        m_fwd = step_mod.rl_step(t_fwd, step)
        assert calls == [1] and m_fwd["time/old_logp"] > 0
        calls.clear()
        assert m_on["data/kept_rows"] == m_fwd["data/kept_rows"] > 0
        for k in ("loss", "grad_norm", "loss/clip_frac", "rollout/logp_mismatch_mean", "rollout/logp_mismatch_max"):
            assert m_on[k] == pytest.approx(m_fwd[k], rel=1e-5, abs=1e-7), (step, k)
    p_fwd = dict(t_fwd.root.named_parameters())
    for n, p in t_on.root.named_parameters():
        torch.testing.assert_close(p.detach(), p_fwd[n].detach(), rtol=1e-5, atol=1e-6)
    fresh = dict(_trainer(tmp_path / "fresh", syn_dir).root.named_parameters())
    moved = [n for n, p in t_on.root.named_parameters() if not torch.equal(p.detach(), fresh[n].detach())]
    assert len(moved) > 10 and m_on["grad_norm"] > 0  # the steps moved the weights: the comparison is not vacuous
