"""Token-aligned scanner (stage2.md §3, §22.1–12; data.md §5.5, §11.40)."""

from __future__ import annotations

import json
import random
import re

import pytest
from coordjson_toy import OBJECT_LISTS, ToyTokenizer, box, c, det_objects
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.coordjson import (
    CONTAINER_OPENER,
    INCOMPLETE_TAIL,
    DropReason,
    RecordStatus,
    ScanResult,
    append_fn_records,
    render,
    salvage,
    scan_tokens,
)
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

TOK = ToyTokenizer()
STOPS = frozenset({TOK.im_end, TOK.endoftext})
OPENER = CONTAINER_OPENER


def rec(desc: str, *bins: int) -> str:
    return f'{{"desc": "{desc}", "bbox_2d": [' + ", ".join(c(k) for k in bins) + "]}"


A = rec("a", 1, 2, 3, 4)
B = rec("b", 5, 6, 7, 8)
C = rec("c", 9, 10, 11, 12)


def bpe_like(text: str) -> list[int]:
    """Specials whole; other text as word runs, space runs and fused punctuation runs (e.g. `}]}`, `": [`)."""
    ids: list[int] = []
    for special, part in TOK._split(text):
        chunks = [part] if special else re.findall(r"\w+|\s+|[^\w\s]+", part)
        ids.extend(TOK.tokenize_chunks(chunks))
    return ids


def scan(
    ids: list[int],
    *,
    encode: object = None,
    order: FieldOrder = FieldOrder.DESC_FIRST,
    mode: CoordMode = CoordMode.TOKENS,
) -> ScanResult:
    return scan_tokens(
        ids,
        TOK.piece_list(ids),
        encode or TOK.encode,  # type: ignore[arg-type]
        TOK.coord_table,
        order,
        mode,
        STOPS,
        decode=TOK.decode,
    )


def scan_text(text: str, **kw: object) -> ScanResult:
    return scan(bpe_like(text), **kw)  # type: ignore[arg-type]


def assert_prefix_postconditions(r: ScanResult, ids: list[int], mode: CoordMode = CoordMode.TOKENS) -> None:
    """stage2.md §3.6.4, checked independently of the scanner (with salvage on the prefix text)."""
    assert TOK.decode(r.prefix_ids) == r.prefix_text
    if r.used_fallback_prefix:
        assert r.n_prefix_records == 0 and r.valid_objects == ()
        return
    # The rollout's own ids, then possibly the re-tokenisation of a proper prefix of the next piece.
    same = 0
    while same < min(len(ids), len(r.prefix_ids)) and ids[same] == r.prefix_ids[same]:
        same += 1
    if same < len(r.prefix_ids):
        rest = TOK.decode(r.prefix_ids[same:])
        assert TOK.pieces[ids[same]].startswith(rest) and len(rest) < len(TOK.pieces[ids[same]])
    again = salvage(r.prefix_text, coord_mode=mode)
    n_complete = len(again.objects) + sum(1 for _, why in again.drops if why is not DropReason.OTHER)
    assert not again.parse_failed and not again.array_closed and again.truncated
    assert again.incomplete_tail == 0
    assert r.prefix_text.endswith("}" if r.n_prefix_records else "[")
    # Complete records in the prefix: valid ones plus non-junk drops (junk may be reported as other).
    assert (
        n_complete
        <= r.n_prefix_records
        <= n_complete + sum(1 for _, w in again.drops if w is DropReason.OTHER)
    )
    for rec_ in r.records:
        if rec_.is_valid and mode is CoordMode.TOKENS:
            assert all(i < len(r.prefix_ids) for i in rec_.coord_token_indices)
            assert [TOK.coord_table.bin_of(r.prefix_ids[i]) for i in rec_.coord_token_indices] == list(
                rec_.bins
            )


# ---- S1–S17 (stage2.md §3.8) ---------------------------------------------------------------------------


def test_s1_empty_array_with_fused_closer() -> None:
    ids = TOK.tokenize_chunks(['{"', "objects", '":', " ", "[]}"])
    r = scan(ids)
    assert (len(r.records), r.array_closed, r.truncated, r.invalid_rollout) == (0, True, False, False)
    assert r.prefix_text == OPENER
    assert list(r.prefix_ids[:-1]) == ids[:-1] and TOK.decode(r.prefix_ids[-1:]) == "["
    assert_prefix_postconditions(r, ids)


def test_s2_stop_and_junk_are_gone_and_fused_closer_is_cut() -> None:
    text = '{"objects": [' + A + "]}<|im_end|>junk"
    ids = bpe_like(text)
    assert TOK.pieces[ids[ids.index(TOK.im_end) - 1]] == "]}]}"
    r = scan(ids)
    assert [o.desc for o in r.valid_objects] == ["a"] and r.had_stop
    assert r.prefix_text == '{"objects": [' + A
    assert r.prefix_text.endswith(f"{c(4)}]}}") and not r.prefix_text.endswith("]}]}")
    assert_prefix_postconditions(r, ids)


def test_s3_keyed_form_is_parse_failed() -> None:
    r = scan_text('{"object_1": ' + A + "}")
    assert (r.parse_failed, r.invalid_rollout, r.truncated, r.records) == (True, True, False, ())
    assert list(r.prefix_ids) == TOK.encode(OPENER) and r.used_fallback_prefix and r.prefix_text == OPENER


def test_s4_dropped_record_stays_in_the_prefix() -> None:
    text = '{"objects": [' + A + ", " + rec("b", 1, 2, 3) + ", " + C + "]}"
    ids = bpe_like(text)
    r = scan(ids)
    assert [o.desc for o in r.valid_objects] == ["a", "c"]
    assert [(x.record_index, x.status, x.reason) for x in r.records] == [
        (0, RecordStatus.VALID, None),
        (1, RecordStatus.DROPPED, "wrong_arity"),
        (2, RecordStatus.VALID, None),
    ]
    assert (
        r.n_prefix_records == 3 and r.prefix_text == '{"objects": [' + A + ", " + rec("b", 1, 2, 3) + ", " + C
    )
    assert dict(r.drop_counts) == {"wrong_arity": 1}
    assert_prefix_postconditions(r, ids)


def test_s5_incomplete_tail() -> None:
    text = '{"objects": [' + A + ', {"desc": "dog", "bbox_2d": [' + c(5)
    ids = bpe_like(text)
    r = scan(ids)
    assert [o.desc for o in r.valid_objects] == ["a"] and r.truncated and r.incomplete_tail == 1
    tail = r.records[-1]
    assert (tail.record_index, tail.status, tail.reason, tail.char_span[1]) == (
        1,
        RecordStatus.DROPPED,
        INCOMPLETE_TAIL,
        -1,
    )
    assert dict(r.drop_counts) == {INCOMPLETE_TAIL: 1} and r.drops == ()
    assert r.prefix_text == '{"objects": [' + A and r.n_prefix_records == 1
    assert_prefix_postconditions(r, ids)


def test_s6_complete_record_without_closer() -> None:
    r = scan_text('{"objects": [' + A)
    assert ([o.desc for o in r.valid_objects], r.truncated, r.invalid_rollout) == (["a"], True, False)


def test_s7_no_separator_required() -> None:
    r = scan_text('{"objects": [' + A + " " + B + "]}")
    assert [o.desc for o in r.valid_objects] == ["a", "b"] and r.drops == ()
    assert r.prefix_text == '{"objects": [' + A + " " + B


def test_s8_trailing_comma_is_skipped() -> None:
    r = scan_text('{"objects": [' + A + ", ]}")
    assert ([o.desc for o in r.valid_objects], r.array_closed, r.drops) == (["a"], True, ())
    assert r.prefix_text == '{"objects": [' + A


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (f'{{"bbox_2d": [{c(1)}, {c(2)}, {c(3)}, {c(4)}], "desc": "a"}}', "order_violation"),  # S9
        (f'{{"desc": "a", "bbox_2d": ["{c(1)}", "{c(2)}", "{c(3)}", "{c(4)}"]}}', "non_coord_token"),  # S10
        (rec("a", 500, 10, 400, 90), "bbox_invalid"),  # S11
        (
            f'{{"desc": "a", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}, {c(4)}], "score": 0.9}}',
            "unexpected_keys",
        ),  # S12
        (f'{{"desc": "   ", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}]}}', "missing_desc"),  # S14
        (f'{{"bbox_2d": [{c(1)}, {c(2)}, {c(3)}], "desc": "   "}}', "order_violation"),  # S15
    ],
)
def test_s9_to_s15_single_drops(record: str, reason: str) -> None:
    r = scan_text('{"objects": [' + record + "]}")
    assert [(x.status, x.reason) for x in r.records] == [(RecordStatus.DROPPED, reason)]
    assert dict(r.drop_counts) == {reason: 1} and r.n_prefix_records == 1 and not r.invalid_rollout


def test_s13_string_aware() -> None:
    text = '{"objects": [{"desc": "a]}\\"x", "bbox_2d": [' + ", ".join(c(k) for k in (1, 2, 3, 4)) + "]}]}"
    r = scan_text(text)
    assert [o.desc for o in r.valid_objects] == ['a]}"x']
    (x,) = r.records
    assert x.desc_value_span is not None
    assert text[x.desc_value_span[0] : x.desc_value_span[1]] == 'a]}\\"x'


def test_s16_leading_text_is_kept() -> None:
    r = scan_text('Here: {"objects": [' + A + "]}")
    assert [o.desc for o in r.valid_objects] == ["a"] and r.prefix_text == 'Here: {"objects": [' + A


def test_s17_cut_after_the_opener() -> None:
    ids = bpe_like('{"objects": [')
    r = scan(ids)
    assert (r.records, r.array_closed, r.invalid_rollout, r.truncated) == ((), False, True, True)
    assert list(r.prefix_ids) == ids and not r.used_fallback_prefix


# ---- stage2.md §22.2–12 ----------------------------------------------------------------------------------


def test_appearance_order_is_kept() -> None:
    r = scan_text('{"objects": [' + B + ", " + A + "]}")
    assert [o.desc for o in r.valid_objects] == ["b", "a"]


def test_fused_last_token_is_the_only_one_replaced() -> None:
    ids = bpe_like('{"objects": [' + A + ", " + B + "]}")
    assert TOK.pieces[ids[-1]] == "]}]}"
    r = scan(ids)
    assert list(r.prefix_ids[: len(ids) - 1]) == ids[:-1]
    assert TOK.decode(r.prefix_ids[len(ids) - 1 :]) == "]}"
    assert r.prefix_text.endswith(f"{c(8)}]}}")


def test_fused_separator_token_at_the_cut() -> None:
    """A `},` piece at the cut (the next record incomplete) is re-tokenised to exactly `}`."""
    ids = TOK.tokenize_chunks(
        [
            '{"objects": [',
            '{"desc": "a", "bbox_2d": [',
            c(1),
            ", ",
            c(2),
            ", ",
            c(3),
            ", ",
            c(4),
            "]},",
            ' {"desc": "b',
        ]
    )
    r = scan(ids)
    assert r.prefix_text == '{"objects": [' + A and r.n_prefix_records == 1
    assert list(r.prefix_ids[:-1]) == ids[:-2] and TOK.decode(r.prefix_ids[-1:]) == "]}"
    assert_prefix_postconditions(r, ids)


def test_cut_fallback_with_a_non_round_tripping_encode() -> None:
    """stage2.md §22.5: no exception, prefix ends at the previous record, the lost record counts other."""
    head = bpe_like('{"objects": [' + A)
    ids = head + TOK.tokenize_chunks(
        [", ", '{"desc": "b", "bbox_2d": [', c(5), ", ", c(6), ", ", c(7), ", ", c(8), "]}]}"]
    )
    r = scan(ids, encode=TOK.bad_encode)
    assert r.cut_fallback and r.n_prefix_records == 1
    assert list(r.prefix_ids) == head and r.prefix_text == '{"objects": [' + A
    assert [o.desc for o in r.valid_objects] == ["a"]
    lost = r.records[1]
    assert (lost.status, lost.reason, lost.parse_reason, lost.in_prefix) == (
        RecordStatus.DROPPED,
        "other",
        None,
        False,
    )
    assert dict(r.drop_counts) == {"other": 1}
    assert [o.desc for o in r.parsed_objects()] == ["a", "b"]  # what salvage of the text returns
    assert_prefix_postconditions(r, ids)


def test_cut_fallback_down_to_the_opener_and_the_fallback_prefix() -> None:
    ids = TOK.tokenize_chunks(
        ['{"objects": [{"desc": "a", "bbox_2d": [', c(1), ", ", c(2), ", ", c(3), ", ", c(4), "]}]}"]
    )
    r = scan(ids, encode=TOK.bad_encode)
    # Both the record cut and the opener cut fall inside fused tokens and fail: fallback prefix.
    assert r.cut_fallback and r.used_fallback_prefix and r.n_prefix_records == 0
    assert list(r.prefix_ids) == TOK.bad_encode(OPENER) and r.valid_objects == ()
    assert r.invalid_rollout is False  # the array was closed; the lost record is a drop


def test_stop_token_followed_by_text_is_absent() -> None:
    for tail in ["<|im_end|>more text", "<|endoftext|>" + A]:
        ids = bpe_like('{"objects": [' + A + "]}" + tail)
        r = scan(ids)
        assert r.had_stop and r.prefix_text == '{"objects": [' + A
        assert TOK.im_end not in r.prefix_ids and TOK.endoftext not in r.prefix_ids


def test_spelled_out_stop_text_cuts_inside_a_token() -> None:
    ids = TOK.tokenize_chunks(['{"objects": [', A, "]}<|im", "_end|>", "junk"])
    r = scan(ids)
    assert r.had_stop and r.prefix_text == '{"objects": [' + A and r.array_closed and not r.truncated


def test_bad_record_between_two_valid_ones() -> None:
    r = scan_text('{"objects": [' + A + ", " + rec("x", 1, 2, 3) + ", " + B + "]}")
    assert [o.desc for o in r.valid_objects] == ["a", "b"]
    assert sum(r.drop_counts.values()) == 1 and r.drop_counts["wrong_arity"] == 1 and r.n_prefix_records == 3


def test_polygon_captures_every_coord_index() -> None:
    bins = (10, 10, 50, 10, 50, 20, 20, 30)
    text = '{"objects": [{"desc": "p", "poly": [' + ", ".join(c(k) for k in bins) + "]}]}"
    ids = bpe_like(text)
    r = scan(ids)
    (x,) = r.records
    assert x.geom_type is GeometryKind.POLY and len(x.coord_token_indices) == 8
    assert [TOK.coord_table.bin_of(ids[i]) for i in x.coord_token_indices] == list(bins) == list(x.bins)


def test_coord_text_spelled_by_ordinary_pieces_is_non_coord_token() -> None:
    """stage2.md §22.9 and data.md §5.8.8: salvage of the text accepts it, the scanner does not."""
    ids = TOK.tokenize_chunks(
        [
            '{"objects": [{"desc": "a", "bbox_2d": [',
            c(1),
            ", ",
            c(2),
            ", ",
            c(3),
            ", ",
            "<|coord",
            "_4|>",
            "]}]}",
        ]
    )
    r = scan(ids)
    assert [(x.status, x.reason) for x in r.records] == [(RecordStatus.DROPPED, "non_coord_token")]
    assert len(salvage(TOK.decode(ids)).objects) == 1
    # The token check is row 8: it precedes the arity check of row 9.
    ids = TOK.tokenize_chunks(
        ['{"objects": [{"desc": "a", "bbox_2d": [', c(1), ", ", "<|coord_2|", ">", "]}]}"]
    )
    assert scan(ids).records[0].reason == "non_coord_token"


def test_bins_come_from_ids() -> None:
    r = scan_text('{"objects": [' + rec("a", 0, 998, 999, 999) + "]}")
    assert r.valid_objects[0].bins == (0, 998, 999, 999)


def test_postconditions_with_unbalanced_dropped_record_and_junk_brace() -> None:
    """stage2.md §22.10: a dropped record missing its `]` and junk `}` between records."""
    broken = f'{{"desc": "x", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}, {c(4)}}}'
    text = '{"objects": [' + A + ", " + broken + " } " + B + ', {"desc": "t'
    ids = bpe_like(text)
    r = scan(ids)
    assert [o.desc for o in r.valid_objects] == ["a", "b"]
    assert r.drops == ((1, DropReason.OTHER), (2, DropReason.OTHER)) and r.syntax_error
    assert r.n_prefix_records == 3 and r.prefix_text == '{"objects": [' + A + ", " + broken + " } " + B
    assert_prefix_postconditions(r, ids)


def test_the_scan_depends_on_the_text_not_on_its_tokenisation() -> None:
    text = '{"objects": [' + A + ", " + B + "]}"
    fused = scan(bpe_like(text))
    chopped = scan(TOK.tokenize(text, random.Random(7), max_chunk=3))
    for r in (fused, chopped):
        assert r.valid_objects == (box("a", 1, 2, 3, 4), box("b", 5, 6, 7, 8))
        assert [x.char_span for x in r.records] == [(13, 13 + len(A)), (15 + len(A), 15 + len(A) + len(B))]
        assert r.prefix_text == '{"objects": [' + A + ", " + B and r.n_prefix_records == 2
        assert (r.array_closed, r.truncated, r.drops) == (True, False, ())
    f1 = scan(bpe_like("nothing"))
    f2 = scan(bpe_like("[]"))
    assert f1.prefix_ids == f2.prefix_ids == tuple(TOK.encode(OPENER))


@pytest.mark.parametrize(
    ("text", "invalid"),
    [
        ('{"object_1": {}}', True),  # S3
        ('{"objects": [', True),  # S17
        ('{"objects": [junk', True),
        ('{"objects": []}', False),  # S1
        ('{"objects": [' + A, False),  # S6
        ('{"objects": [' + rec("a", 1, 2, 3) + "]}", False),
        ('{"objects": [{"desc": "a"', True),
    ],
)
def test_invalid_rollout(text: str, invalid: bool) -> None:
    assert scan_text(text).invalid_rollout is invalid


def test_empty_and_mismatched_inputs() -> None:
    r = scan([])
    assert r.parse_failed and r.used_fallback_prefix and r.invalid_rollout
    with pytest.raises(Exception, match="pieces"):
        scan_tokens([1, 2], ["a"], TOK.encode, TOK.coord_table)


def test_encode_that_raises_is_a_cut_fallback() -> None:
    def broken(text: str) -> list[int]:
        raise RuntimeError("tokenizer down")

    ids = bpe_like('{"objects": [' + A) + bpe_like(", " + B + "]}")
    r = scan(ids, encode=broken)
    assert r.cut_fallback and r.n_prefix_records == 1 and r.prefix_text == '{"objects": [' + A


def test_without_decode_known_pieces_verify_the_cut() -> None:
    ids = bpe_like('{"objects": [' + A) + bpe_like(", " + B + "]}")
    assert TOK.pieces[ids[-1]] == "]}]}" and TOK.ids["]}"] in ids
    plain = scan_tokens(ids, TOK.piece_list(ids), TOK.encode, TOK.coord_table)
    assert not plain.cut_fallback and plain.n_prefix_records == 2
    assert plain.prefix_ids == tuple(ids[:-1]) + (TOK.ids["]}"],)
    # A replacement made of ids this rollout never used cannot be verified without decode.
    split = scan_tokens(ids, TOK.piece_list(ids), lambda s: TOK.tokenize_chunks(list(s)), TOK.coord_table)
    assert split.cut_fallback and split.n_prefix_records == 1


# ---- numeric mode ----------------------------------------------------------------------------------------


def test_numeric_mode_groups_every_token_overlapping_the_digits() -> None:
    ids = TOK.tokenize_chunks(
        ['{"objects": [{"desc": "a", "bbox_2d": [', "1", "2, 3", "4", ", 5", "6, 78", "]}]}"]
    )
    r = scan(ids, mode=CoordMode.NUMERIC)
    (x,) = r.records
    assert x.bins == (12, 34, 56, 78)
    assert x.coord_token_groups == ((1, 2), (2, 3), (4, 5), (5,))


# ---- junk never nests, depth (data.md §5.8.2 and 4a; stage2.md §3.6.4, §3.9) ------------------------------


@pytest.mark.parametrize(
    ("text", "descs", "closed", "trailing"),
    [
        ('{"objects": [[' + A + "]}", ["a"], True, False),
        ('{"objects": [[' + A + ", " + B + "]]}", ["a", "b"], True, True),
        ('{"objects": [[1, [2]], ' + A + "]}", [], True, True),
        ('{"objects": [' + A + ", [x " + B + "]}", ["a", "b"], True, False),
    ],
)
def test_junk_examples_of_5_8_2(text: str, descs: list[str], closed: bool, trailing: bool) -> None:
    """The scanner reads §5.8.2's examples as salvage does, and its prefix takes an FN append (§3.6.4)."""
    ids = bpe_like(text)
    r = scan(ids)
    assert [o.desc for o in r.valid_objects] == descs
    assert len(r.drops) == 1 and r.drops[0][1] is DropReason.OTHER and r.syntax_error
    assert (r.array_closed, r.trailing_junk, r.truncated) == (closed, trailing, False)
    assert [x.record_index for x in r.records] == list(range(len(descs)))  # junk has no record index (§3.9.3)
    assert_prefix_postconditions(r, ids)
    fn = append_fn_records(r, [box("fn", 1, 1, 2, 2)], TOK.encode)
    again = salvage(TOK.decode(fn.y_train_ids))
    assert [o.desc for o in again.objects] == [*descs, "fn"] and again.array_closed


def test_empty_braces_at_array_level_are_a_record() -> None:
    """stage2.md §3.9.2: ``{}`` is a record (index 0, in the prefix) that drops as missing_desc."""
    r = scan_text('{"objects": [{}, ' + A + "]}")
    assert [(x.record_index, x.reason) for x in r.records] == [(0, "missing_desc"), (1, None)]
    assert r.n_prefix_records == 2 and dict(r.drop_counts) == {"missing_desc": 1}


def test_junk_counts_once_in_other_and_is_no_record() -> None:
    """stage2.md §3.9.3."""
    r = scan_text('{"objects": [' + A + ", junk ] } , " + B + "]}")
    assert [x.record_index for x in r.records] == [0]
    assert r.drops == ((1, DropReason.OTHER),) and dict(r.drop_counts) == {"other": 1} and r.array_closed


def test_stop_spelled_inside_a_token_that_does_not_re_encode_falls_back() -> None:
    """stage2.md §3.9.1: the kept part of ``]}<|im`` is ``]}``; without a round-trip, record ``a`` moves out."""
    chunks = ['{"objects": [', '{"desc": "a", "bbox_2d": [', c(1), ", ", c(2), ", ", c(3), ", ", c(4)]
    ids = TOK.tokenize_chunks([*chunks, "]}<|im", "_end|>"])
    good = scan(ids)
    assert good.had_stop and not good.cut_fallback and good.prefix_text == '{"objects": [' + A
    bad = scan(ids, encode=TOK.bad_encode)
    assert bad.had_stop and bad.cut_fallback and bad.prefix_text == OPENER and bad.n_prefix_records == 0
    assert [(x.status, x.reason, x.in_prefix) for x in bad.records] == [
        (RecordStatus.DROPPED, "other", False)
    ]
    assert_prefix_postconditions(bad, ids)


def test_a_dropped_record_moved_out_by_the_fallback_keeps_its_reason() -> None:
    """stage2.md §3.9.4: only a valid record becomes ``other``."""
    head = bpe_like('{"objects": [' + A)
    ids = head + TOK.tokenize_chunks(
        [", ", '{"desc": "b", "bbox_2d": [', c(5), ", ", c(6), ", ", c(7), "]}]}"]
    )
    r = scan(ids, encode=TOK.bad_encode)
    assert r.cut_fallback and r.n_prefix_records == 1 and list(r.prefix_ids) == head
    assert [(x.reason, x.in_prefix) for x in r.records] == [(None, True), ("wrong_arity", False)]
    assert dict(r.drop_counts) == {"wrong_arity": 1}


@pytest.mark.parametrize("depth", [64, 65, 1000])
def test_deep_nesting_is_one_other_drop(depth: int) -> None:
    """data.md §5.8 item 4a, stage2.md §3.9.9: 64 levels parse; deeper drops as ``other``; never an error."""
    deep = '{"desc": "d", "bbox_2d": ' + "[" * depth + c(1) + "]" * depth + "}"
    ids = bpe_like('{"objects": [' + deep + ", " + A + "]}")
    r = scan(ids)
    assert [x.reason for x in r.records] == ["non_coord_token" if depth <= 64 else "other", None]
    assert [o.desc for o in r.valid_objects] == ["a"] and r.n_prefix_records == 2
    assert_prefix_postconditions(r, ids)


def test_deep_objects_under_an_extra_key_are_one_other_drop() -> None:
    """Issue 11 finding 10: ~500 nested objects under an extra key raised RecursionError."""
    deep = '{"desc": "d", "x": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}"
    r = scan_text('{"objects": [' + deep + ", " + A + "]}")
    assert [x.reason for x in r.records] == ["other", None] and [o.desc for o in r.valid_objects] == ["a"]


# ---- properties ------------------------------------------------------------------------------------------

FRAGMENTS = [
    "{",
    "}",
    "[",
    "]",
    '"',
    ",",
    " ",
    ": ",
    '"desc"',
    '"bbox_2d"',
    c(7),
    c(1000),
    "<|coord_*|>",
    "x",
    "<|im_end|>",
    "1",
    "\\",
    "]}",
]


@st.composite
def rollouts(draw: st.DrawFn) -> tuple[str, FieldOrder, CoordMode]:
    order = draw(st.sampled_from(list(FieldOrder)))
    mode = draw(st.sampled_from(list(CoordMode)))
    text = render(draw(OBJECT_LISTS), order, mode)
    rnd = draw(st.randoms(use_true_random=False))
    chars = list(text)
    for _ in range(draw(st.integers(0, 3))):
        at = rnd.randrange(len(chars) + 1)
        if rnd.random() < 0.5:
            chars.insert(at, rnd.choice(FRAGMENTS))
        elif at < len(chars):
            del chars[at]
    text = "".join(chars)
    if draw(st.booleans()):
        text = text[: rnd.randint(0, len(text))]
    if draw(st.booleans()):
        text = (
            draw(st.sampled_from(["", "Here: ", "{"]))
            + text
            + draw(st.sampled_from(["", "<|im_end|>", " junk"]))
        )
    return text, order, mode


@settings(max_examples=400, deadline=None)
@given(rollouts(), st.randoms(use_true_random=False))
def test_scanner_agrees_with_salvage_under_random_tokenizations(
    case: tuple[str, FieldOrder, CoordMode], rnd: random.Random
) -> None:
    text, order, mode = case
    ids = TOK.tokenize(text, rnd)
    assert TOK.decode(ids) == text
    r = scan(ids, order=order, mode=mode)
    s = salvage(text, order, mode)
    assert not r.cut_fallback  # encode round-trips
    assert r.valid_objects == s.objects
    assert r.drops == s.drops
    assert (r.truncated, r.parse_failed, r.trailing_junk, r.had_stop, r.syntax_error, r.array_closed) == (
        s.truncated,
        s.parse_failed,
        s.trailing_junk,
        s.had_stop,
        s.syntax_error,
        s.array_closed,
    )
    assert r.incomplete_tail == s.incomplete_tail
    pieces = TOK.piece_list(ids)
    for x in r.records:
        if not x.is_valid:
            continue
        assert x.desc_value_span is not None
        raw = text[x.desc_value_span[0] : x.desc_value_span[1]]
        assert json.loads(f'"{raw}"').strip() == x.desc
        if mode is CoordMode.TOKENS:
            assert [TOK.coord_table.bin_of(ids[i]) for i in x.coord_token_indices] == list(x.bins)
        else:
            for group, k in zip(x.coord_token_groups, x.bins):
                assert group == tuple(range(group[0], group[-1] + 1))
                assert str(k) in "".join(pieces[i] for i in group)
                assert all(any(ch.isdigit() for ch in pieces[i]) for i in group)
    assert_prefix_postconditions(r, ids, mode)


@settings(max_examples=100, deadline=None)
@given(rollouts(), st.randoms(use_true_random=False))
def test_scanner_never_raises_and_fallback_keeps_postconditions(
    case: tuple[str, FieldOrder, CoordMode], rnd: random.Random
) -> None:
    text, order, mode = case
    ids = TOK.tokenize(text, rnd)
    r = scan(ids, encode=TOK.bad_encode, order=order, mode=mode)
    s = salvage(text, order, mode)
    assert [o for o in r.parsed_objects()] == list(s.objects)
    moved = [x for x in r.records if x.parse_reason is None and x.char_span[1] >= 0 and not x.in_prefix]
    assert len(r.valid_objects) + len(moved) == len(s.objects)
    assert_prefix_postconditions(r, ids, mode)


def test_postconditions_on_1000_random_truncations() -> None:
    """stage2.md §22.10: 1,000 random truncations of a valid rollout under random tokenizations."""
    rnd = random.Random(1234)
    objects = [
        box("cat", 12, 40, 300, 410),
        box('a "q" ]}', 1, 2, 3, 4),
        DetObject("poly", GeometryKind.POLY, (10, 10, 50, 10, 50, 20)),
        box("café", 0, 0, 999, 999),
    ]
    text = render(objects) + "<|im_end|>"
    seen_records = set()
    for _ in range(1000):
        ids = TOK.tokenize(text, rnd, max_chunk=rnd.randint(1, 8))
        ids = ids[: rnd.randint(0, len(ids))]
        r = scan(ids)
        assert_prefix_postconditions(r, ids)
        assert list(r.valid_objects) == objects[: len(r.valid_objects)]
        assert r.n_prefix_records == len(r.valid_objects)
        seen_records.add(r.n_prefix_records)
    assert seen_records == {0, 1, 2, 3, 4}


@settings(max_examples=50, deadline=None)
@given(st.lists(det_objects(), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_coord_indices_point_at_coord_ids_in_the_prefix(objects: list[DetObject], rnd: random.Random) -> None:
    ids = TOK.tokenize(render(objects) + "<|im_end|>", rnd)
    r = scan(ids)
    assert list(r.valid_objects) == objects and r.n_prefix_records == len(objects)
    for x in r.records:
        assert [TOK.coord_table.bin_of(r.prefix_ids[i]) for i in x.coord_token_indices] == list(x.bins)
