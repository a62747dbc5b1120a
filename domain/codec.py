"""The norm1000 coordinate codec: every pixel <-> bin formula of data.md §2.2 (D4) lives here.

A bin is an integer k in 0..999 (1000 bins, no bin 1000): k = 0 is pixel 0 and k = 999 is pixel
W-1 (H-1 for y). With ``d = max(1, size - 1)``:

- pixel -> bin (generic, polygon vertices): ``k = round_half_even(v * 999 / d)``; a pixel outside
  ``[0, size-1]`` is an error, never a clamp (the converter clamps explicitly before calling).
- pixel -> bin (bbox, extent-preserving): floor for x1/y1, ceil for x2/y2, clamp to [0, 999],
  then a one-bin nudge per axis if the box collapsed.
- bin -> pixel: ``p = round_half_even(k * d / 999)`` clamped to ``[0, size-1]``; float consumers
  may use the unrounded ``k * d / 999``.

Everything is computed in exact rational arithmetic (``Fraction``), with source numbers taken at
their exact decimal value (a float at the decimal of its shortest ``repr``), because float
evaluation flips bins near integers (at W = 1000, ``125 / 999 * 999`` is 125.00000000000001).

The Qwen3-VL cookbook convention (``x / W * 1000``, values 0..1000, decoding with ``/ 1000``) is
NOT used anywhere in this project: it shifts boxes by up to a bin and produces an illegal bin 1000.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from domain.errors import GeometryError

NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1

PixelValue = int | Fraction | Decimal | float | str


def round_half_even(q: Fraction | int) -> int:
    """Banker's rounding of an exact rational: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2 (never ``floor(x + 0.5)``)."""
    if isinstance(q, bool) or not isinstance(q, (int, Fraction)):
        raise GeometryError(f"round_half_even needs an int or a Fraction, got {q!r}")
    if isinstance(q, int):
        return q
    num, den = q.numerator, q.denominator  # den > 0 always
    lower, rem = divmod(num, den)  # lower = floor(q), 0 <= rem < den
    twice = 2 * rem
    if twice < den:
        return lower
    if twice > den:
        return lower + 1
    return lower if lower % 2 == 0 else lower + 1


def exact_value(v: PixelValue) -> Fraction:
    """A source number as an exact rational: ints, Fractions and Decimals as they are, a float at its
    shortest decimal ``repr`` (``Decimal(str(v))``), a string as a decimal literal. Booleans, NaN and
    infinities are errors."""
    if isinstance(v, bool):
        raise GeometryError(f"expected a number, got {v!r}")
    if isinstance(v, (int, Fraction)):
        return Fraction(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise GeometryError(f"expected a finite number, got {v!r}")
        return Fraction(Decimal(str(v)))
    if isinstance(v, Decimal):
        if not v.is_finite():
            raise GeometryError(f"expected a finite number, got {v!r}")
        return Fraction(v)
    if isinstance(v, str):
        try:
            dec = Decimal(v.strip())
        except InvalidOperation:
            raise GeometryError(f"expected a decimal number, got {v!r}") from None
        if not dec.is_finite():
            raise GeometryError(f"expected a finite number, got {v!r}")
        return Fraction(dec)
    raise GeometryError(f"expected a number, got {v!r}")


def _span(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise GeometryError(f"image size must be a positive integer, got {size!r}")
    return max(1, size - 1)


def _show(v: PixelValue) -> str:
    return str(v) if not isinstance(v, float) else repr(v)


def _checked_pixel(v: PixelValue, size: int) -> Fraction:
    q = exact_value(v)
    _span(size)
    if q < 0 or q > size - 1:
        raise GeometryError(f"pixel {_show(v)} out of range [0, {size - 1}]")
    return q


def _checked_bin(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise GeometryError(f"bin must be an integer, got {k!r}")
    if not 0 <= k <= MAX_BIN:
        raise GeometryError(f"bin {k} out of range 0..{MAX_BIN}")
    return k


def pixel_to_bin(v: PixelValue, size: int) -> int:
    """Generic pixel -> bin (polygon vertices): ``round_half_even(v * 999 / max(1, size-1))``.

    ``v`` must lie in ``[0, size-1]``; otherwise :class:`GeometryError` ``pixel 4 out of range [0, 3]``.
    """
    q = _checked_pixel(v, size)
    return round_half_even(q * MAX_BIN / _span(size))


def _bbox_axis(lo: PixelValue, hi: PixelValue, size: int, axis: str) -> tuple[int, int, bool]:
    qlo = _checked_pixel(lo, size)
    qhi = _checked_pixel(hi, size)
    if qhi < qlo:
        raise GeometryError(f"bbox {axis}2 = {_show(hi)} is smaller than {axis}1 = {_show(lo)}")
    d = _span(size)
    k1 = min(max(math.floor(qlo * MAX_BIN / d), 0), MAX_BIN)
    k2 = min(max(math.ceil(qhi * MAX_BIN / d), 0), MAX_BIN)
    if k2 <= k1:
        if k1 < MAX_BIN:
            return k1, k1 + 1, True
        return MAX_BIN - 1, MAX_BIN, True
    return k1, k2, False


def bbox_pixels_to_bins(
    xyxy: Sequence[PixelValue], width: int, height: int
) -> tuple[tuple[int, int, int, int], bool]:
    """Extent-preserving bbox conversion (offline): floor x1/y1, ceil x2/y2, clamp, nudge.

    Returns ``((x1, y1, x2, y2), nudged)``; the result always has ``0 <= x1 < x2 <= 999`` and
    ``0 <= y1 < y2 <= 999``. ``nudged`` is true when an axis collapsed and was widened to one bin.
    Pixels outside the image or an inverted box (``x2 < x1``) are errors.
    """
    if len(xyxy) != 4:
        raise GeometryError(f"a bbox needs exactly 4 values [x1, y1, x2, y2]; got len={len(xyxy)}")
    x1, x2, nx = _bbox_axis(xyxy[0], xyxy[2], width, "x")
    y1, y2, ny = _bbox_axis(xyxy[1], xyxy[3], height, "y")
    return (x1, y1, x2, y2), nx or ny


def bin_to_pixel_exact(k: int, size: int) -> Fraction:
    """Unrounded bin -> pixel ``k * max(1, size-1) / 999`` as an exact Fraction (not clamped)."""
    return Fraction(_checked_bin(k) * _span(size), MAX_BIN)


def bin_to_pixel_float(k: int, size: int) -> float:
    """Unrounded bin -> pixel as a float (for float consumers such as COCO evaluation)."""
    return float(bin_to_pixel_exact(k, size))


def bin_to_pixel(k: int, size: int) -> int:
    """bin -> pixel: ``round_half_even(k * d / 999)`` clamped to ``[0, size-1]``."""
    p = round_half_even(bin_to_pixel_exact(k, size))
    return min(max(p, 0), size - 1)


def _axis_size(index: int, width: int, height: int) -> int:
    return width if index % 2 == 0 else height


def _check_flat(flat: Sequence[object]) -> None:
    if len(flat) % 2:
        raise GeometryError(
            f"a flat coordinate list must have an even length (x, y pairs); got len={len(flat)}"
        )


def _per_coordinate(
    flat: Sequence[Any], width: int, height: int, convert: Callable[[Any, int], int]
) -> list[int]:
    """``convert(value, axis size)`` over a flat list in order; a failure names the index and the axis."""
    _check_flat(flat)
    out: list[int] = []
    for j, v in enumerate(flat):
        try:
            out.append(convert(v, _axis_size(j, width, height)))
        except GeometryError as exc:
            raise GeometryError(f"[{j}] ({'x' if j % 2 == 0 else 'y'}): {exc}") from None
    return out


def pixels_to_bins(flat: Sequence[PixelValue], width: int, height: int) -> list[int]:
    """Generic pixel -> bin over a flat list (even index x with ``width``, odd index y with ``height``).

    Order and pairing are preserved; an out-of-range value raises naming its index.
    """
    fast = int_pixels_to_bins(flat, width, height)
    if fast is not None:
        return fast
    return _per_coordinate(flat, width, height, pixel_to_bin)


def int_pixels_to_bins(flat: Sequence[object], width: int, height: int) -> list[int] | None:
    """:func:`pixel_to_bin` over a flat list of plain in-range ints, in integer arithmetic; None otherwise.

    ``round_half_even(v * 999 / d)`` is computed as ``divmod(v * 999, d)`` and the remainder compared
    with ``d / 2``: the same exact rational and the same tie rule as the Fraction path, ~14x faster
    (tests/domain/test_codec.py holds the two equal over every size 1..10000, ties included). Anything
    else (floats, Decimals, bools, an out-of-range value, an odd length, a bad size) returns None so
    the exact path decides, errors included."""
    if type(width) is not int or type(height) is not int or width <= 0 or height <= 0 or len(flat) % 2:
        return None
    last_x, last_y = width - 1, height - 1
    dx, dy = max(1, last_x), max(1, last_y)
    out: list[int] = []
    for j in range(0, len(flat), 2):
        x, y = flat[j], flat[j + 1]
        if type(x) is not int or type(y) is not int or not (0 <= x <= last_x and 0 <= y <= last_y):
            return None
        q, r = divmod(x * MAX_BIN, dx)
        out.append(q + 1 if 2 * r > dx or (2 * r == dx and q % 2 == 1) else q)
        q, r = divmod(y * MAX_BIN, dy)
        out.append(q + 1 if 2 * r > dy or (2 * r == dy and q % 2 == 1) else q)
    return out


def int_boxes_to_bins(boxes: Sequence[Sequence[int]], sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """:func:`int_pixels_to_bins` of many boxes at once in one numpy pass: ``boxes[i]`` is ``(x1, y1, x2, y2)``
    of plain ints already checked to lie in ``[0, W-1] x [0, H-1]`` of ``sizes[i] = (W, H)``. The same integer
    rule (``divmod(v * 999, d)``, ties to even); tests hold it equal to the exact path."""
    if not boxes:
        return []
    import numpy as np

    values = np.asarray(boxes, dtype=np.int64) * MAX_BIN
    wh = np.asarray(sizes, dtype=np.int64)
    d = np.maximum(wh - 1, 1)[:, [0, 1, 0, 1]]
    q, r = np.divmod(values, d)
    rounded: list[list[int]] = (q + ((2 * r > d) | ((2 * r == d) & (q % 2 == 1)))).tolist()
    return rounded


def bins_to_pixels(flat: Sequence[int], width: int, height: int) -> list[int]:
    """bin -> pixel over a flat list (even index x with ``width``, odd index y with ``height``)."""
    return _per_coordinate(flat, width, height, bin_to_pixel)


def bins_to_pixels_float(flat: Sequence[int], width: int, height: int) -> list[float]:
    """Unrounded bin -> pixel over a flat list, as floats (evaluation, drawing)."""
    _check_flat(flat)
    return [bin_to_pixel_float(k, _axis_size(j, width, height)) for j, k in enumerate(flat)]


# --------------------------------------------------------------------------------------------------
# Checked bins of a shape (one owner of the messages; the duplicate monitor and Stage-2 matching call these)


def plain_canonical_bbox(bins: Sequence[object]) -> tuple[int, int, int, int] | None:
    """The canonical (min/max per axis) box of four plain in-range ``int`` bins, checked in one expression;
    None for anything else (the caller then checks bin by bin with :func:`check_bins`)."""
    if len(bins) != 4:
        return None
    x1, y1, x2, y2 = bins
    if (
        type(x1) is int and type(y1) is int and type(x2) is int and type(y2) is int
        and 0 <= x1 <= MAX_BIN and 0 <= y1 <= MAX_BIN and 0 <= x2 <= MAX_BIN and 0 <= y2 <= MAX_BIN
    ):  # fmt: skip
        return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    return None


def check_bins(bins: Sequence[object], where: str) -> None:
    """Every value an integer bin in 0..999, else a ``GeometryError`` naming ``<where>.bins[j]``."""
    import numpy as np

    for j, v in enumerate(bins):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise GeometryError(f"{where}.bins[{j}]: expected an integer bin, got {v!r}")
        if not 0 <= v <= MAX_BIN:
            raise GeometryError(f"{where}.bins[{j}]: value {v} out of range 0..{MAX_BIN}")
