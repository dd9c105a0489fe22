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

Four more tasks form the *small-object family* (`SMALL_TASKS`, never in the default mix): the evidence
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
import functools
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

log = logging.getLogger(__name__)

GENERATOR_VERSION = 7  # 2: short rationales; 3: fixed option order; 4: grey distractors, 5: big events (fixed);
#                        6: own RGB->YUV conversion into zero-padded planes; 7: x264 without asm
#                        (both for byte-identical files run to run)
TASKS = ("brief_colour", "first_shape", "flash_count")  # the default mix
# The small-object family (brief, small, named by the question); the _long variants are its warm-up (big, long events,
# no distractor: see the module docstring).
SMALL_TASKS = ("small_colour", "small_count", "small_colour_long", "small_count_long")
ALL_TASKS = TASKS + SMALL_TASKS
# Saturated and far apart in RGB, so they survive 4:2:0 chroma subsampling and downscaling.
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 64, 255), "yellow": (255, 255, 0),
           "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
SHAPES = ("circle", "square", "triangle", "cross")
LETTERS = "ABCD"
# options="fixed": every multiple-choice question lists the same four values in the same order, so the
# letter <-> content mapping is constant and a tiny model only has to *see* the answer (the embedded CPU demo
# learns that in minutes); options="shuffled": six colours, options drawn and shuffled per question.
# In "fixed" mode the brief shape's distractors are drawn in neutral greys (never an option), so the answer is
# "the colour that is on screen at all" — visible only inside the brief window, which few uniform frames miss.
FIXED_COLOURS = ("red", "green", "blue", "yellow")
GREYS = {"grey": (128, 128, 128), "white": (235, 235, 235)}
BACKGROUND = (16, 16, 16)
MAX_FLASHES = 3
SMALL_MAX_FLASHES = 2  # small_count: 1-2 one-frame flashes, so the evidence is 1-2 frames
SMALL_AREA = 0.03      # the small family's objects cover at most this fraction of the frame
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


# ------------------------------------------------------------------------------------------ drawing


def shape_mask(kind: str, r: int) -> np.ndarray:
    """Boolean (2r, 2r) mask of a shape of 'radius' r centred in its box."""
    y, x = np.mgrid[0:2 * r, 0:2 * r] + 0.5 - r  # pixel centres relative to the box centre
    if kind == "circle":
        return x * x + y * y <= r * r
    if kind == "square":
        return (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    if kind == "triangle":  # apex up, base at 0.8 r below the centre
        return (y >= -r) & (y <= 0.8 * r) & (np.abs(x) <= (y + r) / 1.8)
    if kind == "cross":
        return ((np.abs(x) <= 0.3 * r) & (np.abs(y) <= r)) | ((np.abs(y) <= 0.3 * r) & (np.abs(x) <= r))
    raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")


def _smooth_field(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) float field, unit-variance noise on a `cell`-pixel lattice, bilinearly interpolated."""
    small = rng.normal(0.0, 1.0, (h // cell + 2, w // cell + 2))
    r = np.linspace(0, small.shape[0] - 1.001, h)
    c = np.linspace(0, small.shape[1] - 1.001, w)
    r0, c0 = r.astype(int), c.astype(int)
    fr, fc = (r - r0)[:, None], (c - c0)[None, :]
    rows = small[r0] * (1 - fr) + small[r0 + 1] * fr
    return rows[:, c0] * (1 - fc) + rows[:, c0 + 1] * fc


class Canvas:
    """Draws frames of a clip: objects in the four quadrant slots, each visible in its frame windows.

    `texture` > 0 adds a smooth background pattern of that amplitude that pans 2 px/frame down and
    1 px/frame right (motion for the encoder to track); `noise` > 0 adds a film grain of that std.
    Both only serve decode benchmarks: flat frames compress to almost nothing and decode unrealistically
    fast (--texture 40 --noise 3 gives about 3.5 Mbit/s H.264 at 720p30). `rng` draws both.
    """

    _PAN = 64  # pan period in frames' pixels: the texture is _PAN px larger than the frame

    def __init__(self, width: int, height: int, texture: float = 0.0, noise: float = 0.0,
                 rng: np.random.Generator | None = None):
        self.w, self.h = width, height
        side = min(width, height) // 2
        self.r = max(4, int(0.38 * side))
        self.objects = []  # (y0, x0, mask (2r, 2r), rgb, windows)
        self.texture = self.noise = None
        if texture > 0:
            field = _smooth_field(height + self._PAN, width + self._PAN, 32, rng) * texture
            self.texture = field.astype(np.int16)[..., None]  # (H + pan, W + pan, 1)
        if noise > 0:
            # A few fixed grain fields cycled over frames (5: prime, so the cycle never lines up with a
            # GOP): realistic bitrates without a per-frame RNG cost.
            self.noise = [rng.normal(0.0, noise, (height, width, 1)).astype(np.int16) for _ in range(5)]

    def add(self, kind: str, colour: str, slot: int, windows: list[tuple[int, int]], big: bool = False) -> None:
        """A shape in quadrant `slot` (0-3), or, with big=True, one centred shape filling most of the frame
        (drawn over the others while visible)."""
        if big:
            r = max(4, int(0.45 * min(self.w, self.h)))
            cy, cx = self.h // 2, self.w // 2
        else:
            r = self.r
            cy = int((slot // 2 + 0.5) * self.h / 2)
            cx = int((slot % 2 + 0.5) * self.w / 2)
        rgb = COLOURS[colour] if colour in COLOURS else GREYS[colour]
        self.objects.append((cy - r, cx - r, shape_mask(kind, r), rgb, windows))

    def add_at(self, kind: str, colour: str, cy: int, cx: int, r: int, windows: list[tuple[int, int]]) -> None:
        """A shape of 'radius' r centred at pixel (cy, cx), anywhere on the frame (the small-object family)."""
        if not (r <= cy <= self.h - r and r <= cx <= self.w - r):
            raise ValueError(f"a shape of radius {r} at ({cy}, {cx}) leaves the {self.w}x{self.h} frame")
        rgb = COLOURS[colour] if colour in COLOURS else GREYS[colour]
        self.objects.append((cy - r, cx - r, shape_mask(kind, r), rgb, windows))

    def frame(self, t: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB frame number t."""
        img = np.empty((self.h, self.w, 3), np.int16 if self.texture is not None or self.noise is not None
                       else np.uint8)
        img[:] = BACKGROUND
        if self.texture is not None:
            dy = (2 * t) % self._PAN
            dx = t % self._PAN
            img += 40 + self.texture[dy:dy + self.h, dx:dx + self.w]
        for y0, x0, mask, rgb, windows in self.objects:
            if any(s <= t < e for s, e in windows):
                img[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = rgb
        if self.noise is not None:
            img += self.noise[t % len(self.noise)]
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        return img


# -------------------------------------------------------------------------------------------- tasks


def _options(answer: str, others: list[str], letter: str, rng, fixed: tuple[str, ...] | None = None) -> list[str]:
    """Four options 'A. x' with `answer` at `letter` and `others` (3 values) shuffled around it; with
    `fixed` (the four values in their fixed order) the options are exactly `fixed`."""
    if fixed is not None:
        assert fixed[LETTERS.index(letter)] == answer and set(fixed) == {answer, *others}
        return [f"{L}. {v}" for L, v in zip(LETTERS, fixed)]
    rest = [others[i] for i in rng.permutation(len(others))]
    pos = LETTERS.index(letter)
    values = rest[:pos] + [answer] + rest[pos:]
    return [f"{L}. {v}" for L, v in zip(LETTERS, values)]


def _brief_colour(canvas: Canvas, T: int, fps: float, rng, letter: str, colour: str, fixed: bool = False) -> dict:
    L, margin = max(2, round(T / 7)), max(1, round(T / 16))
    start = int(rng.integers(margin, T - L - margin + 1))
    d_colours = [c for c in (FIXED_COLOURS if fixed else COLOURS) if c != colour]
    d1, d2, spare = (d_colours[i] for i in rng.permutation(len(d_colours))[:3])
    if fixed:  # options stay the four colours; the on-screen distractors are grey and white
        draw1, draw2 = "grey", "white"
    else:
        draw1, draw2 = d1, d2
    slots = rng.permutation(4)
    kinds = [SHAPES[i] for i in rng.integers(0, len(SHAPES), 3)]
    # d2 leaves or arrives part-way, but stays >= 70% of the clip: "long" next to the brief one.
    span = int(rng.integers(int(0.7 * T), T + 1))
    off = int(rng.integers(0, T - span + 1))
    canvas.add(kinds[0], draw1, slots[0], [(0, T)])
    canvas.add(kinds[1], draw2, slots[1], [(off, off + span)])
    # fixed mode: the brief shape is big (a tiny model at 28x28-56x56 pixels per frame must be able to see it)
    canvas.add(kinds[2], colour, slots[2], [(start, start + L)], big=fixed)
    options = _options(colour, [d1, d2, spare], letter, rng, FIXED_COLOURS if fixed else None)
    process = f"<think>The brief shape is {colour}.</think>"
    return dict(problem="What colour is the shape that appears only briefly?", problem_type="multiple choice",
                options=options, answer=letter, process=process, evidence=[[start, start + L]])


def _first_shape(canvas: Canvas, T: int, fps: float, rng, letter: str, first: str, fixed: bool = False) -> dict:
    L, margin = max(2, round(T / 7)), max(1, round(T / 16))
    t1 = int(rng.integers(margin, T - margin - 3 * L + 1))
    t2 = t1 + L
    t3 = t2 + L + int(rng.integers(0, L + 1))
    later = [s for s in SHAPES if s != first]
    k2, k3, absent = (later[i] for i in rng.permutation(3))
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:3]]
    slots = rng.permutation(4)
    for kind, colour, slot, t in zip((first, k2, k3), colours, slots, (t1, t2, t3)):
        canvas.add(kind, colour, slot, [(t, T)])
    options = _options(first, [k2, k3, absent], letter, rng, SHAPES if fixed else None)
    process = f"<think>The {first} appears first.</think>"
    return dict(problem="Which shape appears first?", problem_type="multiple choice", options=options,
                answer=letter, process=process, evidence=[[t1, t2]])


def _flash_count(canvas: Canvas, T: int, fps: float, rng, count: int, fixed: bool = False) -> dict:
    Lf, margin = max(2, round(T / 10)), max(1, round(T / 16))
    # Flashes of Lf frames separated by gaps of >= Lf frames: spread the free frames at random
    # (stars and bars) into the count+1 slack positions.
    free = T - 2 * margin - count * Lf - (count - 1) * Lf
    cuts = np.sort(rng.integers(0, free + 1, count))
    starts, t = [], margin
    for i in range(count):
        t += int(cuts[i] - (cuts[i - 1] if i else 0))
        starts.append(t)
        t += 2 * Lf
    windows = [(s, s + Lf) for s in starts]
    names = list(COLOURS)
    colour, c1, c2 = (names[i] for i in rng.permutation(len(names))[:3])
    k1, k2 = (["circle", "triangle", "cross"][i] for i in rng.permutation(3)[:2])
    slots = rng.permutation(4)
    canvas.add("square", colour, slots[0], windows, big=fixed)
    canvas.add(k1, c1, slots[1], [(0, T)])
    canvas.add(k2, c2, slots[2], [(0, T)])
    process = f"<think>The square flashes {count} time{'s' if count > 1 else ''}.</think>"
    return dict(problem="How many times does the square flash?", problem_type="numerical", options=[],
                answer=str(count), process=process, evidence=[list(w) for w in windows])


def small_radius(width: int, height: int) -> int:
    """'Radius' r of the small family's shapes: pi r^2 (the circle, the largest of the four) stays within
    SMALL_AREA of the frame (112x112: r = 10, a 314-pixel circle, 2.5 % of the frame)."""
    return max(2, int(np.sqrt(SMALL_AREA / np.pi) * min(width, height)))


def _place(rng, canvas: Canvas, r: int, n: int) -> list[tuple[int, int]]:
    """n centres (cy, cx) of shapes of radius r, uniform over the frame, boxes apart by >= 2 pixels (rejection;
    after 200 tries in a crowded frame, a touching placement is kept)."""
    out: list[tuple[int, int]] = []
    for _ in range(n):
        for _try in range(200):
            cy = int(rng.integers(r, canvas.h - r + 1))
            cx = int(rng.integers(r, canvas.w - r + 1))
            if all(max(abs(cy - y), abs(cx - x)) >= 2 * r + 2 for y, x in out):
                break
        out.append((cy, cx))
    return out


def _small_statics(canvas: Canvas, rng, r: int, centres: list[tuple[int, int]], T: int) -> None:
    """Two small grey shapes on screen all the time: 'something small is there' is not the evidence."""
    for (cy, cx), grey in zip(centres, ("grey", "white")):
        canvas.add_at(SHAPES[int(rng.integers(0, len(SHAPES)))], grey, cy, cx, r, [(0, T)])


def _brief_window(rng, T: int, L: int, margin: int, taken: list[int]) -> int:
    """Start of an L-frame window in [margin, T - margin - L] at least 2 frames away from every frame in `taken`."""
    for _ in range(500):
        s = int(rng.integers(margin, T - margin - L + 1))
        if all(t < s - 2 or t > s + L + 1 for t in taken):
            return s
    raise ValueError(f"synthetic: no free {L}-frame window in a {T}-frame clip")


def _small_colour(canvas: Canvas, T: int, fps: float, rng, letter: str, colour: str, kind: str,
                  fixed: bool = False, long: bool = False) -> dict:
    r, margin = small_radius(canvas.w, canvas.h), max(1, T // 16)
    palette = FIXED_COLOURS if fixed else tuple(COLOURS)
    others = [c for c in palette if c != colour]
    d_colour, o1, o2 = (others[i] for i in rng.permutation(len(others))[:3])
    d_kind = [k for k in SHAPES if k != kind][int(rng.integers(0, len(SHAPES) - 1))]
    lo = T // 8 if long else 1  # brief: 1-2 frames each; long: T/8 to T/8 + 1 frames
    L, Ld = lo + int(rng.integers(0, 2)), lo + int(rng.integers(0, 2))
    start = _brief_window(rng, T, L, margin, [])
    d_start = _brief_window(rng, T, Ld, margin, list(range(start, start + L)))
    (ty, tx), (dy, dx), *statics = _place(rng, canvas, r, 4)
    _small_statics(canvas, rng, r, statics, T)
    if long:  # the warm-up variant: the named shape big and centred, no distractor (see SMALL_TASKS)
        canvas.add(kind, colour, 0, [(start, start + L)], big=True)
    else:
        canvas.add_at(kind, colour, ty, tx, r, [(start, start + L)])
        canvas.add_at(d_kind, d_colour, dy, dx, r, [(d_start, d_start + Ld)])
    options = _options(colour, [d_colour, o1, o2], letter, rng, FIXED_COLOURS if fixed else None)
    return dict(problem=f"What colour is the small {kind} that flashes?", problem_type="multiple choice",
                options=options, answer=letter, process=f"<think>The small {kind} is {colour}.</think>",
                evidence=[[start, start + L]])


def _small_count(canvas: Canvas, T: int, fps: float, rng, count: int, colour: str, fixed: bool = False,
                 long: bool = False) -> dict:
    r, margin = small_radius(canvas.w, canvas.h), max(1, T // 16)
    palette = FIXED_COLOURS if fixed else tuple(COLOURS)
    d_colour = [c for c in palette if c != colour][int(rng.integers(0, len(palette) - 1))]
    Lf = T // 8 if long else 1  # frames per flash
    gap = max(3, T // 8) + (Lf if long else 0)  # flash starts this far apart: separate events
    for _ in range(500):
        flashes = sorted(int(t) for t in rng.choice(np.arange(margin, T - margin - Lf + 1), count, replace=False))
        if all(b - a >= gap for a, b in zip(flashes, flashes[1:])):
            break
    taken = [t + i for t in flashes for i in range(Lf)]
    d_flashes: list[int] = []
    for j in range(1 + int(rng.integers(0, 2))):
        try:
            d_flashes.append(_brief_window(rng, T, Lf, margin, taken + [t + i for t in d_flashes for i in range(Lf)]))
        except ValueError:
            if not (long and j):  # a long clip may have no room for the distractor's second flash: one it is
                raise
    (ty, tx), (dy, dx), *statics = _place(rng, canvas, r, 4)
    _small_statics(canvas, rng, r, statics, T)
    if long:
        canvas.add("square", colour, 0, [(t, t + Lf) for t in flashes], big=True)
    else:
        canvas.add_at("square", colour, ty, tx, r, [(t, t + Lf) for t in flashes])
        canvas.add_at("square", d_colour, dy, dx, r, [(t, t + Lf) for t in sorted(d_flashes)])
    times = f"{count} time{'s' if count > 1 else ''}"
    return dict(problem=f"How many times does the small {colour} square flash?", problem_type="numerical",
                options=[], answer=str(count), process=f"<think>The small {colour} square flashes {times}.</think>",
                evidence=[[t, t + Lf] for t in flashes])


def _balanced(values, m: int, rng) -> list:
    """m values cycling through `values` (each used floor or ceil of m/len times), shuffled."""
    out = [values[i % len(values)] for i in range(m)]
    return [out[i] for i in rng.permutation(m)]


_TASKS = {"brief_colour": _brief_colour, "first_shape": _first_shape, "flash_count": _flash_count,
          "small_colour": _small_colour, "small_count": _small_count,
          "small_colour_long": functools.partial(_small_colour, long=True),
          "small_count_long": functools.partial(_small_count, long=True)}


def _small_draws(tasks: list[str], rng, fixed: bool) -> dict:
    """Answer parameters of the small family's records, balanced per task. Draws nothing from `rng` when the mix
    has no small task, so the default tasks' sets stay bitwise what they were before the family existed."""
    palette = list(FIXED_COLOURS if fixed else COLOURS)
    out = {}
    for task in SMALL_TASKS:
        n = tasks.count(task)
        if n and task.startswith("small_colour"):
            colours, kinds = _balanced(palette, n, rng), _balanced(list(SHAPES), n, rng)
            letters = [LETTERS[FIXED_COLOURS.index(c)] for c in colours] if fixed else _balanced(LETTERS, n, rng)
            out[task] = iter(zip(letters, colours, kinds))
        elif n:
            out[task] = iter(zip(_balanced(list(range(1, SMALL_MAX_FLASHES + 1)), n, rng), _balanced(palette, n, rng)))
    return out


def _plan(m: int, rng, fixed: bool = False, task_mix: tuple[str, ...] = TASKS) -> list[tuple]:
    """(task, answer parameters) for one split of m records, balanced per task."""
    tasks = _balanced(list(task_mix), m, rng)
    per = {t: tasks.count(t) for t in TASKS}
    if fixed:  # the letter follows from the value; balanced values give balanced letters
        colours = _balanced(list(FIXED_COLOURS), per["brief_colour"], rng)
        shapes = _balanced(list(SHAPES), per["first_shape"], rng)
        draws = {
            "brief_colour": iter((LETTERS[FIXED_COLOURS.index(c)], c) for c in colours),
            "first_shape": iter((LETTERS[SHAPES.index(s)], s) for s in shapes),
            "flash_count": iter((c,) for c in _balanced(list(range(1, MAX_FLASHES + 1)), per["flash_count"], rng)),
        }
        draws.update(_small_draws(tasks, rng, fixed))
        return [(t, next(draws[t])) for t in tasks]
    draws = {
        "brief_colour": iter(zip(_balanced(LETTERS, per["brief_colour"], rng),
                                 _balanced(list(COLOURS), per["brief_colour"], rng))),
        "first_shape": iter(zip(_balanced(LETTERS, per["first_shape"], rng),
                                _balanced(SHAPES, per["first_shape"], rng))),
        "flash_count": iter((c,) for c in _balanced(list(range(1, MAX_FLASHES + 1)), per["flash_count"], rng)),
    }
    draws.update(_small_draws(tasks, rng, fixed))
    return [(t, next(draws[t])) for t in tasks]


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
