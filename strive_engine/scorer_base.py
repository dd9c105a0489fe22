"""What every frame scorer shares: the protocol keyframe sampling calls and the error it raises.

A leaf module so that the scorers (strive_engine.keyframes: policy, siglip, clip; strive_engine.learned_scorer:
the learned dual encoder) and the code that picks one can import it without importing each other.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from torch import Tensor


class ScorerError(ValueError):
    """The frame scorer cannot be built or used (missing folder, model without a vision tower, ...)."""


class FrameScorer(Protocol):
    """Embeds frames and questions into one space where cosine similarity means relevance."""

    def embed_frames(self, frames: Tensor) -> Tensor:  # uint8 (P, H, W, 3) -> (P, D)
        ...

    def embed_text(self, texts: Sequence[str]) -> Tensor:  # B strings -> (B, D)
        ...
