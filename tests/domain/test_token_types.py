"""Token types (stage1.md §2, tests 25-32) on a deterministic stand-in tokenizer.

The stand-in splits text into pieces of random size that never cut a coord token (coord tokens are
added special tokens, one id each, exactly like the real tokenizer) and may fuse characters of
different classes (like BPE fusing a closing quote with ``, ``). The real-tokenizer version of
these checks lives in tests/adapters/test_collator.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.coordjson import render_typed
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind
from domain.token_types import (
    COORD,
    DESC,
    FORMAT,
    IGNORE,
    DatasetFilter,
    TypingStatus,
    align_to_supervised,
    char_classes,
    classify_tokens,
    dataset_label,
    packed_types_row,
    padded_types_row,
    type_sample,
)

COORD_BASE = 5000
IM_END = 7
NEWLINE = 8
PAD = 9
OTHER_SPECIALS = (1, 2, 3, 4, 6)  # e.g. <|endoftext|>, <|im_start|>, ...
SPECIAL_IDS = frozenset({IM_END, *OTHER_SPECIALS, *range(COORD_BASE, COORD_BASE + 1000)})
COORD_IDS = frozenset(range(COORD_BASE, COORD_BASE + 1000))
_COORD_RE = re.compile(r"<\|coord_(\d+)\|>")


class StandInTokenizer:
    """Text -> (ids, offsets). Coord tokens are atomic; other text is cut at the given piece sizes."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, 100 + len(self.vocab))

    def encode(self, text: str, sizes: list[int] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        cuts = iter(sizes or [])
        pos = 0
        for m in [*_COORD_RE.finditer(text), None]:
            end = m.start() if m is not None else len(text)
            while pos < end:
                n = max(1, min(next(cuts, 3), end - pos))
                ids.append(self._id(text[pos : pos + n]))
                offsets.append((pos, pos + n))
                pos += n
            if m is not None:
                ids.append(COORD_BASE + int(m.group(1)))
                offsets.append((m.start(), m.end()))
                pos = m.end()
        return ids, offsets


def render_with_spans(
    objects: list[tuple[str, list[int]]], coord_mode: CoordMode
) -> tuple[str, list[tuple[int, int, int]]]:
    """An independent, minimal desc_first bbox renderer with class spans (test oracle only)."""
    text = '{"objects": ['
    spans: list[tuple[int, int, int]] = []
    for k, (desc, bins) in enumerate(objects):
        if k:
            text += ", "
        text += '{"desc": "'
        escaped = json.dumps(desc, ensure_ascii=False)[1:-1]
        spans.append((len(text), len(text) + len(escaped), DESC))
        text += escaped + '", "bbox_2d": ['
        for j, b in enumerate(bins):
            if j:
                text += ", "
            tok = f"<|coord_{b}|>" if coord_mode is CoordMode.TOKENS else str(b)
            spans.append((len(text), len(text) + len(tok), COORD))
            text += tok
        text += "]}"
    text += "]}"
    return text, spans


def _sample_labels(target_ids: list[int], prompt_len: int = 5) -> np.ndarray:
    # prompt (unsupervised) + target + <|im_end|> (supervised) + "\n" (unsupervised), data.md §6.3
    return np.array([-100] * prompt_len + target_ids + [IM_END, -100], dtype=np.int64)


# --- rule 2 ---------------------------------------------------------------------------------



def _type_text(
    labels: np.ndarray, ids: list[int], offsets: list[tuple[int, int]], text: str, spans: Any,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> Any:
    """``type_sample`` for a target typed from its own text, with the stand-in tokenizer's ids."""
    return type_sample(
        labels, text_ids=ids, text_offsets=offsets, text_length=len(text), spans=spans, suffix_ids=[IM_END],
        special_ids=SPECIAL_IDS, coord_ids=COORD_IDS, coord_mode=coord_mode,
    )

def test_majority_and_tie_break() -> None:
    classes = np.array([FORMAT, FORMAT, DESC, DESC, COORD, COORD, DESC, FORMAT], dtype=np.int8)
    offsets = [(0, 3), (0, 4), (2, 6), (1, 3), (5, 7), (4, 6), (3, 3), (9, 12), (5, 2)]
    assert classify_tokens(offsets, classes) == [
        FORMAT,  # F F D
        DESC,  # F F D D: tie DESC > FORMAT
        COORD,  # D D C C: tie COORD > DESC
        DESC,  # F D tie
        COORD,  # C D tie
        COORD,
        FORMAT,  # empty offset
        FORMAT,  # outside the text
        FORMAT,  # invalid
    ]


def test_char_classes_default_to_format() -> None:
    assert char_classes(4, [(1, 3, DESC)]).tolist() == [FORMAT, DESC, DESC, FORMAT]
    with pytest.raises(ValueError):
        char_classes(4, [(2, 5, DESC)])


# --- test 25/26: the §2.2 example, one sample row -------------------------------------------------


def test_section_2_2_example_row() -> None:
    tok = StandInTokenizer()
    text, spans = render_with_spans([("black cat", [12, 40, 300, 410])], CoordMode.TOKENS)
    assert text == (
        '{"objects": [{"desc": "black cat", "bbox_2d": '
        "[<|coord_12|>, <|coord_40|>, <|coord_300|>, <|coord_410|>]}]}"
    )
    ids, offsets = tok.encode(text, sizes=[1] * len(text))  # one piece per character
    labels = _sample_labels(ids)
    typed = _type_text(labels, ids, offsets, text, spans)
    assert typed.ok
    row = typed.row
    assert row.shape == labels.shape and row.dtype == np.int64
    assert (row[:5] == IGNORE).all() and row[-1] == IGNORE  # prompt and trailing newline
    assert row[-2] == FORMAT  # <|im_end|>
    body = row[5:-2]
    desc_text = "".join(text[a:b] for (a, b), t in zip(offsets, body) if t == DESC)
    assert desc_text == "black cat"
    coord_pos = [k for k, i in enumerate(ids) if i in COORD_IDS]
    assert [k for k, t in enumerate(body) if t == COORD] == coord_pos and len(coord_pos) == 4
    # the desc quotes are FORMAT
    quote_pos = [k for k, (a, b) in enumerate(offsets) if text[a:b] == '"' and a in (22, 32)]
    assert len(quote_pos) == 2 and all(body[k] == FORMAT for k in quote_pos)


def test_empty_objects_is_all_format() -> None:
    tok = StandInTokenizer()
    text, spans = render_with_spans([], CoordMode.TOKENS)
    assert text == '{"objects": []}'
    ids, offsets = tok.encode(text)
    typed = _type_text(_sample_labels(ids), ids, offsets, text, spans)
    assert typed.ok and set(typed.row[typed.row != IGNORE].tolist()) == {FORMAT}


def test_no_supervision_is_an_ignore_row_not_a_failure() -> None:
    typed = type_sample(
        np.full(6, -100),
        text_ids=[],
        text_offsets=[],
        text_length=0,
        spans=[],
        suffix_ids=[IM_END],
        special_ids=SPECIAL_IDS,
        coord_ids=COORD_IDS,
        coord_mode=CoordMode.TOKENS,
    )
    assert typed.status is TypingStatus.NO_SUPERVISION and (typed.row == IGNORE).all()


# --- test 27: labels cut inside the third coord token ------------------------------------------


def test_right_truncated_labels_align_on_the_prefix() -> None:
    tok = StandInTokenizer()
    text, spans = render_with_spans([("dog", [1, 2, 3, 4])], CoordMode.TOKENS)
    ids, offsets = tok.encode(text)
    third = [k for k, i in enumerate(ids) if i in COORD_IDS][2]
    cut = ids[:third]  # the third coord token and everything after are gone
    labels = np.array([-100] * 3 + cut, dtype=np.int64)
    typed = _type_text(labels, ids, offsets, text, spans)
    assert typed.ok
    assert (typed.row[3:] == COORD).sum() == 2
    assert typed.row[3:].tolist() == classify_tokens(offsets, char_classes(len(text), spans))[:third]


# --- test 28: ≤ 8 special ids beyond the typed text ---------------------------------------------


@pytest.mark.parametrize(("extra", "accepted"), [(0, True), (1, True), (8, True), (9, False)])
def test_special_tail_rule(extra: int, accepted: bool) -> None:
    typed_ids = [100, 101, IM_END]
    typed_types = [FORMAT, DESC, FORMAT]
    tail = [OTHER_SPECIALS[k % len(OTHER_SPECIALS)] for k in range(extra)]
    types, reason = align_to_supervised(
        typed_ids, typed_types, typed_ids + tail, special_ids=SPECIAL_IDS, coord_ids=COORD_IDS
    )
    if accepted:
        assert reason == "" and types == typed_types + [FORMAT] * extra
    else:
        assert types == [] and "9 supervised ids" in reason


def test_non_special_tail_or_id_mismatch_fails() -> None:
    _, reason = align_to_supervised([100], [FORMAT], [100, 555], special_ids=SPECIAL_IDS, coord_ids=None)
    assert "not special" in reason
    _, reason = align_to_supervised(
        [100, 101], [FORMAT, FORMAT], [100, 102], special_ids=SPECIAL_IDS, coord_ids=None
    )
    assert "supervised position 1" in reason


def test_tokens_mode_cross_check() -> None:
    # a coord id typed DESC (coord-token text inside a desc) is an alignment failure
    _, reason = align_to_supervised(
        [COORD_BASE + 5], [DESC], [COORD_BASE + 5], special_ids=SPECIAL_IDS, coord_ids=COORD_IDS
    )
    assert "is a coord id" in reason
    _, reason = align_to_supervised([100], [COORD], [100], special_ids=SPECIAL_IDS, coord_ids=COORD_IDS)
    assert "is not a coord id" in reason
    # a coord id in the special tail is typed FORMAT, which the cross-check rejects
    _, reason = align_to_supervised(
        [100], [FORMAT], [100, COORD_BASE], special_ids=SPECIAL_IDS, coord_ids=COORD_IDS
    )
    assert reason


# --- test 32: numeric mode ------------------------------------------------------------------------


def test_numeric_mode_digit_tokens_are_coord() -> None:
    tok = StandInTokenizer()
    text, spans = render_with_spans([("cat", [12, 40, 300, 410])], CoordMode.NUMERIC)
    assert "[12, 40, 300, 410]" in text
    ids, offsets = tok.encode(text, sizes=[1] * len(text))
    typed = _type_text(_sample_labels(ids), ids, offsets, text, spans, CoordMode.NUMERIC)
    assert typed.ok
    body = typed.row[5:-2]
    coord_text = "".join(text[a:b] for (a, b), t in zip(offsets, body) if t == COORD)
    assert coord_text == "1240300410"
    geometry = text.index("[12")
    assert all(text[a:b].isdigit() == (t == COORD) for (a, b), t in zip(offsets, body) if a >= geometry)


# --- property: coord tokens are COORD and only those; rows stay aligned with labels ----------------

DESCS = st.text(
    alphabet=st.sampled_from(list('abc xyz"\\é,:{}[]<|>_0123456789')), min_size=1, max_size=12
).filter(lambda s: s.strip() == s and "<|" not in s)


@settings(max_examples=200, deadline=None)
@given(
    objects=st.lists(st.tuples(DESCS, st.lists(st.integers(0, 999), min_size=4, max_size=4)), max_size=4),
    sizes=st.lists(st.integers(1, 6), max_size=200),
    prompt_len=st.integers(1, 10),
)
def test_every_coord_token_is_coord_and_only_those(
    objects: list[tuple[str, list[int]]], sizes: list[int], prompt_len: int
) -> None:
    tok = StandInTokenizer()
    text, spans = render_with_spans(objects, CoordMode.TOKENS)
    ids, offsets = tok.encode(text, sizes)
    labels = _sample_labels(ids, prompt_len)
    typed = _type_text(labels, ids, offsets, text, spans)
    assert typed.ok, typed.reason
    row = typed.row
    assert row.shape == labels.shape
    assert ((row == IGNORE) == (labels == -100)).all()
    assert ((row == COORD) == np.isin(labels, list(COORD_IDS))).all()
    assert (row[labels == IM_END] == FORMAT).all()
    # a piece made only of desc characters is DESC; only of structure characters is FORMAT
    classes = char_classes(len(text), spans)
    for (a, b), t in zip(offsets, row[prompt_len : prompt_len + len(ids)]):
        window = set(classes[a:b].tolist())
        if len(window) == 1:
            assert t == window.pop()


# --- test 31: dataset filter ------------------------------------------------------------------------


def test_dataset_filter() -> None:
    assert dataset_label("/data/LVIS.jsonl") == "lvis"
    assert dataset_label("coco_train.v2.jsonl") == "coco_train.v2"
    assert DatasetFilter().admits("anything")
    assert not DatasetFilter(include=["coco"]).admits(dataset_label("/x/LVIS.jsonl"))
    assert DatasetFilter(include=["COCO"]).admits("coco")
    assert not DatasetFilter(include=["coco"], exclude=["coco"]).admits("coco")
    assert not DatasetFilter(exclude=["Lvis"]).admits("lvis")


# --- tests 29/30: padded and packed rows ------------------------------------------------------------


def test_padded_row() -> None:
    typed = np.array([IGNORE, FORMAT, COORD], dtype=np.int64)
    assert padded_types_row(typed, 3, 5).tolist() == [IGNORE, FORMAT, COORD, IGNORE, IGNORE]
    assert padded_types_row(None, 3, 5).tolist() == [IGNORE] * 5
    assert padded_types_row(typed, 4, 5).tolist() == [IGNORE] * 5  # result length != sample length


def test_packed_row_members_and_mismatch() -> None:
    a = np.array([IGNORE, FORMAT, DESC], dtype=np.int64)
    c = np.array([IGNORE, COORD], dtype=np.int64)
    row = packed_types_row([a, None, c], [3, 4, 2], 9)
    assert row.shape == (9,)
    assert row.tolist() == [IGNORE, FORMAT, DESC, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, COORD]
    # injected mismatches: whole row IGNORE, no exception
    assert (packed_types_row([a, None, c], [3, 4, 2], 10) == IGNORE).all()
    assert (packed_types_row([a, None, c[:1]], [3, 4, 2], 9) == IGNORE).all()
    assert packed_types_row([a, None, c], [3, 4, 2], 10).shape == (10,)


# --- the project's typed serialiser feeds the same typing (tests 24/25 from the typing side) ---------


@pytest.mark.parametrize("field_order", [FieldOrder.DESC_FIRST, FieldOrder.GEOMETRY_FIRST])
@pytest.mark.parametrize(
    "objects",
    [
        [DetObject("black cat", GeometryKind.BBOX, (12, 40, 300, 410))],
        [
            DetObject("café", GeometryKind.BBOX, (0, 1, 2, 3)),
            DetObject('a "b" \\ c', GeometryKind.POLY, (1, 2, 3, 4, 5, 6)),
        ],
        [],
    ],
    ids=["example", "cafe-quotes-poly", "empty"],
)
def test_render_typed_spans_type_coord_and_desc(field_order: FieldOrder, objects: list[DetObject]) -> None:
    text, spans = render_typed(objects, field_order, CoordMode.TOKENS)
    tok = StandInTokenizer()
    ids, offsets = tok.encode(text, sizes=[1] * len(text))
    typed = _type_text(_sample_labels(ids), ids, offsets, text, spans)
    assert typed.ok, typed.reason
    body = typed.row[5:-2]
    descs = [json.dumps(o.desc, ensure_ascii=False)[1:-1] for o in objects]
    assert "".join(text[a:b] for (a, b), t in zip(offsets, body) if t == DESC) == "".join(descs)
    assert sum(1 for t in body if t == COORD) == sum(len(o.bins) for o in objects)
    assert all((t == COORD) == (i in COORD_IDS) for i, t in zip(ids, body))
