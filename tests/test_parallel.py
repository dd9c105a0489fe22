"""strive_engine.parallel's process set-up: the CUDA caching allocator's configuration (expandable segments unless
the user chose otherwise)."""
import pytest
import torch

from strive_engine import parallel


def _allocator_settings() -> str | None:
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)   # torch >= 2.13
    return get() if get is not None else None


@pytest.fixture
def allocator_env(monkeypatch):
    """No allocator configuration in the environment; the process's allocator config restored afterwards."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    before = _allocator_settings()
    yield monkeypatch
    if before is not None:
        torch._C._accelerator_setAllocatorSettings(before or "expandable_segments:False")


def test_expandable_segments_unless_the_user_configured_the_allocator(allocator_env):
    assert parallel.configure_cuda_allocator() == "expandable_segments:True"
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"   # child processes inherit it
    settings = _allocator_settings()
    if settings is not None:                                   # torch 2.11 has no getter: the environment only
        assert "expandable_segments:True" in settings
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        allocator_env.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        allocator_env.setenv(name, "")                          # set, even empty: the user's choice stands
        assert parallel.configure_cuda_allocator() is None
        assert os.environ[name] == ""
        allocator_env.delenv(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_segments_are_expandable_after_init_distributed(allocator_env):
    """On CUDA the process's allocations come from expandable segments after the engine's set-up (also when CUDA
    was initialised before it, as earlier tests in this process may have done)."""
    env = parallel.init_distributed("auto")
    try:
        a = torch.empty(2**30, dtype=torch.uint8, device=env.device)
        b = torch.empty(2**30, dtype=torch.uint8, device=env.device)
        segments = [s for s in torch.cuda.memory_snapshot() if s["device"] == env.device.index]
        assert any(s.get("is_expandable", False) for s in segments), segments[:2]
        del a, b
    finally:
        parallel.destroy_distributed()
