"""FSDP2's part of the update, alone: every weight gathered once per optimizer step (parallel.accumulation,
`accumulate_unsharded`) against FSDP2's default (a gather in each micro-batch's forward and backward, a reduce per
micro-batch), at the gpu_3b recipe's parameter count and micro-batch count.

    python bench/bench_accumulation.py                  # GPU: 36 blocks of 2,048 + 32 of 1,280 + 151,936 x 2,048
    python bench/bench_accumulation.py --width 64 --vision-width 32 --vocab 1000     # CPU: same structure, small

The model has Qwen2.5-VL-3B's parameter shapes (per decoder block q, k, v, o, gate, up, down; per vision block
qkv, proj, fc1, fc2; the tied embedding; 3.75 B parameters at the defaults) in FSDP2 groups laid out as the engine
shards them (`apply_fsdp`: one per block, the root), with the engine's mixed precision (bf16 gathers, fp32
reduces on CUDA; fp32 on the CPU). Each micro-batch runs `--tokens` tokens through every weight, so the matmuls
cost next to nothing and what is timed is FSDP2's own traffic. One process (a world of one). Reported per
mode: ms per optimizer step's micro-batches (forward + backward, the gather included), the difference, and the
bytes FSDP2 copies per step (counted); last line JSON. The update's share: this difference over the update's
seconds in `bench/throughput.py --recipe gpu_3b`.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _timing import emit, timeit  # noqa: E402
from strive_engine.parallel import (accumulation, apply_fsdp, destroy_distributed,  # noqa: E402
                                    init_distributed)


class _Block(nn.Module):
    """A block's parameters (Linear weights of the given (out, in) shapes); forward adds every one's output,
    cut or padded to the width, to the stream (so each weight gets a gradient)."""

    def __init__(self, width: int, shapes: list[tuple[int, int]]):
        super().__init__()
        self.width = width
        self.lins = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for lin in self.lins:
            y = lin(x[..., :lin.in_features] if lin.in_features <= self.width else
                    torch.nn.functional.pad(x, (0, lin.in_features - self.width)))
            out = out + (y[..., :self.width] if y.shape[-1] >= self.width else
                         torch.nn.functional.pad(y, (0, self.width - y.shape[-1])))
        return out


class _Stack(nn.Module):
    def __init__(self, blocks: list[_Block]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.blocks = self.layers


class _Model(nn.Module):
    """`model.language_model.layers`, `model.visual.blocks`, `embed`: the layout `apply_fsdp` shards."""

    def __init__(self, a: argparse.Namespace):
        super().__init__()
        H, I, Hv = a.width, a.mlp, a.vision_width
        kv = a.width // a.heads * a.kv_heads
        dec = [(H, H), (kv, H), (kv, H), (H, H), (I, H), (I, H), (H, I)]          # q k v o gate up down
        vis = [(3 * Hv, Hv), (Hv, Hv), (4 * Hv, Hv), (Hv, 4 * Hv)]                # qkv proj fc1 fc2
        self.model = nn.Module()
        self.model.language_model = _Stack([_Block(H, dec) for _ in range(a.layers)])
        self.model.visual = _Stack([_Block(Hv, vis) for _ in range(a.vision_blocks)])
        self.embed = nn.Embedding(a.vocab, H)

    def forward(self, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        v = patches
        for b in self.model.visual.blocks:
            v = b(v)
        x = self.embed(ids)
        for b in self.model.language_model.layers:
            x = b(x)
        return (x.float() @ self.embed.weight.float().t()).logsumexp(-1).sum() + v.float().sum()


class _CopiedBytes(TorchDispatchMode):
    """Bytes written by copy_, _to_copy and add_ (FSDP2's world-of-one gather and reduce copies, the gradient
    accumulation; foreach and fused copies are not seen, so a lower bound on the GPU)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in ("copy_", "_to_copy", "add_") and isinstance(out, torch.Tensor):
            self.bytes += out.numel() * out.element_size()
        return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--vision-blocks", type=int, default=32)
    p.add_argument("--vision-width", type=int, default=1280)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--micro", type=int, default=16, help="micro-batches per optimizer step (gpu_3b: 16)")
    p.add_argument("--tokens", type=int, default=8, help="tokens per micro-batch (few: FSDP2's traffic is timed)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)

    env = init_distributed("auto")
    try:
        cuda = env.device.type == "cuda"
        torch.manual_seed(0)
        with torch.device(env.device):
            model = _Model(a)
        n_params = sum(q.numel() for q in model.parameters())
        policy = nn.Module()
        policy.hf = model                       # the root's group: the embedding (as the engine's Root holds it)
        root = apply_fsdp(policy, model, mixed_precision="bf16" if cuda else "off", reshard_after_forward=True,
                          device=env.device)
        ids = torch.randint(0, a.vocab, (a.tokens,), device=env.device)
        patches = torch.randn(a.tokens, a.vision_width, device=env.device)
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def window(gather_once: bool) -> None:
            with accumulation(root, gather_once) as micro:
                for i in range(a.micro):
                    micro(i == a.micro - 1)
                    root(model, ids, patches).backward()
            for q in model.parameters():       # the optimizer would free them here (zero_grad(set_to_none))
                q.grad = None

        rec = {"bench": "accumulation", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "params": n_params, "micro": a.micro,
            "tokens": a.tokens, "precision": "bf16" if cuda else "fp32"}
        for name, once in (("gathered_once", True), ("per_micro_batch", False)):
            with _CopiedBytes() as c:
                window(once)
            rec[f"{name}_copied_gb"] = c.bytes / 1e9
            rec[f"{name}_ms"] = timeit(lambda o=once: window(o), a.reps, warmup=1, sync=sync)["median_ms"]
            if cuda:
                rec[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        rec["saved_ms"] = rec["per_micro_batch_ms"] - rec["gathered_once_ms"]
        print(f"{n_params / 1e9:.2f} B parameters, {a.micro} micro-batches of {a.tokens} tokens on {rec['device']}")
        for name in ("per_micro_batch", "gathered_once"):
            print(f"{name:16s} {rec[name + '_ms']:9.1f} ms per optimizer step   copies {rec[name + '_copied_gb']:7.1f} GB"
                  + (f"   peak {rec[name + '_peak_gib']:.1f} GiB" if cuda else ""))
        print(f"saved {rec['saved_ms']:.1f} ms per optimizer step")
        return emit(rec, a.out)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
