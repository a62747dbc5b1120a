"""Canonical serialisation and typed serialisation (data.md §5.2, §11.27; stage1.md §2.2, §9.24–25)."""

from __future__ import annotations

import itertools
import json

import pytest
from coordjson_toy import OBJECT_LISTS, box
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.coordjson import CharSpan, TokenClass, render, render_typed
from domain.errors import CoordTokenError
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

DESC_FIRST, GEOM_FIRST = FieldOrder.DESC_FIRST, FieldOrder.GEOMETRY_FIRST
TOKENS, NUMERIC = CoordMode.TOKENS, CoordMode.NUMERIC


# ---- data.md §5.2 goldens, byte-exact -------------------------------------------------------------

GOLDENS = [
    (
        [box("cat", 12, 40, 300, 410)],
        DESC_FIRST,
        TOKENS,
        '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_12|>, <|coord_40|>, <|coord_300|>, <|coord_410|>]}]}',
    ),
    (
        [box("cat", 1, 2, 3, 4)],
        GEOM_FIRST,
        TOKENS,
        '{"objects": [{"bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>], "desc": "cat"}]}',
    ),
    (
        [
            DetObject("yellow box", GeometryKind.POLY, (12, 34, 56, 34, 56, 78)),
            box("tool cabinet", 100, 120, 180, 200),
        ],
        DESC_FIRST,
        TOKENS,
        (
            '{"objects": [{"desc": "yellow box", "poly": [<|coord_12|>, <|coord_34|>, <|coord_56|>, <|coord_34|>, '
            '<|coord_56|>, <|coord_78|>]}, {"desc": "tool cabinet", "bbox_2d": [<|coord_100|>, <|coord_120|>, '
            "<|coord_180|>, <|coord_200|>]}]}"
        ),
    ),
    (
        [box("cat", 1, 2, 3, 4), DetObject("dog", GeometryKind.POLY, (1, 2, 3, 4, 5, 6))],
        DESC_FIRST,
        NUMERIC,
        '{"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4]}, {"desc": "dog", "poly": [1, 2, 3, 4, 5, 6]}]}',
    ),
    ([], DESC_FIRST, TOKENS, '{"objects": []}'),
    ([], GEOM_FIRST, NUMERIC, '{"objects": []}'),
]


@pytest.mark.parametrize(("objects", "order", "mode", "expected"), GOLDENS)
def test_render_goldens_byte_exact(
    objects: list[DetObject], order: FieldOrder, mode: CoordMode, expected: str
) -> None:
    assert render(objects, order, mode) == expected
    assert render_typed(objects, order, mode)[0] == expected


def test_render_defaults_are_desc_first_tokens() -> None:
    assert render([box("cat", 12, 40, 300, 410)]) == GOLDENS[0][3]


def test_desc_is_json_escaped_with_non_ascii_kept() -> None:
    text = render([box('café "big" a\\b\n', 1, 2, 3, 4)])
    assert text.startswith('{"objects": [{"desc": "café \\"big\\" a\\\\b\\n", "bbox_2d": [')
    assert "\\u" not in text


def test_out_of_range_bins_are_refused() -> None:
    with pytest.raises(CoordTokenError):
        render([box("cat", 1, 2, 3, 1000)])
    with pytest.raises(CoordTokenError):
        render([box("cat", -1, 2, 3, 4)], coord_mode=NUMERIC)


# ---- typed serialisation (stage1.md §2.2) ---------------------------------------------------------


def classes(text: str, spans: list[CharSpan]) -> list[TokenClass]:
    out = [TokenClass.FORMAT] * len(text)
    for s in spans:
        for i in range(s.start, s.end):
            assert out[i] is TokenClass.FORMAT, "spans overlap"
            out[i] = s.cls
    return out


def runs(text: str, spans: list[CharSpan], cls: TokenClass) -> list[str]:
    return [text[s.start : s.end] for s in spans if s.cls is cls]


def test_typed_example_of_stage1() -> None:
    """§2.2 example: DESC = `black cat`; COORD = four tokens; quotes and everything else FORMAT."""
    text, spans = render_typed([box("black cat", 12, 40, 300, 410)])
    expected = (
        '{"objects": [{"desc": "black cat", "bbox_2d": [<|coord_12|>, <|coord_40|>, <|coord_300|>, '
        "<|coord_410|>]}]}"
    )
    assert text == expected
    assert runs(text, spans, TokenClass.DESC) == ["black cat"]
    assert runs(text, spans, TokenClass.COORD) == [
        "<|coord_12|>",
        "<|coord_40|>",
        "<|coord_300|>",
        "<|coord_410|>",
    ]
    cls = classes(text, spans)
    desc_start = text.index("black cat")
    assert cls[desc_start - 1] is TokenClass.FORMAT and text[desc_start - 1] == '"'
    assert cls[desc_start + len("black cat")] is TokenClass.FORMAT
    format_text = "".join(ch for ch, k in zip(text, cls) if k is TokenClass.FORMAT)
    assert format_text == '{"objects": [{"desc": "", "bbox_2d": [, , , ]}]}'


def test_typed_geometry_first_swaps_fields_only() -> None:
    a_text, a_spans = render_typed([box("black cat", 12, 40, 300, 410)], DESC_FIRST)
    b_text, b_spans = render_typed([box("black cat", 12, 40, 300, 410)], GEOM_FIRST)
    assert b_text == render([box("black cat", 12, 40, 300, 410)], GEOM_FIRST)
    assert runs(a_text, a_spans, TokenClass.DESC) == runs(b_text, b_spans, TokenClass.DESC)
    assert runs(a_text, a_spans, TokenClass.COORD) == runs(b_text, b_spans, TokenClass.COORD)
    assert [s.cls for s in b_spans] == [TokenClass.COORD] * 4 + [TokenClass.DESC]


@pytest.mark.parametrize(
    ("objects", "order", "mode"),
    [
        ([box("cat", 1, 2, 3, 4)], DESC_FIRST, TOKENS),
        ([box("cat", 1, 2, 3, 4)], GEOM_FIRST, TOKENS),
        ([DetObject("yellow box", GeometryKind.POLY, (12, 34, 56, 34, 56, 78))], DESC_FIRST, TOKENS),
        ([], DESC_FIRST, TOKENS),
        ([box("café", 1, 2, 3, 4)], DESC_FIRST, TOKENS),
        ([box('say "hi"', 1, 2, 3, 4)], DESC_FIRST, NUMERIC),
    ],
)
def test_typed_text_equals_serializer_text(
    objects: list[DetObject], order: FieldOrder, mode: CoordMode
) -> None:
    """stage1.md §9.24."""
    text, spans = render_typed(objects, order, mode)
    assert text == render(objects, order, mode)
    if not objects:
        assert spans == []


def test_escaped_desc_span_includes_escapes() -> None:
    text, spans = render_typed([box('say "hi"', 1, 2, 3, 4)])
    assert runs(text, spans, TokenClass.DESC) == ['say \\"hi\\"']


def test_numeric_coord_spans_are_the_integers() -> None:
    text, spans = render_typed([box("cat", 1, 22, 333, 999)], coord_mode=NUMERIC)
    assert runs(text, spans, TokenClass.COORD) == ["1", "22", "333", "999"]


@settings(deadline=None)
@given(OBJECT_LISTS, st.sampled_from(list(FieldOrder)))
def test_typed_spans_cover_every_desc_and_coord(objects: list[DetObject], order: FieldOrder) -> None:
    for mode in CoordMode:
        text, spans = render_typed(objects, order, mode)
        assert text == render(objects, order, mode)
        assert all(a.end <= b.start for a, b in itertools.pairwise(spans)), "sorted, non-overlapping"
        descs = runs(text, spans, TokenClass.DESC)
        assert [json.loads(f'"{d}"') for d in descs] == [o.desc for o in objects]
        coords = runs(text, spans, TokenClass.COORD)
        flat = [k for o in objects for k in o.bins]
        expect = [f"<|coord_{k}|>" if mode is TOKENS else str(k) for k in flat]
        assert coords == expect
        # Every other character is format and carries no desc or coord text.
        cls = classes(text, spans)
        fmt = "".join(ch for ch, k in zip(text, cls) if k is TokenClass.FORMAT)
        assert "coord" not in fmt
