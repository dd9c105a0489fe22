"""Checkpoints with torch.distributed.checkpoint, exact resume, and the final HF export.

Layout of one checkpoint (`<output_dir>/checkpoints/step_000040/`):
    .metadata, *.distcp   model + optimizer, sharded as FSDP2 holds them (DCP; any world size can load)
    trainer.pt            step, scheduler, data position, counters — identical on every rank, written by rank 0
    rng_rank{r}.pt        each rank's torch / numpy / python RNG state
    ref/                  the frozen KL reference policy, DCP (only when algorithm.beta > 0)
    COMPLETE              written last, after every rank finished: a checkpoint without it (a run killed while
                          saving) is ignored by `latest()`
"""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from strive_engine.parallel import DistEnv, barrier, gather_full_state_dict

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, root_dir: str | Path, env: DistEnv, keep: int = 2):
        self.dir = Path(root_dir)
        self.env = env
        self.keep = keep

    def _steps(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "COMPLETE").exists():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self._steps()
        return steps[-1][1] if steps else None

    def save(self, step: int, root: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             ref_root: nn.Module | None = None) -> Path:
        """All ranks call this. `ref_root`: the frozen KL reference, saved under `ref/` (exact resume)."""
        path = self.dir / f"step_{step:06d}"
        if self.env.is_main:
            if path.exists():  # a partial save of the same step from a killed run
                shutil.rmtree(path)
            path.mkdir(parents=True)
        barrier()
        msd, osd = get_state_dict(root, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
        if ref_root is not None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            dcp.save(get_model_state_dict(ref_root), checkpoint_id=str(path / "ref"))
        torch.save(_rng_state(), path / f"rng_rank{self.env.rank}.pt")
        if self.env.is_main:
            torch.save(trainer_state, path / "trainer.pt")
        barrier()
        if self.env.is_main:
            (path / "COMPLETE").write_text(f"step {step}\n")
            for _, old in self._steps()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        log.info("saved checkpoint %s", path)
        return path

    def load(self, path: Path, root: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        msd, osd = get_state_dict(root, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / f"rng_rank{self.env.rank}.pt"
        if rng.exists():  # absent when resuming on a larger world: fresh per-rank streams then
            _set_rng_state(torch.load(rng, weights_only=False))
        trainer_state = torch.load(path / "trainer.pt", weights_only=False)
        log.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state


def export_hf(root: nn.Module, hf_model: nn.Module, tokenizer, out_dir: str | Path, env: DistEnv) -> Path | None:
    """Write an HF-loadable folder (config, safetensors weights, tokenizer) from the sharded policy.

    Every rank takes part in gathering the full state dict; rank 0 writes. The model is rebuilt on the meta
    device and the gathered tensors are assigned to it, so rank 0 holds one copy of the weights, not two.
    """
    sd = gather_full_state_dict(root)
    out = Path(out_dir)
    if env.is_main:
        config = hf_model.config
        with torch.device("meta"):
            fresh = type(hf_model)(config)
        missing, unexpected = fresh.load_state_dict(sd, strict=False, assign=True)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"HF export: state dict mismatch, missing={sorted(set(missing) - tied)[:5]} "
                               f"unexpected={sorted(unexpected)[:5]}")
        if tied:
            fresh.tie_weights()
        out.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        log.info("exported HF model to %s", out)
    barrier()
    return out if env.is_main else None
