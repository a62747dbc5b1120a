"""Typed readers for JSON read back through ``ArtifactStore.read_json`` (a ``JsonValue``).

Each reader narrows to one shape or raises ``TypeError``: the numeric readers with the message of the
built-in they stand for (``float(None)``, ``int([])``), so a caller that turns ``TypeError`` /
``ValueError`` into its own located error keeps doing so, with the same text, for malformed input.
"""

from __future__ import annotations

from ports.json_types import JsonValue


def json_object(value: JsonValue) -> dict[str, JsonValue]:
    """``value`` if it is a JSON object, else TypeError."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, not {type(value).__name__!r}")
    return value


def json_array(value: JsonValue) -> list[JsonValue]:
    """``value`` if it is a JSON array, else TypeError."""
    if not isinstance(value, list):
        raise TypeError(f"expected a JSON array, not {type(value).__name__!r}")
    return value


def as_float(value: JsonValue) -> float:
    """``float(value)`` for what ``float`` accepts from JSON (numbers, booleans, numeric strings)."""
    if isinstance(value, (int, float, str)):
        return float(value)
    raise TypeError(f"float() argument must be a string or a real number, not {type(value).__name__!r}")


def as_int(value: JsonValue) -> int:
    """``int(value)`` for what ``int`` accepts from JSON (numbers, booleans, integer strings)."""
    if isinstance(value, (int, float, str)):
        return int(value)
    raise TypeError(
        f"int() argument must be a string, a bytes-like object or a real number, not {type(value).__name__!r}"
    )


def int_counts(value: JsonValue) -> dict[str, int]:
    """A JSON object whose values are all integers (``{code: count}``), else TypeError."""
    counts: dict[str, int] = {}
    for key, count in json_object(value).items():
        if not isinstance(count, int):
            raise TypeError(f"expected an integer count for {key!r}, not {type(count).__name__!r}")
        counts[key] = count
    return counts
