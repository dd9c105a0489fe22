"""Synthetic video-QA set: procedurally drawn clips, real encoded files, Video-R1-format records.

    python -m strive_engine.synthetic --out DIR --n 240 --seed 0 [--codecs h264,vp9,mjpeg]
    train_json, test_json = ensure_synthetic("~/.cache/strive_engine/synthetic", n=240, seed=0)

Every answer depends on *when* something happens, so a few uniformly spaced frames often miss the
evidence while question-aware keyframe sampling can find it. Three tasks, in equal numbers:

  brief_colour  (multiple choice) "What colour is the shape that appears only briefly?" Two distractor
                shapes stay on screen (almost) all the time; one shape is visible for ~1/7 of the clip.
                The distractor colours are among the options, so a model that missed the brief window
                is drawn to a wrong answer.
  first_shape   (multiple choice) "Which shape appears first?" Three shapes appear one after the other
                and stay; only a window of ~1/7 of the clip shows the first one alone.
  flash_count   (numerical) "How many times does the square flash?" A square is lit 1-3 times for
                ~1/10 of the clip each, while two other shapes stay on.

Six more tasks form the *small-object family* (`SMALL_TASKS`, never in the default mix): the evidence
is brief (1-2 frames of the clip: with 64 frames, evenly spaced F=8 sampling sees it in a minority of clips),
small (at most 3 % of the frame area, at a random position, so a crop around it multiplies its pixels) and
named by the question, beside a distractor event of another shape and colour (so only a question-aware frame
scorer finds it):

  small_colour  (multiple choice) "What colour is the small circle that flashes?" A small shape of the answer
                colour shows for 1-2 frames; a small shape of another kind, in another option colour, for 1-2
                other frames; two small grey shapes stay on all the time.
  small_count   (numerical) "How many times does the small red square flash?" A small square flashes 1 or 2
                times for one frame each; a square of another colour flashes 1-2 times at other frames; two
                small grey shapes stay on.
  small_colour_long, small_count_long  warm-up variants: the same questions, but the named object is big and
                centred (like the demo's events), shown for T/8 frames or more per event (8-9 of 64, so evenly
                spaced F=8 frames always see it), with no distractor. A curriculum: a tiny model learns to read
                colours and count flashes there, then meets the small, brief evidence in RL.
  small_colour_hold, small_count_hold  warm-up variants that keep everything but the brevity: small objects
                at random positions and the distractor, every event (the distractor's too) T/8 frames or more.

Answers are balanced inside each split (letters A-D uniform per task, colours/shapes uniform, counts
1-3 uniform, each within one), so only looking at the video beats chance. Shapes are big, solid and
saturated on a dark background so that a tiny model sees them at 56x56. Each record carries `process`
(a short <think> rationale), `solution` (<answer>X</answer>) and, beyond the Video-R1 keys,
`task`, `num_frames` and `evidence` (the [start, end) frame windows that show the deciding event,
e.g. to measure how often a sampler hits them). Clips alternate over the chosen codecs: H.264 .mp4
(libx264, yuv420p), VP9 .webm (libvpx-vp9), MJPEG .avi. Everything is drawn from one seed, encoders
run single-threaded by default: the same seed gives the same JSON and the same decoded frames.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from strive_engine.synthetic_tasks import (  # noqa: F401 (re-exported: the module's public names)
    ALL_TASKS, COLOURS, FIXED_COLOURS, LETTERS, SHAPES, SMALL_TASKS, TASKS, Canvas, _plan, _TASKS, shape_mask,
    small_radius)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 7  # 2: short rationales; 3: fixed option order; 4: grey distractors, 5: big events (fixed);
#                        6: own RGB->YUV conversion into zero-padded planes; 7: x264 without asm
#                        (both for byte-identical files run to run)
# codec -> (encoder, container format, file suffix, pixel format, encoder options)
CODECS = {
    # asm=0: x264's SIMD paths made the rightmost macroblock column of an occasional file differ between two
    # encodes of the same frames (5 of 25 repeated 9-clip sets; 0 of 85 with asm=0, at the same speed on these
    # small frames) — most likely an over-read of uninitialised memory past the end of a row.
    "h264": ("libx264", "mp4", ".mp4", "yuv420p", {"crf": "18", "preset": "veryfast", "x264-params": "asm=0"}),
    "vp9": ("libvpx-vp9", "webm", ".webm", "yuv420p", {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "5"}),
    "mjpeg": ("mjpeg", "avi", ".avi", "yuvj420p", {"qmin": "1", "qmax": "3"}),
}
_OUR_FILE = re.compile(r"\d{5,}\.(mp4|webm|avi)")


# ------------------------------------------------------------------------------------------ writing


# RGB -> Y'CbCr, BT.601: limited range (yuv420p, what decoders assume for untagged H.264/VP9) or full range
# (yuvj420p, JPEG). Rows: Y, Cb, Cr; offsets added after.
_BT601_LIMITED = (np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255,
                  np.array([16.0, 128.0, 128.0]))
_BT601_FULL = (np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]),
               np.array([0.0, 128.0, 128.0]))


def yuv420_frame(rgb: np.ndarray, full_range: bool = False) -> av.VideoFrame:
    """An (H, W, 3) uint8 RGB frame (H, W even) as a 4:2:0 VideoFrame, converted here and written into planes
    whose row padding is zeroed. With PyAV/swscale converting (implicitly in stream.encode, or by an explicit
    reformat) now and then the rightmost 16-pixel column of macroblocks came out different (2-14 of 800
    synthetic H.264 files differed between two runs with the same seed, single-threaded x264), most likely
    the encoder reading uninitialised bytes past each row. This conversion alone made it rarer, not gone; x264
    also runs without asm (CODECS). Chroma: the mean of each 2x2 block."""
    m, off = _BT601_FULL if full_range else _BT601_LIMITED
    ycc = rgb.astype(np.float32) @ m.T.astype(np.float32) + off.astype(np.float32)  # (H, W, 3)
    H, W = rgb.shape[:2]
    chroma = ycc[..., 1:].reshape(H // 2, 2, W // 2, 2, 2).mean((1, 3))
    planes = [ycc[..., 0], chroma[..., 0], chroma[..., 1]]
    frame = av.VideoFrame(W, H, "yuvj420p" if full_range else "yuv420p")
    for plane, data in zip(frame.planes, planes):
        buf = np.zeros((plane.buffer_size // plane.line_size, plane.line_size), np.uint8)
        buf[: data.shape[0], : data.shape[1]] = np.clip(np.rint(data), 0, 255)
        plane.update(buf)
    return frame


def _encode(path: Path, canvas: Canvas, T: int, fps: float, codec: str, threads: int) -> None:
    encoder, fmt, _, pix, options = CODECS[codec]
    # bitexact: no random Matroska UIDs or version strings, so the same seed gives byte-identical files.
    with av.open(str(path), "w", format=fmt, options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001), options=dict(options))
        stream.width, stream.height, stream.pix_fmt = canvas.w, canvas.h, pix
        stream.codec_context.thread_count = threads
        for t in range(T):
            frame = yuv420_frame(canvas.frame(t), full_range=pix == "yuvj420p")
            frame.pts = t
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic set (stored as meta.json "args"); validated on creation."""

    n: int
    seed: int
    test_fraction: float = 0.2
    codecs: tuple[str, ...] = ("h264", "vp9")
    width: int = 112
    height: int = 112
    fps: float = 8.0
    seconds: float = 6.0
    texture: float = 0.0
    noise: float = 0.0
    encoder_threads: int = 1
    options: str = "fixed"  # "fixed" | "shuffled" (see FIXED_COLOURS)
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self):
        object.__setattr__(self, "codecs", tuple(self.codecs))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks or any(t not in ALL_TASKS for t in self.tasks):
            raise ValueError(f"synthetic: tasks must be a non-empty subset of {', '.join(ALL_TASKS)}, "
                             f"got {self.tasks}")
        if self.n < 2:
            raise ValueError(f"synthetic: n must be >= 2 (train and test), got {self.n}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"synthetic: test_fraction must be in [0, 1), got {self.test_fraction}")
        if not self.codecs:
            raise ValueError("synthetic: codecs must not be empty")
        for c in self.codecs:
            if c not in CODECS:
                raise ValueError(f"synthetic: unknown codec {c!r}; choose from {', '.join(CODECS)}")
            try:
                av.codec.Codec(CODECS[c][0], "w")
            except Exception:  # noqa: BLE001 - PyAV raises several types for a missing encoder
                raise RuntimeError(f"synthetic: this PyAV/FFmpeg build has no {CODECS[c][0]} encoder "
                                   f"for {c!r}") from None
        if self.width < 32 or self.height < 32 or self.width % 2 or self.height % 2:
            raise ValueError(f"synthetic: width and height must be even and >= 32 (4:2:0), "
                             f"got {self.width}x{self.height}")
        if self.fps <= 0 or self.texture < 0 or self.noise < 0 or self.encoder_threads < 1:
            raise ValueError(f"synthetic: need fps > 0, texture >= 0, noise >= 0, encoder_threads >= 1 (got "
                             f"{self.fps}, {self.texture}, {self.noise}, {self.encoder_threads})")
        if self.options not in ("fixed", "shuffled"):
            raise ValueError(f"synthetic: options must be 'fixed' or 'shuffled', got {self.options!r}")
        if self.num_frames < 24:
            raise ValueError(f"synthetic: seconds * fps must give >= 24 frames for the timed events, got "
                             f"{self.num_frames} ({self.seconds} s at {self.fps} fps)")

    @property
    def num_frames(self) -> int:
        return round(self.seconds * self.fps)

    def to_meta(self) -> dict:
        d = dataclasses.asdict(self)
        d["codecs"] = list(self.codecs)
        d["tasks"] = list(self.tasks)
        for k in ("test_fraction", "fps", "seconds", "texture", "noise"):
            d[k] = float(d[k])
        return d


def generate_synthetic(out_dir, n: int, seed: int, *, progress: bool = False, **options) -> tuple[Path, Path]:
    """Write n clips to out_dir/videos and the records to out_dir/{train,test,meta}.json.

    `options` are the other SyntheticSpec fields (test_fraction, codecs, width, height, fps, seconds,
    texture, noise, encoder_threads). Returns (train.json, test.json). meta.json is written last, so its
    presence means the set is complete. Files of an earlier set in out_dir are replaced. `progress`: a tqdm
    bar over the clips on stderr (generating the demo's 800 clips takes minutes on 2 cores).
    """
    from tqdm import tqdm

    spec = SyntheticSpec(n=n, seed=seed, **options)
    T, fps = spec.num_frames, spec.fps
    out = Path(out_dir).expanduser()
    videos = out / "videos"
    # Remove an earlier set, touching only the files this generator writes (out_dir may be shared).
    for stale in ("meta.json", "train.json", "test.json"):
        (out / stale).unlink(missing_ok=True)
    videos.mkdir(parents=True, exist_ok=True)
    for old in videos.iterdir():
        if _OUR_FILE.fullmatch(old.name):
            old.unlink()
    n_test = 0 if spec.test_fraction == 0 else min(n - 1, max(1, round(n * spec.test_fraction)))
    rng = np.random.default_rng(seed)
    fixed = spec.options == "fixed"
    splits = {"train": _plan(n - n_test, rng, fixed, spec.tasks), "test": _plan(n_test, rng, fixed, spec.tasks)}
    records = {"train": [], "test": []}
    i = 0
    bar = tqdm(total=n, desc="synthetic set", unit="clip", disable=not progress, dynamic_ncols=True)
    for split, plan in splits.items():
        for task, params in plan:
            # Per-clip generators: a clip depends on (seed, i) only, and the texture/grain options draw
            # from their own stream, so turning them on does not move the shapes.
            canvas = Canvas(spec.width, spec.height, spec.texture, spec.noise, np.random.default_rng([seed, i, 1]))
            body = _TASKS[task](canvas, T, fps, np.random.default_rng([seed, i]), *params, fixed=fixed)
            codec = spec.codecs[i % len(spec.codecs)]
            name = f"{i:05d}{CODECS[codec][2]}"
            _encode(videos / name, canvas, T, fps, codec, spec.encoder_threads)
            answer = body.pop("answer")
            records[split].append({
                "problem_id": i, "problem": body["problem"], "data_type": "video",
                "problem_type": body["problem_type"], "options": body["options"], "process": body["process"],
                "solution": f"<answer>{answer}</answer>", "path": f"./videos/{name}",
                "data_source": f"synthetic/{task}", "task": task, "num_frames": T, "evidence": body["evidence"],
            })
            i += 1
            bar.update(1)
    bar.close()
    for split in ("train", "test"):
        _write_json(out / f"{split}.json", records[split])
    meta = {"generator": "strive_engine.synthetic", "version": GENERATOR_VERSION, "args": spec.to_meta(),
            "num_frames": T, "train": len(records["train"]), "test": len(records["test"])}
    _write_json(out / "meta.json", meta)
    return out / "train.json", out / "test.json"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def _is_current(out: Path, args: dict) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("version") != GENERATOR_VERSION or meta.get("args") != args:
        return False
    try:
        for split in ("train", "test"):
            for rec in json.loads((out / f"{split}.json").read_text()):
                if not (out / rec["path"]).is_file():
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocks until the holder (e.g. rank 0 generating) releases it
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_synthetic(out_dir: str, n: int, seed: int, *, progress: bool = False, **options) -> tuple[Path, Path]:
    """(train.json, test.json) of the synthetic set of n clips (other SyntheticSpec fields in `options`),
    generated if missing or if meta.json differs (other version/arguments, files missing). Safe when several
    torchrun ranks call it at once: an exclusive fcntl lock on out_dir/.lock lets one generate while the
    others wait, then they find meta.json current and just return the paths."""
    out = Path(out_dir).expanduser()
    args = SyntheticSpec(n=n, seed=seed, **options).to_meta()
    with _file_lock(out / ".lock"):
        if not _is_current(out, args):
            t0 = time.perf_counter()
            log.info("generating %d synthetic video-QA clips (seed %d) in %s", n, seed, out)
            generate_synthetic(out, n, seed, progress=progress, **options)
            log.info("synthetic set ready in %.1f s", time.perf_counter() - t0)
    return out / "train.json", out / "test.json"


def main(argv: list[str] | None = None) -> None:
    d = SyntheticSpec(n=2, seed=0)  # defaults shown by --help
    ap = argparse.ArgumentParser(prog="python -m strive_engine.synthetic", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 epilog="Decode-benchmark clips, e.g.: --n 4 --width 1280 --height 720 --fps 30 "
                                        "--seconds 30 --texture 40 --noise 3 --encoder-threads 8")
    ap.add_argument("--out", required=True, help="output folder (videos/, train.json, test.json, meta.json)")
    ap.add_argument("--n", type=int, default=240, help="number of clips / questions (train + test)")
    ap.add_argument("--seed", type=int, default=0, help="seed: same seed, same JSON and same decoded frames")
    ap.add_argument("--test-fraction", type=float, default=d.test_fraction, help="share of the test split")
    ap.add_argument("--codecs", default=",".join(d.codecs),
                    help=f"comma-separated, alternated over clips; from {','.join(CODECS)}")
    ap.add_argument("--width", type=int, default=d.width, help="frame width (even)")
    ap.add_argument("--height", type=int, default=d.height, help="frame height (even)")
    ap.add_argument("--fps", type=float, default=d.fps, help="frames per second")
    ap.add_argument("--seconds", type=float, default=d.seconds, help="clip length")
    ap.add_argument("--texture", type=float, default=d.texture,
                    help="amplitude of a panning background texture (motion; for decode benchmarks)")
    ap.add_argument("--noise", type=float, default=d.noise,
                    help="std of a film grain on every pixel (bitrate; for decode benchmarks)")
    ap.add_argument("--options", choices=("fixed", "shuffled"), default=d.options,
                    help="fixed: the same four options in the same order for every question of a task "
                         "(learnable by the tiny demo model); shuffled: drawn and shuffled per question")
    ap.add_argument("--tasks", default=",".join(d.tasks),
                    help=f"comma-separated task mix, from {','.join(ALL_TASKS)} (the small family: e.g. "
                         f"--tasks {','.join(SMALL_TASKS)} --seconds 8, 64 frames)")
    ap.add_argument("--encoder-threads", type=int, default=d.encoder_threads,
                    help="encoder threads (output is reproducible for a fixed value)")
    a = ap.parse_args(argv)
    codecs = tuple(c.strip() for c in a.codecs.split(",") if c.strip())
    t0 = time.perf_counter()
    try:
        train, test = generate_synthetic(a.out, a.n, a.seed, test_fraction=a.test_fraction, codecs=codecs,
                                         width=a.width, height=a.height, fps=a.fps, seconds=a.seconds,
                                         texture=a.texture, noise=a.noise, encoder_threads=a.encoder_threads,
                                         options=a.options, tasks=tuple(t.strip() for t in a.tasks.split(",") if t.strip()),
                                         progress=True)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    meta = json.loads((Path(a.out).expanduser() / "meta.json").read_text())
    print(f"wrote {a.n} clips ({meta['num_frames']} frames, {a.width}x{a.height} at {a.fps:g} fps, "
          f"{','.join(codecs)}): {train} ({meta['train']}), {test} ({meta['test']}) "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
