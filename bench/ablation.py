"""STRIVE's parts one at a time, on a task where they should matter: matched rollouts per question, one warm start.

    python bench/ablation.py                                  # the README's run: small-object task, 5 arms, 5 seeds
    python bench/ablation.py --task demo --arms grpo,per_variant,strive --seeds 0,1,2 --steps 60 --sft-steps 800
    python bench/ablation.py --from-json bench/results/ablation-<date>.json   # table + plot again

Tasks. `small` (default): strive_engine.synthetic's small-object family (small_colour, small_count: 64-frame clips,
the evidence 1-2 frames, <= 3 % of the frame, named by the question next to a distractor event), F=8 of P=64 frames
at 56x56 pixels, question-aware keyframes from the learned scorer (strive_engine.scorer_train, trained on the train
split only). `demo`: the embedded default's task (the 2026-11-26 run), the recipe's own scorer.

Stages, each cached in --out and reused when present: 1. the synthetic set; 2. (small) the learned scorer and its
frame-retrieval report on the test split (recall.json); 3. one SFT warm start on the canonical view, exported and
evaluated; 4. per arm and seed: RL from the warm start, export, held-out evaluation (greedy, canonical view: evenly
spaced frames, no crop). Arms, each with K*G rollouts per question:
    grpo               K=1 view (the canonical one), K*G answers, advantages per group          (plain GRPO)
    per_variant        K views, G answers each, advantages within each (question, view)        (GRPO per view)
    strive             K views (importance keyframes + crops), advantages jointly over K*G      (STRIVE, all parts)
    strive_uniform_kf  STRIVE with uniform keyframes (keyframes.uniform_mix=1): crops only
    strive_no_crop     STRIVE on full frames (crops of the whole frame): keyframes only
Per arm (mean ± sd over seeds): held-out accuracy, also on the test questions whose canonical view shows / misses
the evidence; training accuracy; dead-group fraction (the arm's grouping, and per view); reward std per step (over
the step's rollouts); variance of the gradient norm across steps (pre-clip); wall time per run. Nothing is tuned
on the test split. Writes bench/results/ablation-<date>.{json,png} (curves with seed bands); last stdout line JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("grpo", "per_variant", "strive", "strive_uniform_kf", "strive_no_crop")
COLOURS = {"grpo": "tab:gray", "per_variant": "tab:blue", "strive": "tab:red", "strive_uniform_kf": "tab:orange",
           "strive_no_crop": "tab:purple"}
# The small-object task on the embedded tiny model: 64-frame clips (8 s at 8 fps), every frame a candidate, F=8 seen
# at 56x56 (4 merged visual tokens per temporal patch: a 19-pixel object of the 112x112 frame is ~10 pixels there).
SMALL_TASK = ["--data.synthetic_tasks=small_colour,small_count", "--data.synthetic_seconds=8",
              "--data.synthetic_size=800", "--video.pool_frames=64", "--keyframes.num_frames=8",
              "--variants.min_pixels=3136", "--variants.max_pixels=3136"]
# Its warm start: the same questions, the named object shown for >= 8 of the 64 frames and no distractor (the
# _long variants, another seed), so the canonical view of SFT shows the evidence. SFT on the brief clips themselves
# (evidence in 19 % of canonical views) collapsed to one constant answer per task: the model ignored the video.
# --warm-up hold: the _hold variants instead (small objects at random positions and the distractor, only the
# brevity removed): the warm start a model that can read small objects at all needs (at 56x56 the tiny model cannot).
SMALL_WARM = {v: [f"--data.synthetic_tasks=small_colour_{v},small_count_{v}", "--data.synthetic_seed=1"]
              for v in ("long", "hold")}


def run(args: list[str], log: Path) -> float:
    """`python -m args...` in the checkout, output to `log`; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", *args]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\nsee {log}")
    return time.perf_counter() - t0


def arm_overrides(arm: str, K: int, G: int) -> list[str]:
    if arm == "grpo":
        return ["--algorithm.preset=grpo", "--variants.num_variants=1", f"--rollout.num_generations={K * G}"]
    views = [f"--variants.num_variants={K}", f"--rollout.num_generations={G}"]
    if arm == "per_variant":
        return ["--algorithm.preset=grpo", *views]
    if arm == "strive":
        return ["--algorithm.preset=strive", *views]
    if arm == "strive_uniform_kf":  # stratified uniform frames in every view: the crops are what differs
        return ["--algorithm.preset=strive", *views, "--keyframes.uniform_mix=1.0"]
    if arm == "strive_no_crop":
        # Area 1 with an aspect range no frame leaves: every random draw misses the frame, and the fallback is the
        # whole frame (strive_engine.variants.sample_crop_boxes), for any frame shape.
        return ["--algorithm.preset=strive", *views, "--variants.crop_area_min=1.0", "--variants.crop_area_max=1.0",
                "--variants.crop_aspect_min=0.01", "--variants.crop_aspect_max=100"]
    raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="debug_cpu")
    ap.add_argument("--task", choices=("small", "demo"), default="small")
    ap.add_argument("--steps", type=int, default=40, help="RL steps per run")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--sft-steps", type=int, default=None, help="shared warm start (default: the recipe's)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--warm-up", choices=("long", "hold"), default="long",
                    help="small task: the warm start's set (small_*_long: big objects; small_*_hold: small ones)")
    ap.add_argument("--scorer-epochs", type=int, default=4, help="small task: epochs of the learned scorer")
    ap.add_argument("--out", default=None, help="work folder (default runs/ablation-<task>)")
    ap.add_argument("--name", default=None, help="file stem of the record and plot (default ablation-<date>)")
    ap.add_argument("--results-dir", default=None, help="where the record and plot go (default bench/results)")
    ap.add_argument("--eval-importance", action=argparse.BooleanOptionalAction, default=None,
                    help="also evaluate every run on one question-aware view (keyframes.* settings; default: on "
                         "for the small task). Reported beside, never instead of, the canonical view")
    ap.add_argument("--from-json", default=None, help="redo the table and plot from a saved ablation JSON")
    args, extra = ap.parse_known_args()
    if args.from_json:
        return report(json.loads(Path(args.from_json).read_text()), args.results_dir)
    out = Path(args.out or ROOT / "runs" / f"ablation-{args.task}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    task, warm_data = [], []
    if args.task == "small":
        task = [*SMALL_TASK, f"--data.synthetic_dir={out / 'synthetic'}", "--keyframes.scorer=learned",
                f"--keyframes.scorer_path={out / 'scorer'}"]
        warm_data = [*SMALL_WARM[args.warm_up], f"--data.synthetic_dir={out / f'synthetic_{args.warm_up}'}"]
    base = ["--recipe", args.recipe, "--logging.progress=false", *task, *extra]
    eval_importance = args.task == "small" if args.eval_importance is None else args.eval_importance

    from strive_engine.config import load_config

    cfg = load_config(base)
    K, G = cfg.variants.num_variants, cfg.rollout.num_generations
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    for arm in arms:
        arm_overrides(arm, K, G)  # unknown names fail before anything runs
    t_start = time.perf_counter()
    record = {"bench": "ablation", "date": datetime.date.today().isoformat(), "recipe": args.recipe,
              "task": args.task, "steps": args.steps, "seeds": seeds, "K": K, "G": G, "extra": extra,
              "sft_steps": args.sft_steps if args.sft_steps is not None else cfg.sft.steps,
              "command": " ".join(["python bench/ablation.py", *sys.argv[1:]]), "warm_data": warm_data,
              "warm_up": args.warm_up if args.task == "small" else None,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"), "cpu_count": os.cpu_count()}
    if args.name:
        record["name"] = args.name

    # ---- 1-2. the data set; the learned scorer on its train split, measured on its test split
    test_json = _prepare_data(cfg, out, args, record)

    # ---- 3. one shared warm start, exported as an HF folder, and its held-out accuracy
    warm = out / ("warm_start" if args.warm_up == "long" else f"warm_start_{args.warm_up}")
    if not (warm / "hf" / "config.json").exists():
        sft = [] if args.sft_steps is None else [f"--sft.steps={args.sft_steps}"]
        print(f"warm start -> {warm}", flush=True)
        run(["strive_engine.train", *base, *warm_data, *sft, "--run.steps=0", f"--run.output_dir={warm}",
             "--logging.plot=false"], out / f"{warm.name}.log")
    # the arms' test split (base's data), not the warm-up set's
    record["warm_start"] = evaluate(base, warm, test_json, cfg, eval_importance, warm, reuse=True)

    # ---- 4. the arms
    results: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in seeds:
            d = out / f"{arm}_seed{seed}"
            print(f"{arm} seed {seed} -> {d}", flush=True)
            common = [*base, *arm_overrides(arm, K, G), f"--model.path={warm / 'hf'}", "--sft.steps=0",
                      f"--run.seed={seed}", f"--run.output_dir={d}"]
            t0 = time.perf_counter()
            run(["strive_engine.train", *common, f"--run.steps={args.steps}", "--checkpoint.export_hf=true",
                 "--checkpoint.resume=false"], d.with_suffix(".train.log"))
            train_s = time.perf_counter() - t0
            results.setdefault(arm, []).append({"seed": seed, **run_series(d / "metrics.jsonl"), "train_s": train_s,
                                                **evaluate(common, d, test_json, cfg, eval_importance, d,
                                                           reuse=False)})
            results[arm][-1]["wall_s"] = time.perf_counter() - t0
    record["runs"] = results
    record["wall_s_total"] = round(time.perf_counter() - t_start, 1)
    report(record, args.results_dir)


def evaluate(args: list[str], run_dir: Path, test_json: Path, cfg, importance: bool, logs: Path,
             reuse: bool) -> dict:
    """Held-out evaluation of run_dir/hf on the canonical view (and, with `importance`, on one question-aware view);
    `reuse`: an existing report is taken as it is (the warm start, trained only when its export is missing)."""
    out = {}
    for frames, sub in (("uniform", "eval"), ("importance", "eval_importance")):
        if frames == "importance" and not importance:
            continue
        if not (reuse and (run_dir / sub / "report.json").exists()):
            run(["strive_engine.evaluate", *args, f"--model.path={run_dir / 'hf'}",
                 f"--eval.output_dir={run_dir / sub}", f"--eval.frames={frames}", "--eval.resume=false"],
                logs.with_suffix(f".{sub}.log"))
        h = heldout(run_dir / sub, test_json, cfg)
        if frames == "uniform":
            out.update(h)
        else:
            out.update({"heldout_importance": h["heldout_accuracy"],
                        "heldout_importance_per_task": h["heldout_per_task"]})
    return out


def _prepare_data(cfg, out: Path, args, record: dict) -> Path:
    """The task's synthetic set (generated once); for the small task the learned scorer (trained once) and its
    report. Returns the test split's records file."""
    from strive_engine.synthetic import ensure_synthetic

    train_json, test_json = ensure_synthetic(os.path.expanduser(cfg.data.synthetic_dir), cfg.data.synthetic_size,
                                             cfg.data.synthetic_seed, progress=False, **cfg.data.synthetic_options)
    if args.task == "small":
        scorer = Path(cfg.keyframes.scorer_path)
        recall = scorer / "recall.json"
        if not recall.exists() or not _scorer_matches(scorer, train_json):
            print(f"learned scorer -> {scorer}", flush=True)
            run(["strive_engine.scorer_train", "--train", str(train_json), "--test", str(test_json), "--out",
                 str(scorer), "--pool-frames", str(cfg.video.pool_frames),
                 "--num-frames", str(cfg.keyframes.num_frames),
                 "--num-variants", str(cfg.variants.num_variants), "--temperature", str(cfg.keyframes.temperature),
                 "--uniform-mix", str(cfg.keyframes.uniform_mix), "--epochs", str(args.scorer_epochs),
                 "--frames-per-video", "16"], out / "scorer.log")
        record["scorer"] = json.loads(recall.read_text())
    return test_json


def _scorer_matches(folder: Path, train_json: Path) -> bool:
    """The scorer folder was trained on exactly this train file."""
    from strive_engine.scorer_train import file_digest

    try:
        trained = json.loads((folder / "config.json").read_text())["trained_on"]
    except (OSError, ValueError, KeyError):
        return False
    return trained.get("sha256") == file_digest(train_json)


def run_series(metrics: Path) -> dict:
    """Per RL step: reward, accuracy, dead-group fractions, reward std, grad norm, step time."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("phase") == "rl"]
    return {"steps": [r["step"] for r in rows], "reward": [r["reward/mean"] for r in rows],
            "accuracy": [r["reward/accuracy"] for r in rows],
            "zero_var_chosen": [r.get("adv/zero_var_frac") for r in rows],
            "zero_var_per_variant": [r.get("adv/zero_var_frac_per_variant") for r in rows],
            "adv_std": [r.get("adv/adv_std") for r in rows], "reward_std": [r.get("reward/std") for r in rows],
            "grad_norm": [r.get("grad_norm") for r in rows], "step_s": [r.get("time/step") for r in rows]}


def heldout(eval_dir: Path, test_json: Path, cfg) -> dict:
    """Held-out accuracy from an evaluation's predictions: overall, per task, and split by whether the canonical
    view (the F evenly spaced frames evaluation shows) contains an evidence frame (records with `evidence`)."""
    from strive_engine.video.base import sample_indices

    preds = {}
    for p in sorted(eval_dir.glob("predictions.rank*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                preds[r["id"]] = r
    recs = {str(r["problem_id"]): r for r in json.loads(Path(test_json).read_text())}
    scored = [r for r in preds.values() if "error" not in r]
    out = {"heldout_accuracy": json.loads((eval_dir / "report.json").read_text())["accuracy"],
           "heldout_n": len(scored), "heldout_per_task": {}}
    groups: dict[str, list[float]] = {"seen": [], "missed": []}
    for r in scored:
        rec = recs.get(r["id"], {})
        out["heldout_per_task"].setdefault(r.get("category") or "", []).append(r["accuracy"])
        if rec.get("evidence"):
            P = min(cfg.video.pool_frames, rec["num_frames"])
            pool = sample_indices(rec["num_frames"], P)
            F = cfg.keyframes.num_frames  # the canonical view: pool rows floor((j + 0.5) P / F), as keyframes draws it
            frames = [pool[min(P - 1, (2 * j + 1) * P // (2 * F))] for j in range(F)]
            seen = any(s <= t < e for s, e in rec["evidence"] for t in frames)
            groups["seen" if seen else "missed"].append(r["accuracy"])
    out["heldout_per_task"] = {k: statistics.mean(v) for k, v in sorted(out["heldout_per_task"].items())}
    for k, v in groups.items():
        out[f"heldout_{k}"] = statistics.mean(v) if v else None
        out[f"heldout_{k}_n"] = len(v)
    return out


# ------------------------------------------------------------------------------------------- reporting


def _vals(xs) -> list[float]:
    return [x for x in xs if isinstance(x, (int, float))]


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per-seed values and their mean for every reported quantity (None where a record lacks the series)."""
    def per_run(fn):
        vals = [fn(r) for r in runs]
        return vals if all(v is not None for v in vals) else None

    half = lambda xs: _vals(xs[len(xs) // 2:])  # noqa: E731
    s = {"heldout": per_run(lambda r: r["heldout_accuracy"]),
         "heldout_seen": per_run(lambda r: r.get("heldout_seen")),
         "heldout_missed": per_run(lambda r: r.get("heldout_missed")),
         "heldout_importance": per_run(lambda r: r.get("heldout_importance")),
         "train_acc": per_run(lambda r: statistics.mean(half(r["accuracy"]))),
         "dead_chosen": per_run(lambda r: statistics.mean(_vals(r["zero_var_chosen"]))),
         "dead_per_variant": per_run(lambda r: statistics.mean(_vals(r["zero_var_per_variant"]))),
         "reward_std_step": per_run(lambda r: statistics.mean(_vals(r["reward_std"])) if _vals(r.get("reward_std", []))
                                    else None),
         "reward_sd_over_steps": per_run(lambda r: statistics.pstdev(r["reward"])),
         "grad_norm_var": per_run(lambda r: statistics.pvariance(_vals(r["grad_norm"]))
                                  if len(_vals(r.get("grad_norm", []))) > 1 else None),
         "grad_norm_mean": per_run(lambda r: statistics.mean(_vals(r["grad_norm"])) if _vals(r.get("grad_norm", []))
                                   else None),
         "wall_s": per_run(lambda r: r.get("wall_s")),
         "train_s": per_run(lambda r: r.get("train_s")),
         "s_per_step": per_run(lambda r: statistics.mean(_vals(r["step_s"])) if _vals(r.get("step_s", [])) else None)}
    return {k: {"mean": statistics.mean(v), "values": v} for k, v in s.items() if v is not None}


def report(record: dict, results_dir: str | Path | None = None) -> None:
    """Print the table, draw the plot and write <results_dir>/<name>.{json,png} from a record (default
    bench/results)."""
    results = record["runs"]
    summary = {arm: summarise(runs) for arm, runs in results.items()}
    cols = [("heldout", "held-out"), ("heldout_seen", "h-o seen"), ("heldout_missed", "h-o missed"),
            ("heldout_importance", "h-o scorer view"),
            ("train_acc", "train acc"), ("dead_chosen", "dead (arm)"), ("dead_per_variant", "dead (per view)"),
            ("reward_std_step", "reward sd/step"), ("grad_norm_var", "var grad norm"), ("wall_s", "wall s/run")]
    print("\n" + f"{'arm':<18}" + "".join(f"{name:>18}" for _, name in cols))
    for arm, s in summary.items():
        print(f"{arm:<18}" + "".join(f"{mean_sd(s[k]['values']) if k in s else '—':>18}" for k, _ in cols))
    if record.get("warm_start"):
        w = record["warm_start"]
        print(f"warm start alone: held-out {w['heldout_accuracy']:.3f} (seen {w.get('heldout_seen')}, missed "
              f"{w.get('heldout_missed')}, scorer's view {w.get('heldout_importance')})")
    png = _plot(record, summary, Path(results_dir) if results_dir else ROOT / "bench" / "results")
    record = {**record, "summary": summary,
              "plot": str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)}
    (png.with_suffix(".json")).write_text(json.dumps(record, indent=1))
    print(json.dumps({"bench": "ablation", "summary": {a: {k: v["mean"] for k, v in s.items()}
                                                       for a, s in summary.items()}, "plot": record["plot"]}))


def _band(ax, runs: list[dict], key: str, colour, label: str, window: int) -> None:
    """Per seed a rolling mean over `window` steps; their mean over seeds, and a band of ± one sd over seeds."""
    import numpy as np

    curves = []
    for r in runs:
        xs = np.array([x if isinstance(x, (int, float)) else np.nan for x in r.get(key, [])], dtype=float)
        if len(xs) < window or np.isnan(xs).all():
            return
        kernel = np.ones(window) / window
        curves.append(np.convolve(np.nan_to_num(xs, nan=np.nanmean(xs)), kernel, mode="valid"))
    n = min(len(c) for c in curves)
    c = np.stack([c[:n] for c in curves])                   # (seeds, steps - window + 1)
    steps = np.array(runs[0]["steps"][window - 1:window - 1 + n])
    m, sd = c.mean(0), c.std(0, ddof=1) if len(c) > 1 else np.zeros(n)
    ax.plot(steps, m, color=colour, linewidth=2, label=label)
    ax.fill_between(steps, m - sd, m + sd, color=colour, alpha=0.15, linewidth=0)


def _plot(record: dict, summary: dict, res_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, seeds = record["runs"], record["seeds"]
    window = max(1, min(10, min(len(r["steps"]) for runs in results.values() for r in runs) // 3))
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    panels = [(axes[0, 0], "accuracy", "training accuracy (sampled answers)"),
              (axes[0, 1], "zero_var_chosen", "dead-group fraction (the arm's grouping)"),
              (axes[0, 2], "reward_std", "reward std over the step's rollouts"),
              (axes[1, 0], "grad_norm", "gradient norm (before clipping)")]
    for arm, runs in results.items():
        for ax, key, _ in panels:
            _band(ax, runs, key, COLOURS.get(arm), arm, window)
    for ax, _, title in panels:
        ax.set_title(f"{title}\n{window}-step rolling mean; band: ± sd over {len(seeds)} seeds", fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    arms = list(results)
    ax = axes[1, 1]
    for i, arm in enumerate(arms):
        vals = summary[arm]["heldout"]["values"]
        ax.bar(i, statistics.mean(vals), color=COLOURS.get(arm), alpha=0.7)
        ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
    if record.get("warm_start"):
        ax.axhline(record["warm_start"]["heldout_accuracy"], color="k", linestyle="--", linewidth=1,
                   label="warm start alone")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
    ax.set_title("held-out accuracy, canonical view (the paper's test)\nbars: mean over seeds; dots: seeds", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1, 2]  # where the canonical view shows / misses the evidence, and on the scorer's view
    parts = [(k, name) for k, name in (("heldout_seen", "canonical view shows evidence"),
                                       ("heldout_missed", "canonical view misses it"),
                                       ("heldout_importance", "scorer's view"))
             if all(k in summary[a] for a in arms)]
    width = 0.8 / max(len(parts), 1)
    for j, (key, name) in enumerate(parts):
        xs = [i + (j - (len(parts) - 1) / 2) * width for i in range(len(arms))]
        means = [summary[a][key]["mean"] for a in arms]
        ax.bar(xs, means, width, color=f"C{j}", alpha=0.75, label=name,
               yerr=[statistics.stdev(summary[a][key]["values"]) if len(seeds) > 1 else 0 for a in arms])
        w = (record.get("warm_start") or {}).get(key)
        if w is not None:
            ax.axhline(w, color=f"C{j}", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
    ax.set_title("held-out accuracy by view (± sd over seeds; dashed: warm start)", fontsize=9)
    if parts:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"ablation {record['date']}: task {record.get('task', 'demo')}, {record['steps']} RL steps, "
                 f"{record['K'] * record['G']} rollouts per question, seeds {','.join(map(str, seeds))}", fontsize=10)
    fig.tight_layout()
    res_dir.mkdir(parents=True, exist_ok=True)
    png = res_dir / f"{record.get('name', 'ablation-' + record['date'])}.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


if __name__ == "__main__":
    main()
