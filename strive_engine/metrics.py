"""Step metrics: per-stage timers, the JSON-lines log, rank 0's progress bar, and the end-of-run plot."""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch

STAGES = ("decode", "keyframes", "variants", "rollout", "reward", "advantage", "old_logp", "ref_logp", "update",
          "optimizer", "checkpoint")


class StageTimer:
    """Wall time per pipeline stage within one step. Synchronises CUDA at stage boundaries only when asked
    (`sync=True`, e.g. in bench/throughput.py) so that normal training keeps its asynchrony."""

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[stage] += time.perf_counter() - t0

    def reset(self) -> dict[str, float]:
        out = {f"time/{k}": round(v, 4) for k, v in self.seconds.items()}
        self.seconds = defaultdict(float)
        return out


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class MetricsLogger:
    """Appends one JSON line per step (rank 0) and drives a tqdm bar with reward, accuracy, step time."""

    def __init__(self, path: str | Path, *, enabled: bool, total_steps: int, initial_step: int = 0,
                 progress: bool = True, desc: str = "train"):
        self.path = Path(path)
        self.enabled = enabled
        self.bar = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.bar is not None:
            show = {"loss": "loss", "reward": "reward/mean", "acc": "reward/accuracy", "zv": "adv/zero_var_frac",
                    "s": "time/step"}
            self.bar.set_postfix({k: f"{clean[v]:.3f}" for k, v in show.items() if isinstance(clean.get(v), float)})
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_metrics(path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Reward, accuracy and zero-variance-group fractions over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(path) if r.get("phase", "rl") == "rl"]
    steps = [r["step"] for r in rows]

    def series(key):
        return [r.get(key) if isinstance(r.get(key), (int, float)) else float("nan") for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(steps, series("reward/mean"), label="reward")
    axes[1].plot(steps, series("reward/accuracy"), label="accuracy")
    axes[2].plot(steps, series("adv/zero_var_frac"), label="chosen grouping")
    axes[2].plot(steps, series("adv/zero_var_frac_per_variant"), label="per-variant grouping", linestyle="--")
    for ax, name in zip(axes, ("reward", "accuracy", "zero-variance group fraction")):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
