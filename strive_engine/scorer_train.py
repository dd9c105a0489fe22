"""Train the learned frame scorer on a train split, and measure on a test split how often the views it picks
contain the evidence, next to uniform sampling.

    python -m strive_engine.scorer_train --train SYN/train.json --test SYN/test.json --out runs/scorer
    python -m strive_engine.scorer_train --test SYN/test.json --out runs/scorer --report-only   # measure again

Records must carry `evidence`, the [start, end) frame windows of the deciding event (the synthetic set's do):
frame t of pool row r is relevant when some window holds the pool's frame number. Training sees the train file
only. Loss, per video: the candidate pool's frames against its question, softmax(cos / tau) over the pool (tau =
keyframes.temperature, the sampler's), minus log of the mass on the evidence rows (several positives). The other
frames of the same video are the negatives: the distractor event, the static shapes and empty frames.

The report (`recall.json` in the folder, and the last stdout line): per test question, recall@1 and recall@F
(an evidence row among the top 1 / top F scores), and, over `--seeds` draws of `keyframes.select_keyframes`
(K views of F frames, keyframes.* settings), how often a view holds at least one evidence frame (`hit`) and
every evidence frame (`all`): the canonical view (evenly spaced: what held-out evaluation sees), uniform views
(uniform_mix = 1: stratified uniform) and importance views (this scorer). Overall and per task.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from strive_engine.config import KeyframeConfig
from strive_engine.data import load_records
from strive_engine.keyframes import select_keyframes
from strive_engine.learned_scorer import (DualEncoder, DualEncoderConfig, LearnedScorer, LearnedScorerError,
                                          build_vocab, encode_texts, resize_frames, save_scorer)
from strive_engine.video import PyAVSource

log = logging.getLogger(__name__)


@dataclass
class PoolSet:
    """Decoded candidate pools of a records file, at the scorer's input size.

    frames    uint8 (N, P, S, S, 3)     relevant  bool (N, P): the pool row shows an evidence frame
    questions N strings                 tasks     N categories (the record's `task`, else "")
    """

    frames: torch.Tensor
    relevant: torch.Tensor
    questions: list[str]
    tasks: list[str]
    full_frames: list[torch.Tensor] | None = None  # uint8 (P, H, W, 3) per record, kept for the view report

    def __len__(self) -> int:
        return len(self.questions)


def load_pools(records_path: str | Path, pool_frames: int, image_size: int, keep_full: bool = False) -> PoolSet:
    """Decode every record's candidate pool (P frames spread over the video, as training decodes them) and mark
    its evidence rows. Records without `evidence`, or whose video is shorter than the pool, are an error."""
    path = Path(records_path)
    records, _ = load_records(path, quiet=True)
    raw = json.loads(path.read_text())
    evidence = {str(r.get("problem_id")): r.get("evidence") for r in raw if isinstance(r, dict)}
    missing = [r.id for r in records if not evidence.get(r.id)]
    if missing:
        raise LearnedScorerError(f"{path}: {len(missing)} record(s) without 'evidence' windows (e.g. problem_id "
                                 f"{missing[0]}); the learned scorer trains and is measured on records that say "
                                 f"which frames decide the answer")
    source = PyAVSource()
    frames, relevant, full = [], [], []
    for rec in records:
        pool = source.read(rec.path, num_frames=pool_frames)
        if pool.frames.shape[0] != pool_frames:
            raise LearnedScorerError(f"{rec.path}: {pool.frames.shape[0]} frames, the pool needs {pool_frames}")
        idx = pool.indices.tolist()
        rel = [any(s <= t < e for s, e in evidence[rec.id]) for t in idx]
        frames.append(resize_frames(pool.frames, image_size))
        relevant.append(torch.tensor(rel, dtype=torch.bool))
        if keep_full:
            full.append(pool.frames)
    return PoolSet(torch.stack(frames), torch.stack(relevant), [r.question for r in records],
                   [r.category for r in records], full if keep_full else None)


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- training


def pool_loss(model: DualEncoder, frames: torch.Tensor, relevant: torch.Tensor, text_ids: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """Mean over V videos of -log(softmax mass on the evidence rows) of cos(frame, question) / tau.

    frames uint8 (V, M, S, S, 3), relevant bool (V, M) (>= 1 per video), text_ids (V, L)."""
    from strive_engine.learned_scorer import preprocess_frames

    V, M = relevant.shape
    f = model.frame(preprocess_frames(frames.flatten(0, 1), model.cfg.image_size)).view(V, M, -1)  # (V, M, D)
    q = model.text(text_ids)                                                                      # (V, D)
    logits = torch.einsum("vmd,vd->vm", f, q) / temperature                                       # (V, M)
    pos = logits.masked_fill(~relevant, float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(pos, 1)).mean()


def train_scorer(train: PoolSet, *, epochs: int = 6, videos_per_step: int = 8, frames_per_video: int = 32,
                 lr: float = 3e-3, temperature: float = 0.1, embed_dim: int = 64, seed: int = 0,
                 channels: tuple[int, ...] = (32, 64, 64, 64),
                 log_every: int = 20) -> tuple[DualEncoder, dict[str, int], dict]:
    """Adam over `epochs` passes of the train pools; each step takes `videos_per_step` videos, each with its
    evidence rows plus random other rows of its pool up to `frames_per_video` (all rows when >= P).
    Returns the model (eval mode), its vocabulary and the training log (loss per logged step, seconds)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    N, P = train.relevant.shape
    vocab = build_vocab(train.questions)
    cfg = DualEncoderConfig(vocab_size=len(vocab), image_size=int(train.frames.shape[2]), channels=channels,
                            embed_dim=embed_dim, temperature=temperature)
    model = DualEncoder(cfg)
    text_ids = encode_texts(train.questions, vocab)                                 # (N, L)
    M = min(frames_per_video, P)
    steps = epochs * math.ceil(N / videos_per_step)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    losses, step, t0 = [], 0, time.perf_counter()
    model.train()
    for _epoch in range(epochs):
        order = torch.randperm(N, generator=g)
        for lo in range(0, N, videos_per_step):
            vids = order[lo:lo + videos_per_step]
            rows = torch.stack([_rows(train.relevant[v], M, g) for v in vids.tolist()])  # (V, M)
            frames = train.frames[vids[:, None], rows]                                 # (V, M, S, S, 3)
            rel = train.relevant[vids[:, None], rows]                                  # (V, M)
            loss = pool_loss(model, frames, rel, text_ids[vids], temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0 or step == steps:
                value = float(loss.detach())
                losses.append((step, round(value, 4)))
                log.info("scorer step %d/%d loss %.4f (%.0f s)", step, steps, value, time.perf_counter() - t0)
    model.eval()
    return model, vocab, {"steps": step, "loss": losses, "seconds": round(time.perf_counter() - t0, 1)}


def _rows(relevant: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    """m distinct pool rows: every relevant row (up to m), then random others; sorted."""
    pos = relevant.nonzero().flatten()[:m]
    neg = (~relevant).nonzero().flatten()
    neg = neg[torch.randperm(len(neg), generator=g)[:m - len(pos)]]
    return torch.cat([pos, neg]).sort().values


# ------------------------------------------------------------------------------------------ measuring


def retrieval_report(scorer, pools: PoolSet, kcfg: KeyframeConfig, num_variants: int = 4,
                     seeds: int = 8) -> dict:
    """recall@1, recall@F and view hit rates (canonical / uniform / importance) over `pools` (see module doc)."""
    if pools.full_frames is None:
        raise ValueError("retrieval_report needs load_pools(..., keep_full=True)")
    F, K = kcfg.num_frames, num_variants
    scorer = _Cached(scorer)  # each pool is embedded once, not once per draw
    rows = []  # per record: dict of 0/1 outcomes
    with torch.no_grad():
        for i, (frames, rel, q) in enumerate(zip(pools.full_frames, pools.relevant, pools.questions)):
            s = scorer.embed_frames(frames).cpu() @ scorer.embed_text([q]).cpu()[0]  # (P,) cosines (unit norm)
            top = s.topk(min(F, len(s))).indices
            rows.append({"task": pools.tasks[i], "recall@1": float(rel[int(s.argmax())]),
                         f"recall@{F}": float(rel[top].any())})
    uniform = KeyframeConfig(num_frames=F, temperature=kcfg.temperature, uniform_mix=1.0)
    views = {"canonical": [[] for _ in rows], "uniform": [[] for _ in rows], "importance": [[] for _ in rows]}
    for seed in range(seeds):
        for name, cfg in (("importance", kcfg), ("uniform", uniform)):
            sel = select_keyframes(scorer, pools.full_frames, pools.questions, cfg, num_variants=K, seed=seed)
            for b, rel in enumerate(pools.relevant):
                idx = sel.indices[b].cpu()                                   # (K, F)
                if name == "importance" and seed == 0:
                    views["canonical"][b].append(_hit(rel, idx[0]))
                views[name][b] += [_hit(rel, idx[k]) for k in range(1, K)]
    for b, r in enumerate(rows):
        for name, outcomes in views.items():
            r[f"{name}_hit"] = sum(h for h, _ in outcomes[b]) / len(outcomes[b])
            r[f"{name}_all"] = sum(a for _, a in outcomes[b]) / len(outcomes[b])
    keys = [k for k in rows[0] if k != "task"]
    mean = lambda rs, k: round(sum(r[k] for r in rs) / len(rs), 4)  # noqa: E731
    out = {"n": len(rows), **{k: mean(rows, k) for k in keys}, "per_task": {}}
    for task in sorted({r["task"] for r in rows}):
        rs = [r for r in rows if r["task"] == task]
        out["per_task"][task] = {"n": len(rs), **{k: mean(rs, k) for k in keys}}
    out["settings"] = {"F": F, "K": K, "P": int(pools.relevant.shape[1]), "temperature": kcfg.temperature,
                       "uniform_mix": kcfg.uniform_mix, "seeds": seeds,
                       "evidence_frames_mean": round(float(pools.relevant.sum(1).float().mean()), 3)}
    return out


class _Cached:
    """A FrameScorer that remembers each frames tensor's embedding (by identity) for repeated draws."""

    def __init__(self, scorer):
        self.scorer, self.frames = scorer, {}

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        key = (id(frames), frames.data_ptr(), tuple(frames.shape))
        if key not in self.frames:
            self.frames[key] = (frames, self.scorer.embed_frames(frames))  # holding `frames` keeps its id unique
        return self.frames[key][1]

    def embed_text(self, texts):
        return self.scorer.embed_text(texts)


def _hit(relevant: torch.Tensor, idx: torch.Tensor) -> tuple[int, int]:
    """(the view shows some evidence row, the view shows every evidence row)."""
    wanted = set(relevant.nonzero().flatten().tolist())
    return int(bool(relevant[idx].any())), int(wanted <= set(idx.tolist()))


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m strive_engine.scorer_train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--train", help="records with evidence windows to train on (the train split only)")
    ap.add_argument("--test", required=True, help="records to measure on (the test split)")
    ap.add_argument("--out", required=True, help="scorer folder (config.json, vocab.json, model.safetensors)")
    ap.add_argument("--report-only", action="store_true", help="load --out and measure, no training")
    ap.add_argument("--pool-frames", type=int, default=64, help="P: candidate frames per video (video.pool_frames)")
    ap.add_argument("--num-frames", type=int, default=8, help="F: frames per view (keyframes.num_frames)")
    ap.add_argument("--num-variants", type=int, default=4, help="K: views drawn per question in the report")
    ap.add_argument("--temperature", type=float, default=0.1, help="tau (keyframes.temperature); also the loss's")
    ap.add_argument("--uniform-mix", type=float, default=0.3, help="lambda (keyframes.uniform_mix) of the report")
    ap.add_argument("--image-size", type=int, default=56, help="frames are squashed to this square")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--videos-per-step", type=int, default=8)
    ap.add_argument("--frames-per-video", type=int, default=32, help="pool rows per video per step (evidence first)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=8, help="keyframe draws per question in the report")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    kcfg = KeyframeConfig(num_frames=a.num_frames, temperature=a.temperature, uniform_mix=a.uniform_mix,
                          scorer="learned", scorer_path=a.out)
    try:
        if not a.report_only:
            if not a.train:
                ap.error("--train is required unless --report-only")
            t0 = time.perf_counter()
            train = load_pools(a.train, a.pool_frames, a.image_size)
            log.info("decoded %d train pools in %.1f s", len(train), time.perf_counter() - t0)
            model, vocab, info = train_scorer(train, epochs=a.epochs, videos_per_step=a.videos_per_step,
                                       frames_per_video=a.frames_per_video, lr=a.lr, temperature=a.temperature,
                                       seed=a.seed)
            model.cfg.trained_on = {"records": str(Path(a.train).resolve()), "sha256": file_digest(a.train),
                                    "n": len(train), "pool_frames": a.pool_frames, "epochs": a.epochs,
                                    "videos_per_step": a.videos_per_step, "frames_per_video": a.frames_per_video,
                                    "lr": a.lr, "seed": a.seed, **info}
            save_scorer(model, vocab, a.out)
        scorer = LearnedScorer.load(a.out)
        test = load_pools(a.test, a.pool_frames, scorer.model.cfg.image_size, keep_full=True)
        report = retrieval_report(scorer, test, kcfg, a.num_variants, a.seeds)
    except (LearnedScorerError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    report.update({"scorer": str(Path(a.out).resolve()), "test": str(Path(a.test).resolve()),
                   "trained_on": scorer.model.cfg.trained_on})
    (Path(a.out) / "recall.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
