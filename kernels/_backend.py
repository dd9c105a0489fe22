"""Which implementation runs a kernel call: one vocabulary, one resolver, one environment override.

Every public function of strive_kernels takes `backend=` from one vocabulary (`BACKENDS`):

    auto       the fastest implementation that runs on the inputs' device and shape (the rules below)
    triton     the Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)
    native     the kernel's compiled or chunked non-Triton path: the C++/CUDA op of variant_patchify, the
               chunked pure-torch pass of fused_logprob_loss / fused_logprobs (their CPU path)
    reference  the pure-torch twin in `strive_kernels.reference`: the test oracle, and the fallback

Each kernel implements `reference` and the fast paths listed in `KERNELS`; asking for one it does not have,
or for one that cannot run on these tensors, is a `BackendError` naming the kernel, the backend and why.
`auto` picks the first fast path of the kernel that runs here (Triton only on CUDA: `auto` never picks the
interpreter), else the reference, with these rules:

    variant_patchify         native when the C++ op has a kernel for the device
    keyframe_sample          Triton for pools of <= MAX_POOL frames and <= MAX_VARIANTS variants
    group_advantages         Triton for <= MAX_REWARDS rewards (and, when the caller says how long its longest
                             question is, questions of <= MAX_QUESTION answers in batches over 2 (MAX_QUESTION - 1))
    fused_logprob_loss       Triton on CUDA, the native chunked pass elsewhere
    fused_logprobs           as fused_logprob_loss, but the reference below SMALL_VOCAB_NOGRAD on CUDA:
                             at V=1,028 the twin took 0.29 ms and the fused pass 0.50 (H200, 2026-12-04,
                             bench_logprob.py --engine); at V=152,064, 75.5 vs 13.9 ms
    shared_prefix_attention  Triton for head sizes that are powers of two in [16, 256], <= 64 query heads
                             per K/V head, fp16/bf16/fp32
    decode_layer             Triton when every tensor is on CUDA in one dtype and the layout fits the kernel
    sample_tokens            Triton when the call is greedy or brings its Philox seed and step (the twin draws
                             from the default generator instead), and M x V fits its int32 noise counters

`STRIVE_KERNELS_BACKEND=reference` turns every `auto` into `reference` (bench/throughput.py --compare,
debugging); unset or "auto" leaves the rules above. An explicit backend argument always wins.

`STRIVE_KERNELS_DEBUG=1` turns on the input checks that read the *values* of device tensors (NaN embeddings,
the ordering of group ids, ...). Each of them is a device-to-host copy that waits for the GPU, which cost
the public calls 3-5x their kernels' device time on an H200 (issue 14), so on CUDA they are off by default;
on the host they read memory the caller already has and stay on. Checks of shapes, dtypes, devices and
scalar arguments never read device data and always run. A public function's own `validate` /
`check_finite` argument, when given as True or False, overrides this default.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "native", "reference")
ENV = "STRIVE_KERNELS_BACKEND"
DEBUG_ENV = "STRIVE_KERNELS_DEBUG"

# Fast paths of each kernel, in the order `auto` tries them (every kernel also has "reference").
KERNELS = {
    "variant_patchify": ("native",),
    "keyframe_sample": ("triton",),
    "group_advantages": ("triton",),
    "fused_logprob_loss": ("triton", "native"),
    "fused_logprobs": ("triton", "native"),
    "shared_prefix_attention": ("triton",),
    "decode_layer": ("triton",),
    "sample_tokens": ("triton",),
}
# Shape limits of the Triton paths (their per-program tiles live in registers).
MAX_POOL, MAX_VARIANTS = 8192, 64  # keyframe_sample: the per-pool tail holds (K, P) tiles
MAX_REWARDS = 65_536  # group_advantages: the engine feeds a few hundred to a few thousand per step
MAX_QUESTION = 1_025  # group_advantages: a program owns the questions starting in its 1,024 answers, whole
SMALL_VOCAB_NOGRAD = 16_384  # fused_logprobs: below this vocabulary auto takes the twin on CUDA


class BackendError(ValueError):
    """A backend that is not in the vocabulary, not implemented by the kernel, or cannot run these inputs."""


def interpreting() -> bool:
    """True under Triton's interpreter: TRITON_INTERPRET=1 (set before the kernels were defined, as tests/conftest.py
    does; then they run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _why_not(kernel: str, backend: str, device: torch.device, explicit: bool, shape: dict) -> str | None:
    """None when `backend` can run this call of `kernel`, else the reason (a phrase for the error message)."""
    if backend == "triton":
        if device.type != "cuda" and not (explicit and device.type == "cpu" and interpreting()):
            return f"Triton needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 set before the import on CPU"
        if kernel == "keyframe_sample" and (shape["pool"] > MAX_POOL or shape["variants"] > MAX_VARIANTS):
            return (f"it takes pools of at most {MAX_POOL} frames and at most {MAX_VARIANTS} variants, got "
                    f"P_max={shape['pool']}, K={shape['variants']}")
        if kernel == "group_advantages" and shape["n"] > MAX_REWARDS:
            return f"it takes at most {MAX_REWARDS} rewards per call, got {shape['n']}"
        if kernel == "group_advantages" and shape.get("longest", 0) > MAX_QUESTION and \
                shape["n"] > 2 * (MAX_QUESTION - 1):
            return (f"in batches of more than {2 * (MAX_QUESTION - 1)} rewards it takes questions of at most "
                    f"{MAX_QUESTION} answers, got {shape['longest']}")
        if kernel == "shared_prefix_attention" and not shape["supported"]:
            return (f"head size {shape['head_dim']} must be a power of two in [16, 256], n_rep {shape['n_rep']} "
                    f"<= 64, dtype fp16/bf16/fp32")
        if kernel == "decode_layer" and not shape["supported"]:
            return "every tensor must be on CUDA in one dtype, with the layout the kernel reads"
        if kernel == "sample_tokens" and not shape["seeded"]:
            return "sampling needs seed= and step= (1-element int64 device tensors: its noise is Philox keyed by them)"
        if kernel == "sample_tokens" and not shape["fits"]:
            return "rows x vocabulary exceed its int32 noise counters (2^31 / 4 columns per counter)"
    if backend == "native" and kernel == "variant_patchify" and shape["native_error"]:
        return shape["native_error"]
    return None


def resolve(kernel: str, backend: str, device: torch.device | str, **shape) -> str:
    """The implementation ("triton" | "native" | "reference") that runs one call of `kernel`.

    backend: a word of `BACKENDS`. device: the inputs' device. shape: the facts the kernel's rules read
    (see `_why_not`; e.g. keyframe_sample: pool=, variants=; fused_logprobs: vocab=).
    """
    fast = KERNELS[kernel]
    if backend not in BACKENDS:
        raise BackendError(f"{kernel}: backend must be one of {'|'.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        forced = os.environ.get(ENV, "auto")
        if forced not in ("auto", "reference"):
            raise BackendError(f"{ENV}={forced!r}: use 'auto' or 'reference'")
        if forced == "reference":
            return "reference"
        if kernel == "fused_logprobs" and device.type == "cuda" and shape["vocab"] < SMALL_VOCAB_NOGRAD:
            return "reference"
        for b in fast:
            if _why_not(kernel, b, device, False, shape) is None:
                return b
        return "reference"
    if backend == "reference":
        return backend
    if backend not in fast:
        raise BackendError(f"{kernel} has no {backend!r} backend; it has {'|'.join(('auto',) + fast + ('reference',))}")
    why = _why_not(kernel, backend, device, True, shape)
    if why is not None:
        raise BackendError(f"{kernel}(backend={backend!r}) cannot run here: {why}; use backend='reference'")
    return backend


def debug_checks() -> bool:
    """True when STRIVE_KERNELS_DEBUG is set to anything but "" or "0"."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def check_values(requested: bool | None, on_device: bool) -> bool:
    """Whether a data-dependent check runs: `requested` when the caller said True/False; by default (None)
    when the data is on the host (free) or debug checks are on (one sync on a device)."""
    if requested is not None:
        if not isinstance(requested, bool):
            raise TypeError(f"a check switch must be True, False or None, got {requested!r}")
        return requested
    return not on_device or debug_checks()


# Host-side launch arithmetic. triton.next_power_of_2 and triton.cdiv are constexpr functions in triton 3.7:
# each host call unwraps its arguments through the JIT's wrapper (3.5 us apiece on a 2-core VM, 6 of them per
# keyframe_sample call), so the launch paths use these plain equivalents.

def next_pow2(n: int) -> int:
    """triton.next_power_of_2 for ints >= 0 (0 -> 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """triton.cdiv: ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (launch grids are sized by it), None elsewhere.
    bench/kernel_resources.py stands in a GPU's count here to see the grids a GPU would get."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None
