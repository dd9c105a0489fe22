"""Process-wide switches of the public kernel functions: the default for `backend="auto"`, and debug checks.

`STRIVE_KERNELS_BACKEND=reference` sends every kernel called with backend="auto" to its pure-torch twin in
`strive_kernels.reference` (used by `bench/throughput.py --compare` and for debugging); unset or "auto" keeps
each function's own choice (fast path where it can run). An explicit backend argument always wins.

`STRIVE_KERNELS_DEBUG=1` turns on the input checks that read the *values* of device tensors (NaN embeddings,
the ordering of group ids, ...). Each of them is a device-to-host copy that waits for the GPU, which cost
the public calls 3-5x their kernels' device time on an H200 (issue 14), so on CUDA they are off by default;
on the host they read memory the caller already has and stay on. Checks of shapes, dtypes, devices and
scalar arguments never read device data and always run. A public function's own `validate` /
`check_finite` argument, when given as True or False, overrides this default.
"""
import os

ENV = "STRIVE_KERNELS_BACKEND"
DEBUG_ENV = "STRIVE_KERNELS_DEBUG"


def resolve_auto(backend: str) -> str:
    if backend == "auto":
        forced = os.environ.get(ENV, "auto")
        if forced not in ("auto", "reference"):
            raise ValueError(f"{ENV}={forced!r}: use 'auto' or 'reference'")
        return forced
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
