"""Synthetic video-QA generator: determinism, real decodable files, balanced answers, and answers that
the pixels actually support (the brief event is brief, the first shape is first, flashes are counted)."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from strive_engine.data import load_records
from strive_engine.synthetic import COLOURS, FIXED_COLOURS, SHAPES, Canvas, ensure_synthetic, generate_synthetic, main, shape_mask
from strive_engine.video import PyAVSource

pytestmark = pytest.mark.timeout(300)

CODEC_OF_SUFFIX = {".mp4": "h264", ".webm": "vp9", ".avi": "mjpeg"}


def _gen(tmp_path_factory, name, seed, n=9, **kw):
    d = tmp_path_factory.mktemp(name)
    generate_synthetic(d, n, seed, codecs=("h264", "vp9", "mjpeg"), **kw)
    return d


@pytest.fixture(scope="module")
def set_a(tmp_path_factory):  # the general layout: coloured distractors, options shuffled per question
    return _gen(tmp_path_factory, "a", seed=3, options="shuffled")


@pytest.fixture(scope="module")
def set_b(tmp_path_factory):
    return _gen(tmp_path_factory, "b", seed=3, options="shuffled")


@pytest.fixture(scope="module")
def set_fixed(tmp_path_factory):  # the embedded default: fixed options, grey distractors, big events
    return _gen(tmp_path_factory, "f", seed=5, n=12, options="fixed", tasks=("brief_colour", "flash_count"))


def _records(d: Path) -> list[dict]:
    return json.loads((d / "train.json").read_text()) + json.loads((d / "test.json").read_text())


def _frames(d: Path, rec: dict) -> np.ndarray:
    return PyAVSource().read(d / rec["path"], indices=list(range(rec["num_frames"]))).frames.numpy()


def _colour_present(frames: np.ndarray, name: str, min_pixels: int = 300) -> np.ndarray:
    """(T,) bool: the frame shows a sizeable patch of that colour (tolerant to lossy coding)."""
    diff = np.abs(frames.astype(np.int16) - np.array(COLOURS[name], np.int16)).max(-1)  # (T, H, W)
    return (diff < 60).sum((1, 2)) >= min_pixels


def _quadrants(frames: np.ndarray) -> np.ndarray:
    """(T, 4, h, w) bool occupancy (anything brighter than the dark background) per slot."""
    T, H, W, _ = frames.shape
    lit = frames.max(-1) > 80
    return np.stack([lit[:, r * H // 2:(r + 1) * H // 2, c * W // 2:(c + 1) * W // 2]
                     for r in range(2) for c in range(2)], 1)


def _option(rec: dict, letter: str) -> str:
    return next(o.split(". ", 1)[1] for o in rec["options"] if o.startswith(letter + "."))


def _answer(rec: dict) -> str:
    return rec["solution"].removeprefix("<answer>").removesuffix("</answer>")


# ------------------------------------------------------------------------------------- determinism


def test_same_seed_same_json_and_frames(set_a, set_b):
    for name in ("train.json", "test.json", "meta.json"):
        assert (set_a / name).read_text() == (set_b / name).read_text()
    for rec in _records(set_a):
        assert np.array_equal(_frames(set_a, rec), _frames(set_b, rec)), rec["path"]
        # Muxed bitexact: even the files are byte-identical (no random Matroska UIDs).
        assert (set_a / rec["path"]).read_bytes() == (set_b / rec["path"]).read_bytes(), rec["path"]


@pytest.mark.parametrize("full_range", [False, True])
def test_yuv420_frame_zero_padding_and_colours(full_range):
    """The encoder input is fully defined (row padding zeroed: uninitialised padding made x264 output vary
    between runs) and converts back to the RGB it came from (blocks of flat colour: 2x2 chroma is exact)."""
    from strive_engine.synthetic import yuv420_frame

    rng = np.random.default_rng(0)
    W, H = 58, 34  # chroma planes 29 x 17: odd, with padding after every row
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (H // 2, W // 2, 3), dtype=np.uint8), 2, 0), 2, 1)
    frame = yuv420_frame(rgb, full_range=full_range)
    assert frame.format.name == ("yuvj420p" if full_range else "yuv420p")
    for plane, w in zip(frame.planes, (W, W // 2, W // 2)):
        rows = np.frombuffer(bytes(plane), np.uint8).reshape(-1, plane.line_size)
        assert plane.line_size > w and not rows[:, w:].any()
    back = frame.to_ndarray(format="rgb24").astype(int)
    assert np.abs(back - rgb.astype(int)).max() <= 4  # 8-bit Y'CbCr round trip


def test_different_seed_differs(set_a, tmp_path_factory):
    c = _gen(tmp_path_factory, "c", seed=4)
    assert (c / "train.json").read_text() != (set_a / "train.json").read_text()


def test_files_decode_and_records_load(set_a):
    recs = _records(set_a)
    assert len(recs) == 9 and len(json.loads((set_a / "test.json").read_text())) == 2
    assert {CODEC_OF_SUFFIX[Path(r["path"]).suffix] for r in recs} == {"h264", "vp9", "mjpeg"}
    src = PyAVSource()
    for rec in recs:
        info = src.probe(set_a / rec["path"])
        assert info.num_frames == rec["num_frames"] == 48
        assert (info.width, info.height, info.fps) == (112, 112, 8.0)
        assert info.codec == CODEC_OF_SUFFIX[Path(rec["path"]).suffix]
    for split in ("train", "test"):
        kept, report = load_records(set_a / f"{split}.json")
        assert report.kept == report.total > 0 and not report.skipped
        assert all(q.process.startswith("<think>") and q.process.endswith("</think>") for q in kept)


# ------------------------------------------------------------------------------ answers from pixels


def test_brief_event_is_brief_and_answers_the_question(set_a):
    checked = 0
    for rec in (r for r in _records(set_a) if r["task"] == "brief_colour"):
        frames = _frames(set_a, rec)
        T = len(frames)
        (start, end), = rec["evidence"]
        assert T / 8 <= end - start <= T / 6
        answer = _option(rec, _answer(rec))
        shown = _colour_present(frames, answer)
        assert np.flatnonzero(shown).tolist() == list(range(start, end)), rec["path"]
        # Two of the wrong options are the long-visible distractors, the third never appears.
        others = sorted(_colour_present(frames, _option(rec, o[0])).mean() for o in rec["options"]
                        if o[0] != _answer(rec))
        assert others[0] == 0.0 and others[1] >= 0.7 and others[2] >= 0.7, (rec["path"], others)
        checked += 1
    assert checked >= 2


def test_first_shape_is_alone_during_the_evidence_window(set_a):
    r = Canvas(112, 112).r
    checked = 0
    for rec in (r_ for r_ in _records(set_a) if r_["task"] == "first_shape"):
        occ = _quadrants(_frames(set_a, rec))            # (T, 4, 56, 56)
        n_lit = (occ.sum((2, 3)) > 200).sum(1)           # (T,) occupied slots
        (t1, t2), = rec["evidence"]
        assert (n_lit[:t1] == 0).all() and (n_lit[t1:t2] == 1).all() and (n_lit[t2:] >= 2).all()
        slot = int(occ[t1].sum((1, 2)).argmax())
        ious = {}
        for kind in SHAPES:  # which shape, drawn at the slot centre, matches the lit pixels best?
            ref = np.zeros((56, 56), bool)
            ref[28 - r:28 + r, 28 - r:28 + r] = shape_mask(kind, r)
            ious[kind] = (ref & occ[t1, slot]).sum() / (ref | occ[t1, slot]).sum()
        assert max(ious, key=ious.get) == _option(rec, _answer(rec)) and max(ious.values()) > 0.85, ious
        checked += 1
    assert checked >= 2


def test_flash_count_matches_the_flashing_slot(set_a):
    checked = 0
    for rec in (r for r in _records(set_a) if r["task"] == "flash_count"):
        lit = _quadrants(_frames(set_a, rec)).sum((2, 3)) > 200  # (T, 4)
        always = [s for s in range(4) if lit[:, s].all()]
        toggling = [s for s in range(4) if 0 < lit[:, s].sum() < len(lit)]
        assert len(always) == 2 and len(toggling) == 1
        on = lit[:, toggling[0]].astype(int)
        starts = np.flatnonzero(np.diff(np.r_[0, on]) == 1).tolist()
        ends = np.flatnonzero(np.diff(np.r_[on, 0]) == -1).tolist()
        assert [[s, e + 1] for s, e in zip(starts, ends)] == rec["evidence"]
        assert len(starts) == int(_answer(rec))
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("options", ["fixed", "shuffled"])
def test_answers_are_balanced(tmp_path, options):
    # Small frames keep 60 clips fast; the balancing does not depend on the frame size.
    generate_synthetic(tmp_path, 60, 11, width=32, height=32, seconds=3.0, options=options)
    palette = FIXED_COLOURS if options == "fixed" else COLOURS
    for split, per_task in (("train", 16), ("test", 4)):
        recs = json.loads((tmp_path / f"{split}.json").read_text())
        tasks = Counter(r["task"] for r in recs)
        assert set(tasks.values()) == {per_task}
        mc = {t: [r for r in recs if r["task"] == t] for t in ("brief_colour", "first_shape")}
        for t, rs in mc.items():
            letters = Counter(_answer(r) for r in rs)
            assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1, (t, letters)
            values = Counter(_option(r, _answer(r)) for r in rs)
            assert max(values.values()) - min(values.values()) <= 1
            assert len(values) == min(len(rs), len(palette) if t == "brief_colour" else len(SHAPES))
            if options == "fixed":  # same options, same order, for every question of the task
                assert len({tuple(r["options"]) for r in rs}) == 1
        counts = Counter(_answer(r) for r in recs if r["task"] == "flash_count")
        assert set(counts) <= {"1", "2", "3"} and max(counts.values()) - min(counts.values()) <= 1


# ---------------------------------------------------------------------------------- CLI and caching


def test_cli_writes_the_requested_geometry(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "4", "--seed", "1", "--codecs", "mjpeg,vp9", "--seconds", "3",
          "--width", "48", "--height", "32", "--fps", "10", "--texture", "30", "--noise", "4"])
    assert "wrote 4 clips" in capsys.readouterr().out
    recs = _records(tmp_path)
    infos = [PyAVSource().probe(tmp_path / r["path"]) for r in recs]
    assert [i.codec for i in infos] == ["mjpeg", "vp9", "mjpeg", "vp9"]
    assert all((i.num_frames, i.width, i.height, i.fps) == (30, 48, 32, 10.0) for i in infos)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["args"]["codecs"] == ["mjpeg", "vp9"] and meta["args"]["noise"] == 4.0 and meta["args"]["texture"] == 30.0


@pytest.mark.parametrize("args,msg", [
    (["--codecs", "av1"], "unknown codec 'av1'"), (["--width", "33"], "even"), (["--n", "1"], "n must be"),
    (["--seconds", "1"], ">= 24 frames"), (["--test-fraction", "1"], "test_fraction"),
])
def test_cli_rejects_bad_arguments(tmp_path, args, msg):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--n", "3"] + args)
    assert msg in str(exc.value)


def test_regeneration_replaces_only_its_own_files(tmp_path):
    generate_synthetic(tmp_path, 6, 0, seconds=3.0, width=32, height=32)
    (tmp_path / "videos" / "notes.txt").write_text("keep me")
    generate_synthetic(tmp_path, 3, 0, seconds=3.0, width=32, height=32)
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == ["00000.mp4", "00001.webm", "00002.mp4", "notes.txt"]


def test_ensure_synthetic_generates_once_and_regenerates_when_stale(tmp_path):
    train, test = ensure_synthetic(str(tmp_path), 4, 0)
    assert train == tmp_path / "train.json" and test.is_file()
    stamp = (tmp_path / "meta.json").stat().st_mtime_ns
    ensure_synthetic(str(tmp_path), 4, 0)
    assert (tmp_path / "meta.json").stat().st_mtime_ns == stamp  # current: untouched
    os.remove(tmp_path / "videos" / "00001.webm")                # a missing clip
    ensure_synthetic(str(tmp_path), 4, 0)
    assert (tmp_path / "videos" / "00001.webm").is_file()
    ensure_synthetic(str(tmp_path), 5, 0)                        # other arguments
    assert json.loads((tmp_path / "meta.json").read_text())["args"]["n"] == 5
    assert len(_records(tmp_path)) == 5


def test_ensure_synthetic_is_safe_across_processes(tmp_path):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s');"
            "from strive_engine.synthetic import ensure_synthetic; print(ensure_synthetic(sys.argv[1], 6, 2)[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("generating 6 synthetic") for o in outs) == 1, outs
    assert all(o.strip().endswith(str(tmp_path / "train.json")) for o in outs)
    kept, report = load_records(tmp_path / "train.json")
    assert report.kept == report.total == 5


def test_fixed_mode_answers_from_pixels(set_fixed):
    """Fixed options: the same four in the same order; the distractors are grey, so the answer's colour is on
    screen exactly during the evidence windows (a big shape), and no other option colour ever is."""
    checked = {"brief_colour": 0, "flash_count": 0}
    for rec in _records(set_fixed):
        frames = _frames(set_fixed, rec)
        if rec["task"] == "brief_colour":
            assert [o.split(". ", 1)[1] for o in rec["options"]] == list(FIXED_COLOURS)
            answer = _option(rec, _answer(rec))
            (start, end), = rec["evidence"]
            shown = _colour_present(frames, answer, min_pixels=2000)  # big: > 15% of a 112x112 frame
            assert np.flatnonzero(shown).tolist() == list(range(start, end)), rec["path"]
            for o in rec["options"]:
                if o[0] != _answer(rec):
                    assert not _colour_present(frames, _option(rec, o[0])).any(), (rec["path"], o)
        else:
            on = np.zeros(len(frames), int)
            for s_, e_ in rec["evidence"]:
                on[s_:e_] = 1
            lit = (frames.max(-1) > 80).sum((1, 2))  # (T,) the two small shapes always, plus the big square
            big = lit > lit.min() + 2000
            assert big.astype(int).tolist() == on.tolist(), rec["path"]
            assert len(rec["evidence"]) == int(_answer(rec))
        checked[rec["task"]] += 1
    assert min(checked.values()) >= 2, checked


# ------------------------------------------------------------------- the default tasks stay bitwise as they were

# SHA-256 over (relative path, bytes) of every file a set writes, recorded with the generator of commit 630f69e
# (before the small-object family existed; av==18.1.0 as pinned); both splits of several clips, so a stray
# draw from the split's generator moves the test split too. Adding a task family must not move a byte of
# the existing tasks' sets: users' caches (meta.json version 7) would be silently stale otherwise.
_GOLDEN_SETS = {
    "shuffled_all": (dict(n=12, seed=3, test_fraction=0.5, options="shuffled", codecs=("h264", "vp9", "mjpeg"),
                          width=48, height=32, seconds=3.0),
                     "f35cb61cf4ed1555fc76f0df2abc61841fe575c28c3a390d89fd4105f1516c65"),
    "fixed_demo": (dict(n=12, seed=5, test_fraction=0.5, options="fixed", tasks=("brief_colour", "flash_count"),
                        codecs=("h264", "vp9"), width=32, height=32, seconds=3.0),
                   "5fd37178b2dd57d09d43f811a890a38a55755e3ac28955333f4202a8b4fca843"),
    "fixed_all_default_size": (dict(n=4, seed=0, test_fraction=0.5),
                               "5c148c35d1ad8d91d3144554cadc3e6f85d62788fbed6c09bd5e6e0c0a179888"),
}


def _set_digest(d: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(d)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(_GOLDEN_SETS))
def test_default_tasks_are_bitwise_unchanged(tmp_path, name):
    kw, digest = _GOLDEN_SETS[name]
    kw = dict(kw)
    generate_synthetic(tmp_path, kw.pop("n"), kw.pop("seed"), **kw)
    assert _set_digest(tmp_path) == digest, f"{name}: the files of an existing task mix changed"


# --------------------------------------------------------------------------------- the small-object family

SMALL = ("small_colour", "small_count")
# The canonical F=8 view of a 64-frame pool: rows floor((j + 0.5) * 64 / 8) (strive_engine.keyframes' variant 0).
_CANONICAL_64_8 = {4, 12, 20, 28, 36, 44, 52, 60}


@pytest.fixture(scope="module")
def set_small(tmp_path_factory):  # 64 frames (8 s at 8 fps), both option layouts through the seeds' two sets
    d = tmp_path_factory.mktemp("small")
    generate_synthetic(d / "fixed", 10, 7, tasks=SMALL, seconds=8.0, codecs=("h264", "vp9", "mjpeg"))
    generate_synthetic(d / "shuffled", 6, 8, tasks=SMALL, seconds=8.0, options="shuffled", codecs=("vp9", "h264"))
    generate_synthetic(d / "long", 8, 9, tasks=("small_colour_long", "small_count_long"), seconds=8.0,
                       codecs=("h264", "mjpeg"))
    generate_synthetic(d / "hold", 8, 10, tasks=("small_colour_hold", "small_count_hold"), seconds=8.0,
                       codecs=("vp9", "mjpeg"))
    return d


def _blobs(frames: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(T,) pixels of that colour per frame (tolerant to lossy coding) and (T, H, W) bool masks."""
    diff = np.abs(frames.astype(np.int16) - np.array(COLOURS[name], np.int16)).max(-1)  # (T, H, W)
    mask = diff < 60
    return mask.sum((1, 2)), mask


def _best_shape(mask: np.ndarray, r: int) -> tuple[str, float]:
    """The shape whose mask, centred on the blob's bounding box, overlaps the blob best (IoU)."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
    ious = {}
    for kind in SHAPES:
        ref = np.zeros_like(mask)
        m = shape_mask(kind, r)
        y0, x0 = cy - r, cx - r
        if kind == "triangle":  # its mask is not centred in its box: align the bounding boxes' tops instead
            y0 = ys.min() - int(np.nonzero(m.any(1))[0][0])
        ref[max(y0, 0):y0 + 2 * r, max(x0, 0):x0 + 2 * r] = m[max(-y0, 0):, max(-x0, 0):][:ref.shape[0] - max(y0, 0),
                                                                                         :ref.shape[1] - max(x0, 0)]
        ious[kind] = (ref & mask).sum() / (ref | mask).sum()
    best = max(ious, key=ious.get)
    return best, ious[best]


def test_small_family_videos_decode_and_match_their_answers(set_small):
    """Every clip decodes to 64 frames; the named object is visible exactly in the evidence frames (1-2 of 64; the
    _long and _hold variants: 8-9 frames per event, so the canonical F=8 view always sees each event), is small
    (<= 3 % of the frame; the warm-up _long variants: big) and is the named shape/colour; a distractor of another
    colour flashes at other frames (none in the _long warm-up; as long as the named object's events in _hold); the
    answer (colour, or number of flashes) is what the pixels show."""
    from strive_engine.synthetic import small_radius

    r = small_radius(112, 112)
    view = _CANONICAL_64_8
    checked = Counter()
    for layout in ("fixed", "shuffled", "long", "hold"):
        d = set_small / layout
        for rec in _records(d):
            frames = _frames(d, rec)
            T, H, W, _ = frames.shape
            assert T == rec["num_frames"] == 64
            ev = [t for s, e in rec["evidence"] for t in range(s, e)]
            long, hold = rec["task"].endswith("_long"), rec["task"].endswith("_hold")
            if long or hold:
                assert all(8 <= e - s <= 9 and view & set(range(s, e)) for s, e in rec["evidence"]), rec["evidence"]
            else:
                assert 1 <= len(ev) <= 2, rec["evidence"]
            on = np.zeros(T, bool)
            on[ev] = True
            if rec["task"].startswith("small_colour"):
                kind = rec["problem"].removeprefix("What colour is the small ").removesuffix(" that flashes?")
                answer = _option(rec, _answer(rec))
                named = answer
            else:
                named = rec["problem"].removeprefix("How many times does the small ").removesuffix(" square flash?")
                kind = "square"
                assert int(_answer(rec)) == len(rec["evidence"])
                assert all(e - s == (8 if long or hold else 1) for s, e in rec["evidence"])
            assert named in COLOURS and kind in SHAPES, rec["problem"]
            count, masks = _blobs(frames, named)
            assert ((count >= 40) == on).all(), (rec["path"], np.flatnonzero(count >= 40).tolist(), ev)
            if long:  # the warm-up: big and centred
                assert count.max() >= 0.15 * H * W, (rec["path"], count.max())
            else:  # small: at most 3 % of the frame
                assert count.max() <= 0.03 * H * W, (rec["path"], count.max())
            shape, iou = _best_shape(masks[ev[0]], int(0.45 * 112) if long else r)
            assert shape == kind and iou > 0.6, (rec["path"], shape, kind, iou)
            # the distractor: another colour, shown for 1-2 frames outside the evidence (none in the warm-up variant)
            others = [c for c in COLOURS if c != named and (_blobs(frames, c)[0] >= 40).any()]
            assert len(others) == (0 if long else 1), (rec["path"], others)
            if long:
                checked[(layout, rec["task"])] += 1
                continue
            d_on = _blobs(frames, others[0])[0] >= 40
            assert (8 <= d_on.sum() <= 18 if hold else 1 <= d_on.sum() <= 2) and not (d_on & on).any(), d_on.sum()
            if rec["task"].startswith("small_colour"):  # a wrong option, drawn as another shape
                assert others[0] in [_option(rec, o[0]) for o in rec["options"]] and others[0] != answer
                d_mask = _blobs(frames, others[0])[1][np.flatnonzero(d_on)[0]]
                assert _best_shape(d_mask, r)[0] != kind
            checked[(layout, rec["task"])] += 1
    assert min(checked.values()) >= 2 and len(checked) == 8, checked


def test_small_family_is_balanced_and_mostly_missed_by_uniform_frames(tmp_path):
    """Answers balanced per split (colours, letters, counts 1-2); the canonical F=8 view of a 64-frame pool shows
    the evidence in a minority of clips (the family exists so that uniform frames mostly miss it)."""
    generate_synthetic(tmp_path, 80, 2, tasks=SMALL, seconds=8.0, width=32, height=32, codecs=("mjpeg",))
    recs = _records(tmp_path)
    for split, n in (("train", 64), ("test", 16)):
        rs = json.loads((tmp_path / f"{split}.json").read_text())
        assert len(rs) == n and Counter(r["task"] for r in rs) == {t: n // 2 for t in SMALL}
        colours = Counter(_option(r, _answer(r)) for r in rs if r["task"] == "small_colour")
        letters = Counter(_answer(r) for r in rs if r["task"] == "small_colour")
        counts = Counter(_answer(r) for r in rs if r["task"] == "small_count")
        assert set(colours) == set(FIXED_COLOURS) and max(colours.values()) - min(colours.values()) <= 1
        assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1
        assert set(counts) == {"1", "2"} and max(counts.values()) - min(counts.values()) <= 1
    view = _CANONICAL_64_8
    seen = [any(t in view for s, e in r["evidence"] for t in range(s, e)) for r in recs]
    assert 0.05 < sum(seen) / len(seen) < 0.4, sum(seen) / len(seen)


def test_the_config_takes_every_task_and_names_the_known_ones():
    from strive_engine.config import ConfigError, DataConfig
    from strive_engine.synthetic_tasks import ALL_TASKS

    assert DataConfig(synthetic_tasks=",".join(ALL_TASKS)).synthetic_tasks == ",".join(ALL_TASKS)
    with pytest.raises(ConfigError, match="small_count_hold") as e:
        DataConfig(synthetic_tasks="small_colour,small_colour_brief")
    assert all(t in str(e.value) for t in ALL_TASKS)
