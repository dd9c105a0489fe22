"""Prompt text and the chat-template rendering of one (question, video variant) pair.

Two prompt styles, chosen by `rollout.prompt`:

  video_r1  Video-R1's RL prompt, word for word: the question (multiple choice: followed by "Options:" and one
            option per line, exactly as Video-R1's `make_conversation_image_and_video` appends them), then
            QUESTION_TEMPLATE's instruction to reason inside <think> </think> and answer inside
            <answer> </answer>, then the per-problem-type TYPE_TEMPLATE sentence. Use it with real checkpoints.
  short     the same information in a few tokens, for the embedded tiny model: its context and its 16-token
            completions are small, and a 60-token instruction it cannot read would only cost CPU time. The
            output contract (<think>…</think><answer>…</answer>) is the same, so rewards are unchanged.

The video enters the conversation as one `{"type": "video"}` content item; the chat template renders it as
`<|vision_start|><|video_pad|><|vision_end|>` (Qwen2-VL / Qwen2.5-VL convention) and `expand_video_tokens`
then replaces the single `<|video_pad|>` by `grid_t * grid_h * grid_w / merge**2` copies — one per merged
visual token the vision tower emits for that variant — the way HF's Qwen2.5-VL processor does. Qwen3-VL
instead writes one `<t seconds><|vision_start|>…<|vision_end|>` block per temporal patch; `qwen3=True` does that.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_STYLES = ("video_r1", "short")

VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# Video-R1 (src/r1-v/src/open_r1/grpo.py): the instruction appended to every question.
QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)

# Video-R1: one sentence per problem type, appended after QUESTION_TEMPLATE.
TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the "
                       "<answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the "
           "<answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}

# The short style: same contract, a few tokens.
SHORT_TEMPLATE = "{Question}\nThink in <think> </think>, then answer in <answer> </answer>."
SHORT_TYPE_TEMPLATE = {
    "multiple choice": " Answer with the option letter.",
    "numerical": " Answer with a number.",
    "OCR": " Answer with the text.",
    "free-form": " Answer in words.",
    "regression": " Answer with a number.",
}


class PromptError(ValueError):
    """A question cannot be turned into a prompt (unknown problem type or style, bad grid, no video slot)."""


def _field(q: Any, name: str, default: Any = None) -> Any:
    """Read a field from a VideoQA-like object or a Video-R1 dict record (`problem` for the question)."""
    if isinstance(q, dict):
        if name == "question":
            return q.get("question", q.get("problem", default))
        return q.get(name, default)
    return getattr(q, name, default)


def format_question(question: str, options: Sequence[str], problem_type: str, style: str = "video_r1") -> str:
    """The user text for one question (without the video placeholder)."""
    if style not in PROMPT_STYLES:
        raise PromptError(f"prompt style {style!r} is not one of {PROMPT_STYLES}")
    if problem_type not in TYPE_TEMPLATE:
        raise PromptError(f"problem_type {problem_type!r} is not one of {tuple(TYPE_TEMPLATE)}")
    text = question
    if problem_type == "multiple choice":
        # Video-R1 appends "Options:" directly after the problem text, one option per line.
        text = question + "Options:\n" + "".join(f"{op}\n" for op in options)
    if style == "video_r1":
        return QUESTION_TEMPLATE.format(Question=text) + TYPE_TEMPLATE[problem_type]
    return SHORT_TEMPLATE.format(Question=text.rstrip("\n")) + SHORT_TYPE_TEMPLATE[problem_type]


def build_messages(qa: Any, style: str = "video_r1") -> list[dict]:
    """Chat messages for one question: a single user turn holding the video, then the text (Video-R1 order)."""
    text = format_question(_field(qa, "question", ""), tuple(_field(qa, "options", ()) or ()),
                           _field(qa, "problem_type", ""), style)
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


def num_video_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Merged visual tokens of one video: grid_t * grid_h * grid_w / merge_size**2."""
    t, h, w = (int(x) for x in grid_thw)
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise PromptError(f"video_grid_thw {(t, h, w)} must be positive with h, w divisible by merge_size={merge_size}")
    return t * h * w // merge_size**2


def expand_video_tokens(text: str, grid_thw: Sequence[int], merge_size: int = 2, *, qwen3: bool = False,
                        timestamps: Sequence[float] | None = None) -> str:
    """Replace the one `<|video_pad|>` of a rendered prompt by the number of tokens the vision tower emits.

    Qwen2/2.5-VL: `<|vision_start|>` + n * `<|video_pad|>` + `<|vision_end|>` with n = num_video_tokens(grid).
    Qwen3-VL (`qwen3=True`): one `<{t:.1f} seconds><|vision_start|>` + (h*w/merge²) pads + `<|vision_end|>`
    block per temporal patch, `timestamps[i]` seconds being the centre time of patch i (grid_t values).
    """
    slot = VISION_START + VIDEO_PAD + VISION_END
    if text.count(VIDEO_PAD) != 1 or text.count(slot) != 1:
        raise PromptError(f"expected exactly one {slot!r} in the rendered prompt, found {text.count(VIDEO_PAD)} "
                          f"{VIDEO_PAD!r}; does the chat template render {{'type': 'video'}} items?")
    n = num_video_tokens(grid_thw, merge_size)
    if not qwen3:
        return text.replace(slot, VISION_START + VIDEO_PAD * n + VISION_END)
    t = int(grid_thw[0])
    per_frame = n // t
    if timestamps is None or len(timestamps) != t:
        raise PromptError(f"Qwen3-VL prompts need one timestamp per temporal patch: grid_t={t}, got "
                          f"{None if timestamps is None else len(timestamps)}")
    blocks = "".join(f"<{float(s):.1f} seconds>" + VISION_START + VIDEO_PAD * per_frame + VISION_END
                     for s in timestamps)
    return text.replace(slot, blocks)


def render_prompt(tokenizer: Any, qa: Any, grid_thw: Sequence[int], *, style: str = "video_r1",
                  merge_size: int = 2, chat_template: str | None = None, qwen3: bool = False,
                  timestamps: Sequence[float] | None = None) -> str:
    """Full prompt text for one (question, variant): chat template + generation prompt, video slot expanded.

    `chat_template` overrides the tokenizer's (used when a checkpoint folder ships none).
    """
    messages = build_messages(qa, style)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=chat_template)
    return expand_video_tokens(text, grid_thw, merge_size, qwen3=qwen3, timestamps=timestamps)
