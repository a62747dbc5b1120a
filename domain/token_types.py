"""Token types of a CoordJSON target (stage1.md §2): typing, alignment, dataset filter, batch rows.

Token types are diagnostics only: they never change the loss. Everything here is pure; the
tokenizer's ids and character offsets come in as plain sequences.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Sequence
from pathlib import PurePath

import attrs
import numpy as np
import numpy.typing as npt

from domain.coordjson import CharSpan, TokenClass
from domain.objects import CoordMode

Int64Array = npt.NDArray[np.int64]
IGNORE_INDEX = -100
MAX_SPECIAL_TAIL = 8

# The class values are fixed by stage1.md §2.1 and owned by the typed serialiser's TokenClass.
IGNORE = int(TokenClass.IGNORE)
DESC = int(TokenClass.DESC)
COORD = int(TokenClass.COORD)
FORMAT = int(TokenClass.FORMAT)
# Tie-break order of rule 2: COORD > DESC > FORMAT.
_TIE_ORDER = (COORD, DESC, FORMAT)


class TypingStatus(str, enum.Enum):
    TYPED = "typed"
    NO_SUPERVISION = "no_supervision"  # zero supervised labels: all-IGNORE row, not a failure
    EXCLUDED = "excluded"  # the dataset filter excludes the sample
    NO_OBJECTS = "no_objects"  # the sample does not carry its objects
    ALIGNMENT_FAILURE = "alignment_failure"


@attrs.frozen
class TypedSample:
    """The token-type row of one sample (length = its labels' length) and how it was obtained."""

    row: Int64Array = attrs.field(eq=False)
    status: TypingStatus
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is TypingStatus.TYPED


SpanLike = CharSpan | tuple[int, int, int]


def _span_fields(span: SpanLike) -> tuple[int, int, int]:
    if isinstance(span, CharSpan):
        return span.start, span.end, int(span.cls)
    start, end, cls = span
    return int(start), int(end), int(cls)


def char_classes(text_length: int, spans: Iterable[SpanLike]) -> npt.NDArray[np.int8]:
    """Class per character: FORMAT unless a span (``CharSpan`` or ``(start, end, class)``, end
    exclusive) says otherwise."""
    classes = np.full(text_length, FORMAT, dtype=np.int8)
    for span in spans:
        start, end, cls = _span_fields(span)
        if not 0 <= start <= end <= text_length:
            raise ValueError(f"span ({start}, {end}) outside the text of length {text_length}")
        classes[start:end] = cls
    return classes


def classify_tokens(offsets: Sequence[tuple[int, int]], classes: npt.NDArray[np.int8]) -> list[int]:
    """Rule 2: a token's type is the majority class of its characters, ties COORD > DESC > FORMAT.

    A token with an empty or invalid offset (outside the text, end <= start) is FORMAT.
    """
    n = int(classes.shape[0])
    out: list[int] = []
    for start, end in offsets:
        if not 0 <= start < end <= n:
            out.append(FORMAT)
            continue
        window = classes[start:end]
        counts = {cls: int(np.count_nonzero(window == cls)) for cls in _TIE_ORDER}
        best = max(_TIE_ORDER, key=lambda cls: (counts[cls], -_TIE_ORDER.index(cls)))
        out.append(best if counts[best] > 0 else FORMAT)
    return out


def align_to_supervised(
    typed_ids: Sequence[int],
    typed_types: Sequence[int],
    supervised_ids: Sequence[int],
    *,
    special_ids: Collection[int],
    coord_ids: Collection[int] | None,
    max_special_tail: int = MAX_SPECIAL_TAIL,
) -> tuple[list[int], str]:
    """Rules 4-6: align typed ids with the supervised ids S. Returns (types for S, "") or ([], reason).

    ``coord_ids`` enables the tokens-mode cross-check (a token is COORD exactly when its id is a
    coord id); pass None in numeric mode.
    """
    if len(typed_ids) != len(typed_types):
        return [], f"{len(typed_ids)} typed ids but {len(typed_types)} types"
    n = len(supervised_ids)
    ids = [int(i) for i in typed_ids[:n]]
    types = [int(t) for t in typed_types[:n]]
    if ids != [int(i) for i in supervised_ids[: len(ids)]]:
        first = next(k for k, (a, b) in enumerate(zip(ids, supervised_ids)) if a != int(b))
        return (
            [],
            f"typed id {ids[first]} != supervised id {int(supervised_ids[first])} at supervised position {first}",
        )
    if len(ids) < n:
        tail = [int(i) for i in supervised_ids[len(ids) :]]
        if len(tail) > max_special_tail:
            return (
                [],
                f"{len(tail)} supervised ids beyond the typed text (at most {max_special_tail} allowed)",
            )
        not_special = [i for i in tail if i not in special_ids]
        if not_special:
            return [], f"supervised tail ids {not_special} beyond the typed text are not special tokens"
        ids.extend(tail)
        types.extend([FORMAT] * len(tail))
    if coord_ids is not None:
        for k, (i, t) in enumerate(zip(ids, types)):
            if (t == COORD) != (i in coord_ids):
                return [], (
                    f"supervised position {k}: id {i} is {'a' if i in coord_ids else 'not a'} coord id "
                    f"but its type is {t}"
                )
    return types, ""


def scatter_types(labels: Sequence[int] | Int64Array, supervised_types: Sequence[int]) -> Int64Array:
    """Rule 7: place the types at the supervised positions of an IGNORE row of the labels' length."""
    lab = np.asarray(labels, dtype=np.int64)
    row = np.full(lab.shape[0], IGNORE, dtype=np.int64)
    positions = np.flatnonzero(lab != IGNORE_INDEX)
    if positions.size != len(supervised_types):
        raise ValueError(f"{len(supervised_types)} types for {positions.size} supervised positions")
    row[positions] = np.asarray(supervised_types, dtype=np.int64)
    return row


def ignore_row(length: int) -> Int64Array:
    return np.full(length, IGNORE, dtype=np.int64)


def type_sample(
    labels: Sequence[int] | Int64Array,
    *,
    text_ids: Sequence[int],
    text_offsets: Sequence[tuple[int, int]],
    text_length: int,
    spans: Iterable[SpanLike],
    suffix_ids: Sequence[int],
    special_ids: Collection[int],
    coord_ids: Collection[int],
    coord_mode: CoordMode,
) -> TypedSample:
    """Type one sample (stage1.md §2.3).

    ``text_ids`` / ``text_offsets`` are the tokenisation of the typed target text with
    ``add_special_tokens=False``; ``spans`` come from the typed serialiser; ``suffix_ids`` are the
    supervised template suffix (``<|im_end|>`` ...), typed FORMAT.
    """
    lab = np.asarray(labels, dtype=np.int64)
    supervised = [int(i) for i in lab[lab != IGNORE_INDEX]]
    if not supervised:
        return TypedSample(ignore_row(lab.shape[0]), TypingStatus.NO_SUPERVISION)
    if len(text_ids) != len(text_offsets):
        return TypedSample(
            ignore_row(lab.shape[0]),
            TypingStatus.ALIGNMENT_FAILURE,
            f"{len(text_ids)} text ids but {len(text_offsets)} offsets",
        )
    classes = char_classes(text_length, spans)
    typed_ids = [int(i) for i in text_ids] + [int(i) for i in suffix_ids]
    typed_types = classify_tokens(text_offsets, classes) + [FORMAT] * len(suffix_ids)
    types, reason = align_to_supervised(
        typed_ids,
        typed_types,
        supervised,
        special_ids=special_ids,
        coord_ids=coord_ids if coord_mode is CoordMode.TOKENS else None,
    )
    if reason:
        return TypedSample(ignore_row(lab.shape[0]), TypingStatus.ALIGNMENT_FAILURE, reason)
    return TypedSample(scatter_types(lab, types), TypingStatus.TYPED)


# ---------------------------------------------------------------------------------------------
# Dataset filter (§2.4)


def dataset_label(source: str) -> str:
    """The dataset label of a sample: the stem of its JSONL source file, lower-cased."""
    return PurePath(source).stem.lower()


def _lower_set(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(str(v).lower() for v in values)


def _lower_set_required(values: Iterable[str] | None) -> frozenset[str]:
    return frozenset() if values is None else frozenset(str(v).lower() for v in values)


@attrs.frozen
class DatasetFilter:
    """``include`` null = every dataset; ``exclude`` wins over ``include``; compared lower-cased."""

    include: frozenset[str] | None = attrs.field(default=None, converter=_lower_set)
    exclude: frozenset[str] = attrs.field(factory=frozenset, converter=_lower_set_required)

    def admits(self, label: str) -> bool:
        key = label.lower()
        return (self.include is None or key in self.include) and key not in self.exclude


# ---------------------------------------------------------------------------------------------
# Batch rows (§2.5)


def padded_types_row(typed: Int64Array | None, sample_length: int, row_length: int) -> Int64Array:
    """One padded row: the sample's types right-padded with IGNORE; a missing or wrong-length result is IGNORE."""
    row = ignore_row(row_length)
    if typed is not None and typed.shape == (sample_length,) and sample_length <= row_length:
        row[:sample_length] = typed
    return row


def packed_types_row(
    member_types: Sequence[Int64Array | None], member_lengths: Sequence[int], row_length: int
) -> Int64Array:
    """A packed row: member rows concatenated in pack order (stage1.md §2.5).

    A member without types (excluded, no objects, failed alignment) contributes an IGNORE run of its
    own length. If the concatenation does not line up with the packed row (a member row of the
    wrong length, or a total different from ``row_length``) the whole row becomes IGNORE.
    """
    parts: list[Int64Array] = []
    if len(member_types) != len(member_lengths):
        return ignore_row(row_length)
    for typed, length in zip(member_types, member_lengths):
        if typed is None:
            parts.append(ignore_row(length))
        elif typed.shape != (length,):
            return ignore_row(row_length)
        else:
            parts.append(np.asarray(typed, dtype=np.int64))
    row = np.concatenate(parts) if parts else ignore_row(0)
    if row.shape[0] != row_length:
        return ignore_row(row_length)
    return row
