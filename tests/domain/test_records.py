"""The JSONL record contract (data.md §1): exact error shapes and order, collection, serialisation."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import ArtifactError, DataContractError
from domain.objects import DetObject, GeometryKind, Ordering
from domain.ordering import sort_objects
from domain.records import (
    Record,
    RecordSet,
    desc_problem,
    image_path_problem,
    numbered_lines,
    parse_artifact_lines,
    parse_jsonl_records,
    record_to_json,
    record_to_json_line,
    validate_jsonl_records,
    validate_record,
)

SRC = "data/train.jsonl"
MAX_PIXELS = 786432


def good_record() -> dict[str, Any]:
    return {
        "coord_space": "norm1000",
        "height": 416,
        "images": ["images/train/000000000139.jpg"],
        "metadata": {"image_id": 139, "source": "coco"},
        "objects": [
            {"desc": "yellow box", "poly": [16, 23, 469, 47, 313, 938]},
            {"desc": "cat", "bbox_2d": [12, 40, 300, 410], "category_id": 17, "ann_id": 5},
        ],
        "width": 640,
    }


def line_of(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def load(
    values: Sequence[object],
    *,
    bbox_only: bool = False,
    ordering: Ordering = Ordering.SORTED,
    limit: int | None = None,
) -> RecordSet:
    lines = [(i + 1, line_of(v)) for i, v in enumerate(values)]
    return parse_jsonl_records(
        lines, SRC, max_pixels=MAX_PIXELS, bbox_only=bbox_only, ordering=ordering, limit=limit
    )


def errors_of(value: object, **kwargs: Any) -> list[str]:
    with pytest.raises(DataContractError) as info:
        load([value], **kwargs)
    return str(info.value).split("\n")


def with_object(obj: object, index: int = 0) -> dict[str, Any]:
    rec = good_record()
    rec["objects"][index] = obj
    return rec


# ---------------------------------------------------------------------------------------------
# A valid file


def test_valid_record_parses_with_counts_and_ids() -> None:
    rs = load([good_record()])
    assert len(rs) == 1 and rs.num_bbox_objects == 1 and rs.num_poly_objects == 1
    rec = rs[0]
    assert rec.image == "images/train/000000000139.jpg"
    assert (rec.width, rec.height, rec.line, rec.source) == (640, 416, 1, SRC)
    assert rec.objects == (
        DetObject("yellow box", GeometryKind.POLY, (16, 23, 469, 47, 313, 938)),
        DetObject("cat", GeometryKind.BBOX, (12, 40, 300, 410)),
    )
    assert rec.category_ids == (None, 17) and rec.ann_ids == (None, 5)
    assert rec.metadata == {"image_id": 139, "source": "coco"}


def test_coord_tokens_and_null_geometry() -> None:
    rec = with_object({"desc": "cat", "bbox_2d": ["<|coord_12|>", 40, "<|coord_300|>", 410], "poly": None})
    assert load([rec])[0].objects[0].bins == (12, 40, 300, 410)


def test_empty_objects_is_valid() -> None:
    rec = good_record()
    rec["objects"] = []
    assert load([rec])[0].objects == ()


# ---------------------------------------------------------------------------------------------
# Acceptance tests 12-16: every object error of §1.5 with its exact shape


OBJECT_ERRORS = [
    (
        {"desc": "a", "bbox_2d": [1, 2, 3, 4], "poly": [1, 2, 3, 4, 5, 6]},
        "objects[0]: must contain exactly one geometry field (bbox_2d xor poly), got both",
    ),
    ({"desc": "a"}, "objects[0]: must contain exactly one geometry field (bbox_2d xor poly), got none"),
    (
        {"desc": "a", "bbox_2d": None, "poly": None},
        "objects[0]: must contain exactly one geometry field (bbox_2d xor poly), got none",
    ),
    ({"desc": "a", "bbox_2d": "1,2,3,4"}, "objects[0].bbox_2d: must be a list"),
    (
        {"desc": "a", "poly": [[1, 2], [3, 4], [5, 6]]},
        "objects[0].poly: must be a flat list (nested pairs are not allowed)",
    ),
    ({"desc": "a", "bbox_2d": [1, 2, 3]}, "objects[0].bbox_2d: must contain exactly 4 values; got len=3"),
    (
        {"desc": "a", "bbox_2d": [1, 2, 3, 4, 5, 6]},
        "objects[0].bbox_2d: must contain exactly 4 values; got len=6",
    ),
    (
        {"desc": "a", "poly": [1, 2, 3, 4, 5]},
        "objects[0].poly: must contain an even number of values and at least 6; got len=5",
    ),
    (
        {"desc": "a", "poly": [1, 2, 3, 4]},
        "objects[0].poly: must contain an even number of values and at least 6; got len=4",
    ),
    (
        {"desc": "a", "bbox_2d": [True, 2, 3, 4]},
        "objects[0].bbox_2d[0]: expected an integer bin or a coord token string, got True",
    ),
    (
        {"desc": "a", "bbox_2d": [1, 12.0, 30, 40]},
        "objects[0].bbox_2d[1]: expected an integer bin or a coord token string, got 12.0",
    ),
    (
        {"desc": "a", "bbox_2d": [1, 2, "12", 40]},
        "objects[0].bbox_2d[2]: expected an integer bin or a coord token string, got '12'",
    ),
    (
        {"desc": "a", "bbox_2d": [1, 2, 3, "<|coord_007|>"]},
        "objects[0].bbox_2d[3]: expected an integer bin or a coord token string, got '<|coord_007|>'",
    ),
    (
        {"desc": "a", "bbox_2d": [1, 2, 3, "<|coord_*|>"]},
        "objects[0].bbox_2d[3]: expected an integer bin or a coord token string, got '<|coord_*|>'",
    ),
    (
        {"desc": "a", "bbox_2d": [1, 2, 3, None]},
        "objects[0].bbox_2d[3]: expected an integer bin or a coord token string, got None",
    ),
    (
        {"desc": "a", "bbox_2d": [1, 2, "<|coord_1000|>", 4]},
        "objects[0].bbox_2d[2]: value 1000 out of range 0..999",
    ),
    ({"desc": "a", "bbox_2d": [1, 2, 1000, 4]}, "objects[0].bbox_2d[2]: value 1000 out of range 0..999"),
    ({"desc": "a", "bbox_2d": [-1, 2, 10, 4]}, "objects[0].bbox_2d[0]: value -1 out of range 0..999"),
    (
        {"desc": "a", "bbox_2d": [10, 2, 10, 4]},
        "objects[0].bbox_2d: requires x1 < x2 and y1 < y2; got [10, 2, 10, 4]",
    ),
    (
        {"desc": "a", "bbox_2d": [1, 9, 10, 4]},
        "objects[0].bbox_2d: requires x1 < x2 and y1 < y2; got [1, 9, 10, 4]",
    ),
    (
        {"desc": "a", "poly": [0, 0, 0, 10, 10, 10, 10, 0]},
        (
            "objects[0].poly: not canonical (counter-clockwise on screen; must be clockwise (shoelace sum > 0)); "
            "run the converter"
        ),
    ),
    (
        {"desc": "a", "poly": [10, 0, 10, 10, 0, 10, 0, 0]},
        (
            "objects[0].poly: not canonical (must start at the vertex with the smallest (y, x), which is vertex 3 "
            "(0, 0)); run the converter"
        ),
    ),
    (
        {"desc": "a", "poly": [0, 0, 10, 0, 10, 10, 0, 0]},
        "objects[0].poly: not canonical (repeated closing vertex; the ring closes implicitly); run the converter",
    ),
    ({"bbox_2d": [1, 2, 3, 4]}, "objects[0].desc: missing required key"),
    ({"desc": 5, "bbox_2d": [1, 2, 3, 4]}, "objects[0].desc: must be a string; got 5"),
    (
        {"desc": "cat", "bbox_2d": [1, 2, 3, 4], "category_id": "17"},
        "objects[0].category_id: expected an integer, got '17'",
    ),
    (
        {"desc": "cat", "bbox_2d": [1, 2, 3, 4], "ann_id": True},
        "objects[0].ann_id: expected an integer, got True",
    ),
    (
        {"desc": "a", "bbox": [1, 2, 3, 4]},
        "objects[0].bbox: not a contract key; write `bbox_2d` / `poly` in bins, run the converter",
    ),
    (
        {"desc": "a", "polygon": [1, 2, 3, 4, 5, 6]},
        "objects[0].polygon: not a contract key; write `bbox_2d` / `poly` in bins, run the converter",
    ),
    ({"desc": "a", "line": [1, 2, 3, 4]}, "objects[0].line: line geometry is not supported"),
    ({"desc": "a", "line_points": 2}, "objects[0].line_points: line geometry is not supported"),
    (
        {"desc": "a", "bbox_2d": [1, 2, 3, 4], "poly_points": 3},
        "objects[0].poly_points: not part of the contract",
    ),
    (
        {"desc": "a", "bbox_2d": [1, 2, 3, 4], "score": 0.9},
        "objects[0].score: unknown key; allowed keys: desc, bbox_2d, poly, category_id, ann_id",
    ),
    ("cat", "objects[0]: must be a JSON object; got 'cat'"),
]


@pytest.mark.parametrize(("obj", "message"), OBJECT_ERRORS)
def test_object_error_shapes(obj: object, message: str) -> None:
    assert errors_of(with_object(obj)) == [f"{SRC}:1: {message}"]


def test_kind_specific_arity_comes_before_element_checks() -> None:
    # Acceptance 13/14: a 3-element bbox with a bad element still reports the arity.
    assert errors_of(with_object({"desc": "a", "bbox_2d": [1.5, 2, 3]})) == [
        f"{SRC}:1: objects[0].bbox_2d: must contain exactly 4 values; got len=3"
    ]
    # Nesting is checked before arity.
    assert errors_of(with_object({"desc": "a", "poly": [[1, 2], [3, 4], 5]})) == [
        f"{SRC}:1: objects[0].poly: must be a flat list (nested pairs are not allowed)"
    ]


def test_only_the_first_failure_of_each_object_is_reported() -> None:
    rec = with_object({"desc": "a\nb", "bbox_2d": [1, 2, 3, "x"]})
    assert errors_of(rec) == [
        f"{SRC}:1: objects[0].bbox_2d[3]: expected an integer bin or a coord token string, got 'x'"
    ]
    # Element types (step 6) are checked over the whole list before ranges (step 7).
    rec = with_object({"desc": "a", "bbox_2d": [1000, 2, 3, 4.5]})
    assert errors_of(rec) == [
        f"{SRC}:1: objects[0].bbox_2d[3]: expected an integer bin or a coord token string, got 4.5"
    ]


def test_every_object_is_reported() -> None:
    rec = good_record()
    rec["objects"] = [{"desc": "a", "bbox_2d": [1, 2, 3]}, {"desc": "b"}]
    assert errors_of(rec) == [
        f"{SRC}:1: objects[0].bbox_2d: must contain exactly 4 values; got len=3",
        f"{SRC}:1: objects[1]: must contain exactly one geometry field (bbox_2d xor poly), got none",
    ]


# ---------------------------------------------------------------------------------------------
# Acceptance test 19: desc rules


@pytest.mark.parametrize(
    ("desc", "reason"),
    [
        ("red\ncar", "must not contain control characters; found '\\n' at position 3"),
        ("red\tcar", "must not contain control characters; found '\\t' at position 3"),
        ("a\x7fb", "must not contain control characters; found '\\x7f' at position 1"),
        ("red  car", "must not contain two consecutive spaces"),
        (
            "box <|coord_5|>",
            "must not contain '<|' or '|>' (special-token text would tokenise to special ids)",
        ),
        ("a |> b", "must not contain '<|' or '|>' (special-token text would tokenise to special ids)"),
        ("   ", "must be non-empty after stripping whitespace"),
        ("", "must be non-empty after stripping whitespace"),
        (" cat", "must not have leading or trailing whitespace"),
        ("cat ", "must not have leading or trailing whitespace"),
    ],
)
def test_desc_rules(desc: str, reason: str) -> None:
    assert errors_of(with_object({"desc": desc, "bbox_2d": [1, 2, 3, 4]})) == [
        f"{SRC}:1: objects[0].desc: {reason}"
    ]


@pytest.mark.parametrize("desc", ["a, b", "a/b", "bow (weapon)", "café", "狗", 'say "hi"', "x: y"])
def test_desc_accepted(desc: str) -> None:
    rec = with_object({"desc": desc, "bbox_2d": [1, 2, 3, 4]})
    assert load([rec])[0].objects[0].desc == desc


@given(st.text(max_size=12))
def test_desc_rules_property(desc: str) -> None:
    ok = desc_problem(desc) is None
    expected = (
        desc.strip() != ""
        and desc == desc.strip()
        and re.search(r"[\x00-\x1f\x7f]", desc) is None
        and "  " not in desc
        and "<|" not in desc
        and "|>" not in desc
    )
    assert ok == expected


# ---------------------------------------------------------------------------------------------
# Acceptance test 17 and the other record-level checks


def test_coord_space() -> None:
    rec = good_record()
    rec["coord_space"] = "pixel"
    assert errors_of(rec) == [
        f"{SRC}:1: coord_space: must be \"norm1000\"; got 'pixel' (pixel-space files must go through the converter)"
    ]
    del rec["coord_space"]
    assert errors_of(rec) == [
        (
            f'{SRC}:1: coord_space: missing required key; must be "norm1000" '
            "(pixel-space files must go through the converter)"
        )
    ]


def test_sizes_and_budget() -> None:
    rec = good_record()
    rec["width"] = 427
    assert errors_of(rec) == [f"{SRC}:1: width: must be a positive multiple of 32; got 427"]
    rec["width"], rec["height"] = 960, 960
    assert errors_of(rec) == [f"{SRC}:1: width*height = 921600 exceeds data.max_pixels = 786432"]
    rec["width"], rec["height"] = 1280, 720  # both problems are reported
    assert errors_of(rec) == [
        f"{SRC}:1: height: must be a positive multiple of 32; got 720",
        f"{SRC}:1: width*height = 921600 exceeds data.max_pixels = 786432",
    ]
    rec["width"], rec["height"] = True, 0
    assert errors_of(rec) == [
        f"{SRC}:1: width: must be an integer; got True",
        f"{SRC}:1: height: must be a positive multiple of 32; got 0",
    ]
    rec["width"], rec["height"] = 640.0, 416
    assert errors_of(rec) == [f"{SRC}:1: width: must be an integer; got 640.0"]


def test_budget_boundary_is_inclusive() -> None:
    rec = good_record()
    rec["width"], rec["height"] = 1024, 768  # exactly 786432
    assert load([rec])[0].width == 1024


def test_top_level_keys_and_record_type() -> None:
    rec = good_record()
    rec["extra"] = 1
    del rec["objects"]
    assert errors_of(rec) == [
        f"{SRC}:1: extra: unknown top-level key; allowed keys: images, width, height, coord_space, objects, metadata",
        f"{SRC}:1: objects: missing required key",
    ]
    assert errors_of([1, 2]) == [f"{SRC}:1: record must be a JSON object; got list"]
    rec = good_record()
    rec["objects"] = {"desc": "a"}
    assert errors_of(rec) == [f"{SRC}:1: objects: must be a list; got {{'desc': 'a'}}"]
    rec = good_record()
    rec["metadata"] = [1]
    assert errors_of(rec) == [f"{SRC}:1: metadata: must be a JSON object; got [1]"]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (["/abs/img.jpg"], "images[0]: absolute paths are not allowed; got '/abs/img.jpg'"),
        (["../img.jpg"], "images[0]: path escapes the image root with '..'; got '../img.jpg'"),
        (["a/../../img.jpg"], "images[0]: path escapes the image root with '..'; got 'a/../../img.jpg'"),
        (["a.jpg", "b.jpg"], "images: must contain exactly one entry; got 2"),
        ([], "images: must contain exactly one entry; got 0"),
        ("a.jpg", "images: must be a list with exactly one path; got 'a.jpg'"),
        ([3], "images[0]: must be a string path; got 3"),
        ([""], "images[0]: must be a non-empty relative path"),
    ],
)
def test_image_path_rules(images: object, message: str) -> None:
    rec = good_record()
    rec["images"] = images
    (line,) = errors_of(rec)
    assert line.startswith(f"{SRC}:1: {message}")


def test_image_path_rule_accepts_inner_dotdot() -> None:
    assert image_path_problem("a/../b/img.jpg") is None
    assert image_path_problem("./img.jpg") is None
    assert image_path_problem("C:/x.jpg") is not None
    assert image_path_problem("a\\b.jpg") is not None


def test_bbox_only_rejects_polygons() -> None:
    assert errors_of(good_record(), bbox_only=True) == [
        f"{SRC}:1: objects[0]: poly geometry under prompt.variant bbox_only"
    ]


def test_record_set_polygon_problems_for_bbox_only_consumers() -> None:
    rs = load([good_record(), good_record()])
    problems = rs.polygon_problems("poly geometry; stage2_ab is bbox-only v1")
    assert [str(p) for p in problems] == [
        f"{SRC}:1: objects[0]: poly geometry; stage2_ab is bbox-only v1",
        f"{SRC}:2: objects[0]: poly geometry; stage2_ab is bbox-only v1",
    ]


# ---------------------------------------------------------------------------------------------
# Acceptance test 20: object order


def unsorted_record() -> dict[str, Any]:
    rec = good_record()
    rec["objects"] = [
        {"desc": f"o{i}", "bbox_2d": [x, y, x + 5, y + 5]}
        for i, (x, y) in enumerate([(0, 0), (10, 10), (5, 50), (0, 100), (30, 120), (400, 100)])
    ]
    return rec


def test_unsorted_objects_under_sorted() -> None:
    assert errors_of(unsorted_record()) == [
        (
            f"{SRC}:1: objects: not top-left-to-bottom-right sorted: objects[4] anchor (y=120, x=30) "
            "before objects[5] anchor (y=100, x=400)"
        )
    ]


def test_unsorted_objects_under_random() -> None:
    rs = load([unsorted_record()], ordering=Ordering.RANDOM)
    assert [o.desc for o in rs[0].objects] == [f"o{i}" for i in range(6)]  # stored order kept


# ---------------------------------------------------------------------------------------------
# Acceptance test 21 and the file rules of §1.1


def test_problems_are_collected_across_the_file() -> None:
    bad = good_record()
    bad["width"] = 427
    values = [good_record()] + [bad] * 25
    with pytest.raises(DataContractError) as info:
        load(values)
    lines = str(info.value).split("\n")
    assert len(lines) == 21
    assert lines[0] == f"{SRC}:2: width: must be a positive multiple of 32; got 427"
    assert lines[19].startswith(f"{SRC}:21: ")
    assert lines[20] == "... and 5 more"
    assert len(info.value.problems) == 25  # the full list, for validate_dataset


def test_validate_jsonl_records_returns_every_problem_and_the_valid_records() -> None:
    bad = good_record()
    bad["coord_space"] = "pixel"
    lines = [(1, line_of(good_record())), (2, line_of(bad)), (3, line_of(good_record()))]
    rs, problems = validate_jsonl_records(
        lines, SRC, max_pixels=MAX_PIXELS, bbox_only=False, ordering=Ordering.SORTED
    )
    assert [r.line for r in rs] == [1, 3]
    assert [(p.line, p.field) for p in problems] == [(2, "coord_space")]


def test_blank_lines_are_skipped_but_counted() -> None:
    bad = good_record()
    bad["width"] = 100
    text = "\n".join(["", line_of(good_record()), "   ", line_of(bad), ""]) + "\n"
    with pytest.raises(DataContractError, match=r"^data/train.jsonl:4: width: "):
        parse_jsonl_records(
            numbered_lines(text), SRC, max_pixels=MAX_PIXELS, bbox_only=False, ordering=Ordering.SORTED
        )


def test_numbered_lines() -> None:
    assert list(numbered_lines("a\r\n\nb\n")) == [(1, "a"), (2, ""), (3, "b")]
    assert list(numbered_lines("a")) == [(1, "a")]
    assert list(numbered_lines("")) == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"width": NaN}', "invalid JSON: NaN is not valid JSON"),
        ('{"width": -Infinity}', "invalid JSON: -Infinity is not valid JSON"),
        ('{"width": 640, "width": 640}', "invalid JSON: duplicate key 'width'"),
        ('{"width": 640,}', "invalid JSON: "),
        ("// comment", "invalid JSON: "),
    ],
)
def test_strict_json(text: str, fragment: str) -> None:
    with pytest.raises(DataContractError) as info:
        parse_jsonl_records(
            [(7, text)], SRC, max_pixels=MAX_PIXELS, bbox_only=False, ordering=Ordering.SORTED
        )
    assert str(info.value).startswith(f"{SRC}:7: {fragment}")


def test_limit_keeps_the_first_records_after_validating_all() -> None:
    assert [r.line for r in load([good_record()] * 3, limit=2)] == [1, 2]
    bad = good_record()
    bad["width"] = 100
    with pytest.raises(DataContractError):
        load([good_record(), good_record(), bad], limit=1)


def test_validate_record_directly() -> None:
    record, problems = validate_record(
        good_record(), max_pixels=MAX_PIXELS, bbox_only=False, ordering=Ordering.SORTED
    )
    assert problems == [] and isinstance(record, Record)
    record, problems = validate_record(
        with_object({"desc": "a", "bbox_2d": [1, 2, 3]}),
        max_pixels=MAX_PIXELS,
        bbox_only=False,
        ordering=Ordering.SORTED,
    )
    assert record is None
    assert problems == [("objects[0].bbox_2d", "must contain exactly 4 values; got len=3")]


# ---------------------------------------------------------------------------------------------
# Serialisation (§9.7)


def test_record_to_json_line_reproduces_a_converter_line() -> None:
    original = good_record()
    text = line_of(original)
    rec = parse_jsonl_records(
        [(1, text)], SRC, max_pixels=MAX_PIXELS, bbox_only=False, ordering=Ordering.SORTED
    )[0]
    assert record_to_json_line(rec) == text
    assert list(record_to_json(rec)) == sorted(original)
    assert '"desc": "cat", "bbox_2d": [12, 40, 300, 410], "category_id": 17, "ann_id": 5' in text


def test_serialisation_keeps_non_ascii() -> None:
    rec = load([with_object({"desc": "狗", "bbox_2d": [1, 2, 3, 4]})])[0]
    assert '"desc": "狗"' in record_to_json_line(rec)


def test_tokens_are_written_as_integers() -> None:
    rec = load([with_object({"desc": "a", "bbox_2d": ["<|coord_1|>", 2, 3, 4]})])[0]
    assert record_to_json(rec)["objects"][0]["bbox_2d"] == [1, 2, 3, 4]


@st.composite
def valid_records(draw: st.DrawFn) -> dict[str, Any]:
    objs = []
    for _ in range(draw(st.integers(0, 5))):
        x1, x2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2, unique=True)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2, unique=True)))
        desc = draw(st.sampled_from(["cat", "traffic light", "bow (weapon)", "a, b"]))
        objs.append(DetObject(desc, GeometryKind.BBOX, (x1, y1, x2, y2)))
    value: dict[str, Any] = {
        "coord_space": "norm1000",
        "height": 32 * draw(st.integers(1, 24)),
        "images": ["images/x.jpg"],
        "objects": [{"desc": o.desc, "bbox_2d": list(o.bins)} for o in sort_objects(objs)],
        "width": 32 * draw(st.integers(1, 32)),
    }
    return value


@given(valid_records())
def test_round_trip_of_valid_records(value: dict[str, Any]) -> None:
    text = line_of(value)
    rec = parse_jsonl_records(
        [(1, text)], SRC, max_pixels=MAX_PIXELS, bbox_only=False, ordering=Ordering.SORTED
    )[0]
    assert record_to_json_line(rec) == text
    again = parse_jsonl_records(
        [(1, record_to_json_line(rec))], SRC, max_pixels=MAX_PIXELS, bbox_only=False, ordering=Ordering.SORTED
    )[0]
    assert again == rec


def test_mutating_the_input_does_not_change_the_record() -> None:
    value = good_record()
    rec = load([copy.deepcopy(value)])[0]
    assert record_to_json(rec) == value


# ---------------------------------------------------------------------------------------------
# Acceptance test 23: strict artifact reader


def test_artifact_reader_malformed_line_snippet() -> None:
    long_line = '{"index": 0, "pred": [' + "x" * 500
    with pytest.raises(ArtifactError) as info:
        list(parse_artifact_lines([(1, '{"index": 0}'), (2, ""), (3, long_line)], "out/gt_vs_pred.jsonl"))
    message = str(info.value)
    prefix = "Malformed JSONL at out/gt_vs_pred.jsonl:3: "
    assert message.startswith(prefix)
    snippet = message[len(prefix) :]
    assert snippet == long_line[:200] + "…"


def test_artifact_reader_short_line_and_non_object() -> None:
    with pytest.raises(ArtifactError, match=r"^Malformed JSONL at a.jsonl:1: \{bad$"):
        list(parse_artifact_lines([(1, "{bad")], "a.jsonl"))
    with pytest.raises(ArtifactError, match=r"^Non-object JSONL record at a.jsonl:2$"):
        list(parse_artifact_lines([(1, "{}"), (2, "[1, 2]")], "a.jsonl"))
    with pytest.raises(ArtifactError, match="Malformed"):
        list(parse_artifact_lines([(1, '{"score": NaN}')], "a.jsonl"))
    assert list(parse_artifact_lines([(1, " "), (2, '{"index": 3}')], "a.jsonl")) == [(2, {"index": 3})]
