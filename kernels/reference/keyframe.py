"""Pure-torch twin of `strive_kernels.keyframe_sample`: importance-aware keyframe sampling for B ragged pools.

Pool b is rows offsets[b]:offsets[b+1] of `frame_emb` (P_b candidate frames). For each pool:

    scores_i     = cos(frame_i, question_b) = <f, q> / max(|f| |q|, 1e-8)                (fp32)
    importance_i = (1 - lambda) * softmax(scores / tau)_i + lambda / P_b
    variant k (0 <= k < K): F frames by stratified inverse-CDF sampling of the importance,
        quantiles q_j = (j + u_k) / F, j = 0..F-1, one uniform u_k per (seed, b, k);
        raw index x_j = first i with cdf_i > q_j (non-decreasing in j), then de-duplicated (below).
    canonical_first: variant 0 is the canonical view — lambda = 1 (uniform) and u = 0.5, i.e. the evenly
        spread frames floor((2j + 1) P / (2F)), the same every step.

Exactness, so that the Triton kernel draws *identical* indices:
  * u_k is Triton's `tl.rand(seed, b * 65536 + k)`: Philox-4x32-10 on counter (b*65536 + k, 0, 0, 0), key
    (seed mod 2^32, seed >> 32), first word, mapped to [0, 1) as Triton's `uint_to_uniform_float` does
    (fold the int32 to [0, 2^31), times fp32 4.6566127342e-10). Reproduced here in int64 arithmetic.
  * The CDF is integer: w_i = floor(importance_i * 2^30), W = cumsum(w) (int64, exact in any order),
    T = W[P-1]; with U = floor(u * 2^24), sample j picks the first i with W_i * F > j * T + (U * T >> 24).
    Given the same fp32 importance bits both implementations therefore pick the same raw indices; the
    importance itself can differ in the last bit between devices (exp, reduction order), which moves an
    index only when a quantile falls within ~1e-7 of a CDF step.
  * De-duplication is a sequential greedy: samples are placed in order j = 0..F-1; a sample whose frame
    is already taken takes the nearest free frame, the earlier one on a tie. The F chosen frames are
    returned sorted. Every distinct raw index is kept (it is taken by its first sample, or was already
    taken), so de-duplication only adds frames and never widens a gap.

Coverage bound (tested): with lambda > 0 every gap — x_0 + 1, consecutive differences, P - x_{F-1} — is
at most 2P / (lambda F). Proof: every frame has sampling mass m_i >= lambda / P (up to the 2^-30
quantisation, relative error < P 2^-29 / lambda). Frames strictly between consecutive raw samples x_j <
x_{j+1} have total mass < q_{j+1} - q_j = 1/F (cdf at x_j exceeds q_j, cdf before x_{j+1} is at most
q_{j+1}), so (x_{j+1} - x_j - 1) lambda / P < 1/F, i.e. the gap is < 1 + P/(lambda F); frames before x_0 have
mass <= q_0 < 1/F and frames after x_{F-1} have mass < 1 - q_{F-1} <= 1/F, the same bound at the ends.
Since F <= P and lambda <= 1, P/(lambda F) >= 1, so 1 + P/(lambda F) <= 2P/(lambda F) (the integer gap keeps
the bound through the quantisation slack). De-duplication only adds frames (above), so the bound holds for
the returned indices.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

COS_EPS = 1e-8
CDF_BITS = 30  # importance -> integer weights with 2^-30 resolution
U_BITS = 24  # u -> floor(u * 2^24)
RNG_B_STRIDE = 65536  # counter = b * 65536 + k (int32): B <= 32767 pools, K <= 65536 variants per call
MAX_POOLS = 32767
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton: largest scale with (2^31 - 1) * scale < 1 in fp32


class KeyframeInputError(ValueError):
    """Bad input to keyframe sampling; the message names the argument, the pool and the offending value."""


# ------------------------------------------------------------------------------------------------ rng


def _mulhilo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a * b for uint32 values held in int64, without int64 overflow."""
    p_hi = (a >> 16) * b  # < 2^48
    p_lo = (a & 0xFFFF) * b  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int,
               rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32 (Salmon et al. 2011; Random123's philox4x32_R) as Triton's `philox_impl` runs it."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def triton_rand(seed: int, offsets: Tensor) -> Tensor:
    """Bit-exact `tl.rand(seed, offsets)` for int32 offsets >= 0: float32 uniforms in [0, 1)."""
    off = offsets.to(torch.int64)
    zero = torch.zeros_like(off)
    word, _, _, _ = philox4x32(off & _M32, zero, zero, zero, seed & _M32, (seed >> 32) & _M32)
    signed = torch.where(word >= 2**31, word - 2**32, word)  # bitcast to int32
    folded = torch.where(signed < 0, -signed - 1, signed)  # [0, 2^31)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=off.device)


def variant_uniforms(seed: int, num_pools: int, num_variants: int, canonical_first: bool,
                     device: torch.device | str = "cpu") -> Tensor:
    """(B, K) float32 u_k per (seed, b, k); u = 0.5 for the canonical variant 0."""
    b = torch.arange(num_pools, device=device, dtype=torch.int64)[:, None]
    k = torch.arange(num_variants, device=device, dtype=torch.int64)[None, :]
    u = triton_rand(seed, b * RNG_B_STRIDE + k)
    if canonical_first:
        u[:, 0] = 0.5
    return u


# ------------------------------------------------------------------------------------------ validation


def check_keyframe_inputs(frame_emb: Tensor, question_emb: Tensor, offsets: Tensor, num_variants: int,
                          num_frames: int, temperature: float, uniform_mix: float, seed: int) -> list[int]:
    """Validate shapes and knobs; return the pool sizes P_b as host ints (reads offsets: one sync on GPU)."""
    for name, t in (("frame_emb", frame_emb), ("question_emb", question_emb), ("offsets", offsets)):
        if not isinstance(t, Tensor):
            raise KeyframeInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if frame_emb.dim() != 2 or not frame_emb.dtype.is_floating_point:
        raise KeyframeInputError(f"frame_emb must be a float (sum P_b, D) tensor, got {frame_emb.dtype} "
                                 f"{tuple(frame_emb.shape)}")
    if question_emb.dim() != 2 or not question_emb.dtype.is_floating_point:
        raise KeyframeInputError(f"question_emb must be a float (B, D) tensor, got {question_emb.dtype} "
                                 f"{tuple(question_emb.shape)}")
    if question_emb.shape[1] != frame_emb.shape[1]:
        raise KeyframeInputError(f"embedding widths differ: frame_emb D={frame_emb.shape[1]}, "
                                 f"question_emb D={question_emb.shape[1]}")
    if question_emb.device != frame_emb.device:
        raise KeyframeInputError(f"question_emb is on {question_emb.device}, frame_emb on {frame_emb.device}")
    if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32):
        raise KeyframeInputError(f"offsets must be a 1-D int64 tensor (B+1,), got {offsets.dtype} "
                                 f"{tuple(offsets.shape)}")
    B = question_emb.shape[0]
    if offsets.numel() != B + 1:
        raise KeyframeInputError(f"offsets must have B+1={B + 1} entries for B={B} questions, got {offsets.numel()}")
    if B > MAX_POOLS:
        raise KeyframeInputError(f"at most {MAX_POOLS} pools per call (RNG counter layout), got B={B}")
    for name, v, lo in (("num_variants", num_variants, 1), ("num_frames", num_frames, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise KeyframeInputError(f"{name} must be an int >= {lo}, got {v!r}")
    if num_variants > RNG_B_STRIDE:
        raise KeyframeInputError(f"num_variants must be <= {RNG_B_STRIDE}, got {num_variants}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise KeyframeInputError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(uniform_mix, (int, float)) and 0.0 <= uniform_mix <= 1.0):
        raise KeyframeInputError(f"uniform_mix (lambda) must be in [0, 1], got {uniform_mix!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise KeyframeInputError(f"seed must be an int in [0, 2^63), got {seed!r}")
    off = offsets.tolist()
    if off[0] != 0 or off[-1] != frame_emb.shape[0]:
        raise KeyframeInputError(f"offsets must start at 0 and end at frame_emb rows={frame_emb.shape[0]}, got "
                                 f"offsets[0]={off[0]}, offsets[-1]={off[-1]}")
    sizes = [hi - lo for lo, hi in zip(off[:-1], off[1:])]
    for b, p in enumerate(sizes):
        if p < 0:
            raise KeyframeInputError(f"offsets must be non-decreasing: offsets[{b}]={off[b]} > offsets[{b + 1}]={off[b + 1]}")
        if p == 0:
            raise KeyframeInputError(f"pool {b} is empty (offsets[{b}] == offsets[{b + 1}] == {off[b]})")
        if num_frames > p:
            raise KeyframeInputError(f"pool {b} has P={p} candidate frames, fewer than num_frames F={num_frames}")
    return sizes


def check_finite_embeddings(frame_emb: Tensor, question_emb: Tensor, sizes: list[int]) -> None:
    """Raise KeyframeInputError naming the first pool with a NaN/inf frame or question embedding."""
    bad_q = ~torch.isfinite(question_emb).all(dim=1)  # (B,)
    bad_f = ~torch.isfinite(frame_emb).all(dim=1)  # (sum P,)
    if not bool(bad_q.any() | bad_f.any()):
        return
    pool_of_row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    rows = torch.nonzero(bad_f.cpu()).flatten()
    b_row = int(pool_of_row[rows[0]]) if rows.numel() else len(sizes)
    b_q = int(torch.nonzero(bad_q.cpu())[0]) if bool(bad_q.any()) else len(sizes)
    if b_q <= b_row:
        raise KeyframeInputError(f"question embedding of pool {b_q} has NaN/inf values")
    local = int(rows[0]) - sum(sizes[:b_row])
    raise KeyframeInputError(f"frame embedding of pool {b_row}, frame {local} (row {int(rows[0])}) has NaN/inf values")


# ------------------------------------------------------------------------------------------- sampling


def cosine_scores(frame_emb: Tensor, question_emb: Tensor, sizes: list[int]) -> Tensor:
    """(sum P,) float32 cos(frame, its pool's question), accumulated in fp32."""
    f = frame_emb.float()
    q = question_emb.float()
    pool_of_row = torch.repeat_interleave(torch.arange(len(sizes), device=f.device),
                                          torch.tensor(sizes, device=f.device))
    dot = (f * q[pool_of_row]).sum(-1)
    norm = torch.sqrt((f * f).sum(-1)) * torch.sqrt((q * q).sum(-1))[pool_of_row]
    return dot / torch.clamp_min(norm, COS_EPS)


def importance_from_scores(scores_pad: Tensor, valid: Tensor, sizes_f: Tensor, temperature: float,
                           uniform_mix: float) -> Tensor:
    """(B, Pmax) fp32 importance from padded scores; 0 on padding. Same op order as the kernel."""
    tau = torch.tensor(temperature, dtype=torch.float32, device=scores_pad.device)
    lam = torch.tensor(uniform_mix, dtype=torch.float32, device=scores_pad.device)
    z = torch.where(valid, scores_pad / tau, -float("inf"))
    e = torch.exp(z - torch.amax(z, dim=1, keepdim=True))  # (B, Pmax), 0 on padding
    soft = e / e.sum(dim=1, keepdim=True)
    imp = (1 - lam) * soft + lam / sizes_f[:, None]
    return torch.where(valid, imp, 0.0)


def stratified_indices(imp: Tensor, valid: Tensor, sizes_f: Tensor, u: Tensor, num_frames: int,
                       canonical_first: bool) -> Tensor:
    """(B, K, F) int64 sorted unique local indices from (B, Pmax) importance and (B, K) uniforms."""
    B, Pmax = imp.shape
    K, F = u.shape[1], num_frames
    dev = imp.device
    w = torch.floor(imp * 2.0**CDF_BITS).to(torch.int64)  # (B, Pmax), exact power-of-two scaling
    W = torch.cumsum(w, dim=1)[:, None, :].expand(B, K, Pmax).clone()  # (B, K, Pmax)
    if canonical_first:  # variant 0: uniform weights floor(2^30 / P)
        wc = torch.floor((1.0 / sizes_f) * 2.0**CDF_BITS).to(torch.int64)  # (B,)
        W[:, 0, :] = torch.cumsum(torch.where(valid, wc[:, None], 0), dim=1)
    T = W[:, :, -1]  # (B, K) total weight (padding adds 0)
    U = torch.floor(u * 2.0**U_BITS).to(torch.int64)  # (B, K)
    uT = (U * T) >> U_BITS
    lane = torch.arange(Pmax, device=dev)
    used = ~valid[:, None, :].expand(B, K, Pmax).clone()  # padding counts as taken
    big = 1 << 40
    for j in range(F):
        target = j * T + uT  # (B, K)
        x = ((W * F <= target[..., None]) & valid[:, None, :]).sum(-1)  # raw inverse-CDF index
        key = torch.where(used, big, (lane - x[..., None]).abs() * 2 + (lane > x[..., None]))
        kmin = torch.amin(key, dim=-1)  # nearest free frame, earlier one on a tie (amin: no argmin work)
        d, right = kmin >> 1, kmin & 1
        new = torch.where(right == 1, x + d, x - d)
        used.scatter_(-1, new[..., None], True)
    used &= valid[:, None, :]
    return torch.nonzero(used)[:, 2].reshape(B, K, F)  # row-major: sorted per (b, k)


def keyframe_sample_reference(frame_emb: Tensor, question_emb: Tensor, offsets: Tensor, num_variants: int,
                              num_frames: int, temperature: float = 0.1, uniform_mix: float = 0.3, seed: int = 0,
                              canonical_first: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (indices int64 (B, K, F) sorted unique local, scores fp32 (sum P,), importance fp32 (sum P,)).

    frame_emb float (sum P_b, D); question_emb float (B, D); offsets int64 (B+1,). See the module docstring.
    """
    sizes = check_keyframe_inputs(frame_emb, question_emb, offsets, num_variants, num_frames, temperature,
                                  uniform_mix, seed)
    check_finite_embeddings(frame_emb, question_emb, sizes)
    dev = frame_emb.device
    B, Pmax = len(sizes), max(sizes)
    scores = cosine_scores(frame_emb, question_emb, sizes)  # (sum P,)
    lane = torch.arange(Pmax, device=dev)
    sizes_t = torch.tensor(sizes, device=dev)
    valid = lane[None, :] < sizes_t[:, None]  # (B, Pmax)
    scores_pad = torch.zeros(B, Pmax, dtype=torch.float32, device=dev)
    scores_pad[valid] = scores
    imp = importance_from_scores(scores_pad, valid, sizes_t.float(), temperature, uniform_mix)
    u = variant_uniforms(seed, B, num_variants, canonical_first, dev)
    indices = stratified_indices(imp, valid, sizes_t.float(), u, num_frames, canonical_first)
    return indices, scores, imp[valid]
