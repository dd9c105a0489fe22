"""A step's loss/* and adv/* metrics are global over ranks: token-weighted loss statistics that leave out the padding
passes a rank runs when a peer has more micro-batches, and advantage metrics over every rank's questions, with the
same keys on every step. policy_update runs here with a fake micro-batch (no model): the aggregation is what counts."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

import strive_engine.step as step_mod
import strive_engine.update as update_mod
from strive_engine.advantage import compute_advantages
from strive_engine.config import load_config
from strive_engine.rewards import RewardOutput

MEANS = ("clip_frac", "clip_frac_low", "clip_frac_high", "entropy", "kl")

# Per rank: scored tokens of each rollout row, and each row's per-token statistic (the same for every key, shifted).
ROWS = {0: ([3, 5, 0, 4], [0.5, 1.5, 9.0, 2.5]), 1: ([7, 2, 6, 1, 4], [1.0, 3.0, 0.25, 4.0, 2.0])}
KEPT = {0: [0, 1, 2], 1: [0, 1, 2, 3, 4]}  # rank 0: 2 real micro-batches (row 2 has no token), rank 1: 5


def _offset(k: str) -> float:
    return MEANS.index(k) * 0.01


def _fake_micro_batch(t, rb, rows, counts, old_logp, row_adv, ref_logp, samp_all, spec, norm):
    """What `_micro_batch` returns, without a model: a padding pass (no rows) gives all-zero stats, as the kernel
    does for a zero mask; a real one the token-weighted mean of its rows' statistics."""
    n = float(counts[rows].sum())
    val = t.row_values[rows] if rows.numel() else torch.zeros(0)
    stats = {"loss": torch.tensor(0.1 * rows.numel()), "num_tokens": torch.tensor(n)}
    for k in MEANS[:4] + (("kl",) if ref_logp is not None else ()):
        stats[k] = torch.tensor(float(((val + _offset(k)) * counts[rows]).sum()) / n if n else 0.0)
    return stats["loss"], stats, None


def _update(rank: int, world: int, monkeypatch_set) -> dict:
    cfg = load_config(["--parallel.micro_batch_size=1", "--algorithm.minibatches=2"])
    tokens, values = ROWS[rank]
    M = len(tokens)
    mask = torch.zeros(M, 1 + max(tokens))
    for r, n in enumerate(tokens):
        mask[r, 1:1 + n] = 1
    rb = SimpleNamespace(inputs=SimpleNamespace(completion_mask=mask), completion_mask=mask, sampling_logprobs=None)
    t = SimpleNamespace(cfg=cfg, policy=SimpleNamespace(), root=None, gather_once=False,
                        timer=lambda name: contextlib.nullcontext(), env=SimpleNamespace(world_size=world, rank=rank),
                        optim=SimpleNamespace(step=lambda loss: (1.0, True), nonfinite_skips=0),
                        row_values=torch.tensor(values))
    monkeypatch_set(update_mod, "_micro_batch", _fake_micro_batch)
    keep = torch.zeros(M, dtype=torch.bool)
    keep[KEPT[rank]] = True
    N = int(mask.sum())
    return update_mod.policy_update(t, rb, torch.zeros(N), torch.zeros(M), keep, ref_logp=torch.zeros(N))


def _expected(ranks) -> dict[str, float]:
    """Token-weighted means over every kept row of the given ranks; tokens per real (non-empty) micro-batch."""
    tok = sum(ROWS[r][0][i] for r in ranks for i in KEPT[r])
    real = sum(1 for r in ranks for i in KEPT[r] if ROWS[r][0][i] > 0)
    out = {f"loss/{k}": sum((ROWS[r][1][i] + _offset(k)) * ROWS[r][0][i] for r in ranks for i in KEPT[r]) / tok
           for k in MEANS}
    out["loss/num_tokens"] = tok / real
    out["update/tokens"] = tok
    return out


def test_loss_stats_are_token_weighted_and_leave_out_padding_passes(monkeypatch):
    """One rank whose peer had two more micro-batches per mini-batch (the all-reduce(max) says so): the padding
    passes must not dilute loss/*."""
    real = update_mod.all_reduce

    def peer_has_more(v, op="sum"):
        out = real(v, op)
        if op == "max" and out.numel() == 1:
            out += 2
        return out

    monkeypatch.setattr(update_mod, "all_reduce", peer_has_more)
    m = _update(0, 1, monkeypatch.setattr)
    assert m["update/micro_batches"] == ((2 + 2) + (1 + 2)) / 2   # mini-batches of 2 and 1 rows, + 2 padding passes
    for k, v in _expected([0]).items():
        assert m[k] == pytest.approx(v, rel=1e-6), k
    assert m["loss/loss"] == m["loss"]


def test_loss_stats_of_a_rank_without_micro_batches_are_zeros_not_nan():
    s = update_mod.LossStats(with_kl=True)
    s.add({k: torch.tensor(0.0) for k in (*MEANS, "loss", "num_tokens")}, real=False)  # a padding pass
    m = s.metrics(s.sums(), loss=0.0)
    assert set(m) == {f"loss/{k}" for k in (*MEANS, "loss", "num_tokens")} | {"update/tokens"}
    assert all(v == 0.0 for v in m.values())
    no_ref = update_mod.LossStats(with_kl=False)
    assert "loss/kl" not in no_ref.metrics(no_ref.sums(), loss=0.0)


# ------------------------------------------------------------------------------------------ advantages

ALGO = SimpleNamespace(advantage_mode="joint", adv_eps=1e-6, dynamic_sampling=False)


def _rewards(rank: int, case: str) -> tuple[RewardOutput, torch.Tensor]:
    """(B, K, G) = (3, 2, 3) rewards of one rank, and which questions are valid."""
    g = torch.Generator().manual_seed(10 + rank)
    r = torch.randint(0, 3, (3, 2, 3), generator=g).float() * 0.5
    r[0, 0] = 1.0                              # a dead variant group
    r[1] = 0.5 * (rank + 1)                    # a dead question
    if rank == 1:
        r[2, 1, 2] = float("nan")
    valid = torch.tensor([True, True, rank == 1]) if case == "both" else torch.tensor([rank == 1] * 3)
    return RewardOutput(reward=r, accuracy=(r > 0.7).float(), format=torch.ones_like(r)), valid


def test_advantage_metrics_on_one_rank_equal_compute_advantages():
    for rank in (0, 1):
        rew, valid = _rewards(rank, "both")
        _, _, m = step_mod._advantages(rew, valid, ALGO)
        want = compute_advantages(rew.reward[valid], "joint", 1e-6).metrics
        assert m.keys() == want.keys()
        for k in want:
            assert m[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


def test_advantage_metrics_are_present_without_a_valid_question():
    rew, valid = _rewards(0, "rank1_only")
    _, _, m = step_mod._advantages(rew, valid, ALGO)
    assert m == dict.fromkeys(compute_advantages(rew.reward, "joint").metrics, 0.0)


# ------------------------------------------------------------------------------------------ two ranks


def _two_rank_worker(rank: int, out_dir: str) -> dict:
    out = {"update": _update(rank, 2, setattr)}
    for case in ("both", "rank1_only"):
        rew, valid = _rewards(rank, case)
        out[case] = step_mod._advantages(rew, valid, ALGO)[2]
    return out


def test_two_ranks_log_the_same_global_loss_and_advantage_metrics(tmp_path):
    """Rank 0 has 2 real micro-batches and runs padding passes, rank 1 has 5; the ranks' rewards differ, and in
    the second step rank 0 has no valid question. Both ranks log the metrics of everything, identically."""
    from sharded import run_ranks

    res = run_ranks(_two_rank_worker, tmp_path)
    assert res[0] == res[1]                          # the same row on every rank
    m = res[0]["update"]
    for k, v in _expected([0, 1]).items():
        assert m[k] == pytest.approx(v, rel=1e-6), k
    assert m["loss/loss"] == m["loss"]
    for case in ("both", "rank1_only"):
        rew = [_rewards(r, case) for r in (0, 1)]
        together = torch.cat([x.reward[v] for x, v in rew])      # joint groups never span ranks
        want = compute_advantages(together, "joint", 1e-6).metrics
        assert res[0][case].keys() == want.keys()
        for k in want:
            assert res[0][case][k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (case, k)
            assert math.isfinite(res[0][case][k])
    assert res[0]["both"]["nan_count"] == 1 and res[0]["both"]["num_groups"] == 5
