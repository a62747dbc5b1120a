"""The JSONL record contract (data.md §1): parsing, validation with the exact error shapes of §1.5,
the validated record set, and the converter's serialisation conventions (§9.7).

Pure: callers hand in ``(line number, text)`` pairs; reading files and images is an adapter's job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs

from domain.coord_tokens import MAX_BIN, coord_token_value, is_coord_token, token_to_bin
from domain.errors import ArtifactError, DataContractError, DataProblem
from domain.geometry import polygon_canonical_problem
from domain.objects import DetObject, GeometryKind, Ordering
from domain.ordering import first_order_violation

COORD_SPACE = "norm1000"
SIZE_MULTIPLE = 32
ARTIFACT_SNIPPET_CHARS = 200

RECORD_KEYS = ("images", "width", "height", "coord_space", "objects", "metadata")
REQUIRED_RECORD_KEYS = ("images", "width", "height", "coord_space", "objects")
OBJECT_KEYS = ("desc", "bbox_2d", "poly", "category_id", "ann_id")
GEOMETRY_KEYS = (GeometryKind.BBOX.value, GeometryKind.POLY.value)

# Keys people write by habit, with the message that tells them what to do instead (§1.3).
_REJECTED_OBJECT_KEYS = {
    "bbox": "not a contract key; write `bbox_2d` / `poly` in bins, run the converter",
    "polygon": "not a contract key; write `bbox_2d` / `poly` in bins, run the converter",
    "line": "line geometry is not supported",
    "line_points": "line geometry is not supported",
    "poly_points": "not part of the contract",
}

Problem = tuple[str, str]  # (dotted field, reason)


def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _object_tuple(values: Iterable[DetObject]) -> tuple[DetObject, ...]:
    return tuple(values)


def _id_tuple(values: Iterable[int | None]) -> tuple[int | None, ...]:
    return tuple(values)


@attrs.frozen
class Record:
    """One validated JSONL record. ``category_ids`` / ``ann_ids`` run parallel to ``objects``
    (None where the source gave none); ``line`` is the 1-based physical line, ``source`` the file."""

    images: tuple[str, ...] = attrs.field(converter=_str_tuple)
    width: int
    height: int
    objects: tuple[DetObject, ...] = attrs.field(converter=_object_tuple)
    category_ids: tuple[int | None, ...] = attrs.field(converter=_id_tuple)
    ann_ids: tuple[int | None, ...] = attrs.field(converter=_id_tuple)
    metadata: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    line: int = 0
    source: str = ""

    def __attrs_post_init__(self) -> None:
        n = len(self.objects)
        if len(self.category_ids) != n or len(self.ann_ids) != n:
            raise ValueError(
                f"category_ids ({len(self.category_ids)}) and ann_ids ({len(self.ann_ids)}) "
                f"must run parallel to objects ({n})"
            )

    @property
    def image(self) -> str:
        """The one image path, relative to ``data.image_root`` or the JSONL directory."""
        return self.images[0]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _record_tuple(values: Iterable[Record]) -> tuple[Record, ...]:
    return tuple(values)


@attrs.frozen
class RecordSet:
    """The validated records of one JSONL file, in file order, with geometry counts (D9, D15)."""

    source: str
    records: tuple[Record, ...] = attrs.field(converter=_record_tuple)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    @property
    def num_bbox_objects(self) -> int:
        return sum(1 for r in self.records for o in r.objects if o.kind is GeometryKind.BBOX)

    @property
    def num_poly_objects(self) -> int:
        return sum(1 for r in self.records for o in r.objects if o.kind is GeometryKind.POLY)

    def polygon_problems(self, reason: str) -> tuple[DataProblem, ...]:
        """One problem per poly object, for a bbox-only consumer to raise before any model loads,
        e.g. ``DataContractError(records.polygon_problems("poly geometry; stage2_ab is bbox-only v1"))``."""
        return tuple(
            DataProblem(r.source, r.line, f"objects[{i}]", reason)
            for r in self.records
            for i, o in enumerate(r.objects)
            if o.kind is GeometryKind.POLY
        )


# ---------------------------------------------------------------------------------------------
# Field rules


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def image_path_problem(path: str) -> str | None:
    """The §1.2 path rule as a pure check on the string: a non-empty relative path whose ``..``
    segments never climb above the root. Returns the reason, or None when the path is acceptable."""
    if not path:
        return "must be a non-empty relative path"
    if "\\" in path:
        return f"use '/' as the path separator; got {path!r}"
    if path.startswith("/") or (len(path) >= 2 and path[1] == ":" and path[0].isalpha()):
        return (
            f"absolute paths are not allowed; got {path!r} "
            "(write a path relative to data.image_root or the JSONL directory)"
        )
    depth = 0
    for segment in path.split("/"):
        if segment == "..":
            depth -= 1
            if depth < 0:
                return f"path escapes the image root with '..'; got {path!r}"
        elif segment not in ("", "."):
            depth += 1
    if depth == 0:
        return f"path names no file; got {path!r}"
    return None


def desc_problem(desc: object) -> str | None:
    """The §1.4 desc rules for training data, or None when the desc is acceptable."""
    if not isinstance(desc, str):
        return f"must be a string; got {desc!r}"
    if not desc.strip():
        return "must be non-empty after stripping whitespace"
    for pos, ch in enumerate(desc):
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"must not contain control characters; found {ch!r} at position {pos}"
    if desc != desc.strip():
        return "must not have leading or trailing whitespace"
    if "  " in desc:
        return "must not contain two consecutive spaces"
    if "<|" in desc or "|>" in desc:
        return "must not contain '<|' or '|>' (special-token text would tokenise to special ids)"
    return None


def _geometry_bins(
    where: str, kind: GeometryKind, value: object
) -> tuple[tuple[int, ...] | None, Problem | None]:
    """Steps 3-8 of §1.5 for one geometry value."""
    field = f"{where}.{kind.value}"
    if not isinstance(value, list):
        return None, (field, "must be a list")
    if any(isinstance(e, list) for e in value):
        return None, (field, "must be a flat list (nested pairs are not allowed)")
    n = len(value)
    if kind is GeometryKind.BBOX and n != 4:
        return None, (field, f"must contain exactly 4 values; got len={n}")
    if kind is GeometryKind.POLY and (n % 2 or n < 6):
        return None, (field, f"must contain an even number of values and at least 6; got len={n}")
    numbers: list[int] = []
    for j, e in enumerate(value):
        if isinstance(e, int) and not isinstance(e, bool):
            numbers.append(e)
            continue
        if isinstance(e, str):
            if is_coord_token(e):
                numbers.append(token_to_bin(e))
                continue
            shaped = coord_token_value(e)
            if shaped is not None:  # canonical digits but > 999: a range error (step 7)
                numbers.append(shaped)
                continue
        return None, (f"{field}[{j}]", f"expected an integer bin or a coord token string, got {e!r}")
    for j, k in enumerate(numbers):
        if not 0 <= k <= MAX_BIN:
            return None, (f"{field}[{j}]", f"value {k} out of range 0..{MAX_BIN}")
    if kind is GeometryKind.BBOX:
        x1, y1, x2, y2 = numbers
        if not (x1 < x2 and y1 < y2):
            return None, (field, f"requires x1 < x2 and y1 < y2; got {numbers}")
    else:
        rule = polygon_canonical_problem(numbers)
        if rule is not None:
            return None, (field, f"not canonical ({rule}); run the converter")
    return tuple(numbers), None


@attrs.frozen
class _CheckedObject:
    obj: DetObject
    category_id: int | None
    ann_id: int | None


def _check_object(i: int, raw: object) -> _CheckedObject | Problem:
    where = f"objects[{i}]"
    if not isinstance(raw, dict):
        return (where, f"must be a JSON object; got {raw!r}")
    for key in raw:
        if key in _REJECTED_OBJECT_KEYS:
            return (f"{where}.{key}", _REJECTED_OBJECT_KEYS[key])
        if key not in OBJECT_KEYS:
            return (f"{where}.{key}", f"unknown key; allowed keys: {', '.join(OBJECT_KEYS)}")
    present = [k for k in GEOMETRY_KEYS if raw.get(k) is not None]
    if len(present) == 2:
        return (where, "must contain exactly one geometry field (bbox_2d xor poly), got both")
    if not present:
        return (where, "must contain exactly one geometry field (bbox_2d xor poly), got none")
    kind = GeometryKind(present[0])
    bins, problem = _geometry_bins(where, kind, raw[kind.value])
    if problem is not None:
        return problem
    assert bins is not None
    if "desc" not in raw:
        return (f"{where}.desc", "missing required key")
    desc = raw["desc"]
    reason = desc_problem(desc)
    if reason is not None:
        return (f"{where}.desc", reason)
    ids: dict[str, int | None] = {}
    for key in ("category_id", "ann_id"):
        value = raw.get(key)
        if value is not None and not _is_int(value):
            return (f"{where}.{key}", f"expected an integer, got {value!r}")
        ids[key] = value
    return _CheckedObject(DetObject(desc, kind, bins), ids["category_id"], ids["ann_id"])


def _check_size(key: str, value: object) -> Problem | None:
    if not _is_int(value):
        return (key, f"must be an integer; got {value!r}")
    assert isinstance(value, int)
    if value <= 0 or value % SIZE_MULTIPLE:
        return (key, f"must be a positive multiple of {SIZE_MULTIPLE}; got {value}")
    return None


def validate_record(
    raw: object,
    *,
    max_pixels: int,
    bbox_only: bool,
    ordering: Ordering,
    line: int = 0,
    source: str = "",
) -> tuple[Record | None, list[Problem]]:
    """Validate one parsed JSON value against the record contract (§1.2-§1.5).

    Returns ``(record, [])`` or ``(None, problems)``; problems are ``(dotted field, reason)`` in this
    order: unknown top-level keys, missing keys, ``images``, ``width``, ``height``, the pixel budget,
    ``coord_space``, ``metadata``, ``objects`` (the first failing check of each object, in index
    order), then object order (``sorted``) and poly objects under ``bbox_only``. A field of ``""``
    is a record-level problem (e.g. the pixel budget, whose reason names both numbers).
    """
    if not isinstance(raw, dict):
        return None, [("", f"record must be a JSON object; got {type(raw).__name__}")]
    problems: list[Problem] = []
    for key in raw:
        if key not in RECORD_KEYS:
            problems.append((key, f"unknown top-level key; allowed keys: {', '.join(RECORD_KEYS)}"))
    for key in REQUIRED_RECORD_KEYS:
        if key not in raw:
            hint = f'; must be "{COORD_SPACE}" (pixel-space files must go through the converter)'
            problems.append((key, "missing required key" + (hint if key == "coord_space" else "")))

    images: tuple[str, ...] = ()
    if "images" in raw:
        value = raw["images"]
        if not isinstance(value, list):
            problems.append(("images", f"must be a list with exactly one path; got {value!r}"))
        elif len(value) != 1:
            problems.append(("images", f"must contain exactly one entry; got {len(value)}"))
        elif not isinstance(value[0], str):
            problems.append(("images[0]", f"must be a string path; got {value[0]!r}"))
        else:
            reason = image_path_problem(value[0])
            if reason is not None:
                problems.append(("images[0]", reason))
            else:
                images = (value[0],)

    sizes: dict[str, int] = {}
    positive: dict[str, int] = {}  # positive ints, for the budget even when not multiples of 32
    for key in ("width", "height"):
        if key in raw:
            value = raw[key]
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                positive[key] = value
            size_problem = _check_size(key, value)
            if size_problem is not None:
                problems.append(size_problem)
            else:
                sizes[key] = value
    if len(positive) == 2 and positive["width"] * positive["height"] > max_pixels:
        problems.append(
            (
                "",
                f"width*height = {positive['width'] * positive['height']} exceeds data.max_pixels = {max_pixels}",
            )
        )

    if "coord_space" in raw and raw["coord_space"] != COORD_SPACE:
        got = raw["coord_space"]
        hint = "(pixel-space files must go through the converter)"
        problems.append(("coord_space", f'must be "{COORD_SPACE}"; got {got!r} {hint}'))

    metadata = raw.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        problems.append(("metadata", f"must be a JSON object; got {metadata!r}"))

    checked: list[_CheckedObject] = []
    objects_ok = False
    if "objects" in raw:
        value = raw["objects"]
        if not isinstance(value, list):
            problems.append(("objects", f"must be a list; got {value!r}"))
        else:
            objects_ok = True
            for i, item in enumerate(value):
                result = _check_object(i, item)
                if isinstance(result, _CheckedObject):
                    checked.append(result)
                else:
                    objects_ok = False
                    problems.append(result)

    if objects_ok:
        objs = [c.obj for c in checked]
        if ordering is Ordering.SORTED:
            violation = first_order_violation(objs)
            if violation is not None:
                problems.append(("objects", violation.reason))
        if bbox_only:
            for i, o in enumerate(objs):
                if o.kind is GeometryKind.POLY:
                    problems.append((f"objects[{i}]", "poly geometry under prompt.variant bbox_only"))

    if problems:
        return None, problems
    record = Record(
        images=images,
        width=sizes["width"],
        height=sizes["height"],
        objects=tuple(c.obj for c in checked),
        category_ids=tuple(c.category_id for c in checked),
        ann_ids=tuple(c.ann_id for c in checked),
        metadata=metadata,
        line=line,
        source=source,
    )
    return record, []


# ---------------------------------------------------------------------------------------------
# JSONL files


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """Physical lines of a JSONL text with 1-based numbers (split on ``\\n`` only; a trailing
    ``\\r`` is dropped). JSON strings cannot hold raw line breaks, so nothing else splits a record."""
    pieces = text.split("\n")
    if pieces and pieces[-1] == "":
        pieces.pop()  # the empty piece after a final newline is not a line
    for number, line in enumerate(pieces, start=1):
        yield number, line.removesuffix("\r")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(text: str) -> Any:
    """Strict JSON: no NaN / Infinity, no duplicate keys (ValueError, json.JSONDecodeError included). A line
    nested deeper than the decoder's recursion limit is a ValueError too, never a RecursionError."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def no_records_problem(source: str) -> str:
    """The reason a split without a single record is refused before anything is written (data.md §7.1)."""
    return f"{source}: holds no records (the file is empty or has only blank lines)"


def in_line_order(problems: Iterable[DataProblem]) -> tuple[DataProblem, ...]:
    """Problems of one file by line (stable: a record's own problems keep their order)."""
    return tuple(sorted(problems, key=lambda p: p.line))


def validate_jsonl_records(
    lines: Iterable[tuple[int, str]],
    source: str,
    *,
    max_pixels: int,
    bbox_only: bool,
    ordering: Ordering,
    unreadable: Iterable[tuple[int, str]] = (),
) -> tuple[RecordSet, tuple[DataProblem, ...]]:
    """Validate every line; return the valid records and EVERY problem (validate_dataset reports all).

    Blank or whitespace-only lines are skipped but keep their line numbers. ``unreadable`` holds
    ``(line, reason)`` for lines the reader could not decode (not UTF-8): each is one problem, merged in
    line order, and the other lines are still validated.
    """
    records: list[Record] = []
    problems: list[DataProblem] = [DataProblem(source, number, "", reason) for number, reason in unreadable]
    for number, text in lines:
        if not text.strip():
            continue
        try:
            raw = loads_strict(text)
        except json.JSONDecodeError as exc:
            problems.append(DataProblem(source, number, "", f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        except ValueError as exc:
            problems.append(DataProblem(source, number, "", f"invalid JSON: {exc}"))
            continue
        record, found = validate_record(
            raw, max_pixels=max_pixels, bbox_only=bbox_only, ordering=ordering, line=number, source=source
        )
        problems.extend(DataProblem(source, number, field, reason) for field, reason in found)
        if record is not None:
            records.append(record)
    return RecordSet(source, records), in_line_order(problems)


def parse_jsonl_records(
    lines: Iterable[tuple[int, str]],
    source: str,
    *,
    max_pixels: int,
    bbox_only: bool,
    ordering: Ordering,
    limit: int | None = None,
    unreadable: Iterable[tuple[int, str]] = (),
    further_checks: Callable[[RecordSet], Iterable[DataProblem]] | None = None,
) -> RecordSet:
    """The training loader's eager validation (§1.1.3, D15): every record is validated; any problem
    raises one :class:`DataContractError` listing the first 20 then ``... and N more`` (its
    ``problems`` attribute holds all of them). ``limit`` keeps the first N records in file order.

    ``further_checks`` (the image checks) runs on the kept valid records even when other records are
    invalid, and its problems join the same error: every kind of problem is reported in one pass.
    """
    if limit is not None and (not _is_int(limit) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    record_set, problems = validate_jsonl_records(
        lines, source, max_pixels=max_pixels, bbox_only=bbox_only, ordering=ordering, unreadable=unreadable
    )
    if limit is not None:
        record_set = RecordSet(source, record_set.records[:limit])
    if further_checks is not None:
        problems = in_line_order(problems + tuple(further_checks(record_set)))
    if problems:
        raise DataContractError(problems)
    return record_set


# ---------------------------------------------------------------------------------------------
# Artifacts (infer-eval-config.md §4.1): strict, no lenient mode


def parse_artifact_lines(lines: Iterable[tuple[int, str]], path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Strictly parse artifact JSONL lines: blank lines skipped; a non-JSON line raises
    ``Malformed JSONL at <path>:<line>: <first 200 chars>…``, a non-object line
    ``Non-object JSONL record at <path>:<line>`` (both :class:`ArtifactError`)."""
    for number, text in lines:
        if not text.strip():
            continue
        try:
            value = loads_strict(text)
        except ValueError:
            snippet = text[:ARTIFACT_SNIPPET_CHARS] + ("…" if len(text) > ARTIFACT_SNIPPET_CHARS else "")
            raise ArtifactError(f"Malformed JSONL at {path}:{number}: {snippet}") from None
        if not isinstance(value, dict):
            raise ArtifactError(f"Non-object JSONL record at {path}:{number}")
        yield number, value


# ---------------------------------------------------------------------------------------------
# Serialisation (converter conventions, §9.7)


def object_to_json(
    obj: DetObject, category_id: int | None = None, ann_id: int | None = None
) -> dict[str, Any]:
    """``{"desc", <geometry>: [bins], "category_id"?, "ann_id"?}`` in that key order."""
    out: dict[str, Any] = {"desc": obj.desc, obj.kind.value: list(obj.bins)}
    if category_id is not None:
        out["category_id"] = category_id
    if ann_id is not None:
        out["ann_id"] = ann_id
    return out


def record_to_json(record: Record) -> dict[str, Any]:
    """The record as a JSON-ready dict with sorted top-level keys and integer bins (§9.7)."""
    out: dict[str, Any] = {
        "coord_space": COORD_SPACE,
        "height": record.height,
        "images": list(record.images),
    }
    if record.metadata is not None:
        out["metadata"] = dict(record.metadata)
    out["objects"] = [
        object_to_json(o, c, a) for o, c, a in zip(record.objects, record.category_ids, record.ann_ids)
    ]
    out["width"] = record.width
    return out


def record_to_json_line(record: Record) -> str:
    """One JSONL line (no newline): sorted top-level keys, ``ensure_ascii=False``, separators
    ``", "`` / ``": "``, so reruns are byte-identical."""
    return json.dumps(record_to_json(record), ensure_ascii=False, separators=(", ", ": "), allow_nan=False)
