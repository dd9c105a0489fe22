"""Evaluate a policy on a Video-R1-format benchmark file: accuracy overall, per problem type, per category.

    python -m strive_engine.evaluate --model.path=runs/debug_cpu/hf                # synthetic test split
    torchrun --nproc_per_node 8 -m strive_engine.evaluate --recipe qwen25vl_7b \
        --model.path=/ckpt --data.eval_path=/evals/eval_videomme.json --eval.frames=importance

Records are sharded over ranks; each rank appends one JSON line per record to
`<eval.output_dir>/predictions.rank<r>.jsonl` as it goes, so an interrupted run continues where it stopped
(`eval.resume`). Rank 0 merges every rank's lines into `report.json`.

Resuming is keyed by identity, not by record id alone: `identity.json` in the folder holds the model's resolved
path, the SHA-256 of its config.json, and for every weight file its name, size, modification time and the SHA-256
of its safetensors header, plus every setting that shapes a prediction (records file, frames, decoding). Every
prediction line carries the identity's hash and the report counts only lines with the current one. When the
folder holds predictions of another identity (another model, other weights, other settings), the run starts that
folder afresh with a warning: the earlier files are moved to `superseded/<N>/`, never deleted or credited
(`eval.resume=false` moves them there too).

Settings: a model exported by `strive_engine.train` carries the settings it was trained with (`strive_settings.json`:
prompt style, completion length and sampling, pool size, keyframes, pixels per frame; see
strive_engine.trained_settings). Evaluate uses them, whatever the recipe, unless a field is set on the command line;
`report.json` records the settings it ran with (`settings`, and where each came from) and the model's identity. A
checkpoint without saved settings uses the recipe's; under the default recipe a Qwen checkpoint is refused (the
tiny model's prompt), with a message naming the recipe to use. Without `--eval.output_dir` the results go to the
evaluated model's own folder, `<model.path>/eval` (or, when that is not writable, `<runs>/eval/<name>-<hash of its
path>`; for the random-weight model `<runs>/eval/random-<identity>`), never into a training run's `eval/`.

Frames: the same decoding and sampling as training — `uniform` is the canonical view (evenly spaced keyframes,
full frame); `importance` is one question-aware view (keyframes.* settings). A video that cannot be decoded is
skipped and counted, never fatal.

When the model is a training run's export (`<run>/hf` next to `<run>/metrics.jsonl`), rank 0 also appends the
held-out accuracy to the run's metrics.jsonl (a `phase` "eval" row) and redraws `<run>/curves.png` with it.
A bad model folder, a missing records file or a bad option prints one line and exits 2, before the output
folder is touched (`--debug` shows the traceback; strive_engine.cli).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from strive_engine.cli import config_from_cli, run_main, setup_logging
from strive_engine.config import Config, ConfigError
from strive_engine.data import load_records, shard_records
from strive_engine.keyframes import FrameScorer, build_scorer, select_keyframes
from strive_engine.metrics import append_heldout, plot_run
from strive_engine.model import build_model
from strive_engine.parallel import barrier, destroy_distributed, init_distributed
from strive_engine.pipeline import DecodedBatch, decode_batch
from strive_engine.policy import Policy
from strive_engine.rewards import accuracy_reward, format_reward
from strive_engine.rollout import RolloutRequest, generate_rollouts
from strive_engine.synthetic import ensure_synthetic
from strive_engine.trained_settings import adopt_training_settings
from strive_engine.video import build_source
from strive_engine.views import ViewBuilder, full_frame

log = logging.getLogger("strive_engine.evaluate")


def eval_records_path(cfg: Config) -> Path:
    if cfg.data.eval_path:
        return Path(cfg.data.eval_path)
    if cfg.data.path:
        raise ConfigError("data.eval_path: set it (the synthetic test split is only the default for the embedded set)")
    _, test = ensure_synthetic(os.path.expanduser(cfg.data.synthetic_dir), cfg.data.synthetic_size,
                               cfg.data.synthetic_seed, progress=cfg.logging.progress, **cfg.data.synthetic_options)
    return test


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_identity(model_cfg) -> dict:
    """What identifies the evaluated weights: resolved path, config hash, and per weight file its size,
    modification time and safetensors-header hash (names, dtypes, shapes, offsets; read without loading).
    The tiny random model is identified by its settings and this process's torch seed (it is random per run
    unless seeded)."""
    if not model_cfg.path:
        return {"tiny_random": dataclasses.asdict(model_cfg), "torch_seed": torch.initial_seed()}
    folder = Path(model_cfg.path).expanduser().resolve()
    ident: dict = {"path": str(folder), "files": {}}
    cfg_file = folder / "config.json"
    ident["config_sha256"] = _sha256(cfg_file.read_bytes()) if cfg_file.is_file() else None
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        st = f.stat()
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if f.suffix == ".safetensors" and st.st_size >= 8:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                entry["header_sha256"] = _sha256(fh.read(min(n, st.st_size - 8)))
        ident["files"][f.name] = entry
    return ident


def eval_identity(cfg: Config, records_path: Path) -> tuple[dict, str]:
    """(identity, short hash): the model plus every setting that shapes a prediction."""
    ident = {"model": model_identity(cfg.model),
             "records": str(Path(records_path).expanduser().resolve()),
             "settings": {"eval": {k: getattr(cfg.eval, k) for k in ("frames", "greedy")},
                          "keyframes": dataclasses.asdict(cfg.keyframes), "variants": dataclasses.asdict(cfg.variants),
                          "video.pool_frames": cfg.video.pool_frames, "rollout": dataclasses.asdict(cfg.rollout),
                          "seed": cfg.run.seed}}
    return ident, _sha256(json.dumps(ident, sort_keys=True, default=str).encode())[:16]


def default_output_dir(cfg: Config, key: str) -> Path:
    """Where results go without --eval.output_dir: a folder of the evaluated model's own (see the module docstring)."""
    runs = Path(cfg.run.output_dir).parent / "eval"
    if not cfg.model.path:
        return runs / f"random-{key[:8]}"
    folder = Path(cfg.model.path).expanduser().resolve()
    if os.access(folder, os.W_OK):
        out = folder / "eval"
    else:  # a read-only checkpoint store
        name = f"{folder.parent.name}-{folder.name}" if folder.name == "hf" else folder.name
        out = runs / f"{name}-{_sha256(str(folder).encode())[:8]}"
    log.info("eval.output_dir not set: results go to %s (the evaluated model's folder)", out)
    return out


def report_settings(cfg: Config, origin: dict) -> dict:
    """The settings a report ran with: prompt, frames, pixels, decoding, and where each came from."""
    return {"prompt": cfg.rollout.prompt, "frames": cfg.eval.frames, "num_frames": cfg.keyframes.num_frames,
            "pool_frames": cfg.video.pool_frames, "min_pixels": cfg.variants.min_pixels,
            "max_pixels": cfg.variants.max_pixels, "max_new_tokens": cfg.rollout.max_new_tokens,
            "greedy": cfg.eval.greedy, "settings_file": origin.get("settings"),
            "from": {k: origin["fields"][k] for k in ("rollout.prompt", "keyframes.num_frames", "video.pool_frames",
                                                      "variants.min_pixels", "variants.max_pixels",
                                                      "rollout.max_new_tokens") if k in origin.get("fields", {})}}


def claim_output(out: Path, ident: dict, key: str, resume: bool) -> None:
    """Rank 0: make `out` hold only predictions of identity `key`. Earlier files of another identity (or all of
    them when resume is off) are moved to out/superseded/<N>/ with a warning."""
    id_file = out / "identity.json"
    previous = json.loads(id_file.read_text()) if id_file.is_file() else None
    files = sorted(out.glob("predictions.rank*.jsonl")) + [p for p in (out / "report.json", id_file) if p.exists()]
    same = previous is not None and previous.get("key") == key
    if files and not (resume and same):
        n = 1
        while (dest := out / "superseded" / str(n)).exists():
            n += 1
        dest.mkdir(parents=True)
        for f in files:
            shutil.move(str(f), dest / f.name)
        why = "eval.resume=false" if not resume else (
            "they were made by another model or other settings" if previous else "they carry no identity")
        old_model = (previous or {}).get("identity", {}).get("model", {}).get("path", "unknown")
        log.warning("%s held predictions that are not resumed (%s; earlier model: %s): moved to %s; starting "
                    "this folder afresh", out, why, old_model, dest)
    id_file.write_text(json.dumps({"key": key, "identity": ident}, indent=1, default=str))


def read_predictions(path: Path, key: str) -> list[dict]:
    """The prediction lines of identity `key` in `path`; a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            log.warning("%s: skipping an unreadable line (a run killed while writing it)", path)
            continue
        if isinstance(r, dict) and r.get("key") == key:
            rows.append(r)
    return rows


def eval_requests(decoded: DecodedBatch, views: ViewBuilder, cfg: Config, scorer: FrameScorer | None,
                  seed: int) -> list[RolloutRequest]:
    """One view per question, full frame: the canonical frames (eval.frames=uniform, scorer None) or one
    importance-sampled set (eval.frames=importance)."""
    if scorer is None:
        return views.canonical(decoded.records, decoded.pools, cfg.keyframes.num_frames)
    with torch.no_grad():
        sel = select_keyframes(scorer, [p.frames for p in decoded.pools], [r.question for r in decoded.records],
                               cfg.keyframes, num_variants=1, seed=seed, canonical_first=False)
    return views.build(decoded.records, decoded.pools, list(sel.indices), [full_frame(p) for p in decoded.pools])


def summarise(rows: list[dict]) -> dict:
    """Accuracy overall / per problem type / per category over the scored rows; skipped ones counted."""
    scored = [r for r in rows if "error" not in r]
    groups: dict[str, dict[str, list[float]]] = {"problem_type": defaultdict(list), "category": defaultdict(list)}
    for r in scored:
        groups["problem_type"][r["problem_type"]].append(r["accuracy"])
        groups["category"][r["category"] or "(none)"].append(r["accuracy"])

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    skipped = defaultdict(int)
    for r in rows:
        if "error" in r:
            skipped[r["error"]] += 1
    return {"num_records": len(rows), "num_scored": len(scored), "skipped": dict(skipped),
            "accuracy": mean([r["accuracy"] for r in scored]), "format": mean([r["format"] for r in scored]),
            "per_problem_type": {k: {"n": len(v), "accuracy": mean(v)} for k, v in sorted(groups["problem_type"].items())},
            "per_category": {k: {"n": len(v), "accuracy": mean(v)} for k, v in sorted(groups["category"].items())}}


def note_in_run(cfg: Config, summary: dict, records: Path) -> None:
    """Rank 0: when the model is a run's export (<run>/hf beside <run>/metrics.jsonl), append the held-out
    accuracy to the run's metrics and redraw its curves.png."""
    model = Path(cfg.model.path).expanduser() if cfg.model.path else None
    if model is None or model.name != "hf" or not (model.parent / cfg.logging.metrics_file).is_file():
        return
    append_heldout(model.parent / cfg.logging.metrics_file, summary, str(records))
    if cfg.logging.plot:
        log.info("held-out accuracy added to %s", plot_run(model.parent, cfg.logging.metrics_file))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 for a user error (one line; strive_engine.cli.run_main)."""
    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    cfg = config_from_cli(argv)
    env = init_distributed(cfg.parallel.backend)
    setup_logging(cfg.logging.log_level)
    cfg, origin = adopt_training_settings(cfg, argv)  # the export's training settings, unless set on the command line

    # ---- model first: a bad model folder fails in seconds, before the synthetic set is generated and before the
    # output folder is touched. A full replica per rank (evaluation needs no sharding for models that fit one device)
    hf, tokenizer = build_model(cfg.model, env.device)
    hf.eval()
    policy = Policy(hf, share_prompts=cfg.model.share_prompts, shared_attention=cfg.model.shared_attention)
    path = eval_records_path(cfg)
    records, report = load_records(path, video_root=cfg.data.video_root or None, extra_roots=cfg.data.extra_roots,
                                   quiet=not env.is_main)
    if cfg.eval.max_records:
        records = records[: cfg.eval.max_records]
    ident, key = eval_identity(cfg, path)
    out = Path(cfg.eval.output_dir) if cfg.eval.output_dir else default_output_dir(cfg, key)
    out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        claim_output(out, ident, key, cfg.eval.resume)
    barrier()

    # ---- this rank's shard of the records, minus what an interrupted run of the same identity already wrote
    mine = shard_records(records, env.rank, env.world_size)
    pred_path = out / f"predictions.rank{env.rank}.jsonl"
    done = set()
    if pred_path.exists():  # claim_output left only lines of this identity
        done = {r["id"] for r in read_predictions(pred_path, key)}
    todo = [r for r in mine if r.id not in done]
    log.info("evaluating %d records on this rank (%d already done)", len(todo), len(mine) - len(todo))
    scorer = build_scorer(cfg.keyframes, model=hf, tokenizer=tokenizer) if cfg.eval.frames == "importance" else None
    source = build_source(cfg.video, env.device)
    views = ViewBuilder.for_model(hf.config, cfg.variants)
    rollout_cfg = dataclasses.replace(cfg.rollout, num_generations=1, do_sample=not cfg.eval.greedy)

    # ---- batched decoding; one JSON line per record, appended as soon as it is scored
    bar = tqdm(total=len(todo), desc="evaluate" if env.world_size == 1 else "evaluate (rank 0's shard)",
               unit="question", disable=not (env.is_main and cfg.logging.progress), dynamic_ncols=True)
    with open(pred_path, "a") as fh:
        for i in range(0, len(todo), cfg.eval.batch_size):
            batch = todo[i:i + cfg.eval.batch_size]
            decoded = decode_batch(batch, source, cfg.video.pool_frames,
                                   device=env.device)  # the pools where the model is: crops on its device
            for rec, ok in zip(batch, decoded.valid.tolist()):
                if not ok:
                    fh.write(json.dumps({"id": rec.id, "key": key, "category": rec.category,
                                         "problem_type": rec.problem_type, "error": "undecodable video"}) + "\n")
            keep = [b for b, ok in enumerate(decoded.valid.tolist()) if ok]
            if keep:
                sub = type(decoded)([batch[b] for b in keep], [decoded.pools[b] for b in keep],
                                    decoded.valid[keep], decoded.skipped)
                reqs = eval_requests(sub, views, cfg, scorer, seed=cfg.run.seed + i)
                rb = generate_rollouts(policy, tokenizer, reqs, rollout_cfg, cfg.run.seed + i)
                for rec, text in zip(sub.records, rb.texts):
                    fh.write(json.dumps({"id": rec.id, "key": key, "category": rec.category,
                                         "problem_type": rec.problem_type,
                                         "answer": rec.answer, "prediction": text,
                                         "accuracy": accuracy_reward(text, rec.answer, rec.problem_type),
                                         "format": format_reward(text)}) + "\n")
            fh.flush()
            bar.update(len(batch))
    bar.close()
    barrier()

    # ---- report (rank 0): every rank's lines, deduplicated by id
    if env.is_main:
        rows = {}
        for p in sorted(out.glob("predictions.rank*.jsonl")):
            for r in read_predictions(p, key):  # only this identity's predictions are credited
                rows[r["id"]] = r
        wanted = {r.id for r in records}
        summary = summarise([r for k, r in rows.items() if k in wanted])
        summary.update({"records": str(path), "model": cfg.model.path or "(tiny random model)", "identity": key,
                        "frames": cfg.eval.frames, "num_frames": cfg.keyframes.num_frames, "greedy": cfg.eval.greedy,
                        "settings": report_settings(cfg, origin), "model_identity": ident["model"]})
        (out / "report.json").write_text(json.dumps(summary, indent=1))
        log.info("accuracy %.4f over %d records (%s skipped) -> %s", summary["accuracy"], summary["num_scored"],
                 sum(summary["skipped"].values()), out / "report.json")
        print(json.dumps({k: summary[k] for k in ("accuracy", "num_scored", "per_problem_type")}))
        note_in_run(cfg, summary, path)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
