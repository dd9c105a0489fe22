"""Pure-torch twins of every kernel: the test oracle and the CPU fallback.

One module per kernel (variant, keyframe, advantage, logprob, decode_attention, decode_layer,
sampling); the names below are re-exported so
`from strive_kernels.reference import keyframe_sample_reference` works.
"""
import importlib

_EXPORTS = {
    "variant_patchify_reference": "strive_kernels.reference.variant",
    "keyframe_sample_reference": "strive_kernels.reference.keyframe",
    "group_advantages_reference": "strive_kernels.reference.advantage",
    "fused_logprob_loss_reference": "strive_kernels.reference.logprob",
    "fused_logprobs_reference": "strive_kernels.reference.logprob",
    "shared_prefix_attention_reference": "strive_kernels.reference.decode_attention",
    "add_rmsnorm_reference": "strive_kernels.reference.decode_layer",
    "rope_reference": "strive_kernels.reference.decode_layer",
    "silu_mul_reference": "strive_kernels.reference.decode_layer",
    "sample_tokens_reference": "strive_kernels.reference.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'strive_kernels.reference' has no attribute {name!r}")
