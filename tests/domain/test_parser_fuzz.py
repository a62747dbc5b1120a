"""The CoordJSON parsers fuzzed under hypothesis (issue 11, "the suite that stays"; data.md §5.4–§5.8, D2).

Bounded, fast properties of the shared grammar on hostile input:
- salvage never raises on any ``str``; strict transpile raises only :class:`CoordJSONError`;
- the token scanner never raises on any id sequence, and agrees with salvage on the decoded text wherever
  the spec says they agree (data.md §5.5.4 with the §5.8.8 exception: a coord literal spelled by ordinary
  text pieces);
- nesting of any depth costs no recursion: deeper than 64 levels is one ``other`` drop (§5.8 item 4a);
- junk never nests: a doubled (or tripled) ``[`` before the records loses no record (§5.8.2).
The coverage-guided counterpart, for a bounded time, is ``bench/fuzz_atheris.py``.
"""

from __future__ import annotations

import itertools
import re

import pytest
from coordjson_toy import OBJECT_LISTS, ToyTokenizer, c
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.coordjson import (
    MAX_NESTING,
    DropReason,
    SalvageResult,
    ScanResult,
    parse_strict,
    render,
    salvage,
    scan_tokens,
)
from domain.errors import CoordJSONError
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

TOK = ToyTokenizer()
STOPS = frozenset({TOK.im_end, TOK.endoftext})
ORDERS = st.sampled_from(list(FieldOrder))
MODES = st.sampled_from(list(CoordMode))
COORD_LITERAL = re.compile(r"<\|coord_(?:0|[1-9][0-9]{0,2})\|>")

# Pieces a rollout can be made of: grammar punctuation, keys, literals, specials, and pieces that spell a
# coord literal or a stop text across several tokens.
PIECES = [
    "{", "}", "[", "]", "[[", "]]", "]}", "}]}", "},", "}, {", '"', "\\", '\\"', ",", ", ", ":", ": ", " ", "\n",
    '{"objects": [', '{"objects":', ' [', '"objects"', '"desc"', '"bbox_2d"', '"poly"', '"score"', '"cat"',
    "null", "1", "12", "999", "1000", "-1", "1.5", "01", "x", "é", "\x00", "\u2028",
    c(0), c(7), c(999), "<|coord_*|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>",
    "<|coord", "_4|>", "<|", "|>", "<|im", "_end|>", "<|coord_1000|>",
]  # fmt: skip
PIECE_IDS = TOK.tokenize_chunks(PIECES)
ID_SEQUENCES = st.lists(st.sampled_from(PIECE_IDS), max_size=60)


def scan(ids: list[int], order: FieldOrder, mode: CoordMode) -> ScanResult:
    return scan_tokens(
        ids, TOK.piece_list(ids), TOK.encode, TOK.coord_table, order, mode, STOPS, decode=TOK.decode
    )


def check_objects(r: SalvageResult) -> None:
    if r.parse_failed:
        assert r.objects == () and r.drops == () and not r.truncated
    for o in r.objects:
        assert o.desc and o.desc == o.desc.strip() and all(0 <= k <= 999 for k in o.bins)
        if o.kind is GeometryKind.BBOX:
            assert len(o.bins) == 4 and o.bins[0] <= o.bins[2] and o.bins[1] <= o.bins[3]
        else:
            assert len(o.bins) >= 6 and len(o.bins) % 2 == 0


def strict_raises_only_coordjson_errors(text: str, order: FieldOrder, mode: CoordMode) -> None:
    try:
        parse_strict(text, order, mode)
    except CoordJSONError:
        pass


def coord_literals_are_single_ids(ids: list[int]) -> bool:
    """No coord literal of the text is spelled by several pieces or shares a piece (§5.8.8's exception)."""
    starts = [0]
    for p in TOK.piece_list(ids):
        starts.append(starts[-1] + len(p))
    bounds = set(itertools.pairwise(starts))
    return all((m.start(), m.end()) in bounds for m in COORD_LITERAL.finditer(TOK.decode(ids)))


# ---- never raises ----------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(), ORDERS, MODES)
def test_salvage_and_strict_never_raise_unexpectedly_on_any_text(
    text: str, order: FieldOrder, mode: CoordMode
) -> None:
    for candidate in (text, '{"objects": [' + text, '{"objects": [{"desc": ' + text):
        check_objects(salvage(candidate, order, mode))
        strict_raises_only_coordjson_errors(candidate, order, mode)


@settings(max_examples=300, deadline=None)
@given(ID_SEQUENCES, ORDERS, MODES)
def test_scanner_never_raises_on_any_id_sequence_and_agrees_with_salvage(
    ids: list[int], order: FieldOrder, mode: CoordMode
) -> None:
    text = TOK.decode(ids)
    r = scan(ids, order, mode)
    s = salvage(text, order, mode)
    check_objects(s)
    assert TOK.decode(r.prefix_ids) == r.prefix_text
    assert not r.cut_fallback  # TOK.encode round-trips every cut
    assert (r.truncated, r.parse_failed, r.trailing_junk, r.had_stop, r.syntax_error, r.array_closed) == (
        s.truncated,
        s.parse_failed,
        s.trailing_junk,
        s.had_stop,
        s.syntax_error,
        s.array_closed,
    )
    assert r.incomplete_tail == s.incomplete_tail
    if mode is CoordMode.NUMERIC or coord_literals_are_single_ids(ids):
        assert r.valid_objects == s.objects
        assert r.drops == s.drops
    else:  # §5.8.8: the scanner may only turn a salvage object into a non_coord_token drop
        assert set(r.valid_objects) <= set(s.objects)
        extra = [why for _, why in r.drops if why is DropReason.NON_COORD_TOKEN]
        assert len(r.drops) - len(extra) <= len(s.drops)


# ---- depth (data.md §5.8 item 4a) ------------------------------------------------------------------------


@st.composite
def nests(draw: st.DrawFn) -> tuple[str, int]:
    """A well-formed value nesting ``depth`` >= 2 arrays / objects (any mix), and that depth."""
    depth = draw(st.integers(MAX_NESTING - 3, MAX_NESTING + 3) | st.integers(2, 1500))
    share = draw(st.sampled_from([0.0, 0.5, 1.0]))  # of objects: all arrays, a random mix, all objects
    rnd = draw(st.randoms(use_true_random=False))
    kinds = [rnd.random() < share for _ in range(depth)]  # True: object
    inner = draw(st.sampled_from([c(1), "1", '"s"', "null", ""]))
    opening = "".join('{"k": ' if is_obj else "[" for is_obj in kinds)
    if kinds[-1] and inner == "":
        inner = "1"  # an object member needs a value
    closing = "".join("}" if is_obj else "]" for is_obj in reversed(kinds))
    return opening + inner + closing, depth


@settings(max_examples=100, deadline=None)
@given(nests(), st.sampled_from(["bbox_2d", "extra"]), ORDERS, MODES)
def test_any_depth_is_parsed_without_recursion_and_drops_as_other_beyond_64(
    nest: tuple[str, int], where: str, order: FieldOrder, mode: CoordMode
) -> None:
    value, depth = nest
    box = f"[{c(1)}, {c(2)}, {c(3)}, {c(4)}]" if mode is CoordMode.TOKENS else "[1, 2, 3, 4]"
    if where == "bbox_2d":
        members = {"desc": '"d"', "bbox_2d": value}
    else:
        members = {"desc": '"d"', "bbox_2d": box, "x": value}
    keys = list(members) if order is FieldOrder.DESC_FIRST else ["bbox_2d", "desc", *list(members)[2:]]
    record = "{" + ", ".join(f'"{k}": {members[k]}' for k in keys) + "}"
    ok = render([DetObject("ok", GeometryKind.BBOX, (1, 2, 3, 4))], order, mode)[len('{"objects": [') : -2]
    text = '{"objects": [' + record + ", " + ok + "]}"
    r = salvage(text, order, mode)
    assert [o.desc for o in r.objects] == ["ok"] and r.array_closed and not r.truncated
    ((ordinal, reason),) = r.drops
    assert ordinal == 0
    if depth > MAX_NESTING:
        assert reason is DropReason.OTHER
    else:
        assert reason is (DropReason.NON_COORD_TOKEN if where == "bbox_2d" else DropReason.UNEXPECTED_KEYS)
    ids = TOK.encode(text)
    t = scan(ids, order, mode)
    assert t.valid_objects == r.objects and t.drops == r.drops
    with pytest.raises(CoordJSONError, match=r"objects\[0\]"):
        parse_strict(text, order, mode)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 20_000), st.sampled_from(["[", "{", '{"a": ', "[{", '[{"a": [']), ORDERS, MODES)
def test_unclosed_deep_nesting_is_an_incomplete_tail(
    n: int, opener: str, order: FieldOrder, mode: CoordMode
) -> None:
    text = '{"objects": [{"desc": "d", "bbox_2d": ' + opener * n
    r = salvage(text, order, mode)
    assert (r.objects, r.drops, r.incomplete_tail, r.truncated) == ((), (), 1, True)
    t = scan(TOK.encode(text), order, mode)
    assert t.incomplete_tail == 1 and t.n_prefix_records == 0 and not t.cut_fallback


# ---- junk never nests (data.md §5.8.2) -----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(OBJECT_LISTS.filter(bool), st.integers(1, 4), ORDERS, MODES)
def test_extra_brackets_around_the_records_lose_no_record(
    objects: list[DetObject], extra: int, order: FieldOrder, mode: CoordMode
) -> None:
    """``{"objects": [[...[R1, ..., Rn]...]]}``: every record is read, one ``other`` drop, array closed at
    the first ``]``, the rest is trailing junk; the scanner's prefix keeps every record."""
    body = render(objects, order, mode)[len('{"objects": [') : -2]
    text = '{"objects": [' + "[" * extra + body + "]" * (extra + 1) + "}"
    r = salvage(text, order, mode)
    assert r.objects == tuple(objects)
    assert r.drops == ((0, DropReason.OTHER),)
    assert (r.array_closed, r.trailing_junk, r.truncated) == (True, True, False)
    t = scan(TOK.encode(text), order, mode)
    assert t.valid_objects == tuple(objects) and t.n_prefix_records == len(objects)
