"""The norm1000 codec (data.md §2.2, D4): worked numbers, exactness, and proven error bounds."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import codec
from domain.codec import (
    bbox_pixels_to_bins,
    bin_to_pixel,
    bin_to_pixel_exact,
    bin_to_pixel_float,
    bins_to_pixels,
    exact_value,
    int_boxes_to_bins,
    pixel_to_bin,
    pixels_to_bins,
    round_half_even,
)
from domain.errors import GeometryError

# ---------------------------------------------------------------------------------------------
# Worked numbers of §2.2 and acceptance tests 1-6


@pytest.mark.parametrize(
    ("xyxy", "size", "bins", "nudged"),
    [
        ([10, 20, 300, 400], (768, 512), (13, 39, 391, 782), False),
        ([767, 511, 767, 511], (768, 512), (998, 998, 999, 999), True),
        ([100, 100, 100.4, 100.2], (768, 512), (130, 195, 131, 196), False),
    ],
)
def test_bbox_pixels_to_bins_worked_numbers(
    xyxy: list[float], size: tuple[int, int], bins: tuple[int, int, int, int], nudged: bool
) -> None:
    assert bbox_pixels_to_bins(xyxy, *size) == (bins, nudged)


@pytest.mark.parametrize(
    ("bins", "size", "pixels"),
    [
        ([13, 39, 391, 782], (768, 512), [10, 20, 300, 400]),
        ([10, 20, 200, 220], (1000, 800), [10, 16, 200, 176]),
        ([0, 0, 999, 999], (64, 48), [0, 0, 63, 47]),
    ],
)
def test_bins_to_pixels_worked_numbers(bins: list[int], size: tuple[int, int], pixels: list[int]) -> None:
    assert bins_to_pixels(bins, *size) == pixels


def test_acceptance_1_round_trip_of_the_first_worked_box() -> None:
    bins, _ = bbox_pixels_to_bins([10, 20, 300, 400], 768, 512)
    assert bins_to_pixels(list(bins), 768, 512) == [10, 20, 300, 400]


def test_acceptance_4_generic_rule_and_range_error() -> None:
    assert pixel_to_bin(2, 4) == 666
    with pytest.raises(GeometryError, match=r"^pixel 4 out of range \[0, 3\]$"):
        pixel_to_bin(4, 4)
    with pytest.raises(GeometryError, match=r"pixel -1 out of range \[0, 3\]"):
        pixel_to_bin(-1, 4)


def test_acceptance_5_exact_arithmetic_near_integers() -> None:
    # The float pitfall is real on this platform (so the test can tell the two apart) ...
    assert math.ceil(125 / 999 * 999) == 126
    assert math.floor(63 / 999 * 999) == 62
    # ... and the codec is exact.
    (x1, _, x2, _), _ = bbox_pixels_to_bins([63, 0, 125, 10], 1000, 800)
    assert (x1, x2) == (63, 125)
    (x1, _, x2, _), _ = bbox_pixels_to_bins([63.0, 0.0, 125.0, 10.0], 1000, 800)
    assert (x1, x2) == (63, 125)


def test_acceptance_6_half_even_in_the_generic_rule() -> None:
    # At W = 1999, d = 1998: pixel 5 -> 2.5 bins, pixel 7 -> 3.5 bins.
    assert Fraction(5 * 999, 1998) == Fraction(5, 2)
    assert pixel_to_bin(5, 1999) == 2
    assert pixel_to_bin(7, 1999) == 4
    assert pixel_to_bin(3, 1999) == 2  # 1.5 -> 2


def test_round_half_even_examples() -> None:
    assert round_half_even(Fraction(5, 2)) == 2
    assert round_half_even(Fraction(7, 2)) == 4
    assert round_half_even(Fraction(-5, 2)) == -2
    assert round_half_even(Fraction(-7, 2)) == -4
    assert round_half_even(Fraction(5, 3)) == 2
    assert round_half_even(7) == 7
    with pytest.raises(GeometryError):
        round_half_even(0.5)  # type: ignore[arg-type]


@given(st.fractions(max_denominator=10_000).filter(lambda q: abs(q) < 10**6))
def test_round_half_even_matches_decimal_quantize(q: Fraction) -> None:
    # Independent oracle: Decimal division at high precision is exact enough to decide the rounding
    # of these small fractions, and quantize with ROUND_HALF_EVEN is banker's rounding.
    from decimal import localcontext

    with localcontext() as ctx:
        ctx.prec = 60
        dec = Decimal(q.numerator) / Decimal(q.denominator)
        expected = int(dec.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    assert round_half_even(q) == expected


def test_float_inputs_are_taken_at_their_decimal_value() -> None:
    assert exact_value(0.1) == Fraction(1, 10)
    assert exact_value("100.4") == Fraction(502, 5)
    assert exact_value(Decimal("2.5")) == Fraction(5, 2)
    # 2.5 bins exactly at W = 1999 whatever the input type.
    for five in (5, 5.0, "5", "5.000", Decimal(5), Fraction(5)):
        assert pixel_to_bin(five, 1999) == 2


@pytest.mark.parametrize("bad", [True, float("nan"), float("inf"), "abc", "NaN", None, [1]])
def test_non_numbers_are_geometry_errors(bad: object) -> None:
    with pytest.raises(GeometryError):
        pixel_to_bin(bad, 100)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, -3, True, 2.0])
def test_bad_sizes_are_errors(size: object) -> None:
    with pytest.raises(GeometryError):
        pixel_to_bin(0, size)  # type: ignore[arg-type]


def test_bin_range_is_checked() -> None:
    for bad in (-1, 1000, True):
        with pytest.raises(GeometryError):
            bin_to_pixel(bad, 640)
    assert bin_to_pixel(999, 640) == 639
    assert bin_to_pixel(0, 640) == 0


def test_size_one_axis() -> None:
    # d = max(1, W - 1) = 1, pixels must be 0, decoded pixels are clamped to [0, 0].
    assert pixel_to_bin(0, 1) == 0
    assert bin_to_pixel(999, 1) == 0
    assert bin_to_pixel_exact(999, 1) == 1  # the unrounded view is not clamped
    with pytest.raises(GeometryError, match=r"out of range \[0, 0\]"):
        pixel_to_bin(1, 1)


def test_unrounded_decode() -> None:
    assert bin_to_pixel_exact(13, 768) == Fraction(13 * 767, 999)
    assert bin_to_pixel_float(500, 1000) == 500.0
    assert bin_to_pixel_float(1, 768) == pytest.approx(767 / 999)


def test_bbox_errors() -> None:
    with pytest.raises(GeometryError, match=r"pixel 768 out of range \[0, 767\]"):
        bbox_pixels_to_bins([0, 0, 768, 10], 768, 512)
    with pytest.raises(GeometryError, match="x2 = 5 is smaller than x1 = 6"):
        bbox_pixels_to_bins([6, 0, 5, 10], 768, 512)
    with pytest.raises(GeometryError, match="exactly 4 values"):
        bbox_pixels_to_bins([0, 0, 5], 768, 512)


def test_flat_helpers_name_the_failing_index() -> None:
    with pytest.raises(GeometryError, match=r"\[3\] \(y\): pixel 48 out of range \[0, 47\]"):
        pixels_to_bins([0, 0, 10, 48], 64, 48)
    with pytest.raises(GeometryError, match="even length"):
        pixels_to_bins([0, 0, 10], 64, 48)
    with pytest.raises(GeometryError, match="even length"):
        bins_to_pixels([0, 0, 10], 64, 48)


def test_docstring_says_the_cookbook_convention_is_not_used() -> None:
    assert codec.__doc__ is not None
    assert "/ 1000" in codec.__doc__ and "NOT used" in codec.__doc__


# ---------------------------------------------------------------------------------------------
# Properties

sizes = st.integers(min_value=2, max_value=5000)


@st.composite
def size_and_pixel(draw: st.DrawFn) -> tuple[int, Fraction]:
    size = draw(sizes)
    denominator = draw(st.sampled_from([1, 2, 3, 4, 5, 10, 100, 1000, 7]))
    numerator = draw(st.integers(min_value=0, max_value=(size - 1) * denominator))
    return size, Fraction(numerator, denominator)


@given(size_and_pixel())
def test_pixel_bin_pixel_error_bound(case: tuple[int, Fraction]) -> None:
    """Proven bound. With d = size - 1 and k = round_half_even(v*999/d): |k - v*999/d| <= 1/2, so the
    unrounded decode k*d/999 is within d/1998 of v (half a bin step, a bin being d/999 pixels). The
    rounded decode adds at most 1/2: |bin_to_pixel(k) - v| <= 1/2 + d/1998."""
    size, v = case
    d = size - 1
    k = pixel_to_bin(v, size)
    assert 0 <= k <= 999
    assert abs(bin_to_pixel_exact(k, size) - v) <= Fraction(d, 1998)
    assert abs(bin_to_pixel(k, size) - v) <= Fraction(1, 2) + Fraction(d, 1998)


@given(st.integers(min_value=2, max_value=1000), st.data())
def test_integer_pixels_round_trip_exactly_up_to_1000_wide(size: int, data: st.DataObject) -> None:
    """For d <= 999 the unrounded decode is within d/1998 < 1/2 of an integer pixel, so rounding
    recovers it exactly."""
    v = data.draw(st.integers(min_value=0, max_value=size - 1))
    assert bin_to_pixel(pixel_to_bin(v, size), size) == v


@given(st.integers(min_value=1000, max_value=20000), st.integers(min_value=0, max_value=999))
def test_bins_round_trip_when_a_bin_spans_at_least_a_pixel(size: int, k: int) -> None:
    """For d >= 999: |p - k*d/999| <= 1/2 implies |p*999/d - k| <= 999/(2d) <= 1/2, and the tie
    case (d = 999) has p = k exactly, so bins -> pixels -> bins is the identity."""
    assert pixel_to_bin(bin_to_pixel(k, size), size) == k


@given(st.integers(min_value=2, max_value=999), st.integers(min_value=0, max_value=999))
def test_bins_round_trip_error_bound_on_small_images(size: int, k: int) -> None:
    """For d < 999: |k' - k| <= 999/(2d) + 1/2 (a pixel spans several bins)."""
    d = size - 1
    back = pixel_to_bin(bin_to_pixel(k, size), size)
    assert abs(back - k) <= Fraction(999, 2 * d) + Fraction(1, 2)


@given(size_and_pixel(), size_and_pixel())
def test_generic_rule_is_monotone(a: tuple[int, Fraction], b: tuple[int, Fraction]) -> None:
    size = max(a[0], b[0])
    lo, hi = sorted((a[1], b[1]))
    assert pixel_to_bin(lo, size) <= pixel_to_bin(hi, size)


@st.composite
def pixel_box(draw: st.DrawFn) -> tuple[int, int, list[Fraction]]:
    w, h = draw(sizes), draw(sizes)
    xs = sorted(draw(st.integers(0, (w - 1) * 8)) for _ in range(2))
    ys = sorted(draw(st.integers(0, (h - 1) * 8)) for _ in range(2))
    return w, h, [Fraction(xs[0], 8), Fraction(ys[0], 8), Fraction(xs[1], 8), Fraction(ys[1], 8)]


@given(pixel_box())
def test_extent_preserving_bbox_is_valid_and_contains_the_pixel_box(
    case: tuple[int, int, list[Fraction]],
) -> None:
    w, h, box = case
    (x1, y1, x2, y2), nudged = bbox_pixels_to_bins(box, w, h)
    assert 0 <= x1 < x2 <= 999 and 0 <= y1 < y2 <= 999
    # Floor / ceil (and the nudge, which only widens) keep the decoded box around the pixel box.
    assert bin_to_pixel_exact(x1, w) <= box[0] and bin_to_pixel_exact(x2, w) >= box[2]
    assert bin_to_pixel_exact(y1, h) <= box[1] and bin_to_pixel_exact(y2, h) >= box[3]
    # The nudge fires exactly when floor/ceil collapsed an axis.
    collapsed_x = math.ceil(box[2] * 999 / (w - 1)) <= math.floor(box[0] * 999 / (w - 1))
    collapsed_y = math.ceil(box[3] * 999 / (h - 1)) <= math.floor(box[1] * 999 / (h - 1))
    assert nudged == (collapsed_x or collapsed_y)


@st.composite
def five_vertex_poly(draw: st.DrawFn) -> tuple[int, int, list[Fraction]]:
    w, h = draw(sizes), draw(sizes)
    flat: list[Fraction] = []
    for _ in range(5):
        flat.append(Fraction(draw(st.integers(0, (w - 1) * 4)), 4))
        flat.append(Fraction(draw(st.integers(0, (h - 1) * 4)), 4))
    return w, h, flat


@given(five_vertex_poly())
def test_acceptance_7_flat_helpers_preserve_order_and_pairing(case: tuple[int, int, list[Fraction]]) -> None:
    w, h, flat = case
    bins = pixels_to_bins(flat, w, h)
    assert len(bins) == len(flat)
    for j, v in enumerate(flat):
        assert bins[j] == pixel_to_bin(v, w if j % 2 == 0 else h)
    # Converting vertex by vertex in reversed order gives the reversed result: no re-pairing.
    reversed_pairs = [c for i in range(4, -1, -1) for c in flat[2 * i : 2 * i + 2]]
    expected = [c for i in range(4, -1, -1) for c in bins[2 * i : 2 * i + 2]]
    assert pixels_to_bins(reversed_pairs, w, h) == expected
    pixels = bins_to_pixels(bins, w, h)
    for j, k in enumerate(bins):
        assert pixels[j] == bin_to_pixel(k, w if j % 2 == 0 else h)


# ---------------------------------------------------------------------------------------------
# The integer fast path of pixels_to_bins equals the exact Fraction codec (pixel_to_bin)


def _tie_pixels(size: int) -> list[int]:
    """Pixels of an axis whose ``v * 999 / d`` is exactly a half-integer (the round-half-even ties)."""
    d = max(1, size - 1)
    return [v for v in range(size) if 2 * (v * 999 % d) == d]


@given(st.integers(1, 10_000), st.integers(1, 10_000), st.data())
def test_int_fast_path_equals_the_exact_codec(width: int, height: int, data: st.DataObject) -> None:
    xs = data.draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=6))
    ys = data.draw(st.lists(st.integers(0, height - 1), min_size=len(xs), max_size=len(xs)))
    tie_x, tie_y = _tie_pixels(width), _tie_pixels(height)
    if tie_x:  # make sure the round-half-even ties are drawn, not left to chance
        xs[0] = data.draw(st.sampled_from(tie_x))
    if tie_y:
        ys[-1] = data.draw(st.sampled_from(tie_y))
    xs += [0, width - 1]
    ys += [0, height - 1]
    flat = [c for pair in zip(xs, ys) for c in pair]
    exact = [pixel_to_bin(v, width if j % 2 == 0 else height) for j, v in enumerate(flat)]
    assert codec.int_pixels_to_bins(flat, width, height) == exact
    assert pixels_to_bins(flat, width, height) == exact


def test_int_fast_path_equals_the_exact_codec_on_every_pixel_of_small_and_tie_rich_sizes() -> None:
    ties = 0
    for size in [*range(1, 130), 1000, 1001, 1999, 2000, 2001, 10_000]:
        pixels = list(range(size))
        exact = [pixel_to_bin(v, size) for v in pixels]
        assert codec.int_pixels_to_bins([c for v in pixels for c in (v, v)], size, size) == [
            c for k in exact for c in (k, k)
        ]
        ties += len(_tie_pixels(size))
    assert ties > 50  # the sweep really crosses ties (size 3, pixel 1: 499.5 -> 500)


@pytest.mark.parametrize(
    ("flat", "size"),
    [([0, 0, 1.0, 2], (10, 10)), ([0, True, 1, 2], (10, 10)), ([0, 0, 10, 2], (10, 10)),
     ([0, -1, 1, 2], (10, 10)), ([0, 0, 1], (10, 10)), ([0, 0], (0, 10)), ([0, 0], (True, 10))],
)  # fmt: skip
def test_int_fast_path_leaves_everything_else_to_the_exact_path(
    flat: list[object], size: tuple[int, int]
) -> None:
    assert codec.int_pixels_to_bins(flat, *size) is None


def test_many_boxes_at_once_equal_the_exact_rule_on_every_pixel_of_tie_heavy_sizes() -> None:
    """``int_boxes_to_bins`` (one numpy pass) against ``pixel_to_bin`` on every pixel of sizes whose d = W - 1
    divides 999 * v into exact halves (ties) and of the degenerate 1-pixel side."""
    for width, height in ((1999, 3), (3, 1999), (1, 1), (2, 1000), (1000, 2)):
        boxes = [(x, y, x, y) for x in range(width) for y in range(0, height, max(1, height // 7))]
        got = int_boxes_to_bins(boxes, [(width, height)] * len(boxes))
        want = [[pixel_to_bin(x, width), pixel_to_bin(y, height)] * 2 for x, y, _, _ in boxes]
        assert got == want, (width, height)
    assert int_boxes_to_bins([], []) == []
