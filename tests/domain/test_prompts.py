"""Prompt builder goldens (data.md §6.1, §11 test 32) and the message shape of §6.2.

The expected texts are written here from the spec's words: the six default lines verbatim, then
each setting's replacement applied to whole lines. Nothing is derived from the implementation.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import ConfigError
from domain.objects import CoordMode, FieldOrder, Ordering
from domain.prompts import (
    DEFAULT_USER_TEXT,
    PromptTexts,
    build_prompt,
    chat_messages,
    get_variant,
    registered_variants,
)

# data.md §6.1, the default system text (tokens, sorted, desc_first), line by line.
L1 = (
    "You are an object detector. Find every object in the image and answer with one line of JSON "
    "and nothing else."
)
L2 = (
    'Format: {"objects": [{"desc": "cat", "bbox_2d": '
    "[<|coord_12|>, <|coord_40|>, <|coord_300|>, <|coord_410|>]}]}"
)
L3 = (
    'Each record has "desc" first, then exactly one geometry: "bbox_2d" is a box [x1, y1, x2, y2] '
    'with x1 < x2 and y1 < y2; "poly" is a flat list [x1, y1, x2, y2, ...] of at least 3 vertices, '
    "starting at the top-most (then left-most) vertex and going clockwise."
)
L4 = (
    "Every coordinate is one token from <|coord_0|> to <|coord_999|>, written without quotes; "
    "0 is the left or top edge of the image and 999 the right or bottom edge."
)
L5 = (
    "List objects from top to bottom, then left to right: by (y1, x1) for a box, by the smallest "
    "(y, x) over its vertices for a polygon."
)
L6 = (
    'Use ", " between items and ": " after keys. "desc" is a short English name; use "unknown" if '
    'unsure. If there is no object, answer {"objects": []}.'
)
DEFAULT_SYSTEM = f"{L1}\n{L2}\n{L3}\n{L4}\n{L5}\n{L6}"


def expected_system(variant: str, coord_mode: str, ordering: str, field_order: str) -> str:
    l2, l3, l4, l5 = L2, L3, L4, L5
    if variant == "bbox_only":  # the poly clause and the polygon ordering clause are removed
        l3 = l3.replace(
            '; "poly" is a flat list [x1, y1, x2, y2, ...] of at least 3 vertices, starting at the '
            "top-most (then left-most) vertex and going clockwise.",
            ".",
        )
        l5 = l5.replace(", by the smallest (y, x) over its vertices for a polygon.", ".")
    if coord_mode == "numeric":
        l2 = l2.replace("[<|coord_12|>, <|coord_40|>, <|coord_300|>, <|coord_410|>]", "[12, 40, 300, 410]")
        l4 = l4.replace("one token from <|coord_0|> to <|coord_999|>", "a plain integer from 0 to 999")
    if field_order == "geometry_first":
        l2 = l2.replace('{"desc": "cat", "bbox_2d": [', '{"bbox_2d": [').replace(']}]}', '], "desc": "cat"}]}')
        l3 = l3.replace(
            'Each record has "desc" first, then exactly one geometry',
            'Each record has exactly one geometry first, then "desc"',
        )
    if ordering == "random":
        l5 = "Objects may be listed in any order."
    return f"{L1}\n{l2}\n{l3}\n{l4}\n{l5}\n{L6}"


COMBINATIONS = list(
    itertools.product(["default", "bbox_only"], ["tokens", "numeric"], ["sorted", "random"],
                      ["desc_first", "geometry_first"])
)


def test_default_combination_is_the_spec_text_verbatim() -> None:
    texts = build_prompt("default", CoordMode.TOKENS, Ordering.SORTED, FieldOrder.DESC_FIRST)
    assert texts == PromptTexts(system=DEFAULT_SYSTEM, user="Detect every object in this image.")
    assert texts.system.encode("utf-8") == DEFAULT_SYSTEM.encode("utf-8")


@pytest.mark.parametrize(("variant", "coord_mode", "ordering", "field_order"), COMBINATIONS)
def test_golden_bytes_of_every_combination(variant: str, coord_mode: str, ordering: str, field_order: str) -> None:
    texts = build_prompt(variant, coord_mode, ordering, field_order)
    assert texts.system.encode("utf-8") == expected_system(variant, coord_mode, ordering, field_order).encode()
    assert texts.user == "Detect every object in this image."


def test_enum_and_string_settings_build_the_same_text() -> None:
    for variant, coord_mode, ordering, field_order in COMBINATIONS:
        assert build_prompt(variant, coord_mode, ordering, field_order) == build_prompt(
            variant, CoordMode(coord_mode), Ordering(ordering), FieldOrder(field_order)
        )


def test_all_sixteen_system_texts_are_distinct() -> None:
    systems = {build_prompt(*combo).system for combo in COMBINATIONS}
    assert len(systems) == 16


def test_bbox_only_never_mentions_polygons_and_numeric_never_mentions_tokens() -> None:
    for variant, coord_mode, ordering, field_order in COMBINATIONS:
        system = build_prompt(variant, coord_mode, ordering, field_order).system
        assert ("poly" in system) == (variant == "default")
        assert ("<|coord_" in system) == (coord_mode == "tokens")
        assert system.count("\n") == 5


@given(
    system=st.text(min_size=1).filter(lambda s: s.strip() != ""),
    user=st.text(min_size=1).filter(lambda s: s.strip() != ""),
    combo=st.sampled_from(COMBINATIONS),
)
def test_overrides_replace_the_text_verbatim(system: str, user: str, combo: tuple[str, str, str, str]) -> None:
    texts = build_prompt(*combo, system_override=system, user_override=user)
    assert texts == PromptTexts(system=system, user=user)
    only_user = build_prompt(*combo, user_override=user)
    assert only_user.system == build_prompt(*combo).system and only_user.user == user


@pytest.mark.parametrize("bad", ["", "   ", "\n"])
def test_empty_override_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="prompt.system"):
        build_prompt("default", "tokens", "sorted", "desc_first", system_override=bad)
    with pytest.raises(ConfigError, match="prompt.user"):
        build_prompt("default", "tokens", "sorted", "desc_first", user_override=bad)


def test_unknown_variant_is_a_config_error_listing_registered_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_prompt("fancy", "tokens", "sorted", "desc_first")
    message = str(info.value)
    assert "prompt.variant" in message and "'fancy'" in message
    assert "bbox_only" in message and "default" in message
    assert registered_variants() == ("bbox_only", "default")


def test_unknown_setting_value_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="data.coord_mode"):
        build_prompt("default", "pixels", "sorted", "desc_first")
    with pytest.raises(ConfigError, match="data.ordering"):
        build_prompt("default", "tokens", "shuffled", "desc_first")
    with pytest.raises(ConfigError, match="data.field_order"):
        build_prompt("default", "tokens", "sorted", "desc_last")


def test_variant_poly_permission() -> None:
    assert get_variant("default").allows_poly is True
    assert get_variant("bbox_only").allows_poly is False


def test_chat_messages_shape() -> None:
    texts = PromptTexts(system="S", user="U")
    messages = chat_messages(texts, "/data/img.png", assistant='{"objects": []}')
    assert messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image", "image": "/data/img.png"}, {"type": "text", "text": "U"}]},
        {"role": "assistant", "content": '{"objects": []}'},
    ]
    assert chat_messages(texts, "/data/img.png") == messages[:2]
    assert DEFAULT_USER_TEXT == "Detect every object in this image."
