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
