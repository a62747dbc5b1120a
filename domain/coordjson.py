"""CoordJSON, the one assistant format (D1), and its one grammar shared by three parsers (D2).

One module owns the rule (data.md §5, stage2.md §3, stage1.md §2.2):

- serialisation: :func:`render` and :func:`render_typed` (the same code path; the typed variant
  also returns DESC / COORD character spans);
- one string-aware scanner of the container and the records (:func:`scan_document`), one record
  validator and one :class:`DropReason` enum, used by
  (a) the strict transpile for ground truth and training targets (:func:`parse_strict`,
  :func:`transpile_strict`; any deviation raises :class:`~domain.errors.CoordJSONError`),
  (b) salvage for model outputs (:func:`salvage`; never raises on any ``str``), and
  (c) the token-aligned scanner for Stage 2 and scores (:func:`scan_tokens`; never raises on any
  ids), which plugs a token check into row 8 of the record validation and cuts an append-ready prefix;
- FN injection (D3): :func:`fn_injection_text`, :func:`fn_injection_typed`, :func:`append_fn_records`.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import json
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import attrs

from domain.coord_tokens import MAX_BIN, CoordIdTable, all_coord_tokens
from domain.errors import CoordJSONError, CoordTokenError, InvariantViolation
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

__all__ = [
    "CONTAINER_OPENER",
    "INCOMPLETE_TAIL",
    "MAX_NESTING",
    "POLY_UNSUPPORTED",
    "STOP_TEXTS",
    "CharSpan",
    "DocumentScan",
    "DropReason",
    "FnInjection",
    "JunkScan",
    "RecordScan",
    "RecordStatus",
    "RecordVerdict",
    "SalvageResult",
    "ScanResult",
    "ScannedRecord",
    "TokenClass",
    "append_fn_records",
    "check_append_ready",
    "fn_injection_text",
    "fn_injection_typed",
    "parse_strict",
    "render",
    "render_typed",
    "salvage",
    "scan_document",
    "scan_tokens",
    "transpile_strict",
]


class DropReason(str, enum.Enum):
    """Why a record was dropped: the one list shared by the three parsers (data.md §5.6).

    Consumers add their own buckets outside this enum (Stage 2: ``incomplete_tail``,
    ``poly_unsupported``; evaluation: ``degenerate``).
    """

    OTHER = "other"
    UNEXPECTED_KEYS = "unexpected_keys"
    MISSING_DESC = "missing_desc"
    MISSING_GEOM = "missing_geom"
    ORDER_VIOLATION = "order_violation"
    NON_COORD_TOKEN = "non_coord_token"
    WRONG_ARITY = "wrong_arity"
    BBOX_INVALID = "bbox_invalid"


INCOMPLETE_TAIL = "incomplete_tail"
"""Consumer bucket name of a record that never closes (data.md §5.4 step 4); not a parser reason."""

POLY_UNSUPPORTED = "poly_unsupported"
"""Stage-2 AB consumer bucket of a valid polygon prediction (stage2.md §4); the record stays in the prefix."""

CONTAINER_OPENER = '{"objects": ['
"""The canonical container opener; its tokenisation is the scanner's fallback prefix (stage2.md §0)."""

STOP_TEXTS = ("<|im_end|>", "<|endoftext|>")
"""Texts that end a model output wherever they appear, quotes ignored (data.md §5.8.4)."""


class TokenClass(enum.IntEnum):
    """Character / token classes of the typed serialisation (stage1.md §2.1)."""

    IGNORE = -1
    DESC = 1
    COORD = 2
    FORMAT = 3


@attrs.frozen
class CharSpan:
    """Characters ``[start, end)`` of a rendered text that belong to ``cls`` (DESC or COORD)."""

    start: int
    end: int
    cls: TokenClass


# --------------------------------------------------------------------------------------------
# Serialisation (data.md §5.2, stage1.md §2.2)
# --------------------------------------------------------------------------------------------

_BIN_OF_TOKEN: dict[str, int] = {tok: k for k, tok in enumerate(all_coord_tokens())}
_TOKEN_OF_BIN: tuple[str, ...] = tuple(all_coord_tokens())


def _geometry_key(kind: GeometryKind) -> str:
    return '"bbox_2d"' if kind is GeometryKind.BBOX else '"poly"'


def _coord_literal(k: int, coord_mode: CoordMode) -> str:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_BIN:
        raise CoordTokenError(f"bin must be an int in 0..{MAX_BIN}, got {k!r}")
    return _TOKEN_OF_BIN[k] if coord_mode is CoordMode.TOKENS else str(k)


class _TypedWriter:
    """Appends text pieces and records DESC / COORD spans; the single serialiser of this module."""

    __slots__ = ("parts", "pos", "spans")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.spans: list[CharSpan] = []
        self.pos = 0

    def fmt(self, s: str) -> None:
        self.parts.append(s)
        self.pos += len(s)

    def record(self, obj: DetObject, field_order: FieldOrder, coord_mode: CoordMode) -> None:
        # One record as one string: the pieces, and the spans, that fmt / typed would give piece by piece.
        lits = [_coord_literal(k, coord_mode) for k in obj.bins]
        quoted = json.dumps(obj.desc, ensure_ascii=False)[1:-1]
        geom = _geometry_key(obj.kind) + ": ["
        spans = self.spans
        pos = self.pos + 1  # after "{"
        if field_order is FieldOrder.DESC_FIRST:
            pos += 9  # '"desc": "'
            if quoted:
                spans.append(CharSpan(pos, pos + len(quoted), TokenClass.DESC))
            pos += len(quoted) + 3  # '", '
        pos += len(geom)
        for j, lit in enumerate(lits):
            if j:
                pos += 2  # ", "
            if lit:
                spans.append(CharSpan(pos, pos + len(lit), TokenClass.COORD))
            pos += len(lit)
        pos += 1  # "]"
        if field_order is FieldOrder.DESC_FIRST:
            text = '{"desc": "' + quoted + '", ' + geom + ", ".join(lits) + "]}"
        else:
            pos += 2 + 9  # ', "desc": "'
            if quoted:
                spans.append(CharSpan(pos, pos + len(quoted), TokenClass.DESC))
            text = "{" + geom + ", ".join(lits) + '], "desc": "' + quoted + '"}'
        self.fmt(text)

    def records(self, objects: Sequence[DetObject], field_order: FieldOrder, coord_mode: CoordMode) -> None:
        for i, obj in enumerate(objects):
            if i:
                self.fmt(", ")
            self.record(obj, field_order, coord_mode)

    def text(self) -> str:
        return "".join(self.parts)


def render_typed(
    objects: Sequence[DetObject],
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> tuple[str, list[CharSpan]]:
    """The canonical CoordJSON of ``objects`` plus its DESC and COORD spans; other characters are FORMAT."""
    w = _TypedWriter()
    w.fmt(CONTAINER_OPENER)
    w.records(objects, FieldOrder(field_order), CoordMode(coord_mode))
    w.fmt("]}")
    return w.text(), w.spans


def render(
    objects: Sequence[DetObject],
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> str:
    """The canonical one-line CoordJSON of ``objects`` in the given order (data.md §5.2)."""
    return render_typed(objects, field_order, coord_mode)[0]


# --------------------------------------------------------------------------------------------
# The grammar: lexemes, record validation, the document scan
# --------------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_WS_COMMA = re.compile(r"[ \t\n\r,]*")
_OPENER = re.compile(r'\{[ \t\n\r]*"objects"[ \t\n\r]*:[ \t\n\r]*\[')
_STOP = re.compile("|".join(re.escape(s) for s in STOP_TEXTS))
# A JSON string exactly as JSON defines it (no raw control characters, only the JSON escapes).
_JSON_STRING = re.compile(r'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"')
# The string-awareness of record extents and junk skipping: a backslash escapes the next character.
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACE_OR_QUOTE = re.compile(r'[{}"]')
_JUNK_STOP = re.compile(r'[{\]"]')
# A run ``<|...|>`` is one literal (data.md §5.8.3); whitespace or JSON punctuation inside makes it text.
_SPECIAL_PATTERN = r'<\|[^\s"\\{}\[\],:<>|]+\|>'
# Anything number-like is one literal, so ``-1``, ``1.0``, ``1e2``, ``+1``, ``01`` are non_coord_token.
_NUMBER_PATTERN = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_LITERAL_PATTERN = f"{_SPECIAL_PATTERN}|{_NUMBER_PATTERN}"
_SPECIAL_LITERAL = re.compile(_SPECIAL_PATTERN)
_NUMBER_LIKE = re.compile(_NUMBER_PATTERN)
_LITERAL = re.compile(_LITERAL_PATTERN)
# A flat array of literals in one match (the common geometry case, lexed in C); its items are then
# read with ``_LITERAL``, which gives exactly what the general descent would.
_FLAT_ARRAY = re.compile(
    rf"\[[ \t\n\r]*(?:(?:{_LITERAL_PATTERN})(?:[ \t\n\r]*,[ \t\n\r]*(?:{_LITERAL_PATTERN}))*[ \t\n\r]*)?\]"
)
_CANONICAL_BIN = re.compile(r"0|[1-9][0-9]{0,2}")
_WORD = re.compile(r"true|false|null")

_STR, _TOK, _NUM, _WORDK, _ARR, _OBJ = range(6)
_KIND_NAMES = ("a string", "a token", "a number", "a literal", "an array", "an object")

# A parsed value: (kind, start, end, items), offsets relative to the record text; items only for arrays.
_Node = tuple[int, int, int, tuple[Any, ...]]


class _Malformed(Exception):
    def __init__(self, pos: int, what: str) -> None:
        super().__init__(what)
        self.pos = pos
        self.what = what


def _parse_string(s: str, pos: int, what: str) -> _Node:
    m = _JSON_STRING.match(s, pos)
    if m is None:
        raise _Malformed(pos, f"expected {what}")
    return (_STR, pos, m.end(), ())


MAX_NESTING = 64
"""Deepest nesting of arrays and objects below a record's own braces (a flat geometry array is depth 1);
a deeper record drops as ``other`` (data.md §5.8 item 4a)."""


class _Frame:
    """An array or object open inside the record being parsed (the parse keeps these on a list, not the stack)."""

    __slots__ = ("is_obj", "items", "key", "start")

    def __init__(self, is_obj: bool, start: int) -> None:
        self.is_obj = is_obj
        self.start = start
        self.items: list[Any] = []  # array: item nodes; object: (key node, value node) pairs
        self.key: _Node | None = None


# The common record shape in one C match: two members, ``"key": "string"`` and ``"key": [flat array]`` in
# either order, each lexeme as the walk below reads it. ``_parse_record`` builds from its groups exactly
# the members the walk would (tests/domain/test_stage2_fast_paths.py holds the two equal).
_WS_P = r"[ \t\n\r]*+"
_FLAT_ARRAY_PATTERN = _FLAT_ARRAY.pattern
_TWO_MEMBER_RECORD = re.compile(
    rf"\{{{_WS_P}({_JSON_STRING.pattern}){_WS_P}:{_WS_P}(?:({_JSON_STRING.pattern})|({_FLAT_ARRAY_PATTERN}))"
    rf"{_WS_P},{_WS_P}({_JSON_STRING.pattern}){_WS_P}:{_WS_P}(?:({_JSON_STRING.pattern})|({_FLAT_ARRAY_PATTERN}))"
    rf"{_WS_P}\}}"
)


def _flat_array_node(s: str, p: int, end: int) -> _Node:
    """The node of a flat array ``s[p:end]`` matched by ``_FLAT_ARRAY``."""
    return (
        _ARR,
        p,
        end,
        tuple(
            (_TOK if s[m.start()] == "<" else _NUM, m.start(), m.end(), ())
            for m in _LITERAL.finditer(s, p + 1, end - 1)
        ),
    )


def _parse_record(s: str, pos: int) -> tuple[list[tuple[_Node, _Node]], int]:
    """The ``"key": value`` members of the record whose ``{`` is at ``pos``, and the index after its ``}``.

    Values are JSON plus ``<|...|>`` runs and number-like literals (well-formedness of row 1). The walk is
    iterative: nesting in the input costs list entries, never Python recursion, and more than
    :data:`MAX_NESTING` levels below the record's braces is malformed (data.md §5.8 item 4a).
    A record of the common shape (``_TWO_MEMBER_RECORD``) is read from one match instead, to the same members.
    """
    fast = _TWO_MEMBER_RECORD.match(s, pos)
    if fast is not None:
        members: list[tuple[_Node, _Node]] = []
        for key_group in (1, 4):
            key_node: _Node = (_STR, fast.start(key_group), fast.end(key_group), ())
            if fast.start(key_group + 1) >= 0:
                value: _Node = (_STR, fast.start(key_group + 1), fast.end(key_group + 1), ())
            else:
                value = _flat_array_node(s, fast.start(key_group + 2), fast.end(key_group + 2))
            members.append((key_node, value))
        return members, fast.end()
    return _parse_record_walk(s, pos)


def _parse_record_walk(s: str, pos: int) -> tuple[list[tuple[_Node, _Node]], int]:
    """:func:`_parse_record` by the general walk (any record)."""
    n = len(s)
    ws = _WS.match
    frames = [_Frame(True, pos)]
    p = ws(s, pos + 1).end()  # type: ignore[union-attr]
    if p < n and s[p] == "}":
        return [], p + 1
    while True:
        top = frames[-1]
        if top.is_obj:
            key = _parse_string(s, p, 'a "key" string')
            p = ws(s, key[2]).end()  # type: ignore[union-attr]
            if p >= n or s[p] != ":":
                raise _Malformed(p, "expected ':' after a key")
            top.key = key
            p = ws(s, p + 1).end()  # type: ignore[union-attr]
        if p >= n:
            raise _Malformed(p, "expected a value")
        c = s[p]
        node: _Node
        if c in "[{":
            if len(frames) > MAX_NESTING:
                raise _Malformed(p, f"arrays and objects nest more than {MAX_NESTING} levels deep")
            flat = _FLAT_ARRAY.match(s, p) if c == "[" else None
            if flat is not None:
                node = _flat_array_node(s, p, flat.end())
            else:
                q = ws(s, p + 1).end()  # type: ignore[union-attr]
                if q < n and s[q] == ("}" if c == "{" else "]"):
                    node = (_OBJ if c == "{" else _ARR, p, q + 1, ())
                else:
                    frames.append(_Frame(c == "{", p))
                    p = q
                    continue
        elif c == '"':
            node = _parse_string(s, p, "a JSON string")
        else:
            m = None
            kind = _TOK
            if c == "<":
                m = _SPECIAL_LITERAL.match(s, p)
            elif c in "0123456789+-.":
                m, kind = _NUMBER_LIKE.match(s, p), _NUM
            elif c in "tfn":
                m, kind = _WORD.match(s, p), _WORDK
            if m is None:
                raise _Malformed(p, "expected a value")
            node = (kind, p, m.end(), ())
        # Attach the finished value to its container; a closer finishes that container in turn.
        while True:
            top = frames[-1]
            if top.is_obj:
                assert top.key is not None
                top.items.append((top.key, node))
            else:
                top.items.append(node)
            p = ws(s, node[2]).end()  # type: ignore[union-attr]
            if p < n and s[p] == ",":
                p = ws(s, p + 1).end()  # type: ignore[union-attr]
                break
            if p < n and s[p] == ("}" if top.is_obj else "]"):
                frames.pop()
                if not frames:
                    return top.items, p + 1
                node = (
                    (_OBJ, top.start, p + 1, ()) if top.is_obj else (_ARR, top.start, p + 1, tuple(top.items))
                )
                continue
            raise _Malformed(
                p, "expected ',' or '}' after a member" if top.is_obj else "expected ',' or ']' in an array"
            )


def _decode_string(lexeme: str) -> str:
    """The value of a lexeme matched by ``_JSON_STRING`` (always valid JSON)."""
    if "\\" not in lexeme:
        return lexeme[1:-1]
    value = json.loads(lexeme)
    assert isinstance(value, str)
    return value


_GEOM_KEYS = {"bbox_2d": GeometryKind.BBOX, "poly": GeometryKind.POLY}
_ALLOWED_KEYS = ("desc", "bbox_2d", "poly")

LiteralBin = Callable[[int, int], int | None]
"""Token check of a coord literal at absolute chars ``[start, end)``: its bin, or None if it is not
exactly one coord id (stage2.md §3.5 row 8). Salvage and strict pass none (the text decides)."""


@attrs.frozen
class RecordVerdict:
    """The record validator's answer for one complete record (data.md §5.6).

    ``reason`` is None for a valid record. Spans are absolute character offsets in the scanned text.
    ``desc``, ``kind`` and ``bins`` are set for valid records; ``desc_value_span`` whenever the desc is a string.
    """

    reason: DropReason | None
    detail: str
    desc: str | None = None
    kind: GeometryKind | None = None
    bins: tuple[int, ...] = ()
    literal_spans: tuple[tuple[int, int], ...] = ()
    desc_value_span: tuple[int, int] | None = None

    def to_object(self) -> DetObject:
        if self.reason is not None or self.desc is None or self.kind is None:
            raise InvariantViolation(f"a dropped record ({self.reason}) has no object")
        return DetObject(self.desc, self.kind, self.bins)


def _expected_keys(geom: str, field_order: FieldOrder) -> tuple[str, str]:
    return ("desc", geom) if field_order is FieldOrder.DESC_FIRST else (geom, "desc")


def _validate_record(
    text: str,
    start: int,
    end: int,
    field_order: FieldOrder,
    coord_mode: CoordMode,
    literal_bin: LiteralBin | None,
) -> RecordVerdict:
    """Rows 1–10 of data.md §5.6 on the complete record ``text[start:end]``; the first failing row wins."""
    s = text[start:end]
    try:
        members, stop = _parse_record(s, 0)
        if stop != len(s):
            raise _Malformed(stop, "unexpected text before the record's closing '}'")
    except _Malformed as exc:
        return RecordVerdict(DropReason.OTHER, f"malformed record at char {start + exc.pos}: {exc.what}")
    keys: list[str] = []
    values: dict[str, _Node] = {}
    for key_node, value in members:
        key = s[key_node[1] + 1 : key_node[2] - 1]
        if "\\" in key:
            key = _decode_string(s[key_node[1] : key_node[2]])
        if key not in _ALLOWED_KEYS:
            return RecordVerdict(
                DropReason.UNEXPECTED_KEYS, f"unexpected key {key!r}; allowed keys are desc, bbox_2d, poly"
            )
        if key in values:
            return RecordVerdict(DropReason.UNEXPECTED_KEYS, f"key {key!r} is repeated")
        keys.append(key)
        values[key] = value
    desc_node = values.get("desc")
    if desc_node is None:
        return RecordVerdict(DropReason.MISSING_DESC, "missing key desc")
    span = (start + desc_node[1] + 1, start + desc_node[2] - 1) if desc_node[0] == _STR else None
    geoms = [k for k in keys if k in _GEOM_KEYS]
    if not geoms:
        return RecordVerdict(
            DropReason.MISSING_GEOM, "missing geometry key (bbox_2d or poly)", desc_value_span=span
        )
    if len(geoms) > 1:
        return RecordVerdict(
            DropReason.UNEXPECTED_KEYS,
            "both bbox_2d and poly present; exactly one geometry is allowed",
            desc_value_span=span,
        )
    geom = geoms[0]
    expected = _expected_keys(geom, field_order)
    if keys[0] != expected[0]:
        return RecordVerdict(
            DropReason.ORDER_VIOLATION, f"expected keys {expected[0]}, {expected[1]}", desc_value_span=span
        )
    if desc_node[0] != _STR:
        return RecordVerdict(
            DropReason.MISSING_DESC, f"desc must be a string; got {_KIND_NAMES[desc_node[0]]}"
        )
    desc = _decode_string(s[desc_node[1] : desc_node[2]]).strip()
    if not desc:
        return RecordVerdict(
            DropReason.MISSING_DESC, "desc is empty after stripping whitespace", desc_value_span=span
        )
    geom_node = values[geom]
    if geom_node[0] != _ARR:
        return RecordVerdict(
            DropReason.NON_COORD_TOKEN,
            f"{geom} must be a flat array of coord literals; got {_KIND_NAMES[geom_node[0]]}",
            desc_value_span=span,
        )
    bins: list[int] = []
    spans: list[tuple[int, int]] = []
    tokens_mode = coord_mode is CoordMode.TOKENS
    bin_of_token = _BIN_OF_TOKEN.get
    for j, (ikind, istart, iend, _) in enumerate(geom_node[3]):
        lexeme = s[istart:iend]
        k: int | None = None
        if tokens_mode:
            if ikind == _TOK:
                k = bin_of_token(lexeme)
        elif ikind == _NUM and _CANONICAL_BIN.fullmatch(lexeme) is not None:
            k = int(lexeme)
        a, b = start + istart, start + iend
        if k is not None and literal_bin is not None:
            k = literal_bin(a, b)
            if k is None:
                return RecordVerdict(
                    DropReason.NON_COORD_TOKEN,
                    f"{geom}[{j}]: {lexeme!r} is not exactly one coord token id",
                    desc_value_span=span,
                )
        if k is None:
            want = (
                "a bare coord token <|coord_k|> with k in 0..999" if tokens_mode else "a bare integer 0..999"
            )
            return RecordVerdict(
                DropReason.NON_COORD_TOKEN,
                f"{geom}[{j}]: {lexeme[:40]!r} is not {want}",
                desc_value_span=span,
            )
        bins.append(k)
        spans.append((a, b))
    kind = _GEOM_KEYS[geom]
    n = len(bins)
    if kind is GeometryKind.BBOX:
        if n != 4:
            return RecordVerdict(
                DropReason.WRONG_ARITY,
                f"bbox_2d must contain exactly 4 values; got len={n}",
                desc_value_span=span,
            )
        if bins[2] < bins[0] or bins[3] < bins[1]:
            return RecordVerdict(
                DropReason.BBOX_INVALID,
                f"bbox_2d requires x2 >= x1 and y2 >= y1; got {bins}",
                desc_value_span=span,
            )
    elif n % 2 or n < 6:
        return RecordVerdict(
            DropReason.WRONG_ARITY,
            f"poly must contain an even number of values and at least 6; got len={n}",
            desc_value_span=span,
        )
    return RecordVerdict(None, "", desc, kind, tuple(bins), tuple(spans), span)


@attrs.frozen
class RecordScan:
    """One record seen inside the array: chars ``[start, end)``; ``end == -1`` if it never closes."""

    index: int
    start: int
    end: int
    commas_before: int
    verdict: RecordVerdict | None  # None when the record never closes (not validated)

    @property
    def complete(self) -> bool:
        return self.end >= 0


@attrs.frozen
class JunkScan:
    """Array-level junk at ``start``, skipped up to ``end``: one ``other`` drop with ``ordinal`` (§5.8.2)."""

    ordinal: int
    start: int
    end: int


@attrs.frozen
class DocumentScan:
    """The shared grammar's view of a text (data.md §5.4 / §5.8, stage2.md §3.2–3.4).

    ``text_end`` is where scanning stopped being possible (the stop cut or the end of the text).
    Character positions are ``-1`` when the thing was not found.
    """

    text_end: int
    had_stop: bool
    container_start: int
    array_open_end: int
    elements: tuple[RecordScan | JunkScan, ...]
    array_close: int
    commas_before_close: int
    container_end: int
    trailing_junk_at: int
    truncated: bool

    @property
    def parse_failed(self) -> bool:
        return self.array_open_end < 0

    @property
    def array_closed(self) -> bool:
        return self.array_close >= 0

    @property
    def trailing_junk(self) -> bool:
        return self.trailing_junk_at >= 0

    @property
    def syntax_error(self) -> bool:
        return any(isinstance(e, JunkScan) for e in self.elements)

    @property
    def records(self) -> tuple[RecordScan, ...]:
        return tuple(e for e in self.elements if isinstance(e, RecordScan))

    @property
    def incomplete_tail(self) -> int:
        last = self.elements[-1] if self.elements else None
        return 1 if isinstance(last, RecordScan) and not last.complete else 0

    def drops(self) -> list[tuple[int, DropReason]]:
        """(ordinal, reason) in appearance order: junk and complete invalid records (not the incomplete tail)."""
        out: list[tuple[int, DropReason]] = []
        for e in self.elements:
            if isinstance(e, JunkScan):
                out.append((e.ordinal, DropReason.OTHER))
            elif e.verdict is not None and e.verdict.reason is not None:
                out.append((e.index, e.verdict.reason))
        return out


def _structural_chars(text: str, pos: int, n: int, stops: re.Pattern[str]) -> Iterator[tuple[int, str]]:
    """Positions and characters matched by ``stops`` outside JSON strings (``stops`` must also match ``"``);
    ends at the end of text or inside an unterminated string. The one string-aware walk of the grammar."""
    while True:
        m = stops.search(text, pos, n)
        if m is None:
            return
        p = m.start()
        c = text[p]
        if c == '"':
            m2 = _STRING_REST.match(text, p + 1, n)
            if m2 is None:
                return
            pos = m2.end()
            continue
        yield p, c
        pos = p + 1


# A record with no ``{`` inside (outside strings) up to its first ``}``: strings as ``_STRING_REST`` reads
# them, possessive so a failing match is linear. Its end is where the depth walk below returns 0.
_FLAT_RECORD_EXTENT = re.compile(r'\{(?:[^{}"]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+\}', re.DOTALL)


def _record_end(text: str, start: int, n: int) -> int:
    """Index after the ``}`` that returns the brace depth to 0 (outside strings), or -1 (data.md §5.8.1)."""
    m = _FLAT_RECORD_EXTENT.match(text, start, n)
    if m is not None:  # the common case, one C match; anything else takes the walk
        return m.end()
    depth = 0
    for p, c in _structural_chars(text, start, n, _BRACE_OR_QUOTE):
        depth += 1 if c == "{" else -1
        if depth == 0:
            return p + 1
    return -1


# The canonical bbox record (either field order, any JSON whitespace, a desc without escapes, four coord
# tokens) in one C match: its extent is the one ``_record_end`` finds (no brace or quote outside the
# desc string), and ``_canonical_verdict`` gives from its groups the verdict ``_validate_record`` gives
# (tests/domain/test_stage2_fast_paths.py holds both equal). Anything else, or a verdict other than
# valid, takes the general path. Tokens mode only.
_COORD_TOKEN_GROUP = r"(<\|coord_(0|[1-9][0-9]{0,2})\|>)"
_CANON_BBOX = (
    rf"\[{_WS_P}{_COORD_TOKEN_GROUP}{_WS_P},{_WS_P}{_COORD_TOKEN_GROUP}{_WS_P},{_WS_P}{_COORD_TOKEN_GROUP}"
    rf"{_WS_P},{_WS_P}{_COORD_TOKEN_GROUP}{_WS_P}\]"
)
_CANON_DESC = r'"([^"\\\x00-\x1f]*)"'
_CANONICAL_RECORD: dict[FieldOrder, re.Pattern[str]] = {
    FieldOrder.DESC_FIRST: re.compile(
        rf'\{{{_WS_P}"desc"{_WS_P}:{_WS_P}{_CANON_DESC}{_WS_P},{_WS_P}"bbox_2d"{_WS_P}:{_WS_P}{_CANON_BBOX}{_WS_P}\}}'
    ),
    FieldOrder.GEOMETRY_FIRST: re.compile(
        rf'\{{{_WS_P}"bbox_2d"{_WS_P}:{_WS_P}{_CANON_BBOX}{_WS_P},{_WS_P}"desc"{_WS_P}:{_WS_P}{_CANON_DESC}{_WS_P}\}}'
    ),
}
# Group numbers (desc, first coord literal) per order; literal j is group first + 2j, its bin first + 2j + 1.
_CANONICAL_GROUPS = {FieldOrder.DESC_FIRST: (1, 2), FieldOrder.GEOMETRY_FIRST: (9, 1)}


def _canonical_verdict(
    m: re.Match[str], field_order: FieldOrder, literal_bin: LiteralBin | None
) -> RecordVerdict | None:
    """The verdict of a record matched by ``_CANONICAL_RECORD[field_order]`` if it is valid, else None."""
    g_desc, g_lit = _CANONICAL_GROUPS[field_order]
    desc = m.group(g_desc).strip()
    if not desc:
        return None
    regs = m.regs  # every group's span, read once
    spans = (regs[g_lit], regs[g_lit + 2], regs[g_lit + 4], regs[g_lit + 6])
    if literal_bin is None:
        bins = tuple(int(m.group(g)) for g in range(g_lit + 1, g_lit + 8, 2))
    else:
        found = [literal_bin(a, b) for a, b in spans]
        if None in found:
            return None
        bins = tuple(found)  # type: ignore[arg-type]
    if bins[2] < bins[0] or bins[3] < bins[1]:
        return None
    return RecordVerdict(None, "", desc, GeometryKind.BBOX, bins, spans, regs[g_desc])


def _skip_junk(text: str, pos: int, n: int) -> int:
    """String-aware skip to the next ``{`` or ``]`` (returned), or -1 at the end of text (data.md §5.8.2).

    Junk never nests: a ``[`` inside junk does not hide the next ``]`` (in ``[[R1, R2]]`` the records are
    read and the first ``]`` closes the array), and a ``{`` inside junk starts the next record.
    """
    for p, _ in _structural_chars(text, pos, n, _JUNK_STOP):
        return p
    return -1


def _scan(
    text: str,
    field_order: FieldOrder,
    coord_mode: CoordMode,
    literal_bin: LiteralBin | None,
    cut_at_stop: bool,
    *,
    validate: bool = True,
) -> DocumentScan:
    """The array-level walk; ``validate=False`` leaves complete records without a verdict (structure only)."""
    n = len(text)
    had_stop = False
    if cut_at_stop:
        m_stop = _STOP.search(text)
        if m_stop is not None:
            had_stop = True
            n = m_stop.start()
    m = _OPENER.search(text, 0, n)
    if m is None:
        return DocumentScan(n, had_stop, -1, -1, (), -1, 0, -1, -1, False)
    elements: list[RecordScan | JunkScan] = []
    n_records = 0
    pos = m.end()
    commas = 0
    array_close = container_end = trailing_junk_at = -1
    truncated = False
    canonical = _CANONICAL_RECORD.get(field_order) if validate and coord_mode is CoordMode.TOKENS else None
    while True:
        m_ws = _WS_COMMA.match(text, pos, n)
        assert m_ws is not None
        if m_ws.end() > pos:
            commas += text.count(",", pos, m_ws.end())
            pos = m_ws.end()
        if pos >= n:
            truncated = True
            break
        c = text[pos]
        if c == "]":
            array_close = pos
            pos = _WS.match(text, pos + 1, n).end()  # type: ignore[union-attr]
            if pos >= n:
                truncated = True
            elif text[pos] == "}":
                container_end = pos + 1
            else:
                trailing_junk_at = pos
            break
        if c == "{":
            fast = canonical.match(text, pos, n) if canonical is not None else None
            if fast is not None:
                verdict = _canonical_verdict(fast, field_order, literal_bin)
                if verdict is not None:
                    elements.append(RecordScan(n_records, pos, fast.end(), commas, verdict))
                    n_records += 1
                    commas = 0
                    pos = fast.end()
                    continue
            end = _record_end(text, pos, n)
            if end < 0:
                elements.append(RecordScan(n_records, pos, -1, commas, None))
                truncated = True
                break
            verdict = (
                _validate_record(text, pos, end, field_order, coord_mode, literal_bin) if validate else None
            )
            elements.append(RecordScan(n_records, pos, end, commas, verdict))
            n_records += 1
            commas = 0
            pos = end
            continue
        skip_to = _skip_junk(text, pos, n)
        elements.append(JunkScan(n_records, pos, n if skip_to < 0 else skip_to))
        commas = 0
        if skip_to < 0:
            truncated = True
            break
        pos = skip_to
    return DocumentScan(
        n,
        had_stop,
        m.start(),
        m.end(),
        tuple(elements),
        array_close,
        commas,
        container_end,
        trailing_junk_at,
        truncated,
    )


def scan_document(
    text: str,
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
    *,
    cut_at_stop: bool = True,
) -> DocumentScan:
    """Scan ``text`` with the shared grammar (never raises on a ``str``).

    With ``cut_at_stop`` the text is first cut at the first ``<|im_end|>`` / ``<|endoftext|>``
    (raw text, quotes ignored). Useful to consumers that need positions, e.g. the closure check
    (``container_end``) of stage2.md §7.3.
    """
    return _scan(text, FieldOrder(field_order), CoordMode(coord_mode), None, cut_at_stop)


# --------------------------------------------------------------------------------------------
# (a) strict transpile
# --------------------------------------------------------------------------------------------


def _strict_error(message: str, record_index: int | None = None, reason: str | None = None) -> CoordJSONError:
    return CoordJSONError(message, record_index=record_index, reason=reason)


def parse_strict(
    text: str,
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> list[DetObject]:
    """Parse a CoordJSON document exactly per data.md §5.1; any deviation raises :class:`CoordJSONError`.

    ``record_index`` and ``reason`` of the error name the record and its drop reason (data.md §5.3).
    """
    field_order, coord_mode = FieldOrder(field_order), CoordMode(coord_mode)
    scan = _scan(text, field_order, coord_mode, None, cut_at_stop=False)
    first = _WS.match(text).end()  # type: ignore[union-attr]
    if first >= len(text):
        raise _strict_error('document is empty; expected {"objects": [...]}')
    if scan.container_start != first:
        if text[first] == "{":
            raise _strict_error('document must contain exactly one key: "objects" (an array of records)')
        raise _strict_error(f"unexpected text before the document at char {first}; expected '{{'")
    objects: list[DetObject] = []
    for e in scan.elements:
        if isinstance(e, JunkScan):
            raise _strict_error(
                f"objects array: unexpected text at char {e.start} after {e.ordinal} record(s); "
                "expected a record, ',' or ']'",
                e.ordinal,
                DropReason.OTHER.value,
            )
        if e.commas_before != (1 if e.index else 0):
            what = "expected ',' before" if e.commas_before == 0 else "unexpected ',' before"
            raise _strict_error(
                f"objects[{e.index}]: {what} the record at char {e.start}", e.index, DropReason.OTHER.value
            )
        if e.verdict is None:
            raise _strict_error(
                f"top-level objects array is truncated: objects[{e.index}] starting at char {e.start} never closes",
                e.index,
            )
        if e.verdict.reason is not None:
            raise _strict_error(
                f"objects[{e.index}] invalid ({e.verdict.reason.value}): {e.verdict.detail}",
                e.index,
                e.verdict.reason.value,
            )
        objects.append(e.verdict.to_object())
    if not scan.array_closed:
        raise _strict_error("top-level objects array is truncated: the text ends before its ']'")
    if scan.commas_before_close:
        raise _strict_error(f"objects array: trailing ',' before the ']' at char {scan.array_close}")
    if scan.trailing_junk:
        if text[scan.trailing_junk_at] == ",":
            raise _strict_error('document must contain exactly one key: "objects"')
        raise _strict_error(
            f"unexpected text after the objects array at char {scan.trailing_junk_at}; expected '}}'"
        )
    if scan.container_end < 0:
        raise _strict_error("top-level objects array is truncated: the document's closing '}' is missing")
    rest = _WS.match(text, scan.container_end).end()  # type: ignore[union-attr]
    if rest != len(text):
        raise _strict_error(f"unexpected text after the document at char {rest}")
    return objects


def transpile_strict(
    text: str,
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> str:
    """The same document as strict JSON with bins as integers and canonical separators (data.md §5.3)."""
    return render(parse_strict(text, field_order, coord_mode), field_order, CoordMode.NUMERIC)


# --------------------------------------------------------------------------------------------
# (b) salvage
# --------------------------------------------------------------------------------------------


@attrs.frozen
class SalvageResult:
    """What salvage recovers from a model output (data.md §5.4, §5.8)."""

    objects: tuple[DetObject, ...]
    drops: tuple[tuple[int, DropReason], ...]
    incomplete_tail: int
    truncated: bool
    parse_failed: bool
    trailing_junk: bool
    had_stop: bool
    syntax_error: bool
    array_closed: bool
    field_order: FieldOrder
    coord_mode: CoordMode

    @property
    def canonical_text(self) -> str:
        """Canonical serialisation of the valid objects (``{"objects": []}`` when none)."""
        return render(self.objects, self.field_order, self.coord_mode)


def salvage(
    text: str,
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> SalvageResult:
    """Recover the valid records of any string, in order, with drop reasons; never raises (D2b)."""
    field_order, coord_mode = FieldOrder(field_order), CoordMode(coord_mode)
    scan = _scan(text, field_order, coord_mode, None, cut_at_stop=True)
    objects = tuple(
        e.verdict.to_object()
        for e in scan.elements
        if isinstance(e, RecordScan) and e.verdict is not None and e.verdict.reason is None
    )
    return SalvageResult(
        objects=objects,
        drops=tuple(scan.drops()),
        incomplete_tail=scan.incomplete_tail,
        truncated=scan.truncated,
        parse_failed=scan.parse_failed,
        trailing_junk=scan.trailing_junk,
        had_stop=scan.had_stop,
        syntax_error=scan.syntax_error,
        array_closed=scan.array_closed,
        field_order=field_order,
        coord_mode=coord_mode,
    )


# --------------------------------------------------------------------------------------------
# (c) token-aligned scanner (stage2.md §3)
# --------------------------------------------------------------------------------------------


class RecordStatus(str, enum.Enum):
    VALID = "valid"
    DROPPED = "dropped"


@attrs.frozen
class ScannedRecord:
    """One record seen by the token scanner (stage2.md §3.1).

    ``reason``: a :class:`DropReason`, or :data:`INCOMPLETE_TAIL` for a record that never closes, or None.
    ``parse_reason``: the grammar's verdict before any cut fallback (a valid record moved out of the
    prefix by a fallback has ``reason == other`` but ``parse_reason is None``).
    ``coord_token_groups`` holds, per coord literal, the indices into the input ``ids`` of the tokens
    that spell it (exactly one coord id in tokens mode; every token overlapping its digits in numeric
    mode); ``coord_token_indices`` is their concatenation. For records in the prefix they index
    ``prefix_ids`` too (earlier ids are never modified; in numeric mode a digit fused into the
    re-tokenised last token is the exception). ``bins`` come from the token ids in tokens mode.
    """

    record_index: int
    char_span: tuple[int, int]
    status: RecordStatus
    reason: str | None
    parse_reason: str | None
    desc: str | None
    geom_type: GeometryKind | None
    bins: tuple[int, ...]
    coord_token_indices: tuple[int, ...]
    coord_token_groups: tuple[tuple[int, ...], ...]
    desc_value_span: tuple[int, int] | None
    in_prefix: bool

    @property
    def is_valid(self) -> bool:
        return self.status is RecordStatus.VALID

    def to_object(self) -> DetObject:
        if self.desc is None or self.geom_type is None:
            raise InvariantViolation(f"record {self.record_index} ({self.reason}) has no object")
        return DetObject(self.desc, self.geom_type, self.bins)


@attrs.frozen
class ScanResult:
    """Everything salvage returns plus token positions and the append-ready prefix (stage2.md §3.1)."""

    prefix_ids: tuple[int, ...]
    prefix_text: str
    prefix_offsets: tuple[int, ...]  # char start of each prefix token, then len(prefix_text)
    records: tuple[ScannedRecord, ...]
    n_prefix_records: int
    valid_objects: tuple[DetObject, ...]
    drops: tuple[tuple[int, DropReason], ...]
    drop_counts: Mapping[str, int]
    parse_failed: bool
    truncated: bool
    syntax_error: bool
    array_closed: bool
    trailing_junk: bool
    cut_fallback: bool
    had_stop: bool
    incomplete_tail: int
    used_fallback_prefix: bool
    # What the scanner's own §3.6.4 check passed on: (prefix_text, n_prefix_records, field_order,
    # coord_mode), or None. append_fn_records skips the identical §7.2.4 re-check when it matches.
    append_ready_checked: tuple[str, int, FieldOrder, CoordMode] | None = None

    @property
    def invalid_rollout(self) -> bool:
        """stage2.md §3.7: no container, or no complete record and the array never closed."""
        return self.parse_failed or (self.n_prefix_records == 0 and not self.array_closed)

    def parsed_objects(self) -> list[DetObject]:
        """Objects the grammar accepted, including those a cut fallback moved out of the prefix.

        This is the list that equals ``salvage(decode(ids)).objects`` (infer-eval-config.md §2.8.3).
        """
        return [r.to_object() for r in self.records if r.parse_reason is None and r.char_span[1] >= 0]


def _fallback_prefix(
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str] | None,
) -> tuple[tuple[int, ...], str, tuple[int, ...]]:
    try:
        ids = tuple(int(t) for t in encode(CONTAINER_OPENER))
    except Exception:  # noqa: BLE001 - the scanner never raises (stage2.md §3.6.3)
        ids = ()
    pieces: list[str] | None = None
    if decode is not None:
        try:
            pieces = [decode([t]) for t in ids]
        except Exception:  # noqa: BLE001
            pieces = None
    if pieces is None:
        # Without a decode the pieces are unknown: the ids are taken to spell the opener.
        return ids, CONTAINER_OPENER, tuple([0] * len(ids) + [len(CONTAINER_OPENER)])
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    return ids, "".join(pieces), tuple(offsets)


def check_append_ready(
    prefix_text: str,
    n_prefix_records: int,
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> None:
    """Post-conditions of stage2.md §3.6.4 (precondition of §7.2.4); raises :class:`InvariantViolation`.

    Re-scanning ``prefix_text`` finds the container, exactly ``n_prefix_records`` complete records, and
    ends at array level (outside records and strings, array open) right after the last record's ``}``
    or the opener's ``[``.
    """
    # Structure only: record boundaries, junk and the array state; verdicts are not part of §3.6.4.
    scan = _scan(
        prefix_text, FieldOrder(field_order), CoordMode(coord_mode), None, cut_at_stop=False, validate=False
    )
    problems: list[str] = []
    if scan.parse_failed:
        problems.append("no container opener")
    else:
        records = scan.records
        complete = [r for r in records if r.complete]
        if len(complete) != n_prefix_records:
            problems.append(f"{len(complete)} complete records, expected {n_prefix_records}")
        if len(complete) != len(records):
            problems.append("ends inside a record")
        if scan.array_closed:
            problems.append("the array is closed")
        if scan.elements and isinstance(scan.elements[-1], JunkScan):
            problems.append("ends in array-level junk")
        last_end = complete[-1].end if complete else scan.array_open_end
        if last_end != len(prefix_text):
            problems.append(f"text continues after char {last_end}")
        want = "}" if n_prefix_records > 0 else "["
        if not prefix_text.endswith(want):
            problems.append(f"last char is {prefix_text[-1:]!r}, expected {want!r}")
    if problems:
        raise InvariantViolation(f"prefix not append-ready ({'; '.join(problems)}): {prefix_text[-80:]!r}")


_COORD_ID_SETS: weakref.WeakKeyDictionary[CoordIdTable, frozenset[int]] = weakref.WeakKeyDictionary()
_COORD_BINS: weakref.WeakKeyDictionary[CoordIdTable, dict[int, int]] = weakref.WeakKeyDictionary()


def _coord_bins(coord_ids: CoordIdTable) -> dict[int, int]:
    """id -> bin of a coord table (``coord_ids.bin_of`` for int ids), built once per table."""
    table = _COORD_BINS.get(coord_ids)
    if table is None:
        table = _COORD_BINS[coord_ids] = {i: k for k, i in enumerate(coord_ids.ids)}
    return table


def _prefix_is_append_ready(doc: DocumentScan, cut: int, k: int) -> bool:
    """True when ``doc`` (a scan of some ``text``) shows that ``text[:cut]`` passes :func:`check_append_ready`
    with ``k`` records: the elements starting before ``cut`` end with the ``k``-th complete record, ending
    at ``cut`` (with ``k == 0``: no element, and ``cut`` is the opener's end). The array-level walk reads a
    text left to right and each step stops before ``cut``, so re-scanning ``text[:cut]`` sees exactly those
    elements (tests/domain/test_stage2_fast_paths.py holds this against the re-scan). False means "not
    shown", not "not ready": the caller re-scans.
    """
    if doc.parse_failed:
        return False
    if k == 0:
        return cut == doc.array_open_end and (not doc.elements or doc.elements[0].start >= cut)
    n_records = 0
    last: RecordScan | JunkScan | None = None
    for e in doc.elements:
        if e.start >= cut:
            break
        if isinstance(e, RecordScan):
            if e.end < 0:
                return False
            n_records += 1
        last = e
    return isinstance(last, RecordScan) and last.end == cut and n_records == k


def scan_tokens(
    ids: Sequence[int],
    pieces: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    coord_ids: CoordIdTable,
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
    stop_ids: AbstractSet[int] = frozenset(),
    *,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> ScanResult:
    """Token-aligned scan of a rollout (stage2.md §3, data.md §5.5). Never raises on any ids.

    ``pieces[i]`` is ``decode([ids[i]])`` (special tokens kept, no clean-up). ``encode`` is used only
    for a token-internal cut and the fallback prefix. ``decode`` (a whole-sequence decode with
    special tokens kept) verifies a re-tokenised last token; without it, the replacement is accepted
    only if every new id is one of this rollout's ids with a known piece (otherwise ``cut_fallback``).
    """
    field_order, coord_mode = FieldOrder(field_order), CoordMode(coord_mode)
    n_ids = len(ids)
    if len(pieces) != n_ids:
        raise InvariantViolation(
            f"scan_tokens: {n_ids} ids but {len(pieces)} pieces; pass decode([id]) per id"
        )
    ids = list(map(int, ids))
    starts = list(itertools.accumulate(map(len, pieces), initial=0))
    full = "".join(pieces)

    # Hard stop (§3.2): the first stop text or stop id, whichever comes first.
    stop = len(full)
    had_stop = False
    m_stop = _STOP.search(full)
    if m_stop is not None:
        stop, had_stop = m_stop.start(), True
    if stop_ids:
        # The first id that is a stop id (``list.index`` per stop id, in C).
        first = min((ids.index(t) for t in stop_ids if t in ids), default=-1)
        if first >= 0:
            had_stop = True
            stop = min(stop, starts[first])
    text = full[:stop]

    # Chars [a, b) spelled by exactly token i: found once by the token check, read again by token_groups
    # (whose walk gives (i,) for such a span).
    single_token: dict[tuple[int, int], int] = {}
    bisect_right = bisect.bisect_right
    bin_of = _coord_bins(coord_ids).get  # coord_ids.bin_of on ints, without the method call

    def bin_of_literal(a: int, b: int) -> int | None:
        i = bisect_right(starts, a) - 1
        if i < 0 or i >= n_ids or starts[i] != a or starts[i + 1] != b:
            return None
        single_token[a, b] = i
        return bin_of(ids[i])

    literal_bin = bin_of_literal if coord_mode is CoordMode.TOKENS else None
    doc = _scan(text, field_order, coord_mode, literal_bin, cut_at_stop=False)

    def realise(cut: int) -> tuple[tuple[int, ...], str, tuple[int, ...]] | None:
        """Prefix ids ending exactly at char ``cut`` (§3.6.2), or None if the re-tokenisation fails."""
        i = bisect.bisect_right(starts, cut - 1) - 1
        if starts[i + 1] == cut:
            return tuple(ids[: i + 1]), text[:cut], tuple(starts[: i + 2])
        sub = pieces[i][: cut - starts[i]]
        try:
            new = [int(t) for t in encode(sub)]
            if decode is not None:
                new_pieces: list[str | None] = [decode([t]) for t in new]
                if decode(new) != sub:
                    return None
            else:
                known = dict(zip(ids, pieces))
                new_pieces = [known.get(t) for t in new]
        except Exception:  # noqa: BLE001 - the scanner never raises (stage2.md §3.6.3)
            return None
        if not new or any(p is None for p in new_pieces) or "".join(p or "" for p in new_pieces) != sub:
            return None
        offsets = list(starts[: i + 1])
        for p in new_pieces:
            offsets.append(offsets[-1] + len(p or ""))
        return tuple(ids[:i]) + tuple(new), text[:cut], tuple(offsets)

    complete = [r for r in doc.records if r.complete]
    cut_fallback = False
    used_fallback_prefix = False
    checked: tuple[str, int, FieldOrder, CoordMode] | None = None
    k = len(complete)
    if doc.parse_failed:
        prefix_ids, prefix_text, offsets = _fallback_prefix(encode, decode)
        used_fallback_prefix = True
        k = 0
    else:
        while True:
            realised = realise(complete[k - 1].end if k else doc.array_open_end)
            if realised is not None:
                prefix_ids, prefix_text, offsets = realised
                break
            cut_fallback = True
            if k == 0:
                prefix_ids, prefix_text, offsets = _fallback_prefix(encode, decode)
                used_fallback_prefix = True
                break
            k -= 1
        if not used_fallback_prefix:
            # §3.6.4: shown by the scan itself when it can be (the prefix is text[:cut]), else re-scanned.
            if prefix_text != text[: len(prefix_text)] or not _prefix_is_append_ready(
                doc, len(prefix_text), k
            ):
                check_append_ready(prefix_text, k, field_order, coord_mode)
            checked = (prefix_text, k, field_order, coord_mode)
    in_prefix = {r.index for r in complete[:k]}

    def token_groups(spans: tuple[tuple[int, int], ...]) -> tuple[tuple[int, ...], ...]:
        groups: list[tuple[int, ...]] = []
        for a, b in spans:
            one = single_token.get((a, b))
            if one is not None:
                groups.append((one,))
                continue
            group: list[int] = []
            i = bisect.bisect_right(starts, a) - 1
            while i < n_ids and starts[i] < b:
                if starts[i + 1] > a:
                    group.append(i)
                i += 1
            groups.append(tuple(group))
        return tuple(groups)

    records: list[ScannedRecord] = []
    drops: list[tuple[int, DropReason]] = []
    counts: dict[str, int] = {}
    valid: list[DetObject] = []
    for e in doc.elements:
        if isinstance(e, JunkScan):
            drops.append((e.ordinal, DropReason.OTHER))
            counts[DropReason.OTHER.value] = counts.get(DropReason.OTHER.value, 0) + 1
            continue
        v = e.verdict
        if v is None:
            counts[INCOMPLETE_TAIL] = counts.get(INCOMPLETE_TAIL, 0) + 1
            records.append(
                ScannedRecord(
                    e.index,
                    (e.start, -1),
                    RecordStatus.DROPPED,
                    INCOMPLETE_TAIL,
                    INCOMPLETE_TAIL,
                    None,
                    None,
                    (),
                    (),
                    (),
                    None,
                    False,
                )
            )
            continue
        inside = e.index in in_prefix
        reason: DropReason | None = v.reason
        if reason is None and not inside:
            reason = DropReason.OTHER  # moved out of the prefix by a cut fallback (§3.6.3)
        if reason is not None:
            drops.append((e.index, reason))
            counts[reason.value] = counts.get(reason.value, 0) + 1
        groups: tuple[tuple[int, ...], ...] = ()
        if v.reason is None:
            try:  # every literal one token (the token check found it): no walk
                groups = tuple([(single_token[span],) for span in v.literal_spans])
            except KeyError:
                groups = token_groups(v.literal_spans)
        rec = ScannedRecord(
            e.index,
            (e.start, e.end),
            RecordStatus.VALID if reason is None else RecordStatus.DROPPED,
            None if reason is None else reason.value,
            None if v.reason is None else v.reason.value,
            v.desc,
            v.kind,
            v.bins,
            tuple(itertools.chain.from_iterable(groups)),
            groups,
            v.desc_value_span,
            inside,
        )
        records.append(rec)
        if reason is None:
            valid.append(DetObject(v.desc, v.kind, v.bins))  # type: ignore[arg-type]  # v.to_object(): valid
    return ScanResult(
        prefix_ids=prefix_ids,
        prefix_text=prefix_text,
        prefix_offsets=offsets,
        records=tuple(records),
        n_prefix_records=k,
        valid_objects=tuple(valid),
        drops=tuple(drops),
        drop_counts=counts,
        parse_failed=doc.parse_failed,
        truncated=doc.truncated,
        syntax_error=doc.syntax_error,
        array_closed=doc.array_closed,
        trailing_junk=doc.trailing_junk,
        cut_fallback=cut_fallback,
        had_stop=had_stop,
        incomplete_tail=doc.incomplete_tail,
        used_fallback_prefix=used_fallback_prefix,
        append_ready_checked=checked,
    )


# --------------------------------------------------------------------------------------------
# FN injection (D3, data.md §5.7, stage2.md §7.2)
# --------------------------------------------------------------------------------------------


def fn_injection_typed(
    n_prefix_records: int,
    missed_objects: Sequence[DetObject],
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> tuple[str, list[CharSpan]]:
    """The appended fragment (without the turn terminator) and its DESC / COORD spans, fragment-relative."""
    w = _TypedWriter()
    if missed_objects and n_prefix_records > 0:
        w.fmt(", ")
    w.records(missed_objects, FieldOrder(field_order), CoordMode(coord_mode))
    w.fmt("]}")
    return w.text(), w.spans


def fn_injection_text(
    n_prefix_records: int,
    missed_objects: Sequence[DetObject],
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
) -> str:
    """``]}``; or ``, {..}, {..}]}`` after >= 1 prefix record; or ``{..}, {..}]}`` after ``[`` (data.md §5.7)."""
    return fn_injection_typed(n_prefix_records, missed_objects, field_order, coord_mode)[0]


@attrs.frozen
class FnInjection:
    """``Y_train = prefix_ids + append_ids`` (assistant content without the terminator, stage2.md §7.2).

    ``spans`` are DESC / COORD character spans of ``fragment_text``; ``fn_record_indices`` the FN records'
    indices in the array; ``fn_coord_groups`` (tokens mode, when ``coord_ids`` is given) the positions in
    ``append_ids`` of each FN record's coord ids.
    """

    fragment_text: str
    append_ids: tuple[int, ...]
    y_train_ids: tuple[int, ...]
    spans: tuple[CharSpan, ...]
    fn_record_indices: tuple[int, ...]
    fn_coord_groups: tuple[tuple[int, ...], ...]


def append_fn_records(
    scan: ScanResult,
    missed_objects: Sequence[DetObject],
    encode: Callable[[str], Sequence[int]],
    field_order: FieldOrder = FieldOrder.DESC_FIRST,
    coord_mode: CoordMode = CoordMode.TOKENS,
    *,
    coord_ids: CoordIdTable | None = None,
) -> FnInjection:
    """Append the missed GT records to the scan's prefix (D3); the fragment is tokenised on its own.

    Raises :class:`InvariantViolation` if the prefix is not append-ready (§7.2.4) or, with ``coord_ids``
    in tokens mode, if the fragment's coord-id count differs from the serialised count (§7.2.6).
    """
    field_order, coord_mode = FieldOrder(field_order), CoordMode(coord_mode)
    # §7.2.4 is §3.6.4 again: skipped only when the scanner checked these very values.
    if scan.append_ready_checked != (scan.prefix_text, scan.n_prefix_records, field_order, coord_mode):
        check_append_ready(scan.prefix_text, scan.n_prefix_records, field_order, coord_mode)
    fragment, spans = fn_injection_typed(scan.n_prefix_records, missed_objects, field_order, coord_mode)
    append_ids = tuple(map(int, encode(fragment)))
    groups: list[tuple[int, ...]] = []
    if coord_ids is not None and coord_mode is CoordMode.TOKENS:
        coord_set = _COORD_ID_SETS.get(coord_ids)  # is_coord_id of each id, one set lookup each
        if coord_set is None:
            coord_set = _COORD_ID_SETS[coord_ids] = frozenset(coord_ids.ids)
        positions = [j for j, t in enumerate(append_ids) if t in coord_set]
        expected = sum(len(o.bins) for o in missed_objects)
        if len(positions) != expected:
            raise InvariantViolation(
                f"FN fragment tokenises to {len(positions)} coord ids, {expected} serialised: {fragment[:120]!r}"
            )
        at = 0
        for o in missed_objects:
            groups.append(tuple(positions[at : at + len(o.bins)]))
            at += len(o.bins)
    first = scan.n_prefix_records
    return FnInjection(
        fragment_text=fragment,
        append_ids=append_ids,
        y_train_ids=tuple(scan.prefix_ids) + append_ids,
        spans=tuple(spans),
        fn_record_indices=tuple(range(first, first + len(missed_objects))),
        fn_coord_groups=tuple(groups),
    )
