"""Checkpoints with torch.distributed.checkpoint (saved asynchronously), verified exact resume, the HF export.

Layout of one checkpoint (`<output_dir>/checkpoints/step_000040/`):
    .metadata, *.distcp   model + optimizer (+ the frozen KL reference under "ref" when algorithm.beta > 0),
                          sharded as FSDP2 holds them (DCP; any world size can load)
    trainer.json          step, scheduler, data position, counters (rank 0)
    rng_rank{r}.json      each rank's torch / CUDA / numpy / Python generator states, as integers
    config.json           the run's whole configuration
    MANIFEST.json         size and SHA-256 of every file above, written once every rank's files are on disk
    COMPLETE              written last, after the manifest: a checkpoint without it (a run killed while saving) is
                          ignored
Nothing here is a pickle except DCP's `.metadata`, which is read by a restricted unpickler (checkpoint_io).

Saving (`checkpoint.async_save`, default on): the step stalls only while DCP stages a CPU copy of the state;
the shards are written, hashed into the manifest and marked COMPLETE on a background thread with its own gloo
process group, so its collectives never interleave with training's. One save is in flight at a time: the next
`save()` (or `wait()` / `close()`) waits for the previous one and re-raises its error.

Resuming (`checkpoint.resume`): `false` starts afresh; `true` resumes or fails with a clear error; `auto` resumes
when there is a complete checkpoint and starts afresh otherwise. The newest complete checkpoint is verified
against its manifest (ranks split the files); a damaged one is renamed `step_N.damaged` with a warning that names
the damaged file, and the previous one is tried. The saved configuration is compared with the current one: a
change to any field that shapes the model, the data order or the algorithm fails with the list of differences,
unless allowed by `checkpoint.allow_changes`. Every error names the checkpoint folder.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import logging
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from strive_engine.checkpoint_io import (ENTRY_PROBLEMS, MANIFEST, CheckpointError, DCPError, check_entry, dcp_load,
                                         file_entry, read_json, read_manifest, rng_state, set_rng_state, write_json)
from strive_engine.parallel import DistEnv, all_reduce, barrier, gather_full_state_dict
from strive_engine.trained_settings import checkpoint_config_value, save_settings
from strive_engine.views import VisionGeometry

if TYPE_CHECKING:
    from strive_engine.trainer import Trainer

__all__ = ["Checkpointer", "CheckpointError", "ResumePoint", "config_differences", "export_hf", "RESUME_FREE",
           "trainer_state"]

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_PART = ".manifest.rank{}.json"

# Fields that change neither the model, the data order nor the algorithm: a resume may change them freely.
# Every other field must match the checkpoint's config.json unless listed in checkpoint.allow_changes.
RESUME_FREE = ("run.name", "run.output_dir", "checkpoint.*", "logging.*", "eval.*", "data.eval_path",
               "data.max_empty_steps", "video.prefetch_batches", "video.decode_threads", "video.decode_workers",
               "parallel.activation_checkpointing", "parallel.memory_budget_gib")  # recomputing is exact


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    path: Path
    step: int
    trainer_state: dict


def _flat(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.items() for k, v in sec.items()}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def config_differences(saved: dict, current: dict, allowed: Iterable[str] = ()) -> list[str]:
    """`section.field: saved -> current` for every field that differs and is neither in RESUME_FREE nor allowed.
    A field on one side only is not compared: one the engine gained after the checkpoint was written, or one it
    dropped (an option it never read, e.g. parallel.fsdp)."""
    a, b = _flat(saved), _flat(json.loads(json.dumps(current)))
    allowed = tuple(allowed)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys())
            if not _matches(k, RESUME_FREE) and not _matches(k, allowed) and a[k] != b[k]]


def _state(root: nn.Module, optimizer: torch.optim.Optimizer, ref_root: nn.Module | None) -> dict[str, Any]:
    """What DCP saves and loads, sharded as FSDP2 holds it: "model", "optim", and "ref" (the KL reference)."""
    msd, osd = get_state_dict(root, optimizer)
    state = {"model": msd, "optim": osd}
    if ref_root is not None:
        state["ref"] = get_model_state_dict(ref_root)
    return state


class _DeviceWriter(dcp.FileSystemWriter):
    """DCP's async writer thread on this rank's device: a fresh thread's CUDA device is cuda:0, and torch 2.11 frees
    (cudaHostUnregister) the pinned staging buffers on that thread; every rank's calls there opened a context on
    GPU 0."""

    def __init__(self, path: str, *, device: torch.device, **kw: Any):
        super().__init__(path, **kw)
        self._device = device

    def write_data(self, plan, planner):
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        return super().write_data(plan, planner)


class Checkpointer:
    """Saves and finds checkpoints under `root_dir`. Every rank constructs it (it creates a process group)."""

    def __init__(self, root_dir: str | Path, env: DistEnv, keep: int = 2, *, async_save: bool = False,
                 config: dict | None = None):
        self.dir = Path(root_dir)
        self.env = env
        self.keep = keep
        self.async_save = async_save
        self.config = config or {}
        # A gloo group of its own: DCP's background collectives must not interleave with training's (and async
        # staging needs a CPU backend under NCCL).
        self._pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._stager = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    # ------------------------------------------------------------------------------------ listing

    def _steps(self) -> list[tuple[int, Path]]:
        """(step, folder) of the complete checkpoints, oldest first."""
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

    # ------------------------------------------------------------------------------------- saving

    def _get_stager(self):
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            # Synchronous staging (the step waits for the copy, so the snapshot is consistent); pinned buffers
            # and non-blocking copies on CUDA. The stager keeps its buffers between saves.
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        return self._stager

    def _drop_closed_stager(self) -> None:
        """torch 2.11's DefaultStager closes its state-dict stager after every stage, which empties the copier
        table the next stage needs: the second save of an FSDP2 model failed with `KeyError: <class 'type'>` on its
        DTensors' placements. Such a stager is not reused (2.11 drops its pinned buffers after each stage anyway);
        later torch versions keep it, and with it their buffers."""
        inner = getattr(self._stager, "_state_dict_stager", None)
        if inner is not None and getattr(inner, "_deepcopy_dispatch", None) == {}:
            self._stager.close()
            self._stager = None

    def save(self, step: int, root: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             ref_root: nn.Module | None = None) -> Path:
        """All ranks call this. Returns once the state is staged (async) or written (sync); COMPLETE follows
        when the background part finishes. `ref_root`: the frozen KL reference, saved under the key "ref"."""
        self.wait()
        path = self.dir / f"step_{step:06d}"
        if self.env.is_main:
            if path.exists():  # a partial save of the same step from a killed run, or a damaged one
                shutil.rmtree(path)
            path.mkdir(parents=True)
        barrier()
        state = _state(root, optimizer, ref_root)
        small = {f"rng_rank{self.env.rank}.json": rng_state()}
        if self.env.is_main:
            small["trainer.json"] = trainer_state
            small["config.json"] = self.config
        # A JSON copy taken now: fails here, in the step, if something is not JSON, and later steps cannot change it.
        small = json.loads(json.dumps(small, allow_nan=False))
        # per_thread_copy_ahead=0: the state is on the CPU already (staged, or a sync save's writer on this
        # thread); DCP's overlapping loader would sync CUDA streams from its own thread, whose device is cuda:0.
        writer = _DeviceWriter(str(path), device=self.env.device, per_thread_copy_ahead=0) if self.async_save \
            else dcp.FileSystemWriter(str(path))
        try:
            if self.async_save:
                upload = dcp.async_save(state, storage_writer=writer, process_group=self._pg,
                                        async_stager=self._get_stager())
                self._drop_closed_stager()
            else:
                upload = Future()
                upload.set_result(dcp.save(state, storage_writer=writer))
        except (Exception, DCPError) as e:
            raise CheckpointError(f"checkpoint {path}: saving failed: {type(e).__name__}: {e}") from e
        self._pending = self._executor.submit(self._finalize, path, step, upload, small)
        if not self.async_save:
            self.wait()
        return path

    def _finalize(self, path: Path, step: int, upload: Future, small: dict[str, Any]) -> None:
        """Background: wait for the shards, write the small files, hash this rank's files, then rank 0 writes
        MANIFEST.json and COMPLETE and prunes old checkpoints."""
        try:
            metadata = upload.result()
            for name, obj in small.items():
                write_json(path / name, obj)
            # This rank's files: its DCP shards (DCP names them __{rank}_*), the small files it wrote, and on
            # rank 0 DCP's .metadata.
            r = self.env.rank
            # DCP's metadata lists the shards where the torch version returns it; torch 2.11's async_save
            # resolves its future to None (seen on the H200), so the folder is the fallback.
            storage = getattr(metadata, "storage_data", None)
            shards = sorted({info.relative_path for info in storage.values()}) if storage else \
                sorted(f.name for f in path.glob(f"__{r}_*.distcp"))
            mine = [s for s in shards if s.startswith(f"__{r}_")] + sorted(small)
            if self.env.is_main:
                mine.append(".metadata")
            write_json(path / _PART.format(r), {rel: file_entry(path / rel) for rel in mine})
            self._barrier()
            if self.env.is_main:
                files: dict[str, Any] = {}
                for k in range(self.env.world_size):
                    files.update(read_json(path / _PART.format(k), path))
                for rel in sorted((set(shards) | {f.name for f in path.glob("*.distcp")}) - files.keys()):
                    files[rel] = file_entry(path / rel)  # only a shard no rank listed: each file is hashed once
                write_json(path / MANIFEST, {"step": step, "files": dict(sorted(files.items()))})
                for k in range(self.env.world_size):
                    (path / _PART.format(k)).unlink()
                write_json(path / "COMPLETE", {"step": step})
                for _, old in self._steps()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
                log.info("saved checkpoint %s", path)
            self._barrier()
        except CheckpointError:
            raise
        except (Exception, DCPError) as e:
            raise CheckpointError(f"checkpoint {path}: saving failed: {type(e).__name__}: {e}") from e

    def _barrier(self) -> None:
        if self._pg is not None:
            dist.barrier(group=self._pg)

    def wait(self) -> None:
        """Block until the save in flight (if any) is COMPLETE; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, wait: bool = True) -> None:
        """Release the background thread and staging buffers; `wait=False` on error paths (a peer that died
        would keep a pending save's barrier waiting)."""
        try:
            if wait:
                self.wait()
        finally:
            self._executor.shutdown(wait=wait, cancel_futures=not wait)
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    # ------------------------------------------------------------------------------------ resuming

    def verify(self, path: Path) -> list[str]:
        """Problems of `path` against its manifest ([] = intact). Collective: ranks split the files."""
        try:
            files = read_manifest(path)
        except CheckpointError as e:
            return [str(e)]
        names = sorted(files)
        codes = torch.zeros(len(names))  # ENTRY_* per file
        for i in range(self.env.rank, len(names), self.env.world_size):
            codes[i] = float(check_entry(path, names[i], files[names[i]]))
        all_reduce(codes, "max")
        return [f"{names[i]} {ENTRY_PROBLEMS[int(c)]}" for i, c in enumerate(codes.tolist()) if c]

    def find_resume(self, mode: str, allow_changes: Iterable[str] = ()) -> ResumePoint | None:
        """The checkpoint to resume from under `checkpoint.resume=mode` (false | true | auto), or None to start
        afresh. Collective (all ranks reach the same answer). Raises CheckpointError with the reason."""
        if mode == "false":
            return None
        candidates = self._steps()
        if not candidates:
            partial = sorted(p.name for p in self.dir.glob("step_*")) if self.dir.is_dir() else []
            found = f" (only incomplete ones: {', '.join(partial)})" if partial else ""
            if mode == "true":
                raise CheckpointError(f"checkpoint.resume=true, but {self.dir} holds no complete checkpoint{found}; "
                                      "use checkpoint.resume=auto to start afresh when there is none")
            log.info("checkpoint.resume=auto: no complete checkpoint in %s%s; starting afresh", self.dir, found)
            return None
        damaged: list[tuple[Path, list[str]]] = []
        for step, path in reversed(candidates):
            problems = self.verify(path)
            if problems:
                if self.env.is_main:  # every rank reached the same verdict; one says it
                    log.warning("checkpoint %s is damaged: %s; trying the previous one", path, "; ".join(problems))
                damaged.append((path, problems))
                continue
            state = read_json(path / "trainer.json", path)
            saved_cfg = read_json(path / "config.json", path)
            diffs = config_differences(saved_cfg, self.config, allow_changes)
            if diffs:
                fields = ",".join(d.split(":")[0] for d in diffs)
                raise CheckpointError(f"checkpoint {path} was written with another configuration; these fields "
                                      f"differ (saved -> now): {'; '.join(diffs)}. Resume with the saved values, "
                                      f"or allow the change with --checkpoint.allow_changes={fields}")
            self._set_aside(damaged)
            log.info("resuming from checkpoint %s (step %d)%s", path, step,
                     f"; skipped damaged {', '.join(str(p) for p, _ in damaged)}" if damaged else "")
            return ResumePoint(path, int(state["step"]), state)
        raise CheckpointError("every complete checkpoint is damaged: " + " | ".join(
            f"{p}: {'; '.join(probs)}" for p, probs in damaged))

    def _set_aside(self, damaged: list[tuple[Path, list[str]]]) -> None:
        """Rename damaged checkpoints to step_N.damaged (kept for inspection, out of every listing)."""
        if self.env.is_main:
            for path, _ in damaged:
                dest, n = path.with_name(path.name + ".damaged"), 1
                while dest.exists():
                    dest, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
                path.rename(dest)
                log.warning("moved damaged checkpoint %s to %s", path, dest)
        barrier()

    def load(self, point: ResumePoint, root: nn.Module, optimizer: torch.optim.Optimizer,
             ref_root: nn.Module | None = None) -> dict:
        """Model, optimizer, the frozen KL reference (`ref_root`, key "ref") and this rank's RNG from `point`;
        returns its trainer state."""
        state = _state(root, optimizer, ref_root)
        dcp_load(state, point.path)
        set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if ref_root is not None:
            set_model_state_dict(ref_root, state["ref"])
        rng = point.path / f"rng_rank{self.env.rank}.json"
        if rng.exists():  # absent when resuming on a larger world: fresh per-rank streams then
            try:
                set_rng_state(read_json(rng, point.path))
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"checkpoint {point.path}: {rng.name} is not a valid RNG state: {e}") from None
        log.info("resumed from %s (step %d)", point.path, point.step)
        return point.trainer_state


    # --------------------------------------------------------------------------------- the trainer

    def save_trainer(self, step: int, t: Trainer, data_position: dict) -> Path:
        """Everything a run resumes from after `step` steps: the policy, AdamW, the KL reference when there is
        one, trainer.json (`trainer_state`) and the RNG. `data_position`: the loader state at the next batch
        the trainer consumes (the prefetcher's `state_dict()`: the loader itself reads ahead)."""
        ref = t.reference.root if t.reference is not None else None
        return self.save(step, t.root, t.optim.optimizer, trainer_state(t, step, data_position), ref_root=ref)

    def resume(self, point: ResumePoint, t: Trainer) -> int:
        """Load `point` into the built trainer `t` (model, AdamW, reference, schedule, counters, data position,
        RNG); returns the step to continue from."""
        ref = t.reference.root if t.reference is not None else None
        st = self.load(point, t.root, t.optim.optimizer, ref_root=ref)
        t.optim.load_state_dict(st)
        t.loader.load_state_dict(st["loader"])
        return int(st["step"])


def trainer_state(t: Trainer, step: int, data_position: dict) -> dict:
    """trainer.json: the step, the RL schedule and non-finite skip count, the data position."""
    optim = t.optim.state_dict()
    return {"step": step, "scheduler": optim["scheduler"], "loader": data_position,
            "nonfinite_skips": optim["nonfinite_skips"]}


# Files an export copies from its source checkpoint, byte for byte: tokenizer, processor and chat-template files,
# and the generation config (Qwen's second EOS id 151643, its pad id and sampling defaults live only there).
EXPORT_COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
                 "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                 "generation_config.json")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def source_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's config.json declares (`torch_dtype`, or `dtype` as transformers 5 writes it)."""
    name = checkpoint_config_value(folder, "torch_dtype", "dtype")
    return _DTYPES.get(str(name).replace("torch.", ""))


def export_dtype(choice: str, source: str, trained: torch.dtype) -> torch.dtype:
    """checkpoint.export_dtype -> the dtype written: "source" = the source checkpoint's (its config.json), or
    the trained weights' dtype for a random-weight model; else the named dtype."""
    if choice != "source":
        return _DTYPES[choice]
    return (source_dtype(source) if source else None) or trained


def _write_processor_config(out: Path, hf_model: nn.Module, settings) -> None:
    """A random-weight model has no source to copy from: write the Qwen2-VL image processor config its vision
    tower and the run's pixel bounds imply, so AutoImageProcessor loads the export like a hub checkpoint."""
    g = VisionGeometry.from_config(hf_model.config)
    pixels = settings.variants if settings is not None else None
    cfg = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": g.patch,
           "temporal_patch_size": g.temporal_patch, "merge_size": g.merge,
           "image_mean": list(g.mean), "image_std": list(g.std),
           "min_pixels": int(pixels.min_pixels) if pixels else 3136,
           "max_pixels": int(pixels.max_pixels) if pixels else 12845056}
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def export_hf(root: nn.Module, hf_model: nn.Module, tokenizer, out_dir: str | Path, env: DistEnv, *,
              source: str = "", dtype: str = "source", settings=None) -> Path | None:
    """Write an HF checkpoint folder from the sharded policy that loads as its source did.

    `source`: the checkpoint the run started from (model.path; "" for a random-weight model). The folder gets:
    - the weights as safetensors in `dtype` (checkpoint.export_dtype; "source" keeps the source's dtype, e.g.
      bf16 for Qwen's releases, rounding the trained fp32 master weights to nearest), under the model class's own
      key names; with tied embeddings lm_head.weight is not written (the embedding is the head, as in the source);
    - config.json (the source's architecture and ids; `dtype` the one written);
    - every tokenizer, processor and template file of the source, and its generation_config.json, byte for byte
      (EXPORT_COPIED); a random-weight model gets its tokenizer's files, its generation config and a Qwen2-VL
      preprocessor_config.json;
    - strive_settings.json: the run's effective configuration (`settings`, a Config), read back by evaluate
      (strive_engine.trained_settings).
    Files of an earlier export in the folder are replaced; other entries (an `eval/` folder) are left alone.

    Every rank takes part in gathering the full state dict; rank 0 writes. The model is rebuilt on the meta
    device and the gathered tensors are assigned to it, so rank 0 holds one copy of the weights, not two.
    """
    sd = gather_full_state_dict(root)
    out = Path(out_dir)
    if env.is_main:
        config = copy.deepcopy(hf_model.config)  # the export's dtype goes into it, not into the live model's
        tied = bool(getattr(config, "tie_word_embeddings", False))
        trained = next(iter(sd.values())).dtype if sd else torch.float32
        want = export_dtype(dtype, source, trained)
        if tied:  # one tensor for both, as in the source: the head is the embedding
            sd = {k: v for k, v in sd.items() if not k.endswith("lm_head.weight")}
        sd = {k: v.to(want) if v.is_floating_point() else v for k, v in sd.items()}
        with torch.device("meta"):
            fresh = type(hf_model)(config)
        missing, unexpected = fresh.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
        if missing or unexpected:
            raise RuntimeError(f"HF export: state dict mismatch, missing={sorted(missing)[:5]} "
                               f"unexpected={sorted(unexpected)[:5]}")
        if tied:
            fresh.tie_weights()
        for c in {id(c): c for c in (fresh.config, fresh.config.get_text_config(),
                                     getattr(fresh.config, "vision_config", None)) if c is not None}.values():
            c.dtype = want  # config.json says what the files hold
        fresh.generation_config = hf_model.generation_config
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
            old.unlink()  # an earlier export's shards would otherwise sit beside the new ones
        fresh.save_pretrained(out, safe_serialization=True)
        src = Path(source).expanduser() if source else None
        copied = [n for n in EXPORT_COPIED if src is not None and (src / n).is_file()]
        for name in copied:
            shutil.copyfile(src / name, out / name)
        if src is None:
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
            _write_processor_config(out, hf_model, settings)
        if settings is not None:
            save_settings(settings, out)
        log.info("exported HF model to %s (%s%s%s)", out, str(want).replace("torch.", ""),
                 ", tied embeddings" if tied else "", f"; copied from {src}: {', '.join(copied)}" if copied else "")
    barrier()
    return out if env.is_main else None
