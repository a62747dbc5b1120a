"""Salvage parse of model outputs (data.md §5.4, §5.6, §5.8, §11.35–39; infer-eval-config.md §9.19–20)."""

from __future__ import annotations

import random

import pytest
from coordjson_toy import OBJECT_LISTS, box, c
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.coordjson import DropReason, SalvageResult, parse_strict, render, salvage
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

BOX = f"[{c(1)}, {c(2)}, {c(3)}, {c(4)}]"
OK = f'{{"desc": "ok", "bbox_2d": {BOX}}}'


def doc(*records: str) -> str:
    return '{"objects": [' + ", ".join(records) + "]}"


def one_drop(record: str, **kw: object) -> DropReason:
    r = salvage(doc(record), **kw)  # type: ignore[arg-type]
    assert r.objects == ()
    assert len(r.drops) == 1 and r.drops[0][0] == 0
    return r.drops[0][1]


# ---- worked examples ---------------------------------------------------------------------------------


def test_example_of_5_4() -> None:
    """data.md §11.35, infer-eval-config.md §9.19: 1 object, wrong_arity, incomplete tail, truncated."""
    text = (
        '{"objects": [{"desc": "ok", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}, '
        '{"desc": "bad", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>]}, '
        '{"desc": "tail", "bbox_2d": [<|coord_8|>'
    )
    r = salvage(text)
    assert r.objects == (box("ok", 1, 2, 3, 4),)
    assert r.drops == ((1, DropReason.WRONG_ARITY),)
    assert (r.incomplete_tail, r.truncated, r.parse_failed) == (1, True, False)
    assert r.canonical_text == doc(f'{{"desc": "ok", "bbox_2d": {BOX}}}')


def test_golden_order_violation_precedes_every_later_check() -> None:
    """data.md §5.6 golden / §11.36 (S15): exactly one drop, order_violation."""
    record = f'{{"bbox_2d": [{c(1)}, {c(2)}, {c(3)}], "desc": "   "}}'
    assert one_drop(record) is DropReason.ORDER_VIOLATION


def test_empty_desc_precedes_arity() -> None:
    """stage2.md S14: check 7 precedes 9."""
    assert one_drop(f'{{"desc": "   ", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}]}}') is DropReason.MISSING_DESC


def test_no_container() -> None:
    """data.md §11.37, §5.8.5, infer-eval-config.md §9.20."""
    for text in ["", "no boxes here", '[{"desc": "a"}]', '{"object_1": {"desc": "a"}}', '{"objects": ', "{"]:
        r = salvage(text)
        assert (r.parse_failed, r.truncated, r.objects, r.drops) == (True, False, (), ())
        assert r.canonical_text == '{"objects": []}'


def test_junk_before_and_second_container_after_are_ignored() -> None:
    text = 'Sure! {"a": 1} {"objects": [' + OK + "]} and " + doc(f'{{"desc": "two", "bbox_2d": {BOX}}}')
    r = salvage(text)
    assert r.objects == (box("ok", 1, 2, 3, 4),)
    assert (r.drops, r.truncated, r.parse_failed, r.trailing_junk) == ((), False, False, False)


def test_closer_inside_a_desc_string_does_not_end_the_array() -> None:
    text = doc(f'{{"desc": "a]}}\\"x", "bbox_2d": {BOX}}}', OK)
    r = salvage(text)
    assert r.objects == (box('a]}"x', 1, 2, 3, 4), box("ok", 1, 2, 3, 4))
    assert not r.truncated and r.array_closed


@pytest.mark.parametrize(
    "literal",
    [
        c(1000),
        f'"{c(1)}"',
        "<|coord_*|>",
        "<|coord_007|>",
        "<|im_start|>",
        "-1",
        "1.0",
        "1e2",
        "+1",
        "01",
        "7",
    ],
)
def test_non_coord_literals_in_tokens_mode(literal: str) -> None:
    """data.md §11.38 and §5.8.3."""
    assert (
        one_drop(f'{{"desc": "a", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}, {literal}]}}')
        is DropReason.NON_COORD_TOKEN
    )


@pytest.mark.parametrize("literal", [c(4), "1000", "01", "-1", "4.0", "1e2", '"4"'])
def test_non_coord_literals_in_numeric_mode(literal: str) -> None:
    record = f'{{"desc": "a", "bbox_2d": [1, 2, 3, {literal}]}}'
    assert one_drop(record, coord_mode=CoordMode.NUMERIC) is DropReason.NON_COORD_TOKEN


def test_numeric_mode_accepts_canonical_bins() -> None:
    r = salvage('{"objects": [{"desc": "a", "bbox_2d": [0, 10, 999, 999]}]}', coord_mode=CoordMode.NUMERIC)
    assert r.objects == (box("a", 0, 10, 999, 999),)


@pytest.mark.parametrize("literal", ["<|coord_ 5|>", "abc", "<|coord_5|"])
def test_text_that_is_no_literal_is_other(literal: str) -> None:
    assert one_drop(f'{{"desc": "a", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}, {literal}]}}') is DropReason.OTHER


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        # row 1: not "key": value members
        ('{"desc": "a" "bbox_2d": []}', DropReason.OTHER),
        (f'{{"desc": "a", "bbox_2d": {BOX},}}', DropReason.OTHER),
        (f'{{"desc": "a", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}, {c(4)}}}', DropReason.OTHER),
        (f'{{desc: "a", "bbox_2d": {BOX}}}', DropReason.OTHER),
        ('{"desc": "a\nb", "bbox_2d": []}', DropReason.OTHER),  # raw control char in a JSON string
        # row 2
        (f'{{"desc": "a", "bbox_2d": {BOX}, "score": 0.9}}', DropReason.UNEXPECTED_KEYS),
        (f'{{"desc": "a", "desc": "b", "bbox_2d": {BOX}}}', DropReason.UNEXPECTED_KEYS),
        (f'{{"desc": "a", "bbox_2d": {BOX}, "poly": null}}', DropReason.UNEXPECTED_KEYS),
        # rows 3, 4, 5
        (f'{{"bbox_2d": {BOX}}}', DropReason.MISSING_DESC),
        ("{}", DropReason.MISSING_DESC),
        ('{"desc": "a"}', DropReason.MISSING_GEOM),
        (f'{{"desc": "a", "bbox_2d": {BOX}, "poly": {BOX}}}', DropReason.UNEXPECTED_KEYS),
        # row 6
        (f'{{"bbox_2d": {BOX}, "desc": "a"}}', DropReason.ORDER_VIOLATION),
        # row 7
        (f'{{"desc": 5, "bbox_2d": {BOX}}}', DropReason.MISSING_DESC),
        (f'{{"desc": "", "bbox_2d": {BOX}}}', DropReason.MISSING_DESC),
        (f'{{"desc": " \\t ", "bbox_2d": {BOX}}}', DropReason.MISSING_DESC),
        # row 8
        ('{"desc": "a", "bbox_2d": null}', DropReason.NON_COORD_TOKEN),
        (f'{{"desc": "a", "bbox_2d": [[{c(1)}, {c(2)}], [{c(3)}, {c(4)}]]}}', DropReason.NON_COORD_TOKEN),
        (f'{{"desc": "a", "bbox_2d": "{c(1)}"}}', DropReason.NON_COORD_TOKEN),
        # row 9
        (f'{{"desc": "a", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}]}}', DropReason.WRONG_ARITY),
        ('{"desc": "a", "bbox_2d": []}', DropReason.WRONG_ARITY),
        (f'{{"desc": "a", "poly": [{c(1)}, {c(2)}, {c(3)}, {c(4)}, {c(5)}]}}', DropReason.WRONG_ARITY),
        (f'{{"desc": "a", "poly": {BOX}}}', DropReason.WRONG_ARITY),
        # row 10
        (f'{{"desc": "a", "bbox_2d": [{c(500)}, {c(10)}, {c(400)}, {c(90)}]}}', DropReason.BBOX_INVALID),
        (f'{{"desc": "a", "bbox_2d": [{c(300)}, {c(40)}, {c(12)}, {c(410)}]}}', DropReason.BBOX_INVALID),
        (f'{{"desc": "a", "bbox_2d": [{c(1)}, {c(50)}, {c(3)}, {c(4)}]}}', DropReason.BBOX_INVALID),
    ],
)
def test_record_validation_table(record: str, reason: DropReason) -> None:
    """data.md §5.6 rows 1–10, first failing check wins."""
    assert one_drop(record) is reason


def test_geometry_first_order() -> None:
    record = f'{{"bbox_2d": {BOX}, "desc": "a"}}'
    assert salvage(doc(record), FieldOrder.GEOMETRY_FIRST).objects == (box("a", 1, 2, 3, 4),)
    assert one_drop(OK, field_order=FieldOrder.GEOMETRY_FIRST) is DropReason.ORDER_VIOLATION


def test_zero_area_box_passes_and_desc_is_stripped() -> None:
    r = salvage(doc(f'{{"desc": "  a cat ", "bbox_2d": [{c(5)}, {c(5)}, {c(5)}, {c(9)}]}}'))
    assert r.objects == (box("a cat", 5, 5, 5, 9),)


def test_polygon_is_kept_flat_in_order() -> None:
    bins = [10, 10, 50, 10, 50, 20, 20, 20, 20, 30, 10, 30]
    r = salvage(doc('{"desc": "L", "poly": [' + ", ".join(c(k) for k in bins) + "]}"))
    assert r.objects == (DetObject("L", GeometryKind.POLY, tuple(bins)),)


# ---- array level and flags (§5.4 step 3, §5.8) ---------------------------------------------------------


def test_junk_at_array_level_is_one_other_drop_with_the_records_seen_so_far() -> None:
    text = '{"objects": [' + OK + ', junk "{]" more, ' + OK + ", 42, " + OK + "]}"
    r = salvage(text)
    assert len(r.objects) == 3
    assert r.drops == ((1, DropReason.OTHER), (2, DropReason.OTHER))
    assert r.syntax_error and r.array_closed and not r.truncated


def test_separators_are_not_required_and_extra_commas_are_skipped() -> None:
    """stage2.md S7, S8."""
    for text in ['{"objects": [' + OK + " " + OK + "]}", '{"objects": [,, ' + OK + ",,, " + OK + ", ]}"]:
        r = salvage(text)
        assert len(r.objects) == 2 and r.drops == () and not r.syntax_error


def test_trailing_junk_after_the_array() -> None:
    r = salvage('{"objects": [' + OK + "] oops")
    assert (r.trailing_junk, r.truncated, len(r.objects)) == (True, False, 1)
    r = salvage('{"objects": [' + OK + "]  ")
    assert (r.trailing_junk, r.truncated, r.array_closed) == (False, True, True)
    r = salvage('{"objects": [' + OK + "]} trailing words {")
    assert (r.trailing_junk, r.truncated) == (False, False)


def test_stop_text_cuts_even_inside_quotes() -> None:
    """§5.8.4: the cut applies to the raw text and ignores quotes; had_stop reports it."""
    r = salvage(doc(OK) + "<|im_end|>" + doc(OK))
    assert (r.had_stop, r.truncated, len(r.objects)) == (True, False, 1)
    r = salvage('{"objects": [' + OK + ', {"desc": "a<|endoftext|>b", "bbox_2d": ' + BOX + "}]}")
    assert (r.had_stop, r.truncated, r.incomplete_tail, len(r.objects)) == (True, True, 1, 1)
    assert not salvage(doc(OK)).had_stop


def test_truncation_inside_the_container_sets_truncated() -> None:
    for text in ['{"objects": [', '{"objects": [' + OK, '{"objects": [' + OK + ", ", '{"objects": [junk']:
        r = salvage(text)
        assert r.truncated and not r.parse_failed


def test_canonical_text_round_trips() -> None:
    text = 'x {"objects":[ {"desc":" a ","bbox_2d":[<|coord_1|>,<|coord_2|>,<|coord_3|>,<|coord_4|>]} ]}'
    r = salvage(text)
    assert r.canonical_text == doc(f'{{"desc": "a", "bbox_2d": {BOX}}}')


# ---- properties (data.md §11.39) ----------------------------------------------------------------------

FRAGMENTS = [
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    ",",
    ":",
    " ",
    "\n",
    '{"objects": [',
    '{"objects":[',
    "]}",
    "}]}",
    "},",
    '"desc"',
    '"bbox_2d"',
    '"poly"',
    ": ",
    ", ",
    '"cat"',
    c(5),
    c(999),
    c(1000),
    "<|coord_*|>",
    "<|coord_007|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|",
    "|>",
    "<|coord_",
    "1",
    "-1",
    "1.5",
    "null",
    "true",
    "\\u00",
    '\\"',
    "é",
    "\x00",
    "\u2028",
]
FUZZ_TEXT = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=40).map("".join)


def check_result_invariants(r: SalvageResult, order: FieldOrder, mode: CoordMode) -> None:
    if r.parse_failed:
        assert r.objects == () and r.drops == () and not r.truncated
    for o in r.objects:
        assert o.desc == o.desc.strip() and o.desc
        assert all(0 <= k <= 999 for k in o.bins)
        if o.kind is GeometryKind.BBOX:
            assert len(o.bins) == 4 and o.bins[0] <= o.bins[2] and o.bins[1] <= o.bins[3]
        else:
            assert len(o.bins) >= 6 and len(o.bins) % 2 == 0
    # The canonical text is a strict document holding exactly the salvaged objects.
    assert tuple(parse_strict(r.canonical_text, order, mode)) == r.objects
    assert salvage(r.canonical_text, order, mode).objects == r.objects


@settings(max_examples=400, deadline=None)
@given(FUZZ_TEXT, st.sampled_from(list(FieldOrder)), st.sampled_from(list(CoordMode)))
def test_salvage_never_raises_on_fragment_soup(text: str, order: FieldOrder, mode: CoordMode) -> None:
    check_result_invariants(salvage(text, order, mode), order, mode)
    check_result_invariants(salvage('{"objects": [' + text, order, mode), order, mode)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.sampled_from(list(CoordMode)))
def test_salvage_never_raises_on_any_text(text: str, mode: CoordMode) -> None:
    check_result_invariants(salvage(text, coord_mode=mode), FieldOrder.DESC_FIRST, mode)


@settings(max_examples=300, deadline=None)
@given(OBJECT_LISTS, st.sampled_from(list(FieldOrder)), st.sampled_from(list(CoordMode)), st.randoms())
def test_salvage_never_raises_on_mutations_of_valid_outputs(
    objects: list[DetObject], order: FieldOrder, mode: CoordMode, rnd: random.Random
) -> None:
    text = render(objects, order, mode)
    assert salvage(text, order, mode).objects == tuple(objects)
    for _ in range(5):
        chars = list(text)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.randrange(3)
            at = rnd.randrange(len(chars) + 1)
            if op == 0:
                chars.insert(at, rnd.choice(FRAGMENTS))
            elif op == 1 and at < len(chars):
                del chars[at]
            elif at < len(chars):
                chars[at] = rnd.choice(FRAGMENTS)
        mutated = "".join(chars)[: rnd.randint(0, len(text) + 20)]
        check_result_invariants(salvage(mutated, order, mode), order, mode)


@settings(max_examples=80, deadline=None)
@given(OBJECT_LISTS, st.sampled_from(list(FieldOrder)), st.sampled_from(list(CoordMode)))
def test_every_prefix_truncation_yields_its_complete_leading_records(
    objects: list[DetObject], order: FieldOrder, mode: CoordMode
) -> None:
    text = render(objects, order, mode)
    # Record i ends where the rendering of objects[: i + 1] puts its closer "]}".
    ends = [len(render(objects[: i + 1], order, mode)) - 2 for i in range(len(objects))]
    starts = [13] + [e + 2 for e in ends[:-1]]
    for cut in range(len(text) + 1):
        r = salvage(text[:cut], order, mode)
        m = sum(1 for e in ends if e <= cut)
        assert r.objects == tuple(objects[:m]), cut
        assert r.drops == ()
        inside = any(s < cut < e for s, e in zip(starts, ends))
        assert r.incomplete_tail == (1 if inside else 0)
        assert r.parse_failed == (cut < 13)
        assert r.truncated == (13 <= cut < len(text))


# ---- junk never nests (data.md §5.8.2, stage2.md §3.6.4) --------------------------------------------------

R1 = f'{{"desc": "r1", "bbox_2d": {BOX}}}'
R2 = f'{{"desc": "r2", "bbox_2d": [{c(5)}, {c(6)}, {c(7)}, {c(8)}]}}'


def test_doubled_bracket_before_one_record_reads_it_and_closes_the_array() -> None:
    """§5.8.2: ``{"objects": [[R]}`` reads R (one ``other`` drop, array closed)."""
    r = salvage('{"objects": [[' + R1 + "]}")
    assert r.objects == (box("r1", 1, 2, 3, 4),)
    assert r.drops == ((0, DropReason.OTHER),)
    assert (r.array_closed, r.trailing_junk, r.truncated, r.syntax_error) == (True, False, False, True)


def test_doubled_bracket_around_the_records_loses_nothing() -> None:
    """§5.8.2 / issue 11 finding 11: ``{"objects": [[R1, R2]]}`` reads R1 and R2 and sets ``trailing_junk``."""
    r = salvage('{"objects": [[' + R1 + ", " + R2 + "]]}")
    assert r.objects == (box("r1", 1, 2, 3, 4), box("r2", 5, 6, 7, 8))
    assert r.drops == ((0, DropReason.OTHER),)
    assert (r.array_closed, r.trailing_junk, r.truncated) == (True, True, False)


def test_a_bracket_inside_junk_does_not_hide_the_next_closer() -> None:
    """§5.8.2: ``{"objects": [[1, [2]], R]}`` closes the array at the ``]`` after ``2``; R is trailing junk."""
    r = salvage('{"objects": [[1, [2]], ' + R1 + "]}")
    assert r.objects == ()
    assert r.drops == ((0, DropReason.OTHER),)
    assert (r.array_closed, r.trailing_junk, r.truncated) == (True, True, False)


def test_a_brace_inside_junk_starts_the_next_record() -> None:
    """§5.8.2: junk ``[x `` before a record is skipped up to the record's ``{``, after the records seen so far."""
    r = salvage('{"objects": [' + R1 + ", [x " + R2 + "]}")
    assert r.objects == (box("r1", 1, 2, 3, 4), box("r2", 5, 6, 7, 8))
    assert r.drops == ((1, DropReason.OTHER),)
    assert (r.array_closed, r.trailing_junk) == (True, False)


def test_brackets_and_braces_inside_a_junk_string_are_skipped() -> None:
    """§5.8.2: the skip is string-aware; ``"]{"`` inside junk neither closes the array nor starts a record."""
    r = salvage('{"objects": [x "]{" ' + R1 + "]}")
    assert r.objects == (box("r1", 1, 2, 3, 4),) and r.drops == ((0, DropReason.OTHER),)
    assert (r.array_closed, r.trailing_junk) == (True, False)


def test_brackets_do_not_end_a_record() -> None:
    """§5.8.1: a record missing its geometry ``]`` ends at its ``}``; the next record is still read."""
    broken = f'{{"desc": "x", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}, {c(4)}}}'
    r = salvage(doc(broken, R2))
    assert r.objects == (box("r2", 5, 6, 7, 8),) and r.drops == ((0, DropReason.OTHER),)


def test_special_run_with_json_punctuation_inside_is_other() -> None:
    """§5.8.3: ``<|a,b|>`` is neither a literal nor a value."""
    assert one_drop(f'{{"desc": "a", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}, <|a,b|>]}}') is DropReason.OTHER


# ---- depth (data.md §5.8 item 4a, stage2.md §3.9.9) --------------------------------------------------------


def nested_arrays(depth: int) -> str:
    """``depth`` arrays below the record's braces, innermost holding one coord token."""
    return "[" * depth + c(1) + "]" * depth


def test_depth_64_is_parsed_and_depth_65_drops_as_other() -> None:
    """Exactly the boundary: 64 levels are ordinary (a nested geometry is non_coord_token), 65 are ``other``."""
    assert one_drop(f'{{"desc": "a", "bbox_2d": {nested_arrays(64)}}}') is DropReason.NON_COORD_TOKEN
    assert one_drop(f'{{"desc": "a", "bbox_2d": {nested_arrays(65)}}}') is DropReason.OTHER
    # Depth counts objects too, and a flat geometry array is depth 1.
    inner = '{"k": ' * 64 + "1" + "}" * 64  # 64 levels
    assert one_drop(f'{{"desc": "a", "bbox_2d": {BOX}, "x": {inner}}}') is DropReason.UNEXPECTED_KEYS
    assert one_drop(f'{{"desc": "a", "bbox_2d": {BOX}, "x": {{"k": {inner}}}}}') is DropReason.OTHER
    assert one_drop(f'{{"desc": "a", "bbox_2d": {BOX}, "x": [{inner}]}}') is DropReason.OTHER


@pytest.mark.parametrize(
    "record",
    [
        f'{{"desc": "a", "bbox_2d": {nested_arrays(1000)}}}',  # issue 11 finding 10: ~1,000 arrays
        '{"desc": "a", "x": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}",  # ~500 objects under an extra key
        '{"desc": "a", "bbox_2d": ' + '[{"k": ' * 400 + "1" + "}]" * 400 + "}",  # arrays and objects mixed
    ],
)
def test_deep_nesting_costs_one_other_drop_and_the_next_record_is_read(record: str) -> None:
    """Finding 10: these raised RecursionError; now one ``other`` drop, and the record after is kept."""
    r = salvage(doc(record, R1))
    assert r.objects == (box("r1", 1, 2, 3, 4),)
    assert r.drops == ((0, DropReason.OTHER),)
    assert (r.array_closed, r.truncated) == (True, False)


def test_unclosed_deep_nesting_is_an_incomplete_tail() -> None:
    r = salvage('{"objects": [' + R1 + ', {"desc": "a", "bbox_2d": ' + "[" * 100_000)
    assert r.objects == (box("r1", 1, 2, 3, 4),)
    assert (r.incomplete_tail, r.truncated, r.drops) == (1, True, ())
