"""The synthetic set's tasks: constants, the frame canvas, the per-task event painters and the balanced plan of a
split. `strive_engine.synthetic` encodes what these draw into real video files and writes the records; the
tasks themselves are described in its module docstring.
"""
from __future__ import annotations

import functools

import numpy as np

TASKS = ("brief_colour", "first_shape", "flash_count")  # the default mix
# The small-object family (brief, small, named by the question); the _long variants are its warm-up (big, long events,
# no distractor: see strive_engine.synthetic's docstring); the _hold variants a warm-up that keeps everything but the
# brevity (small objects at random positions, a distractor, events as long as _long's).
SMALL_TASKS = ("small_colour", "small_count", "small_colour_long", "small_count_long", "small_colour_hold",
               "small_count_hold")
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
                  fixed: bool = False, long: bool = False, hold: bool = False) -> dict:
    r, margin = small_radius(canvas.w, canvas.h), max(1, T // 16)
    palette = FIXED_COLOURS if fixed else tuple(COLOURS)
    others = [c for c in palette if c != colour]
    d_colour, o1, o2 = (others[i] for i in rng.permutation(len(others))[:3])
    d_kind = [k for k in SHAPES if k != kind][int(rng.integers(0, len(SHAPES) - 1))]
    lo = T // 8 if long or hold else 1  # brief: 1-2 frames each; long / hold: T/8 to T/8 + 1 frames
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
                 long: bool = False, hold: bool = False) -> dict:
    r, margin = small_radius(canvas.w, canvas.h), max(1, T // 16)
    palette = FIXED_COLOURS if fixed else tuple(COLOURS)
    d_colour = [c for c in palette if c != colour][int(rng.integers(0, len(palette) - 1))]
    held = long or hold
    Lf = T // 8 if held else 1  # frames per flash
    gap = max(3, T // 8) + (Lf if held else 0)  # flash starts this far apart: separate events
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
            if not (held and j):  # a long clip may have no room for the distractor's second flash: one it is
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
          "small_count_long": functools.partial(_small_count, long=True),
          "small_colour_hold": functools.partial(_small_colour, hold=True),
          "small_count_hold": functools.partial(_small_count, hold=True)}


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
