"""Algorithm presets: small frozen dataclasses of numbers, not branches spread through the code.

Each preset fixes how rewards become advantages and how the per-token surrogate is clipped and
aggregated. `AlgorithmConfig` fills every field it is not given from its preset, so
`--algorithm.preset=dapo --algorithm.eps_high=0.3` is DAPO with a wider upper clip.

Advantage modes (rewards r[b, k, g] of question b, variant k, answer g):
  joint        STRIVE: A = (r - mean_{k,g} r) / (std_{k,g} r + eps)  — one group of K*G per question
  per_variant  GRPO on each view: A = (r - mean_g r) / (std_g r + eps) — K groups of G per question
  mean_only    Dr.GRPO: A = r - mean_{k,g} r                            — no std division
  batch_std    A = (r - mean_{k,g} r) / (std over the whole batch + eps)
Loss aggregations (mask m[i, t] over completion tokens; L[i, t] the per-token surrogate):
  token_mean               DAPO: sum_{i,t} m L / sum_{i,t} m   (token count across ranks and micro-batches)
  seq_mean_token_mean      GRPO: mean_i (sum_t m L / sum_t m)
  seq_mean_token_sum_norm  Dr.GRPO: sum_{i,t} m L / (num_seqs * max_new_tokens)
"""
from __future__ import annotations

from dataclasses import dataclass

from strive_kernels import ADVANTAGE_MODES, LOSS_AGGREGATIONS  # noqa: F401  (defined once, by the kernels' contracts)


@dataclass(frozen=True)
class AlgorithmPreset:
    advantage_mode: str
    eps_low: float
    eps_high: float
    beta: float  # k3 KL coefficient to the frozen reference; 0 = no reference model is kept
    loss_agg: str
    dynamic_sampling: bool  # DAPO: drop groups whose raw accuracy is all 0 or all 1
    temporal_bonus: float  # Video-R1 T-GRPO alpha; 0 = off


PRESETS: dict[str, AlgorithmPreset] = {
    # Plain GRPO (DeepSeekMath), one group per (question, variant); with K=1 this is textbook GRPO.
    "grpo": AlgorithmPreset("per_variant", 0.2, 0.2, 0.0, "seq_mean_token_mean", False, 0.0),
    # STRIVE: the same surrogate, advantages normalised jointly over all K*G answers of a question.
    "strive": AlgorithmPreset("joint", 0.2, 0.2, 0.0, "seq_mean_token_mean", False, 0.0),
    # Dr.GRPO: no std division, no per-sequence length normalisation.
    "dr_grpo": AlgorithmPreset("mean_only", 0.2, 0.2, 0.0, "seq_mean_token_sum_norm", False, 0.0),
    # DAPO: clip-higher, token-mean loss, dynamic sampling.
    "dapo": AlgorithmPreset("per_variant", 0.2, 0.28, 0.0, "token_mean", True, 0.0),
    # Video-R1 T-GRPO: GRPO plus a bonus when ordered frames answer better than shuffled ones.
    "tgrpo": AlgorithmPreset("per_variant", 0.2, 0.2, 0.0, "seq_mean_token_mean", False, 0.3),
}
