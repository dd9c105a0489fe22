"""Stage 1: Video-R1-format records and how they are batched per rank.

    records, report = load_records("data/train.json")      # JSON list or JSONL, detected from the content
    print(report.summary())                                  # kept 230 of 240 ...; skipped 10: ...
    loader = RecordLoader(records, batch_size=2, rank=rank, world_size=world, seed=0)
    batch = loader.next_batch()                              # list[VideoQA], B per rank, endless

A record is one JSON object with `problem`, `problem_type` (one of PROBLEM_TYPES), `options` (needed
for multiple choice), `solution` containing `<answer>…</answer>`, `path` (relative to the JSON file's
folder, or absolute), `data_type` ("video"), optional `problem_id`, `process` (a <think> rationale),
`data_source`. Other keys are ignored.

Video paths are confined: after resolving `..` and symlinks, a video must lie inside the video root (by
default the records file's folder) or one of the listed extra roots; `../../etc/passwd`, an absolute path
elsewhere or a symlink pointing out are skipped as "video outside the video roots". Numerical and regression
answers must be numbers `rewards.parse_number` reads (the reward's own parser), so that an exact answer can
score: `1e3`, `1_000`, `1,2,3` are skipped as "non-numeric answer".

Bad records never stop a run and are never dropped silently: each is skipped, counted by reason in the
LoadReport and logged as "file:line N: reason" (the first MAX_WARNINGS individually, then a summary).
Only a file that cannot be read as records at all (missing, empty, not JSON, a JSON value that is not a
list of records) raises RecordFileError: then the user pointed at the wrong file.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from strive_engine.rewards import parse_number

log = logging.getLogger(__name__)

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
_CANONICAL_TYPE = {t.lower(): t for t in PROBLEM_TYPES}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPTION_LETTER = re.compile(r"\s*([A-Za-z])\s*[.):]")
REQUIRED_KEYS = ("problem", "problem_type", "solution", "path", "data_type")
MAX_WARNINGS = 20


class RecordFileError(ValueError):
    """The records file itself is unusable (missing, empty, not JSON / JSONL of objects)."""


@dataclass(frozen=True)
class VideoQA:
    """One question about one video.

    id: `problem_id` as a string (or "file:line N" when absent). path: absolute video path.
    options: "A. red"-style strings (empty unless multiple choice). answer: the text inside
    <answer>…</answer> of `solution`, stripped. source: "file.json:line N" where the record starts.
    process: Video-R1-CoT rationale (<think>…</think>) when present, else "".
    category: the record's benchmark category for per-category evaluation: its `category`, `task`,
    `sub_category` or `data_source` field, first one present (else "").
    """

    id: str
    path: str
    question: str
    options: tuple[str, ...]
    answer: str
    solution: str
    problem_type: str
    data_type: str
    source: str
    process: str = ""
    category: str = ""


@dataclass
class LoadReport:
    """What load_records kept and what it skipped (reason -> count, and one message per bad record)."""

    path: str
    total: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    messages: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = f"{self.path}: kept {self.kept} of {self.total} records"
        n_bad = sum(self.skipped.values())
        if not n_bad:
            return head
        reasons = ", ".join(f"{r} {c}" for r, c in self.skipped.most_common())
        return f"{head}; skipped {n_bad}: {reasons}"


# ------------------------------------------------------------------------------------------ reading


def _iter_json_list(text: str, name: str):
    """Yield (line, value) for each element of a top-level JSON array, with the line it starts on.
    json.loads would lose the positions; raw_decode element by element keeps them. A syntax error
    here is fatal (RecordFileError with line and column): inside a list there is no safe resync point."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    state = "first"  # first (after '['), value (after ','), sep (after a value)
    while True:
        nxt = ws.match(text, pos).end()
        line += text.count("\n", pos, nxt)
        pos = nxt
        if pos >= len(text):
            raise RecordFileError(f"{name}:line {line}: the JSON list is not closed (missing ']')")
        if text[pos] == "]":
            if state == "value":
                raise RecordFileError(f"{name}:line {line}: trailing comma before ']'")
            if text[pos + 1:].strip():
                raise RecordFileError(f"{name}:line {line}: unexpected content after the closing ']'")
            return
        if state == "sep":
            if text[pos] != ",":
                raise RecordFileError(f"{name}:line {line}: expected ',' or ']' between records, found {text[pos]!r}")
            pos, state = pos + 1, "value"
            continue
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise RecordFileError(f"{name}:line {e.lineno} column {e.colno}: invalid JSON inside the list: "
                                  f"{e.msg}") from None
        yield line, value
        line += text.count("\n", pos, end)
        pos, state = end, "sep"


def _read_raw(path: Path) -> tuple[list[tuple[int, object | Exception]], bool]:
    """(line, parsed value or the JSONDecodeError) per record, and whether the file is JSONL."""
    if not path.exists():
        raise RecordFileError(f"records file {path} does not exist")
    if not path.is_file():
        raise RecordFileError(f"records file {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecordFileError(f"records file {path} is not UTF-8 text (JSON or JSONL expected): {e}") from None
    stripped = text.lstrip()
    if not stripped:
        raise RecordFileError(f"records file {path} is empty")
    name = path.name
    if stripped.startswith("["):
        return list(_iter_json_list(text, name)), False
    rows: list[tuple[int, object | Exception]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((lineno, e))
    if all(isinstance(v, Exception) for _, v in rows):
        raise RecordFileError(f"records file {path} is neither a JSON list nor JSONL: no line parses as JSON "
                              f"(line {rows[0][0]}: {rows[0][1]})")
    if len(rows) == 1 and not isinstance(rows[0][1], dict):
        raise RecordFileError(f"records file {path} holds a single JSON {type(rows[0][1]).__name__}; expected a "
                              "list of record objects or one object per line (JSONL)")
    return rows, True


# ------------------------------------------------------------------------------------------ parsing


class _Bad(Exception):
    """A record is skipped: `reason` is the counter key, `detail` the specifics for the message."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(reason)


def _option_letters(options: tuple[str, ...]) -> list[str]:
    """Letters of "A. red"-style options; positional letters A, B, ... when options carry none."""
    letters = []
    for i, opt in enumerate(options):
        m = _OPTION_LETTER.match(opt)
        letters.append(m.group(1).upper() if m else chr(ord("A") + i))
    return letters


CATEGORY_KEYS = ("category", "task", "sub_category", "data_source")


def _confined(video: Path, roots: tuple[Path, ...]) -> Path:
    """The resolved path (symlinks followed) of `video`, which must lie inside one of `roots` (resolved)."""
    real = Path(os.path.realpath(video))
    if not any(real == r or real.is_relative_to(r) for r in roots):
        where = f" (resolves to {real})" if real != video else ""
        raise _Bad("video outside the video roots",
                   f"{video}{where} is not inside {' or '.join(map(str, roots))}; set data.video_root or "
                   "data.extra_video_roots to allow another folder")
    return real


def _parse(obj, folder: Path, name: str, line: int, check_files: bool, roots: tuple[Path, ...]) -> VideoQA:
    if not isinstance(obj, dict):
        raise _Bad("not a JSON object", f"got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in obj or obj[k] is None]
    if missing:
        raise _Bad("missing key", f"missing {', '.join(missing)}")
    for k in ("problem", "problem_type", "solution", "path", "data_type"):
        if not isinstance(obj[k], str):
            raise _Bad("wrong value type", f"{k} must be a string, got {type(obj[k]).__name__}")
    data_type = obj["data_type"].strip().lower()
    if data_type == "image":
        raise _Bad("image record (not supported)", "data_type is 'image'; only video records are supported")
    if data_type != "video":
        raise _Bad("unknown data_type", f"data_type {obj['data_type']!r} is not 'video'")
    ptype = _CANONICAL_TYPE.get(obj["problem_type"].strip().lower())
    if ptype is None:
        raise _Bad("unknown problem_type", f"problem_type {obj['problem_type']!r} is not one of {PROBLEM_TYPES}")
    if not obj["problem"].strip():
        raise _Bad("empty problem")
    options = obj.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise _Bad("wrong value type", "options must be a list of strings")
    options = tuple(options)
    m = _ANSWER.search(obj["solution"])
    if m is None or not m.group(1).strip():
        raise _Bad("no <answer> in solution", f"solution {obj['solution'][:80]!r}")
    answer = m.group(1).strip()
    if ptype == "multiple choice":
        if len(options) < 2:
            raise _Bad("options missing for multiple choice", f"options {list(options)!r}")
        letters = _option_letters(options)
        # "B", or "B. green" / "B)" as some data sets write it, or the full text of an option.
        m_letter = _OPTION_LETTER.match(answer)
        if not (answer.upper() in letters or (m_letter and m_letter.group(1).upper() in letters)
                or answer in options):
            raise _Bad("answer is not an option letter", f"answer {answer!r}, options {letters}")
    elif ptype in ("numerical", "regression") and parse_number(answer) is None:
        raise _Bad("non-numeric answer", f"{ptype} answer {answer!r} is not a number the reward can read "
                                         "(plain decimal, optional comma thousands groups and unit)")
    if not obj["path"].strip():
        raise _Bad("missing key", "path is empty")
    video = Path(os.path.expanduser(obj["path"]))
    video = _confined(Path(os.path.normpath(video if video.is_absolute() else folder / video)), roots)
    if check_files and not video.is_file():
        raise _Bad("missing video file", str(video))
    pid = obj.get("problem_id")
    process = obj.get("process")
    category = next((obj[k] for k in CATEGORY_KEYS if isinstance(obj.get(k), str) and obj[k].strip()), "")
    return VideoQA(
        id=str(pid) if pid is not None else f"{name}:{line}",
        path=str(video), question=obj["problem"], options=options, answer=answer, solution=obj["solution"],
        problem_type=ptype, data_type=data_type, source=f"{name}:line {line}",
        process=process if isinstance(process, str) else "", category=category.strip(),
    )


def load_records(path, *, check_files: bool = True, video_root=None, extra_roots=(),
                 quiet: bool = False) -> tuple[list[VideoQA], LoadReport]:
    """Parse a Video-R1 JSON list or JSONL file (detected from the content, not the suffix).

    Relative video paths resolve against the JSON file's folder; every video must resolve (symlinks
    followed) inside `video_root` (default: that folder) or one of `extra_roots`, and VideoQA.path is
    the resolved path. `check_files=False` skips the existence check (e.g. on a rank that does not see
    the video disk). `quiet`: log nothing (ranks other than 0 parse the same file). Returns the kept
    records in file order and a LoadReport; raises RecordFileError only when the file as a whole is unusable.
    """
    path = Path(os.path.expanduser(os.fspath(path))).absolute()
    rows, _ = _read_raw(path)
    roots = tuple(Path(os.path.realpath(os.path.expanduser(os.fspath(r))))
                  for r in (video_root or path.parent, *extra_roots))
    report = LoadReport(path=str(path), total=len(rows))
    records: list[VideoQA] = []
    for line, value in rows:
        try:
            if isinstance(value, Exception):
                raise _Bad("invalid JSON", str(value))
            records.append(_parse(value, path.parent, path.name, line, check_files, roots))
        except _Bad as bad:
            report.skipped[bad.reason] += 1
            msg = f"{path.name}:line {line}: {bad.reason}" + (f" ({bad.detail})" if bad.detail else "")
            report.messages.append(msg)
            if len(report.messages) <= MAX_WARNINGS and not quiet:
                log.warning("skipping record %s", msg)
    report.kept = len(records)
    n_bad = len(report.messages)
    if not quiet:
        if n_bad > MAX_WARNINGS:
            log.warning("%d more bad records not shown individually (LoadReport.messages has them all)",
                        n_bad - MAX_WARNINGS)
        (log.warning if n_bad else log.info)("%s", report.summary())
    return records, report


# ----------------------------------------------------------------------------------------- batching


def shard_records(records, rank: int, world_size: int) -> list:
    """Strided split for evaluation: rank r gets records r, r + W, r + 2W, ... (every record exactly
    once over all ranks; shard sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_records: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(records)[rank::world_size]


class RecordLoader:
    """Endless, epoch-shuffled, per-rank batches of records; resumable with state_dict/load_state_dict.

    Every epoch e draws one permutation of all N records from a generator seeded with seed + e (the
    same on every rank, nothing to communicate), identity when shuffle=False. It is padded by
    wrapping around to a multiple of the global batch G = batch_size * world_size, so every record is
    seen at least once per epoch and at most ceil(G/N) + 1 times; the epoch has ceil(N/G) global
    batches. Global batch j is the slice [jG, (j+1)G) of the padded permutation and rank r takes its
    part [jG + rB, jG + (r+1)B). The ranks therefore see disjoint records within a global batch (as
    long as G <= N) and the union over ranks is the single-process order.
    """

    def __init__(self, records, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, report: "LoadReport | None" = None):
        self.records = list(records)
        self.report = report  # what load_records kept and skipped (the run's skip summary reads it)
        if not self.records:
            raise ValueError("RecordLoader: no records to load (did every record get skipped? see the LoadReport)")
        if batch_size < 1:
            raise ValueError(f"RecordLoader: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RecordLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0  # position: global batches already taken in this epoch
        self._order: list[int] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        return -(-len(self.records) // self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        """Padded record order of `epoch` (length batches_per_epoch() * global_batch)."""
        n = len(self.records)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        total = self.batches_per_epoch() * self.global_batch
        return [perm[i % n] for i in range(total)]

    def next_batch(self) -> list[VideoQA]:
        """The next batch_size records of this rank."""
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.position * self.global_batch + self.rank * self.batch_size
        batch = [self.records[i] for i in self._order[start:start + self.batch_size]]
        self.position += 1
        if self.position == self.batches_per_epoch():
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.records), "global_batch": self.global_batch}

    def load_state_dict(self, d: dict) -> None:
        """Continue exactly where the saved loader stopped (same records, seed and global batch size).
        With another global batch size (a different world size) the run resumes at the first global
        batch that starts at or before the saved sample offset: a few records may repeat, none is skipped."""
        for key in ("epoch", "position", "seed", "num_records"):
            if key not in d:
                raise KeyError(f"RecordLoader.load_state_dict: state lacks {key!r} (got keys {sorted(d)})")
        if d["num_records"] != len(self.records):
            raise ValueError(f"RecordLoader.load_state_dict: saved for {d['num_records']} records, this loader "
                             f"has {len(self.records)}; the data set changed")
        if d["seed"] != self.seed or d.get("shuffle", self.shuffle) != self.shuffle:
            raise ValueError(f"RecordLoader.load_state_dict: saved with seed={d['seed']}, shuffle={d.get('shuffle')}; "
                             f"this loader has seed={self.seed}, shuffle={self.shuffle}")
        self.epoch, self.position, self._order = int(d["epoch"]), int(d["position"]), None
        saved_gb = int(d.get("global_batch", self.global_batch))
        if saved_gb != self.global_batch:
            offset = self.position * saved_gb
            self.position = offset // self.global_batch
            log.warning("RecordLoader: global batch changed %d -> %d; resuming epoch %d at batch %d",
                        saved_gb, self.global_batch, self.epoch, self.position)
        if self.position >= self.batches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
