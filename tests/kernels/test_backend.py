"""One backend vocabulary for every kernel, one resolver (strive_kernels._backend.resolve), one override
(STRIVE_KERNELS_BACKEND=reference sends every backend="auto" call to the pure-torch twin)."""
import re

import pytest
import torch

import strive_kernels as sk
from strive_kernels._backend import BACKENDS, ENV, KERNELS, BackendError, resolve

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# the facts each kernel's rule reads, at a shape every fast path takes
FACTS = {"variant_patchify": dict(native_error=None), "keyframe_sample": dict(pool=256, variants=4),
         "group_advantages": dict(n=2048), "fused_logprob_loss": {}, "fused_logprobs": dict(vocab=152_064),
         "shared_prefix_attention": dict(head_dim=128, n_rep=8, supported=True), "decode_layer": dict(supported=True),
         "sample_tokens": dict(seeded=True, fits=True)}


def test_every_kernel_speaks_the_one_vocabulary(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert BACKENDS == ("auto", "triton", "native", "reference") and set(FACTS) == set(KERNELS)
    for kernel, facts in FACTS.items():
        assert resolve(kernel, "reference", CUDA, **facts) == "reference"
        assert resolve(kernel, "auto", CUDA, **facts) == KERNELS[kernel][0]
        for name in ("triton", "native"):
            if name in KERNELS[kernel]:
                assert resolve(kernel, name, CUDA, **facts) == name
            else:
                with pytest.raises(BackendError, match=f"{kernel} has no {name!r} backend; it has auto"):
                    resolve(kernel, name, CUDA, **facts)
        for old in ("cpp", "torch", "cuda"):
            with pytest.raises(BackendError, match=rf"backend must be one of auto\|triton\|native\|reference, got"):
                resolve(kernel, old, CUDA, **facts)


def test_auto_rules(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    # on the CPU auto never takes the interpreter: the C++ op / the chunked torch pass, or the twin
    assert [resolve(k, "auto", CPU, **f) for k, f in FACTS.items()] == [
        "native", "reference", "reference", "native", "native", "reference", "reference", "reference"]
    assert resolve("variant_patchify", "auto", CPU, native_error="not built") == "reference"
    with pytest.raises(BackendError, match="variant_patchify\\(backend='native'\\) cannot run here: not built"):
        resolve("variant_patchify", "native", CPU, native_error="not built")
    # shape rules: beyond the Triton path's limits auto takes the twin and an explicit triton is an error
    for kernel, facts, match in (("keyframe_sample", dict(pool=8193, variants=4), "at most 8192 frames"),
                                 ("keyframe_sample", dict(pool=64, variants=65), "at most 64 variants"),
                                 ("group_advantages", dict(n=65_537), "at most 65536 rewards"),
                                 ("shared_prefix_attention", dict(head_dim=80, n_rep=8, supported=False),
                                  "head size 80"),
                                 ("decode_layer", dict(supported=False), "one dtype"),
                                 ("sample_tokens", dict(seeded=False, fits=True), "needs seed= and step="),
                                 ("sample_tokens", dict(seeded=True, fits=False), "int32 noise counters")):
        assert resolve(kernel, "auto", CUDA, **facts) == "reference"
        with pytest.raises(BackendError, match=match):
            resolve(kernel, "triton", CUDA, **facts)
    # fused_logprobs' vocabulary rule (measured: the twin is faster below 16,384 on an H200), for auto only
    assert resolve("fused_logprobs", "auto", CUDA, vocab=1028) == "reference"
    assert resolve("fused_logprobs", "triton", CUDA, vocab=1028) == "triton"
    assert resolve("fused_logprob_loss", "auto", CUDA) == "triton"


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("keyframe_sample", "triton", CPU, pool=10, variants=2) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match="Triton needs CUDA tensors \\(got cpu\\), or TRITON_INTERPRET=1"):
        resolve("keyframe_sample", "triton", CPU, pool=10, variants=2)


def test_override(monkeypatch):
    monkeypatch.setenv(ENV, "reference")
    assert all(resolve(k, "auto", CUDA, **f) == "reference" for k, f in FACTS.items())
    assert resolve("fused_logprobs", "native", CPU, vocab=10) == "native"  # an explicit backend wins
    monkeypatch.setenv(ENV, "auto")
    assert resolve("group_advantages", "auto", CUDA, n=10) == "triton"
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(BackendError, match="STRIVE_KERNELS_BACKEND='fast'"):
        resolve("group_advantages", "auto", CUDA, n=10)


def test_public_types_come_from_the_package():
    from strive_kernels.reference.advantage import GroupStats
    from strive_kernels.reference.variant import CLIP_MEAN
    assert sk.GroupStats is GroupStats and sk.CLIP_MEAN is CLIP_MEAN and sk.resolve is resolve
    assert sk.ADVANTAGE_MODES == ("joint", "per_variant", "mean_only", "batch_std")
    assert sk.LOSS_AGGREGATIONS == ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


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


def test_variants_config_uses_the_vocabulary():
    """variants.backend takes the kernels' words; the names it had before (cpp, torch) get an error naming the new."""
    from strive_engine.config import ConfigError, VariantConfig

    names = ("auto", "native", "reference")
    assert tuple(VariantConfig(backend=b).backend for b in names) == names
    for old, new in (("cpp", "native"), ("torch", "reference")):
        with pytest.raises(ConfigError, match=rf"'{old}' is now '{new}' .*auto \| native \| reference\)"):
            VariantConfig(backend=old)
    with pytest.raises(ConfigError, match="variants.backend: 'triton' is not one of 'auto', 'native', 'reference'"):
        VariantConfig(backend="triton")


def test_host_launch_arithmetic_equals_triton():
    """next_pow2 / cdiv (plain ints: triton's are constexpr functions, ~3 us a host call) give triton's values."""
    import triton

    from strive_kernels._backend import cdiv, next_pow2

    for n in list(range(0, 70)) + [1023, 1024, 1025, 151_936, 2**31 - 1, 2**31, 2**40 + 3]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_check_values_default_host_on_device_off_unless_debug(monkeypatch):
    """check_values(requested, on_device), the switch of the checks that read device data: by default (None)
    on for host data (free) and off on a device (a sync each) unless STRIVE_KERNELS_DEBUG is set to anything but
    "" / "0"; an explicit True / False wins either way; anything else is a TypeError naming it."""
    from strive_kernels._backend import DEBUG_ENV, check_values, debug_checks

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert not debug_checks()
    assert check_values(None, False) is True and check_values(None, True) is False
    for off in ("", "0"):
        monkeypatch.setenv(DEBUG_ENV, off)
        assert not debug_checks() and check_values(None, True) is False and check_values(None, False) is True
    for on in ("1", "yes"):
        monkeypatch.setenv(DEBUG_ENV, on)
        assert debug_checks() and check_values(None, True) is True and check_values(None, False) is True
    for debug in ("0", "1"):
        monkeypatch.setenv(DEBUG_ENV, debug)
        for on_device in (False, True):
            assert check_values(True, on_device) is True and check_values(False, on_device) is False
    for bad in (1, 0, "yes", 1.0):
        with pytest.raises(TypeError, match=re.escape(f"True, False or None, got {bad!r}")):
            check_values(bad, False)


def test_public_calls_say_where_their_data_is(device, monkeypatch):
    """keyframe_sample and group_advantages ask check_values with on_device from their input tensors' device
    (False on host tensors, True on CUDA ones) and the caller's switch as given: recorded by wrapping the
    function in each module, at tiny shapes (the Triton keyframe path: the twin checks its inputs itself)."""
    import strive_kernels.advantage as adv_mod
    import strive_kernels.keyframe as kf_mod

    calls = []
    for mod in (kf_mod, adv_mod):
        real = mod.check_values
        monkeypatch.setattr(mod, "check_values", lambda requested, on_device, mod=mod, real=real:
                            calls.append((mod.__name__.rsplit(".", 1)[1], requested, on_device)) or
                            real(requested, on_device))
    on = device == "cuda"
    g = torch.Generator().manual_seed(0)
    fe, qe = torch.randn(7, 8, generator=g).to(device), torch.randn(2, 8, generator=g).to(device)
    off = torch.tensor([0, 3, 7])
    for switch in (None, True, False):
        kf_mod.keyframe_sample(fe, qe, off, 2, 2, backend="triton", check_finite=switch)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0]).to(device)
    groups, variants = torch.tensor([0, 0, 1, 1]).to(device), torch.zeros(4, dtype=torch.long).to(device)
    for switch in (None, True):
        adv_mod.group_advantages(rewards, groups, variants, validate=switch)
    assert calls == [("keyframe", None, on), ("keyframe", True, on), ("keyframe", False, on),
                     ("advantage", None, on), ("advantage", True, on)], calls
