"""What a checkpoint holds on disk besides DCP's shards, and how it is read without trusting it.

- Small state is JSON: `trainer.json` (step, scheduler, data position, counters), `rng_rank{r}.json` (each rank's
  torch / CUDA / numpy / Python generator states, as integers), `config.json` (the run's configuration). Loading
  them never unpickles anything.
- DCP's own files are read through `SafeReader` / `SafeLoadPlanner`: its `.metadata` (a pickle, by DCP's format)
  through an unpickler that only builds DCP's metadata dataclasses, `torch.Size`, dtypes, layouts and paths, and
  its non-tensor items (optimizer hyper-parameters) with `torch.load(weights_only=True)` instead of DCP's default
  `weights_only=False`. A planted `__reduce__` payload therefore raises instead of running.
- `MANIFEST.json`: the size and SHA-256 of every file, written before `COMPLETE` and checked before a resume, so
  flipped bits and truncated shards are found before any byte is loaded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException as DCPError  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

MANIFEST = "MANIFEST.json"
_HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (damaged, missing, incompatible); the message names its folder."""


# ------------------------------------------------------------------------------------ JSON files


def write_json(path: Path, obj: Any) -> None:
    """Write atomically (temp file + rename) and fsync: a reader sees the whole file or none of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path, ckpt: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {path.name}: {e}") from None


def rng_state() -> dict[str, Any]:
    """This process's generator states as JSON-serialisable integers (exact)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ------------------------------------------------------------------------------------- manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


# Why a file fails its manifest entry (codes are all-reduced between ranks, so they are numbers).
ENTRY_OK, ENTRY_MISSING, ENTRY_SIZE, ENTRY_CHECKSUM = 0, 1, 2, 3
ENTRY_PROBLEMS = {ENTRY_MISSING: "is missing", ENTRY_SIZE: "has the wrong size (truncated or overwritten)",
                  ENTRY_CHECKSUM: "fails its SHA-256 check (its bytes changed after it was written)"}


def check_entry(ckpt: Path, rel: str, want: dict[str, Any]) -> int:
    """ENTRY_OK if `ckpt/rel` has the manifest's size and checksum, else the ENTRY_* code of the problem."""
    p = ckpt / rel
    if not p.is_file():
        return ENTRY_MISSING
    if p.stat().st_size != want.get("size"):
        return ENTRY_SIZE
    return ENTRY_OK if sha256_file(p) == want.get("sha256") else ENTRY_CHECKSUM


def read_manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    m = read_json(ckpt / MANIFEST, ckpt) if (ckpt / MANIFEST).is_file() else None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or not m["files"]:
        raise CheckpointError(f"checkpoint {ckpt}: no usable {MANIFEST} (written by an older engine, or damaged)")
    return m["files"]


# --------------------------------------------------------------------------------- DCP, read safely


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's `.metadata` is made of; any other global (os.system, eval, ...) is refused."""

    _DCP = {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")}
    _OTHER = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
              ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._DCP or (module, name) in self._OTHER:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of DCP's checkpoint metadata")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled with `_MetadataUnpickler` only. `refused` keeps the refusal:
    torch 2.11's dcp.load swallows read_metadata's errors (then fails on "metadata is None")."""

    refused: str | None = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            try:
                metadata = _MetadataUnpickler(fh).load()
            except pickle.UnpicklingError as e:
                self.refused = str(e)
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor items are read with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: dict, path: Path) -> None:
    """`dcp.load` through SafeReader and SafeLoadPlanner; every error names the checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    reader = SafeReader(str(path))
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointError:
        raise
    except (Exception, DCPError) as e:  # DCP wraps rank failures in its CheckpointException; name the folder
        why = f"its metadata: {reader.refused}" if reader.refused else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"checkpoint {path}: loading its DCP shards failed: {why}") from e
