"""What the engine's Triton kernels occupy on a Hopper GPU, found on a machine without one.

    python bench/kernel_resources.py                  # every kernel at the engine's real sizes, for sm_90
    python bench/kernel_resources.py --only decode    # one group: decode | logprob | keyframe | advantage
    python bench/kernel_resources.py --sms 132        # H100 SXM / H200 (the default); 114 for an H100 PCIe

Each kernel is compiled ahead of time for the target (triton's own compiler and the ptxas it ships) through the
launch code the engine runs, with inputs of the engine's sizes: the launchers pick block sizes, warps and grids
as they would on the GPU, and the launch itself is skipped. `cuobjdump --dump-resource-usage` on the cubin gives
registers per thread and static shared memory, `ptxas -v` the bytes of spill stores, triton's metadata the dynamic
shared memory. From them, the CUDA occupancy rules of sm_90 (65,536 registers, 228 KiB of shared memory, 2,048 threads
and 32 blocks per SM; registers allocated per warp in units of 256; 1 KiB of shared memory reserved per block)
give the blocks that fit on one SM, what limits them, and the waves a grid takes: programs / (blocks per SM x
SMs). A grid of 1.1 waves runs its last 0.1 wave on a tenth of the GPU; spills are slow local memory.

These are static facts about the compiled code, not timings: they explain a measured time or predict where a
kernel leaves the GPU idle, and they need no device. Inputs are CPU tensors (only their dtypes, shapes, strides
and alignment enter the compile). The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py compiles for the GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit  # noqa: E402

# sm_90 (H100 / H200) per-SM limits, from the CUDA occupancy rules
REGS_PER_SM, REG_UNIT, MAX_REGS = 65_536, 256, 255
SMEM_PER_SM, SMEM_RESERVED = 233_472, 1_024
THREADS_PER_SM, BLOCKS_PER_SM = 2_048, 32


@dataclass
class Launch:
    group: str
    kernel: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    regs: int
    spill_bytes: int
    smem_bytes: int
    blocks_per_sm: int
    limit: str
    waves: float
    note: str = ""

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def blocks_per_sm(regs: int, num_warps: int, smem: int) -> tuple[int, str]:
    """Blocks of `num_warps` warps with `regs` registers per thread and `smem` bytes of shared memory that fit
    on one sm_90 SM, and which resource limits them."""
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by = {
        "registers": (REGS_PER_SM // per_warp) // num_warps,
        "shared memory": SMEM_PER_SM // (smem + SMEM_RESERVED),
        "threads": THREADS_PER_SM // (32 * num_warps),
        "blocks": BLOCKS_PER_SM,
    }
    limit = min(by, key=by.get)
    return by[limit], limit


def cubin_resources(cubin: bytes, workdir: Path) -> dict:
    """REG / LOCAL / STACK / SHARED of the (one) function in a cubin, from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                         check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}


def ptx_spills(ptx: str, workdir: Path) -> int:
    """Bytes of spill stores `ptxas -v` reports for the kernel's PTX (for its own .target). cuobjdump's STACK is the
    whole stack frame: spills, but also local arrays such as libdevice's sin/cos range reduction (32 B)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    path = workdir / "kernel.ptx"
    path.write_text(ptx)
    out = subprocess.run([str(tool), f"--gpu-name={target}", "-v", str(path), "-o", str(workdir / "k.o")],
                         capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", out.stdout + out.stderr))


class _Target:
    """Stands in for triton's CUDA driver: compile for `arch`, never launch."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(arch: int, record: list):
    """Inside: every `kernel[grid](...)` compiles for `arch` and appends (name, grid, compiled kernel, warps,
    stages) to `record` instead of launching."""
    run = triton_jit.JITFunction.run

    def run_compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        g = tuple(grid) + (1,) * (3 - len(grid))
        opts = kernel.metadata
        record.append((self.fn.__name__, g, kernel, opts.num_warps, opts.num_stages))
        return kernel

    active = driver._active  # None until triton first needs a driver (there is none on a machine without GPU)
    driver.set_active(_Target(arch))
    triton_jit.JITFunction.run = run_compile_only
    try:
        yield
    finally:
        triton_jit.JITFunction.run = run
        driver._active = active


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ------------------------------------------------------------------------ the engine's launches, real sizes

def decode_launches():
    """One decode step of the native engine at the Qwen2.5-VL-3B rollout shape (bench_rollout.py's default):
    16 requests x G = 8 rows, 16 / 2 heads of 128, prompts padded to 2,112 tokens, 256-token suffix cache,
    the sampler over (128, 151,936) logits."""
    import strive_kernels.decode_attention as da
    import strive_kernels.sampling as smp
    from strive_kernels import decode_layer as dl

    R, G, Hq, Hkv, D, Lp, T, H, I = 16, 8, 16, 2, 128, 2112, 256, 2048, 11008
    bf = torch.bfloat16
    q = torch.empty(R, G, Hq, D, dtype=bf)
    kp, vp = torch.empty(R, Hkv, Lp, D, dtype=bf), torch.empty(R, Hkv, Lp, D, dtype=bf)
    ks, vs = torch.empty(R, G, Hkv, T, D, dtype=bf), torch.empty(R, G, Hkv, T, D, dtype=bf)
    start = torch.zeros(R, dtype=torch.int32)
    n = torch.tensor([T // 2], dtype=torch.int32)
    M = R * G
    # the engine's call: q, k, v strided views of the stacked q/k/v projection, the rotary inside the kernels
    proj = torch.empty(M, (Hq + 2 * Hkv) * D, dtype=bf).split([Hq * D, Hkv * D, Hkv * D], 1)
    qp, kn, vn = proj[0].view(M, Hq, D), proj[1].view(M, Hkv, D), proj[2].view(M, Hkv, D)
    pos, t = torch.zeros(M, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    inv = torch.ones(D // 2)
    yield "rope_shared_prefix_attention", lambda: da.rope_shared_prefix_attention_triton(
        qp, kn, vn, pos[:R], t, inv, 1.0, kp, vp, start, ks, vs)
    norm = torch.empty(D, dtype=bf)  # Qwen3-VL: per-head q / k RMSNorm before the rotary
    yield "rope_... qk-norm", lambda: da.rope_shared_prefix_attention_triton(
        qp, kn, vn, pos[:R], t, inv, 1.0, kp, vp, start, ks, vs, q_norm=norm, k_norm=norm)
    yield "shared_prefix_attention", lambda: da.shared_prefix_attention_triton(q, kp, vp, start, ks, vs, n)
    x, w = torch.empty(M, H, dtype=bf), torch.empty(H, dtype=bf)
    qf, kf = torch.empty(M, Hq, D, dtype=bf), torch.empty(M, Hkv, D, dtype=bf)
    kc, vc = torch.empty(M, Hkv, T, D, dtype=bf), torch.empty(M, Hkv, T, D, dtype=bf)
    g = torch.empty(M, I, dtype=bf)
    with _patched(dl, "_use_triton", lambda backend, *ts: True):  # CPU tensors: the CUDA path's launches
        yield "add_rmsnorm", lambda: dl.add_rmsnorm(x, x, w, 1e-6)
        yield "rope_cache", lambda: dl.rope_cache(qf, kf, kf, pos, t, inv, 1.0, kc, vc)
        yield "silu_mul", lambda: dl.silu_mul(g, g)
    logits, seed = torch.empty(M, 151_936, dtype=bf), torch.zeros(1, dtype=torch.int64)
    yield "sample_tokens", lambda: smp.sample_tokens_triton(logits, 1.0, False, seed, t)
    yield "sample_tokens greedy", lambda: smp.sample_tokens_triton(logits, 1.0, True, None, None)


def logprob_launches():
    """The fused loss's pass over one chunk of logits at T=8,192, V=152,064 (bench_logprob.py's shape), at
    256- and 1,024-token chunks, with and without the gradient; and the no-grad log-probs."""
    from strive_kernels import logprob as lp
    from strive_kernels.reference.logprob import LossParams, LossSpec, prepare_tokens

    V, N = 152_064, 8192
    for rows in (256, 1024):
        lg = torch.empty(rows, V, dtype=torch.bfloat16)
        tgt = torch.zeros(N, dtype=torch.int64)
        z = torch.zeros(N)
        tok = prepare_tokens(torch.empty(N, 0), torch.empty(V, 0), tgt, z, z, torch.ones(N, dtype=torch.bool),
                             LossSpec(), ref_logp=None, seq_ids=torch.arange(N) // 256, normaliser=None)
        params = LossParams(LossSpec(), with_entropy=True)  # the engine logs the entropy
        outs = {k: torch.empty(N) for k in ("logp", "entropy", "loss", "clip", "k3")}
        p = lp.TritonPass(tok, params, V, rows, torch.device("cpu"))
        yield f"loss chunk {rows} rows", lambda p=p, lg=lg, outs=outs: p.loss_chunk(lg, 0, rows, outs, True)
        yield f"log-probs chunk {rows} rows", lambda p=p, lg=lg, outs=outs: p.logprob_chunk(lg, 0, rows, outs)
    gw = torch.empty(V, 3584, dtype=torch.bfloat16)
    yield "scale_ (grad_weight)", lambda: lp.scale_(gw, torch.ones(()))


def keyframe_launches():
    """keyframe_sample at the sizes of its issue (64 videos x 256 candidates x 1,152, K=4, F=16) and at the
    engine's small end (4 videos x 32 candidates)."""
    from strive_kernels.keyframe import keyframe_sample_forward

    for B, P in ((64, 256), (4, 32)):
        fe, qe = torch.empty(B * P, 1152, dtype=torch.bfloat16), torch.empty(B, 1152, dtype=torch.bfloat16)
        off = torch.arange(0, B * P + 1, P, dtype=torch.int64)
        yield f"keyframe_sample {B} x {P}", lambda fe=fe, qe=qe, off=off, B=B, P=P: keyframe_sample_forward(
            fe, qe, off, [P] * B, 4, 16, 1.0, 0.1, 0, True)


def advantage_launches():
    """group_advantages over a step's rewards: 4 x 4 x 8 = 128 (gpu_3b's batch) and 4,096 (a few thousand)."""
    from strive_kernels.advantage import group_advantages_forward

    for n in (128, 4096):
        r = torch.empty(n)
        gid = torch.arange(n, dtype=torch.int64) // 32
        vid = torch.arange(n, dtype=torch.int64) // 8
        yield f"group_advantages {n}", lambda r=r, gid=gid, vid=vid: group_advantages_forward(r, gid, vid, "joint",
                                                                                               1e-6)


GROUPS = {"decode": decode_launches, "logprob": logprob_launches, "keyframe": keyframe_launches,
          "advantage": advantage_launches}


def measure(groups: list[str], arch: int, sms: int, workdir: Path) -> list[Launch]:
    from strive_kernels import _backend

    out = []
    for group in groups:
        for note, call in GROUPS[group]():
            record: list = []
            with compile_only(arch, record), _patched(_backend, "sm_count", lambda device: sms):
                call()  # grids sized for the GPU's SM count
            for name, grid, kernel, warps, stages in record:
                res = cubin_resources(kernel.asm["cubin"], workdir)
                smem = kernel.metadata.shared + res.get("SHARED", 0)
                fit, limit = blocks_per_sm(res["REG"], warps, smem)
                waves = math.prod(grid) / max(fit * sms, 1)
                # ptxas's own count: cuobjdump's LOCAL stays 0 when registers spill (they land in STACK)
                spill = ptx_spills(kernel.asm["ptx"], workdir)
                out.append(Launch(group, name, grid, warps, stages, res["REG"], spill, smem, fit,
                                  limit, round(waves, 3), note))
    return out


def table(launches: list[Launch], sms: int) -> str:
    head = (f"{'call':<28} {'kernel':<22} {'grid':>15} {'warps':>5} {'regs':>4} {'spill':>5} {'smem KiB':>8} "
            f"{'blocks/SM':>9} {'limited by':<13} {'waves':>6}")
    rows = [head, "-" * len(head)]
    for x in launches:
        rows.append(f"{x.note:<28} {x.kernel:<22} {'x'.join(map(str, x.grid)):>15} {x.num_warps:>5} {x.regs:>4} "
                    f"{x.spill_bytes:>5} {x.smem_bytes / 1024:>8.1f} {x.blocks_per_sm:>9} {x.limit:<13} "
                    f"{x.waves:>6.2f}")
    rows.append(f"waves = programs / (blocks per SM x {sms} SMs); a fractional last wave runs on part of the GPU")
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(GROUPS), default=None)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the target (132: H100 SXM / H200)")
    ap.add_argument("--out", default="", help="also write the JSON record to this file")
    args = ap.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        launches = measure(args.only or list(GROUPS), args.arch, args.sms, Path(tmp))
    print(table(launches, args.sms))
    rec = {"bench": "kernel_resources", "date": datetime.date.today().isoformat(), "arch": f"sm_{args.arch}",
           "sms": args.sms, "triton": triton.__version__, "torch": torch.__version__,
           "launches": [asdict(x) | {"programs": x.programs} for x in launches]}
    return emit(rec, args.out)


if __name__ == "__main__":
    main()
