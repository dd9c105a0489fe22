"""A tiny policy sharded by FSDP2 on the CPU, for the gloo workers of the multi-process tests."""
import os
from typing import Any, Callable

import torch

from strive_engine.config import ModelConfig
from strive_engine.model import build_model
from strive_engine.parallel import apply_fsdp
from strive_engine.policy import Policy


def tiny_sharded_policy(out_dir: str, *, vision_depth: int = 2, precision: str = "off", device: str = "cpu",
                        recompute: Callable[[Any], Any] | None = None) -> tuple[Any, Any, Policy, Any]:
    """(model, tokenizer, Policy, FSDP2 root) of a tiny Qwen2.5-VL drawn from seed 0 (every rank the same weights),
    fp32 weights (gathered in bf16 and gradients reduced in fp32 with precision="bf16"), blocks resharded after
    forward; `recompute(model)` builds the policy's Recompute before sharding, as the trainer does. The tokenizer
    folder is out_dir/tok (shared by the ranks)."""
    torch.manual_seed(0)
    cfg = ModelConfig(tokenizer_dir=os.path.join(out_dir, "tok"), tiny_hidden_size=64, tiny_layers=2, tiny_heads=4,
                      tiny_vision_depth=vision_depth, tiny_vision_hidden_size=32)
    model, tok = build_model(cfg, device)
    policy = Policy(model)
    if recompute is not None:
        policy.recompute = recompute(model)
    root = apply_fsdp(policy, model, mixed_precision=precision, reshard_after_forward=True,
                      device=torch.device(device))
    return model, tok, policy, root
