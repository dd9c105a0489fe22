"""metrics: curves.png's panels (SFT loss, RL reward, accuracy with the held-out point, zero-variance groups; raw
values faint under rolling means), the held-out row evaluate appends, and the optional TensorBoard mirror."""
import json
import math
import sys

import numpy as np
import pytest

from strive_engine.metrics import (PANELS, MetricsLogger, append_heldout, build_figure, plot_run, read_metrics,
                                   require_tensorboard, rolling_mean, smoothing_window)


def _rows(n_sft=40, n_rl=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"phase": "sft", "step": i, "loss": float(7.0 * math.exp(-i / 10) + 0.05 + 0.1 * rng.random()),
             "lr": 1e-3} for i in range(n_sft)]
    for i in range(n_rl):
        acc = float(min(1.0, 0.3 + i / n_rl * 0.5 + 0.2 * rng.standard_normal()))
        rows.append({"phase": "rl", "step": i, "reward/mean": acc + 0.4, "reward/format": 0.9, "reward/accuracy": acc,
                     "adv/zero_var_frac": 0.1, "adv/zero_var_frac_per_variant": 0.5, "loss": "nan"})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rolling_mean_is_a_centred_mean_that_skips_nan():
    x = np.array([1.0, 2.0, np.nan, 4.0, 8.0, 16.0, 3.0])
    for w in (1, 2, 3, 4, 7, 10):
        want = []
        for i in range(len(x)):  # reference: the window [i - w//2, i - w//2 + w) clipped to the series
            part = [v for v in x[max(0, i - w // 2): max(0, i - w // 2 + w)] if np.isfinite(v)]
            want.append(sum(part) / len(part) if part else np.nan)
        np.testing.assert_allclose(rolling_mean(x, w), want, rtol=1e-12)
    assert smoothing_window(100) == 5 and smoothing_window(600) == 30 and smoothing_window(2) == 1


def test_curves_have_an_sft_panel_smoothed_lines_and_the_held_out_point(tmp_path):
    rows = _rows()
    metrics = _write(tmp_path / "metrics.jsonl", rows)
    heldout = append_heldout(metrics, {"accuracy": 0.8562, "format": 0.99, "num_scored": 160}, "test.json")
    assert heldout == {"phase": "eval", "step": 29, "after": "rl", "eval/accuracy": 0.8562, "eval/format": 0.99,
                       "eval/num_scored": 160, "eval/records": "test.json"}
    fig = build_figure(read_metrics(metrics), title="demo (strive)")
    ax_sft, ax_reward, ax_acc, ax_zv = fig.axes
    assert [ax.get_title() for ax in fig.axes] == list(PANELS) == ["SFT loss", "RL reward", "accuracy",
                                                                    "zero-variance groups (RL)"]
    assert fig._suptitle.get_text() == "demo (strive)"

    # SFT loss: the raw losses (faint) and their rolling mean (opaque), on a log axis.
    raw, smooth = ax_sft.get_lines()
    loss = [r["loss"] for r in rows if r["phase"] == "sft"]
    np.testing.assert_array_equal(raw.get_ydata(), loss)
    np.testing.assert_allclose(smooth.get_ydata(), rolling_mean(loss, smoothing_window(40)))
    assert raw.get_alpha() < 0.5 and smooth.get_alpha() in (None, 1.0) and ax_sft.get_yscale() == "log"
    assert ax_sft.get_xlabel() == "SFT step" and ax_acc.get_xlabel() == "RL step"

    # Every RL series is drawn raw + smoothed; accuracy carries the held-out star at the last RL step.
    assert len(ax_reward.get_lines()) == 4 and len(ax_zv.get_lines()) == 4
    acc_raw, acc_smooth, star = ax_acc.get_lines()
    np.testing.assert_array_equal(acc_raw.get_ydata(), [r["reward/accuracy"] for r in rows if r["phase"] == "rl"])
    assert list(star.get_xdata()) == [29] and list(star.get_ydata()) == [0.8562]
    labels = [t.get_text() for t in ax_acc.get_legend().get_texts()]
    assert "held-out 0.856 (160 questions, after RL)" in labels, labels
    assert ax_acc.get_ylim() == (-0.02, 1.02) and ax_zv.get_ylim() == (-0.02, 1.02)

    png = plot_run(tmp_path)  # title from the run's config.json when there is one
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_sft_only_run_has_its_loss_and_says_which_panels_are_empty(tmp_path):
    metrics = _write(tmp_path / "metrics.jsonl", _rows(n_rl=0))
    row = append_heldout(metrics, {"accuracy": 0.5, "format": float("nan"), "num_scored": 4}, "t.json")
    assert row["step"] == 39 and row["after"] == "sft" and row["eval/format"] == "nan"
    fig = build_figure(read_metrics(metrics))
    ax_sft, ax_reward, ax_acc, ax_zv = fig.axes
    assert len(ax_sft.get_lines()) == 2
    for ax in (ax_reward, ax_zv):
        assert [t.get_text() for t in ax.texts] == ["no steps of this phase in the run"]
    assert not ax_acc.texts and list(ax_acc.get_lines()[0].get_ydata()) == [0.5]  # the held-out point alone


def test_require_tensorboard_names_the_package_when_it_is_missing(monkeypatch):
    from strive_engine.config import ConfigError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"logging.tensorboard=true needs the tensorboard package.*pip install "
                                          r"tensorboard"):
        require_tensorboard()


def test_train_with_tensorboard_but_no_package_is_one_line_and_exit_2(monkeypatch, capsys):
    from strive_engine.train import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["--logging.tensorboard=true", "--run.output_dir=/nonexistent/never-created"]) == 2
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: logging.tensorboard=true needs"), lines


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _rows(n_sft=3, n_rl=2)
    rows[-1]["flag"] = True
    rows[-1]["note"] = "text is not a scalar"
    for phase in ("sft", "rl"):
        lg = MetricsLogger(tmp_path / "metrics.jsonl", enabled=True, total_steps=3, progress=False,
                           tensorboard_dir=tmp_path / "tb")
        for r in rows:
            if r["phase"] == phase:
                lg.log(r)
        lg.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    got = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    want: dict = {}
    for r in read_metrics(tmp_path / "metrics.jsonl"):  # every numeric value of every line, as <phase>/<key>
        for k, v in r.items():
            if k not in ("phase", "step") and not isinstance(v, str) or v == "nan":
                want.setdefault(f"{r['phase']}/{k}", []).append((r["step"], float(v)))
    assert set(got) == set(want) and "rl/reward/accuracy" in got and "sft/loss" in got and "rl/note" not in got
    for tag, pts in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in pts], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in pts], rtol=1e-6, err_msg=tag)
