"""strive_kernels: fused kernels of the STRIVE engine, usable on their own (depends on torch/triton only).

    import strive_kernels as sk
    pv, grid = sk.variant_patchify(frames_u8, indices, boxes, out_hw, mean, std)   # C++/CUDA op
    idx, scores, imp = sk.keyframe_sample(frame_emb, question_emb, offsets, K, F)  # Triton
    adv, stats = sk.group_advantages(rewards, group_ids, variant_ids, mode="joint")  # Triton
    out = sk.fused_logprob_loss(hidden, weight, targets, old_logp, adv, mask, sk.LossSpec(eps_high=0.28))
    o = sk.shared_prefix_attention(q, k_prefix, v_prefix, start, k_suffix, v_suffix, n)  # Triton decode attention
    o = sk.rope_shared_prefix_attention(q, k, v, pos, t, inv_freq, 1.0, k_prefix, v_prefix, start, k_suffix,
                                        v_suffix)      # the same with the rotary and the K/V write of token t fused
    token, logp = sk.sample_tokens(logits, T, seed=sk.sampling_seed(dev), step=t)      # Triton one-pass sampler

Every public function takes `backend=` from one vocabulary, auto | triton | native | reference, resolved by
one function (`sk.resolve`, module `strive_kernels._backend`, which also documents each kernel's rule and the
STRIVE_KERNELS_BACKEND override): auto picks the fast path when it can run (CUDA tensors, or the C++ op on
CPU) and the pure-torch twin in `strive_kernels.reference` otherwise; "reference" forces the twin.
The types and constants of the contracts (GroupStats, LossSpec, LossOutput, ADVANTAGE_MODES, LOSS_AGGREGATIONS,
CLIP_MEAN / CLIP_STD) are exported here. Attributes load lazily so importing the package does not import Triton.
"""
import importlib

_EXPORTS = {
    "variant_patchify": "strive_kernels.variant",
    "keyframe_sample": "strive_kernels.keyframe",
    "group_advantages": "strive_kernels.advantage",
    "fused_logprob_loss": "strive_kernels.logprob",
    "fused_logprobs": "strive_kernels.logprob",
    "shared_prefix_attention": "strive_kernels.decode_attention",
    "rope_shared_prefix_attention": "strive_kernels.decode_attention",
    "add_rmsnorm": "strive_kernels.decode_layer",
    "rope_cache": "strive_kernels.decode_layer",
    "silu_mul": "strive_kernels.decode_layer",
    "sample_tokens": "strive_kernels.sampling",
    "sampling_seed": "strive_kernels.sampling",
    # contracts: types and constants (torch only)
    "resolve": "strive_kernels._backend",
    "BACKENDS": "strive_kernels._backend",
    "BackendError": "strive_kernels._backend",
    "CLIP_MEAN": "strive_kernels.reference.variant",
    "CLIP_STD": "strive_kernels.reference.variant",
    "ADVANTAGE_MODES": "strive_kernels.reference.advantage",
    "AdvantageInputError": "strive_kernels.reference.advantage",
    "GroupStats": "strive_kernels.reference.advantage",
    "LOSS_AGGREGATIONS": "strive_kernels.reference.logprob",
    "LossSpec": "strive_kernels.reference.logprob",
    "LossOutput": "strive_kernels.reference.logprob",
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
