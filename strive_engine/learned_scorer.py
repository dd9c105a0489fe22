"""A small learned frame scorer: a dual encoder (frame <-> question text) for question-aware keyframes.

There are no SigLIP/CLIP weights offline, and the `policy` scorer of the tiny model is an untrained vision tower
compared with mean token embeddings: noise. This one is trained contrastively on a records file's train split
(`python -m strive_engine.scorer_train`, minutes on a CPU) and saved as a local folder that
`keyframes.scorer=learned` + `keyframes.scorer_path=<folder>` loads through `build_scorer`, like siglip/clip:

    scorer = LearnedScorer.load("runs/scorer")          # or keyframes.build_scorer(cfg) with scorer = "learned"
    f = scorer.embed_frames(frames)                      # uint8 (P, H, W, 3) -> float32 (P, D), unit norm
    q = scorer.embed_text(["How many times does the small red square flash?"])   # (B, D), unit norm

Frame tower: each frame squashed to image_size^2 (antialiased bilinear), four convolutions (two 2x2 of stride 2,
two 3x3) and a global *max* pool, so a small object anywhere in the frame can fire a feature; a linear head to D.
Text tower: lower-case words (the training questions' vocabulary, others -> <unk>), mean of word embeddings, a
two-layer MLP to D. Cosine of the two is the relevance `strive_kernels.keyframe_sample` turns into importance;
training uses the sampler's own temperature, so softmax(cos / tau) over a pool is what the loss shaped.

Folder: config.json (model_type "strive_learned_scorer", sizes, what it was trained on), vocab.json (word -> id),
model.safetensors (float32).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from strive_engine.scorer_base import ScorerError

MODEL_TYPE = "strive_learned_scorer"
FORMAT_VERSION = 1
PAD, UNK = 0, 1
MAX_WORDS = 32
_WORD = re.compile(r"[a-z]+")


class LearnedScorerError(ScorerError):
    """A learned scorer folder is missing, incomplete or of another kind; the message names the file."""


def words(text: str) -> list[str]:
    """Lower-case alphabetic words of a question ("What colour is the small circle?" -> what, colour, ...)."""
    return _WORD.findall(text.lower())


def build_vocab(texts: Sequence[str]) -> dict[str, int]:
    """word -> id over `texts` (sorted, so the same texts give the same ids); 0 = padding, 1 = unknown word."""
    vocab = {"<pad>": PAD, "<unk>": UNK}
    for w in sorted({w for t in texts for w in words(t)}):
        vocab[w] = len(vocab)
    return vocab


@dataclass
class DualEncoderConfig:
    """Sizes of the two towers (stored in config.json)."""

    vocab_size: int
    image_size: int = 56
    channels: tuple[int, ...] = (32, 64, 64, 64)
    embed_dim: int = 64
    text_hidden: int = 64
    temperature: float = 0.1  # the softmax temperature the training loss used (keyframes.temperature)
    trained_on: dict = field(default_factory=dict)  # records file, counts, training settings, test recall

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise LearnedScorerError(f"channels must be 4 positive widths, got {self.channels}")
        if self.vocab_size < 2 or self.image_size < 16 or self.embed_dim < 1 or self.text_hidden < 1:
            raise LearnedScorerError(f"bad sizes: vocab_size={self.vocab_size} (>= 2), image_size={self.image_size} "
                                     f"(>= 16), embed_dim={self.embed_dim}, text_hidden={self.text_hidden} (>= 1)")


class FrameTower(nn.Module):
    """float (N, 3, S, S) normalised frames -> (N, D) unit vectors."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        c1, c2, c3, c4 = cfg.channels
        # Two 2x2 stride-2 "patch" convolutions (plain matmuls: 2-3x faster on a CPU than 3x3 ones at full size),
        # then two 3x3 at S/4: a 20-pixel receptive field at S = 56, where the small family's shapes are ~10 px.
        self.convs = nn.ModuleList([nn.Conv2d(3, c1, 2, 2), nn.Conv2d(c1, c2, 2, 2),
                                    nn.Conv2d(c2, c3, 3, 1, 1), nn.Conv2d(c3, c4, 3, 1, 1)])
        self.head = nn.Linear(c4, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = TF.relu(conv(x))                     # (N, C, S', S')
        x = x.amax(dim=(2, 3))                       # (N, C): max over positions, a small object anywhere counts
        return TF.normalize(self.head(x), dim=-1)    # (N, D)


class TextTower(nn.Module):
    """int64 (B, L) word ids (0 = padding) -> (B, D) unit vectors."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.text_hidden, padding_idx=PAD)
        self.mlp = nn.Sequential(nn.Linear(cfg.text_hidden, cfg.text_hidden), nn.ReLU(),
                                 nn.Linear(cfg.text_hidden, cfg.embed_dim))

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != PAD).unsqueeze(-1).float()                           # (B, L, 1)
        mean = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B, hidden)
        return TF.normalize(self.mlp(mean), dim=-1)                         # (B, D)


class DualEncoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.frame = FrameTower(cfg)
        self.text = TextTower(cfg)


# Frames are normalised to roughly zero mean, unit spread on the synthetic sets' dark backgrounds.
_MEAN, _STD = 0.5, 0.25


def resize_frames(frames: Tensor, image_size: int) -> Tensor:
    """uint8 (P, H, W, 3) -> uint8 (P, S, S, 3): squashed to S x S (antialiased bilinear), rounded to 8 bits, so a
    training set can keep its frames at the tower's size and see exactly what inference sees."""
    if not isinstance(frames, Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        desc = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, Tensor) else type(frames).__name__
        raise LearnedScorerError(f"frames must be uint8 (P, H, W, 3), got {desc}")
    if tuple(frames.shape[1:3]) == (image_size, image_size):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = TF.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def preprocess_frames(frames: Tensor, image_size: int) -> Tensor:
    """uint8 (P, H, W, 3) -> float32 (P, 3, S, S): resize_frames, then normalised."""
    x = resize_frames(frames, image_size).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


def encode_texts(texts: Sequence[str], vocab: dict[str, int]) -> Tensor:
    """B strings -> int64 (B, L) word ids, right-padded with 0, at most MAX_WORDS words each."""
    ids = [[vocab.get(w, UNK) for w in words(t)][:MAX_WORDS] for t in texts]
    out = torch.zeros(len(ids), max(1, max((len(x) for x in ids), default=1)), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return out


def save_scorer(model: DualEncoder, vocab: dict[str, int], folder: str | Path) -> Path:
    """Write config.json, vocab.json and model.safetensors to `folder` (created); returns the folder."""
    from safetensors.torch import save_file

    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0))
    cfg = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, **asdict(model.cfg)}
    cfg["channels"] = list(model.cfg.channels)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))  # last: its presence means the folder is complete
    return out


class LearnedScorer:
    """keyframes' FrameScorer over a saved DualEncoder folder (embed_frames / embed_text, eval mode, no grad)."""

    def __init__(self, model: DualEncoder, vocab: dict[str, int], frames_per_call: int = 256):
        self.model = model.eval()
        self.vocab = vocab
        self.frames_per_call = int(frames_per_call)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> LearnedScorer:
        folder = Path(path).expanduser() if path else None
        if folder is None or not folder.is_dir():
            raise LearnedScorerError(f"keyframes.scorer_path={str(path)!r}: no such folder (train one with "
                                     f"python -m strive_engine.scorer_train)")
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise LearnedScorerError(f"{folder / 'config.json'}: missing or unreadable ({e})") from None
        if raw.get("model_type") != MODEL_TYPE:
            raise LearnedScorerError(f"{folder / 'config.json'}: model_type is {raw.get('model_type')!r}, not "
                                     f"{MODEL_TYPE!r} (a siglip/clip folder needs keyframes.scorer=siglip|clip)")
        if raw.get("format_version") != FORMAT_VERSION:
            raise LearnedScorerError(f"{folder / 'config.json'}: format_version {raw.get('format_version')!r}, "
                                     f"this engine reads {FORMAT_VERSION}")
        fields = {k: raw[k] for k in DualEncoderConfig.__dataclass_fields__ if k in raw}
        try:
            cfg = DualEncoderConfig(**fields)
            vocab = json.loads((folder / "vocab.json").read_text())
        except (OSError, ValueError, TypeError) as e:
            raise LearnedScorerError(f"{folder}: bad config.json or vocab.json ({e})") from None
        if len(vocab) != cfg.vocab_size:
            raise LearnedScorerError(f"{folder / 'vocab.json'}: {len(vocab)} words, config.json says {cfg.vocab_size}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model = DualEncoder(cfg)
        try:
            state = load_file(str(folder / "model.safetensors"))
            model.load_state_dict(state)
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            raise LearnedScorerError(f"{folder / 'model.safetensors'}: cannot load the weights ({e})") from None
        if device is not None:
            model.to(device)
        return cls(model, vocab)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_frames(self, frames: Tensor) -> Tensor:
        """uint8 (P, H, W, 3) -> float32 (P, D), unit norm; frames_per_call at a time."""
        S = self.model.cfg.image_size
        out = []
        for p0 in range(0, frames.shape[0], self.frames_per_call):
            x = preprocess_frames(frames[p0:p0 + self.frames_per_call].to(self.device), S)
            out.append(self.model.frame(x))
        if not out:  # an empty pool: (0, D), as the tower would give
            _ = preprocess_frames(frames, S)  # still validates the input
            return torch.zeros(0, self.model.cfg.embed_dim, device=self.device)
        return torch.cat(out).float()

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """B strings -> float32 (B, D), unit norm."""
        return self.model.text(encode_texts(list(texts), self.vocab).to(self.device)).float()
