"""`variant_patchify`: every spatiotemporal variant of a video, model-ready, in one call (C++/CUDA op).

    pv, grid = variant_patchify(frames, indices, boxes, out_hw)          # Qwen2-VL / Qwen2.5-VL layout
    model(..., pixel_values_videos=pv, video_grid_thw=grid)

frames   uint8 (P, H, W, 3) RGB pool, CPU or CUDA, decoded once and shared by all K variants. A batch of
         same-size pools is their concatenation along P: add pool b's offset (b * P) to its variants' rows.
indices  int (K, F) rows of `frames` per variant. F not a multiple of `temporal_patch` (F odd) is padded by
         repeating the last frame, as HF's Qwen2-VL video processor does.
boxes    float32 (K, 4) crop (x0, y0, x1, y1) in source pixels, 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H.
         The filter reads only the box's integer hull; an integer box gives exactly "crop, then resize the
         crop"; a fractional box is Pillow's `crop(hull).resize(out, BICUBIC, box=box - hull origin)`.
out_hw   int (K, 2) tensor or list of (h, w), multiples of patch * merge (28).
returns  pixel_values (sum_k ceil(F/tps) * h_k/p * w_k/p, 3 * tps * p * p) in `out_dtype`, rows in Qwen
         patch order (t, h/(p*m), w/(p*m), m, m) and features (C, tps, p, p); grid_thw int64 (K, 3) =
         (ceil(F/tps), h/p, w/p); both on frames' device.

Arithmetic: Pillow's antialiased bicubic (a = -0.5, support scaled by the downscale factor) in its own
fixed point (two separable passes, horizontal first, each rounded to uint8), then HF's float32
`(u8 * (1/255) - mean) / std` -- bit-exact with `Qwen2VLImageProcessorPil` on the same crop and size.
Fused: the resized video never exists in memory, only per-thread / per-block tiles of it.

backend: auto | native | reference (strive_kernels._backend): auto takes the native op when it is built for
frames' device, else the pure-torch reference; native raises when it is not. The op is
`torch.ops.strive.variant_patchify` (schema in csrc/variant_ops.cpp) with a fake implementation here, so
`torch.compile(fullgraph=True)` traces callers (pass out_hw as a list of ints then: shapes depend on it).

CPU kernel knobs: threads = torch.set_num_threads; environment STRIVE_CPU_ISA=avx2|generic caps its
instruction set (default: the widest of AVX-512F / AVX2 / generic the CPU has; all give identical results);
STRIVE_CPU_OUTPUT_CACHE=0 disables the reuse of freed outputs >= 16 MB (csrc/output_cache.h).
"""
from __future__ import annotations

import torch

from strive_kernels._backend import resolve

from strive_kernels.reference.variant import (  # noqa: F401  (CLIP_* re-exported: part of the contract)
    CLIP_MEAN,
    CLIP_STD,
    check_variant_inputs,
    variant_patchify_reference,
)

def _load_native() -> Exception | None:
    try:
        import strive_kernels._C  # noqa: F401  (static initialisers register torch.ops.strive.*)
    except ImportError as e:  # not built (e.g. a source checkout without `pip install -e .`)
        return e
    return None


_NATIVE_ERROR = _load_native()
# Device types with a registered kernel, looked up once (a constant set is also what torch.compile wants).
_NATIVE_DEVICES = frozenset() if _NATIVE_ERROR is not None else frozenset(
    dt for dt, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key("strive::variant_patchify", key))


def has_native(device_type: str) -> bool:
    """Whether the C++/CUDA op has a kernel for this device type ("cpu", "cuda")."""
    return str(device_type) in _NATIVE_DEVICES


if _NATIVE_ERROR is None:

    @torch.library.register_fake("strive::variant_patchify")
    def _variant_patchify_fake(frames, indices, boxes, out_hw, mean, std, temporal_patch, patch, merge, out_dtype):
        # Output rows depend only on F, out_hw and the patch sizes, never on pixel data.
        K, F = indices.shape
        grid_t = (F + temporal_patch - 1) // temporal_patch
        rows = sum(grid_t * (out_hw[2 * k] // patch) * (out_hw[2 * k + 1] // patch) for k in range(len(out_hw) // 2))
        pixel_values = frames.new_empty((rows, 3 * temporal_patch * patch * patch), dtype=out_dtype)
        return pixel_values, frames.new_empty((K, 3), dtype=torch.int64)


def _native_error(device_type: str) -> str | None:
    """Why the C++ op cannot run on this device type (None when it can)."""
    if has_native(device_type):
        return None
    if _NATIVE_ERROR is not None:
        return f"strive_kernels._C failed to load ({_NATIVE_ERROR})"
    return f"the extension was built without a {device_type} kernel (CUDA needs a CUDA build of torch)"


def _flat_hw(out_hw) -> list[int]:
    if isinstance(out_hw, torch.Tensor):
        out_hw = out_hw.tolist()
    return [int(v) for hw in out_hw for v in hw]


def variant_patchify(frames, indices, boxes, out_hw, mean=CLIP_MEAN, std=CLIP_STD, temporal_patch=2, patch=14,
                     merge=2, out_dtype=torch.float32, backend="auto"):
    """Crop, resize (Pillow bicubic), normalise and patchify K variants of a frame pool; see the module doc.

    Inputs are validated first (TypeError / ValueError / IndexError naming the argument and value).
    `indices` and `boxes` are read on the host (they are tiny; CUDA copies of them cost one sync).
    """
    device_type = frames.device.type if isinstance(frames, torch.Tensor) else "cpu"
    if resolve("variant_patchify", backend, device_type, native_error=_native_error(device_type)) == "reference":
        return variant_patchify_reference(frames, indices, boxes, out_hw, mean, std, temporal_patch, patch, merge,
                                          out_dtype)
    if not torch.compiler.is_compiling():  # data-dependent checks would break a compiled graph
        indices, boxes, out_hw = check_variant_inputs(frames, indices, boxes, out_hw, mean, std, temporal_patch,
                                                      patch, merge, out_dtype)
    return torch.ops.strive.variant_patchify(frames, indices, boxes, _flat_hw(out_hw), [float(v) for v in mean],
                                             [float(v) for v in std], temporal_patch, patch, merge, out_dtype)
