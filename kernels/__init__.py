"""strive_kernels: fused kernels of the STRIVE engine, usable on their own (depends on torch/triton only).

    import strive_kernels as sk
    pv, grid = sk.variant_patchify(frames_u8, indices, boxes, out_hw, mean, std)   # C++/CUDA op
    idx, scores, imp = sk.keyframe_sample(frame_emb, question_emb, offsets, K, F)  # Triton
    adv, stats = sk.group_advantages(rewards, group_ids, variant_ids, mode="joint")  # Triton
    out = sk.fused_logprob_loss(hidden, weight, targets, old_logp, adv, mask)    # Triton; out.loss, out.logp
    o = sk.shared_prefix_attention(q, k_prefix, v_prefix, start, k_suffix, v_suffix, n)  # Triton decode attention

Every public function picks its fast path when it can run (CUDA tensors, or the C++ op on CPU) and the
pure-torch twin in `strive_kernels.reference` otherwise; `backend="reference"` forces the twin.
Attributes load lazily so importing the package does not import Triton.
"""
import importlib

_EXPORTS = {
    "variant_patchify": "strive_kernels.variant",
    "keyframe_sample": "strive_kernels.keyframe",
    "group_advantages": "strive_kernels.advantage",
    "fused_logprob_loss": "strive_kernels.logprob",
    "fused_logprobs": "strive_kernels.logprob",
    "shared_prefix_attention": "strive_kernels.decode_attention",
    "add_rmsnorm": "strive_kernels.decode_layer",
    "rope_cache": "strive_kernels.decode_layer",
    "silu_mul": "strive_kernels.decode_layer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'strive_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
