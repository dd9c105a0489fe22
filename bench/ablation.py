"""STRIVE vs GRPO vs per-variant normalisation on the synthetic task, same rollouts per question, 3 seeds.

    python bench/ablation.py                                  # embedded default (CPU), 30 RL steps per run
    python bench/ablation.py --steps 60 --sft-steps 800       # the README's run: ~10 min on 2 cores
    python bench/ablation.py --from-json bench/results/ablation-2026-11-26.json   # table + plot again

The claim tested (the STRIVE paper's): normalising rewards jointly over K variants x G answers leaves fewer
zero-variance ("dead") groups than normalising within each group, and gives a more stable learning signal.
Arms (each the same number of rollouts per question, K*G):
    grpo         K=1 view (the canonical one), G*K answers, advantages per group        (plain GRPO)
    per_variant  K views, G answers each, advantages within each (question, variant)    (GRPO on each view)
    strive       K views, G answers each, advantages jointly over all K*G               (STRIVE)
All arms start from one shared supervised warm start (run once, exported, then loaded with model.path) so
the RL phase is what differs. Per arm and seed: reward, accuracy and zero-variance fractions per step
(metrics.jsonl), held-out accuracy on the synthetic test split at the end (greedy, canonical frames).
Writes bench/results/ablation-<date>.{json,png}; prints a table; last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", *args]
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\nsee {log}")


def arm_overrides(arm: str, K: int, G: int) -> list[str]:
    if arm == "grpo":
        return ["--algorithm.preset=grpo", "--variants.num_variants=1", f"--rollout.num_generations={K * G}"]
    if arm == "per_variant":
        return ["--algorithm.preset=grpo", f"--variants.num_variants={K}", f"--rollout.num_generations={G}"]
    return ["--algorithm.preset=strive", f"--variants.num_variants={K}", f"--rollout.num_generations={G}"]


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="debug_cpu")
    ap.add_argument("--steps", type=int, default=30, help="RL steps per run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sft-steps", type=int, default=None, help="shared warm start (default: the recipe's)")
    ap.add_argument("--arms", default="grpo,per_variant,strive")
    ap.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    ap.add_argument("--from-json", default=None, help="redo the table and plot from a saved ablation JSON")
    args, extra = ap.parse_known_args()
    if args.from_json:
        return report(json.loads(Path(args.from_json).read_text()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["--recipe", args.recipe, "--logging.progress=false", *extra]

    from strive_engine.config import load_config

    cfg = load_config(base)
    K, G = cfg.variants.num_variants, cfg.rollout.num_generations
    seeds = [int(s) for s in args.seeds.split(",")]

    # ---- one shared warm start, exported as an HF folder
    warm = out / "warm_start"
    if not (warm / "hf" / "config.json").exists():
        sft = [] if args.sft_steps is None else [f"--sft.steps={args.sft_steps}"]
        print(f"warm start -> {warm}", flush=True)
        run(["strive_engine.train", *base, *sft, "--run.steps=0", f"--run.output_dir={warm}",
             "--logging.plot=false"], out / "warm_start.log")

    results: dict[str, list[dict]] = {}
    for arm in args.arms.split(","):
        for seed in seeds:
            d = out / f"{arm}_seed{seed}"
            print(f"{arm} seed {seed} -> {d}", flush=True)
            common = [*base, *arm_overrides(arm, K, G), f"--model.path={warm / 'hf'}", "--sft.steps=0",
                      f"--run.seed={seed}", f"--run.output_dir={d}"]
            run(["strive_engine.train", *common, f"--run.steps={args.steps}", "--checkpoint.export_hf=true"],
                d.with_suffix(".train.log"))
            run(["strive_engine.evaluate", *common, f"--model.path={d / 'hf'}", f"--eval.output_dir={d / 'eval'}",
                 "--eval.resume=false"], d.with_suffix(".eval.log"))
            rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
            rows = [r for r in rows if r.get("phase") == "rl"]
            eval_report = json.loads((d / "eval" / "report.json").read_text())
            results.setdefault(arm, []).append({
                "seed": seed, "steps": [r["step"] for r in rows],
                "reward": [r["reward/mean"] for r in rows], "accuracy": [r["reward/accuracy"] for r in rows],
                "zero_var_chosen": [r.get("adv/zero_var_frac") for r in rows],
                "zero_var_per_variant": [r.get("adv/zero_var_frac_per_variant") for r in rows],
                "adv_std": [r.get("adv/adv_std") for r in rows], "heldout_accuracy": eval_report["accuracy"]})

    stamp = datetime.date.today().isoformat()
    record = {"bench": "ablation", "date": stamp, "recipe": args.recipe, "steps": args.steps,
              "sft_steps": args.sft_steps if args.sft_steps is not None else cfg.sft.steps, "seeds": seeds,
              "K": K, "G": G, "extra": extra, "runs": results}
    report(record)


def report(record: dict) -> None:
    """Print the table, draw the plot and write bench/results/ablation-<date>.{json,png} from a record."""
    results, seeds = record["runs"], record["seeds"]
    print(f"\n{'arm':<12} {'held-out acc':>16} {'train acc (last half)':>22} {'dead groups (chosen)':>22} "
          f"{'dead (per-variant)':>20} {'reward sd over steps':>21}")
    summary = {}
    for arm, runs in results.items():
        half = lambda xs: [x for x in xs[len(xs) // 2:] if isinstance(x, (int, float))]  # noqa: E731
        s = {"heldout": [r["heldout_accuracy"] for r in runs],
             "train_acc": [statistics.mean(half(r["accuracy"])) for r in runs],
             "dead_chosen": [statistics.mean([x for x in r["zero_var_chosen"] if x is not None]) for r in runs],
             "dead_per_variant": [statistics.mean([x for x in r["zero_var_per_variant"] if x is not None])
                                  for r in runs],
             "reward_sd": [statistics.pstdev(r["reward"]) for r in runs]}
        summary[arm] = {k: {"mean": statistics.mean(v), "values": v} for k, v in s.items()}
        print(f"{arm:<12} {mean_sd(s['heldout']):>16} {mean_sd(s['train_acc']):>22} {mean_sd(s['dead_chosen']):>22} "
              f"{mean_sd(s['dead_per_variant']):>20} {mean_sd(s['reward_sd']):>21}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 10
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colours = {"grpo": "tab:gray", "per_variant": "tab:blue", "strive": "tab:red"}
    for arm, runs in results.items():
        for ax, key in ((axes[0], "reward"), (axes[1], "zero_var_chosen")):
            steps, mean = seed_mean(runs, key)
            ax.plot(steps, mean, color=colours.get(arm), alpha=0.25, linewidth=0.8)
            ax.plot(steps[window - 1:], rolling(mean, window), color=colours.get(arm), linewidth=2, label=arm)
        axes[2].bar(arm, statistics.mean(r["heldout_accuracy"] for r in runs), color=colours.get(arm),
                    yerr=statistics.stdev([r["heldout_accuracy"] for r in runs]) if len(runs) > 1 else 0)
    axes[0].set_title(f"train reward (mean of {len(seeds)} seeds; bold: {window}-step rolling mean)")
    axes[1].set_title("zero-variance group fraction (the arm's grouping)")
    axes[2].set_title(f"held-out accuracy (mean ± sd over {len(seeds)} seeds)")
    for ax in axes[:2]:
        ax.set_xlabel("RL step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    res_dir = ROOT / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    name = record.get("name", f"ablation-{record['date']}")  # file stem under bench/results
    png = res_dir / f"{name}.png"
    fig.savefig(png, dpi=110)
    record = {**record, "summary": summary, "plot": str(png.relative_to(ROOT))}
    (res_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({"bench": "ablation", "summary": {a: {k: v["mean"] for k, v in s.items()}
                                                       for a, s in summary.items()}, "plot": record["plot"]}))


def seed_mean(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Per-step mean over seeds (steps missing a value in some seed average the seeds that have one)."""
    steps = runs[0]["steps"]
    out = []
    for i in range(len(steps)):
        xs = [r[key][i] for r in runs if i < len(r[key]) and isinstance(r[key][i], (int, float))]
        out.append(statistics.mean(xs) if xs else float("nan"))
    return steps, out


def rolling(xs: list[float], window: int) -> list[float]:
    return [statistics.mean(xs[i - window + 1:i + 1]) for i in range(window - 1, len(xs))]


if __name__ == "__main__":
    main()
