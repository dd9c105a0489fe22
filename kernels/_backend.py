"""Process-wide default for `backend="auto"`.

`STRIVE_KERNELS_BACKEND=reference` sends every kernel called with backend="auto" to its pure-torch twin in
`strive_kernels.reference` (used by `bench/throughput.py --compare` and for debugging); unset or "auto" keeps
each function's own choice (fast path where it can run). An explicit backend argument always wins.
"""
import os

ENV = "STRIVE_KERNELS_BACKEND"


def resolve_auto(backend: str) -> str:
    if backend == "auto":
        forced = os.environ.get(ENV, "auto")
        if forced not in ("auto", "reference"):
            raise ValueError(f"{ENV}={forced!r}: use 'auto' or 'reference'")
        return forced
    return backend
