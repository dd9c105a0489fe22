"""Visual tokens once per step: the rollout's prefill computes each variant's merged visual tokens, and the
step's other forwards reuse them where that is exact (fp32 on the CPU, against recomputing them)."""
import contextlib

import pytest
import torch

from strive_engine.config import ModelConfig, RolloutConfig
from strive_engine.model import build_model
from strive_engine.policy import Policy
from strive_engine.rollout import generate_rollouts
from test_decode import _requests, sharpened


def _tiny(tmp_path, freeze=False):
    torch.manual_seed(5)
    cfg = ModelConfig(tokenizer_dir=str(tmp_path / "tok"), tiny_hidden_size=64, tiny_layers=2, tiny_heads=4,
                      tiny_vision_depth=2, tiny_vision_hidden_size=32, freeze_vision=freeze)
    model, tok = build_model(cfg, "cpu")
    return Policy(model), tok


def _count_tower(pol, monkeypatch):
    calls = []
    real = pol.video_features
    monkeypatch.setattr(pol, "video_features", lambda *a: calls.append(1) or real(*a))
    return calls


def test_old_logprobs_reuse_the_prefill_tokens(tmp_path, monkeypatch):
    """Native rollouts carry the prefill's visual tokens; scoring them (whole batch and micro-batches) runs no
    vision tower and equals recomputing; HF rollouts carry none."""
    pol, tok = _tiny(tmp_path)
    reqs = _requests("qwen2_5_vl")
    with torch.no_grad(), sharpened(pol):
        rb = generate_rollouts(pol, tok, reqs, RolloutConfig(num_generations=2, max_new_tokens=8, prompt="short"), 0)
        assert rb.inputs.visual is not None and rb.inputs.visual.merged.shape[0] == sum(
            int(r.grid().prod()) // 4 for r in reqs)
        calls = _count_tower(pol, monkeypatch)

        def score(inputs):
            tgt = inputs.targets()
            return pol(inputs, lambda h, w, b: torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None])[:, 0])

        reused = score(rb.inputs)
        assert calls == []
        micro = torch.cat([score(rb.inputs.select(torch.arange(lo, lo + 2))) for lo in (0, 2, 4)])
        assert calls == []
        fresh = score(rb.inputs.without_visual())
        assert calls == [1]
        torch.testing.assert_close(reused, fresh, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(micro, fresh, rtol=1e-6, atol=1e-6)
        hf = generate_rollouts(pol, tok, reqs, RolloutConfig(num_generations=2, max_new_tokens=4, prompt="short",
                                                             backend="hf"), 0)
        assert hf.inputs.visual is None


def test_update_with_frozen_vision_reuses_tokens_exactly(tmp_path, monkeypatch):
    """model.freeze_vision: the vision tower has no trainable parameter, and the update's loss and gradients
    with the reused tokens equal those with the tower run again."""
    pol, tok = _tiny(tmp_path, freeze=True)
    assert not any(p.requires_grad for p in pol.hf.model.visual.parameters())
    assert all(p.requires_grad for p in pol.hf.model.language_model.parameters())
    with torch.no_grad(), sharpened(pol):
        rb = generate_rollouts(pol, tok, _requests("qwen2_5_vl"), RolloutConfig(num_generations=2, max_new_tokens=8,
                                                                                  prompt="short"), 0)
    results = []
    for inputs in (rb.inputs.select(torch.arange(1, 5)), rb.inputs.select(torch.arange(1, 5)).without_visual()):
        pol.zero_grad(set_to_none=True)
        tgt = inputs.targets()
        adv = torch.linspace(-1, 1, tgt.numel())
        loss = pol(inputs, lambda h, w, b: -(torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None])[:, 0] * adv).mean())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in pol.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys() and not any(".visual." in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("kl", [False, True], ids=["on_policy", "kl_old_logp"])
@pytest.mark.parametrize("freeze", [False, True])
def test_rl_step_runs_the_tower_only_where_needed(tmp_path, monkeypatch, freeze, kl):
    """One RL step in-process (FSDP2, world of one): the tower runs once for the rollout and, unless frozen,
    once per update micro-batch (gradients must reach it); never for the old log-probs. With the KL term and a
    separate old-log-prob forward (beta > 0, old_logp_forward), the old log-probs reuse the rollout's merged
    visual tokens, and so does the reference when the tower is frozen (then it is the policy's); an unfrozen
    tower differs from the reference's, which then runs once per reference micro-batch."""
    from test_train import SMALL

    from strive_engine.config import load_config
    from strive_engine.metrics import StageTimer
    from strive_engine.parallel import destroy_distributed, init_distributed
    from strive_engine.step import rl_step
    from strive_engine.trainer import build_trainer

    extra = ["--algorithm.beta=0.05", "--algorithm.old_logp_forward=true"] if kl else []
    cfg = load_config([*SMALL, f"--data.synthetic_dir={tmp_path / 'syn'}", f"--run.output_dir={tmp_path / 'run'}",
                       f"--model.freeze_vision={str(freeze).lower()}", "--parallel.micro_batch_size=2", *extra])
    env = init_distributed("gloo")
    try:
        t = build_trainer(cfg, env)
        assert (t.reference is not None) == kl

        class Tracking(StageTimer):
            current = None

            @contextlib.contextmanager
            def __call__(self, stage):
                prev, self.current = self.current, stage
                with StageTimer.__call__(self, stage):
                    yield
                self.current = prev

        t.timer = Tracking()
        stages = []                                                          # (whose tower, stage) per call
        for who, pol in [("policy", t.policy)] + ([("reference", t.reference.policy)] if kl else []):
            real = pol.video_features
            monkeypatch.setattr(pol, "video_features",
                                lambda *a, who=who, real=real: stages.append((who, t.timer.current)) or real(*a))
        m = rl_step(t, 0)
        assert m["data/valid_samples"] > 0
        assert 0 <= m["rollout/logp_mismatch_max"] < 1e-4                    # rollout = trainer (fp32, same weights)
        assert ("time/old_logp" in m) == kl and ("time/ref_logp" in m) == kl  # the stages checked below ran
        rows = cfg.data.batch_size * cfg.variants.num_variants * cfg.rollout.num_generations
        micro = rows // 2                                                    # micro-batches of 2 rows
        ref = [] if freeze or not kl else [("reference", "ref_logp")] * micro
        update = [] if freeze else [("policy", "update")] * micro
        assert stages == [("policy", "rollout")] + ref + update, stages      # never in "old_logp"
        trained = {n for n, p in t.root.named_parameters() if p.requires_grad}
        assert any(".language_model." in n for n in trained)
        assert any(".visual." in n for n in trained) != freeze               # a frozen tower has no Adam state
    finally:
        destroy_distributed()
