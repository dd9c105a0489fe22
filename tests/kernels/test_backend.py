"""STRIVE_KERNELS_BACKEND=reference sends every backend="auto" call to the pure-torch twin."""
import pytest
import torch

import strive_kernels as sk
from strive_kernels._backend import ENV, resolve_auto


def test_resolve_auto(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_auto("auto") == "auto" and resolve_auto("triton") == "triton"
    monkeypatch.setenv(ENV, "reference")
    assert resolve_auto("auto") == "reference" and resolve_auto("native") == "native"
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match="STRIVE_KERNELS_BACKEND='fast'"):
        resolve_auto("auto")


def test_forced_reference_reaches_the_twin(monkeypatch):
    """On CPU, auto picks the native C++ op; the variable must route it to the reference instead."""
    import strive_kernels.variant as var_mod

    if not var_mod.has_native("cpu"):
        pytest.skip("the native CPU op is not built")
    calls = []
    real = var_mod.variant_patchify_reference
    monkeypatch.setattr(var_mod, "variant_patchify_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    frames = torch.randint(0, 256, (2, 40, 60, 3), dtype=torch.uint8)
    args = (frames, torch.tensor([[0, 1]]), torch.tensor([[0.0, 0.0, 60.0, 40.0]]), [(28, 56)])
    monkeypatch.delenv(ENV, raising=False)
    native, _ = sk.variant_patchify(*args)
    assert calls == []
    monkeypatch.setenv(ENV, "reference")
    ref, _ = sk.variant_patchify(*args)
    assert calls == [1] and torch.equal(native, ref)
