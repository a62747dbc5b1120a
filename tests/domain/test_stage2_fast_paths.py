"""Fast paths of the Channel-B target step held equal to the general paths they short-cut (issue 12).

- ``coordjson._parse_record``: a record of the common two-member shape is read from one regex match;
  the members (and the end) must equal the general walk's, and any record the match rejects goes to the walk.
- ``coordjson._record_end``: a record without a nested ``{`` ends at one regex match; equal to the walk.
- ``coordjson.scan_tokens``: a coord literal the token check found to be exactly token ``i`` is
  grouped as ``(i,)`` without the walk; the groups must equal the token-overlap walk's.
- ``stage2_targets._fragment_encoder``: the FN fragment's ids assembled from memoised encodings of the
  segments between coord tokens must equal ``encode(fragment)`` (on the tiny Qwen tokenizer: arbitrary
  text around coord tokens and generated fragments; on the toy tokenizer), a tokenizer that does not
  split at coord tokens must turn the memo off, and whole-step results must not depend on the memo.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import numpy as np
import pytest
from coordjson_toy import ToyTokenizer, box, c, det_objects
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stage2_targets import rollouts

from domain import coordjson, duplicates, stage2_matching, stage2_targets
from domain.errors import DataContractError, GeometryError, InvariantViolation
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind
from domain.stage2_matching import BinGeometry, MatchSettings, match_predictions
from domain.stage2_targets import (
    CoordGroup,
    GroupSource,
    MaskClass,
    SampleRef,
    Stage2Variant,
    TargetSettings,
    construct_targets,
    match_inputs,
    scan_rollout,
)

TOK = ToyTokenizer()

WS = st.sampled_from(["", " ", "  ", "\n", "\t ", "\r"])
KEYS = st.sampled_from(['"desc"', '"bbox_2d"', '"poly"', '"score"', '"de\\u0073c"', '"x\\"y"', "desc", '""'])
STRINGS = st.sampled_from(
    ['"cat"', '"traffic light"', '""', '"   "', '"a\\"b"', '"a]}\\"x"', '"\\u00e9"', '"bad\\q"', '"x']
)
LITERALS = st.sampled_from(
    [
        c(1),
        c(999),
        c(0),
        "<|coord_1000|>",
        "<|coord_01|>",
        "<|im_end|>",
        "1",
        "-1",
        "1.5",
        "1e2",
        "007",
        "true",
        '"<|coord_3|>"',
    ]
)


@st.composite
def values(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 6))
    if kind <= 2:
        return draw(STRINGS)
    if kind <= 5:
        sep = draw(st.sampled_from([", ", ",", " , ", ",\n"]))
        items = draw(st.lists(LITERALS, max_size=9))
        return "[" + draw(WS) + sep.join(items) + draw(WS) + "]"
    return draw(st.sampled_from(["{}", '{"a": 1}', "[[1, 2]]", "[1, [2]]", "null", "[1,]", "[", "{"]))


@st.composite
def records(draw: st.DrawFn) -> str:
    members = [
        draw(WS)
        + draw(KEYS)
        + draw(WS)
        + draw(st.sampled_from([":", ""]))
        + draw(WS)
        + draw(values())
        + draw(WS)
        for _ in range(draw(st.integers(0, 3)))
    ]
    body = draw(st.sampled_from([",", ", ", ",,", " "])).join(members)
    tail = draw(st.sampled_from(["}", "}", "} ", "", "}]}", "]"]))
    return "{" + body + tail


def _walk_or_error(s: str) -> object:
    try:
        return coordjson._parse_record_walk(s, 0)
    except coordjson._Malformed as exc:
        return ("malformed", exc.pos, exc.what)


def _fast_or_error(s: str) -> object:
    try:
        return coordjson._parse_record(s, 0)
    except coordjson._Malformed as exc:
        return ("malformed", exc.pos, exc.what)


@settings(max_examples=1500, deadline=None)
@given(s=records())
def test_two_member_match_reads_the_members_the_walk_reads(s: str) -> None:
    assert _fast_or_error(s) == _walk_or_error(s)


def test_the_common_records_take_the_fast_path() -> None:
    for s in (
        '{"desc": "cat", "bbox_2d": [' + ", ".join(c(k) for k in (1, 2, 3, 4)) + "]}",
        '{"bbox_2d": [1, 2, 3, 4], "desc": "a\\"b"}',
        '{ "desc" : "x" ,"poly":[ ] }',
    ):
        assert coordjson._TWO_MEMBER_RECORD.match(s) is not None
        assert coordjson._parse_record(s, 0) == coordjson._parse_record_walk(s, 0)


def _record_end_walk(text: str, start: int, n: int) -> int:
    depth = 0
    for p, ch in coordjson._structural_chars(text, start, n, coordjson._BRACE_OR_QUOTE):
        depth += 1 if ch == "{" else -1
        if depth == 0:
            return p + 1
    return -1


@settings(max_examples=800, deadline=None)
@given(parts=st.lists(records(), min_size=1, max_size=3), cut=st.integers(0, 400))
def test_record_end_equals_the_depth_walk(parts: list[str], cut: int) -> None:
    text = ", ".join(parts)
    n = min(cut, len(text))
    assert coordjson._record_end(text, 0, n) == _record_end_walk(text, 0, n)


# --- token groups of the token-aligned scan -------------------------------------------------


def _overlap_groups(starts: list[int], spans: tuple[tuple[int, int], ...]) -> tuple[tuple[int, ...], ...]:
    n_ids = len(starts) - 1
    out = []
    for a, b in spans:
        i = bisect.bisect_right(starts, a) - 1
        group = []
        while i < n_ids and starts[i] < b:
            if starts[i + 1] > a:
                group.append(i)
            i += 1
        out.append(tuple(group))
    return tuple(out)


def _canonical_record(obj: object) -> str:
    return coordjson.render([obj])[len(coordjson.CONTAINER_OPENER) : -2]  # type: ignore[list-item]


valid_or_not = st.one_of(
    records(), det_objects().map(_canonical_record), det_objects().map(_canonical_record)
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(valid_or_not, max_size=6), seed=st.integers(0, 2**16), cut=st.integers(0, 60))
def test_scan_token_groups_equal_the_overlap_walk(parts: list[str], seed: int, cut: int) -> None:
    text = '{"objects": [' + ", ".join(parts) + "]}"
    text = text[: max(0, len(text) - cut)]
    ids = TOK.tokenize(text, random.Random(seed))
    pieces = TOK.piece_list(ids)
    checked = 0
    for mode in (CoordMode.TOKENS, CoordMode.NUMERIC):
        scan = coordjson.scan_tokens(
            ids, pieces, TOK.encode, TOK.coord_table, FieldOrder.DESC_FIRST, mode, decode=TOK.decode
        )
        starts = [0]
        for p in pieces:
            starts.append(starts[-1] + len(p))
        doc = coordjson._scan("".join(pieces), FieldOrder.DESC_FIRST, mode, None, cut_at_stop=True)
        spans = {
            e.index: e.verdict.literal_spans
            for e in doc.records
            if e.verdict is not None and e.verdict.reason is None
        }
        for r in scan.records:
            if r.parse_reason is None and r.char_span[1] >= 0:
                assert r.coord_token_groups == _overlap_groups(starts, spans[r.record_index])
                checked += 1
                assert r.coord_token_indices == tuple(i for g in r.coord_token_groups for i in g)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(valid_or_not, max_size=6), seed=st.integers(0, 2**16), cut=st.integers(0, 60))
def test_pred_objects_equal_the_match_inputs_objects(parts: list[str], seed: int, cut: int) -> None:
    from domain.stage2_targets import Stage2Variant, _pred_objects, match_inputs

    text = '{"objects": [' + ", ".join(parts) + "]}"
    ids = TOK.tokenize(text[: max(0, len(text) - cut)], random.Random(seed))
    scan = coordjson.scan_tokens(ids, TOK.piece_list(ids), TOK.encode, TOK.coord_table, decode=TOK.decode)
    for variant in Stage2Variant:
        assert _pred_objects(scan, variant) == [r.to_object() for r in match_inputs(scan, variant)]


# --- round 2 (issue 12): fast paths held equal to the reference paths they short-cut ---------------
#
# - ``coordjson._CANONICAL_RECORD``: a canonical bbox record is validated from one regex match;
# - ``coordjson._prefix_is_append_ready``: the §3.6.4 check read off the scan instead of a re-scan;
# - ``coordjson._TypedWriter.record``: one record rendered as one string with arithmetic spans;
# - ``stage2_targets``: the prefix mask plan painted with numpy, the tail classes, the §8.3 group check
#   on arrays, the inline bbox target, the GT check; ``stage2_matching._aabb_array``;
#   ``duplicates._canonical_boxes``.

SAMPLE = SampleRef("t.jsonl", 1, 0)


@contextlib.contextmanager
def _no_canonical_fast_path() -> Iterator[None]:
    saved = dict(coordjson._CANONICAL_RECORD)
    coordjson._CANONICAL_RECORD.clear()
    try:
        yield
    finally:
        coordjson._CANONICAL_RECORD.update(saved)


@contextlib.contextmanager
def _always_rescan() -> Iterator[None]:
    saved = coordjson._prefix_is_append_ready
    coordjson._prefix_is_append_ready = lambda *args: False  # type: ignore[assignment]
    try:
        yield
    finally:
        coordjson._prefix_is_append_ready = saved


COMMON_DESCS = st.sampled_from(
    ["cat", "dog", "traffic light", " cat ", "   ", "", 'a\\"b', "\\u00e9", "c\\tat"]
)
COORD_ITEMS = st.sampled_from(
    [c(0), c(1), c(7), c(999), c(500), "<|coord_1000|>", "<|coord_01|>", "<|coord_-1|>", "7", "<|im_end|>"]
)


@st.composite
def canonical_like(draw: st.DrawFn) -> str:
    """Records at or near the canonical bbox shape: either order, any JSON whitespace, good and bad
    coord literals, escaped / empty / blank descs, reversed boxes, poly keys, 3 or 5 literals."""
    ws = lambda: draw(WS)
    items = [draw(COORD_ITEMS) for _ in range(draw(st.sampled_from([4, 4, 4, 3, 5])))]
    if draw(st.booleans()):  # mostly valid literals, often equal or reversed
        items = [c(draw(st.one_of(st.integers(0, 3), st.integers(0, 999)))) for _ in items]
    arr = "[" + ws() + (ws() + "," + ws()).join(items) + ws() + "]"
    key = draw(st.sampled_from(['"bbox_2d"', '"bbox_2d"', '"poly"']))
    desc = '"' + draw(COMMON_DESCS) + '"'
    geom = key + ws() + ":" + ws() + arr
    dmem = '"desc"' + ws() + ":" + ws() + desc
    members = [dmem, geom] if draw(st.booleans()) else [geom, dmem]
    return "{" + ws() + (ws() + "," + ws()).join(members) + ws() + "}"


docs_parts = st.lists(st.one_of(canonical_like(), canonical_like(), records()), max_size=6)


@settings(max_examples=600, deadline=None)
@given(parts=docs_parts, cut=st.integers(0, 30), order=st.sampled_from(list(FieldOrder)))
def test_canonical_record_scan_equals_the_general_validation(
    parts: list[str], cut: int, order: FieldOrder
) -> None:
    text = '{"objects": [' + ", ".join(parts) + "]}"
    text = text[: max(0, len(text) - cut)]
    for mode in (CoordMode.TOKENS, CoordMode.NUMERIC):
        fast = coordjson._scan(text, order, mode, None, cut_at_stop=True)
        with _no_canonical_fast_path():
            slow = coordjson._scan(text, order, mode, None, cut_at_stop=True)
        assert fast == slow


@settings(max_examples=300, deadline=None)
@given(
    parts=docs_parts,
    seed=st.integers(0, 2**16),
    cut=st.integers(0, 30),
    order=st.sampled_from(list(FieldOrder)),
)
def test_scan_tokens_equal_without_the_canonical_path_and_with_the_rescan(
    parts: list[str], seed: int, cut: int, order: FieldOrder
) -> None:
    text = '{"objects": [' + ", ".join(parts) + "]}"
    ids = TOK.tokenize(text[: max(0, len(text) - cut)], random.Random(seed))
    pieces = TOK.piece_list(ids)

    def scan() -> coordjson.ScanResult:
        return coordjson.scan_tokens(
            ids, pieces, TOK.encode, TOK.coord_table, order, CoordMode.TOKENS, {TOK.im_end}, decode=TOK.decode
        )

    fast = scan()
    with _no_canonical_fast_path(), _always_rescan():
        slow = scan()
    assert fast == slow


def test_the_canonical_records_take_the_fast_path() -> None:
    for order in FieldOrder:
        text = coordjson.render([box("cat", 1, 2, 3, 4)], order)
        pattern = coordjson._CANONICAL_RECORD[order]
        m = pattern.match(text, len(coordjson.CONTAINER_OPENER))
        assert m is not None and coordjson._canonical_verdict(m, order, None) is not None


@settings(max_examples=400, deadline=None)
@given(parts=docs_parts, extra=st.sampled_from(["", "junk", ", [", "]}", ', {"desc"']))
def test_prefix_append_ready_from_the_scan_implies_the_rescan_passes(parts: list[str], extra: str) -> None:
    text = '{"objects": [' + ", ".join(parts) + extra
    doc = coordjson._scan(text, FieldOrder.DESC_FIRST, CoordMode.TOKENS, None, cut_at_stop=False)
    if doc.parse_failed:
        assert not coordjson._prefix_is_append_ready(doc, 0, 0)
        return
    complete = [r for r in doc.records if r.complete]
    cuts = [doc.array_open_end] + [r.end for r in complete]
    for k, cut in enumerate(cuts):
        for kk in (k - 1, k, k + 1):
            if kk < 0 or not coordjson._prefix_is_append_ready(doc, cut, kk):
                continue
            coordjson.check_append_ready(text[:cut], kk)  # must not raise
    # The shortcut is taken for every record end (so the re-scan is rarely needed).
    for k, cut in enumerate(cuts):
        assert coordjson._prefix_is_append_ready(doc, cut, k)


def _render_typed_reference(
    objects: Sequence[DetObject], order: FieldOrder, mode: CoordMode
) -> tuple[str, list[coordjson.CharSpan]]:
    """The piece-by-piece writer the one-string record render replaced."""
    parts: list[str] = []
    spans: list[coordjson.CharSpan] = []
    pos = 0

    def fmt(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    def typed(s: str, cls: coordjson.TokenClass) -> None:
        if s:
            spans.append(coordjson.CharSpan(pos, pos + len(s), cls))
        fmt(s)

    def desc(d: str) -> None:
        fmt('"desc": "')
        typed(json.dumps(d, ensure_ascii=False)[1:-1], coordjson.TokenClass.DESC)
        fmt('"')

    fmt(coordjson.CONTAINER_OPENER)
    for i, obj in enumerate(objects):
        if i:
            fmt(", ")
        fmt("{")
        if order is FieldOrder.DESC_FIRST:
            desc(obj.desc)
            fmt(", ")
        fmt(('"bbox_2d"' if obj.kind is GeometryKind.BBOX else '"poly"') + ": [")
        for j, k in enumerate(obj.bins):
            if j:
                fmt(", ")
            typed(coordjson._coord_literal(k, mode), coordjson.TokenClass.COORD)
        fmt("]")
        if order is not FieldOrder.DESC_FIRST:
            fmt(", ")
            desc(obj.desc)
        fmt("}")
    fmt("]}")
    return "".join(parts), spans


@settings(max_examples=300, deadline=None)
@given(
    objects=st.lists(
        st.one_of(det_objects(), st.builds(box, st.sampled_from(["", "a", "é"]), *[st.integers(0, 999)] * 4)),
        max_size=5,
    ),
    order=st.sampled_from(list(FieldOrder)),
    mode=st.sampled_from(list(CoordMode)),
)
def test_record_render_equals_the_piece_by_piece_writer(
    objects: list[DetObject], order: FieldOrder, mode: CoordMode
) -> None:
    assert coordjson.render_typed(objects, order, mode) == _render_typed_reference(objects, order, mode)


# --- mask plan, group checks ------------------------------------------------------------------


def _paint_reference(
    starts: list[int], n: int, layers: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> list[int]:
    level = [0] * n
    for k, (a_s, b_s) in enumerate(layers, start=1):
        for a, b in zip(a_s, b_s):
            for i in stage2_targets._overlaps(starts, a, b):
                level[i] = k
    return level


@st.composite
def paint_cases(draw: st.DrawFn) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    lengths = draw(st.lists(st.integers(0, 4), max_size=25))  # zero-length pieces included
    starts = list(itertools.accumulate(lengths, initial=0))
    size = starts[-1]
    layers = []
    for _ in range(draw(st.integers(0, 5))):
        spans = draw(st.lists(st.tuples(st.integers(0, size + 2), st.integers(0, size + 2)), max_size=6))
        layers.append(([a for a, _ in spans], [b for _, b in spans]))
    return starts, layers


@settings(max_examples=800, deadline=None)
@given(case=paint_cases())
def test_paint_levels_equal_painting_each_span(
    case: tuple[list[int], list[tuple[list[int], list[int]]]],
) -> None:
    starts, layers = case
    n = len(starts) - 1
    got = stage2_targets._paint_levels(np.asarray(starts, dtype=np.int64), n, layers)
    assert got.tolist() == _paint_reference(starts, n, layers)


def _classify_prefix_reference(
    scan: coordjson.ScanResult,
    matched: dict[int, coordjson.ScannedRecord],
    unmatched: Sequence[coordjson.ScannedRecord],
) -> list[int]:
    starts = list(scan.prefix_offsets)
    classes = [int(MaskClass.PREFIX_CONTEXT)] * len(scan.prefix_ids)

    def paint(spans: Sequence[tuple[int, int] | None], cls: MaskClass) -> None:
        for span in spans:
            if span is not None:
                for i in stage2_targets._overlaps(starts, span[0], span[1]):
                    classes[i] = int(cls)

    preds = {r.record_index for r in unmatched} | set(matched)
    paint(
        [r.char_span for r in scan.records if r.in_prefix and r.record_index not in preds], MaskClass.DROPPED
    )
    paint([r.char_span for r in unmatched], MaskClass.FP)
    paint([r.char_span for r in matched.values()], MaskClass.MATCHED_STRUCTURE)
    paint([r.desc_value_span for r in matched.values()], MaskClass.MATCHED_DESC)
    for r in matched.values():
        for i in r.coord_token_indices:
            classes[i] = int(MaskClass.MATCHED_COORD)
    return classes


def _classify_tail_reference(
    inj: coordjson.FnInjection, offsets: Sequence[int]
) -> tuple[list[int], tuple[int, ...]]:
    size = len(inj.fragment_text)
    in_desc = [False] * size
    for span in inj.spans:
        if span.cls is coordjson.TokenClass.DESC:
            for ch in range(span.start, span.end):
                in_desc[ch] = True
    classes, desc = [], []
    for i, t in enumerate(inj.append_ids):
        if TOK.coord_table.is_coord_id(t):
            classes.append(int(MaskClass.TAIL_COORD))
            continue
        a, b = offsets[i], min(size, max(offsets[i + 1], offsets[i] + 1))
        if a < b and any(in_desc[a:b]):
            classes.append(int(MaskClass.TAIL_DESC))
            desc.append(i)
        else:
            classes.append(int(MaskClass.TAIL_STRUCTURE))
    return classes, tuple(desc)


class _View:
    def encode(self, text: str) -> list[int]:
        return TOK.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return TOK.decode(ids)

    def piece(self, token_id: int) -> str:
        return TOK.pieces[token_id]

    @property
    def coord_ids(self) -> coordjson.CoordIdTable:  # type: ignore[name-defined]
        return TOK.coord_table

    @property
    def im_end_id(self) -> int:
        return TOK.im_end


VIEW = _View()


@st.composite
def channel_b_cases(draw: st.DrawFn) -> tuple[list[int], list[DetObject], Stage2Variant, FieldOrder]:
    text, gts, order = draw(rollouts())
    variant = draw(st.sampled_from(list(Stage2Variant)))
    if variant is Stage2Variant.STAGE2_AB and not gts:
        gts = [box("g", 1, 2, 3, 4)]
    if variant is Stage2Variant.ROLLOUT_MATCHING_SFT and draw(st.booleans()):
        gts = [*gts, DetObject("p", GeometryKind.POLY, (10, 10, 400, 10, 400, 400, 10, 400))]
    return TOK.tokenize(text, random.Random(draw(st.integers(0, 2**16)))), gts, variant, order


@settings(max_examples=200, deadline=None)
@given(case=channel_b_cases())
def test_mask_plan_equals_the_span_by_span_reference(
    case: tuple[list[int], list[DetObject], Stage2Variant, FieldOrder],
) -> None:
    ids, gts, variant, order = case
    settings_ = TargetSettings(variant, field_order=order)
    scan = scan_rollout(ids, None, VIEW, order)
    preds = match_inputs(scan, variant)
    match = match_predictions(stage2_targets._pred_objects(scan, variant), gts, settings_.matching)
    out = construct_targets(scan, gts, match, 5, settings_, VIEW, SAMPLE)
    matched = {preds[p].record_index: preds[p] for p, _ in out.matched_for_supervision}
    unmatched = [r for r in preds if r.record_index not in matched]
    classes = out.mask.classes.tolist()
    assert classes[: out.prefix_len] == _classify_prefix_reference(scan, matched, unmatched)
    fn_objects = [gts[j] for j in out.fn_gt_indices]
    inj = coordjson.append_fn_records(scan, fn_objects, TOK.encode, order, coord_ids=TOK.coord_table)
    offsets = stage2_targets._tail_offsets(inj.append_ids, inj.fragment_text, VIEW)
    tail, desc = _classify_tail_reference(inj, offsets)
    assert classes[out.prefix_len : -1] == tail and out.tail_desc_pos == desc
    # The lazily built prefix groups are the per-pair groups of before.
    want = []
    for p, g in out.matched_for_supervision:
        rec = preds[p]
        target = stage2_targets._matched_target(rec, gts[g], settings_)
        assert target is not None
        want.append(
            CoordGroup(
                tuple(5 + i for i in rec.coord_token_indices),
                tuple(int(k) for k in target),
                rec.geom_type or GeometryKind.BBOX,
                g,
                GroupSource.PREFIX,
            )
        )
    assert out.prefix_groups == tuple(want)
    assert out.counters.prefix_coord_targets == sum(len(gr.positions) for gr in want)


@st.composite
def tail_cases(draw: st.DrawFn) -> tuple[coordjson.FnInjection, list[int]]:
    """A fragment with DESC spans, tokens (coord ids and others) and char offsets with empty spans
    (a token holding part of a split character) anywhere."""
    size = draw(st.integers(1, 30))
    text = "x" * size
    spans = []
    for _ in range(draw(st.integers(0, 4))):
        a, b = sorted(draw(st.lists(st.integers(0, size), min_size=2, max_size=2)))
        spans.append(coordjson.CharSpan(a, b, draw(st.sampled_from(list(coordjson.TokenClass)))))
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=12)))
    offsets = [0, *cuts, size]
    ids = [
        draw(st.sampled_from([TOK.coord_table.ids[3], TOK.im_end, TOK.ids["<|im_start|>"]]))
        for _ in offsets[1:]
    ]
    inj = coordjson.FnInjection(text, tuple(ids), tuple(ids), tuple(spans), (), ())
    return inj, offsets


@settings(max_examples=800, deadline=None)
@given(case=tail_cases())
def test_tail_classes_equal_the_token_by_token_reference(
    case: tuple[coordjson.FnInjection, list[int]],
) -> None:
    inj, offsets = case
    classes, desc = stage2_targets._classify_tail(inj, offsets, TOK.coord_table)
    assert (classes.tolist(), desc) == _classify_tail_reference(inj, offsets)


def _loop_passes(
    prefix: Sequence[CoordGroup], fn: Sequence[CoordGroup], y: Sequence[int], prompt_len: int, prefix_len: int
) -> bool | str:
    try:
        stage2_targets._check_groups_loop(prefix, fn, y, prompt_len, prefix_len, TOK.coord_table, SAMPLE)
    except InvariantViolation:
        return False
    except IndexError:
        return "index"
    return True


@st.composite
def group_cases(draw: st.DrawFn) -> tuple[list[CoordGroup], list[CoordGroup], list[int], int, int]:
    coord = [TOK.coord_table.ids[k] for k in range(6)]
    other = [TOK.ids["<|im_start|>"], TOK.im_end]
    y = draw(st.lists(st.sampled_from(coord + other), min_size=1, max_size=14))
    prefix_len = draw(st.integers(0, len(y)))
    prompt_len = draw(st.integers(0, 3))

    def groups(lo: int, hi: int, source: GroupSource) -> list[CoordGroup]:
        out = []
        for _ in range(draw(st.integers(0, 3))):
            pos = draw(st.lists(st.integers(lo - 1, hi + 1), max_size=4))
            targets = [draw(st.integers(0, 6)) for _ in pos]
            if draw(st.integers(0, 3)) == 0:  # mostly consistent targets
                targets = targets[:-1]
            elif all(prompt_len <= p < prompt_len + len(y) for p in pos) and draw(st.booleans()):
                targets = [TOK.coord_table.bin_of(y[p - prompt_len]) or 0 for p in pos]
            out.append(CoordGroup(tuple(pos), tuple(targets), GeometryKind.BBOX, 0, source))
        return out

    prefix = groups(prompt_len, prompt_len + prefix_len, GroupSource.PREFIX)
    fn = groups(
        prompt_len + prefix_len,
        prompt_len + len(y) + 1,
        draw(st.sampled_from([GroupSource.FN, GroupSource.FN, GroupSource.PREFIX])),
    )
    return prefix, fn, y, prompt_len, prefix_len


@settings(max_examples=800, deadline=None)
@given(case=group_cases())
def test_array_group_check_passes_iff_the_loop_passes(
    case: tuple[list[CoordGroup], list[CoordGroup], list[int], int, int],
) -> None:
    prefix, fn, y, prompt_len, prefix_len = case
    loop = _loop_passes(prefix, fn, y, prompt_len, prefix_len)
    fast = stage2_targets._groups_pass(prefix, fn, y, prompt_len, prefix_len, TOK.coord_table)
    assert fast == (loop is True)
    # The spec form (assistant-local indices; FN targets from the objects) agrees when it can express the case.
    if all(g.source is GroupSource.FN for g in fn):
        specs = [(tuple(p - prompt_len for p in g.positions), 0, g.target_bins, g.kind) for g in prefix]
        fn_rel = [tuple(p - prompt_len - prefix_len for p in g.positions) for g in fn]
        objs = [DetObject("x", GeometryKind.BBOX, g.target_bins) for g in fn]
        spec = stage2_targets._spec_groups_pass(
            specs, fn_rel, objs, y[:prefix_len], y[prefix_len:], TOK.coord_table
        )
        assert spec == (loop is True)


# --- matching, duplicate monitor, GT check -----------------------------------------------------


BIN_VALUES = st.one_of(st.integers(0, 3), st.sampled_from([-1, 998, 999, 1000]), st.integers(-2, 1002))
IN_RANGE = st.one_of(st.integers(0, 3), st.integers(0, 999))


@st.composite
def shapes(draw: st.DrawFn) -> object:
    size = draw(st.sampled_from([4, 4, 4, 3, 6]))
    bins = tuple(draw(st.lists(BIN_VALUES, min_size=size, max_size=size)))
    kind = draw(st.sampled_from([GeometryKind.BBOX, GeometryKind.BBOX, GeometryKind.POLY]))
    if draw(st.integers(0, 4)) == 0:
        return BinGeometry(kind, bins)
    if draw(st.booleans()):
        x1, x2 = sorted(draw(st.lists(IN_RANGE, min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(IN_RANGE, min_size=2, max_size=2)))
        bins = (x2, y1, x1, y2) if draw(st.booleans()) else (x1, y1, x2, y2)
    return DetObject(draw(st.sampled_from(["cat", "Cat ", "dog"])), kind, bins)


def _outcome(fn: object) -> object:
    try:
        return ("ok", fn())  # type: ignore[operator]
    except (GeometryError, DataContractError) as exc:
        return (type(exc).__name__, str(exc))


@settings(max_examples=600, deadline=None)
@given(objs=st.lists(shapes(), max_size=6))
def test_box_arrays_equal_the_per_shape_checks(objs: list[object]) -> None:
    fast = _outcome(lambda: stage2_matching._aabb_array(objs, "preds").tolist())  # type: ignore[arg-type]
    slow = _outcome(
        lambda: [list(stage2_matching._checked_aabb(s, f"preds[{i}]")) for i, s in enumerate(objs)]
    )  # type: ignore[arg-type]
    assert fast == slow
    index = [i for i, o in enumerate(objs) if o.kind is GeometryKind.BBOX and isinstance(o, DetObject)]  # type: ignore[attr-defined]
    dets = [o for o in objs if isinstance(o, DetObject)]
    index = [i for i, o in enumerate(dets) if o.kind is GeometryKind.BBOX]
    fast = _outcome(lambda: duplicates._canonical_boxes(dets, index).tolist())
    slow = _outcome(lambda: [list(duplicates._canonical_box(dets[i], i)) for i in index])
    assert fast == slow


@settings(max_examples=300, deadline=None)
@given(preds=st.lists(shapes(), max_size=8), gts=st.lists(shapes(), max_size=8), k=st.integers(1, 3))
def test_candidate_arrays_equal_prune_candidates(preds: list[object], gts: list[object], k: int) -> None:
    try:
        pb = [stage2_matching._checked_aabb(s, "p") for s in preds]  # type: ignore[arg-type]
        gb = [stage2_matching._checked_aabb(s, "g") for s in gts]  # type: ignore[arg-type]
    except GeometryError:
        return
    cands = stage2_matching.prune_candidates(pb, gb, k)
    if pb and gb:
        assert stage2_matching._candidate_order(np.asarray(pb), np.asarray(gb), k).tolist() == [
            list(c) for c in cands
        ]
    # The whole matcher against a per-pair reference of its cost matrix and result loop.
    cost, _rejections, pairs = stage2_matching.candidate_cost_matrix(
        preds, gts, MatchSettings(candidate_top_k=k)
    )  # type: ignore[arg-type]
    assert pairs == sum(len(c) for c in cands)
    res = match_predictions(preds, gts, MatchSettings(candidate_top_k=k))  # type: ignore[arg-type]
    iou_sum = 0.0
    for p, g in res.matched_pairs:
        iou_sum += 1.0 - float(cost[p, g])
    assert res.matched_maskiou_sum == iou_sum and all(
        cost[p, g] < stage2_matching.INF / 2 for p, g in res.matched_pairs
    )


@st.composite
def near_valid_gt(draw: st.DrawFn) -> DetObject:
    """Mostly valid GT boxes, at the edges of validity: corners at 0 / 999 / 1000, x2 - x1 and y2 - y1 in -2..2."""
    x1, y1 = (
        draw(st.sampled_from([0, 1, 2, 500, 997, 998, 999, 1000])),
        draw(st.sampled_from([0, 1, 2, 998, 999])),
    )
    dx, dy = draw(st.integers(-2, 2)), draw(st.integers(-2, 2))
    kind = draw(st.sampled_from([GeometryKind.BBOX] * 5 + [GeometryKind.POLY]))
    return DetObject("g", kind, (x1, y1, x1 + dx, y1 + dy))


@settings(max_examples=400, deadline=None)
@given(
    gts=st.lists(st.one_of(shapes(), near_valid_gt(), near_valid_gt()), max_size=4),
    variant=st.sampled_from(list(Stage2Variant)),
)
def test_gt_check_fast_path_agrees_with_the_per_object_check(
    gts: list[object], variant: Stage2Variant
) -> None:
    dets = [o for o in gts if isinstance(o, DetObject)]
    fast = _outcome(lambda: stage2_targets.check_gt_objects(dets, variant, SAMPLE))
    saved = stage2_targets._gt_boxes_pass
    stage2_targets._gt_boxes_pass = lambda gts: False  # type: ignore[assignment]
    try:
        slow = _outcome(lambda: stage2_targets.check_gt_objects(dets, variant, SAMPLE))
    finally:
        stage2_targets._gt_boxes_pass = saved
    assert fast == slow


# --- _pred_objects: the combinations a filter bug would hide in -------------------------------


@st.composite
def common_objects(draw: st.DrawFn) -> DetObject:
    """Valid records with the descriptions a rollout repeats ("cat", "dog"), bbox and polygon alike."""
    obj = draw(det_objects())
    return attrs.evolve(obj, desc=draw(st.sampled_from(["cat", "dog", "traffic light"])))


@settings(max_examples=300, deadline=None)
@given(
    objs=st.lists(common_objects(), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    cut=st.integers(0, 30),
)
def test_pred_objects_equal_match_inputs_on_common_descriptions(
    objs: list[DetObject], seed: int, cut: int
) -> None:
    from domain.stage2_targets import _pred_objects

    text = coordjson.render(objs)
    ids = TOK.tokenize(text[: max(0, len(text) - cut)], random.Random(seed))
    scan = coordjson.scan_tokens(ids, TOK.piece_list(ids), TOK.encode, TOK.coord_table, decode=TOK.decode)
    for variant in Stage2Variant:
        assert _pred_objects(scan, variant) == [r.to_object() for r in match_inputs(scan, variant)]


# --- FN fragment ids from memoised segments (stage2_targets._fragment_encoder) ---------------


@functools.cache
def _hf_tokenizer() -> object:
    """The tiny Qwen3-VL tokenizer (Qwen2 normaliser / pre-tokenizer, coord tokens added as special)."""
    pytest.importorskip("transformers")
    from adapters.hf import tiny
    from adapters.hf.tokenizer import HFTokenizer

    return HFTokenizer(tiny._build_tokenizer(tiny.TinyModelSettings()))


# Text around coord tokens: leading / trailing spaces, JSON glue, contractions, digits, combining marks,
# other special tokens, near-miss coord literals, newlines, non-ASCII.
SEGMENT_BITS = st.sampled_from(
    [
        " ",
        "  ",
        ", ",
        ",",
        "]",
        "}",
        "]}",
        '"',
        '", ',
        '{"desc": "',
        '"bbox_2d": [',
        '], "desc": "',
        "\n",
        "\t",
        "'s",
        "'ll",
        "cat",
        " dog",
        "traffic light",
        "12",
        " 3",
        "é",
        "e\u0301",
        "猫",
        "\u00a0",
        "<|",
        "|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|coord_1000|>",
        "<|coord_01|>",
        "<|coord_|>",
        "\\",
        '\\"',
        "!?",
    ]
)
SEGMENTS = st.lists(SEGMENT_BITS | st.text(max_size=4), max_size=5).map("".join)


@st.composite
def coord_texts(draw: st.DrawFn) -> str:
    segs = draw(st.lists(SEGMENTS, min_size=1, max_size=7))
    out = [segs[0]]
    for seg in segs[1:]:
        out.append(c(draw(st.integers(0, 999))) + seg)
    return "".join(out)


_SHARED_MEMO: dict[str, tuple[int, ...]] = {}


@settings(max_examples=600, deadline=None)
@given(text=coord_texts())
def test_hf_encode_splits_at_coord_tokens(text: str) -> None:
    """The Qwen tokenizer encodes the segments between coord tokens independently: the assembled ids
    (fresh memo and a memo shared across examples) equal ``encode`` of the whole text."""
    tok: Any = _hf_tokenizer()
    want = tok.encode(text)
    ids = tok.coord_ids.ids
    assert stage2_targets._assemble_fragment_ids(text, tok.encode, ids, {}) == want
    assert stage2_targets._assemble_fragment_ids(text, tok.encode, ids, _SHARED_MEMO) == want


FRAGMENT_DESCS = st.one_of(st.text(min_size=1, max_size=10), SEGMENTS.filter(lambda s: s.strip() != ""))


@st.composite
def fn_fragments(draw: st.DrawFn) -> str:
    objs = []
    for _ in range(draw(st.integers(0, 5))):
        desc = draw(FRAGMENT_DESCS)
        x1, x2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
        if draw(st.booleans()):
            objs.append(DetObject(desc, GeometryKind.BBOX, (x1, y1, x2, y2)))
        else:
            objs.append(DetObject(desc, GeometryKind.POLY, (x1, y1, x2, y1, x2, y2)))
    order = draw(st.sampled_from(list(FieldOrder)))
    return coordjson.fn_injection_text(draw(st.integers(0, 2)), objs, order)


@settings(max_examples=600, deadline=None)
@given(fragment=fn_fragments())
def test_fn_fragment_ids_equal_the_real_encode(fragment: str) -> None:
    """FN fragments (either order, bbox and poly, any description) through the memoised encoder (its
    checks spent, so the assembled ids are returned unchecked) equal ``encode(fragment)``; the toy
    tokenizer too."""
    tok: Any = _hf_tokenizer()
    encoder = stage2_targets._fragment_encoder(tok, tok.coord_ids)
    state = stage2_targets._SEGMENT_MEMOS[tok]
    state.checks_left = 0
    assert state.on
    assert encoder(fragment) == tok.encode(fragment)
    toy = stage2_targets._fragment_encoder(VIEW, VIEW.coord_ids)
    assert toy(fragment) == TOK.encode(fragment)


class _LStripView(_View):
    """A tokenizer whose coord tokens swallow the space before them (an ``lstrip`` added token): the
    segments are not independent, so the memo must turn itself off."""

    def encode(self, text: str) -> list[int]:
        return TOK.encode(text.replace(" <|coord_", "<|coord_"))


def test_a_tokenizer_that_does_not_split_gets_its_own_encode() -> None:
    view = _LStripView()
    rng = random.Random(3)
    for n in range(30):
        objs = [box(rng.choice(["cat", "dog"]), 1, 2, 3 + n, 4 + n) for _ in range(rng.randint(1, 3))]
        fragment = coordjson.fn_injection_text(1, objs)
        assert stage2_targets._fragment_encoder(view, VIEW.coord_ids)(fragment) == view.encode(fragment)
    assert not stage2_targets._SEGMENT_MEMOS[view].on


def test_channel_b_targets_equal_with_and_without_the_segment_memo() -> None:
    """Whole-step results on the Qwen tokenizer with the memo trusted equal those with it off."""
    tok: Any = _hf_tokenizer()
    rng = random.Random(0)
    settings_ = TargetSettings("stage2_ab")
    for n in range(12):
        gts = [
            box(rng.choice(["cat", "dog's", "traffic light", "é", "a, b"]), x, y, x + 20, y + 30)
            for x, y in ((rng.randrange(900), rng.randrange(900)) for _ in range(8))
        ]
        kept = [g for g in gts if rng.random() < 0.6]
        text = coordjson.render(kept)[: -rng.randint(1, 30)] if kept else '{"objects": ['
        ids = tok.encode(text)
        results = []
        for on in (True, False):
            stage2_targets._fragment_encoder(tok, tok.coord_ids)
            state = stage2_targets._SEGMENT_MEMOS[tok]
            state.on, state.checks_left = on, 0
            out = stage2_targets.build_channel_b_targets(ids, 7, gts, settings_, tok, SAMPLE)
            results.append(
                (
                    out.append_ids,
                    out.fragment_text,
                    out.mask.classes.tolist(),
                    out.fn_groups,
                    out.tail_desc_pos,
                )
            )
        stage2_targets._SEGMENT_MEMOS.pop(tok)
        assert results[0] == results[1], n
        assert results[0][0] == tuple(tok.encode(results[0][1]))
