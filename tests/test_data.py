"""Records: JSON list and JSONL, every bad-record kind counted and reported with file:line, path
resolution, fatal errors for unusable files; sharding and the resumable per-rank RecordLoader."""
import json
import logging
from collections import Counter

import pytest

from strive_engine.data import (MAX_WARNINGS, PROBLEM_TYPES, RecordFileError, RecordLoader, VideoQA, load_records,
                                shard_records)


def rec(**kw):
    base = {"problem_id": 1, "problem": "What colour?", "data_type": "video", "problem_type": "multiple choice",
            "options": ["A. red", "B. green", "C. blue"], "solution": "<answer>B</answer>",
            "path": "./videos/a.mp4", "data_source": "test"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "videos").mkdir()
    for name in ("a.mp4", "b.webm"):
        (tmp_path / "videos" / name).write_bytes(b"x")  # existence is all load_records checks
    return tmp_path


def bad_kinds(folder):
    """(record, reason or None for a good one), one per kind."""
    return [
        (rec(problem_id=10, process="<think>look</think>"), None),
        (rec(problem_id=11, problem_type="numerical", options=[], solution="<answer> 3.5 </answer>",
             path=str(folder / "videos" / "b.webm")), None),
        (rec(problem_id=12, problem_type="Multiple Choice", solution="<answer>C. blue</answer>"), None),
        (rec(problem_id=13, problem_type="free-form", options=DROP, solution="<answer>a dog</answer>"), None),
        (rec(solution=DROP), "missing key"),
        (rec(problem_type="essay"), "unknown problem_type"),
        (rec(options=DROP), "options missing for multiple choice"),
        (rec(options=["A. only"]), "options missing for multiple choice"),
        (rec(solution="B"), "no <answer> in solution"),
        (rec(solution="<answer>  </answer>"), "no <answer> in solution"),
        (rec(data_type="image"), "image record (not supported)"),
        (rec(data_type="audio"), "unknown data_type"),
        (rec(path="./videos/missing.mp4"), "missing video file"),
        (7, "not a JSON object"),
        (rec(solution="<answer>E</answer>"), "answer is not an option letter"),
        (rec(problem_type="numerical", options=[], solution="<answer>three</answer>"), "non-numeric answer"),
        (rec(problem=["not", "text"]), "wrong value type"),
        (rec(options="A. red"), "wrong value type"),
    ]


def test_json_list_counts_every_bad_kind_with_file_and_line(folder, caplog):
    cases = bad_kinds(folder)
    text = json.dumps([c for c, _ in cases], indent=2)
    (folder / "data.json").write_text(text)
    # Top-level elements start on lines indented by exactly two spaces.
    starts = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith("  ") and line[2] not in " }]"]
    assert len(starts) == len(cases)
    with caplog.at_level(logging.WARNING, logger="strive_engine.data"):
        records, report = load_records(folder / "data.json")
    want = Counter(r for _, r in cases if r)
    assert report.skipped == want and report.total == len(cases) and report.kept == len(cases) - sum(want.values())
    assert [r.id for r in records] == ["10", "11", "12", "13"]
    expected = [f"data.json:line {line}: {reason}" for line, (_, reason) in zip(starts, cases) if reason]
    assert len(report.messages) == len(expected)
    assert all(m.startswith(e) for m, e in zip(report.messages, expected)), report.messages
    for msg in expected:
        assert msg in caplog.text
    assert "skipped 14" in report.summary() and "missing video file 1" in report.summary()
    assert [r.source for r in records] == [f"data.json:line {line}" for line in starts[:4]]


def test_fields_and_path_resolution(folder):
    (folder / "sub").mkdir()
    (folder / "sub" / "data.json").write_text(json.dumps([c for c, _ in bad_kinds(folder)[:4]]))
    # One record points at folder/videos (outside sub/): allowed by naming folder as the video root.
    records, report = load_records(folder / "sub" / "data.json", check_files=False, video_root=folder)
    r0, r1, r2, r3 = records
    # "./videos/a.mp4" is relative to the JSON file's folder (sub/), absolute paths are kept.
    assert r0.path == str(folder / "sub" / "videos" / "a.mp4")
    assert r1.path == str(folder / "videos" / "b.webm")
    assert r0 == VideoQA(id="10", path=r0.path, question="What colour?", options=("A. red", "B. green", "C. blue"),
                         answer="B", solution="<answer>B</answer>", problem_type="multiple choice",
                         data_type="video", source="data.json:line 1", process="<think>look</think>",
                         category="test")  # from its data_source (category/task/sub_category/data_source)
    assert r1.answer == "3.5" and r1.options == () and r1.process == ""
    assert r2.problem_type == "multiple choice" and r2.answer == "C. blue"
    assert r3.problem_type == "free-form" and r3.problem_type in PROBLEM_TYPES
    # check_files=True finds sub/videos/a.mp4 missing: the same records are now skipped and counted.
    _, strict = load_records(folder / "sub" / "data.json", video_root=folder)
    assert strict.skipped == Counter({"missing video file": 3})


# ------------------------------------------------------------------------------------- confinement


def test_video_paths_are_confined_to_the_video_roots(tmp_path, caplog):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "videos").mkdir(parents=True)
    outside.mkdir()
    (data / "videos" / "ok.mp4").write_bytes(b"x")
    (outside / "secret.mp4").write_bytes(b"x")
    (data / "videos" / "link_out.mp4").symlink_to(outside / "secret.mp4")    # a symlink out of the folder
    (data / "videos" / "link_in.mp4").symlink_to(data / "videos" / "ok.mp4")  # a symlink that stays inside
    paths = ["./videos/ok.mp4", "videos/link_in.mp4", str(data / "videos" / "ok.mp4"),  # kept
             "../../../../../../../../etc/passwd", "/etc/passwd", "../outside/secret.mp4",
             str(outside / "secret.mp4"), "videos/link_out.mp4", "videos/../../outside/secret.mp4"]
    (data / "data.jsonl").write_text("".join(json.dumps(rec(problem_id=i, path=p)) + "\n"
                                             for i, p in enumerate(paths)))
    with caplog.at_level(logging.WARNING, logger="strive_engine.data"):
        records, report = load_records(data / "data.jsonl")
    assert [r.id for r in records] == ["0", "1", "2"]
    assert {r.path for r in records} == {str((data / "videos" / "ok.mp4").resolve())}  # symlinks resolved
    assert report.skipped == Counter({"video outside the video roots": 6})
    assert f"data.jsonl:line 4: video outside the video roots (/etc/passwd is not inside {data.resolve()}" \
        in caplog.text
    assert "data.jsonl:line 8: video outside the video roots" in caplog.text and "resolves to" in caplog.text
    # check_files=False confines too (no file is opened, the path is still refused)
    _, unchecked = load_records(data / "data.jsonl", check_files=False)
    assert unchecked.skipped == Counter({"video outside the video roots": 6})
    # an explicitly listed extra root admits the outside folder (and only it)
    records, report = load_records(data / "data.jsonl", extra_roots=[outside])
    assert [r.id for r in records] == ["0", "1", "2", "5", "6", "7", "8"]
    assert report.skipped == Counter({"video outside the video roots": 2})
    # a video_root elsewhere replaces the default (the records file's folder)
    records, _ = load_records(data / "data.jsonl", video_root=outside)
    assert [r.id for r in records] == ["5", "6", "7", "8"]


def test_quiet_load_logs_nothing(folder, caplog):
    (folder / "data.jsonl").write_text("not json\n" + json.dumps(rec()) + "\n")
    with caplog.at_level(logging.DEBUG, logger="strive_engine.data"):
        records, report = load_records(folder / "data.jsonl", quiet=True)
    assert len(records) == 1 and report.skipped == Counter({"invalid JSON": 1}) and not caplog.records


# ------------------------------------------------------------------------------------- numbers


def test_numeric_answers_are_the_numbers_the_reward_reads(folder):
    """One parser: a numerical/regression record is kept iff rewards.parse_number reads its gold answer, and
    then the exact answer scores 1."""
    from strive_engine.rewards import accuracy_reward, parse_number

    answers = ["3", "-7", "3.5", ".5", "1,000", "12 cm", "40%", "1e308", "1E3", "1_000", "1,2,3", "inf", "nan",
               "0x10", "1,0000", "three", "9" * 400, "+2"]
    lines = [json.dumps(rec(problem_id=i, problem_type=t, options=[], solution=f"<answer>{a}</answer>"))
             for i, a in enumerate(answers) for t in ("numerical", "regression")]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    records, report = load_records(folder / "data.jsonl")
    kept = {r.answer for r in records}
    assert kept == {a for a in answers if parse_number(a) is not None}
    assert {"1e308", "1E3", "1_000", "1,2,3"}.isdisjoint(kept)
    assert report.skipped["non-numeric answer"] == 2 * (len(answers) - len(kept))
    for r in records:
        assert accuracy_reward(f"<think>.</think><answer>{r.answer}</answer>", r.solution, r.problem_type) == 1.0
    assert any("not a number the reward can read" in m for m in report.messages)


def test_jsonl_with_invalid_lines(folder, caplog):
    lines = [json.dumps(rec(problem_id=1)), "", '{"problem": "cut off', json.dumps(rec(problem_id=2)),
             "[1, 2]", json.dumps(rec(problem_id=3, data_type="image"))]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="strive_engine.data"):
        records, report = load_records(folder / "data.jsonl")
    assert [r.id for r in records] == ["1", "2"]
    assert [r.source for r in records] == ["data.jsonl:line 1", "data.jsonl:line 4"]
    assert report.total == 5 and report.kept == 2  # the blank line is not a record
    assert report.skipped == Counter({"invalid JSON": 1, "not a JSON object": 1, "image record (not supported)": 1})
    assert report.messages[0].startswith("data.jsonl:line 3: invalid JSON")
    assert "data.jsonl:line 5: not a JSON object" in caplog.text
    assert "data.jsonl:line 6: image record" in caplog.text


def test_json_suffix_with_jsonl_content_is_detected(folder):
    (folder / "data.json").write_text(json.dumps(rec(problem_id=5)) + "\n" + json.dumps(rec(problem_id=6)) + "\n")
    records, _ = load_records(folder / "data.json")
    assert [r.id for r in records] == ["5", "6"]


def test_warnings_are_capped_then_summarised(folder, caplog):
    n_bad = MAX_WARNINGS + 5
    (folder / "bad.jsonl").write_text("\n".join(["not json"] * n_bad + [json.dumps(rec())]))
    with caplog.at_level(logging.WARNING, logger="strive_engine.data"):
        records, report = load_records(folder / "bad.jsonl")
    assert len(records) == 1 and len(report.messages) == n_bad
    individual = [r for r in caplog.records if r.getMessage().startswith("skipping record")]
    assert len(individual) == MAX_WARNINGS
    assert "5 more bad records" in caplog.text
    assert f"skipped {n_bad}: invalid JSON {n_bad}" in caplog.text


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"), ("", "is empty"), ("  \n", "is empty"), ("id,question\n1,what\n", "neither"),
    ('[{"a": 1},\n {"b": ]', "line 2 column"), ("[1, 2", "not closed"), ('"just a string"', "single JSON str"),
    ("[1,]", "trailing comma"),
])
def test_unusable_file_is_fatal(folder, content, match):
    path = folder / "records.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RecordFileError, match=match) as exc:
        load_records(path)
    assert "records.json" in str(exc.value)


def test_directory_and_binary_are_fatal(folder):
    with pytest.raises(RecordFileError, match="not a regular file"):
        load_records(folder / "videos")
    (folder / "blob.json").write_bytes(bytes(range(128, 256)))
    with pytest.raises(RecordFileError, match="UTF-8"):
        load_records(folder / "blob.json")


# ------------------------------------------------------------------------------------------ batching


def test_shard_records_is_a_strided_partition():
    items = list(range(11))
    shards = [shard_records(items, r, 3) for r in range(3)]
    assert shards[1] == [1, 4, 7, 10]
    assert sorted(sum(shards, [])) == items and [len(s) for s in shards] == [4, 4, 3]
    with pytest.raises(ValueError, match="rank"):
        shard_records(items, 3, 3)


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (7, 2, 1), (5, 4, 3), (12, 2, 3)])
def test_every_record_is_seen_each_epoch_and_ranks_share_one_permutation(n, batch, world):
    records = list(range(n))
    loaders = [RecordLoader(records, batch, rank=r, world_size=world, seed=5) for r in range(world)]
    single = RecordLoader(records, batch * world, seed=5)
    per_epoch = loaders[0].batches_per_epoch()
    assert per_epoch == -(-n // (batch * world)) == single.batches_per_epoch()
    for epoch in range(3):
        seen = []
        for _ in range(per_epoch):
            parts = [ld.next_batch() for ld in loaders]
            assert all(len(p) == batch for p in parts)
            glob = sum(parts, [])
            assert glob == single.next_batch()  # rank slices of one shared global order
            seen += glob
        assert set(seen) == set(records), epoch  # full coverage, padding only repeats
        assert max(Counter(seen).values()) <= -(-batch * world // n) + 1
        assert all(ld.epoch == epoch + 1 and ld.position == 0 for ld in loaders)


def test_shuffle_is_seeded_and_changes_every_epoch():
    records = list(range(40))
    a, b = RecordLoader(records, 40, seed=1), RecordLoader(records, 40, seed=1)
    e0, e1 = a.next_batch(), a.next_batch()
    assert e0 == b.next_batch() and e1 == b.next_batch()
    assert sorted(e0) == records and e0 != e1 and e0 != records
    assert RecordLoader(records, 40, seed=2).next_batch() != e0
    assert RecordLoader(records, 8, shuffle=False).next_batch() == records[:8]


def test_resume_continues_exactly():
    records = [f"r{i}" for i in range(13)]
    a = RecordLoader(records, 2, rank=1, world_size=2, seed=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON/DCP round trip
    b = RecordLoader(records, 2, rank=1, world_size=2, seed=3)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(9)] == [a.next_batch() for _ in range(9)]  # crosses epochs


def test_resume_with_another_world_size_skips_nothing():
    records = list(range(24))
    old = [RecordLoader(records, 3, rank=r, world_size=2, seed=0) for r in range(2)]
    seen = set()
    for _ in range(2):
        for ld in old:
            seen.update(ld.next_batch())
    new = RecordLoader(records, 4, rank=0, world_size=1, seed=0)
    new.load_state_dict(old[0].state_dict())
    rest = set()
    while new.epoch == 0:
        rest.update(new.next_batch())
    assert seen | rest == set(records)


def test_loader_rejects_bad_arguments_and_foreign_state():
    with pytest.raises(ValueError, match="no records"):
        RecordLoader([], 2)
    with pytest.raises(ValueError, match="rank"):
        RecordLoader([1, 2], 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        RecordLoader([1, 2], 0)
    state = RecordLoader(list(range(5)), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="5 records"):
        RecordLoader(list(range(6)), 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        RecordLoader(list(range(5)), 2, seed=1).load_state_dict(state)
    with pytest.raises(KeyError, match="epoch"):
        RecordLoader(list(range(5)), 2).load_state_dict({"position": 0})
