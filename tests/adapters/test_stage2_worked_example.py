"""stage2.md §7.4 worked example, token by token, with the real tiny Qwen3-VL tokenizer (§22.15, §22.19, §22.37)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from domain.coordjson import salvage
from domain.objects import DetObject, GeometryKind
from domain.stage2_targets import (
    ChannelBTargets,
    GroupSource,
    MaskClass,
    SampleRef,
    Stage2Variant,
    TargetSettings,
    build_channel_b_targets,
)

SAMPLE = SampleRef("train.jsonl", 3, 2)
PROMPT_LEN = 40  # any prompt length: positions shift by it


def c(k: int) -> str:
    return f"<|coord_{k}|>"


def box(desc: str, *bins: int) -> DetObject:
    return DetObject(desc, GeometryKind.BBOX, bins)


GT0, GT1, GT2 = (
    box("cat", 120, 300, 420, 700),
    box("dog", 500, 320, 900, 760),
    box("person", 50, 600, 300, 980),
)
ROLLOUT = (
    f'{{"objects": [{{"desc": "cat", "bbox_2d": [{c(118)}, {c(302)}, {c(421)}, {c(698)}]}}, '
    f'{{"desc": "cup", "bbox_2d": [{c(700)}, {c(50)}, {c(760)}, {c(120)}]}}, '
    f'{{"desc": "dog", "bbox_2d": [{c(505)}'
)
TRAINED = ROLLOUT[:190] + (
    f', {{"desc": "dog", "bbox_2d": [{c(500)}, {c(320)}, {c(900)}, {c(760)}]}}, '
    f'{{"desc": "person", "bbox_2d": [{c(50)}, {c(600)}, {c(300)}, {c(980)}]}}]}}'
)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    from adapters.hf import tiny
    from adapters.hf.tokenizer import HFTokenizer

    return HFTokenizer(tiny._build_tokenizer(tiny.TinyModelSettings()))


def build(tok, variant: Stage2Variant, gts=(GT0, GT1, GT2), text: str = ROLLOUT) -> ChannelBTargets:  # type: ignore[no-untyped-def]
    settings = TargetSettings(variant, drop_invalid_struct_ce_multiplier=1.5, desc_ce_weight=1.0)
    return build_channel_b_targets(tok.encode(text), PROMPT_LEN, list(gts), settings, tok, SAMPLE)


def spec_class(a: int, b: int, is_coord: bool) -> MaskClass:
    """The §7.4 table by character regions of TRAINED (cat record [13, 101), cup [103, 190), tail from 190)."""
    if a >= 190:
        if is_coord:
            return MaskClass.TAIL_COORD
        for d in ("dog", "person"):
            at = TRAINED.index(f'"{d}"', 190) + 1
            if a < at + len(d) and b > at:
                return MaskClass.TAIL_DESC
        return MaskClass.TAIL_STRUCTURE
    if a < 101 and b > 13:
        if is_coord:
            return MaskClass.MATCHED_COORD
        return MaskClass.MATCHED_DESC if a < 26 and b > 23 else MaskClass.MATCHED_STRUCTURE
    if a < 190 and b > 103:
        return MaskClass.FP
    return MaskClass.PREFIX_CONTEXT


def test_worked_example_stage2_ab_token_by_token(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(ROLLOUT)
    out = build(tok, Stage2Variant.STAGE2_AB)
    assert tok.decode(out.y_train) == TRAINED
    assert out.prefix_ids == tuple(ids[: out.prefix_len])  # never re-tokenised: the cut is a token boundary
    assert tuple(tok.encode(TRAINED[190:])) == out.append_ids  # the fragment is tokenised on its own
    weight = {
        MaskClass.MATCHED_STRUCTURE: 1.0,
        MaskClass.TAIL_STRUCTURE: 1.5,
        MaskClass.TAIL_DESC: 1.0,
        MaskClass.TERMINATOR: 1.5,
    }
    pos = 0
    seen: set[MaskClass] = set()
    for i, t in enumerate(out.y_train):
        piece = tok.piece(t)
        want = spec_class(pos, pos + len(piece), tok.coord_ids.is_coord_id(t))
        got = MaskClass(int(out.mask.classes[i]))
        assert got is want, (i, piece, got, want)
        assert out.mask.ce_weights[i] == weight.get(want, 0.0), (i, piece)
        seen.add(got)
        pos += len(piece)
    assert seen == set(MaskClass) - {MaskClass.DROPPED, MaskClass.TERMINATOR}
    assert MaskClass(int(out.mask.classes[-1])) is MaskClass.TERMINATOR
    assert (
        out.mask.ce_weights[-1] == 1.5
        and out.y_train[-1] != tok.im_end_id
        and out.terminator_id == tok.im_end_id
    )
    # The opener carries no CE except where fused with the cat `{` (`' [{"'` in this tokenizer).
    opener = [i for i, t in enumerate(out.y_train[:5]) if "[" in tok.piece(t)]
    assert [out.mask.ce_weights[i] == 1.0 for i in opener] == [
        "{" in tok.piece(out.y_train[i]) for i in opener
    ]
    # Desc values: `cat` unsupervised, `dog` and `person` at desc_ce_weight (never multiplied).
    assert "".join(tok.piece(out.append_ids[i]) for i in out.tail_desc_pos) == "dogperson"
    # Geometry pools 3 boxes: 1 matched (targets GT0) + 2 FN, 12 coordinates, all coord ids.
    assert [(g.source, g.gt_index, g.target_bins) for g in out.groups] == [
        (GroupSource.PREFIX, 0, GT0.bins),
        (GroupSource.FN, 1, GT1.bins),
        (GroupSource.FN, 2, GT2.bins),
    ]
    assert sum(len(g.positions) for g in out.groups) == 12
    assert [tok.coord_ids.bin_of(out.y_train[p - PROMPT_LEN]) for p in out.prefix_groups[0].positions] == [
        118,
        302,
        421,
        698,
    ]
    assert all(p >= PROMPT_LEN + out.prefix_len for g in out.fn_groups for p in g.positions)
    # Sample metrics of §7.4.
    k = out.counters
    assert (k.n_gt, k.n_valid_pred, k.n_matched, k.n_fp, k.n_fn_appended) == (3, 2, 1, 1, 2)
    assert (k.truncated, k.drop_reasons["incomplete_tail"], k.n_drop_invalid, k.invalid_rollout) == (
        1,
        1,
        1,
        0,
    )
    assert k.gating_rejections == 5 and k.matched_maskiou_sum == pytest.approx(0.977, abs=5e-4)
    # §7.2.8: the trained text salvages to the prefix records then the FN records.
    r = salvage(tok.decode(out.y_train) + "<|im_end|>")
    assert list(r.objects) == [box("cat", 118, 302, 421, 698), box("cup", 700, 50, 760, 120), GT1, GT2]
    assert not r.truncated


def test_worked_example_rollout_matching_sft(tok) -> None:  # type: ignore[no-untyped-def]
    """§11.1: prefix no CE; FN desc masked; tail structure, the final `]}` and `<|im_end|>` at weight 1."""
    out = build(tok, Stage2Variant.ROLLOUT_MATCHING_SFT)
    w, cls = out.mask.ce_weights, out.mask.classes
    assert not np.any(w[: out.prefix_len])
    for i in range(out.prefix_len, out.train_len):
        want = 1.0 if cls[i] in (MaskClass.TAIL_STRUCTURE, MaskClass.TERMINATOR) else 0.0
        assert w[i] == want
    assert tok.piece(out.y_train[-1]).endswith("]}") and w[-2] == 1.0 and w[-1] == 1.0
    assert [g.target_bins for g in out.groups] == [GT0.bins, GT1.bins, GT2.bins]


def test_non_ascii_and_escaped_fn_desc_spans(tok) -> None:  # type: ignore[no-untyped-def]
    """§22.15 with byte-level BPE: quotes, backslashes and non-ASCII; tail_desc_pos covers exactly the value."""
    desc = 'caf\u00e9 "big" \\ \u732b\u732b'
    out = build(tok, Stage2Variant.STAGE2_AB, gts=(box(desc, 1, 2, 3, 4),), text='{"objects": [')
    fragment = out.fragment_text
    value = json.dumps(desc, ensure_ascii=False)[1:-1]
    assert value in fragment and tok.decode(out.append_ids) == fragment
    assert tok.decode([out.append_ids[i] for i in out.tail_desc_pos]).strip(' "') == value
    # Tokens outside the value are structure or coord, never desc.
    for i, t in enumerate(out.append_ids):
        if i not in out.tail_desc_pos and not tok.coord_ids.is_coord_id(t):
            assert out.mask.classes[out.prefix_len + i] == MaskClass.TAIL_STRUCTURE
    assert salvage(tok.decode(out.y_train)).objects == (box(desc, 1, 2, 3, 4),)


def test_non_ascii_matched_desc_in_the_prefix(tok) -> None:  # type: ignore[no-untyped-def]
    """Pitfall 3: per-id pieces of a split multi-byte desc are U+FFFD; the desc tokens still get no CE and
    the record's structure is supervised."""
    desc = "caf\u00e9 \u732b"
    rollout = f'{{"objects": [{{"desc": "{desc}", "bbox_2d": [{c(118)}, {c(302)}, {c(421)}, {c(698)}]}}]}}'
    ids = tok.encode(rollout)
    assert "\ufffd" in "".join(tok.piece(t) for t in ids)  # the tokenizer splits the characters' bytes
    out = build(tok, Stage2Variant.STAGE2_AB, gts=(GT0,), text=rollout)
    assert out.counters.n_matched == 1 and out.fn_groups == ()
    cls = [MaskClass(int(x)) for x in out.mask.classes]
    desc_ids = [t for t, k in zip(out.y_train, cls) if k is MaskClass.MATCHED_DESC]
    assert tok.decode(desc_ids).strip(' "') == desc
    structure = [t for t, k in zip(out.y_train, cls) if k is MaskClass.MATCHED_STRUCTURE]
    assert (
        "desc" in tok.decode(structure) and "bbox" in tok.decode(structure) and "]}" in tok.decode(structure)
    )
    assert all(out.mask.ce_weights[i] == 0 for i, k in enumerate(cls) if k is MaskClass.MATCHED_DESC)
