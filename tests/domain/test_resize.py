"""Smart resize of data.md §3.1 (test 51, first half): the table, and the rule's invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import GeometryError
from domain.resize import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageSize,
    exceeds_aspect_ratio,
    smart_resize,
)

# data.md §3.1 table: source w x h -> target w' x h', vision tokens
TABLE = [
    ((640, 480), (640, 480), 300),
    ((640, 427), (640, 416), 260),
    ((500, 375), (512, 384), 192),
    ((612, 612), (608, 608), 361),
    ((1920, 1080), (1152, 640), 720),
    ((4000, 3000), (1024, 768), 768),
    ((50, 40), (96, 64), 6),
]


@pytest.mark.parametrize(("source", "target", "tokens"), TABLE)
def test_table_of_section_3_1(source: tuple[int, int], target: tuple[int, int], tokens: int) -> None:
    out = smart_resize(ImageSize(*source))
    assert (out.width, out.height) == target
    assert out.vision_tokens() == tokens


def test_constants_match_the_spec() -> None:
    assert DEFAULT_MIN_PIXELS == 4096
    assert DEFAULT_MAX_PIXELS == 786432


def test_aspect_ratio_above_200_is_rejected_and_200_is_not() -> None:
    assert exceeds_aspect_ratio(ImageSize(201, 1))
    assert exceeds_aspect_ratio(ImageSize(1, 201))
    assert not exceeds_aspect_ratio(ImageSize(200, 1))
    with pytest.raises(GeometryError, match="aspect ratio"):
        smart_resize(ImageSize(6401, 32))
    assert smart_resize(ImageSize(6400, 32)).width % 32 == 0


def test_bool_and_nonpositive_sizes_are_rejected() -> None:
    with pytest.raises(GeometryError):
        ImageSize(0, 10)
    with pytest.raises(GeometryError):
        ImageSize(True, 10)


def _float_reference(w: int, h: int, min_pixels: int, max_pixels: int) -> tuple[int, int] | None:
    """The rule written with floats (as usually implemented); None when a float lands near an integer."""

    def near_int(x: float) -> bool:
        return abs(x - round(x)) < 1e-6

    hb = max(32, round(h / 32) * 32)
    wb = max(32, round(w / 32) * 32)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        a, b = h / beta / 32, w / beta / 32
        if near_int(a) or near_int(b):
            return None
        hb, wb = max(32, math.floor(a) * 32), max(32, math.floor(b) * 32)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        a, b = h * beta / 32, w * beta / 32
        if near_int(a) or near_int(b):
            return None
        hb, wb = math.ceil(a) * 32, math.ceil(b) * 32
    return wb, hb


sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000)).filter(
    lambda s: max(s) <= 200 * min(s)
)


@given(sizes)
def test_agrees_with_the_float_formula_away_from_integer_boundaries(size: tuple[int, int]) -> None:
    ref = _float_reference(size[0], size[1], DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    out = smart_resize(ImageSize(*size))
    if ref is not None:
        assert (out.width, out.height) == ref


@given(sizes)
def test_target_is_factor_aligned_and_inside_the_budget_when_shrunk(size: tuple[int, int]) -> None:
    w, h = size
    out = smart_resize(ImageSize(w, h))
    assert out.width % 32 == 0 and out.height % 32 == 0
    rounded = max(32, round(h / 32) * 32) * max(32, round(w / 32) * 32)
    if rounded > DEFAULT_MAX_PIXELS:
        assert out.pixels <= DEFAULT_MAX_PIXELS
    if rounded < DEFAULT_MIN_PIXELS:
        assert out.pixels >= DEFAULT_MIN_PIXELS


@given(st.integers(2, 40), st.integers(2, 40))
def test_aligned_sizes_inside_the_budget_are_unchanged(kw: int, kh: int) -> None:
    size = ImageSize(kw * 32, kh * 32)
    if size.pixels <= DEFAULT_MAX_PIXELS and size.pixels >= DEFAULT_MIN_PIXELS:
        assert smart_resize(size) == size
