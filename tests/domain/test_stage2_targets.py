"""Channel-B target construction and mask plan (stage2.md §4, §5, §7, §8, §9, §11; §22.8, 13-19, 24-25, 30, 37)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import attrs
import numpy as np
import pytest
from coordjson_toy import DESCS, ToyTokenizer, box, c
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import stage2_targets
from domain.coord_tokens import CoordIdTable
from domain.coordjson import render, salvage
from domain.errors import DataContractError, InvariantViolation, StepError
from domain.objects import DetObject, FieldOrder, GeometryKind
from domain.stage2_matching import MatchResult
from domain.stage2_targets import (
    ChannelBTargets,
    GroupSource,
    MaskClass,
    SampleRef,
    Stage2Variant,
    TargetSettings,
    build_channel_b_targets,
    check_encoded_length,
    check_gt_objects,
    check_prompt_ids,
    match_inputs,
    scan_rollout,
)

TOK = ToyTokenizer()
SAMPLE = SampleRef("train.jsonl", 7, 6)
AB = Stage2Variant.STAGE2_AB
RMS = Stage2Variant.ROLLOUT_MATCHING_SFT


class ToyView:
    """The toy tokenizer seen through ``Stage2TokenText``."""

    def __init__(self, encode: object = None) -> None:
        self._encode = encode or TOK.encode

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))  # type: ignore[operator]

    def decode(self, ids: Sequence[int]) -> str:
        return TOK.decode(ids)

    def piece(self, token_id: int) -> str:
        return TOK.pieces[token_id]

    @property
    def coord_ids(self) -> CoordIdTable:
        return TOK.coord_table

    @property
    def im_end_id(self) -> int:
        return TOK.im_end


VIEW = ToyView()


def bpe_like(text: str) -> list[int]:
    """Specials whole; other text as word runs, space runs and fused punctuation runs (e.g. `]}, {"`)."""
    ids: list[int] = []
    for special, part in TOK._split(text):
        chunks = [part] if special else re.findall(r"\w+|\s+|[^\w\s]+", part)
        ids.extend(TOK.tokenize_chunks(chunks))
    return ids


def rec(desc: str, *bins: int, key: str = "bbox_2d") -> str:
    return f'{{"desc": "{desc}", "{key}": [' + ", ".join(c(k) for k in bins) + "]}"


def build(ids: list[int], gts: list[DetObject], variant: Stage2Variant = AB, **kw: object) -> ChannelBTargets:
    s = TargetSettings(variant, **kw)  # type: ignore[arg-type]
    return build_channel_b_targets(ids, 11, gts, s, VIEW, SAMPLE)


def token_texts(out: ChannelBTargets) -> list[str]:
    return [TOK.pieces[t] for t in (*out.y_train, out.terminator_id)]


# ---- §7.4 worked example ------------------------------------------------------------------------

GT0, GT1, GT2 = (
    box("cat", 120, 300, 420, 700),
    box("dog", 500, 320, 900, 760),
    box("person", 50, 600, 300, 980),
)
CAT = rec("cat", 118, 302, 421, 698)
CUP = rec("cup", 700, 50, 760, 120)
ROLLOUT = '{"objects": [' + CAT + ", " + CUP + ', {"desc": "dog", "bbox_2d": [' + c(505)


def expected_ab_class(text: str, a: int, b: int, is_coord: bool, prefix_end: int) -> MaskClass:
    """The §7.4 table by character regions of the trained text (independent of the implementation)."""
    cat = (13, 101)
    cup = (103, 190)
    if a >= prefix_end:
        if is_coord:
            return MaskClass.TAIL_COORD
        for d in ("dog", "person"):
            at = text.index(f'"{d}"', prefix_end) + 1
            if a < at + len(d) and b > at:
                return MaskClass.TAIL_DESC
        return MaskClass.TAIL_STRUCTURE
    if a < cat[1] and b > cat[0]:
        if is_coord:
            return MaskClass.MATCHED_COORD
        if a < 26 and b > 23:  # the "cat" value is chars [23, 26)
            return MaskClass.MATCHED_DESC
        return MaskClass.MATCHED_STRUCTURE
    if a < cup[1] and b > cup[0]:
        return MaskClass.FP
    return MaskClass.PREFIX_CONTEXT


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_worked_example_token_by_token(seed: int | None) -> None:
    """§7.4 / §22.19 with a BPE-like split (seed None) and random splits (fused tokens across regions)."""
    ids = bpe_like(ROLLOUT) if seed is None else TOK.tokenize(ROLLOUT, random.Random(seed))
    out = build(ids, [GT0, GT1, GT2], drop_invalid_struct_ce_multiplier=1.5)
    text = TOK.decode(out.y_train)
    assert text == ROLLOUT[:190] + (
        ', {"desc": "dog", "bbox_2d": [<|coord_500|>, <|coord_320|>, <|coord_900|>, <|coord_760|>]}, '
        '{"desc": "person", "bbox_2d": [<|coord_50|>, <|coord_600|>, <|coord_300|>, <|coord_980|>]}]}'
    )
    # The rollout's own ids; only a token fused across the cut (`]}, {"`) is re-tokenised.
    assert out.prefix_ids[:-1] == tuple(ids[: out.prefix_len - 1])
    pos = 0
    weights = {
        MaskClass.MATCHED_STRUCTURE: 1.0,
        MaskClass.TAIL_STRUCTURE: 1.5,
        MaskClass.TAIL_DESC: 1.0,
        MaskClass.TERMINATOR: 1.5,
    }
    for i, t in enumerate(out.y_train):
        p = TOK.pieces[t]
        want = expected_ab_class(text, pos, pos + len(p), TOK.coord_table.is_coord_id(t), 190)
        if want in (MaskClass.FP, MaskClass.PREFIX_CONTEXT) and pos < 101 and pos + len(p) > 101:
            want = MaskClass.MATCHED_STRUCTURE  # a token fused across the cat `}` is matched structure
        assert MaskClass(int(out.mask.classes[i])) is want, (i, p)
        assert out.mask.ce_weights[i] == weights.get(want, 0.0), (i, p)
        pos += len(p)
    assert MaskClass(int(out.mask.classes[-1])) is MaskClass.TERMINATOR and out.mask.ce_weights[-1] == 1.5
    assert out.train_len == len(out.y_train) + 1 == out.mask.train_len
    # Geometry: 3 boxes (1 matched + 2 FN), 12 coordinates.
    assert [(g.source, g.gt_index, g.target_bins) for g in out.groups] == [
        (GroupSource.PREFIX, 0, GT0.bins),
        (GroupSource.FN, 1, GT1.bins),
        (GroupSource.FN, 2, GT2.bins),
    ]
    assert [TOK.coord_table.bin_of(out.y_train[p - 11]) for p in out.prefix_groups[0].positions] == [
        118,
        302,
        421,
        698,
    ]
    assert all(p >= 11 + out.prefix_len for g in out.fn_groups for p in g.positions)
    assert out.mask.positions_of(MaskClass.TAIL_COORD) == tuple(p for g in out.fn_groups for p in g.positions)
    assert out.mask.positions_of(MaskClass.MATCHED_COORD) == out.prefix_groups[0].positions
    k = out.counters
    assert (k.n_gt, k.n_valid_pred, k.n_matched, k.n_fp, k.n_fn_appended) == (3, 2, 1, 1, 2)
    assert (k.n_drop_invalid, k.drop_reasons["incomplete_tail"], k.invalid_rollout, k.truncated) == (
        1,
        1,
        0,
        1,
    )
    assert k.gating_rejections == 5 and k.matched_maskiou_count == 1
    assert k.matched_maskiou_sum == pytest.approx(0.977, abs=5e-4)
    assert sum(k.drop_reasons.values()) == k.n_drop_invalid and len(k.drop_reasons) == 10
    assert [TOK.pieces[out.append_ids[i]] for i in out.tail_desc_pos] == ["dog", "person"] or "".join(
        TOK.pieces[out.append_ids[i]] for i in out.tail_desc_pos
    ).replace('"', "") == "dogperson"


def test_rollout_matching_sft_masks_on_the_worked_example() -> None:
    """§11.1 / §22.37: no prefix CE; FN desc masked; `]}` and `<|im_end|>` supervised; tail coords target own bins."""
    out = build(bpe_like(ROLLOUT), [GT0, GT1, GT2], RMS, drop_invalid_struct_ce_multiplier=3.0)
    w = out.mask.ce_weights
    assert not np.any(w[: out.prefix_len])
    tail = out.mask.classes[out.prefix_len :]
    assert set(np.unique(w[out.prefix_len :])) <= {0.0, 1.0}  # unweighted CE, no multiplier
    for i, cls in enumerate(tail):
        assert (w[out.prefix_len + i] > 0) == (cls in (MaskClass.TAIL_STRUCTURE, MaskClass.TERMINATOR))
    assert w[-1] == 1.0 and w[-2] == 1.0 and token_texts(out)[-2].endswith("]}")
    assert all(w[out.prefix_len + i] == 0 for i in out.tail_desc_pos) and out.tail_desc_pos
    for g in out.fn_groups:
        assert [TOK.coord_table.bin_of(out.y_train[p - 11]) for p in g.positions] == list(g.target_bins)
    assert out.prefix_groups[0].target_bins == GT0.bins


def test_multiplier_applies_only_with_drops() -> None:
    """§22.30: m doubles tail structure and `<|im_end|>` only when N_drop_invalid > 0; desc and prefix unchanged."""
    clean = '{"objects": [' + CAT + "]}"
    gts = [GT0, GT1]
    for text, has_drop in ((clean, False), (ROLLOUT, True)):
        one = build(bpe_like(text), gts, drop_invalid_struct_ce_multiplier=1.0, desc_ce_weight=0.7)
        two = build(bpe_like(text), gts, drop_invalid_struct_ce_multiplier=2.0, desc_ce_weight=0.7)
        assert (one.counters.n_drop_invalid > 0) == has_drop
        scaled = np.isin(one.mask.classes, [MaskClass.TAIL_STRUCTURE, MaskClass.TERMINATOR])
        assert np.array_equal(
            two.mask.ce_weights[scaled], one.mask.ce_weights[scaled] * (2.0 if has_drop else 1.0)
        )
        assert np.array_equal(two.mask.ce_weights[~scaled], one.mask.ce_weights[~scaled])
        desc = one.mask.classes == MaskClass.TAIL_DESC
        assert desc.any() and np.all(one.mask.ce_weights[desc] == 0.7)


def test_poly_prediction_is_poly_unsupported_under_stage2_ab() -> None:
    """§4 / §22.8: 8 coord indices captured; AB relabels it, keeps it in the prefix, unsupervised; rms keeps it."""
    poly = rec("p", 100, 100, 200, 100, 200, 200, 100, 200, key="poly")
    text = '{"objects": [' + poly + ", " + CAT + "]}"
    gts = [GT0]
    ab = build(bpe_like(text), gts)
    assert ab.counters.n_valid_pred == 1 and ab.counters.drop_reasons["poly_unsupported"] == 1
    assert ab.counters.n_drop_invalid == 1
    assert TOK.decode(ab.prefix_ids).startswith('{"objects": [' + poly)
    poly_tokens = ab.mask.classes[: len(bpe_like('{"objects": [' + poly))]
    assert MaskClass.DROPPED in poly_tokens and not np.any(ab.mask.ce_weights[: len(poly_tokens)])
    scan = scan_rollout(bpe_like(text), None, VIEW, FieldOrder.DESC_FIRST)
    assert len(scan.records[0].coord_token_indices) == 8
    rms = build(
        bpe_like(text),
        [GT0, DetObject("sq", GeometryKind.POLY, (100, 100, 200, 100, 200, 200, 100, 200))],
        RMS,
    )
    assert rms.counters.n_valid_pred == 2 and rms.counters.drop_reasons["poly_unsupported"] == 0
    assert rms.counters.n_matched == 2 and rms.counters.n_fn_appended == 0
    (pg,) = [g for g in rms.prefix_groups if g.kind is GeometryKind.POLY]
    assert pg.target_bins == (100, 100, 200, 100, 200, 200, 100, 200) and len(pg.positions) == 8


def test_fused_separator_follows_the_matched_record() -> None:
    """§22.25 / pitfall 5: a token fused across the matched `}` and the FP `{` is matched structure;
    the unfused `", "` and the FP record are unsupervised."""
    text = '{"objects": [' + CAT + ", " + CUP + "]}"
    head = [TOK.pieces[i] for i in bpe_like('{"objects": [' + CAT[:-2])]
    rest = [TOK.pieces[i] for i in bpe_like(CUP[1:] + "]}")]
    fused = TOK.tokenize_chunks([*head, "]}, {", *rest])
    plain = TOK.tokenize_chunks([*head, "]}", ", ", "{", *rest])
    assert TOK.decode(fused) == TOK.decode(plain) == text
    for ids, fused_case in ((fused, True), (plain, False)):
        out = build(ids, [GT0])
        texts = token_texts(out)
        classes = [MaskClass(int(x)) for x in out.mask.classes]
        if fused_case:
            i = texts.index("]}, {")
            assert classes[i] is MaskClass.MATCHED_STRUCTURE and out.mask.ce_weights[i] == 1.0
        else:
            i = texts.index(", ")
            assert classes[i] is MaskClass.PREFIX_CONTEXT and out.mask.ce_weights[i] == 0
        assert classes.count(MaskClass.FP) >= 10  # the cup record
        assert all(w == 0 for w, cl in zip(out.mask.ce_weights, classes) if cl is MaskClass.FP)


def test_invalid_rollouts_train_with_every_gt_appended() -> None:
    """§3.7 / §1: parse failures and truncation before the first record never skip the sample."""
    for text in ('{"object_1": {"desc": "a"}}', '{"objects": [', '{"objects": [junk', ""):
        out = build(bpe_like(text) if text else [], [GT0, GT1])
        assert out.counters.invalid_rollout == 1
        assert out.counters.n_fn_appended == 2 and [g.gt_index for g in out.groups] == [0, 1]
        assert TOK.decode(out.y_train) == render([GT0, GT1])
    empty = build(bpe_like('{"objects": []}'), [GT0])
    assert empty.counters.invalid_rollout == 0 and TOK.decode(empty.y_train) == render([GT0])


def test_no_gt_under_rollout_matching_sft() -> None:
    out = build(bpe_like('{"objects": [' + CAT + "]}"), [], RMS)
    assert out.counters.n_fp == 1 and out.groups == ()
    assert TOK.decode(out.y_train) == '{"objects": [' + CAT + "]}"
    assert [MaskClass(int(x)) for x in out.mask.classes[-3:]][-1] is MaskClass.TERMINATOR


# ---- GT contract (§5) and encoding checks (§8) -------------------------------------------------


def test_gt_contract_errors_name_file_line_and_field() -> None:
    poly = DetObject("p", GeometryKind.POLY, (1, 1, 5, 1, 5, 5))
    with pytest.raises(DataContractError, match=r"train\.jsonl:7: objects\[1\]\.poly: .*bbox-only v1"):
        check_gt_objects([GT0, poly], AB, SAMPLE)
    with pytest.raises(DataContractError, match=r"objects\[0\]\.bbox_2d: invalid bbox_2d"):
        check_gt_objects([box("x", 5, 1, 4, 9)], AB, SAMPLE)
    with pytest.raises(DataContractError, match="stage2_ab requires at least one GT object"):
        check_gt_objects([], AB, SAMPLE)
    check_gt_objects([], RMS, SAMPLE)
    check_gt_objects([GT0, poly], RMS, SAMPLE)
    with pytest.raises(DataContractError, match=r"objects\[0\]\.poly: invalid poly"):
        check_gt_objects([DetObject("p", GeometryKind.POLY, (1, 1, 5, 1))], RMS, SAMPLE)
    with pytest.raises(DataContractError, match="bbox-only v1"):
        build(bpe_like('{"objects": []}'), [poly])


def test_prompt_mismatch_and_over_length() -> None:
    check_prompt_ids([1, 2, 3], [1, 2, 3], SAMPLE)
    with pytest.raises(
        StepError, match=r"prompt tokenization mismatch for sample_id=6 .*3 ids.*4 ids.*index 2"
    ):
        check_prompt_ids([1, 2, 3], [1, 2, 9, 4], SAMPLE)
    with pytest.raises(StepError, match=r"index 3"):
        check_prompt_ids([1, 2, 3], [1, 2, 3, 4], SAMPLE)
    check_encoded_length(10, 10, SAMPLE)
    with pytest.raises(StepError, match=r"encoded_len=11.*max_length=10.*Mitigations"):
        check_encoded_length(11, 10, SAMPLE)


def test_settings_ranges() -> None:
    from domain.errors import ConfigError

    with pytest.raises(ConfigError, match="drop_invalid_struct_ce_multiplier"):
        TargetSettings(AB, drop_invalid_struct_ce_multiplier=4.5)
    with pytest.raises(ConfigError, match="drop_invalid_struct_ce_multiplier"):
        TargetSettings(AB, drop_invalid_struct_ce_multiplier=0.99)
    with pytest.raises(ConfigError, match="desc_ce_weight"):
        TargetSettings(AB, desc_ce_weight=-0.1)
    TargetSettings(AB, drop_invalid_struct_ce_multiplier=4.0, desc_ce_weight=0.0)


# ---- invariant violations raise with the sample id -------------------------------------------


def test_tampered_fragment_raises_with_the_sample_id() -> None:
    """§22.17: a fragment whose coord ids do not match the serialised count."""

    def lossy(text: str) -> list[int]:
        return [t for t in TOK.encode(text) if t != TOK.ids[c(760)]]

    s = TargetSettings(AB)
    with pytest.raises(InvariantViolation, match="sample_id=6"):
        build_channel_b_targets(bpe_like(ROLLOUT), 0, [GT0, GT1], s, ToyView(lossy), SAMPLE)


def test_matching_outcome_outside_the_predictions_raises() -> None:
    bad = MatchResult(((5, 0),), (), (), 0, 0, 0.0, 0)
    with pytest.raises(InvariantViolation, match="sample_id=6"):
        build_channel_b_targets(bpe_like(ROLLOUT), 0, [GT0], TargetSettings(AB), VIEW, SAMPLE, match=bad)


def test_failed_ot_pair_is_excluded_and_its_gt_appended(monkeypatch: pytest.MonkeyPatch) -> None:
    """§11.2 / §22.24: target construction failure -> excluded_from_supervision, GT FN-appended."""
    poly = rec("p", 100, 100, 200, 100, 200, 200, 100, 200, key="poly")
    gt = DetObject("sq", GeometryKind.POLY, (100, 100, 200, 100, 200, 200, 100, 200))
    ids = bpe_like('{"objects": [' + poly + "]}")
    monkeypatch.setattr(stage2_targets, "ot_target_bins", lambda *a: None)
    out = build(ids, [gt], RMS)
    assert (out.counters.n_matched, out.counters.n_excluded, out.counters.n_fn_appended) == (0, 1, 1)
    assert out.prefix_groups == () and [g.gt_index for g in out.fn_groups] == [0]
    assert not np.any(out.mask.ce_weights[: out.prefix_len])
    assert MaskClass.FP in out.mask.classes[: out.prefix_len]


# ---- properties over generated rollouts ---------------------------------------------------------

RECORD_KINDS = ("bbox", "bbox", "dup", "poly", "arity", "junk", "order", "quoted")


@st.composite
def rollouts(draw: st.DrawFn) -> tuple[str, list[DetObject], FieldOrder]:
    """A rollout text (valid, duplicate, polygon, wrong-arity, junk, misordered, quoted records; maybe
    truncated, maybe with `<|im_end|>` and garbage) and GT objects near some predicted boxes."""
    order = draw(st.sampled_from(list(FieldOrder)))
    parts: list[str] = []
    boxes: list[DetObject] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(RECORD_KINDS))
        desc = draw(DESCS)
        x1, x2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
        obj = DetObject(desc, GeometryKind.BBOX, (x1, y1, x2, y2))
        if kind == "dup" and boxes:
            obj = boxes[-1]
            kind = "bbox"
        if kind == "bbox":
            boxes.append(obj)
            parts.append(render([obj], order)[13:-2])
        elif kind == "poly":
            parts.append(render([DetObject(desc, GeometryKind.POLY, (x1, y1, x2, y1, x2, y2))], order)[13:-2])
        elif kind == "arity":
            parts.append(rec("a", x1, y1, x2))
        elif kind == "junk":
            parts.append(draw(st.sampled_from(["junk", "[", "}", "42", '"s"'])))
        elif kind == "order":
            parts.append(f'{{"bbox_2d": [{c(x1)}, {c(y1)}, {c(x2)}, {c(y2)}], "desc": "o"}}')
        else:
            parts.append(f'{{"desc": "q", "bbox_2d": ["{c(x1)}", {c(y1)}, {c(x2)}, {c(y2)}]}}')
    text = '{"objects": [' + ", ".join(parts) + "]}"
    if draw(st.booleans()):
        text += "<|im_end|>garbage"
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    gts: list[DetObject] = []
    for b in boxes:
        if draw(st.booleans()):
            dx = draw(st.integers(-5, 5))
            x1, y1, x2, y2 = b.bins
            gts.append(box("g", max(0, x1 + dx), y1, max(x2, max(0, x1 + dx)), y2))
    for _ in range(draw(st.integers(0, 3))):
        x1, x2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
        gts.append(box(draw(DESCS), x1, y1, x2, y2))
    return text, gts, order


def _record_token_range(starts: list[int], a: int, b: int) -> list[int]:
    return [i for i in range(len(starts) - 1) if starts[i] >= a and starts[i + 1] <= b]


@settings(max_examples=100, deadline=None)
@given(rollouts(), st.sampled_from([AB, RMS]), st.randoms(use_true_random=False))
def test_target_properties(
    case: tuple[str, list[DetObject], FieldOrder], variant: Stage2Variant, rnd: random.Random
) -> None:
    text, gts, order = case
    if variant is AB and not gts:
        gts = [box("g", 1, 2, 3, 4)]
    ids = TOK.tokenize(text, rnd)
    kw = {"drop_invalid_struct_ce_multiplier": 2.0, "desc_ce_weight": 0.5, "field_order": order}
    out = build(ids, gts, variant, **kw)
    scan = scan_rollout(ids, None, VIEW, order)
    train_ids = (*out.y_train, out.terminator_id)
    # Every assistant token has exactly one class, and the weight is a function of the class.
    assert out.mask.classes.shape == out.mask.ce_weights.shape == (len(train_ids),)
    assert {int(x) for x in out.mask.classes} <= {int(m) for m in MaskClass}
    for cls in MaskClass:
        sel = out.mask.classes == cls
        assert len(set(out.mask.ce_weights[sel].tolist())) <= 1
    # Prefix ids are the rollout's own ids (at most the last one re-tokenised); never re-encoded.
    if not scan.used_fallback_prefix:
        m = 0
        while m < min(len(ids), out.prefix_len) and ids[m] == out.prefix_ids[m]:
            m += 1
        rest = TOK.decode(out.prefix_ids[m:])
        assert m == out.prefix_len or (
            rest and TOK.pieces[ids[m]].startswith(rest) and rest != TOK.pieces[ids[m]]
        )
    # Coord tokens never get CE; geometry positions hold coord ids.
    is_coord = np.asarray([TOK.coord_table.is_coord_id(t) for t in train_ids])
    assert not np.any(out.mask.ce_weights[is_coord])
    # Every GT object is supervised exactly once (matched in the prefix or injected).
    assert sorted(g.gt_index for g in out.groups) == list(range(len(gts)))
    assert (
        len(out.prefix_groups) == out.counters.n_matched and len(out.fn_groups) == out.counters.n_fn_appended
    )
    # Unmatched predictions: no loss and no geometry target.
    preds = match_inputs(scan, variant)
    matched_records = {preds[p].record_index for p, _ in out.matched_for_supervision}
    geometry = {p for g in out.groups for p in g.positions}
    starts = list(scan.prefix_offsets)
    for r in scan.records:
        if r.in_prefix and r.record_index not in matched_records:
            inside = _record_token_range(starts, r.char_span[0], r.char_span[1])
            assert not np.any(out.mask.ce_weights[inside])
            assert not geometry & {11 + i for i in r.coord_token_indices}
    # The final `]}` and `<|im_end|>` are supervised.
    assert out.mask.ce_weights[-1] > 0 and MaskClass(int(out.mask.classes[-1])) is MaskClass.TERMINATOR
    assert out.mask.ce_weights[-2] > 0 and TOK.pieces[train_ids[-2]].endswith("}")
    # The salvage parse of the trained text recovers the valid prefix records then the FN records, in order.
    r = salvage(TOK.decode(out.y_train), order)
    fn = [gts[j] for j in out.fn_gt_indices]
    spelled = any(x.parse_reason == "non_coord_token" for x in scan.records)
    if not spelled:
        assert list(r.objects) == [x.to_object() for x in scan.records if x.is_valid] + fn
    assert not r.truncated and r.array_closed and list(r.objects)[len(r.objects) - len(fn) :] == fn
    # Counters.
    k = out.counters
    assert k.n_drop_invalid == sum(k.drop_reasons.values())
    assert k.n_valid_pred == len(preds) == k.n_matched + k.n_fp
    if variant is AB:
        assert all(g.kind is GeometryKind.BBOX and len(g.positions) == 4 for g in out.groups)
    # Deterministic.
    again = build(ids, gts, variant, **kw)
    assert again.y_train == out.y_train and np.array_equal(again.mask.ce_weights, out.mask.ce_weights)


def test_labels_row_places_supervised_ids() -> None:
    out = build(bpe_like(ROLLOUT), [GT0, GT1, GT2])
    row = out.mask.labels_row(out.y_train, out.terminator_id, 11 + out.train_len + 1)
    sup = np.flatnonzero(row != -100)
    assert tuple(int(p) for p in sup) == out.mask.ce_positions()
    assert row[11 + out.train_len - 1] == TOK.im_end and row[-1] == -100
    assert attrs.has(type(out))


def test_zero_extent_gt_box_is_allowed() -> None:
    """§5: `x2 >= x1`, `y2 >= y1` (equality allowed)."""
    check_gt_objects([box("line", 5, 1, 5, 9), box("dot", 3, 3, 3, 3)], AB, SAMPLE)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-1],  # no container `}`
        lambda t: t + " x",  # text after the closer
        lambda t: t[:-2] + "}",  # no array `]`
        lambda t: t.replace('"dog"', '"dug"'),  # an FN record that does not read back
        lambda t: t.replace(", {", ", 7, {", 1),  # junk in the tail
    ],
)
def test_closure_failure_raises_with_the_sample_id(monkeypatch: pytest.MonkeyPatch, tamper: object) -> None:
    """§7.3: a tail that does not end with the array's `]` and the container's `}` is an invariant violation."""
    real = stage2_targets.append_fn_records

    def unclosed(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        inj = real(*args, **kw)  # type: ignore[arg-type]
        text = tamper(inj.fragment_text)  # type: ignore[operator]
        ids = tuple(TOK.encode(text))
        return attrs.evolve(
            inj, fragment_text=text, append_ids=ids, y_train_ids=inj.y_train_ids[: -len(inj.append_ids)] + ids
        )

    monkeypatch.setattr(stage2_targets, "append_fn_records", unclosed)
    with pytest.raises(InvariantViolation, match=r"closure check failed for sample_id=6"):
        build(bpe_like(ROLLOUT), [GT0, GT1])


def test_group_positions_outside_their_span_raise() -> None:
    """§8.3: prefix groups in [prompt_len, prompt_len + prefix_len), FN groups in the tail, coord ids only."""
    out = build(bpe_like(ROLLOUT), [GT0, GT1, GT2])
    y = out.y_train
    ok = out.prefix_groups[0]
    stage2_targets._check_groups([ok], out.fn_groups, y, 11, out.prefix_len, TOK.coord_table, SAMPLE)
    end = 11 + out.prefix_len
    moved = attrs.evolve(ok, positions=(*ok.positions[:3], end))
    with pytest.raises(InvariantViolation, match=r"sample_id=6 .*: prefix group position \d+ outside"):
        stage2_targets._check_groups([moved], (), y, 11, out.prefix_len, TOK.coord_table, SAMPLE)
    fn = out.fn_groups[0]
    early = attrs.evolve(fn, positions=(end - 1, *fn.positions[1:]))
    with pytest.raises(InvariantViolation, match="fn group position"):
        stage2_targets._check_groups([], [early], y, 11, out.prefix_len, TOK.coord_table, SAMPLE)
    wrong_bin = attrs.evolve(fn, target_bins=(1, 2, 3, 4))
    with pytest.raises(InvariantViolation, match="spells bin"):
        stage2_targets._check_groups([], [wrong_bin], y, 11, out.prefix_len, TOK.coord_table, SAMPLE)


def test_no_records_and_no_fn_trains_the_empty_document() -> None:
    """§22.13: FN empty and no records -> `Y_train` decodes to `{"objects": []}`; `]}` and `<|im_end|>` supervised."""
    for text in ('{"objects": []}', '{"objects": ['):
        out = build(bpe_like(text), [], RMS)
        assert TOK.decode(out.y_train) == '{"objects": []}'
        tail = out.mask.classes[out.prefix_len :]
        assert list(tail) == [MaskClass.TAIL_STRUCTURE] * (len(tail) - 1) + [MaskClass.TERMINATOR]
        assert np.all(out.mask.ce_weights[out.prefix_len :] == 1.0) and not np.any(
            out.mask.ce_weights[: out.prefix_len]
        )


def test_closer_text_inside_an_fn_desc_does_not_move_the_closure() -> None:
    """§22.18: `]}` inside a desc is a desc token; the trained closer is the fragment's last `]}`."""
    tricky = box('a]}"b', 1, 2, 3, 4)
    out = build(bpe_like('{"objects": [' + CAT), [GT0, tricky], drop_invalid_struct_ce_multiplier=1.0)
    text = TOK.decode(out.y_train)
    assert text.endswith('"desc": "a]}\\"b", "bbox_2d": [' + ", ".join(c(k) for k in (1, 2, 3, 4)) + "]}]}")
    desc_text = "".join(TOK.pieces[out.append_ids[i]] for i in out.tail_desc_pos)
    assert 'a]}\\"b' in desc_text
    assert salvage(text).objects[-1] == tricky


def test_scanner_invariant_names_the_sample() -> None:
    ids = bpe_like(ROLLOUT)
    with pytest.raises(InvariantViolation, match=r"sample_id=6 .*pieces"):
        build_channel_b_targets(ids, 0, [GT0], TargetSettings(AB), VIEW, SAMPLE, pieces=["x"])


# ---- §18.7 duplicate monitor on the Channel-B sample ------------------------------------------


def test_counters_carry_the_duplicate_monitor_of_the_valid_predictions() -> None:
    """Three 'Cat' boxes alike (desc casefolded, IoU >= 0.7) form one cluster; the dropped record, the
    polygon (poly_unsupported under AB) and a different desc do not count; supervision is unchanged."""
    from domain.duplicates import duplicate_stats, summarize_duplicate_stats

    dup = [rec("cat", 120, 300, 420, 700), rec("Cat", 121, 301, 421, 700), rec("CAT", 120, 300, 420, 700)]
    others = [
        rec("dog", 120, 300, 420, 700),
        rec("cat", 120, 300, 420),  # wrong arity: dropped
        rec("cat", 120, 300, 420, 300, 420, 700, key="poly"),  # poly_unsupported under AB
    ]
    text = '{"objects": [' + ", ".join(dup + others) + "]}"
    out = build(bpe_like(text), [GT0, GT1])
    stats = out.counters.duplicates
    assert (stats.valid_objects, stats.pairs, stats.max_cluster_size, stats.excess_objects) == (4, 3, 3, 2)
    assert stats.clusters == ((0, 1, 2),)  # indices into match_inputs (the valid bbox predictions)
    preds = [
        r.to_object()
        for r in match_inputs(scan_rollout(bpe_like(text), None, VIEW, FieldOrder.DESC_FIRST), AB)
    ]
    assert stats == duplicate_stats(preds)
    # A stricter threshold from the config key changes the figures, never the targets.
    strict = build(bpe_like(text), [GT0, GT1], duplicate_iou_threshold=1.0)
    assert strict.counters.duplicates.pairs == 1  # only the two identical boxes
    assert strict.y_train == out.y_train and np.array_equal(strict.mask.classes, out.mask.classes)
    # The step's dup/raw/* keys from the per-sample counters.
    clean = build(bpe_like(ROLLOUT), [GT0, GT1, GT2])
    assert clean.counters.duplicates.pairs == 0 and clean.counters.duplicates.max_cluster_size == 1
    metrics = summarize_duplicate_stats([clean.counters.duplicates, out.counters.duplicates]).metrics()
    assert metrics == {
        "dup/raw/pairs": 1.5,
        "dup/raw/max_cluster_size": 2.0,
        "dup/raw/excess_object_frac": 2 / 6,
    }
    with pytest.raises(Exception, match="duplicate_monitor.iou_threshold"):
        TargetSettings(AB, duplicate_iou_threshold=0.0)
