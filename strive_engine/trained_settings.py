"""The settings a model was trained with, saved with its HF export, and how evaluate and the default recipe use them.

    save_settings(cfg, out / "hf")                      # train: <export>/strive_settings.json
    cfg, origin = adopt_training_settings(cfg, argv)    # evaluate: the export's settings, unless set on the command line
    refuse_tiny_recipe_for_checkpoint(cfg, argv)        # train / evaluate: debug_cpu on a real checkpoint is an error

What evaluate adopts (`INHERITED`): what the model saw and how it answered during training — the prompt style and
the completion length and sampling (`rollout.prompt`, `max_new_tokens`, `temperature`, `top_p`, `top_k`), the
candidate pool (`video.pool_frames`), the keyframe settings (`keyframes.*`: F frames, the scorer) and the vision
inputs (`variants.*`: min/max pixels per frame). A field given on the command line (`--rollout.prompt=short`) wins;
the recipe does not (a recipe is a training set-up; the export says what this model was trained on). Everything
else (the records, batch size, output folder, decoding backend) stays evaluate's.

The default recipe (`debug_cpu`) is sized for the embedded tiny model: the "short" prompt, 16 frames of 28x28
pixels, 20 new tokens. Given `--model.path` of a checkpoint with Qwen's vocabulary and no `--recipe`, train refuses
(and evaluate too, unless the folder carries saved settings) with a message naming the recipe to use, rather than
run a real model with the tiny model's prompt; setting `--rollout.prompt` explicitly accepts debug_cpu's other values.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from strive_engine.config import (DEFAULT_RECIPE, SECTIONS, Config, ConfigError, build_config, parse_overrides)

log = logging.getLogger(__name__)

SETTINGS_FILE = "strive_settings.json"
SETTINGS_VERSION = 1
INHERITED = ("rollout.prompt", "rollout.max_new_tokens", "rollout.temperature", "rollout.top_p", "rollout.top_k",
             "video.pool_frames", "keyframes.*", "variants.*")
# A vocabulary at least this big holds Qwen's special tokens at their real ids (<|endoftext|> = 151643).
QWEN_VOCAB = 151_643
CHECKPOINT_RECIPE = "qwen25vl_7b"


def inherited_fields() -> list[str]:
    """INHERITED with `section.*` expanded to every field of the section."""
    out = []
    for name in INHERITED:
        section, _, fld = name.partition(".")
        out += [f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section])] if fld == "*" else [name]
    return out


def save_settings(cfg: Config, folder: str | Path) -> Path:
    """Write the run's effective configuration next to its export (rank 0)."""
    path = Path(folder) / SETTINGS_FILE
    path.write_text(json.dumps({"version": SETTINGS_VERSION, "written_by": "strive_engine.train",
                                "evaluate_adopts": list(INHERITED), "config": cfg.to_dict()}, indent=1))
    return path


def read_settings(model_path: str | Path) -> dict[str, dict[str, Any]] | None:
    """The saved configuration of an export (section -> field -> value), or None when the folder has none."""
    path = Path(model_path).expanduser() / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        config = saved["config"]
        if not isinstance(config, dict):
            raise TypeError("'config' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable strive_engine settings file ({e}); delete it or pass the "
                          f"settings on the command line") from None
    return config


def cli_fields(argv: list[str]) -> tuple[bool, set[str]]:
    """(whether --recipe was given, the section.field keys set on the command line)."""
    argv = [a for a in argv if a not in ("--debug",)]
    recipe_given = any(a == "--recipe" or a.startswith("--recipe=") for a in argv)
    _, overrides, _ = parse_overrides(argv)
    return recipe_given, {k for k, _ in overrides}


def adopt_training_settings(cfg: Config, argv: list[str]) -> tuple[Config, dict[str, Any]]:
    """evaluate: `cfg` with the INHERITED fields of the model's saved settings, except those set on the command line.

    Returns (config, origin): origin["settings"] is the settings file or None, origin["fields"] maps each
    inherited field to "training" (adopted), "command line" or "recipe" (no saved value)."""
    recipe_given, from_cli = cli_fields(argv)
    saved = read_settings(cfg.model.path) if cfg.model.path else None
    names = inherited_fields()
    if saved is None:
        refuse_tiny_recipe_for_checkpoint(cfg, argv, evaluating=True)
        return cfg, {"settings": None, "fields": {k: ("command line" if k in from_cli else "recipe") for k in names}}
    raw = cfg.to_dict()
    fields: dict[str, str] = {}
    for key in names:
        section, _, fld = key.partition(".")
        if key in from_cli:
            fields[key] = "command line"
        elif fld in saved.get(section, {}):
            raw[section][fld] = saved[section][fld]
            fields[key] = "training"
        else:  # a field the engine gained after the export was written
            fields[key] = "recipe"
    path = Path(cfg.model.path).expanduser() / SETTINGS_FILE
    try:
        out = build_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: the saved training settings do not combine with this command line: {e}") from None
    adopted = [k for k, v in fields.items() if v == "training" and _get(out, k) != _get(cfg, k)]
    log.info("evaluate: using the training settings saved with the model (%s)%s%s", path,
             f"; changed from the recipe: {', '.join(f'{k}={_get(out, k)!r}' for k in adopted)}" if adopted else "",
             f"; kept from the command line: {', '.join(sorted(k for k in from_cli if k in fields))}"
             if any(k in fields for k in from_cli) else "")
    return out, {"settings": str(path), "fields": fields}


def _get(cfg: Config, key: str) -> Any:
    section, _, fld = key.partition(".")
    return getattr(getattr(cfg, section), fld)


def checkpoint_config_value(model_path: str | Path, *keys: str) -> Any:
    """The first of `keys` set in a checkpoint's config.json, at its top level (the flat hub layout) or else in
    its text_config; None when none is, or the file is unreadable."""
    try:
        raw = json.loads((Path(model_path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    return next((d[k] for d in (raw, text) for k in keys if d.get(k) is not None), None)


def checkpoint_vocab_size(model_path: str | Path) -> int | None:
    """config.json's vocabulary size (flat hub layout or text_config), None when unreadable."""
    size = checkpoint_config_value(model_path, "vocab_size")
    return int(size) if isinstance(size, int) else None


def refuse_tiny_recipe_for_checkpoint(cfg: Config, argv: list[str], evaluating: bool = False) -> None:
    """ConfigError when `--model.path` names a checkpoint with Qwen's vocabulary, no --recipe was given (so the
    tiny model's debug_cpu applies) and rollout.prompt was not set on the command line."""
    if not cfg.model.path:
        return
    recipe_given, from_cli = cli_fields(argv)
    vocab = checkpoint_vocab_size(cfg.model.path)
    if recipe_given or "rollout.prompt" in from_cli or vocab is None or vocab < QWEN_VOCAB:
        return
    what = f"carries no saved training settings ({SETTINGS_FILE}) and " if evaluating else ""
    raise ConfigError(
        f"--model.path={cfg.model.path} is a checkpoint with Qwen's vocabulary ({vocab:,} tokens), but {what}no "
        f"--recipe was given: the default recipe {DEFAULT_RECIPE} is sized for the embedded tiny model "
        f"(rollout.prompt={cfg.rollout.prompt!r}, {cfg.keyframes.num_frames} frames of at most "
        f"{cfg.variants.max_pixels} pixels, {cfg.rollout.max_new_tokens} new tokens). Use --recipe "
        f"{CHECKPOINT_RECIPE} (Video-R1's prompt and a real model's shapes), or set --rollout.prompt=video_r1 "
        f"explicitly to keep {DEFAULT_RECIPE}'s other settings")
