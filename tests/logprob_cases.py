"""Shared cases and helpers of the fused log-prob tests (kernels/test_logprob.py and test_logprob_resources.py):
the random case generator, the public-op runner and the error rule against the fp64 oracle (see test_logprob.py)."""
import math

import pytest
import torch

import strive_kernels as sk


BIG = 1 << 40  # max_chunk_bytes that makes everything one chunk


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter-sized tiles: V=1000 -> 4 tiles of 256 in 2 splits, so the split-combine and tails run."""
    from strive_kernels import logprob
    monkeypatch.setattr(logprob, "BLOCK_V_MAX", 256)
    monkeypatch.setattr(logprob, "TILES_PER_SPLIT", 2)


def make_case(n=37, h=72, v=1000, *, n_seq=4, seed=0, bias=True, mask_frac=0.25, per_seq=False, scale=2.0):
    """Targets sampled from the model itself and old/ref log-probs near the true ones, so ratios straddle
    both clip limits; logits ~ N(0, scale^2)."""
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (scale / math.sqrt(h))
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    logits = hid @ w.T + (b if bias else 0)
    tgt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
    true = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).squeeze(1)
    seq = torch.sort(torch.randint(0, n_seq, (n,), generator=g)).values
    adv_seq = torch.randn(n_seq, generator=g)
    mask = torch.rand(n, generator=g) >= mask_frac
    mask[0] = True
    return dict(hidden=hid, weight=w, bias=b, targets=tgt, old_logp=(true + 0.2 * torch.randn(n, generator=g)).float(),
                ref_logp=(true + 0.3 * torch.randn(n, generator=g)).float(), seq_ids=seq,
                advantages=adv_seq if per_seq else adv_seq[seq] + 0.1 * torch.randn(n, generator=g), mask=mask)


def dev_for(backend):
    """Triton runs on CUDA tensors where there is a GPU (compiled), on CPU tensors under the interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def on(case, backend):
    return {k: v.to(dev_for(backend)) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


SETTINGS = ("temperature", "eps_low", "eps_high", "beta", "loss_agg")  # the fields of sk.LossSpec


def run(case, dtype, backend, *, with_ref=True, max_chunk_bytes=BIG, **kw):
    """Call the public op on `case` cast to dtype; returns a dict of outputs and gradients (fp64, CPU).
    kw: LossSpec fields (default seq_mean_token_mean at temperature 0.7) and the op's keyword arguments."""
    case = on(case, backend)
    hid = case["hidden"].to(dtype, copy=True).requires_grad_()
    w = case["weight"].to(dtype, copy=True).requires_grad_()
    b = case["bias"].to(dtype, copy=True).requires_grad_() if case["bias"] is not None else None
    spec = sk.LossSpec(**{"temperature": 0.7, **{k: kw.pop(k) for k in SETTINGS if k in kw}})
    out = sk.fused_logprob_loss(hid, w, case["targets"], case["old_logp"], case["advantages"], case["mask"], spec,
                                bias=b, ref_logp=case["ref_logp"] if with_ref else None, seq_ids=case["seq_ids"],
                                backend=backend, return_entropy=True, max_chunk_bytes=max_chunk_bytes, **kw)
    out.loss.backward()
    res = {"loss": out.loss, "logp": out.logp, "entropy": out.entropy, "grad_hidden": hid.grad, "grad_weight": w.grad,
           "clip_frac": out.clip_frac, "entropy_mean": out.entropy_mean}
    if b is not None:
        res["grad_bias"] = b.grad
    if with_ref:
        res["kl"] = out.kl
    return {k: v.detach().double().cpu() for k, v in res.items()}


def assert_close_to_oracle(case, dtype, backend, **kw):
    """ours vs fp64 oracle, bounded by plain PyTorch's own error at `dtype`."""
    oracle = run(case, torch.float64, "reference", **{k: v for k, v in kw.items() if k != "max_chunk_bytes"})
    plain = run(case, dtype, "reference", **{k: v for k, v in kw.items() if k != "max_chunk_bytes"})
    ours = run(case, dtype, backend, **kw)
    assert set(ours) == set(oracle)
    for key, ref in oracle.items():
        assert torch.isfinite(ref).all(), key
        scale = ref.abs().max().item() if ref.numel() else 0.0
        if key == "kl":  # k3 = exp(d) - d - 1 cancels: its fp32 noise is ~ulp(1), not ulp(k3)
            scale = max(scale, 1.0)
        e_ours = (ours[key] - ref).abs().max().item() if ref.numel() else 0.0
        e_plain = (plain[key] - ref).abs().max().item() if ref.numel() else 0.0
        assert e_ours <= 2 * e_plain + 2e-6 * scale + 1e-12, (key, e_ours, e_plain, scale)
    return ours, oracle
