"""Strict JSON / JSONL artifacts on the file system (data.md §1.1, infer-eval-config.md §4.1, D15, D16).

There is no lenient reader: a malformed line raises ``ArtifactError`` naming the path, the 1-based
physical line and the first 200 characters of the line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from adapters.storage.atomic import (
    make_staging_directory,
    naming,
    replace_atomically,
    write_bytes_atomically,
    write_lines_atomically,
    write_text_atomically,
)
from domain.errors import ArtifactError
from domain.records import parse_artifact_lines
from ports.storage import NumberedLine, NumberedRecord

SNIPPET_CHARS = 200


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """At most ``limit`` characters of ``text``, with ``…`` appended when it was cut."""
    return text if len(text) <= limit else text[:limit] + "…"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str, *, exact_numbers: bool = False) -> Any:
    """``json.loads`` without NaN/Infinity; with ``exact_numbers`` floats become ``Decimal``. A document nested
    deeper than the decoder's recursion limit is a ``ValueError`` like any other malformed JSON."""
    try:
        if exact_numbers:
            return json.loads(text, parse_constant=_reject_constant, parse_float=Decimal)
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def not_utf8_reason(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 ({exc.reason} at byte {exc.start})"


def iter_physical_lines(path: Path, *, report_encoding: bool = False) -> Iterator[NumberedLine]:
    """Every physical line of a UTF-8 file, numbered from 1; ``\\n`` and a trailing ``\\r`` are removed.

    A line that is not UTF-8 raises ArtifactError, or with ``report_encoding`` comes back as
    ``NumberedLine(number, "", problem)`` so that the reader goes on.
    """
    if not Path(path).is_file():
        raise ArtifactError(f"artifact not found: {path}")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            data = raw.rstrip(b"\n")
            if data.endswith(b"\r"):
                data = data[:-1]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                if report_encoding:
                    yield NumberedLine(number, "", not_utf8_reason(exc))
                    continue
                raise ArtifactError(f"Malformed JSONL at {path}:{number}: {not_utf8_reason(exc)}") from None
            yield NumberedLine(number, text)


def iter_jsonl_records(path: Path) -> Iterator[NumberedRecord]:
    """Strictly read a JSONL file: blank lines skipped (but counted), every other line a JSON object
    (the rule is ``domain.records.parse_artifact_lines``)."""
    lines = ((line.number, line.text) for line in iter_physical_lines(path))
    for number, value in parse_artifact_lines(lines, str(path)):
        yield NumberedRecord(number, value)


def read_json_file(path: Path, *, exact_numbers: bool = False) -> Any:
    """A whole JSON document; with ``exact_numbers`` every non-integer number is a ``Decimal``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return loads_strict(text, exact_numbers=exact_numbers)
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"Malformed JSON at {path}:{exc.lineno}:{exc.colno}: {exc.msg}; "
            f"near: {snippet(text[max(0, exc.pos - 40):exc.pos + 40])}"
        ) from None
    except ValueError as exc:
        raise ArtifactError(f"Malformed JSON at {path}: {exc}") from None


def dumps_artifact(value: object) -> str:
    """The JSON text of a small artifact file: indented, sorted keys, non-ASCII kept, newline-terminated."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


class FileArtifactStore:
    """:class:`ports.storage.ArtifactStore` on the local file system."""

    def write_text(self, path: Path, text: str) -> None:
        write_text_atomically(path, text)

    def make_staging_directory(self, parent: Path, *, prefix: str, suffix: str = "") -> Path:
        return make_staging_directory(parent, prefix=prefix, suffix=suffix)

    def write_bytes(self, path: Path, data: bytes) -> None:
        write_bytes_atomically(path, data)

    def write_json(self, path: Path, value: object) -> None:
        write_text_atomically(path, dumps_artifact(value))

    def write_lines(self, path: Path, lines: Iterable[str]) -> None:
        write_lines_atomically(path, lines)

    def append_lines(self, path: Path, lines: Iterable[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "ab") as handle:
                handle.writelines(line.encode("utf-8") + b"\n" for line in lines)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise naming(exc, path) from exc

    def read_lines(self, path: Path) -> Iterator[NumberedLine]:
        return iter_physical_lines(path)

    def read_data_lines(self, path: Path) -> Iterator[NumberedLine]:
        return iter_physical_lines(path, report_encoding=True)

    def read_jsonl(self, path: Path) -> Iterator[NumberedRecord]:
        return iter_jsonl_records(path)

    def read_json(self, path: Path, *, exact_numbers: bool = False) -> Any:
        return read_json_file(path, exact_numbers=exact_numbers)

    def replace(self, source: Path, destination: Path) -> None:
        replace_atomically(source, destination)

    def sha256(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
