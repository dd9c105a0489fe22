"""The model: a Qwen-VL checkpoint or a random-weight architecture, built, patched and initialised.

    model, tokenizer = build_model(cfg.model, device)            # HF model + its tokenizer
    policy = Policy(model)                                       # strive_engine.policy: the trainer's FSDP2 root

Checkpoints: `cfg.path` is a local HF folder (config.json + *.safetensors + tokenizer), loaded with
`local_files_only=True` as Qwen2.5-VL, Qwen2-VL or Qwen3-VL by `config.model_type`. Without a path the model
has random weights and its architecture comes from `cfg.arch` (`build_random_config`): "tiny" (the embedded
default, `build_tiny_config`, sized by cfg.tiny_*), a published architecture (`ARCHS`: Qwen2.5-VL-3B / 7B, for
benchmarks at real shapes), or a config.json file. Its tokenizer is the offline one of `strive_engine.tokenizer`
or Qwen's own (`cfg.tokenizer`); the config always takes its token ids from the tokenizer, and a vocabulary
bigger than the tokenizer's (151,936 rows for the offline tokenizer's ~1k tokens) is padding no text encodes to.

Random init: `init_weights(model, seed)` draws every parameter from a generator keyed by (seed, name), so a
meta-built, FSDP2-sharded model materialised with `to_empty` gets exactly the weights of an unsharded build.
`cfg.init = "device"` draws from the same keys with the model's device's generator: on CUDA seconds instead of
the CPU draw's minute or more at 3.75 B parameters (different values; meant for benchmarks), on CPU the same.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from strive_engine import vision_attention
from strive_engine.tokenizer import build_tokenizer, special_token_ids

log = logging.getLogger(__name__)

# config.model_type -> transformers class name (looked up lazily: Qwen3-VL only exists in recent versions).
MODEL_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
LIGER_PATCHES = {
    "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
    "qwen2_vl": "apply_liger_kernel_to_qwen2_vl",
    "qwen3_vl": "apply_liger_kernel_to_qwen3_vl",
}
_logged: set[str] = set()


class ModelError(ValueError):
    """The model cannot be built: bad path, missing file, unsupported config (the message names it)."""


def _log_once(key: str, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


# ---------------------------------------------------------------------------------------- settings


def resolve_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on CUDA, fp32 elsewhere; otherwise the named dtype."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]


def resolve_attn(cfg: Any, device: torch.device) -> str:
    """auto: sdpa, or flash_attention_2 when importable on CUDA and `share_prompts` is off; an explicit choice is
    honoured or refused. With prompts shared, sdpa even where flash-attn is installed: flash_attention_2 cannot
    take the shared layout's block mask, and one row per answer runs ~4.5x the tokens at gpu_3b's shape (2,062
    prompt + 256 answer tokens, G = 8), far more than the two kernels differ; the layout's prompts and answers
    run on SDPA's causal flash kernels anyway (strive_engine.split_attention), the vision tower on SDPA batched by
    segment length (strive_engine.vision_attention)."""
    on_cuda = torch.device(device).type == "cuda"
    has_fa = importlib.util.find_spec("flash_attn") is not None
    choice = cfg.attn_implementation
    if choice == "auto":
        choice = "flash_attention_2" if (on_cuda and has_fa and not getattr(cfg, "share_prompts", False)) else "sdpa"
    elif choice == "flash_attention_2" and not (on_cuda and has_fa):
        raise ModelError(f"model.attn_implementation='flash_attention_2' needs CUDA and the flash_attn package "
                         f"(device={device}, flash_attn importable={has_fa}); use 'auto' or 'sdpa'")
    _log_once(f"attn:{choice}", "attention implementation: %s", choice)
    return choice


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) like Qwen2.5-VL's [16, 24, 24] for head_dim 128."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_tiny_config(cfg: Any, tokenizer: Any) -> Any:
    """A tiny Qwen2.5-VL config sized by cfg.tiny_*; token ids from `tokenizer` (see strive_engine.tokenizer).

    Vision: patch 14, temporal patch 2, merge 2, output width = LLM hidden size. Embeddings are tied.
    """
    from transformers import Qwen2_5_VLConfig

    ids = special_token_ids(tokenizer)
    hidden, heads = cfg.tiny_hidden_size, cfg.tiny_heads
    head_dim = hidden // heads
    if head_dim % 4:
        raise ModelError(f"model.tiny_hidden_size/tiny_heads = {head_dim} must be divisible by 4 (mRoPE sections)")
    if (cfg.tiny_vision_hidden_size // heads) % 4:
        raise ModelError(f"model.tiny_vision_hidden_size/tiny_heads = {cfg.tiny_vision_hidden_size // heads} must "
                         f"be divisible by 4 (2D vision rotary)")
    kv_heads = heads // 2 if heads % 2 == 0 else heads  # grouped-query attention, as in Qwen
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=cfg.tiny_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)},
                bos_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
                tie_word_embeddings=True)
    vision = dict(depth=cfg.tiny_vision_depth, hidden_size=cfg.tiny_vision_hidden_size,
                  intermediate_size=4 * cfg.tiny_vision_hidden_size, num_heads=heads, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                  out_hidden_size=hidden, fullatt_block_indexes=[cfg.tiny_vision_depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_token_id"],
                            video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"],
                            vision_end_token_id=ids["vision_end_token_id"], tie_word_embeddings=True)


def _qwen25_vl(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
               window_layers: int) -> dict[str, Any]:
    """A Qwen2.5-VL config.json (hub layout) with the vision tower all Qwen2.5-VL sizes share."""
    return {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "tie_word_embeddings": tied, "hidden_act": "silu", "max_position_embeddings": 128000,
            "max_window_layers": window_layers, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "sliding_window": 32768, "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "hidden_act": "silu", "in_channels": 3, "out_hidden_size": hidden, "patch_size": 14,
                              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}}


# Published architectures for `model.arch` (the numbers of the released config.json files); random weights.
ARCHS: dict[str, dict[str, Any]] = {
    "qwen2_5_vl_3b": _qwen25_vl(2048, 11008, 36, 16, 2, 151936, tied=True, window_layers=70),    # 3.75 B
    "qwen2_5_vl_7b": _qwen25_vl(3584, 18944, 28, 28, 4, 152064, tied=False, window_layers=28),   # 8.29 B
}


def build_arch_config(cfg: Any, tokenizer: Any) -> Any:
    """The config of `cfg.arch` (an `ARCHS` name or a config.json path) with `tokenizer`'s token ids.

    The vocabulary is the architecture's, or the tokenizer's when that is bigger; rows past the tokenizer's
    ids are never produced by encoding (the offline tokenizer with a 151,936-row arch: ~1k real rows).
    """
    import json

    from transformers import AutoConfig

    if cfg.arch in ARCHS:
        raw = json.loads(json.dumps(ARCHS[cfg.arch]))  # a deep copy: the update below must not leak into ARCHS
    elif cfg.arch.endswith(".json"):
        path = Path(cfg.arch).expanduser()
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"model.arch: cannot read the config file {str(path)!r}: {e}") from e
    else:
        raise ModelError(f"model.arch {cfg.arch!r} is not one of tiny, {', '.join(ARCHS)}, or a config.json path")
    if raw.get("model_type") not in MODEL_CLASSES:
        raise ModelError(f"model.arch {cfg.arch!r}: model_type {raw.get('model_type')!r} is not one of "
                         f"{', '.join(MODEL_CLASSES)}")
    ids = special_token_ids(tokenizer)
    text = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw  # nested (new) or flat (hub)
    text.update(vocab_size=max(int(text.get("vocab_size", 0)), len(tokenizer)), bos_token_id=ids["pad_token_id"],
                eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    raw.update({k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                    "vision_end_token_id")})
    model_type = raw.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model.arch {cfg.arch!r} is not a valid {model_type} config: {e}") from e


def build_random_config(cfg: Any, tokenizer: Any) -> Any:
    """The config of the random-weight model: `build_tiny_config` for arch 'tiny', else `build_arch_config`."""
    return build_tiny_config(cfg, tokenizer) if cfg.arch == "tiny" else build_arch_config(cfg, tokenizer)


# ------------------------------------------------------------------------------------------- build


def _check_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model.path {str(folder)!r} is not a directory")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    if not (list(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()):
        raise ModelError(f"model folder {folder} has no safetensors weights (*.safetensors)")
    return folder


def _model_class(config: Any) -> type:
    import transformers

    mt = getattr(config, "model_type", None)
    if mt not in MODEL_CLASSES:
        raise ModelError(f"model_type {mt!r} is not supported; supported: {', '.join(MODEL_CLASSES)}")
    cls = getattr(transformers, MODEL_CLASSES[mt], None)
    if cls is None:
        raise ModelError(f"model_type {mt!r} needs transformers.{MODEL_CLASSES[mt]}, which transformers "
                         f"{transformers.__version__} does not have")
    missing = [k for k in ("video_token_id", "vision_start_token_id") if getattr(config, k, None) is None]
    if missing or getattr(config, "vision_config", None) is None:
        raise ModelError(f"model config ({mt}) has no vision tokens: missing {missing or ['vision_config']}")
    return cls


def apply_liger(model: nn.Module, device: torch.device, enabled: bool = True) -> bool:
    """liger-kernel's RMSNorm / SwiGLU / rotary patches for this model instance, on CUDA when installed.

    The fused-linear cross-entropy patch stays off: the loss head is ours (Policy.forward + head_fn).
    liger also rebinds the classes of the family's transformers module (its design), so that every model of that
    family built in this process afterwards would be built from liger's modules, CPU ones included (whose Triton
    kernels then fail on CPU tensors): those classes are put back once this instance is patched. The functions it
    rebinds (the rotary, read when the model runs) stay rebound for the process, as a patched model needs them, but
    dispatch on the device: liger's for CUDA tensors, transformers' own for others. See `_text_rotary` for the one
    rotary liger 0.8.5 misses on transformers 5.x.
    """
    if not enabled or torch.device(device).type != "cuda":
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        _log_once("liger:none", "liger-kernel not installed: model patches skipped")
        return False
    import liger_kernel.transformers as lt

    fn = getattr(lt, LIGER_PATCHES.get(model.config.model_type, ""), None)
    if fn is None:
        _log_once("liger:unsupported", "liger-kernel has no patch for %s", model.config.model_type)
        return False
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
                  model=model)
    params = inspect.signature(fn).parameters
    family = sys.modules[type(model).__module__]
    before = dict(vars(family))
    try:
        fn(**{k: v for k, v in wanted.items() if k in params})
    finally:
        for k, v in list(vars(family).items()):
            old = before.get(k)
            if v is old:
                continue
            if isinstance(v, type):
                if k in before:
                    setattr(family, k, old)  # rebound class
                else:
                    delattr(family, k)       # added class (Qwen2RMSNorm on transformers 5.x)
            elif callable(v) and callable(old):  # rebound function (again: the dispatch made the first time)
                setattr(family, k, old if getattr(old, "_strive_on_cuda", None) is v else _on_cuda(v, old))
    rotary = _text_rotary(family, before)
    _log_once("liger:on", "liger-kernel patches applied to %s's instance (RMSNorm, SwiGLU, rotary%s)",
              model.config.model_type, " with the text rotary fused" if rotary else "")
    return True


def _on_cuda(fused: Any, hf: Any) -> Any:
    """A module-level function of transformers rebound to liger's `fused`, except for a CPU (non-CUDA) tensor as
    its first argument, which goes to transformers' own `hf`."""

    def dispatch(x, *args, **kwargs):
        return (hf if isinstance(x, Tensor) and not x.is_cuda else fused)(x, *args, **kwargs)

    dispatch.__name__ = getattr(hf, "__name__", "dispatch")
    dispatch._strive_on_cuda, dispatch._strive_hf = fused, hf
    return dispatch


def _text_rotary(family: Any, before: dict) -> bool:
    """transformers 5.x folds Qwen2-VL / Qwen2.5-VL's mRoPE sections into the rotary module (cos, sin (B, L, D))
    and their text attention calls the plain `apply_rotary_pos_emb`; liger-kernel 0.8.5 still replaces only
    `apply_multimodal_rotary_pos_emb`, which it adds to the module and nothing calls. The update and the
    trainer's forwards then ran transformers' unfused rotary: rotate_half's negation and concatenation, two
    products and a sum per tensor, each a full pass over q or k, forward and backward. Here that function goes to
    liger's fused rope (one kernel for q and k, cos / sin per batch row) on CUDA, as liger does for Qwen3-VL.
    Returns whether it was rebound."""
    hf = getattr(family, "apply_rotary_pos_emb", None)
    if hf is None or "apply_multimodal_rotary_pos_emb" in before:
        return False  # transformers 4.x: liger's mRoPE is the one called
    if "apply_multimodal_rotary_pos_emb" in vars(family):
        del family.apply_multimodal_rotary_pos_emb  # liger's, added by its patch: nothing calls it
    if getattr(hf, "_strive_on_cuda", None) is not None:
        return True   # liger replaced it (Qwen3-VL), or a model patched before this one
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def fused(q, k, cos, sin, unsqueeze_dim=1):
        return liger_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    family.apply_rotary_pos_emb = _on_cuda(fused, hf)
    return True


def build_model(cfg: Any, device: torch.device | str, *, meta: bool = False) -> tuple[nn.Module, Any]:
    """`cfg: ModelConfig` -> (HF Qwen-VL model, tokenizer), in eval mode, on `device` (or meta).

    cfg.path set: the local checkpoint (weights loaded; meta=True is refused: there would be nothing to
    load the weights into after sharding). cfg.path "": the random-weight model of cfg.arch, init by
    `init_weights` with seed torch.initial_seed() (so the caller seeds it with torch.manual_seed; on the device's
    generator when cfg.init = "device"); meta=True leaves parameters on the meta device for the trainer to
    materialise (`to_empty`) and re-initialise with `init_weights`.
    """
    device = torch.device(device)
    dtype = resolve_dtype(cfg, device)
    attn = resolve_attn(cfg, device)
    if cfg.path:
        from transformers import AutoConfig

        folder = _check_folder(cfg.path)  # path, config, weights, then tokenizer: likeliest problems first
        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001  (re-raised with the file named; HF raises many kinds)
            raise ModelError(f"{folder / 'config.json'} cannot be loaded as a transformers config: {e}") from e
        cls = _model_class(config)
        tokenizer = build_tokenizer(cfg)
        if meta:
            raise ModelError(f"meta=True with model.path={cfg.path!r}: a meta model has no weights; build with "
                             f"meta=False (weights load, then fully_shard shards them)")
        model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, dtype=dtype,
                                    attn_implementation=attn)
        model.to(device)
    else:
        tokenizer = build_tokenizer(cfg)
        config = build_random_config(cfg, tokenizer)
        cls = _model_class(config)
        with torch.device("meta" if meta else device):
            model = cls._from_config(config, attn_implementation=attn, dtype=dtype)
        ids = special_token_ids(tokenizer)
        model.generation_config.eos_token_id = [ids["eos_token_id"], ids["pad_token_id"]]
        model.generation_config.pad_token_id = ids["pad_token_id"]
        model.generation_config.bos_token_id = None
        if not meta:
            init_weights(model, seed=torch.initial_seed(), on_device=cfg.init == "device")
    apply_liger(model, device, cfg.liger)
    if getattr(cfg, "vision_attention", "segmented") == "segmented":
        vision_attention.install(model)
    if getattr(cfg, "freeze_vision", False):
        model.model.visual.requires_grad_(False)  # no optimizer state, no gradient, its tokens reused in a step
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------ init


def _copy_full(param: Tensor, full: Tensor) -> None:
    """Write a full (unsharded) value into a parameter that may be an FSDP2 DTensor shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if param.device.type == "meta":
        raise ModelError("init_weights on a meta model: materialise it first (model.to_empty(device=...))")
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same full value, so each keeps its own slice, no comms.
        shard = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, on_device: bool = False) -> None:
    """Re-initialise every parameter and rotary buffer deterministically, independent of sharding.

    Each parameter's full value is drawn on CPU from a generator seeded by (seed, its name), so the same seed
    gives the same weights whether the model is whole, FSDP2-sharded over any world size, or was built on
    meta. Rules (HF's): Linear/Conv/Embedding weights ~ N(0, initializer_range), the padding row zero; norm
    weights 1; biases 0. Non-persistent buffers (rotary inv_freq) are recomputed by HF's `_init_weights`.

    on_device=True draws each full value with a generator of the parameter's own device, same seeds: still
    independent of sharding, but CUDA's Philox stream gives other values than the CPU's. The CPU draw costs
    about 10-20 ns per parameter single-threaded (a minute or more at 3.75 B, plus the host-to-device copy);
    on an H200 the device draw takes well under a second. On a CPU model the two are the same draw.
    """
    std = getattr(model.config.get_text_config(), "initializer_range", 0.02) or 0.02
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and out_emb.weight is not in_emb.weight:
        # nn.Module.to_empty() unties shared parameters (it builds one new tensor per module); re-tie them.
        model.tie_weights()
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights (lm_head = embed_tokens) are initialised once
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            dev = p.device if on_device and p.device.type != "meta" else torch.device("cpu")  # meta: _copy_full says
            gen = torch.Generator(dev).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            if p_name == "bias":
                full = torch.zeros(p.shape, device=dev)
            elif "Norm" in type(module).__name__:
                full = torch.ones(p.shape, device=dev)
            else:
                full = torch.randn(p.shape, generator=gen, device=dev) * std
                pad = getattr(module, "padding_idx", None)
                if isinstance(module, nn.Embedding) and pad is not None:
                    full[pad] = 0
            _copy_full(p, full.to(p.dtype))
    for mod_name, module in model.named_modules():
        bufs = [(n, b) for n, b in module.named_buffers(recurse=False) if b.is_floating_point()]
        if not bufs or any(True for _ in module.parameters(recurse=False)):
            continue
        for _, b in bufs:
            b.fill_(float("nan"))
            if getattr(b, "_is_hf_initialized", False):
                del b._is_hf_initialized  # HF's init functions skip tensors flagged as done
        model._init_weights(module)
        bad = [n for n, b in module.named_buffers(recurse=False) if b.is_floating_point() and b.isnan().any()]
        if bad:
            raise ModelError(f"init_weights: buffer(s) {bad} of {mod_name} ({type(module).__name__}) were not "
                             f"re-initialised by {type(model).__name__}._init_weights")
