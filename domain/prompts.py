"""Prompt texts and chat messages (data.md §6.1, §6.2): one pure builder for training, rollout and inference.

The system text describes CoordJSON exactly as D1 does. It is a function of
``(prompt.variant, data.coord_mode, data.ordering, data.field_order)``; ``prompt.system`` /
``prompt.user`` replace the built text verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from domain.errors import ConfigError
from domain.objects import CoordMode, FieldOrder, Ordering

DEFAULT_USER_TEXT = "Detect every object in this image."


@attrs.frozen
class PromptTexts:
    """The system and user texts of one detection conversation."""

    system: str
    user: str


@attrs.frozen
class PromptVariant:
    """A registered prompt variant. ``allows_poly`` is False when the text only describes boxes."""

    name: str
    allows_poly: bool


PROMPT_VARIANTS: Mapping[str, PromptVariant] = {
    "default": PromptVariant(name="default", allows_poly=True),
    "bbox_only": PromptVariant(name="bbox_only", allows_poly=False),
}


def registered_variants() -> tuple[str, ...]:
    return tuple(sorted(PROMPT_VARIANTS))


def get_variant(name: str) -> PromptVariant:
    """The registered variant called ``name``; an unknown name is a config error listing the registered ones."""
    variant = PROMPT_VARIANTS.get(name)
    if variant is None:
        raise ConfigError(
            f"prompt.variant: unknown variant {name!r}; registered variants: {list(registered_variants())}"
        )
    return variant


# --- the pieces of the system text (one line each; lines 2 to 5 vary with the settings) ---------------

_INTRO = (
    "You are an object detector. Find every object in the image and answer with one line of JSON "
    "and nothing else."
)
_EXAMPLE_BINS = (12, 40, 300, 410)
_BOX_CLAUSE = '"bbox_2d" is a box [x1, y1, x2, y2] with x1 < x2 and y1 < y2'
_POLY_CLAUSE = (
    '"poly" is a flat list [x1, y1, x2, y2, ...] of at least 3 vertices, starting at the top-most '
    "(then left-most) vertex and going clockwise"
)
_EDGES = "0 is the left or top edge of the image and 999 the right or bottom edge."
_SORTED_BOX = "by (y1, x1) for a box"
_SORTED_POLY = "by the smallest (y, x) over its vertices for a polygon"
_CLOSING = (
    'Use ", " between items and ": " after keys. "desc" is a short English name; use "unknown" if unsure. '
    'If there is no object, answer {"objects": []}.'
)


def _coord_literal(bin_value: int, coord_mode: CoordMode) -> str:
    return f"<|coord_{bin_value}|>" if coord_mode is CoordMode.TOKENS else str(bin_value)


def _format_line(coord_mode: CoordMode, field_order: FieldOrder) -> str:
    coords = ", ".join(_coord_literal(b, coord_mode) for b in _EXAMPLE_BINS)
    desc = '"desc": "cat"'
    geometry = f'"bbox_2d": [{coords}]'
    fields = (desc, geometry) if field_order is FieldOrder.DESC_FIRST else (geometry, desc)
    return 'Format: {"objects": [{' + ", ".join(fields) + "}]}"


def _record_line(field_order: FieldOrder, allows_poly: bool) -> str:
    if field_order is FieldOrder.DESC_FIRST:
        lead = 'Each record has "desc" first, then exactly one geometry'
    else:
        lead = 'Each record has exactly one geometry first, then "desc"'
    clauses = f"{_BOX_CLAUSE}; {_POLY_CLAUSE}" if allows_poly else _BOX_CLAUSE
    return f"{lead}: {clauses}."


def _coordinate_line(coord_mode: CoordMode) -> str:
    if coord_mode is CoordMode.TOKENS:
        what = "one token from <|coord_0|> to <|coord_999|>"
    else:
        what = "a plain integer from 0 to 999"
    return f"Every coordinate is {what}, written without quotes; {_EDGES}"


def _ordering_line(ordering: Ordering, allows_poly: bool) -> str:
    if ordering is Ordering.RANDOM:
        return "Objects may be listed in any order."
    rules = f"{_SORTED_BOX}, {_SORTED_POLY}" if allows_poly else _SORTED_BOX
    return f"List objects from top to bottom, then left to right: {rules}."


def _enum(kind: type[Any], value: object, key: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = [m.value for m in kind]
        raise ConfigError(f"{key}: expected one of {allowed}, got {value!r}") from None


def _override(value: str | None, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: an override must be a non-empty string (or null to use the built text)")
    return value


def build_prompt(
    variant: str,
    coord_mode: CoordMode | str,
    ordering: Ordering | str,
    field_order: FieldOrder | str,
    system_override: str | None = None,
    user_override: str | None = None,
) -> PromptTexts:
    """The system and user texts for these settings (data.md §6.1); overrides replace them verbatim."""
    spec = get_variant(variant)
    mode: CoordMode = _enum(CoordMode, coord_mode, "data.coord_mode")
    order: Ordering = _enum(Ordering, ordering, "data.ordering")
    fields: FieldOrder = _enum(FieldOrder, field_order, "data.field_order")
    system = _override(system_override, "prompt.system")
    user = _override(user_override, "prompt.user")
    if system is None:
        system = "\n".join(
            (
                _INTRO,
                _format_line(mode, fields),
                _record_line(fields, spec.allows_poly),
                _coordinate_line(mode),
                _ordering_line(order, spec.allows_poly),
                _CLOSING,
            )
        )
    return PromptTexts(system=system, user=DEFAULT_USER_TEXT if user is None else user)


def chat_messages(texts: PromptTexts, image: str, assistant: str | None = None) -> list[dict[str, Any]]:
    """The single-turn conversation of data.md §6.2: explicit system, user = image first then text.

    The image value sits under the key equal to its type (``"image"``); frameworks silently drop an
    image stored under any other key. ``assistant`` is the CoordJSON target (training only).
    """
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": texts.system},
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": texts.user}],
        },
    ]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages
