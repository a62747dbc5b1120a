"""Channel-B target construction and the per-token mask plan (stage2.md §1, §4, §5, §7, §8, §9, §11).

One rollout goes: token-aligned scan (``domain.coordjson.scan_tokens``, D2c) -> [Stage-2 AB: bbox-only
filter, §4] -> matching (``domain.stage2_matching``) -> matched coord targets (§7.1; ``rollout_matching_sft``:
§11.2 with ``domain.stage2_ot``) -> FN injection (``domain.coordjson.append_fn_records``, D3) -> closure
check (§7.3) -> a mask plan that gives every assistant token (``Y_train`` and the labelled ``<|im_end|>``)
exactly one :class:`MaskClass` and a CE weight (§9 table; §11.1 for ``rollout_matching_sft``).

Positions: *assistant-local* index ``i`` (0 .. ``train_len - 1``) is absolute position ``prompt_len + i``;
coord groups carry absolute positions, ``tail_desc_pos`` is tail-relative (an index into ``append_ids``).
A broken internal invariant raises :class:`~domain.errors.InvariantViolation` naming the sample.
"""

from __future__ import annotations

import bisect
import enum
import functools
import itertools
import math
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from domain.coord_tokens import MAX_BIN, CoordIdTable
from domain.coordjson import (
    CONTAINER_OPENER,
    POLY_UNSUPPORTED,
    FnInjection,
    RecordStatus,
    ScannedRecord,
    ScanResult,
    TokenClass,
    append_fn_records,
    scan_document,
    scan_tokens,
)
from domain.duplicates import DEFAULT_DUPLICATE_IOU_THRESHOLD, DuplicateStats, duplicate_stats
from domain.errors import ConfigError, DataContractError, DataProblem, InvariantViolation, StepError
from domain.metrics_registry import STRICT_DROP_REASONS
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind
from domain.stage2_matching import MatchSettings, match_predictions
from domain.stage2_ot import OTSettings, ot_target_bins

__all__ = [
    "POLY_UNSUPPORTED",
    "ChannelBCounters",
    "ChannelBTargets",
    "CoordGroup",
    "GroupSource",
    "MaskClass",
    "MaskPlan",
    "MatchOutcome",
    "SampleRef",
    "Stage2TokenText",
    "Stage2Variant",
    "TargetSettings",
    "build_channel_b_targets",
    "check_encoded_length",
    "check_gt_objects",
    "check_prompt_ids",
    "construct_targets",
    "match_inputs",
    "scan_rollout",
]


F64 = npt.NDArray[np.float64]
_VALID = RecordStatus.VALID  # ``r.status is _VALID`` is ``r.is_valid`` without the property call
I8 = npt.NDArray[np.int8]


class Stage2Variant(str, enum.Enum):
    STAGE2_AB = "stage2_ab"
    ROLLOUT_MATCHING_SFT = "rollout_matching_sft"


class MaskClass(enum.IntEnum):
    """The class of one assistant token (stage2.md §9 table; §11.1). Every assistant token has exactly one."""

    PREFIX_CONTEXT = 0  # leading text, opener, inter-record separators, array-level junk
    MATCHED_STRUCTURE = 1
    MATCHED_DESC = 2
    MATCHED_COORD = 3
    FP = 4  # unmatched or excluded prediction, every token (FP-neutral)
    DROPPED = 5  # a dropped record in the prefix (any reason, poly_unsupported included)
    TAIL_STRUCTURE = 6  # fragment punctuation, keys, quotes, separators, the final ]}
    TAIL_DESC = 7
    TAIL_COORD = 8
    TERMINATOR = 9  # <|im_end|>


class GroupSource(str, enum.Enum):
    PREFIX = "prefix"
    FN = "fn"


class Stage2TokenText(Protocol):
    """The tokenizer view target construction needs (``ports.tokenizer.TokenizerPort`` satisfies it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece(self, token_id: int) -> str: ...

    @property
    def coord_ids(self) -> CoordIdTable: ...

    @property
    def im_end_id(self) -> int: ...


class MatchOutcome(Protocol):
    """What target construction reads of a matching result (``domain.stage2_matching.MatchResult``)."""

    @property
    def matched_pairs(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def fp_pred_indices(self) -> tuple[int, ...]: ...

    @property
    def fn_gt_indices(self) -> tuple[int, ...]: ...

    @property
    def gating_rejections(self) -> int: ...

    @property
    def candidate_pairs(self) -> int: ...

    @property
    def matched_maskiou_sum(self) -> float: ...

    @property
    def matched_maskiou_count(self) -> int: ...


@attrs.frozen
class SampleRef:
    """Where a raw sample came from (data.md §6.4): JSONL source, 1-based line, ``sample_id`` = record index."""

    source: str
    line: int
    sample_id: int

    def __str__(self) -> str:
        return f"sample_id={self.sample_id} ({self.source}:{self.line})"


def _number(key: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: must be in [{lo}, {hi}], got {value}")
    return float(value)


def _desc_weight(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _number("stage2_ab.losses.desc_ce_weight", value, 0.0, math.inf)


def _multiplier(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _number("stage2_ab.channel_b.drop_invalid_struct_ce_multiplier", value, 1.0, 4.0)


def _duplicate_threshold(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    duplicate_stats((), value)  # the monitor owns the rule: a ConfigError naming its key


@attrs.frozen
class TargetSettings:
    """Settings of Channel-B target construction (config keys of stage2.md §20; defaults as the schema).

    ``desc_ce_weight`` is ``stage2_ab.losses.desc_ce_weight``; ``drop_invalid_struct_ce_multiplier`` is
    ``stage2_ab.channel_b.drop_invalid_struct_ce_multiplier``; both are read by Stage-2 AB only.
    ``matching`` / ``ot`` are the ``matching`` block (§6, §11.2). ``duplicate_iou_threshold`` is
    ``stage2_ab.channel_b.duplicate_monitor.iou_threshold`` (§18.7; monitor only, supervision unchanged).
    """

    variant: Stage2Variant = attrs.field(converter=Stage2Variant)
    field_order: FieldOrder = attrs.field(default=FieldOrder.DESC_FIRST, converter=FieldOrder)
    desc_ce_weight: float = attrs.field(default=1.0, validator=_desc_weight)
    drop_invalid_struct_ce_multiplier: float = attrs.field(default=1.0, validator=_multiplier)
    matching: MatchSettings = attrs.field(factory=MatchSettings)
    ot: OTSettings = attrs.field(factory=OTSettings)
    duplicate_iou_threshold: float = attrs.field(
        default=DEFAULT_DUPLICATE_IOU_THRESHOLD, validator=_duplicate_threshold
    )

    @property
    def is_ab(self) -> bool:
        return self.variant is Stage2Variant.STAGE2_AB


@attrs.frozen
class CoordGroup:
    """One supervised box / polygon: absolute input positions of its coord tokens and their target bins."""

    positions: tuple[int, ...]
    target_bins: tuple[int, ...]
    kind: GeometryKind
    gt_index: int
    source: GroupSource


@attrs.frozen(eq=False)
class MaskPlan:
    """Class and CE weight of every assistant token (``train_len`` of them: ``Y_train`` then ``<|im_end|>``)."""

    prompt_len: int
    prefix_len: int
    classes: I8
    ce_weights: F64

    @property
    def train_len(self) -> int:
        return int(self.classes.shape[0])

    def positions_of(self, *classes: MaskClass) -> tuple[int, ...]:
        """Absolute positions of the assistant tokens of the given classes, ascending."""
        hit = np.isin(self.classes, np.asarray([int(c) for c in classes], dtype=np.int8))
        return tuple(int(i) + self.prompt_len for i in np.flatnonzero(hit))

    def ce_positions(self) -> tuple[int, ...]:
        """Absolute positions whose CE weight is > 0."""
        return tuple(int(i) + self.prompt_len for i in np.flatnonzero(self.ce_weights > 0))

    def labels_row(
        self, y_train: Sequence[int], terminator_id: int, encoded_len: int, ignore: int = -100
    ) -> npt.NDArray[np.int64]:
        """A labels row of ``encoded_len``: the token id where CE weight > 0, ``ignore`` elsewhere."""
        row = np.full(encoded_len, ignore, dtype=np.int64)
        ids = np.asarray([*y_train, terminator_id], dtype=np.int64)
        on = self.ce_weights > 0
        row[self.prompt_len : self.prompt_len + self.train_len][on] = ids[on]
        return row


@attrs.frozen
class ChannelBCounters:
    """Per-sample counters (§4, §18.1, §18.4). ``drop_reasons`` carries all 10 names of §18.2, zeros included.

    ``duplicates``: the duplicate monitor (§18.7) over the sample's valid predictions (after §4; polygons
    are skipped by the monitor); ``domain.duplicates.summarize_duplicate_stats`` turns a step's worth
    into the ``dup/raw/*`` keys.
    """

    n_gt: int
    n_valid_pred: int
    n_drop_invalid: int
    drop_reasons: Mapping[str, int]
    invalid_rollout: int
    cut_fallback: int
    parse_failed: int
    truncated: int
    n_matched: int  # matched-for-supervision
    n_excluded: int  # matched by §6 but target construction failed (§11.2)
    n_fp: int
    n_fn_appended: int
    gating_rejections: int
    candidate_pairs: int
    matched_maskiou_sum: float
    matched_maskiou_count: int
    prefix_coord_targets: int
    duplicates: DuplicateStats


@attrs.frozen(eq=False)
class ChannelBTargets:
    """One sample's teacher-forced target (stage2.md §7, §8) and its mask plan (§9 / §11)."""

    sample: SampleRef
    variant: Stage2Variant
    prompt_len: int
    prefix_ids: tuple[int, ...]
    append_ids: tuple[int, ...]
    terminator_id: int
    mask: MaskPlan
    # (assistant-local coord token indices, gt index, target bins, kind) of each prefix group, in pair order;
    # ``prefix_groups`` builds the CoordGroups from them on first use.
    _prefix_specs: tuple[_PrefixSpec, ...] = attrs.field(alias="prefix_specs", repr=False)
    fn_groups: tuple[CoordGroup, ...]
    tail_desc_pos: tuple[int, ...]
    counters: ChannelBCounters
    fragment_text: str
    fn_gt_indices: tuple[int, ...]
    matched_for_supervision: tuple[tuple[int, int], ...]  # (pred_idx, gt_idx)

    @property
    def y_train(self) -> tuple[int, ...]:
        return self.prefix_ids + self.append_ids

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    @property
    def train_len(self) -> int:
        return len(self.prefix_ids) + len(self.append_ids) + 1

    @functools.cached_property
    def prefix_groups(self) -> tuple[CoordGroup, ...]:
        """One group per matched-for-supervision pair (§7.1), in pair order: absolute positions, target bins."""
        return _prefix_groups(self._prefix_specs, self.prompt_len)

    @property
    def groups(self) -> tuple[CoordGroup, ...]:
        return self.prefix_groups + self.fn_groups


_PrefixSpec = tuple[tuple[int, ...], int, tuple[int, ...], GeometryKind]


def _prefix_groups(specs: Sequence[_PrefixSpec], prompt_len: int) -> tuple[CoordGroup, ...]:
    return tuple(
        CoordGroup(
            positions=tuple(map(prompt_len.__add__, idx)),
            target_bins=tuple(map(int, target)),
            kind=kind,
            gt_index=g,
            source=GroupSource.PREFIX,
        )
        for idx, g, target, kind in specs
    )


# Per-table numpy lookup: bin of each id up to the table's largest id, -1 elsewhere (built once per table).
_BIN_LOOKUP: weakref.WeakKeyDictionary[CoordIdTable, npt.NDArray[np.int64]] = weakref.WeakKeyDictionary()


def _bins_of_ids(coord_ids: CoordIdTable, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``coord_ids.bin_of`` of every id, -1 for a non-coord id (any int64, negative ones included)."""
    table = _BIN_LOOKUP.get(coord_ids)
    if table is None:
        table = np.full(coord_ids.max_id + 1, -1, dtype=np.int64)
        table[np.asarray(coord_ids.ids, dtype=np.int64)] = np.arange(len(coord_ids.ids), dtype=np.int64)
        _BIN_LOOKUP[coord_ids] = table
    inside = (ids >= 0) & (ids < table.shape[0])
    out: npt.NDArray[np.int64] = np.where(inside, table[np.where(inside, ids, 0)], -1)
    return out


def _int_array(values: Sequence[int]) -> npt.NDArray[np.int64]:
    return np.fromiter(values, dtype=np.int64, count=len(values))


# --------------------------------------------------------------------------------------------
# GT objects (§5) and encoding checks (§8)
# --------------------------------------------------------------------------------------------


def check_gt_objects(gts: Sequence[DetObject], variant: Stage2Variant, sample: SampleRef) -> None:
    """§5: GT contract errors (file, line and dotted field). Stage-2 AB is bbox-only v1 and needs >= 1 object."""
    variant = Stage2Variant(variant)
    if gts and _gt_boxes_pass(gts):
        return
    problems: list[DataProblem] = []

    def bad(field: str, reason: str) -> None:
        problems.append(DataProblem(sample.source, sample.line, field, reason))

    if variant is Stage2Variant.STAGE2_AB and not gts:
        bad("objects", "stage2_ab requires at least one GT object")
    for j, obj in enumerate(gts):
        key = f"objects[{j}].{obj.kind.value}"
        bins = obj.bins
        if variant is Stage2Variant.STAGE2_AB and obj.kind is not GeometryKind.BBOX:
            bad(
                key,
                "stage2_ab is bbox-only v1: polygon ground truth is not supported (use rollout_matching_sft)",
            )
            continue
        out = [k for k in bins if not 0 <= k <= MAX_BIN]
        if out:
            bad(key, f"bins out of range 0..{MAX_BIN}: {out[:4]}")
            continue
        if obj.kind is GeometryKind.BBOX:
            if len(bins) != 4 or bins[2] < bins[0] or bins[3] < bins[1]:
                bad(key, f"invalid bbox_2d {list(bins)}: needs 4 bins with x2 >= x1 and y2 >= y1")
        elif len(bins) % 2 or len(bins) < 6:
            bad(key, f"invalid poly: needs an even number >= 6 of bins, got {len(bins)}")
    if problems:
        raise DataContractError(problems)


def _gt_boxes_pass(gts: Sequence[DetObject]) -> bool:
    """True when every GT is a :class:`DetObject` bbox of 4 bins in range with ``x2 >= x1``, ``y2 >= y1``:
    then :func:`check_gt_objects` finds no problem under either variant (checked at once with numpy)."""
    n = len(gts)
    if not all(type(o) is DetObject and o.kind is GeometryKind.BBOX and len(o.bins) == 4 for o in gts):
        return False
    try:
        b = np.fromiter(itertools.chain.from_iterable(o.bins for o in gts), dtype=np.int64, count=4 * n)
    except OverflowError:
        return False
    b = b.reshape(n, 4)
    return bool(
        b.min() >= 0 and b.max() <= MAX_BIN and np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
    )


def check_prompt_ids(
    backend_prompt_ids: Sequence[int], encoder_prompt_ids: Sequence[int], sample: SampleRef
) -> None:
    """§8.1: the backend's prompt ids must equal the generate-mode encoder's."""
    a, b = [int(t) for t in backend_prompt_ids], [int(t) for t in encoder_prompt_ids]
    if a == b:
        return
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    raise StepError(
        f"prompt tokenization mismatch for {sample}: backend prompt has {len(a)} ids, encoder prompt has "
        f"{len(b)} ids; first differing index {first}"
    )


def check_encoded_length(encoded_len: int, max_length: int, sample: SampleRef) -> None:
    """§8.2: no truncation; an over-length segment is an error with its mitigations."""
    if encoded_len > max_length:
        raise StepError(
            f"{sample}: encoded_len={encoded_len} exceeds training.max_length={max_length} (no truncation). "
            "Mitigations: lower rollout.max_new_tokens, raise training.max_length, or lower the pixel budget."
        )


# --------------------------------------------------------------------------------------------
# Scan, bbox-only filter (§3, §4)
# --------------------------------------------------------------------------------------------


def _pieces(ids: Sequence[int], tokenizer: Stage2TokenText) -> list[str]:
    """``piece`` of every id, decoding each distinct id once (structure and coord ids repeat a lot)."""
    memo: dict[int, str] = {}
    out: list[str] = []
    for t in ids:
        p = memo.get(t)
        if p is None:
            p = memo[t] = tokenizer.piece(t)
        out.append(p)
    return out


def scan_rollout(
    response_ids: Sequence[int],
    pieces: Sequence[str] | None,
    tokenizer: Stage2TokenText,
    field_order: FieldOrder,
) -> ScanResult:
    """The token-aligned scan of one rollout (D2c); ``pieces`` default to one ``piece`` per id."""
    if pieces is None:
        pieces = _pieces(list(map(int, response_ids)), tokenizer)
    return scan_tokens(  # it reads the ids as ints
        response_ids,
        pieces,
        tokenizer.encode,
        tokenizer.coord_ids,
        FieldOrder(field_order),
        CoordMode.TOKENS,
        frozenset({int(tokenizer.im_end_id)}),
        decode=tokenizer.decode,
    )


def match_inputs(scan: ScanResult, variant: Stage2Variant) -> tuple[ScannedRecord, ...]:
    """The predictions given to matching, in appearance order: valid records (§3.5); Stage-2 AB keeps bbox only (§4).

    ``pred_idx`` of a :class:`MatchOutcome` indexes this tuple.
    """
    keep_poly = Stage2Variant(variant) is Stage2Variant.ROLLOUT_MATCHING_SFT
    return tuple(
        r for r in scan.records if r.status is _VALID and (keep_poly or r.geom_type is GeometryKind.BBOX)
    )


def _pred_objects(scan: ScanResult, variant: Stage2Variant) -> list[DetObject]:
    """``[r.to_object() for r in match_inputs(scan, variant)]``, reusing the scan's ``valid_objects``
    (one per valid record, in order) instead of building the objects again."""
    valid = [r for r in scan.records if r.status is _VALID]
    if len(valid) != len(scan.valid_objects):
        return [r.to_object() for r in match_inputs(scan, variant)]
    keep_poly = Stage2Variant(variant) is Stage2Variant.ROLLOUT_MATCHING_SFT
    return [o for r, o in zip(valid, scan.valid_objects) if keep_poly or r.geom_type is GeometryKind.BBOX]


def _drop_reasons(scan: ScanResult, n_poly_unsupported: int) -> dict[str, int]:
    counts = {r: 0 for r in STRICT_DROP_REASONS}
    for reason, n in scan.drop_counts.items():
        if reason not in counts:
            raise InvariantViolation(f"scanner drop reason {reason!r} is not one of {STRICT_DROP_REASONS}")
        counts[reason] += int(n)
    counts[POLY_UNSUPPORTED] += n_poly_unsupported
    return counts


# --------------------------------------------------------------------------------------------
# Target construction (§7, §11.2)
# --------------------------------------------------------------------------------------------


# A coord token as the tokenizer's added-token split finds it (any ``<|coord_k|>``, desc strings included).
_COORD_TOKEN_SPLIT = re.compile(r"<\|coord_(0|[1-9][0-9]{0,2})\|>")
_SEGMENT_CHECKS = 8  # fragments per tokenizer compared with the real encode before the memo is trusted
_SEGMENT_MEMO_MAX = 1 << 16  # entries; cleared when exceeded


class _SegmentMemo:
    """Per tokenizer: ``encode`` of the text segments between coord tokens, and whether assembling a
    fragment's ids from them is still trusted (``checks_left`` fragments still compared with the real
    encode; a mismatch turns the memo off for good)."""

    __slots__ = ("checks_left", "coord_ids", "memo", "on")

    def __init__(self, coord_ids: CoordIdTable) -> None:
        self.coord_ids = coord_ids
        self.memo: dict[str, tuple[int, ...]] = {}
        self.checks_left = _SEGMENT_CHECKS
        self.on = True


_SEGMENT_MEMOS: weakref.WeakKeyDictionary[object, _SegmentMemo] = weakref.WeakKeyDictionary()


def _assemble_fragment_ids(
    text: str, encode: Callable[[str], Sequence[int]], coord: Sequence[int], memo: dict[str, tuple[int, ...]]
) -> list[int]:
    """``encode(text)`` read as ``encode(seg_0) + [id of <|coord_k0|>] + encode(seg_1) + ...``: coord tokens
    are special tokens (D7), which a Hugging Face tokenizer splits off before normalising and
    pre-tokenising, so the segments between them encode independently (tests/domain/
    test_stage2_fast_paths.py holds this on the Qwen tokenizer). Each distinct segment is encoded once."""
    parts = _COORD_TOKEN_SPLIT.split(text)  # segment, bin, segment, bin, ..., segment
    out: list[int] = []
    for i, part in enumerate(parts):
        if i & 1:
            out.append(coord[int(part)])
            continue
        seg = memo.get(part)
        if seg is None:
            if len(memo) >= _SEGMENT_MEMO_MAX:
                memo.clear()
            seg = memo[part] = tuple(map(int, encode(part)))
        out.extend(seg)
    return out


def _fragment_encoder(tokenizer: Stage2TokenText, coord_ids: CoordIdTable) -> Callable[[str], list[int]]:
    """The encode of the FN fragment: ``tokenizer.encode``'s ids, assembled from a per-tokenizer memo of
    segment encodings (:func:`_assemble_fragment_ids`). The first :data:`_SEGMENT_CHECKS` fragments of
    each tokenizer are also encoded whole and compared; any difference turns the memo off for that
    tokenizer (then every fragment takes the real encode), so a tokenizer that does not split at coord
    tokens gets its own encode."""
    encode = tokenizer.encode
    try:
        state = _SEGMENT_MEMOS.get(tokenizer)
        if state is None or state.coord_ids is not coord_ids:
            state = _SEGMENT_MEMOS[tokenizer] = _SegmentMemo(coord_ids)
    except TypeError:  # not weakly referable: no memo
        return lambda text: list(map(int, encode(text)))
    if not state.on:
        return lambda text: list(map(int, encode(text)))

    def fragment_ids(text: str) -> list[int]:
        if not state.on:
            return list(map(int, encode(text)))
        out = _assemble_fragment_ids(text, encode, coord_ids.ids, state.memo)
        if state.checks_left > 0:
            real = list(map(int, encode(text)))
            if real != out:
                state.on = False
                state.memo.clear()
                return real
            state.checks_left -= 1
        return out

    return fragment_ids


def _matched_target(pred: ScannedRecord, gt: DetObject, settings: TargetSettings) -> tuple[int, ...] | None:
    """Target bins for a matched prediction's coord tokens, or None (``excluded_from_supervision``)."""
    n = len(pred.coord_token_indices)
    if n != len(pred.bins) or not all(map((1).__eq__, map(len, pred.coord_token_groups))):
        return None
    if pred.geom_type is GeometryKind.BBOX and gt.kind is GeometryKind.BBOX:
        return gt.bins if n == 4 else None
    if settings.is_ab:
        return None  # Stage-2 AB is bbox-only: a polygon never reaches here (§4, §5)
    target = ot_target_bins(pred.to_object(), gt, settings.ot)
    if target is None or len(target) != n:
        return None
    return target


def _tail_offsets(append_ids: Sequence[int], fragment: str, tokenizer: Stage2TokenText) -> list[int]:
    """Char start of each fragment token, then ``len(fragment)``.

    Fast path: the pieces spell the fragment. Otherwise (a multi-byte character split across ids
    decodes to U+FFFD piecewise, pitfall 3) the start of token k is the common prefix length of
    ``decode(ids[:k])`` and the fragment, so a token holding only part of a character starts at it.
    """
    pieces = _pieces(append_ids, tokenizer)
    if "".join(pieces) == fragment:
        return list(itertools.accumulate(map(len, pieces), initial=0))
    out = []
    for k in range(len(append_ids)):
        text = tokenizer.decode(append_ids[:k])
        m = 0
        for a, b in zip(text, fragment):
            if a != b:
                break
            m += 1
        out.append(m)
    out.append(len(fragment))
    return out


def _overlaps(starts: Sequence[int], a: int, b: int) -> range:
    """Indices of tokens (``starts`` = char starts then the end) overlapping chars ``[a, b)``."""
    n = len(starts) - 1
    lo = max(0, bisect.bisect_right(starts, a) - 1)
    hi = bisect.bisect_left(starts, b, lo)
    return range(lo, min(hi, n))


def _overlap_ranges(
    starts: npt.NDArray[np.int64], n: int, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """:func:`_overlaps` of every span ``[a[s], b[s])`` at once: token ranges ``[lo, stop)`` (empty when ``stop <= lo``)."""
    lo = np.maximum(np.searchsorted(starts, a, side="right") - 1, 0)
    hi = np.maximum(np.searchsorted(starts, b, side="left"), lo)
    return lo, np.minimum(hi, n)


def _paint_levels(
    starts: npt.NDArray[np.int64], n: int, layers: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> npt.NDArray[np.int8]:
    """Level ``L + 1`` on every token overlapping a span of ``layers[L]`` (span starts, span ends), a later
    layer over an earlier one; 0 elsewhere. Equal to painting each span's ``_overlaps`` in turn
    (tests/domain/test_stage2_fast_paths.py). All spans at once: one coverage count per layer from a
    difference array (+1 at each token range's start, -1 at its stop), the highest covering layer wins."""
    n_layers = len(layers)
    a = [x for spans_a, _ in layers for x in spans_a]
    if not a or not n:
        return np.zeros(n, dtype=np.int8)
    b = [x for _, spans_b in layers for x in spans_b]
    layer = np.repeat(np.arange(n_layers, dtype=np.int64), [len(spans_a) for spans_a, _ in layers])
    lo, stop = _overlap_ranges(starts, n, _int_array(a), _int_array(b))
    keep = stop > lo
    width = n + 1
    base = layer[keep] * width
    size = n_layers * width
    diff = np.bincount(base + lo[keep], minlength=size) - np.bincount(base + stop[keep], minlength=size)
    covered = np.cumsum(diff.reshape(n_layers, width)[:, :n], axis=1) > 0
    level: npt.NDArray[np.int8] = (covered * np.arange(1, n_layers + 1, dtype=np.int8)[:, None]).max(axis=0)
    return level.astype(np.int8, copy=False)


# Prefix classes by level: context, then the §9 layers in increasing priority (the coord layer last).
_PREFIX_LEVEL_CLASS = np.asarray(
    [
        MaskClass.PREFIX_CONTEXT,
        MaskClass.DROPPED,
        MaskClass.FP,
        MaskClass.MATCHED_STRUCTURE,
        MaskClass.MATCHED_DESC,
        MaskClass.MATCHED_COORD,
    ],
    dtype=np.int8,
)


def _classify_prefix(
    scan: ScanResult,
    matched: Mapping[int, ScannedRecord],
    unmatched_valid: Sequence[ScannedRecord],
) -> I8:
    """§7.1 / §9 / §3.9.7 on the final prefix: matched > FP > dropped > context; inside matched,
    a coord id of a matched record is COORD, a token overlapping a matched desc value is DESC."""
    n = len(scan.prefix_ids)
    starts = _int_array(scan.prefix_offsets)
    # Lowest priority first, so a token touching several records ends with the highest class.
    # Dropped: every prefix record that is not a prediction (scanner drops and AB's poly_unsupported).
    preds = {r.record_index for r in unmatched_valid} | set(matched)
    dropped = [r.char_span for r in scan.records if r.in_prefix and r.record_index not in preds]
    fp = [r.char_span for r in unmatched_valid]
    structure = [r.char_span for r in matched.values()]
    desc = [r.desc_value_span for r in matched.values() if r.desc_value_span is not None]
    layers = [([x[0] for x in spans], [x[1] for x in spans]) for spans in (dropped, fp, structure, desc)]
    level = _paint_levels(starts, n, layers)
    coord = list(itertools.chain.from_iterable(r.coord_token_indices for r in matched.values()))
    if coord:
        level[coord] = len(layers) + 1
    classes: I8 = _PREFIX_LEVEL_CLASS[level]
    return classes


def _classify_tail(
    inj: FnInjection, offsets: Sequence[int], coord_ids: CoordIdTable
) -> tuple[I8, tuple[int, ...]]:
    """Tail classes: a coord id is COORD; a token touching an FN desc value is DESC; the rest STRUCTURE.

    A token whose char span is empty (part of a split multi-byte character) touches the char at its start.
    """
    size = len(inj.fragment_text)
    in_desc = np.zeros(size + 1, dtype=np.int64)
    for span in inj.spans:
        if span.cls is TokenClass.DESC:
            in_desc[span.start + 1 : span.end + 1] += 1
    cum = np.cumsum(np.minimum(in_desc, 1))  # cum[c] = desc chars among [0, c)
    coord = _bins_of_ids(coord_ids, _int_array(inj.append_ids)) >= 0
    offs = _int_array(offsets)
    a = offs[:-1]
    b = np.minimum(size, np.maximum(offs[1:], a + 1))
    ok = a < b
    touched = np.zeros(a.shape, dtype=np.bool_)
    touched[ok] = cum[b[ok]] - cum[a[ok]] > 0
    desc = touched & ~coord
    classes: I8 = np.full(len(inj.append_ids), int(MaskClass.TAIL_STRUCTURE), dtype=np.int8)
    classes[coord] = int(MaskClass.TAIL_COORD)
    classes[desc] = int(MaskClass.TAIL_DESC)
    return classes, tuple(np.flatnonzero(desc).tolist())


def _check_closure(
    inj: FnInjection, fn_objects: Sequence[DetObject], field_order: FieldOrder, sample: SampleRef
) -> None:
    """§7.3 (and §7.2.8 for the tail): the array-level scan of the trained text reaches the fragment's
    ``]`` and the container's ``}`` as its last character, and the FN records read back exactly.

    ``append_fn_records`` has checked that the prefix ends at array level (outside records and strings,
    array open, §3.6.4), and the array-level scan has no other state, so the scan of the trained text
    from the prefix's end is the scan of the fragment after a bare opener: only the tail is re-read.
    """
    fragment = inj.fragment_text
    text = CONTAINER_OPENER + fragment
    doc = scan_document(text, field_order, CoordMode.TOKENS, cut_at_stop=False)
    tail_start = len(CONTAINER_OPENER)
    problems: list[str] = []
    if doc.array_open_end != tail_start:
        problems.append("the fragment does not continue the array")
    if doc.array_close < tail_start:
        problems.append("the array's ']' is not in the tail")
    if doc.container_end != len(text):
        problems.append(
            f"the container's '}}' ends at fragment char {doc.container_end - tail_start}, expected {len(fragment)}"
        )
    if doc.truncated or doc.trailing_junk or doc.syntax_error:
        problems.append("the tail is truncated or holds junk")
    read = [
        e.verdict.to_object() if e.verdict is not None and e.verdict.reason is None else None
        for e in doc.records
    ]
    if read != list(fn_objects):
        problems.append(f"the tail reads back {len(read)} records, expected the {len(fn_objects)} FN records")
    if problems:
        raise InvariantViolation(
            f"closure check failed for {sample}: {'; '.join(problems)}: {fragment[-120:]!r}"
        )


def construct_targets(
    scan: ScanResult,
    gts: Sequence[DetObject],
    match: MatchOutcome,
    prompt_len: int,
    settings: TargetSettings,
    tokenizer: Stage2TokenText,
    sample: SampleRef,
) -> ChannelBTargets:
    """§7 / §9 / §11 from a scan and a matching of ``match_inputs(scan, variant)`` against ``gts``."""
    coord_ids = tokenizer.coord_ids
    preds = match_inputs(scan, settings.variant)
    n_poly_unsupported = 0
    if settings.is_ab:
        n_poly_unsupported = sum(
            1 for r in scan.records if r.status is _VALID and r.geom_type is not GeometryKind.BBOX
        )
    if prompt_len < 0:
        raise InvariantViolation(f"{sample}: prompt_len must be >= 0, got {prompt_len}")

    # Matched pairs -> matched-for-supervision (§7.1, §11.2).
    seen_p: set[int] = set()
    seen_g: set[int] = set()
    matched_records: dict[int, ScannedRecord] = {}
    matched_pairs: list[tuple[int, int]] = []
    prefix_specs: list[_PrefixSpec] = []
    n_excluded = 0
    prefix_len = len(scan.prefix_ids)
    n_preds, n_gts = len(preds), len(gts)
    bbox = GeometryKind.BBOX
    for p, g in sorted(match.matched_pairs):
        if not (0 <= p < n_preds) or not (0 <= g < n_gts) or p in seen_p or g in seen_g:
            raise InvariantViolation(
                f"{sample}: matching returned pair ({p}, {g}) outside {len(preds)} predictions x {len(gts)} GTs "
                "or not one-to-one"
            )
        seen_p.add(p)
        seen_g.add(g)
        rec = preds[p]
        gt = gts[g]
        idx = rec.coord_token_indices
        tg = rec.coord_token_groups
        if (
            rec.geom_type is bbox
            and gt.kind is bbox
            and len(idx) == 4
            and len(rec.bins) == 4
            and len(tg) == 4
            and len(tg[0]) == len(tg[1]) == len(tg[2]) == len(tg[3]) == 1
        ):  # _matched_target's bbox case, inline: four one-token literals -> the GT's bins
            target: tuple[int, ...] | None = gt.bins
        else:
            target = _matched_target(rec, gt, settings)
        if target is None:
            n_excluded += 1
            continue
        if not rec.in_prefix or (idx and max(idx) >= prefix_len):
            raise InvariantViolation(f"{sample}: matched record {rec.record_index} is not inside the prefix")
        matched_records[rec.record_index] = rec
        matched_pairs.append((p, g))
        prefix_specs.append((idx, g, target, rec.geom_type or GeometryKind.BBOX))
    supervised_gt = {g for _, g in matched_pairs}
    fn_idx = tuple(j for j in range(len(gts)) if j not in supervised_gt)
    fn_objects = [gts[j] for j in fn_idx]

    # FN injection (§7.2): the fragment is tokenised on its own (its ids assembled from memoised segments).
    try:
        inj = append_fn_records(
            scan,
            fn_objects,
            _fragment_encoder(tokenizer, coord_ids),
            settings.field_order,
            CoordMode.TOKENS,
            coord_ids=coord_ids,
        )
    except InvariantViolation as exc:
        raise InvariantViolation(f"{sample}: {exc}") from exc
    if len(inj.fn_coord_groups) != len(fn_objects):
        raise InvariantViolation(
            f"{sample}: {len(inj.fn_coord_groups)} FN coord groups for {len(fn_objects)} FN records"
        )
    offsets = _tail_offsets(inj.append_ids, inj.fragment_text, tokenizer)
    _check_closure(inj, fn_objects, settings.field_order, sample)

    # Classes of every assistant token (§9): prefix, tail, then the terminator.
    unmatched = [r for r in preds if r.record_index not in matched_records]
    prefix_classes = _classify_prefix(scan, matched_records, unmatched)
    tail_classes, tail_desc = _classify_tail(inj, offsets, coord_ids)
    classes = np.concatenate(
        [prefix_classes, tail_classes, np.asarray([int(MaskClass.TERMINATOR)], dtype=np.int8)]
    )

    # FN groups (§7.2.6) with the §8.3 checks.
    fn_groups = tuple(
        CoordGroup(
            positions=tuple(map((prompt_len + prefix_len).__add__, rel)),
            target_bins=obj.bins,
            kind=obj.kind,
            gt_index=j,
            source=GroupSource.FN,
        )
        for rel, obj, j in zip(inj.fn_coord_groups, fn_objects, fn_idx)
    )
    if not _spec_groups_pass(
        prefix_specs, inj.fn_coord_groups, fn_objects, scan.prefix_ids, inj.append_ids, coord_ids
    ):
        y_train = tuple(scan.prefix_ids) + inj.append_ids
        prefix_groups = _prefix_groups(prefix_specs, prompt_len)
        _check_groups(prefix_groups, fn_groups, y_train, prompt_len, prefix_len, coord_ids, sample)

    drops = _drop_reasons(scan, n_poly_unsupported)
    n_drop = sum(drops.values())
    weights = _ce_weights(classes, settings, n_drop)
    counters = ChannelBCounters(
        n_gt=len(gts),
        n_valid_pred=len(preds),
        n_drop_invalid=n_drop,
        drop_reasons=drops,
        invalid_rollout=int(scan.invalid_rollout),
        cut_fallback=int(scan.cut_fallback),
        parse_failed=int(scan.parse_failed),
        truncated=int(scan.truncated),
        n_matched=len(matched_pairs),
        n_excluded=n_excluded,
        n_fp=len(preds) - len(matched_pairs),
        n_fn_appended=len(fn_idx),
        gating_rejections=int(match.gating_rejections),
        candidate_pairs=int(match.candidate_pairs),
        matched_maskiou_sum=float(match.matched_maskiou_sum),
        matched_maskiou_count=int(match.matched_maskiou_count),
        prefix_coord_targets=sum(len(spec[0]) for spec in prefix_specs),
        duplicates=duplicate_stats(_pred_objects(scan, settings.variant), settings.duplicate_iou_threshold),
    )
    return ChannelBTargets(
        sample=sample,
        variant=settings.variant,
        prompt_len=prompt_len,
        prefix_ids=tuple(scan.prefix_ids),
        append_ids=inj.append_ids,
        terminator_id=int(tokenizer.im_end_id),
        mask=MaskPlan(prompt_len, prefix_len, classes, weights),
        prefix_specs=tuple(prefix_specs),
        fn_groups=fn_groups,
        tail_desc_pos=tail_desc,
        counters=counters,
        fragment_text=inj.fragment_text,
        fn_gt_indices=fn_idx,
        matched_for_supervision=tuple(matched_pairs),
    )


def _check_groups(
    prefix_groups: Sequence[CoordGroup],
    fn_groups: Sequence[CoordGroup],
    y_train: Sequence[int],
    prompt_len: int,
    prefix_len: int,
    coord_ids: CoordIdTable,
    sample: SampleRef,
) -> None:
    """§8.3 (:func:`_check_groups_loop`'s rule) on all positions at once; on any failure the loop runs,
    raising its error for the first failing group and position."""
    if _groups_pass(prefix_groups, fn_groups, y_train, prompt_len, prefix_len, coord_ids):
        return
    _check_groups_loop(prefix_groups, fn_groups, y_train, prompt_len, prefix_len, coord_ids, sample)


def _spec_groups_pass(
    prefix_specs: Sequence[_PrefixSpec],
    fn_rel: Sequence[Sequence[int]],
    fn_objects: Sequence[DetObject],
    prefix_ids: Sequence[int],
    append_ids: Sequence[int],
    coord_ids: CoordIdTable,
) -> bool:
    """True iff :func:`_check_groups` passes on the groups construct_targets builds from these: prefix
    group ``(idx, g, target, kind)`` at assistant-local ``idx``, FN group ``k`` at ``prefix_len + fn_rel[k]``
    with targets ``fn_objects[k].bins`` (so any ``prompt_len``). All positions checked at once."""
    prefix_len = len(prefix_ids)
    if any(len(idx) != len(target) for idx, _, target, _ in prefix_specs) or any(
        len(rel) != len(obj.bins) for rel, obj in zip(fn_rel, fn_objects)
    ):
        return False
    pre = [i for spec in prefix_specs for i in spec[0]]
    if pre and (min(pre) < 0 or max(pre) >= prefix_len):
        return False
    tail = [i for rel in fn_rel for i in rel]
    if tail and (
        min(tail) < 0 or max(tail) >= len(append_ids)
    ):  # past the tail: not a coord id (or IndexError)
        return False
    ids = _int_array([prefix_ids[i] for i in pre] + [append_ids[i] for i in tail])
    bins = _bins_of_ids(coord_ids, ids)
    if bool(np.any(bins < 0)):
        return False
    want = [k for obj in fn_objects[: len(fn_rel)] for k in obj.bins]
    return bool(bins[len(pre) :].tolist() == want)


def _groups_pass(
    prefix_groups: Sequence[CoordGroup],
    fn_groups: Sequence[CoordGroup],
    y_train: Sequence[int],
    prompt_len: int,
    prefix_len: int,
    coord_ids: CoordIdTable,
) -> bool:
    """True iff :func:`_check_groups_loop` passes (every group: as many positions as targets, each position
    in its section and holding a coord id; an FN position's bin equals its target)."""
    groups = [*prefix_groups, *fn_groups]
    if any(len(gr.positions) != len(gr.target_bins) for gr in groups):
        return False
    n_prefix = sum(len(gr.positions) for gr in prefix_groups)
    pos = np.fromiter(itertools.chain.from_iterable(gr.positions for gr in groups), dtype=np.int64)
    train_end = prompt_len + len(y_train) + 1
    lo = np.full(pos.shape, prompt_len + prefix_len, dtype=np.int64)
    hi = np.full(pos.shape, train_end, dtype=np.int64)
    lo[:n_prefix] = prompt_len
    hi[:n_prefix] = prompt_len + prefix_len
    if not bool(np.all((lo <= pos) & (pos < hi))):
        return False
    rel = pos - prompt_len
    if rel.size and int(rel.max()) >= len(y_train):  # the terminator's slot holds no coord id
        return False
    ids = _int_array([y_train[i] for i in rel.tolist()])
    bins = _bins_of_ids(coord_ids, ids)
    if bool(np.any(bins < 0)):
        return False
    fn = [i for i, gr in enumerate(groups) if gr.source is GroupSource.FN]
    if not fn:
        return True
    at = np.cumsum([0, *(len(gr.positions) for gr in groups)]).tolist()
    for i in fn:  # FN groups are few (the missed GTs); one comparison each
        if bins[at[i] : at[i + 1]].tolist() != list(groups[i].target_bins):
            return False
    return True


def _check_groups_loop(
    prefix_groups: Sequence[CoordGroup],
    fn_groups: Sequence[CoordGroup],
    y_train: Sequence[int],
    prompt_len: int,
    prefix_len: int,
    coord_ids: CoordIdTable,
    sample: SampleRef,
) -> None:
    """§8.3: prefix groups in the prefix, FN groups in the tail, every position a coord id; FN ids spell their bins."""
    train_end = prompt_len + len(y_train) + 1
    for groups, lo, hi in (
        (prefix_groups, prompt_len, prompt_len + prefix_len),
        (fn_groups, prompt_len + prefix_len, train_end),
    ):
        for gr in groups:
            if len(gr.positions) != len(gr.target_bins):
                raise InvariantViolation(
                    f"{sample}: {gr.source.value} group of GT {gr.gt_index} has {len(gr.positions)} positions "
                    f"for {len(gr.target_bins)} targets"
                )
            for pos, k in zip(gr.positions, gr.target_bins):
                if not lo <= pos < hi:
                    raise InvariantViolation(
                        f"{sample}: {gr.source.value} group position {pos} outside [{lo}, {hi})"
                    )
                b = coord_ids.bin_of(y_train[pos - prompt_len])
                if b is None:
                    raise InvariantViolation(f"{sample}: group position {pos} does not hold a coord id")
                if gr.source is GroupSource.FN and b != k:
                    raise InvariantViolation(
                        f"{sample}: FN coord at position {pos} spells bin {b}, target {k}"
                    )


def _ce_weights(classes: I8, settings: TargetSettings, n_drop_invalid: int) -> F64:
    """§9 (Stage-2 AB) and §11.1 (``rollout_matching_sft``) weights per class."""
    table = np.zeros(len(MaskClass), dtype=np.float64)
    if settings.is_ab:
        m = settings.drop_invalid_struct_ce_multiplier if n_drop_invalid > 0 else 1.0
        table[MaskClass.MATCHED_STRUCTURE] = 1.0
        table[MaskClass.TAIL_STRUCTURE] = m
        table[MaskClass.TERMINATOR] = m
        table[MaskClass.TAIL_DESC] = settings.desc_ce_weight
    else:
        table[MaskClass.TAIL_STRUCTURE] = 1.0
        table[MaskClass.TERMINATOR] = 1.0
    weights: F64 = table[classes.astype(np.int64)]
    return weights


# --------------------------------------------------------------------------------------------
# The whole Channel-B target step for one rollout (§1)
# --------------------------------------------------------------------------------------------


def build_channel_b_targets(
    response_ids: Sequence[int],
    prompt_len: int,
    gts: Sequence[DetObject],
    settings: TargetSettings,
    tokenizer: Stage2TokenText,
    sample: SampleRef,
    *,
    pieces: Sequence[str] | None = None,
    match: MatchOutcome | None = None,
) -> ChannelBTargets:
    """scan -> [AB filter] -> GT check -> match -> targets -> mask plan for one rollout (stage2.md §1).

    ``pieces`` (one ``piece`` per id) may be passed when already decoded; ``match`` overrides matching
    (it must index ``match_inputs(scan, variant)``).
    """
    check_gt_objects(gts, settings.variant, sample)
    try:
        scan = scan_rollout(response_ids, pieces, tokenizer, settings.field_order)
    except InvariantViolation as exc:  # the scanner's own post-condition (§3.6.4)
        raise InvariantViolation(f"{sample}: {exc}") from exc
    if match is None:
        match = match_predictions(_pred_objects(scan, settings.variant), gts, settings.matching)
    return construct_targets(scan, gts, match, prompt_len, settings, tokenizer, sample)
