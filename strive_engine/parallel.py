"""torch.distributed set-up and FSDP2 sharding of the policy.

Sharding follows torchtitan's `apply_fsdp`: `fully_shard` per decoder block and per vision block, then the
root (which holds the embeddings, patch embedding, vision merger, final norm and lm_head). The root is a tiny `Root` module whose forward runs
an arbitrary callable: FSDP2 unshards the root group's parameters (embeddings, lm_head, final norms) only inside
the root's forward, so *everything* that touches the policy — the update's forward and loss head, keyframe
scoring, generation — runs as one `root(fn)` call and sees consistent parameters.

Generation unshards every group once (`unsharded(root)`) and switches off reshard-after-forward for its
duration: no per-token all-gathers, and no collective at all inside `generate`, so ranks that stop at different
lengths cannot deadlock.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # gloo | nccl

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ALLOCATOR_SETTINGS = "expandable_segments:True"


def configure_cuda_allocator() -> str | None:
    """Expandable segments for PyTorch's CUDA caching allocator, unless the user configured it
    (PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF set, even empty). Every step frees the rollout's K/V caches and
    allocates the update's activations, both sized by that step's prompts and answers; with fixed-size segments
    the freed blocks fragment, and the reserved memory grows past the allocated peak until an allocation fails
    with memory free (torchtitan and verl run with this setting for that reason). Returns what it set, or None.
    Set in the process's allocator config (read when CUDA initialises; once initialised, it applies to segments
    created from then on) and in the environment (for child processes)."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTINGS
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)   # torch >= 2.9; before: torch.cuda's
    (setter or torch.cuda.memory._set_allocator_settings)(ALLOCATOR_SETTINGS)
    log.info("CUDA allocator: %s (set PYTORCH_CUDA_ALLOC_CONF to choose otherwise)", ALLOCATOR_SETTINGS)
    return ALLOCATOR_SETTINGS


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Initialise the process group from torchrun's environment, or a world of one without torchrun.

    gloo on CPU, NCCL on CUDA (`backend="auto"`). Each rank uses cuda:LOCAL_RANK when CUDA is available.
    A single process still gets a (size-1) process group so FSDP2 and checkpointing take the same code path.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        configure_cuda_allocator()
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        kw: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        if "MASTER_ADDR" not in os.environ:  # plain `python -m ...`: a world of one
            kw.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def destroy_distributed(sync: bool = True) -> None:
    """Tear the process group down at a normal exit. `sync`: a barrier first, so that no rank closes its
    connections while a peer still has collective work in flight (gloo then aborts the peer with
    "terminate called without an active exception" — seen when rank 0 was still writing a file). Pass
    sync=False on an error path, where a barrier could wait for a rank that will never arrive."""
    if dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when distributed (no-op otherwise); returns the tensor. CPU tensors are reduced
    through the current CUDA device under NCCL (which only reduces CUDA tensors)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if dist.get_backend() == "nccl" and value.device.type == "cpu":
            tmp = value.cuda()
            dist.all_reduce(tmp, op=ops[op])
            value.copy_(tmp)
        else:
            dist.all_reduce(value, op=ops[op])
    return value


def all_agree(flag: bool) -> bool:
    """True when `flag` is true on every rank: one choice for all ranks where each decides from numbers of its own
    (uneven shards' sizes), for what changes the collectives every rank must run alike."""
    return bool(all_reduce(torch.tensor([float(flag)]), "min").item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Root(nn.Module):
    """FSDP root: `root(fn, *args)` runs `fn(*args)` inside the root's forward (see module docstring)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        # (module, reshard_after_forward) as apply_fsdp set them, so `unsharded` can restore them (plain list:
        # not registered as submodules).
        self.reshard_plan: list[tuple[nn.Module, bool]] = []

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def _decoder_layers(hf_model: nn.Module) -> list[nn.Module]:
    inner = getattr(hf_model, "model", hf_model)
    lm = getattr(inner, "language_model", None)
    layers = getattr(lm, "layers", None) if lm is not None else getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"cannot find decoder layers on {type(hf_model).__name__} (expected model.language_model.layers)")
    return list(layers)


def _vision_blocks(hf_model: nn.Module) -> list[nn.Module]:
    inner = getattr(hf_model, "model", hf_model)
    visual = getattr(inner, "visual", None)
    return list(getattr(visual, "blocks", [])) if visual is not None else []


def apply_fsdp(policy: nn.Module, hf_model: nn.Module, *, mixed_precision: str, reshard_after_forward: bool,
               device: torch.device) -> Root:
    """Shard per decoder block and per vision block, then the root; returns the Root wrapper.

    mixed_precision: "bf16" (params all-gathered in bf16, grads reduced in fp32) or "off".
    Works on one process too (a world of 1 still gets FSDP's hooks, so the code path is the same).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = mixed_precision == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, mp_policy=mp)
    root = Root(policy)
    blocks = _vision_blocks(hf_model)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
        root.reshard_plan.append((block, reshard_after_forward))
    layers = _decoder_layers(hf_model)
    for i, layer in enumerate(layers):
        # The last block is needed again first in backward: keep it unsharded after forward (torchtitan).
        r = reshard_after_forward and i < len(layers) - 1
        fully_shard(layer, reshard_after_forward=r, **kw)
        root.reshard_plan.append((layer, r))
    if bf16:
        for block in blocks + layers:
            block.register_forward_pre_hook(_cast_float_inputs, with_kwargs=True)
    # The root's inputs are the callable and its arguments (`root(fn, *args)`): FSDP2 would cast every float tensor
    # in them to bf16, dataclasses copied (a rollout's float64 frame timestamps became bf16 before its mRoPE
    # positions were computed). The blocks cast their own inputs; the root's modules cast theirs (patch_embed) or
    # take ids.
    root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False) if bf16 else mp
    fully_shard(root, reshard_after_forward=False, mesh=mesh, mp_policy=root_mp)
    log.info("FSDP2: %d vision blocks + %d decoder blocks + root sharded over %d ranks (mixed precision: %s)",
             len(blocks), len(layers), dist.get_world_size(), mixed_precision)
    return root


def _cast_float_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's floating-point inputs in bf16, as FSDP2's mixed precision casts them in forward, also when an
    activation-checkpointed block is recomputed in backward: torch < 2.13's FSDP2 skips its cast there, so the vision
    blocks' fp32 rotary tables met a recompute in fp32 that the forward had seen in bf16, and their gradients came
    from activations the forward never produced (torch 2.11: 20 of 56 gradients of a tiny model off by up to 2e-3).
    A no-op where FSDP2 has cast already."""
    def cast(t: Any) -> Any:
        return t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return tree_map(cast, args), tree_map(cast, kwargs)


@contextlib.contextmanager
def unsharded(root: nn.Module) -> Iterator[None]:
    """Keep every FSDP group unsharded for the block (one all-gather per group, then none).

    Use inside `root(fn)` (the root's own params are gathered by its forward) for generation and scoring.
    Restores reshard-after-forward and frees the unsharded params on exit.
    """
    plan = getattr(root, "reshard_plan", [])
    if not plan:
        yield
        return
    for m, _ in plan:
        m.set_reshard_after_forward(False, recurse=False)
    handles = [m.unshard(async_op=True) for m, _ in plan]
    for h in handles:
        if h is not None:
            h.wait()
    try:
        yield
    finally:
        for m, r in plan:
            m.set_reshard_after_forward(r, recurse=False)
            m.reshard()


GATHER_ONCE_FRACTION = 0.1   # accumulate_unsharded=auto: of the memory budget that holding everything whole may take


def unsharded_extra_bytes(params: list[torch.Tensor], world_size: int, compute_bytes: int) -> float:
    """Memory that `accumulation(gather_once=True)` holds beyond FSDP2's default, per rank: every weight whole in
    the compute dtype and every gradient whole in fp32, less the fp32 shard gradients the default keeps."""
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    return float(local) * (world_size * (compute_bytes + 4) - 4)


def gathers_once(setting: str, world_size: int, extra_bytes: float = 0.0, budget_bytes: float | None = None) -> bool:
    """parallel.accumulate_unsharded. auto: on a world of one, where sharding saves nothing and every gather and
    reduce-scatter is a full-model copy on the compute stream; elsewhere where holding everything whole
    (`extra_bytes`, unsharded_extra_bytes) takes at most a tenth of the memory budget (None: no limit, as on the
    CPU): a small model across ranks, not a 3B one on eight GPUs."""
    if setting != "auto":
        return setting == "true"
    return world_size == 1 or budget_bytes is None or extra_bytes <= GATHER_ONCE_FRACTION * budget_bytes


@contextlib.contextmanager
def accumulation(root: nn.Module, gather_once: bool) -> Iterator[Callable[[bool], None]]:
    """One optimizer step's micro-batches; yields `micro(last)`, to call before each of them.

    gather_once: every FSDP group is gathered once, before the first micro-batch, and stays gathered through
    every forward and backward; gradients accumulate unsharded (in the reduce dtype) and are reduced once, in the
    last micro-batch's backward, which also reshards. Otherwise (FSDP2's default, `micro` does nothing) each
    micro-batch gathers every group in forward and again in backward and reduce-scatters its gradients. At a world
    of one those are a cast-and-copy of every weight (~10 bytes per parameter) twice and three passes over the
    gradients (~26 bytes per parameter) per micro-batch, where this costs one cast per optimizer step and one
    fp32 accumulate (~10 bytes per parameter) per micro-batch; at world N it also saves the collectives, and holds
    the bf16 weights and fp32 gradients unsharded (6 bytes per parameter) instead of 1/N of them.
    Resharded on exit, also on error: the optimizer steps the shards, and a group left gathered would give the
    next forward stale weights (unshard is a no-op on a gathered group)."""
    if not gather_once or not getattr(root, "reshard_plan", None):
        yield lambda last: None
        return

    def micro(last: bool) -> None:
        root.set_requires_gradient_sync(last)
        root.set_reshard_after_backward(last)

    try:
        with unsharded(root):
            yield micro
    finally:
        root.set_requires_gradient_sync(True)
        root.set_reshard_after_backward(True)
        reshard_all(root)


def reshard_all(root: nn.Module) -> None:
    """Free every FSDP group's unsharded parameters, the root's included: after a forward with no backward (its
    modules then still hold their unsharded params, and an optimizer built now would hold those, not the shards)."""
    for m, _ in getattr(root, "reshard_plan", []):
        m.reshard()
    if hasattr(root, "reshard"):
        root.reshard()


def gather_full_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0 (empty dict elsewhere), keys relative to the HF model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = "policy.hf."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
