"""One pass over the logits per decode step: a token drawn from softmax(logits / T) and its log-probability.

    seed = sampling_seed(device)                    # (1,) int64 from the device's default generator, once per call
    token, logp = sample_tokens(logits, T, seed=seed, step=t)        # t: (1,) int64 device tensor, the step index
    token, logp = sample_tokens(logits, greedy=True)                 # argmax and log_softmax(logits)[argmax]

Contract (and the torch twin): strive_kernels.reference.sampling.

Why: the decode step's sampling was a chain of eight kernels over the (M, V) logits (fp32 copy, divide by T,
log-softmax, exponential noise, clamp, log, subtract, argmax), ~0.40 ms of a 5.02 ms step at the Qwen2.5-VL-3B
rollout shape (128 x 151,936, H200 profile of 2026-12-04), for work that one read of 39 MB of bf16 logits does.
Here each program streams a slice of a row block's vocabulary once, keeping an online log-sum-exp and a running
Gumbel-max argmax (score = x / T - log(-log u)); the first index wins a tie, as in torch.argmax. With S > 1 splits
of the vocabulary a second kernel merges the S partials per row (max, sum, best score, its index and its x).

Noise: counter-based Philox-4x32-10 (Triton's `randint4x`), key = seed + step (int64, read on the device, so a
captured graph replays with the step its state holds), counter = row * NC + tile * Q + j (NC = Q x the tiles of
a row), whose four outputs serve the four sub-blocks of a tile of 4 Q columns (column tile * 4 Q + k * Q + j takes
output k). The draw depends only on (seed + step, row, column), not on the split plan or the rows per program, and
a test rebuilds it from a numpy Philox. u = ((r >> 9) + 0.5) / 2^23, exact in fp32, lies in [2^-24, 1 - 2^-24], so
the Gumbel noise is finite (24 bits were not: the largest value rounded to u = 1 in fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from strive_kernels import _backend
from strive_kernels._backend import cdiv, next_pow2, resolve
from strive_kernels.reference.sampling import sample_tokens_reference

__all__ = ["sample_tokens", "sampling_seed", "tile_columns"]

TILE = 1024          # elements of one sub-block (BLOCK_M rows x Q columns): 8 per thread at 4 warps
MAX_Q = 1024         # columns per sub-block; a tile is 4 sub-blocks (one Philox call feeds all four)
PROGRAMS_PER_SM = 4  # what fits on an sm_90 SM (113 registers at 4 warps; bench/kernel_resources.py)


@triton.jit
def _update(x_ptr, stride_m, rows, rok, c, j, V, r, temp, m, s, best, best_i, best_x, GREEDY: tl.constexpr):
    """Fold the (BLOCK_M, Q) sub-block of columns c + j into the running state: online log-sum-exp (m, s) of
    x = logits / T and the Gumbel-max argmax (best score, its column, its x)."""
    cols = c + j
    ok = rok[:, None] & (cols[None, :] < V)
    raw = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
    if GREEDY:
        x = raw
        score = x
    else:
        x = raw / temp                                              # divided, as torch does
        # 23 bits, exact in fp32: u in [2^-24, 1 - 2^-24]. With 24 bits, (2^24 - 1) + 0.5 rounds to 2^24 in fp32:
        # u = 1, noise +inf, and a column drawn uniformly won (2^-24 per column: 0.9 % of rows at V = 151,936)
        u = ((r.to(tl.uint32, bitcast=True) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        score = tl.where(ok, x - tl.log(-tl.log(u)), float("-inf"))
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
    tile_best = tl.max(score, 1)
    tile_j = tl.argmax(score, 1, tie_break_left=True)
    hit = j[None, :] == tile_j[:, None]
    tile_x = tl.max(tl.where(hit, x, float("-inf")), 1)
    better = tile_best > best
    best_i = tl.where(better, c + tile_j, best_i)
    best_x = tl.where(better, tile_x, best_x)
    best = tl.maximum(best, tile_best)
    return m_new, s, best, best_i, best_x


@triton.jit
def _sample_kernel(x_ptr, stride_m, seed_ptr, step_ptr, temp, M, V, NC, TPS,
                   pm_ptr, ps_ptr, pb_ptr, pi_ptr, px_ptr, tok_ptr, logp_ptr, S,
                   GREEDY: tl.constexpr, ONE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, Q: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rok = rows < M
    rows64 = rows.to(tl.int64)
    j = tl.arange(0, Q)
    if GREEDY:
        key = 0
    else:
        key = tl.load(seed_ptr) + tl.load(step_ptr)                # int64: Philox key
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_i = tl.zeros((BLOCK_M,), tl.int32)
    best_x = tl.zeros((BLOCK_M,), tl.float32)
    n_tiles = tl.cdiv(V, 4 * Q)
    t0 = sp * TPS
    t1 = tl.minimum(t0 + TPS, n_tiles)
    for tile in range(t0, t1):
        c0 = tile * 4 * Q
        if GREEDY:
            r0 = j[None, :] * 0
            r1 = r0
            r2 = r0
            r3 = r0
        else:
            counter = rows[:, None] * NC + tile * Q + j[None, :]           # int32: the launcher checks M * NC
            r0, r1, r2, r3 = tl.randint4x(key, counter)
        m, s, best, best_i, best_x = _update(x_ptr, stride_m, rows64, rok, c0, j, V, r0, temp, m, s, best, best_i,
                                             best_x, GREEDY)
        m, s, best, best_i, best_x = _update(x_ptr, stride_m, rows64, rok, c0 + Q, j, V, r1, temp, m, s, best,
                                             best_i, best_x, GREEDY)
        m, s, best, best_i, best_x = _update(x_ptr, stride_m, rows64, rok, c0 + 2 * Q, j, V, r2, temp, m, s, best,
                                             best_i, best_x, GREEDY)
        m, s, best, best_i, best_x = _update(x_ptr, stride_m, rows64, rok, c0 + 3 * Q, j, V, r3, temp, m, s, best,
                                             best_i, best_x, GREEDY)
    if ONE_SPLIT:
        tl.store(tok_ptr + rows64, best_i.to(tl.int64), mask=rok)
        tl.store(logp_ptr + rows64, (best_x - m) - tl.log(tl.where(rok, s, 1.0)), mask=rok)   # x - max first, as torch
    else:
        at = rows64 * S + sp
        tl.store(pm_ptr + at, m, mask=rok)
        tl.store(ps_ptr + at, s, mask=rok)
        tl.store(pb_ptr + at, best, mask=rok)
        tl.store(pi_ptr + at, best_i, mask=rok)
        tl.store(px_ptr + at, best_x, mask=rok)


@triton.jit
def _merge_kernel(pm_ptr, ps_ptr, pb_ptr, pi_ptr, px_ptr, tok_ptr, logp_ptr, M, S,
                  BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    ok = (rows[:, None] < M) & (sp[None, :] < S)
    at = rows[:, None] * S + sp[None, :]
    pm = tl.load(pm_ptr + at, mask=ok, other=float("-inf"))
    ps = tl.load(ps_ptr + at, mask=ok, other=0.0)
    pb = tl.load(pb_ptr + at, mask=ok, other=float("-inf"))
    m = tl.max(pm, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(tl.maximum(tl.sum(ps * tl.exp(pm - m_safe[:, None]), 1), 1e-38))   # > 0 on real rows
    k = tl.argmax(pb, 1, tie_break_left=True)                       # the first split with the best score
    pick = ok & (sp[None, :] == k[:, None])
    idx = tl.sum(tl.where(pick, tl.load(pi_ptr + at, mask=ok, other=0), 0), 1)
    bx = tl.sum(tl.where(pick, tl.load(px_ptr + at, mask=ok, other=0.0), 0.0), 1)
    rok = rows < M
    tl.store(tok_ptr + rows, idx.to(tl.int64), mask=rok)
    tl.store(logp_ptr + rows, (bx - m) - log_s, mask=rok)


def tile_columns(V: int) -> int:
    """Q, the columns of one sub-block at vocabulary V (a tile is 4 Q). The noise of (row, column) depends on Q,
    so Q is a function of V alone: a seeded draw is the same for any batch size, split plan or device count."""
    return min(MAX_Q, max(1, next_pow2(cdiv(V, 4))))


def plan(M: int, V: int, num_sms: int | None, splits: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, Q, S): rows per program, columns per sub-block, vocabulary splits. S is the most splits whose
    programs are all resident at once (PROGRAMS_PER_SM per SM: one wave): at 128 x 151,936 on 132 SMs, 1 row x
    4 splits of 9-10 tiles, 512 programs in 0.97 waves. Without an SM count (the interpreter) one split."""
    Q = tile_columns(V)
    block_m = max(1, min(next_pow2(M), TILE // Q))
    n_tiles = cdiv(V, 4 * Q)
    if splits is None:
        splits = 1 if not num_sms else PROGRAMS_PER_SM * num_sms // cdiv(M, block_m)
    return block_m, Q, max(1, min(int(splits), n_tiles))


def sampling_seed(device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """A (1,) int64 Philox seed on `device`, drawn from its default generator (or `generator`), without a host
    sync: seed the generator and the draws repeat."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.long, generator=generator)


def _check(logits: Tensor, temperature: float, greedy: bool, seed: Tensor | None, step: Tensor | None) -> None:
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"sample_tokens: logits must be (M, V) with M, V >= 1, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"sample_tokens: logits must be floating point, got {logits.dtype}")
    if not temperature > 0:
        raise ValueError(f"sample_tokens: temperature must be > 0, got {temperature}")
    for name, t in (("seed", seed), ("step", step)):
        if t is not None and (t.dtype != torch.long or t.numel() != 1 or t.device != logits.device):
            raise ValueError(f"sample_tokens: {name} must be a 1-element int64 tensor on {logits.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def sample_tokens(logits: Tensor, temperature: float = 1.0, *, greedy: bool = False, seed: Tensor | None = None,
                  step: Tensor | None = None, splits: int | None = None,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """logits (M, V) -> (token (M,) int64, logp (M,) fp32): a draw from softmax(logits / temperature) (greedy: the
    argmax) and its log-probability; see strive_kernels.reference.sampling for the contract.

    seed, step: (1,) int64 tensors on the logits' device; the Triton path's noise is Philox keyed by seed + step
    (sampling needs both; greedy reads neither). The twin ignores them and draws from the device's default
    generator. backend="auto" takes Triton on CUDA when it is greedy or seeded, else the twin."""
    _check(logits, temperature, greedy, seed, step)
    M, V = logits.shape
    Q = tile_columns(V)
    seeded = greedy or (seed is not None and step is not None)
    fits = M * cdiv(V, 4 * Q) * Q < 2 ** 31
    backend = resolve("sample_tokens", backend, logits.device, seeded=seeded, fits=fits)
    if backend == "reference":
        return sample_tokens_reference(logits, temperature, greedy=greedy)
    return sample_tokens_triton(logits, temperature, greedy, seed, step, splits)


def sample_tokens_triton(logits: Tensor, temperature: float, greedy: bool, seed: Tensor | None,
                         step: Tensor | None, splits: int | None = None) -> tuple[Tensor, Tensor]:
    """The launches (inputs checked by sample_tokens): one pass, plus the merge when the vocabulary is split."""
    M, V = logits.shape
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    block_m, Q, S = plan(M, V, _backend.sm_count(x.device), splits)
    n_tiles = cdiv(V, 4 * Q)
    NC = n_tiles * Q
    tok = torch.empty(M, dtype=torch.long, device=x.device)
    logp = torch.empty(M, dtype=torch.float32, device=x.device)
    seed_t = seed if seed is not None else tok            # greedy: never read
    step_t = step if step is not None else tok
    grid = (cdiv(M, block_m), S)
    common = dict(GREEDY=greedy, BLOCK_M=block_m, Q=Q, num_warps=4)
    temp = 1.0 if greedy else float(temperature)
    if S == 1:
        _sample_kernel[grid](x, x.stride(0), seed_t, step_t, temp, M, V, NC, n_tiles, logp, logp, logp, tok, logp,
                             tok, logp, 1, ONE_SPLIT=True, **common)
        return tok, logp
    part = torch.empty(4, M, S, dtype=torch.float32, device=x.device)
    part_i = torch.empty(M, S, dtype=torch.int32, device=x.device)
    _sample_kernel[grid](x, x.stride(0), seed_t, step_t, temp, M, V, NC, cdiv(n_tiles, S), part[0], part[1],
                         part[2], part_i, part[3], tok, logp, S, ONE_SPLIT=False, **common)
    bm = min(64, next_pow2(M))
    _merge_kernel[(cdiv(M, bm),)](part[0], part[1], part[2], part_i, part[3], tok, logp, M, S, BLOCK_M=bm,
                                  BLOCK_S=max(2, next_pow2(S)), num_warps=4)
    return tok, logp
