"""Log-prob + GRPO loss over the lm_head, forward + backward: strive_kernels vs the peers, one run.

    python bench/bench_logprob.py            # CUDA: T=8192, H=3584, V=152064 bf16 (Qwen2.5-VL-7B head)
    python bench/bench_logprob.py --quick    # fewer repetitions and operating points (GPU check)
    python bench/bench_logprob.py --shape 1024,256,16384   # any T,H,V (CPU default: 1024,256,16384 fp32)
    python bench/bench_logprob.py --engine   # issue 14: fast path vs torch twin at gpu_small's and the 7B head's
                                             # shapes, micro-batches of varying size, memory trace (~1 min, H200)

Cases (each only where its package is installed; a failing case is recorded, not fatal): plain PyTorch
(logits -> fp32 log_softmax -> gather), TRL-style row-wise selective_log_softmax, liger
LigerFusedLinearGRPOLoss and triton_grpo_loss, cut-cross-entropy (default filter and exact), this
kernel at several logits-buffer sizes (the speed / memory operating points) and its native-torch path;
then the no-grad log-prob path; then (CUDA) the three per-chunk matmuls alone, to show what bounds it.
Reported per case: ms median with p20/p80, extra peak memory (max_memory_allocated - allocated before,
gradients included, as in ../shared/anchors), achieved TFLOP/s (6*T*H*V fwd+bwd, 2*T*H*V no-grad) and
its fraction of the bf16 matmul rate measured in the same run, and the ratio to every baseline.
The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

import strive_kernels as sk

GiB = 2**30


# ------------------------------------------------------------------------------------------ timing


def timed(fn, warmup: int, reps: int, dev: str) -> dict:
    """Run fn warmup + reps times; ms median/p20/p80 and extra peak GiB (CUDA) over all runs."""
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * (len(ts) - 1) + 0.5))]  # noqa: E731
    out = {"ms": round(q(0.5), 3), "p20": round(q(0.2), 3), "p80": round(q(0.8), 3)}
    if dev == "cuda":
        out["peak_extra_GiB"] = round((torch.cuda.max_memory_allocated() - base) / GiB, 3)
    return out


def guarded(res: dict, name: str, fn):
    t0 = time.time()
    try:
        res[name] = fn()
    except Exception as ex:  # noqa: BLE001 -- one failing peer must not lose the others
        res[name] = {"error": repr(ex)[:300]}
        traceback.print_exc(limit=3)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"[{time.time() - t0:6.1f}s] {name}: {res[name]}", flush=True)


# ------------------------------------------------------------------------------------------ inputs


class Inputs:
    """B sequences of L tokens (T = B*L), per-sequence advantages, old log-probs near the model's own."""

    def __init__(self, t, h, v, dtype, dev, seqs=8):
        g = torch.Generator(device=dev).manual_seed(0)
        self.B, self.L = seqs, t // seqs
        self.T, self.H, self.V = self.B * self.L, h, v
        self.h = (torch.randn(self.T, h, device=dev, dtype=dtype, generator=g) * 0.5).requires_grad_()
        self.w = (torch.randn(v, h, device=dev, dtype=dtype, generator=g) * 0.02).requires_grad_()
        self.ids = torch.randint(0, v, (self.T,), device=dev, generator=g)
        self.mask = torch.ones(self.T, device=dev)
        self.adv = torch.randn(self.B, device=dev, generator=g)
        self.old = torch.randn(self.T, device=dev, generator=g) * 0.1 - 12.0
        self.seq = torch.arange(self.B, device=dev).repeat_interleave(self.L)

    def zero(self):
        self.h.grad = None
        self.w.grad = None


def grpo_from_logp(x: Inputs, logp, eps=0.2):
    """seq_mean_token_mean GRPO loss from (T,) log-probs, plain torch."""
    ratio = torch.exp(logp - x.old)
    a = x.adv[x.seq]
    pl = -torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    m = x.mask.view(x.B, x.L)
    return ((pl.view(x.B, x.L) * m).sum(-1) / m.sum(-1)).mean()


# ------------------------------------------------------------------------------------------ cases


def step_plain(x):
    logits = x.h @ x.w.t()
    logp = torch.log_softmax(logits.float(), -1).gather(-1, x.ids[:, None]).squeeze(-1)
    grpo_from_logp(x, logp).backward()


def step_trl(x):
    logits = (x.h @ x.w.t()).view(x.B, x.L, x.V)
    rows = [torch.log_softmax(lg, -1).gather(-1, ix[:, None]).squeeze(-1)
            for lg, ix in zip(logits, x.ids.view(x.B, x.L))]  # TRL selective_log_softmax for bf16: row by row
    grpo_from_logp(x, torch.stack(rows).float().view(-1)).backward()


def step_ours(x, **kw):
    out = sk.fused_logprob_loss(x.h, x.w, x.ids, x.old, x.adv, x.mask, sk.LossSpec(loss_agg="seq_mean_token_mean"),
                                seq_ids=x.seq, normaliser=float(x.B), **kw)
    out.loss.backward()


def make_liger_chunked(x):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    lf = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", compiled=False, chunk_size=8)
    hb = x.h.detach().view(x.B, x.L, x.H).requires_grad_()

    def step():
        out = lf(hb, x.w, x.ids.view(x.B, x.L), x.mask.view(x.B, x.L), x.adv, old_per_token_logps=x.old.view(x.B, x.L))
        (out[0] if isinstance(out, tuple) else out).backward()
        hb.grad = None
    return step


def make_liger_triton(x):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def step():
        logits = (x.h @ x.w.t()).view(x.B, x.L, x.V)
        logits = torch.cat([logits, logits[:, -1:]], 1)  # liger expects L + 1 positions
        out = triton_grpo_loss(logits, x.old.view(x.B, x.L), None, x.ids.view(x.B, x.L), x.adv, x.mask.view(x.B, x.L),
                               temperature=1.0, beta=0.0, eps_low=0.2, eps_high=0.2, inplace=True, loss_type="grpo",
                               reduce=True)
        (out[0] if isinstance(out, tuple) else out).backward()
    return step


def make_cce(x, filter_eps):
    from cut_cross_entropy import linear_cross_entropy

    def step():
        nll = linear_cross_entropy(x.h, x.w, x.ids, reduction="none", filter_eps=filter_eps)
        grpo_from_logp(x, -nll.float()).backward()
    return step


def fwd_bwd_case(x, step, warmup, reps, dev, flops, mm_rate):
    def run():
        step()
        x.zero()
    r = timed(run, warmup, reps, dev)
    r["TFLOPs"] = float(f"{flops / r['ms'] / 1e9:.4g}")
    if mm_rate:
        r["frac_of_matmul_rate"] = round(r["TFLOPs"] / mm_rate, 3)
    return r


def accuracy_check(x, dev):
    """Our loss and gradients vs plain PyTorch's (both bf16 on CUDA): relative differences."""
    step_plain(x)
    ref = (x.h.grad.float(), x.w.grad.float())
    x.zero()
    with torch.no_grad():
        lp = torch.log_softmax((x.h @ x.w.t()).float(), -1).gather(-1, x.ids[:, None]).squeeze(-1)
        ref_loss = grpo_from_logp(x, lp)
    out = sk.fused_logprob_loss(x.h, x.w, x.ids, x.old, x.adv, x.mask, seq_ids=x.seq, normaliser=float(x.B))
    out.loss.backward()
    rel = lambda a, b: float((a.float() - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    res = {"loss_rel": rel(out.loss, ref_loss), "logp_max_abs": float((out.logp - lp).abs().max()),
           "grad_hidden_rel": rel(x.h.grad, ref[0]), "grad_weight_rel": rel(x.w.grad, ref[1])}
    x.zero()
    return res


def chunk_matmuls(x, c, warmup, reps, dev):
    """The three matmuls of one C-token chunk, alone: ms and TFLOP/s each (what bounds the fused op)."""
    h, w = x.h.detach(), x.w.detach()
    hc = h[:c]
    lg = torch.randn(c, x.V, device=dev, dtype=h.dtype) * 1e-4  # stands in for a chunk's dlogits
    gh = torch.empty(c, x.H, device=dev, dtype=h.dtype)
    gw = torch.empty_like(w)
    fl = 2 * c * x.H * x.V
    res = {}
    for name, fn in (("logits_mm", lambda: torch.mm(hc, w.t(), out=lg)),
                     ("grad_hidden_mm", lambda: torch.mm(lg, w, out=gh)),
                     ("grad_weight_addmm", lambda: gw.addmm_(lg.t(), hc))):
        r = timed(fn, warmup, reps, dev)
        res[name] = {"ms": r["ms"], "TFLOPs": round(fl / r["ms"] / 1e9, 1)}
    res["sum_ms_x_chunks"] = round(sum(v["ms"] for v in res.values()) * x.T / c, 2)
    # A candidate for a follow-up, measured alone: grad_hidden as split-K over S vocabulary slices. bf16 partials
    # (S = 8, measured 1.51 vs 1.80 ms at C = 1,024 on the H200) break the op's fp32-reduction rule; fp32 partials
    # (cuBLAS's bf16 x bf16 -> fp32 bmm, torch >= 2.8 on CUDA) keep it, at S * C * H * 4 bytes more ("extra_MiB":
    # at C = 1,024, H = 3,584 S = 4 fits the 1.45 GiB cap, S = 8 does not). The sum is written to bf16 as the op would.
    # (grad_hidden and grad_weight on two streams gave nothing at 256 tokens: bench/TUNING.md.)
    for n_split, fp32 in ((8, False), (2, True), (4, True), (8, True)):
        if x.V % n_split:
            continue
        parts = torch.empty(n_split, c, x.H, device=dev, dtype=torch.float32 if fp32 else h.dtype)
        lgs, ws = lg.view(c, n_split, x.V // n_split).transpose(0, 1), w.view(n_split, x.V // n_split, x.H)
        mm = (lambda: torch.bmm(lgs, ws, out_dtype=torch.float32, out=parts)) if fp32 else \
            (lambda: torch.bmm(lgs, ws, out=parts))
        r = timed(lambda: gh.copy_(torch.sum(mm(), 0, dtype=torch.float32)), warmup, reps, dev)
        res[f"grad_hidden_splitk{n_split}_{'fp32' if fp32 else 'bf16'}_partials"] = {
            "ms": r["ms"], "TFLOPs": round(fl / r["ms"] / 1e9, 1), "extra_MiB": round(parts.nbytes / 2**20, 1)}
        del parts
    return res


# ------------------------------------------------------------------------------------------ memory trace


def memory_trace(x, path: str, min_mib: float = 64.0, **kw) -> dict:
    """CUDA: one fwd+bwd of this kernel under the allocator's history recorder. Writes the snapshot (open it at
    pytorch.org/memory_viz) and returns the allocations of >= min_mib alive at the step's peak, each with the
    innermost Python frames that made it — to find where the extra gradient-sized buffer of the H200 run
    comes from (1.10 GiB after forward, 2.14 GiB in backward)."""
    x.zero()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        step_ours(x, **kw)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    x.zero()
    with open(path, "wb") as fh:
        import pickle
        pickle.dump(snap, fh)
    live, cur, peak, at_peak = {}, 0, 0, {}
    for ev in snap.get("device_traces", [[]])[torch.cuda.current_device()]:
        act, addr, size = ev.get("action"), ev.get("addr"), int(ev.get("size", 0))
        if act == "alloc":
            live[addr] = ev
            cur += size
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif act in ("free_requested", "free") and addr in live:
            cur -= int(live.pop(addr).get("size", 0))

    def where(ev):  # innermost C++ frames (e.g. autograd's AccumulateGrad / clone), then Python frames
        frames = ev.get("frames", [])
        cpp = [f.get("name", "?") for f in frames if not f.get("filename", "").endswith(".py")
               and any(k in f.get("name", "") for k in ("autograd", "Accumulate", "clone", "copy", "empty", "at::"))]
        py = [f for f in frames if f.get("filename", "").endswith(".py")]
        return [n[:80] for n in cpp[:4]] + [f"{Path(f['filename']).name}:{f.get('line')} {f.get('name')}"
                                             for f in py[:6]]

    big = sorted((e for e in at_peak.values() if int(e.get("size", 0)) >= min_mib * 2**20),
                 key=lambda e: -int(e["size"]))
    return {"snapshot": path, "traced_peak_GiB": round(peak / GiB, 3),
            "live_at_peak": [{"MiB": round(int(e["size"]) / 2**20, 1), "where": where(e)} for e in big]}


# ------------------------------------------------------------------------------------------ engine shapes


# (T, H, V, sequences): the Qwen2.5-VL-7B head of ../shared/anchors (first: issue 14's targets, when a time limit
# cuts the run) and gpu_small's update micro-batch (32 rollouts x 64 tokens, 1,028-token vocabulary). CPU: the
# same vocabularies at toy T and H (wiring only).
ENGINE_SHAPES = {"head_7b": ((8192, 3584, 152064, 8), (256, 64, 8192, 8)),
                 "gpu_small": ((2048, 1024, 1028, 32), (256, 64, 1028, 8))}
# micro-batches the engine hands the op in one step: (tokens, sequences), ragged as rollouts are
RAGGED = ((1900, 32), (2048, 32), (1377, 21), (64, 1), (2011, 31), (1024, 16), (1999, 32), (512, 7))


def compiled_variants() -> dict:
    """CUDA: compiled Triton variants of each log-prob kernel so far (one per constexpr configuration)."""
    from strive_kernels import logprob as lt
    dev = torch.cuda.current_device()
    return {name: len(getattr(lt, name).device_caches[dev][0])
            for name in ("_lse_partials_kernel", "_loss_grad_kernel", "_logprob_kernel")}


def ragged_calls(x: "Inputs", dev: str, backend: str) -> dict:
    """One fwd+bwd and one no-grad call per micro-batch of RAGGED (scaled to x.T), each timed alone: a Triton
    compile for a new token count would show as a call of 100s of ms. On CUDA, the compiled variants are
    counted after the first micro-batch (which compiles these calls' own constexpr settings: entropy on,
    the LossSpec default) and after the last, so a difference is a compile for a token count alone."""
    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()
    loss_ms, lp_ms, counts = [], [], []
    for i, (n, s) in enumerate(RAGGED):
        if i == 1 and dev == "cuda" and backend != "reference":
            counts.append(compiled_variants())
        n, s = max(1, n * x.T // 2048), max(1, min(s, n * x.T // 2048))
        h = x.h.detach()[:n].clone().requires_grad_()
        seq = torch.arange(n, device=dev) * s // n  # s sequences of ~n/s tokens, sorted
        args = (h, x.w, x.ids[:n], x.old[:n], torch.randn(s, device=dev), x.mask[:n])
        sync()
        t0 = time.perf_counter()
        sk.fused_logprob_loss(*args, seq_ids=seq, normaliser=float(s), return_entropy=True,
                              backend=backend).loss.backward()
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            sk.fused_logprobs(h.detach(), x.w.detach(), x.ids[:n], backend=backend)
        sync()
        loss_ms.append(round((t1 - t0) * 1e3, 3))
        lp_ms.append(round((time.perf_counter() - t1) * 1e3, 3))
        x.zero()
    out = {"fwd_bwd_ms": loss_ms, "no_grad_ms": lp_ms}
    if counts:
        out["compiled_variants_after_first_and_last"] = counts + [compiled_variants()]
    return out


def engine_shapes(dev: str, quick: bool, trace_dir: str = "") -> dict:
    """Issue 14: at each engine shape, the fast path (backend auto) against the torch twin that
    `bench/throughput.py --compare` runs (backend reference) and plain PyTorch, fwd+bwd and no-grad; at
    gpu_small also micro-batches of varying size after a warm call (compiled variants before and after);
    at the 7B head both chunk operating points and, with trace_dir, the memory trace at 1,024-token chunks."""
    warmup, reps = (1, 3) if quick else (2, 7)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    out = {}
    for name, (gpu_shape, cpu_shape) in ENGINE_SHAPES.items():
        t, h, v, seqs = gpu_shape if dev == "cuda" else cpu_shape
        x = Inputs(t, h, v, dtype, dev, seqs=seqs)
        flops = 6 * t * h * v
        res = out[name] = {"T": t, "H": h, "V": v, "fwd_bwd": {}, "no_grad": {}}
        fb, ng = res["fwd_bwd"], res["no_grad"]
        guarded(fb, "fast", lambda: fwd_bwd_case(x, lambda: step_ours(x), warmup, reps, dev, flops, 0))
        if name == "head_7b":
            guarded(fb, "fast_chunk1024", lambda: fwd_bwd_case(
                x, lambda: step_ours(x, max_chunk_bytes=1024 * v * x.h.element_size()), warmup, reps, dev, flops, 0))
        guarded(fb, "reference_twin", lambda: fwd_bwd_case(x, lambda: step_ours(x, backend="reference"), 1,
                                                           reps if name == "gpu_small" else 2, dev, flops, 0))
        guarded(fb, "plain_pytorch", lambda: fwd_bwd_case(x, lambda: step_plain(x), warmup, reps, dev, flops, 0))
        for case, be in (("fast", "auto"), ("reference_twin", "reference")):
            def nograd(be=be):
                with torch.no_grad():
                    sk.fused_logprobs(x.h, x.w, x.ids, backend=be)
            guarded(ng, case, lambda: timed(nograd, warmup, reps, dev))
        if name == "gpu_small":
            guarded(res, "ragged_fast", lambda: ragged_calls(x, dev, "auto"))
            guarded(res, "ragged_reference_twin", lambda: ragged_calls(x, dev, "reference"))
        if name == "head_7b" and dev == "cuda":  # what bounds the 1,024-token point, and the split-K candidates
            guarded(res, "chunk_matmuls_1024", lambda: chunk_matmuls(x, 1024, warmup, reps, dev))
        if name == "head_7b" and trace_dir and dev == "cuda":
            guarded(res, "memory_trace_chunk1024", lambda: memory_trace(
                x, f"{trace_dir}/logprob_memory_chunk1024.pickle", max_chunk_bytes=1024 * v * x.h.element_size()))
        for k, r in fb.items():
            if "ms" in r and "ms" in fb.get("reference_twin", {}):
                r["ratio_to_reference_twin"] = round(r["ms"] / fb["reference_twin"]["ms"], 3)
        del x
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


def print_engine(res: dict) -> None:
    print(f"\n{'shape':<10} {'case':<16} {'fwd+bwd ms':>11} {'GiB':>7} {'no-grad ms':>11} {'ragged calls ms (max)':>22}")
    for name, r in res.items():
        for case in ("fast", "fast_chunk1024", "reference_twin", "plain_pytorch"):
            f, g = r["fwd_bwd"].get(case, {}), r["no_grad"].get(case, {})
            if not f and not g:
                continue
            rag = r.get("ragged_" + case, {}).get("fwd_bwd_ms")
            print(f"{name:<10} {case:<16} {f.get('ms', float('nan')):>11.3f} {f.get('peak_extra_GiB', '-'):>7} "
                  f"{g.get('ms', float('nan')):>11.3f} {max(rag) if rag else '':>22}")
        if "compiled_variants_after_first_and_last" in r.get("ragged_fast", {}):
            print(f"{name:<10} compiled Triton variants after the first / the last ragged call: "
                  f"{r['ragged_fast']['compiled_variants_after_first_and_last']}")
        for k, m in r.get("chunk_matmuls_1024", {}).items():
            if isinstance(m, dict):
                print(f"{name:<10} one 1,024-token chunk: {k:<34} {m['ms']:>7.3f} ms {m['TFLOPs']:>7} TFLOP/s"
                      + (f"  +{m['extra_MiB']} MiB" if "extra_MiB" in m else ""))
        for a in r.get("memory_trace_chunk1024", {}).get("live_at_peak", []):
            print(f"{name:<10} alive at the backward peak: {a['MiB']:>9.1f} MiB  " + " <- ".join(a["where"][:3]))


# ------------------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions, fewer operating points")
    ap.add_argument("--shape", default="", help="T,H,V (default: 8192,3584,152064 on CUDA, 1024,256,16384 on CPU)")
    ap.add_argument("--no-peers", action="store_true", help="skip the peer implementations")
    ap.add_argument("--memory-trace", default="", metavar="PICKLE",
                    help="CUDA: only trace one fwd+bwd of this kernel's allocations; write the snapshot there")
    ap.add_argument("--engine", action="store_true", help="issue 14: fast path vs torch twin at the engine's shapes")
    ap.add_argument("--trace-dir", default="", help="--engine: also write the 7B-head memory trace there (CUDA)")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.engine:
        res = {"bench": "logprob_engine_shapes", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               **engine_shapes(dev, args.quick, args.trace_dir)}
        print_engine({k: v for k, v in res.items() if isinstance(v, dict)})
        print(json.dumps(res))
        return
    t, h, v = (int(s) for s in args.shape.split(",")) if args.shape else \
        ((8192, 3584, 152064) if dev == "cuda" else (1024, 256, 16384))
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    warmup, reps = (1, 3) if args.quick else (2, 7)
    if args.memory_trace:
        if dev != "cuda":
            raise SystemExit("--memory-trace needs CUDA (it reads the CUDA caching allocator's history)")
        rep = memory_trace(Inputs(t, h, v, dtype, dev), args.memory_trace)
        for a in rep["live_at_peak"]:
            print(f"{a['MiB']:>9.1f} MiB  " + " <- ".join(a["where"]))
        print(json.dumps({"bench": "logprob_memory_trace", "shape": [t, h, v], **rep}))
        return
    res = {"env": {"device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
                   "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
           "shape": {"T": t, "H": h, "V": v, "dtype": str(dtype).replace("torch.", "")},
           "strive_backend": "triton" if dev == "cuda" else "native (CPU: the Triton pass runs only on CUDA)"}
    try:
        import triton
        res["env"]["triton"] = triton.__version__
    except ImportError:
        pass
    flops = 6 * t * h * v
    res["floor"] = {"fwd_bwd_TFLOP": round(flops / 1e12, 2)}

    # ---- ceilings: bf16 matmul rate (8192^3) and the logits matmul at this shape
    n = 8192 if dev == "cuda" else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    r = timed(lambda: a @ b, 2, 5, dev)
    mm_rate = round(2 * n**3 / r["ms"] / 1e9, 3)  # TFLOP/s (a loaded 2-core CPU rounds to 0.0 at one decimal)
    del a, b
    x = Inputs(t, h, v, dtype, dev)
    with torch.no_grad():
        r2 = timed(lambda: x.h @ x.w.t(), 1, 3, dev)
    res["ceilings"] = {"matmul_TFLOPs_square": mm_rate,
                       "logits_matmul_TFLOPs": round(2 * t * h * v / r2["ms"] / 1e9, 1)}
    res["floor"]["ms_at_matmul_rate"] = round(flops / mm_rate / 1e9, 2) if mm_rate else None
    print(f"ceilings: {res['ceilings']}, floor {res['floor']}", flush=True)

    # ---- forward + backward
    fb = res["fwd_bwd"] = {}

    def case(name, step, w=warmup, r=reps):
        guarded(fb, name, lambda: fwd_bwd_case(x, step, w, r, dev, flops, mm_rate))

    def peer(name, make, w=warmup, r=reps):  # the peer's set-up (imports) happens inside the guard
        guarded(fb, name, lambda: fwd_bwd_case(x, make(), w, r, dev, flops, mm_rate))
    if dev == "cuda":
        guarded(res, "accuracy_vs_plain_bf16", lambda: accuracy_check(x, dev))
    chunk_points = (256, 1024) if args.quick else (256, 512, 1024, 2048)
    for c in chunk_points:
        case(f"strive_fused_chunk{c}", lambda c=c: step_ours(x, max_chunk_bytes=c * v * x.h.element_size()))
    from strive_kernels.reference.logprob import NativePass
    native_bytes = 1024 * v * (x.h.element_size() + NativePass.extra_bytes)
    case("strive_native_torch_chunk1024", lambda: step_ours(x, backend="native", max_chunk_bytes=native_bytes))
    if not args.no_peers:
        case("plain_pytorch", lambda: step_plain(x))
        case("trl_selective_log_softmax", lambda: step_trl(x))
        if dev == "cuda":
            peer("liger_triton_grpo_loss", lambda: make_liger_triton(x))
            if not args.quick:  # ~0.5 s per step
                peer("liger_fused_linear_grpo_chunk8", lambda: make_liger_chunked(x), 1, 2)
            peer("cce_default_filter", lambda: make_cce(x, "high"))
            peer("cce_exact", lambda: make_cce(x, None))
    ours = fb.get(f"strive_fused_chunk{chunk_points[0]}", {})
    if "ms" in ours:
        ours["speedup_vs"] = {k: round(r["ms"] / ours["ms"], 2) for k, r in fb.items()
                              if "ms" in r and not k.startswith("strive_fused")}

    # ---- no-grad log-probs (old / reference policy): floor is one matmul
    ng = res["no_grad_logprobs"] = {}
    fl1 = 2 * t * h * v

    def nograd(name, fn):
        def run():
            with torch.no_grad():
                fn()
        guarded(ng, name, lambda: {**(r := timed(run, warmup, reps, dev)), "TFLOPs": round(fl1 / r["ms"] / 1e9, 1)})
    nograd("strive_fused_logprobs", lambda: sk.fused_logprobs(x.h, x.w, x.ids))
    nograd("strive_fused_logprobs_entropy", lambda: sk.fused_logprobs(x.h, x.w, x.ids, return_entropy=True))
    nograd("plain_pytorch", lambda: torch.log_softmax((x.h @ x.w.t()).float(), -1).gather(-1, x.ids[:, None]))
    nograd("logits_matmul_only", lambda: x.h @ x.w.t())

    # ---- what bounds it: the per-chunk matmuls alone
    if dev == "cuda":
        res["chunk_matmuls"] = {}
        for c in chunk_points:
            guarded(res["chunk_matmuls"], f"chunk{c}", lambda c=c: chunk_matmuls(x, c, warmup, reps, dev))

    print("\n{:<42} {:>9} {:>17} {:>9} {:>8}".format("fwd+bwd", "ms", "p20/p80", "GiB", "TFLOP/s"))
    for k, r in fb.items():
        if "ms" in r:
            print("{:<42} {:>9.2f} {:>8.2f}/{:<8.2f} {:>9} {:>8}".format(k, r["ms"], r["p20"], r["p80"],
                                                                      r.get("peak_extra_GiB", "-"), r["TFLOPs"]))
        else:
            print(f"{k:<42} {r}")
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
