"""strive_engine.loss against a hand-written plain-torch loss with materialised (S, L, V) logits, in fp64."""
import math
import os

import pytest
import torch

import strive_kernels as sk
from strive_engine.algorithms import LOSS_AGGREGATIONS, PRESETS
from strive_engine.config import AlgorithmConfig, RolloutConfig
from strive_engine.loss import LossNormaliser, LossSpec, loss_normaliser, pack_positions, policy_loss, token_logprobs

S, L, H, V = 5, 7, 24, 61
MAX_NEW = 9


def batch(seed=0, dtype=torch.float64):
    """A padded mini-batch: hidden (S, L, H), targets/old/ref/mask (S, L), advantages (S,); row 3 is
    entirely masked (a dropped answer) and rows have different lengths."""
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(S, L, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype) * (2 / math.sqrt(H))
    logits = hid @ w.T
    tgt = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1, generator=g).reshape(S, L)
    true = torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
    lengths = torch.tensor([7, 3, 5, 0, 6])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    mask[2, 1] = False  # a dropped token inside a completion
    return dict(hidden=hid, weight=w, targets=tgt, mask=mask, adv=torch.randn(S, generator=g, dtype=dtype),
                old=(true + 0.2 * torch.randn(S, L, generator=g, dtype=dtype)).float(),
                ref=(true + 0.3 * torch.randn(S, L, generator=g, dtype=dtype)).float())


def hand_loss(b, spec: LossSpec, hidden, weight, with_ref):
    """The textbook formulas on padded tensors; nothing shared with the kernel code."""
    logits = hidden @ weight.T / spec.temperature  # (S, L, V)
    logp = torch.log_softmax(logits, -1).gather(-1, b["targets"][..., None]).squeeze(-1)
    ratio = torch.exp(logp - b["old"].double())
    adv = b["adv"][:, None]
    per_tok = -torch.min(ratio * adv, torch.clamp(ratio, 1 - spec.eps_low, 1 + spec.eps_high) * adv)
    if with_ref:
        d = b["ref"].double() - logp
        per_tok = per_tok + spec.beta * (torch.exp(d) - d - 1)
    m = b["mask"].double()
    if spec.loss_agg == "token_mean":
        return (per_tok * m).sum() / m.sum()
    if spec.loss_agg == "seq_mean_token_mean":
        return ((per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    return (per_tok * m).sum() / (S * spec.max_new_tokens)


def packed_call(b, spec, hidden, weight, rows, norm, with_ref, backend="native", per_seq_adv=True):
    """policy_loss on the packed tokens of `rows` (a micro-batch)."""
    sub = b["mask"][rows]
    flat, local_seq = pack_positions(sub)
    h = hidden[rows].reshape(-1, H)[flat]
    take = lambda x: x[rows].reshape(-1)[flat]  # noqa: E731
    adv = b["adv"][rows] if per_seq_adv else b["adv"][rows][local_seq]
    return policy_loss(h, weight, take(b["targets"]), take(b["old"]), adv.float(),
                       torch.ones(flat.numel(), device=h.device), spec, norm, seq_ids=local_seq,
                       ref_logp=take(b["ref"]) if with_ref else None, backend=backend)


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("with_ref", [False, True], ids=["noref", "ref"])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_policy_loss_matches_hand_written(loss_agg, with_ref, backend):
    b = batch(seed=1)
    if backend == "triton" and torch.cuda.is_available():  # compiled Triton on the GPU, interpreter on CPU
        b = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    spec = LossSpec(temperature=0.8, eps_low=0.2, eps_high=0.28, beta=0.05 if with_ref else 0.0, loss_agg=loss_agg,
                    max_new_tokens=MAX_NEW)
    h1 = b["hidden"].clone().requires_grad_()
    w1 = b["weight"].clone().requires_grad_()
    expected = hand_loss(b, spec, h1, w1, with_ref)
    expected.backward()
    h2 = b["hidden"].clone().requires_grad_()
    w2 = b["weight"].clone().requires_grad_()
    norm = loss_normaliser(b["mask"], loss_agg, MAX_NEW)
    # Two micro-batches with the mini-batch normaliser: their losses and gradients add up to the whole.
    total = 0.0
    for rows in (torch.tensor([0, 1], device=h2.device), torch.tensor([2, 3, 4], device=h2.device)):
        loss, stats = packed_call(b, spec, h2, w2, rows, norm, with_ref, backend=backend, per_seq_adv=rows[0] == 0)
        loss.backward()
        total = total + loss.detach()
        assert set(stats) == {"loss", "clip_frac", "clip_frac_low", "clip_frac_high", "entropy", "num_tokens"} | (
            {"kl"} if with_ref else set())
        assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    tol = dict(rtol=2e-5, atol=1e-8)  # per-token terms are fp32 (the loss is an fp32 output)
    torch.testing.assert_close(total.double(), expected.detach(), **tol)
    torch.testing.assert_close(h2.grad, h1.grad, **tol)
    torch.testing.assert_close(w2.grad, w1.grad, **tol)


def test_normaliser_counts_per_mode():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    tok = loss_normaliser(mask, "token_mean", 10)
    assert isinstance(tok, LossNormaliser) and tok.world_size == 1
    assert tok.denominator.item() == 4 and tok.num_tokens.item() == 4 and tok.num_seqs.item() == 3
    assert loss_normaliser(mask, "seq_mean_token_mean", 10).denominator.item() == 3
    assert loss_normaliser(mask, "seq_mean_token_sum_norm", 10).denominator.item() == 30
    assert loss_normaliser(torch.zeros(2, 3), "token_mean", 10).denominator.item() == 1  # never 0
    with pytest.raises(ValueError, match="loss_agg 'sum'"):
        loss_normaliser(mask, "sum", 10)
    with pytest.raises(ValueError, match=r"\(S, L\) completion mask"):
        loss_normaliser(mask.reshape(-1), "token_mean", 10)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_spec_from_config(preset):
    alg = AlgorithmConfig(preset=preset)
    spec = LossSpec.from_config(alg, RolloutConfig(temperature=0.9, max_new_tokens=33))
    p = PRESETS[preset]
    assert (spec.eps_low, spec.eps_high, spec.beta, spec.loss_agg) == (p.eps_low, p.eps_high, p.beta, p.loss_agg)
    assert (spec.temperature, spec.max_new_tokens) == (0.9, 33)
    assert isinstance(spec, sk.LossSpec)  # the kernel's settings, passed to it as they are
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LossSpec(temperature=0.0, loss_agg=p.loss_agg, max_new_tokens=10)
    with pytest.raises(ValueError, match="loss_agg 'mean'"):
        LossSpec(loss_agg="mean", max_new_tokens=10)
    with pytest.raises(ValueError, match="LossSpec.max_new_tokens must be >= 1"):
        LossSpec(loss_agg=p.loss_agg, max_new_tokens=0)
    with pytest.raises(TypeError, match="positional arguments"):
        LossSpec(1.0, 0.2, 0.2, 0.0, p.loss_agg, 10)  # keyword only: no silent shift of the old field order


def test_seq_mean_needs_seq_ids():
    b = batch()
    spec = LossSpec(loss_agg="seq_mean_token_mean", max_new_tokens=MAX_NEW)
    with pytest.raises(ValueError, match="needs seq_ids"):
        policy_loss(b["hidden"][0], b["weight"], b["targets"][0], b["old"][0], b["adv"][[0] * L].float(),
                    torch.ones(L), spec, 1.0)


def test_token_logprobs_match_log_softmax():
    b = batch(seed=2)
    h, w = b["hidden"].reshape(-1, H), b["weight"]
    bias = torch.randn(V, dtype=torch.float64)
    lp = token_logprobs(h, w, b["targets"].reshape(-1), 0.7, bias)
    expected = torch.log_softmax((h @ w.T + bias) / 0.7, -1).gather(1, b["targets"].reshape(-1, 1)).squeeze(1)
    assert lp.dtype == torch.float32 and not lp.requires_grad
    torch.testing.assert_close(lp.double(), expected, rtol=1e-6, atol=1e-6)


def test_masked_tokens_in_the_packing_change_nothing():
    """Packing every position with mask 0 at padding equals packing only the real tokens."""
    b = batch(seed=3)
    spec = LossSpec(loss_agg="token_mean", max_new_tokens=MAX_NEW)
    norm = loss_normaliser(b["mask"], spec.loss_agg, MAX_NEW)
    real, _ = packed_call(b, spec, b["hidden"], b["weight"], torch.arange(S), norm, False)
    seq = torch.arange(S).repeat_interleave(L)
    adv_tok = b["adv"][seq].float()
    padded, _ = policy_loss(b["hidden"].reshape(-1, H), b["weight"], b["targets"].reshape(-1), b["old"].reshape(-1),
                            adv_tok, b["mask"].reshape(-1), spec, norm, seq_ids=seq)
    torch.testing.assert_close(padded, real)


# ------------------------------------------------------------------------- two ranks (gloo)


def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = batch(seed=4)
        spec = LossSpec(loss_agg="seq_mean_token_mean", max_new_tokens=MAX_NEW)
        rows = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([3, 4])  # uneven split
        h = b["hidden"].clone().requires_grad_()
        w = b["weight"].clone().requires_grad_()
        norm = loss_normaliser(b["mask"][rows], spec.loss_agg, MAX_NEW)
        loss, _ = packed_call(b, spec, h, w, rows, norm, False)
        loss.backward()
        res = {"loss": loss.detach(), "gh": h.grad, "gw": w.grad, "norm": norm}
        torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # both ranks done before either tears down (see parallel.destroy_distributed)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_ranks_average_to_the_global_loss(tmp_path):
    """Counts are all-reduced; the mean over ranks of loss and gradients (what FSDP/DDP apply) is the
    single-process loss of the whole mini-batch."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["norm"].world_size == 2 and r0["norm"].num_seqs.item() == S
    assert r0["norm"].denominator.item() == S / 2
    b = batch(seed=4)
    spec = LossSpec(loss_agg="seq_mean_token_mean", max_new_tokens=MAX_NEW)
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    expected = hand_loss(b, spec, h, w, False)
    expected.backward()
    tol = dict(rtol=2e-5, atol=1e-8)
    torch.testing.assert_close(((r0["loss"] + r1["loss"]) / 2).double(), expected.detach(), **tol)
    torch.testing.assert_close((r0["gw"] + r1["gw"]) / 2, w.grad, **tol)
    torch.testing.assert_close((r0["gh"] + r1["gh"]) / 2, h.grad, **tol)
