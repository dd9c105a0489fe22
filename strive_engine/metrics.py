"""Step metrics: per-stage timers, the JSON-lines log (optionally mirrored to TensorBoard), rank 0's progress
bar, and the run's curves (curves.png).

metrics.jsonl holds one JSON object per logged step, `phase` "sft" or "rl" (the step counts from 0 in each), and
a `phase` "eval" row per evaluation of the run's hf/ export (`append_heldout`, written by evaluate).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
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


def _scalar(value: Any) -> float | None:
    """A metrics.jsonl value as a float for TensorBoard ('nan'/'inf' strings included); None if not a number."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return None


def require_tensorboard():
    """torch's SummaryWriter class; logging.tensorboard=true without the tensorboard package is a ConfigError
    (one line, exit 2) that says how to install it."""
    from strive_engine.config import ConfigError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"logging.tensorboard=true needs the tensorboard package, which this Python cannot import "
                          f"({e}); install it (.venv/bin/pip install tensorboard) or leave logging.tensorboard "
                          f"false") from None
    return SummaryWriter


class MetricsLogger:
    """Appends one JSON line per step (rank 0), drives a tqdm bar with loss, reward, accuracy and step time, and
    with `tensorboard_dir` writes every numeric value of the line to TensorBoard as `<phase>/<key>` at its step."""

    def __init__(self, path: str | Path, *, enabled: bool, total_steps: int, initial_step: int = 0,
                 progress: bool = True, desc: str = "train", tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)
            if tensorboard_dir is not None:
                self.tb = require_tensorboard()(log_dir=str(tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            phase, step = clean.get("phase", "rl"), int(clean.get("step", 0))
            for key, value in clean.items():
                x = _scalar(value) if key not in ("step", "phase") else None
                if x is not None:
                    self.tb.add_scalar(f"{phase}/{key}", x, global_step=step)
        if self.bar is not None:
            show = {"loss": "loss", "reward": "reward/mean", "acc": "reward/accuracy", "zv": "adv/zero_var_frac",
                    "s": "time/step"}
            self.bar.set_postfix({k: f"{clean[v]:.3f}" for k, v in show.items() if isinstance(clean.get(v), float)})
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def append_heldout(metrics_path: str | Path, summary: dict[str, Any], records: str) -> dict[str, Any]:
    """Append an evaluation of the run's export to its metrics.jsonl: a `phase` "eval" row at the run's last
    logged RL step (or SFT step when no RL step ran), `after` saying which. Returns the row."""
    rows = read_metrics(metrics_path)
    rl = [r["step"] for r in rows if r.get("phase") == "rl"]
    sft = [r["step"] for r in rows if r.get("phase") == "sft"]
    row = {"phase": "eval", "step": max(rl) if rl else max(sft, default=0), "after": "rl" if rl else "sft",
           "eval/accuracy": _clean(float(summary["accuracy"])), "eval/format": _clean(float(summary["format"])),
           "eval/num_scored": summary["num_scored"], "eval/records": records}
    with open(metrics_path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


# ---------------------------------------------------------------------------------------------- plot


def rolling_mean(values, window: int) -> np.ndarray:
    """Centred mean over `window` steps (fewer at the ends), NaN ignored: (n,) -> (n,) float64."""
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(len(x))
    lo = np.clip(i - window // 2, 0, len(x))
    hi = np.clip(i - window // 2 + window, 0, len(x))
    n = count[hi] - count[lo]
    return np.where(n > 0, (csum[hi] - csum[lo]) / np.maximum(n, 1), np.nan)


def smoothing_window(n: int) -> int:
    """Steps averaged by the smoothed lines: 5 for 100 steps, 30 for 600; at most a quarter of the points."""
    return max(1, min(max(5, n // 20), n // 4))


def _series(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(v) if (v := _scalar(r.get(key))) is not None else np.nan for r in rows])


def _curve(ax, steps, values, label: str, color: str, linestyle: str = "-") -> None:
    """Raw values as a faint line, their rolling mean drawn over them."""
    w = smoothing_window(len(values))
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8, linestyle=linestyle)
    ax.plot(steps, rolling_mean(values, w), color=color, linewidth=1.8, linestyle=linestyle,
            label=f"{label} (mean of {w})" if w > 1 else label)


PANELS = ("SFT loss", "RL reward", "accuracy", "zero-variance groups (RL)")


def build_figure(rows: list[dict[str, Any]], title: str = ""):
    """The four panels of curves.png (titles in PANELS) from metrics.jsonl rows; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = [r for r in rows if r.get("phase") == "sft"]
    rl = [r for r in rows if r.get("phase", "rl") == "rl"]
    evals = [r for r in rows if r.get("phase") == "eval" and _scalar(r.get("eval/accuracy")) is not None]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    ax_sft, ax_reward, ax_acc, ax_zv = axes.flat
    for ax, name in zip(axes.flat, PANELS):
        ax.set_title(name)
        ax.set_xlabel("SFT step" if ax is ax_sft else "RL step")
        ax.grid(alpha=0.3)

    if sft:
        loss = _series(sft, "loss")
        _curve(ax_sft, [r["step"] for r in sft], loss, "loss", "C0")
        if np.nanmin(loss, initial=np.inf) > 0:
            ax_sft.set_yscale("log")
    rl_steps = [r["step"] for r in rl]
    if rl:
        _curve(ax_reward, rl_steps, _series(rl, "reward/mean"), "reward", "C0")
        _curve(ax_reward, rl_steps, _series(rl, "reward/format"), "format reward", "C2", "--")
        _curve(ax_acc, rl_steps, _series(rl, "reward/accuracy"), "training (sampled)", "C1")
        _curve(ax_zv, rl_steps, _series(rl, "adv/zero_var_frac"), "chosen grouping", "C3")
        _curve(ax_zv, rl_steps, _series(rl, "adv/zero_var_frac_per_variant"), "per-variant grouping", "C4", "--")
        ax_zv.set_ylim(-0.02, 1.02)
    for e in evals:  # held-out evaluations of the export, at the step they were made after
        acc = float(e["eval/accuracy"])
        ax_acc.plot([e["step"]], [acc], marker="*", markersize=14, color="k", linestyle="none",
                    label=f"held-out {acc:.3f} ({e.get('eval/num_scored', '?')} questions, after "
                          f"{str(e.get('after', 'rl')).upper()})")
    if rl or evals:
        ax_acc.set_ylim(-0.02, 1.02)
    for ax, empty in ((ax_sft, not sft), (ax_reward, not rl), (ax_acc, not rl and not evals), (ax_zv, not rl)):
        if empty:
            ax.text(0.5, 0.5, "no steps of this phase in the run", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metrics(path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """curves.png from a metrics.jsonl: SFT loss, RL reward (total and format), accuracy (training, and held-out
    when evaluate has run on the export), zero-variance group fractions; raw values faint, rolling means over
    them."""
    import matplotlib.pyplot as plt

    fig = build_figure(read_metrics(path), title)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_run(run_dir: str | Path, metrics_file: str = "metrics.jsonl") -> Path:
    """Redraw run_dir/curves.png, titled by the run's config.json (name and algorithm preset) when present."""
    run_dir = Path(run_dir)
    title = ""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cfg = json.loads((run_dir / "config.json").read_text())
        title = f"{cfg['run']['name']} ({cfg['algorithm']['preset']})"
    return plot_metrics(run_dir / metrics_file, run_dir / "curves.png", title=title)
