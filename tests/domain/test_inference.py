"""Per-sample processing of the inference pipeline (infer-eval-config.md §2.7-§2.8, §3; spec tests 19-24).

Generations are built with the deterministic fake tokenizer: every special token (coord tokens,
``<|im_end|>``) is one id, other ASCII text is split into chunks or bytes, non-ASCII into UTF-8 bytes.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.fakes.tokenizer import FakeTokenizer
from domain.coordjson import render, scan_tokens
from domain.errors import InvariantViolation
from domain.inference import (
    COUNTER_KEYS,
    ERROR_CODES,
    OBJECT_CODES,
    GeneratedText,
    InferenceRecord,
    SampleOutcome,
    artifact_line,
    changed_keys,
    complete_line_ends,
    error_codes_present,
    failed_line,
    fingerprint_of,
    gt_entries,
    micro_batches,
    process_generation,
    resume_count,
    serialize_line,
    summary_counters,
    token_scanner,
)
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

TOK = FakeTokenizer()
IM_END = TOK.im_end_id
STOPS = frozenset({IM_END, TOK.pad_id})


def c(k: int) -> str:
    return f"<|coord_{k}|>"


def box(*bins: int) -> str:
    return "[" + ", ".join(c(k) for k in bins) + "]"


def generated(text: str, logprob: float = math.log(0.5)) -> GeneratedText:
    ids = TOK.encode(text)
    return GeneratedText(ids, TOK.decode(ids), [logprob] * len(ids))


def process(
    gen: GeneratedText,
    width: int = 640,
    height: int = 480,
    mode: CoordMode = CoordMode.TOKENS,
    order: FieldOrder = FieldOrder.DESC_FIRST,
) -> SampleOutcome:
    scan = token_scanner(TOK, order, mode, STOPS)
    return process_generation(gen, width=width, height=height, field_order=order, coord_mode=mode, scan=scan)


# --- spec tests 19-24 ---------------------------------------------------------------------------------


def test_19_salvage_keeps_the_good_record_and_reports_each_drop_in_order() -> None:
    text = (
        '{"objects": [{"desc": "ok", "bbox_2d": ' + box(12, 40, 300, 410) + "}, "
        '{"desc": "bad", "bbox_2d": [' + ", ".join(c(k) for k in (1, 2, 3)) + "]}, "
        '{"desc": "tail", "bbox_2d": [' + c(8)
    )
    outcome = process(generated(text))
    assert [(p.desc, p.points) for p in outcome.pred] == [("ok", (8, 19, 192, 197))]
    assert outcome.errors == ("wrong_arity", "incomplete_tail", "truncated")
    counters = summary_counters(
        [{"errors": list(outcome.errors), "pred": [p.to_json() for p in outcome.pred]}]
    )
    assert counters["wrong_arity"] == counters["incomplete_tail"] == counters["truncated"] == 1
    assert counters["pred_objects_valid"] == 1
    assert counters["pred_objects_dropped"] == 2  # wrong_arity + incomplete_tail; truncated is record level
    assert counters["empty_pred"] == 0


def test_20_no_container_is_parse_failed_and_empty_pred() -> None:
    outcome = process(generated("I see a cat.<|im_end|>"))
    assert outcome.pred == ()
    assert outcome.errors == ("parse_failed", "empty_pred")


def test_21_reversed_box_is_bbox_invalid() -> None:
    outcome = process(generated('{"objects": [{"desc": "a", "bbox_2d": ' + box(300, 40, 12, 410) + "}]}"))
    assert outcome.errors == ("bbox_invalid", "empty_pred")


def test_21_bins_10_and_11_on_width_64_are_degenerate() -> None:
    text = '{"objects": [{"desc": "a", "bbox_2d": ' + box(10, 100, 11, 900) + "}]}<|im_end|>"
    outcome = process(generated(text), width=64, height=64)
    assert outcome.errors == ("degenerate", "empty_pred")
    # The same bins on a wide image survive: the drop is about pixels, not bins.
    assert process(generated(text), width=640, height=64).errors == ()


def test_21_degenerate_polygon_extent() -> None:
    flat = '{"objects": [{"desc": "p", "poly": [' + ", ".join(c(k) for k in (10, 5, 11, 9, 10, 20)) + "]}]}"
    assert process(generated(flat), width=64, height=64).errors == ("degenerate", "empty_pred")


@pytest.mark.parametrize(
    ("bins", "size", "pixels"),
    [
        ((12, 40, 300, 410), (640, 480), [8, 19, 192, 197]),
        ((0, 0, 999, 999), (64, 48), [0, 0, 63, 47]),
        ((0, 0, 999, 999), (100, 50), [0, 0, 99, 49]),
        ((500, 10, 500, 11), (64, 64), [32, 1, 32, 1]),
    ],
)
def test_22_codec_worked_numbers_in_gt(
    bins: tuple[int, ...], size: tuple[int, int], pixels: list[int]
) -> None:
    (entry,) = gt_entries([DetObject("chair", GeometryKind.BBOX, bins)], *size)
    assert entry == {"type": "bbox_2d", "points": pixels, "desc": "chair"}


def test_23_score_is_the_mean_coord_token_probability() -> None:
    text = '{"objects": [{"desc": "a", "bbox_2d": ' + box(12, 40, 300, 410) + "}]}<|im_end|>"
    ids = TOK.encode(text)
    probabilities = iter([0.9, 0.8, 0.7, 0.6])
    logprobs = [math.log(next(probabilities)) if TOK.coord_ids.is_coord_id(i) else math.log(0.1) for i in ids]
    outcome = process(GeneratedText(ids, TOK.decode(ids), logprobs))
    assert [p.score for p in outcome.pred] == [0.75]


def test_23_numeric_coordinate_probability_is_the_product_over_its_digit_tokens() -> None:
    text = '{"objects": [{"desc": "a", "bbox_2d": [100, 123, 300, 400]}]}<|im_end|>'
    ids = TOK.encode(text)
    pieces = [TOK.piece(i) for i in ids]
    start = text.index("123")
    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(ids))]
    digit_positions = [i for i, o in enumerate(offsets) if start <= o < start + 3]
    assert [pieces[i] for i in digit_positions] == [
        "1",
        "2",
        "3",
    ]  # the fake tokenizer spells digits one by one
    logprobs = [0.0] * len(ids)
    for i, p in zip(digit_positions, (0.9, 0.9, 0.5)):
        logprobs[i] = math.log(p)
    outcome = process(GeneratedText(ids, TOK.decode(ids), logprobs), mode=CoordMode.NUMERIC)
    # p(123) = 0.9 * 0.9 * 0.5 = 0.405; the other three coordinates have p = 1.
    assert [p.score for p in outcome.pred] == [round((0.405 + 3) / 4, 6)]


def test_24_scanner_disagreement_is_an_internal_error() -> None:
    text = '{"objects": [{"desc": "a", "bbox_2d": ' + box(12, 40, 300, 410) + "}]}"
    other = TOK.encode('{"objects": [{"desc": "a", "bbox_2d": ' + box(12, 40, 300, 411) + "}]}")
    real = token_scanner(TOK, FieldOrder.DESC_FIRST, CoordMode.TOKENS, STOPS)

    def wrong_scanner(ids: object) -> object:
        return real(other)

    with pytest.raises(InvariantViolation, match="disagree"):
        process_generation(
            generated(text),
            width=64,
            height=64,
            field_order=FieldOrder.DESC_FIRST,
            coord_mode=CoordMode.TOKENS,
            scan=wrong_scanner,  # type: ignore[arg-type]
        )


def test_missing_logprobs_are_an_internal_error() -> None:
    ids = TOK.encode('{"objects": []}')
    with pytest.raises(InvariantViolation, match="log-probs"):
        process(GeneratedText(ids, TOK.decode(ids), []))


def test_descriptions_are_not_compared_between_parsers() -> None:
    # A two-byte character: the scanner's per-id pieces decode it as two U+FFFD, salvage sees 'é'.
    text = '{"objects": [{"desc": "café", "bbox_2d": ' + box(1, 2, 300, 400) + "}]}"
    outcome = process(generated(text))
    assert [p.desc for p in outcome.pred] == ["café"]


def test_empty_objects_is_clean_apart_from_empty_pred() -> None:
    assert process(generated('{"objects": []}<|im_end|>')).errors == ("empty_pred",)


# --- artifact lines -------------------------------------------------------------------------------------


RECORD = InferenceRecord(
    index=0,
    image="images/val/0001.jpg",
    width=640,
    height=480,
    objects=(DetObject("chair", GeometryKind.BBOX, (12, 40, 300, 410)),),
)


def test_artifact_line_matches_the_spec_example() -> None:
    text = '{"objects": [{"desc": "chair", "bbox_2d": ' + box(12, 40, 300, 410) + "}]}<|im_end|>"
    gen = generated(text, logprob=0.0)
    line = artifact_line(RECORD, gen, process(gen), IM_END)
    assert list(line) == [
        "index", "image", "width", "height", "coord_mode", "gt", "pred",
        "raw_output", "raw_ends_with_im_end", "num_generated_tokens", "errors",
    ]  # fmt: skip
    assert line["gt"] == [{"type": "bbox_2d", "points": [8, 19, 192, 197], "desc": "chair"}]
    assert line["pred"] == [{"type": "bbox_2d", "points": [8, 19, 192, 197], "desc": "chair", "score": 1.0}]
    assert line["raw_output"] == text
    assert line["raw_ends_with_im_end"] is True
    assert line["num_generated_tokens"] == len(gen.token_ids)
    assert line["errors"] == []
    serialized = serialize_line(line)
    assert serialized.startswith('{"index":0,"image":"images/val/0001.jpg","width":640,"height":480,')
    assert json.loads(serialized) == line


def test_image_id_is_passed_through_after_image() -> None:
    record = InferenceRecord(index=3, image="a.jpg", width=64, height=64, objects=(), image_id=42)
    line = failed_line(record)
    assert list(line)[:4] == ["index", "image", "image_id", "width"]
    assert line["image_id"] == 42
    assert (line["pred"], line["raw_output"], line["errors"]) == ([], None, ["generation_failed"])
    assert summary_counters([line])["generation_failed"] == 1
    assert summary_counters([line])["empty_pred"] == 0


def test_raw_ends_with_im_end_is_false_for_a_length_cut() -> None:
    gen = generated('{"objects": [')
    assert artifact_line(RECORD, gen, process(gen), IM_END)["raw_ends_with_im_end"] is False


def test_non_ascii_is_written_as_is() -> None:
    record = InferenceRecord(0, "ä.jpg", 64, 64, (DetObject("Käse", GeometryKind.BBOX, (0, 0, 999, 999)),))
    assert "Käse" in serialize_line(failed_line(record))


# --- counters --------------------------------------------------------------------------------------------


@given(st.lists(st.lists(st.sampled_from(ERROR_CODES), max_size=6), max_size=8), st.data())
def test_counters_count_every_occurrence(errors: list[list[str]], data: st.DataObject) -> None:
    lines = [{"errors": e, "pred": [{}] * data.draw(st.integers(0, 3))} for e in errors]
    counters = summary_counters(lines)
    assert set(counters) == set(COUNTER_KEYS)
    for code in ERROR_CODES:
        assert counters[code] == sum(e.count(code) for e in errors)
    assert counters["pred_objects_dropped"] == sum(counters[c] for c in OBJECT_CODES)
    assert counters["pred_objects_valid"] == sum(len(line["pred"]) for line in lines)
    assert error_codes_present(counters) == sorted({c for e in errors for c in e})


def test_unknown_code_in_an_artifact_is_an_error() -> None:
    with pytest.raises(InvariantViolation, match="unknown error code 'nope'"):
        summary_counters([{"index": 0, "errors": ["nope"]}])


# --- resume ----------------------------------------------------------------------------------------------


def _artifact(n: int) -> bytes:
    return b"".join(serialize_line({"index": i, "x": "\u00e9" * i}).encode() + b"\n" for i in range(n))


@given(st.integers(0, 9), st.integers(0, 80), st.integers(1, 4))
def test_resume_prefix_stops_at_the_first_incomplete_line(n: int, cut: int, batch_size: int) -> None:
    full = _artifact(n)
    tail = serialize_line({"index": n}).encode() + b"\n"
    data = full + tail[: min(cut, len(tail) - 1)]  # the half-written last line never ends in '\n'
    ends = complete_line_ends(data)
    assert len(ends) == n
    assert ends == [len(_artifact(i + 1)) for i in range(n)]
    keep = resume_count(len(ends), batch_size)
    assert keep % batch_size == 0 and keep <= n < keep + batch_size


def test_resume_prefix_requires_index_equal_to_line_number() -> None:
    data = _artifact(3) + serialize_line({"index": 7}).encode() + b"\n" + _artifact(5)[-20:]
    assert len(complete_line_ends(data)) == 3
    assert complete_line_ends(b'[1]\n{"index": 0}\n') == []
    assert complete_line_ends(b'{"index": true}\n') == []


def test_spec_25_five_lines_batch_two_truncates_to_four() -> None:
    data = _artifact(5) + b'{"index":5,"ima'
    assert resume_count(len(complete_line_ends(data)), 2) == 4


def test_micro_batches_are_aligned_from_zero() -> None:
    assert micro_batches(0, 3, 2) == [range(2), range(2, 3)]
    assert micro_batches(4, 8, 2) == [range(4, 6), range(6, 8)]
    with pytest.raises(InvariantViolation):
        micro_batches(3, 8, 2)


# --- fingerprint -----------------------------------------------------------------------------------------

INPUTS = {
    "model": {"path": "ckpt", "dtype": "bfloat16"},
    "infer": {"generation": {"temperature": 0.0, "top_p": 0.95}},
    "run": {"seed": 17},
}


def test_fingerprint_is_key_order_independent_and_names_changed_keys() -> None:
    reordered = {"run": {"seed": 17}, "infer": {"generation": {"top_p": 0.95, "temperature": 0.0}},
                 "model": {"dtype": "bfloat16", "path": "ckpt"}}  # fmt: skip
    assert fingerprint_of(reordered) == fingerprint_of(INPUTS)
    changed = json.loads(json.dumps(INPUTS))
    changed["infer"]["generation"]["temperature"] = 0.7
    assert fingerprint_of(changed) != fingerprint_of(INPUTS)
    assert changed_keys(INPUTS, changed) == ["infer.generation.temperature"]
    assert changed_keys(INPUTS, {**INPUTS, "extra": 1}) == ["extra"]
    assert changed_keys({"seed": 1}, {"seed": True}) == ["seed"]  # 1 == True in Python, not in JSON


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=3),
                    lambda inner: st.dictionaries(st.text("ab", min_size=1, max_size=2), inner, max_size=3),
                    max_leaves=8),
       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=3),
                    lambda inner: st.dictionaries(st.text("ab", min_size=1, max_size=2), inner, max_size=3),
                    max_leaves=8))  # fmt: skip
def test_no_changed_keys_iff_same_fingerprint(a: object, b: object) -> None:
    left, right = {"v": a}, {"v": b}
    assert (changed_keys(left, right) == []) == (fingerprint_of(left) == fingerprint_of(right))


# --- properties of the processing ---------------------------------------------------------------------------

DESCS = st.sampled_from(["cat", "dog", "a b", "café", "雪", 'x\\"y', " pad "])


@st.composite
def det_objects(draw: st.DrawFn) -> DetObject:
    if draw(st.booleans()):
        x1, x2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
        return DetObject(draw(DESCS).strip() or "x", GeometryKind.BBOX, (x1, y1, x2, y2))
    n = draw(st.integers(3, 5))
    return DetObject(
        "poly", GeometryKind.POLY, draw(st.lists(st.integers(0, 999), min_size=2 * n, max_size=2 * n))
    )


FRAGMENTS = ["{", "}", "]", ",", '"', "<|coord_5|>", "<|im_end|>", "7", "é", "x"]


@st.composite
def outputs(draw: st.DrawFn) -> tuple[str, FieldOrder, CoordMode]:
    order = draw(st.sampled_from(list(FieldOrder)))
    mode = draw(st.sampled_from(list(CoordMode)))
    text = render(draw(st.lists(det_objects(), max_size=4)), order, mode)
    rnd = random.Random(draw(st.integers(0, 2**32)))
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
    return text + draw(st.sampled_from(["", "<|im_end|>"])), order, mode


@settings(max_examples=300, deadline=None)
@given(
    outputs(), st.integers(1, 30).map(lambda k: 32 * k), st.integers(1, 30).map(lambda k: 32 * k), st.data()
)
def test_processing_never_fails_on_model_output(
    case: tuple[str, FieldOrder, CoordMode], width: int, height: int, data: st.DataObject
) -> None:
    text, order, mode = case
    ids = TOK.encode(text)
    logprobs = data.draw(st.lists(st.floats(-30, 0), min_size=len(ids), max_size=len(ids)))
    gen = GeneratedText(ids, TOK.decode(ids), logprobs)
    outcome = process(gen, width, height, mode, order)
    assert all(code in ERROR_CODES for code in outcome.errors)
    assert ("empty_pred" in outcome.errors) == (not outcome.pred)
    for p in outcome.pred:
        assert 0.0 <= p.score <= 1.0 and p.score == round(p.score, 6)
        assert all(0 <= v < (width if j % 2 == 0 else height) for j, v in enumerate(p.points))
        xs, ys = p.points[0::2], p.points[1::2]
        assert max(xs) > min(xs) and max(ys) > min(ys)
    # Every valid record of the scanner is accounted for: kept, or dropped by a pixel-level code.
    scanned = scan_tokens(ids, [TOK.piece(i) for i in ids], TOK.encode, TOK.coord_ids, order, mode, STOPS)
    parsed = scanned.parsed_objects()
    assert len(outcome.pred) + outcome.errors.count("degenerate") == len(parsed)


def test_coordinates_spelled_by_text_pieces_are_dropped_not_an_internal_error() -> None:
    """data.md §5.8.8: salvage (text) accepts a record whose coords are spelled by ordinary pieces; the scanner
    (ids) does not. That record cannot be scored: it is dropped as ``non_coord_token``; the other one stays."""
    good = '{"desc": "a", "bbox_2d": ' + box(10, 20, 300, 400) + "}"
    spelled = '{"desc": "b", "bbox_2d": ' + box(50, 60, 400, 450) + "}"
    head = '{"objects": [' + good + ", "
    start = head + spelled[: spelled.index("<|coord_50|>")]
    tail = spelled[spelled.index("<|coord_50|>") + len("<|coord_50|>"):] + "]}<|im_end|>"
    ids = TOK.encode(start) + [TOK.encode(ch)[0] for ch in "<|coord_50|>"] + TOK.encode(tail)
    text = TOK.decode(ids)
    assert "<|coord_50|>" in text  # the text shows a coord token ...
    assert not any(TOK.coord_ids.is_coord_id(i) and TOK.piece(i) == "<|coord_50|>" for i in ids)  # ... no coord id
    outcome = process(GeneratedText(ids, text, [math.log(0.5)] * len(ids)))
    assert [o.desc for o in outcome.pred] == ["a"]
    assert "non_coord_token" in outcome.errors


def test_a_generation_cut_at_max_new_tokens_counts_as_truncated_even_without_a_container() -> None:
    """An untrained model babbles until ``max_new_tokens``: ``parse_failed`` and ``truncated`` both count."""
    babble = generated("the the the")
    cut = GeneratedText(babble.token_ids, babble.text, babble.token_logprobs, hit_token_limit=True)
    assert process(babble).errors == ("parse_failed", "empty_pred")
    assert process(cut).errors == ("parse_failed", "truncated", "empty_pred")
    inside = generated('{"objects": [{"desc": "cat", "bbox_2d": ' + box(1, 2, 30, 40) + "}, {")
    inside_cut = GeneratedText(inside.token_ids, inside.text, inside.token_logprobs, hit_token_limit=True)
    assert process(inside_cut).errors.count("truncated") == 1  # never counted twice
    stopped = generated('{"objects": [{"desc": "cat", "bbox_2d": ' + box(1, 2, 30, 40) + "}]}")
    assert "truncated" not in process(stopped).errors
