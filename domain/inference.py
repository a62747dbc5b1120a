"""Per-sample processing of the inference pipeline (infer-eval-config.md §2.7-§2.8, §3.1-§3.3; D2, D16, D18).

Pure: a generation (ids, decoded text, log-probs) plus the input record become one ``gt_vs_pred.jsonl``
line; summary counters are recomputed from the lines; the resume point and the input fingerprint are
functions of bytes and JSON values.

Order of the per-sample steps (§2.8): salvage parse of the text; the token-aligned scanner on the ids,
whose valid-object list must equal salvage's (count, kinds, bins and order; a disagreement raises, because
scores would land on the wrong boxes); bins -> pixels; ``degenerate`` drops; scores from the log-probs of
the tokens that spell each coordinate; ``empty_pred`` when nothing survives.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

import attrs

from domain.codec import bins_to_pixels
from domain.coord_tokens import CoordIdTable
from domain.coordjson import DropReason, ScannedRecord, ScanResult, salvage, scan_tokens
from domain.errors import InvariantViolation
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

# --------------------------------------------------------------------------------------------
# Error codes and counters (§3.2)
# --------------------------------------------------------------------------------------------

INCOMPLETE_TAIL = "incomplete_tail"
BBOX_INVALID = DropReason.BBOX_INVALID.value
DEGENERATE = "degenerate"
TRUNCATED = "truncated"
PARSE_FAILED = "parse_failed"
EMPTY_PRED = "empty_pred"
GENERATION_FAILED = "generation_failed"

OBJECT_CODES: tuple[str, ...] = (
    DropReason.OTHER.value,
    DropReason.UNEXPECTED_KEYS.value,
    DropReason.MISSING_DESC.value,
    DropReason.MISSING_GEOM.value,
    DropReason.ORDER_VIOLATION.value,
    DropReason.NON_COORD_TOKEN.value,
    DropReason.WRONG_ARITY.value,
    INCOMPLETE_TAIL,
    BBOX_INVALID,
    DEGENERATE,
)
"""Codes that drop one predicted object each (they add to ``pred_objects_dropped``)."""

RECORD_CODES: tuple[str, ...] = (TRUNCATED, PARSE_FAILED, EMPTY_PRED, GENERATION_FAILED)
ERROR_CODES: tuple[str, ...] = OBJECT_CODES + RECORD_CODES
PRED_OBJECTS_VALID = "pred_objects_valid"
PRED_OBJECTS_DROPPED = "pred_objects_dropped"
COUNTER_KEYS: tuple[str, ...] = ERROR_CODES + (PRED_OBJECTS_VALID, PRED_OBJECTS_DROPPED)

SCORE_DECIMALS = 6
ARTIFACT_COORD_MODE = "pixel"


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _float_tuple(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _object_tuple(values: Iterable[DetObject]) -> tuple[DetObject, ...]:
    return tuple(values)


@attrs.frozen
class GeneratedText:
    """What the domain needs of one generation: the kept ids (cut after the first end-of-turn id),
    their decode with special tokens kept, and the log-probability of each id (same length)."""

    token_ids: tuple[int, ...] = attrs.field(converter=_int_tuple)
    text: str
    token_logprobs: tuple[float, ...] = attrs.field(converter=_float_tuple)
    #: the generation stopped at ``max_new_tokens`` without an end-of-turn id (finish reason ``length``)
    hit_token_limit: bool = False


@attrs.frozen
class PredictedObject:
    """One surviving prediction in pixels, with its confidence (D18)."""

    kind: GeometryKind
    points: tuple[int, ...] = attrs.field(converter=_int_tuple)
    desc: str
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind.value, "points": list(self.points), "desc": self.desc, "score": self.score}


@attrs.frozen
class SampleOutcome:
    """Surviving predictions in emission order and the fine error codes in detection order."""

    pred: tuple[PredictedObject, ...]
    errors: tuple[str, ...]


TokenScanner = Callable[[Sequence[int]], ScanResult]
"""The token-aligned scanner bound to a tokenizer and the run's field order / coord mode (D2c)."""


class TokenText(Protocol):
    """The part of a tokenizer the scanner needs (``ports.tokenizer.TokenizerPort`` satisfies it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece(self, token_id: int) -> str: ...

    @property
    def coord_ids(self) -> CoordIdTable: ...


def token_scanner(
    tokenizer: TokenText, field_order: FieldOrder, coord_mode: CoordMode, stop_ids: AbstractSet[int]
) -> TokenScanner:
    """:func:`domain.coordjson.scan_tokens` bound to ``tokenizer`` (pieces = one decode per id)."""
    order, mode, stops = FieldOrder(field_order), CoordMode(coord_mode), frozenset(int(i) for i in stop_ids)

    def scan(ids: Sequence[int]) -> ScanResult:
        pieces = [tokenizer.piece(int(i)) for i in ids]
        return scan_tokens(
            ids, pieces, tokenizer.encode, tokenizer.coord_ids, order, mode, stops, decode=tokenizer.decode
        )

    return scan


@attrs.frozen
class InferenceRecord:
    """The input side of one artifact line: what the record contract validated."""

    index: int
    image: str
    width: int
    height: int
    objects: tuple[DetObject, ...] = attrs.field(converter=_object_tuple)
    image_id: int | None = None


# --------------------------------------------------------------------------------------------
# Scores (D18, §2.8.6)
# --------------------------------------------------------------------------------------------


def coordinate_probability(logprobs: Sequence[float], token_indices: Sequence[int]) -> float:
    """``exp`` of the summed log-probabilities of the tokens that spell one coordinate."""
    if not token_indices:
        raise InvariantViolation("a coordinate is spelled by no token; cannot score it")
    return math.exp(math.fsum(logprobs[i] for i in token_indices))


def object_score(probabilities: Sequence[float]) -> float:
    """Mean of the coordinates' probabilities, rounded to 6 decimals (0.9, 0.8, 0.7, 0.6 -> 0.75)."""
    if not probabilities:
        raise InvariantViolation("an object without coordinates cannot be scored")
    mean = math.fsum(probabilities) / len(probabilities)
    return min(1.0, max(0.0, round(mean, SCORE_DECIMALS)))


# --------------------------------------------------------------------------------------------
# Per-sample processing (§2.8)
# --------------------------------------------------------------------------------------------


def _spelled_out(record: ScannedRecord, scan: ScanResult, field_order: FieldOrder, coord_mode: CoordMode) -> bool:
    """A record the text grammar accepts whose coordinates are spelled by ordinary text pieces instead of coord
    ids: the one documented case where scanner and salvage differ (data.md §5.8.8)."""
    if record.parse_reason != DropReason.NON_COORD_TOKEN.value or not record.in_prefix:
        return False
    start, end = record.char_span
    if end < 0:
        return False
    alone = salvage('{"objects": [' + scan.prefix_text[start:end] + "]}", field_order, coord_mode)
    return len(alone.objects) == 1 and not alone.drops


def paired_records(
    scan: ScanResult, field_order: FieldOrder, coord_mode: CoordMode
) -> list[ScannedRecord | None]:
    """The scanner's records in salvage's order: a record, or None where the coordinates were spelled out."""
    out: list[ScannedRecord | None] = []
    for record in scan.records:
        if record.parse_reason is None and record.char_span[1] >= 0:
            out.append(record)
        elif _spelled_out(record, scan, field_order, coord_mode):
            out.append(None)
    return out


def _describe(objects: Sequence[tuple[GeometryKind | None, tuple[int, ...]]]) -> str:
    shown = ", ".join(f"{k.value if k else None}{list(b)}" for k, b in objects[:5])
    return f"{len(objects)} object(s) [{shown}{', ...' if len(objects) > 5 else ''}]"


def check_scanner_agreement(salvaged: Sequence[DetObject], scanned: Sequence[ScannedRecord | None]) -> None:
    """Raise :class:`InvariantViolation` unless both parsers found the same objects (count, kinds, bins, order).

    Descriptions are not compared: a multi-byte character split across ids decodes differently piece by
    piece than in the whole text, while the structure (ASCII) and the coordinates cannot differ. A None
    entry (coordinates spelled by ordinary text pieces, data.md §5.8.8) matches the salvaged object at its place.
    """
    left = [(o.kind, o.bins) for o in salvaged]
    right = [(o.kind, o.bins) if r is None else (r.geom_type, r.bins) for o, r in zip(salvaged, scanned)]
    if len(scanned) != len(salvaged):
        right = [(None, ()) if r is None else (r.geom_type, r.bins) for r in scanned]
    if left != right:
        raise InvariantViolation(
            "token-aligned scanner and salvage parser disagree on the valid objects "
            f"(salvage: {_describe(left)}; scanner: {_describe(right)}); scores would be attached to "
            "the wrong boxes (infer-eval-config.md §2.8.3)"
        )


def bbox_bins_invalid(obj: DetObject) -> bool:
    """§2.8.4: a box with ``x2 < x1`` or ``y2 < y1`` in bins."""
    if obj.kind is not GeometryKind.BBOX:
        return False
    x1, y1, x2, y2 = obj.bins
    return x2 < x1 or y2 < y1


def pixel_extent_degenerate(points: Sequence[int]) -> bool:
    """§2.8.5: zero width or zero height of the pixel extent (bbox or polygon)."""
    xs, ys = points[0::2], points[1::2]
    return max(xs) == min(xs) or max(ys) == min(ys)


def salvage_codes(
    text: str, field_order: FieldOrder, coord_mode: CoordMode
) -> tuple[list[DetObject], list[str]]:
    """Salvage (D2b): the valid objects and the codes it found, in detection order."""
    result = salvage(text, field_order, coord_mode)
    codes = [reason.value for _, reason in result.drops]
    codes += [INCOMPLETE_TAIL] * result.incomplete_tail
    if result.parse_failed:
        codes.append(PARSE_FAILED)
    elif result.truncated:
        codes.append(TRUNCATED)
    return list(result.objects), codes


def process_generation(
    generated: GeneratedText,
    *,
    width: int,
    height: int,
    field_order: FieldOrder,
    coord_mode: CoordMode,
    scan: TokenScanner,
) -> SampleOutcome:
    """Steps 2-8 of §2.8 for one successful generation. Never raises on model output; raises
    :class:`InvariantViolation` on internal faults (scanner disagreement, log-prob count mismatch)."""
    if len(generated.token_logprobs) != len(generated.token_ids):
        raise InvariantViolation(
            f"{len(generated.token_ids)} generated ids but {len(generated.token_logprobs)} log-probs"
        )
    objects, errors = salvage_codes(generated.text, field_order, coord_mode)
    if generated.hit_token_limit and TRUNCATED not in errors:
        errors.append(TRUNCATED)  # cut off by max_new_tokens, even where no container was found
    scanned = paired_records(scan(generated.token_ids), field_order, coord_mode)
    check_scanner_agreement(objects, scanned)
    pred: list[PredictedObject] = []
    for obj, record in zip(objects, scanned):
        if record is None:  # coordinates without coord-token ids cannot be scored (data.md §5.8.8)
            errors.append(DropReason.NON_COORD_TOKEN.value)
            continue
        if bbox_bins_invalid(obj):
            errors.append(BBOX_INVALID)
            continue
        points = bins_to_pixels(obj.bins, width, height)
        if pixel_extent_degenerate(points):
            errors.append(DEGENERATE)
            continue
        probabilities = [
            coordinate_probability(generated.token_logprobs, g) for g in record.coord_token_groups
        ]
        if len(probabilities) != len(obj.bins):
            raise InvariantViolation(
                f"object with {len(obj.bins)} coordinates but {len(probabilities)} coordinate token groups"
            )
        pred.append(PredictedObject(obj.kind, points, obj.desc.strip(), object_score(probabilities)))
    if not pred:
        errors.append(EMPTY_PRED)
    return SampleOutcome(tuple(pred), tuple(errors))


# --------------------------------------------------------------------------------------------
# Artifact lines (§3.1)
# --------------------------------------------------------------------------------------------


def gt_entries(objects: Sequence[DetObject], width: int, height: int) -> list[dict[str, Any]]:
    """Ground truth in pixels, input order: ``{"type", "points", "desc"}``."""
    return [
        {"type": o.kind.value, "points": bins_to_pixels(o.bins, width, height), "desc": o.desc.strip()}
        for o in objects
    ]


def _head(record: InferenceRecord) -> dict[str, Any]:
    line: dict[str, Any] = {"index": record.index, "image": record.image}
    if record.image_id is not None:
        line["image_id"] = record.image_id
    line["width"] = record.width
    line["height"] = record.height
    line["coord_mode"] = ARTIFACT_COORD_MODE
    line["gt"] = gt_entries(record.objects, record.width, record.height)
    return line


def artifact_line(
    record: InferenceRecord, generated: GeneratedText, outcome: SampleOutcome, end_of_turn_id: int
) -> dict[str, Any]:
    """One ``gt_vs_pred.jsonl`` record for a successful generation, keys in §3.1 order."""
    line = _head(record)
    line["pred"] = [p.to_json() for p in outcome.pred]
    line["raw_output"] = generated.text
    line["raw_ends_with_im_end"] = bool(generated.token_ids) and generated.token_ids[-1] == end_of_turn_id
    line["num_generated_tokens"] = len(generated.token_ids)
    line["errors"] = list(outcome.errors)
    return line


def failed_line(record: InferenceRecord) -> dict[str, Any]:
    """The record of a sample whose generation failed under ``on_generation_error: record`` (§2.8.1)."""
    line = _head(record)
    line["pred"] = []
    line["raw_output"] = None
    line["raw_ends_with_im_end"] = False
    line["num_generated_tokens"] = 0
    line["errors"] = [GENERATION_FAILED]
    return line


def serialize_line(line: Mapping[str, Any]) -> str:
    """``ensure_ascii=False``, separators ``(",", ":")``, key order as built; no newline."""
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------------------------
# Summary counters (§3.2, §3.3): recomputed from the artifact, never carried across resumes
# --------------------------------------------------------------------------------------------


def summary_counters(lines: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Every code (zeros included) counted by occurrence, plus valid and dropped prediction totals."""
    counters = dict.fromkeys(COUNTER_KEYS, 0)
    for line in lines:
        for code in line.get("errors", ()):
            if code not in counters or code in (PRED_OBJECTS_VALID, PRED_OBJECTS_DROPPED):
                raise InvariantViolation(f"artifact line {line.get('index')}: unknown error code {code!r}")
            counters[code] += 1
            if code in OBJECT_CODES:
                counters[PRED_OBJECTS_DROPPED] += 1
        counters[PRED_OBJECTS_VALID] += len(line.get("pred", ()))
    return counters


def error_codes_present(counters: Mapping[str, int]) -> list[str]:
    """Sorted codes with a count above zero (``summary.error_codes``)."""
    return sorted(code for code in ERROR_CODES if counters.get(code, 0) > 0)


# --------------------------------------------------------------------------------------------
# Resume (§2.7, D16)
# --------------------------------------------------------------------------------------------


def complete_line_ends(data: bytes) -> list[int]:
    """Byte offsets just after each line of the longest resumable prefix of a ``.partial`` artifact.

    A line counts while it ends in ``\\n``, parses as a JSON object and its ``index`` equals its
    0-based line number; the first line that fails ends the prefix.
    """
    ends: list[int] = []
    start = 0
    while True:
        newline = data.find(b"\n", start)
        if newline < 0:
            return ends
        try:
            value = json.loads(data[start:newline].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return ends
        index = value.get("index") if isinstance(value, dict) else None
        if isinstance(index, bool) or index != len(ends):
            return ends
        start = newline + 1
        ends.append(start)


def resume_count(complete_lines: int, batch_size: int) -> int:
    """The largest multiple of ``batch_size`` not above ``complete_lines`` (micro-batch alignment)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return complete_lines - complete_lines % batch_size


def micro_batches(start: int, total: int, batch_size: int) -> list[range]:
    """Index ranges of the micro-batches from ``start`` (a multiple of ``batch_size``) to ``total``."""
    if start % batch_size:
        raise InvariantViolation(f"resume index {start} is not a multiple of batch_size {batch_size}")
    return [range(i, min(i + batch_size, total)) for i in range(start, total, batch_size)]


# --------------------------------------------------------------------------------------------
# Fingerprint (§2.7)
# --------------------------------------------------------------------------------------------


def canonical_json_bytes(value: Any) -> bytes:
    """Sorted keys, separators ``(",", ":")``, no ASCII escaping, UTF-8 (the project's canonical JSON)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def fingerprint_of(inputs: Mapping[str, Any]) -> str:
    """``infer_fingerprint``: SHA-256 hex of the canonical JSON of the inputs that can change a line."""
    return hashlib.sha256(canonical_json_bytes(dict(inputs))).hexdigest()


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key in value:
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprint input mappings (sorted)."""
    left: dict[str, Any] = {}
    right: dict[str, Any] = {}
    _flatten(old, "", left)
    _flatten(new, "", right)
    missing = b"<absent>"  # not valid JSON, so it equals no serialized value

    def leaf(values: Mapping[str, Any], key: str) -> bytes:
        return canonical_json_bytes(values[key]) if key in values else missing

    # Compared as canonical JSON, exactly as the fingerprint sees them (so True differs from 1).
    return sorted(k for k in left.keys() | right.keys() if leaf(left, k) != leaf(right, k))


__all__ = [
    "COUNTER_KEYS",
    "ERROR_CODES",
    "OBJECT_CODES",
    "RECORD_CODES",
    "GeneratedText",
    "InferenceRecord",
    "PredictedObject",
    "SampleOutcome",
    "TokenScanner",
    "TokenText",
    "artifact_line",
    "bbox_bins_invalid",
    "canonical_json_bytes",
    "changed_keys",
    "check_scanner_agreement",
    "complete_line_ends",
    "coordinate_probability",
    "error_codes_present",
    "failed_line",
    "fingerprint_of",
    "gt_entries",
    "micro_batches",
    "object_score",
    "pixel_extent_degenerate",
    "process_generation",
    "resume_count",
    "salvage_codes",
    "serialize_line",
    "summary_counters",
    "token_scanner",
]
