"""sample_tokens: the one-pass Triton sampler (interpreter on CPU, compiled on CUDA) against its contract.

- the draw is exactly the Gumbel-max of its documented noise, rebuilt here from a numpy Philox-4x32-10 (fp64);
- its distribution: total variation against the softmax over 100k+ draws;
- greedy: torch.argmax's token (first index on ties, ties across tiles and splits), log_softmax's log-prob;
- log-probs against fp64, bounded by the twin's own fp32 error; any split plan gives the same tokens;
- seeds and steps: equal keys repeat, different keys differ; bad input names what is wrong.
"""
import numpy as np
import pytest
import torch

from strive_kernels import BackendError, sample_tokens, sampling_seed
from strive_kernels.reference.sampling import sample_tokens_reference
from strive_kernels.sampling import plan, tile_columns

M32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, key: int) -> list[np.ndarray]:
    """Philox-4x32-10 (Salmon et al. 2011) on counters (c0 = counter, c1 = c2 = c3 = 0), key = (lo, hi) of the
    64-bit key, as Triton's randint4x runs it for int32 offsets. uint64 arithmetic, masked to 32 bits."""
    c0 = counter.astype(np.uint64)
    c1 = np.zeros_like(c0)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = A * c0, B * c2                                     # < 2^64: exact in uint64
        c0, c1, c2, c3 = (pb >> np.uint64(32)) ^ c1 ^ k0, pb & M32, (pa >> np.uint64(32)) ^ c3 ^ k1, pa & M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
    return [c0, c1, c2, c3]


def noise(M: int, V: int, key: int) -> np.ndarray:
    """(M, V) fp64 Gumbel noise of the kernel's documented stream: column c of row r takes output
    (c mod 4Q) // Q of the counter r * NC + (c // 4Q) * Q + c mod Q."""
    Q = tile_columns(V)
    NC = -(-V // (4 * Q)) * Q
    col = np.arange(V)
    counter = np.arange(M)[:, None] * NC + (col // (4 * Q)) * Q + col % Q
    outs = philox4x32(counter, key)
    which = (col % (4 * Q)) // Q
    r = np.select([which == k for k in range(4)], outs)
    u = ((r >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0 ** -23   # exact in the kernel's fp32 too
    return -np.log(-np.log(u))


def gumbel_max(x: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
    """The token the documented noise picks for each row of x = logits / T (fp64), and whether the row's top two
    scores are apart by more than 1e-4 (else fp32 against fp64 noise can swap a near-tie)."""
    score = x + noise(x.shape[0], x.shape[1], key)
    top2 = np.sort(score, 1)[:, -2:]
    return score.argmax(1), top2[:, 1] - top2[:, 0] > 1e-4


def _seed(v, device):
    return torch.tensor([v], dtype=torch.long, device=device)


@pytest.mark.parametrize("M,V,T,splits", [(3, 37, 0.7, 1), (5, 1000, 1.0, 3), (2, 4099, 1.3, 2), (9, 130, 0.5, 4)])
def test_draw_is_the_gumbel_max_of_its_philox_noise(M, V, T, splits, device):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(M, V, generator=g) * 3).to(device)
    seed, step = 987_654_321_012, 17
    tok, lp = sample_tokens(logits, T, seed=_seed(seed, device), step=_seed(step, device), splits=splits,
                            backend="triton")
    want, clear = gumbel_max(logits.double().cpu().numpy() / T, seed + step)
    assert clear.mean() > 0.5
    assert (tok.cpu().numpy()[clear] == want[clear]).all()
    ref = torch.log_softmax(logits.double() / T, -1).gather(1, tok[:, None]).squeeze(1)
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=2e-6)


def test_the_largest_philox_output_gives_finite_noise(device):
    """A column whose Philox output has its top 24 bits set: u = ((r >> 8) + 0.5) / 2^24 rounded to 1.0 in fp32 there,
    its noise was +inf and it was sampled whatever its logit (2^-24 per column and step: 0.9 % of the rows at Qwen's
    151,936 tokens). With the column 30 below the rest it must not be drawn, and the draw's log-prob is finite."""
    V, key, col = 4096, 4696, 94                      # found with the numpy stream below (seed 4696, step 0)
    Q = tile_columns(V)
    r = philox4x32(np.array([(col // (4 * Q)) * Q + col % Q]), key)[(col % (4 * Q)) // Q][0]   # row 0's counter
    assert int(r) >> 8 == 2 ** 24 - 1                 # the premise: the largest 24-bit value
    logits = torch.zeros(1, V)
    logits[0, col] = -30.0
    tok, lp = sample_tokens(logits.to(device), 1.0, seed=_seed(key, device), step=_seed(0, device), backend="triton")
    assert int(tok) != col and torch.isfinite(lp).all() and float(lp) > -20
    assert int(tok) == int(gumbel_max(logits.double().numpy(), key)[0][0])


def _tv(counts, p):
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def test_distribution_total_variation(device, monkeypatch):
    """100k draws of one 37-token row at T = 1.6: TV to softmax(x / T) below 0.01 (expected ~0.004), the bound
    the twin meets with the same number of draws (tests/test_decode.py checks the twin with top-k / top-p).
    Larger tiles here (1,024 rows per program: 4x fewer interpreted programs) draw the same noise."""
    import strive_kernels.sampling as ks

    monkeypatch.setattr(ks, "TILE", 16 * 1024)
    V, N, T = 37, 100_000, 1.6
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2
    p = torch.softmax(logits.double() / T, -1)[0]
    assert plan(N, V, None)[0] == 1024
    tok, lp = sample_tokens(logits.expand(N, V).to(device), T, seed=_seed(5, device), step=_seed(0, device),
                            backend="triton")
    want, clear = gumbel_max(logits.expand(50, V).double().numpy() / T, 5)   # the documented noise, any tile size
    assert clear.mean() > 0.5 and (tok[:50].cpu().numpy()[clear] == want[clear]).all()
    counts = torch.bincount(tok.cpu(), minlength=V).double()
    assert _tv(counts, p) < 0.01
    torch.manual_seed(0)
    twin, _ = sample_tokens_reference(logits.expand(N, V), T)
    assert _tv(torch.bincount(twin, minlength=V).double(), p) < 0.01
    torch.testing.assert_close(lp.double().cpu(), torch.log(p)[tok.cpu()], rtol=0, atol=2e-6)


@pytest.mark.parametrize("M,V,splits", [(4, 37, 1), (3, 5000, 3), (6, 4097, 2)])
def test_greedy_is_torch_argmax_with_its_ties(M, V, splits, device):
    g = torch.Generator().manual_seed(M + V)
    logits = torch.randn(M, V, generator=g)
    Q = tile_columns(V)
    logits[0, [1, V - 1]] = 50.0                                     # tie in the first and last tile
    if V > 4 * Q:
        logits[1, [4 * Q - 1, 4 * Q]] = 40.0                         # tie across a tile (and split) border
    if V > 2 * Q + 1:
        logits[2, [Q, 2 * Q + 1]] = 45.0                             # tie across two sub-blocks of a tile
    dev = logits.to(device)
    for dt in (torch.float32, torch.bfloat16):
        x = dev.to(dt)
        tok, lp = sample_tokens(x, 0.3, greedy=True, splits=splits, backend="triton")
        assert torch.equal(tok, torch.argmax(x, -1))
        ref = torch.log_softmax(x.double(), -1).gather(1, tok[:, None]).squeeze(1)
        err = (lp.double() - ref).abs().max().item()
        twin_err = (sample_tokens_reference(x, greedy=True)[1].double() - ref).abs().max().item()
        assert err <= 4 * twin_err + 1e-6, (err, twin_err)


def test_any_split_plan_gives_the_same_draw(device):
    """The noise of (row, column) does not depend on the split plan or the rows per program: every plan draws
    the same tokens, with log-probs equal to rounding (splits past the tiles are clamped; padding-only splits)."""
    M, V = 7, 9000                                                   # Q = 1,024: 3 tiles, the last one partial
    logits = torch.randn(M, V, generator=torch.Generator().manual_seed(1)).to(device)
    runs = [sample_tokens(logits, 1.1, seed=_seed(42, device), step=_seed(3, device), splits=s, backend="triton")
            for s in (1, 2, 3, 50)]
    for tok, lp in runs[1:]:
        assert torch.equal(tok, runs[0][0])
        torch.testing.assert_close(lp, runs[0][1], rtol=0, atol=1e-6)
    assert plan(M, V, None, 50)[2] == 3 and plan(M, V, None)[2] == 1
    assert plan(128, 151_936, 132) == (1, 1024, 4)                   # 128 rows x 4 splits = 512 programs
    assert plan(8, 1028, 132) == (2, 512, 1)                         # gpu_small's vocabulary: one tile per row


def test_seeds_and_steps(device):
    logits = torch.zeros(16, 500, device=device)                     # uniform: every row's draw is pure noise
    draw = lambda s, t: sample_tokens(logits, seed=_seed(s, device), step=_seed(t, device), backend="triton")[0]  # noqa: E731
    a = draw(7, 0)
    assert torch.equal(a, draw(7, 0))
    assert not torch.equal(a, draw(7, 1)) and not torch.equal(a, draw(8, 0))
    assert len(set(a.tolist())) > 8                                  # the rows are independent
    g = torch.Generator(device=device).manual_seed(3)
    s1 = sampling_seed(device, g)
    g.manual_seed(3)
    assert torch.equal(s1, sampling_seed(device, g)) and s1.dtype == torch.long and s1.shape == (1,)


def test_bad_input(device):
    x = torch.randn(3, 10, device=device)
    with pytest.raises(ValueError, match="logits must be \\(M, V\\)"):
        sample_tokens(x[0], greedy=True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_tokens(x, 0.0)
    with pytest.raises(ValueError, match="seed must be a 1-element int64 tensor"):
        sample_tokens(x, seed=torch.tensor([1.0], device=device), step=_seed(0, device))
    with pytest.raises(ValueError, match="logits must be floating point"):
        sample_tokens(x.long(), greedy=True)
    with pytest.raises(BackendError, match="sampling needs seed= and step="):   # (the rules: test_backend.py)
        sample_tokens(x, 1.0, backend="triton")
