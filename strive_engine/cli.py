"""The command line shared by the entry points (train, sft, evaluate): help that shows the values that will run,
user errors as one line with exit status 2, and the logging set-up.

    def main(argv=None) -> int:
        return run_main(_main, argv)        # user errors: one line (rank 0), exit 2; --debug: the traceback

    def _main(argv) -> int:
        cfg = config_from_cli(argv)         # --help: every option with its effective value; bad option: exit 2

User errors are the ones a user fixes by changing a file or an option: a bad option or value (ConfigError), a
missing or unreadable records file (RecordFileError), a bad model or tokenizer folder (ModelError,
TokenizerError, ScorerError), an unusable checkpoint (CheckpointError), and any OSError that names a file
(missing, unreadable, not a folder, no space). They print `<kind> error: <message>` and the process exits 2;
`--debug` or `STRIVE_DEBUG=1` lets the exception through with its traceback. Anything else is a bug of ours and
keeps its traceback.

Under torchrun every rank usually meets the same error. Rank 0 alone prints it; the other ranks wait
`PEER_GRACE_S` before exiting (torchrun stops them as soon as rank 0 has exited, so its line is never cut off
and rank 0 is the root cause in torchrun's report). A rank that is still alive after the grace period met an
error rank 0 did not, and prints its own line, prefixed with its rank.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import time
from typing import Callable

from strive_engine.config import (DEFAULT_RECIPE, SECTIONS, Config, ConfigError, _apply, build_config, load_config,
                                  load_recipe, parse_overrides, recipe_path)

PEER_GRACE_S = 5.0
DEBUG_FLAG = "--debug"


# --------------------------------------------------------------------------------------------- ranks


def process_rank() -> int:
    """This process's rank: the process group's when it is up, else torchrun's RANK (0 without torchrun)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def setup_logging(level: str = "INFO") -> None:
    """Rank 0 logs at `level`, the other ranks at WARNING; one handler on the root logger, so a record is
    printed once whatever logger it comes from."""
    rank = process_rank()
    logging.basicConfig(level=getattr(logging, level) if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")


# ---------------------------------------------------------------------------------------------- help


def _origin(section: str, fld: dataclasses.Field, value, recipe: str, from_recipe: dict, from_cli: dict) -> str:
    """Where a field's effective value comes from, for --help: '' when it is the code's default."""
    key = f"{section}.{fld.name}"
    default = fld.default
    if key in from_cli:
        was = f"recipe {from_recipe[section][fld.name]!r}, " if fld.name in from_recipe.get(section, {}) else ""
        return f"  [command line; {was}default {default!r}]"
    if fld.name in from_recipe.get(section, {}):
        return f"  [recipe {recipe}; default {default!r}]"
    if default is None and value is not None and section == "algorithm":
        return "  [from the preset]"
    return ""


def format_help(argv: list[str] | tuple[str, ...] = ()) -> str:
    """Every option with the value it takes under `argv`'s recipe and overrides (default: debug_cpu), marked
    `[recipe X; default D]` or `[command line; ...]` where it is not the code's default. Raises ConfigError
    for a bad recipe or override (the same as a run would)."""
    recipe, overrides, _ = parse_overrides([a for a in argv if a not in ("--help", "-h", DEBUG_FLAG)])
    from_recipe = load_recipe(recipe)
    raw, from_cli = copy.deepcopy(from_recipe), {}
    for key, value in overrides:
        section, _, name = key.partition(".")
        _apply(raw, section, name, value, "command line")
        from_cli[key] = value
    cfg: Config = build_config(raw)
    lines = [f"options: --recipe NAME|PATH.toml (default {DEFAULT_RECIPE}), then any --section.field=VALUE "
             f"(or --section.field VALUE); {DEBUG_FLAG} (or STRIVE_DEBUG=1) shows the traceback of an error.",
             f"Values shown are the ones that run with --recipe {recipe} ({recipe_path(recipe)}) and the options "
             f"given: [recipe ...] = set by the recipe, [command line ...] = set on the command line, "
             f"[from the preset] = taken from algorithm.preset; unmarked = the code's default."]
    for section, cls in SECTIONS.items():
        lines.append(f"\n[{section}]  {(cls.__doc__ or '').strip()}")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            mark = _origin(section, f, value, recipe, from_recipe, from_cli)
            lines.append(f"  --{section}.{f.name}={value!r}{mark}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def config_from_cli(argv: list[str] | None = None) -> Config:
    """For entry points: `--help` prints every option with its effective value (rank 0) and exits 0; a bad
    option or value prints the ConfigError (rank 0) and exits 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        if "--help" in argv or "-h" in argv:
            text = format_help(argv)
            if process_rank() == 0:
                print(text)
            raise SystemExit(0)
        return load_config(argv)
    except ConfigError as e:
        if debug:
            raise
        raise SystemExit(report_user_error(e)) from None


# -------------------------------------------------------------------------------------------- errors


def debug_requested(argv: list[str] | None = None) -> bool:
    """`--debug` on the command line or STRIVE_DEBUG set to anything but '' / '0'."""
    return DEBUG_FLAG in (argv or ()) or os.environ.get("STRIVE_DEBUG", "") not in ("", "0")


def user_error_kind(e: BaseException) -> str | None:
    """'config', 'data', ... for an error the user fixes (see the module docstring); None for anything else."""
    from strive_engine.checkpoint_io import CheckpointError
    from strive_engine.data import RecordFileError
    from strive_engine.keyframes import ScorerError
    from strive_engine.model import ModelError
    from strive_engine.tokenizer import TokenizerError

    kinds = ((ConfigError, "config"), (RecordFileError, "data"), (ModelError, "model"), (TokenizerError, "tokenizer"),
             (ScorerError, "scorer"), (CheckpointError, "checkpoint"))
    for cls, kind in kinds:
        if isinstance(e, cls):
            return kind
    if isinstance(e, OSError) and e.filename is not None:
        return "file"
    return None


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{names}: {e.strerror}"
    return str(e)


def report_user_error(e: BaseException) -> int:
    """Print `<kind> error: <message>` on stderr (rank 0; another rank only after PEER_GRACE_S, see the module
    docstring) and return the exit status, 2."""
    kind = user_error_kind(e) or "error"
    hint = "" if kind == "config" else f" ({DEBUG_FLAG} or STRIVE_DEBUG=1 shows the traceback)"
    rank = process_rank()
    if rank != 0:
        time.sleep(PEER_GRACE_S)  # torchrun ends this process here when rank 0 exits with the same error
    prefix = "" if rank == 0 else f"[rank{rank}] "
    print(f"{prefix}{kind} error: {_message(e)}{hint}", file=sys.stderr, flush=True)
    return 2


def run_main(body: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run an entry point's `body(argv)`. A user error prints one line (see `report_user_error`), tears the
    process group down without a barrier and returns 2; with --debug / STRIVE_DEBUG=1 it propagates."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    try:
        return body([a for a in argv if a != DEBUG_FLAG])
    except Exception as e:  # noqa: BLE001  (sorted below: user errors get a line, the rest their traceback)
        if debug or user_error_kind(e) is None:
            raise
        status = report_user_error(e)
        from strive_engine.parallel import destroy_distributed

        destroy_distributed(sync=False)  # a barrier could wait for a rank that already left
        return status
