"""Benchmark of strive_kernels.keyframe_sample: B=64 videos x P=256 candidate frames x D=1152 (bf16), K=4
variants x F=16 frames, in one Triton launch.

    python bench/bench_keyframe.py [--quick] [--sweep]

CUDA: the kernel alone (validated inputs, `keyframe_sample_forward`; target <= 25 us on an H100/H200), the
public call (validation reads the offsets on the host and the NaN check syncs once), and the pure-torch
reference on the same GPU, all timed with triton.testing.do_bench (median, p20, p80 in us); the kernel's
achieved GB/s on the 38 MB of embeddings against a device-to-device copy of the same tensor measured in the
same run (copy GB/s counts read + write); peak extra memory; whether the indices equal the reference's.
--sweep also times other (rows per program, warps) settings. CPU (no CUDA): a small shape through the Triton
interpreter and the reference, only to show the path runs (interpreter times mean nothing).
Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton kernels are defined

import triton  # noqa: E402

from strive_kernels.keyframe import keyframe_sample, keyframe_sample_forward  # noqa: E402

from _timing import cuda_time_us, peak_extra_mb, timeit  # noqa: E402
from strive_kernels.reference.keyframe import keyframe_sample_reference  # noqa: E402

K, F, TAU, LAM, SEED = 4, 16, 0.1, 0.3, 1234


def make_inputs(B: int, P: int, D: int, device: str, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    fe = torch.randn(B * P, D, generator=g)
    qe = torch.randn(B, D, generator=g)
    for b in range(B):  # a few relevant frames per video, so the softmax is peaked as in real use
        fe[b * P + (b * 7) % P] += 3 * qe[b]
    off = torch.arange(B + 1, dtype=torch.int64) * P
    return fe.to(device, dtype), qe.to(device, dtype), off


def bench_cuda(quick: bool, sweep: bool, B: int = 64, P: int = 256, D: int = 1152, device: str = "cuda") -> dict:
    fe, qe, off = make_inputs(B, P, D, device)
    sizes = [P] * B
    off_dev = off.to(device)
    nbytes = fe.numel() * fe.element_size()

    def kernel(rows=32, warps=8):
        return keyframe_sample_forward(fe, qe, off_dev, sizes, K, F, TAU, LAM, SEED, True, rows_per_program=rows,
                                       num_warps=warps)

    out = {"shape": dict(B=B, P=P, D=D, K=K, F=F, dtype="bfloat16"), "embedding_MB": nbytes / 1e6}
    dst = torch.empty_like(fe)
    copy = cuda_time_us(lambda: dst.copy_(fe), quick)
    out["copy"] = dict(copy, GBps_read_write=2 * nbytes / (copy["median_us"] * 1e-6) / 1e9)
    k = cuda_time_us(kernel, quick)
    out["kernel"] = dict(k, GBps=nbytes / (k["median_us"] * 1e-6) / 1e9, peak_extra_MB=peak_extra_mb(kernel))
    out["kernel"]["fraction_of_copy_bandwidth"] = out["kernel"]["GBps"] / out["copy"]["GBps_read_write"]
    out["public_call"] = cuda_time_us(lambda: keyframe_sample(fe, qe, off, K, F, TAU, LAM, SEED), quick)
    ref = lambda: keyframe_sample_reference(fe, qe, off, K, F, TAU, LAM, SEED)  # noqa: E731
    out["reference"] = dict(cuda_time_us(ref, True), peak_extra_MB=peak_extra_mb(ref))
    out["speedup_kernel_vs_reference"] = out["reference"]["median_us"] / k["median_us"]
    idx, sc, imp = kernel()
    ridx, rsc, rimp = ref()
    out["indices_equal_reference"] = bool(torch.equal(idx, ridx))
    out["indices_mismatch_frac"] = (idx != ridx).float().mean().item()
    out["max_abs_score_diff"] = (sc - rsc).abs().max().item()
    out["target_us"] = 25.0
    out["meets_target"] = k["median_us"] <= 25.0
    if sweep:
        out["sweep"] = {f"rows{r}_warps{w}": cuda_time_us(lambda r=r, w=w: kernel(r, w), True)["median_us"]
                        for r in (16, 32, 64) for w in (4, 8)}
    return out


def bench_cpu(quick: bool) -> dict:
    B, P, D = 4, 32, 64
    fe, qe, off = make_inputs(B, P, D, "cpu", torch.float32)
    reps = 2 if quick else 5
    tri = timeit(lambda: keyframe_sample(fe, qe, off, K, 8, TAU, LAM, SEED, backend="triton"), reps, unit="us")
    ref = timeit(lambda: keyframe_sample_reference(fe, qe, off, K, 8, TAU, LAM, SEED), reps, unit="us")
    same = torch.equal(keyframe_sample(fe, qe, off, K, 8, TAU, LAM, SEED, backend="triton")[0],
                       keyframe_sample_reference(fe, qe, off, K, 8, TAU, LAM, SEED)[0])
    return {"shape": dict(B=B, P=P, D=D, K=K, F=8, dtype="float32"), "triton_interpreter": tri, "reference": ref,
            "indices_equal_reference": same, "note": "CPU: interpreter timing is not a speed measurement"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a short GPU run)")
    ap.add_argument("--sweep", action="store_true", help="also time other rows-per-program / warps settings")
    args = ap.parse_args()
    report = {"bench": "keyframe_sample", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
        report.update(bench_cuda(args.quick, args.sweep))
        print(f"kernel {report['kernel']['median_us']:.1f} us ({report['kernel']['GBps']:.0f} GB/s, "
              f"{100 * report['kernel']['fraction_of_copy_bandwidth']:.0f}% of copy), public call "
              f"{report['public_call']['median_us']:.1f} us, reference {report['reference']['median_us']:.0f} us")
    else:
        report["device"] = "cpu (" + platform.machine() + ")"
        report.update(bench_cpu(args.quick))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
