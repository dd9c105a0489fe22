"""Train a video-language model with STRIVE (or GRPO / Dr.GRPO / DAPO / T-GRPO) on FSDP2.

    torchrun --nproc_per_node 2 -m strive_engine.train                       # the embedded default (CPU)
    torchrun --nproc_per_node 8 -m strive_engine.train --recipe qwen25vl_7b --model.path=/ckpt --data.path=/d.json
    torchrun ... -m strive_engine.train --checkpoint.resume=true              # continue exactly, or fail clearly
    torchrun ... -m strive_engine.train --checkpoint.resume=auto              # continue if there is something
    python -m strive_engine.train --recipe qwen25vl_7b --help                 # every option, with the value it takes

A user error (missing records file, bad model folder, unusable checkpoint, bad option) prints one line and exits
2 (rank 0 alone prints it under torchrun); `--debug` or STRIVE_DEBUG=1 shows the traceback (strive_engine.cli).

Stages: config → distributed → resume point (verified, config compared) → the trainer (data → model → FSDP2 →
optimizer → KL reference: `trainer.build_trainer`) → output folder → resume (`checkpoint.Checkpointer.resume`) →
(SFT warm start, `sft.run_sft`) → RL loop → HF export + plot. One RL step is `step.rl_step`. SFT alone, then the
export: `--run.steps=0`.

The output folder keeps every run's logs: a fresh start moves an earlier run's `metrics.jsonl`, `config.json` and
`checkpoints/` aside to `<name>.N` (next free N); a resume keeps the first `config.json`, records its own config
as `config.resume_step<S>.json` when it differs, and copies `metrics.jsonl` to `metrics.jsonl.N` before dropping
the rows the killed run logged after its checkpoint.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

from strive_engine.checkpoint import Checkpointer, ResumePoint, export_hf
from strive_engine.cli import config_from_cli, run_main, setup_logging
from strive_engine.config import Config
from strive_engine.metrics import MetricsLogger, plot_run, read_metrics, require_tensorboard
from strive_engine.parallel import DistEnv, barrier, destroy_distributed, init_distributed, seed_everything
from strive_engine.pipeline import SkipTally, decode_batch
from strive_engine.sft import run_sft
from strive_engine.step import rl_step
from strive_engine.trained_settings import refuse_tiny_recipe_for_checkpoint
from strive_engine.trainer import build_trainer
from strive_engine.video.prefetch import Prefetcher

log = logging.getLogger("strive_engine")


def rotate(path: Path) -> Path:
    """Move `path` (file or folder) to `<name>.N`, N the next free number; returns the new path."""
    n = 1
    while (dest := path.with_name(f"{path.name}.{n}")).exists():
        n += 1
    path.rename(dest)
    return dest


def prepare_output(out: Path, cfg: Config, resumed: ResumePoint | None) -> None:
    """Rank 0: the output folder for a fresh start or a resume; never deletes an earlier run's logs."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, config = out / cfg.logging.metrics_file, out / "config.json"
    text = json.dumps(cfg.to_dict(), indent=1)
    if resumed is None:
        earlier = [p for p in (metrics, config) if p.exists()]
        ckpts = out / "checkpoints"
        if ckpts.is_dir() and any(ckpts.iterdir()):
            earlier.append(ckpts)
        for p in earlier:
            log.warning("starting afresh in %s: moved the earlier run's %s to %s", out, p.name, rotate(p).name)
        config.write_text(text)
        return
    if not config.exists():
        config.write_text(text)
    elif json.loads(config.read_text()) != cfg.to_dict():
        (out / f"config.resume_step{resumed.step}.json").write_text(text)
    if metrics.exists():
        # Rows the killed run logged after its checkpoint are recomputed: keep a copy, then drop them.
        rows = read_metrics(metrics)
        keep = [r for r in rows if r.get("phase") != "rl" or r["step"] < resumed.step]
        if len(keep) < len(rows):
            log.info("resuming at step %d: the full log is kept as %s", resumed.step, rotate(metrics).name)
            metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 for a user error (one line; strive_engine.cli.run_main)."""
    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    cfg = config_from_cli(argv)
    refuse_tiny_recipe_for_checkpoint(cfg, argv)  # a Qwen checkpoint under debug_cpu's tiny-model prompt: refused
    if cfg.logging.tensorboard:
        require_tensorboard()  # every rank, before any work: a missing package is a one-line error
    env = init_distributed(cfg.parallel.backend)
    setup_logging(cfg.logging.log_level)
    seed_everything(cfg.run.seed + env.rank)
    out = Path(cfg.run.output_dir)
    ckpt = Checkpointer(out / "checkpoints", env, cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                        config=cfg.to_dict())
    try:
        return _run(cfg, env, out, ckpt)
    finally:
        ckpt.close(wait=False)  # a normal exit waited already; after an error, do not wait on peers


def _run(cfg: Config, env: DistEnv, out: Path, ckpt: Checkpointer) -> int:
    # ---- resume point first (verified against its manifest, config compared): a bad resume fails in seconds
    resumed = ckpt.find_resume(cfg.checkpoint.resume, cfg.checkpoint.allowed_changes)
    t = build_trainer(cfg, env)  # before the output folder: a bad records file or model touches nothing
    skips = SkipTally(cfg.data.max_empty_steps, t.loader.report)  # what the run skips and why; stops a run of none
    if env.is_main:
        prepare_output(out, cfg, resumed)
    barrier()

    # ---- resume: model, optimizer, KL reference, scheduler, data position, RNG
    start = ckpt.resume(resumed, t) if resumed is not None else 0
    metrics_path = out / cfg.logging.metrics_file
    tb = out / "tb" if cfg.logging.tensorboard else None

    # ---- supervised warm start (fresh runs only: a checkpoint already holds the warmed-up weights)
    if cfg.sft.steps and resumed is None:
        sft_log = MetricsLogger(metrics_path, enabled=env.is_main, total_steps=cfg.sft.steps,
                                progress=cfg.logging.progress, desc="sft", tensorboard_dir=tb)
        def sft_row(row: dict) -> None:  # every rank: the skipped count is global, so all stop together
            sft_log.log(row)
            skips.empty_step(cfg.sft.batch_size * env.world_size - row["data/skipped_videos"], "SFT", row["step"])

        run_sft(t, log_fn=sft_row, on_decoded=skips.add)
        sft_log.close()

    # ---- the frozen KL reference (beta > 0) of a fresh run: the policy as RL starts (after SFT)
    if t.reference is not None and resumed is None:
        t.reference.copy_from(t.root)

    # ---- RL loop; the next batch's videos decode on a background thread while a step runs; checkpoints are
    # written on a background thread too ("time/checkpoint" is the stall: the CPU copy of the state)
    batches = Prefetcher(t.loader, functools.partial(decode_batch, source=t.source, pool_frames=cfg.video.pool_frames,
                                                     device=env.device),
                         depth=cfg.video.prefetch_batches, on_next=lambda _, decoded: skips.add(decoded))
    rl_log = MetricsLogger(metrics_path, enabled=env.is_main, total_steps=cfg.run.steps, initial_step=start,
                           progress=cfg.logging.progress and cfg.run.steps > start, desc=cfg.algorithm.preset,
                           tensorboard_dir=tb)
    every = cfg.checkpoint.every
    for step in range(start, cfg.run.steps):
        m = rl_step(t, step, batches)
        if (every and (step + 1) % every == 0) or step + 1 == cfg.run.steps:
            with t.timer("checkpoint"):
                ckpt.save_trainer(step + 1, t, batches.state_dict())
            m.update(t.timer.reset())
        rl_log.log(m)
        skips.empty_step(m["data/valid_samples"], "RL", step)  # global count: every rank stops at the same step
    rl_log.close()
    batches.close()
    ckpt.wait()  # the last checkpoint is COMPLETE before the export and the exit
    counts = skips.global_counts()  # collective: summed over ranks
    if env.is_main:
        log.log(logging.WARNING if skips.num_skipped(counts) else logging.INFO, "skipped in this run: %s",
                skips.summary(counts))

    # ---- export (weights in the source's dtype, its tokenizer/processor/generation files, the run's settings) + plot
    if cfg.checkpoint.export_hf:
        export_hf(t.root, t.policy.hf, t.tokenizer, out / "hf", env, source=cfg.model.path,
                  dtype=cfg.checkpoint.export_dtype, settings=cfg)
    if env.is_main and cfg.logging.plot and metrics_path.exists():
        png = plot_run(out, cfg.logging.metrics_file)
        log.info("wrote %s and %s", metrics_path, png)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
