"""The msgspec fast paths of the evaluator's reader and writers change nothing (issue 16).

Expected values come from the stdlib ``json`` module on the same text, never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from application.evaluate import json_compact, jsonl_text, read_artifact_records
from domain.errors import ArtifactError

TRICKY = [
    '{"index": 0, "a": 1.5e-7, "s": "caf\\u00e9 \\u2028", "big": 123456789012345678901234567890}',
    "",
    '  {"index": 1, "nested": {"k": [1, 2.0, -0.0, null, true]}}  ',
    '{"index": 2, "dup": 1, "dup": 2}',
    '\u00a0{"index": 3}\u00a0',  # no-break spaces: not JSON whitespace, the strict reader strips them
]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reader_equals_json_on_tricky_lines(tmp_path: Path) -> None:
    records, numbers = read_artifact_records(write(tmp_path / "a.jsonl", TRICKY))
    want = [(json.loads(t.strip()), n) for n, t in enumerate(TRICKY, start=1) if t.strip()]
    assert records == [w for w, _ in want] and numbers == [n for _, n in want]
    assert type(records[0]["big"]) is int and str(records[0]["big"]) == "123456789012345678901234567890"


@pytest.mark.parametrize(
    ("line", "message"),
    [("[1, 2]", r"Non-object JSONL record at .*a.jsonl:2"), ('{"x": NaN}', r"Malformed JSONL at .*a.jsonl:2"),
     ('{"x": 1} {"y": 2}', r"Malformed JSONL at .*a.jsonl:2"), ('"text"', r"Non-object JSONL record at .*:2")],
)  # fmt: skip
def test_reader_stays_strict(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        read_artifact_records(write(tmp_path / "a.jsonl", ['{"index": 0}', line]))


def test_writers_equal_json_values(tmp_path: Path) -> None:
    docs: list[Any] = [
        {"images": [{"id": 1, "file_name": "é.jpg"}], "v": [0.1 + 0.2, 1e-5, 1e22, -0.0], "n": None},
        [{"big": 2**80, "s": "\ud800"}],  # beyond msgspec: the json fallback
    ]
    for doc in docs:
        text = json_compact(doc)
        assert text.endswith("\n") and "\n" not in text[:-1]
        assert json.loads(text) == json.loads(json.dumps(doc))
    rows = [{"i": i, "x": i / 7} for i in range(5)]
    assert [json.loads(line) for line in jsonl_text(rows).splitlines()] == rows


# --- the duplicate monitor on less data (duplicate_summary) ---------------------------------------------

from hypothesis import given, settings
from hypothesis import strategies as st

from application.evaluate import duplicate_summary
from domain.duplicates import objects_in_bins_batch, summarize_duplicates
from domain.evaluation import EvalImage, EvalObject
from domain.objects import GeometryKind

DESCS = ["cat", "Cat", " cat ", "cat  toy", "cat toy", "dog", "", "DOG"]  # equal monitor keys on purpose


@st.composite
def monitored_image(draw: Any, image_id: int) -> EvalImage:
    w, h = draw(st.sampled_from([(2, 2), (3, 7), (17, 5), (640, 480), (1001, 999)]))
    preds: list[EvalObject] = []
    for _ in range(draw(st.integers(0, 12))):
        desc = draw(st.sampled_from(DESCS))
        if draw(st.integers(0, 9)) == 0:  # a polygon: never in the monitor's boxes
            xs = [draw(st.integers(0, w - 1)) for _ in range(3)]
            ys = [draw(st.integers(0, h - 1)) for _ in range(3)]
            points = tuple(v for xy in zip(xs, ys) for v in xy)
            preds.append(EvalObject(GeometryKind.POLY, points, desc, 0.5))
            continue
        x1, x2 = sorted(draw(st.lists(st.integers(0, w - 1), min_size=2, max_size=2, unique=True)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, h - 1), min_size=2, max_size=2, unique=True)))
        if draw(st.booleans()) and preds and preds[-1].kind is GeometryKind.BBOX:  # near-copies of the last box
            px1, py1, px2, py2 = preds[-1].points
            x1, y1 = max(px1 - draw(st.integers(0, 1)), 0), max(py1 - draw(st.integers(0, 1)), 0)
            x2, y2 = px2, py2
        preds.append(EvalObject(GeometryKind.BBOX, (x1, y1, x2, y2), desc, 0.5))
    return EvalImage(image_id, image_id + 1, f"{image_id}.jpg", w, h, None, (), tuple(preds), ())


@st.composite
def monitored_images(draw: Any) -> list[EvalImage]:
    return [draw(monitored_image(k)) for k in range(draw(st.integers(0, 6)))]


@given(monitored_images())
@settings(max_examples=300, deadline=None)
def test_duplicate_summary_equals_the_monitor_on_every_prediction(images: list[EvalImage]) -> None:
    want = summarize_duplicates(objects_in_bins_batch([(i.preds, i.width, i.height) for i in images]))
    assert duplicate_summary(images) == want


def test_duplicate_summary_finds_a_cluster_across_case_and_spacing() -> None:
    boxes = [(10, 10, 100, 100), (11, 10, 100, 101), (10, 11, 101, 100)]
    preds = tuple(EvalObject(GeometryKind.BBOX, b, d, 0.9) for b, d in zip(boxes, ["Cat", "cat ", " CAT"]))
    image = EvalImage(0, 1, "0.jpg", 640, 480, None, (), preds, ())
    summary = duplicate_summary([image])
    assert summary == summarize_duplicates(objects_in_bins_batch([(preds, 640, 480)]))
    assert (summary.pairs, summary.max_cluster_size, summary.excess_objects) == (3, 3, 2)
