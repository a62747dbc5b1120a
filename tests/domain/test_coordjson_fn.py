"""FN injection (D3; data.md §5.7, §11.41; stage2.md §7.2, §22.13–18)."""

from __future__ import annotations

import json
import random

import attrs
import pytest
from coordjson_toy import DESCS, ToyTokenizer, box, c, det_objects
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.coordjson import (
    TokenClass,
    append_fn_records,
    fn_injection_text,
    fn_injection_typed,
    parse_strict,
    render,
    salvage,
    scan_document,
    scan_tokens,
)
from domain.errors import InvariantViolation
from domain.objects import CoordMode, DetObject, FieldOrder

TOK = ToyTokenizer()
STOPS = frozenset({TOK.im_end, TOK.endoftext})

CAT = box("cat", 12, 40, 300, 410)
DOG = box("dog", 500, 510, 700, 760)


def scan_ids(ids: list[int], order: FieldOrder = FieldOrder.DESC_FIRST):  # type: ignore[no-untyped-def]
    return scan_tokens(
        ids,
        TOK.piece_list(ids),
        TOK.encode,
        TOK.coord_table,
        order,
        CoordMode.TOKENS,
        STOPS,
        decode=TOK.decode,
    )


def test_example_of_data_5_7() -> None:
    prefix = (
        '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_12|>, <|coord_40|>, <|coord_300|>, <|coord_410|>]}'
    )
    assert render([CAT])[:-2] == prefix
    fragment = fn_injection_text(1, [DOG])
    assert (
        fragment
        == ', {"desc": "dog", "bbox_2d": [<|coord_500|>, <|coord_510|>, <|coord_700|>, <|coord_760|>]}]}'
    )
    assert parse_strict(prefix + fragment) == [CAT, DOG]


def test_fragment_of_the_stage2_worked_example() -> None:
    fn = [box("dog", 500, 320, 900, 760), box("person", 50, 600, 300, 980)]
    assert fn_injection_text(2, fn) == (
        ', {"desc": "dog", "bbox_2d": [<|coord_500|>, <|coord_320|>, <|coord_900|>, <|coord_760|>]}, '
        '{"desc": "person", "bbox_2d": [<|coord_50|>, <|coord_600|>, <|coord_300|>, <|coord_980|>]}]}'
    )


def test_the_three_cases() -> None:
    """stage2.md §22.13."""
    a, b = box("a", 1, 2, 3, 4), box("b", 5, 6, 7, 8)
    ra, rb = render([a])[13:-2], render([b])[13:-2]
    assert fn_injection_text(0, [a, b]) == f"{ra}, {rb}]}}"
    assert fn_injection_text(2, [a]) == f", {ra}]}}"
    assert fn_injection_text(2, []) == "]}"
    assert fn_injection_text(0, []) == "]}"


def test_no_records_and_no_fn_gives_the_empty_document() -> None:
    ids = TOK.encode('{"objects": [<|im_end|>')
    scan = scan_ids(ids)
    out = append_fn_records(scan, [], TOK.encode, coord_ids=TOK.coord_table)
    assert TOK.decode(out.y_train_ids) == '{"objects": []}'
    assert out.fn_record_indices == () and out.fn_coord_groups == ()


def test_geometry_first_records() -> None:
    """stage2.md §22.14."""
    text = fn_injection_text(1, [box("a", 1, 2, 3, 4)], FieldOrder.GEOMETRY_FIRST)
    assert text == ', {"bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>], "desc": "a"}]}'


def test_escaped_desc_and_its_span() -> None:
    """stage2.md §22.15: quotes, backslashes and non-ASCII; the DESC span is exactly the value."""
    obj = box('a "big" \\ café', 1, 2, 3, 4)
    text, spans = fn_injection_typed(0, [obj])
    (desc_span,) = [s for s in spans if s.cls is TokenClass.DESC]
    value = text[desc_span.start : desc_span.end]
    assert value == 'a \\"big\\" \\\\ café'
    assert text[desc_span.start - 1] == '"' and text[desc_span.end] == '"'
    assert json.loads(f'"{value}"') == obj.desc
    assert [text[s.start : s.end] for s in spans if s.cls is TokenClass.COORD] == [c(1), c(2), c(3), c(4)]


def test_append_ids_groups_and_y_train() -> None:
    """stage2.md §7.2.5–6, §22.16–17 on the worked example's rollout."""
    rollout = (
        '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_118|>, <|coord_302|>, <|coord_421|>, <|coord_698|>]}, '
        '{"desc": "cup", "bbox_2d": [<|coord_700|>, <|coord_50|>, <|coord_760|>, <|coord_120|>]}, '
        '{"desc": "dog", "bbox_2d": [<|coord_505|>'
    )
    ids = TOK.tokenize(rollout, random.Random(3))
    scan = scan_ids(ids)
    assert scan.n_prefix_records == 2 and scan.prefix_text.endswith("<|coord_120|>]}")
    assert [x.char_span for x in scan.records[:2]] == [(13, 101), (103, 190)]
    fn = [box("dog", 500, 320, 900, 760), box("person", 50, 600, 300, 980)]
    out = append_fn_records(scan, fn, TOK.encode, coord_ids=TOK.coord_table)
    assert out.y_train_ids == scan.prefix_ids + out.append_ids
    assert out.append_ids == tuple(TOK.encode(out.fragment_text))
    assert out.fn_record_indices == (2, 3)
    assert [len(g) for g in out.fn_coord_groups] == [4, 4]
    assert [[TOK.coord_table.bin_of(out.append_ids[i]) for i in g] for g in out.fn_coord_groups] == [
        list(o.bins) for o in fn
    ]
    y_text = TOK.decode(out.y_train_ids)
    r = salvage(y_text + "<|im_end|>")
    assert list(r.objects) == list(scan.valid_objects) + fn
    assert not r.truncated and r.array_closed and r.drops == ()
    assert y_text.endswith("]}") and scan_document(y_text + "<|im_end|>").container_end == len(y_text)


def test_tampered_fragment_raises() -> None:
    scan = scan_ids(TOK.encode('{"objects": ['))

    def lossy(text: str) -> list[int]:
        return [t for t in TOK.encode(text) if t != TOK.ids[c(4)]]

    with pytest.raises(InvariantViolation, match="coord ids"):
        append_fn_records(scan, [box("a", 1, 2, 3, 4)], lossy, coord_ids=TOK.coord_table)


def test_prefix_not_append_ready_raises() -> None:
    scan = scan_ids(TOK.encode('{"objects": [' + render([CAT])[13:-2]))
    bad = attrs.evolve(scan, prefix_text=scan.prefix_text + ", ")
    with pytest.raises(InvariantViolation, match="prefix not append-ready"):
        append_fn_records(bad, [DOG], TOK.encode)
    bad = attrs.evolve(scan, n_prefix_records=0)
    with pytest.raises(InvariantViolation, match="prefix not append-ready"):
        append_fn_records(bad, [DOG], TOK.encode)


def test_closure_with_unbalanced_dropped_record_and_junk_brace() -> None:
    """stage2.md §22.10 / §7.3: closure still resolves to the fragment's `]}`."""
    broken = f'{{"desc": "x", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}, {c(4)}}}'
    rollout = '{"objects": [' + broken + " } [ " + render([CAT])[13:-2] + ', {"desc": "]}<|im'
    scan = scan_ids(TOK.tokenize(rollout, random.Random(0)))
    out = append_fn_records(scan, [DOG, box('x "]}" <|im_end|>'.replace("<|", "<"), 1, 1, 2, 2)], TOK.encode)
    y_text = TOK.decode(out.y_train_ids)
    doc = scan_document(y_text + "<|im_end|>")
    assert doc.container_end == len(y_text) and doc.array_close == len(y_text) - 2
    assert list(salvage(y_text).objects)[-2:] == [DOG, box('x "]}" <im_end|>', 1, 1, 2, 2)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(det_objects(), max_size=4),
    st.lists(det_objects(), max_size=4),
    st.sampled_from(list(FieldOrder)),
    st.integers(0, 10_000),
    st.randoms(use_true_random=False),
)
def test_y_train_salvages_to_prefix_records_then_fn(
    pred: list[DetObject], fn: list[DetObject], order: FieldOrder, cut: int, rnd: random.Random
) -> None:
    """stage2.md §7.2.8 / §22.16 and data.md §11.41: on random truncated rollouts and tokenizations."""
    rollout = render(pred, order) + "<|im_end|>"
    rollout = rollout[: cut % (len(rollout) + 1)]
    ids = TOK.tokenize(rollout, rnd)
    scan = scan_ids(ids, order)
    out = append_fn_records(scan, fn, TOK.encode, order, coord_ids=TOK.coord_table)
    y_text = TOK.decode(out.y_train_ids)
    r = salvage(y_text, order)
    assert list(r.objects) == list(scan.valid_objects) + fn
    assert not r.truncated and r.array_closed and not r.trailing_junk
    if not scan.used_fallback_prefix and scan.prefix_text.startswith("{"):
        # Every prefix record here is valid (truncation only), so the document is strict CoordJSON.
        assert parse_strict(y_text, order) == list(scan.valid_objects) + fn
    assert sum(len(g) for g in out.fn_coord_groups) == sum(len(o.bins) for o in fn)


@settings(deadline=None)
@given(DESCS)
def test_desc_span_round_trips(desc: str) -> None:
    text, spans = fn_injection_typed(3, [box(desc, 1, 2, 3, 4)])
    (span,) = [s for s in spans if s.cls is TokenClass.DESC]
    assert json.loads(f'"{text[span.start : span.end]}"') == desc


def test_append_ready_recheck_is_skipped_only_for_what_the_scanner_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§7.2.4 repeats §3.6.4: the scanner's certificate spares the second re-scan of the same prefix,
    and any change to the prefix, its record count, the field order or the coord mode re-checks."""
    from domain import coordjson

    scan = scan_ids(TOK.encode('{"objects": [' + render([CAT])[13:-2]))
    assert scan.append_ready_checked == (scan.prefix_text, 1, FieldOrder.DESC_FIRST, CoordMode.TOKENS)
    calls: list[tuple[str, int]] = []
    real = coordjson.check_append_ready

    def counting(text: str, n: int, *args: object) -> None:
        calls.append((text, n))
        real(text, n, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(coordjson, "check_append_ready", counting)
    append_fn_records(scan, [DOG], TOK.encode)
    assert calls == []
    append_fn_records(scan, [DOG], TOK.encode, FieldOrder.GEOMETRY_FIRST)
    append_fn_records(attrs.evolve(scan, append_ready_checked=None), [DOG], TOK.encode)
    assert calls == [(scan.prefix_text, 1)] * 2
    with pytest.raises(InvariantViolation, match="prefix not append-ready"):
        append_fn_records(attrs.evolve(scan, prefix_text=scan.prefix_text + ", "), [DOG], TOK.encode)
    # The fallback prefix is not certified by the scanner: append_fn_records checks it itself.
    fallback = scan_ids(TOK.encode("no container here"))
    assert fallback.used_fallback_prefix and fallback.append_ready_checked is None
