"""A tiny policy sharded by FSDP2 on the CPU, and the gloo process group the multi-process tests run it in."""
import os
from pathlib import Path
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
                      tiny_vision_depth=vision_depth, tiny_vision_hidden_size=32,
                      dtype="float32" if precision == "bf16" else "auto")  # fp32 masters, as the trainer builds them
    model, tok = build_model(cfg, device)
    policy = Policy(model)
    if recompute is not None:
        policy.recompute = recompute(model)
    root = apply_fsdp(policy, model, mixed_precision=precision, reshard_after_forward=True,
                      device=torch.device(device))
    return model, tok, policy, root


def run_ranks(fn: Callable[[int, str], Any], out_dir: Any, world: int = 2) -> list[Any]:
    """fn(rank, out_dir) in `world` processes of one gloo group (one thread each); returns each rank's result (saved
    by the rank, loaded here with weights_only), in rank order. `fn` must be a module-level function."""
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(fn, world, str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"{r}.pt", weights_only=True) for r in range(world)]


def _rank(rank: int, fn: Callable[[int, str], Any], world: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'init')}", rank=rank,
                            world_size=world)
    try:
        torch.save(fn(rank, out_dir), os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
