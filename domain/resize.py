"""Smart resize (data.md §3.1, D5): the offline target size of an image, in exact integer arithmetic.

Images are resized once, offline, by the converter; training and inference never resize (§3.2).
The target is a multiple of ``FACTOR`` on both axes, inside ``[min_pixels, max_pixels]`` where the
source allows it, and close to the source aspect ratio.
"""

from __future__ import annotations

import math
from fractions import Fraction

import attrs

from domain.errors import GeometryError

FACTOR = 32  # Qwen3-VL patch 16 x spatial merge 2
DEFAULT_MIN_PIXELS = 4 * FACTOR * FACTOR  # 4096
DEFAULT_MAX_PIXELS = 768 * FACTOR * FACTOR  # 786432
MAX_ASPECT_RATIO = 200


@attrs.frozen
class ImageSize:
    """A width x height in pixels (both > 0)."""

    width: int
    height: int

    def __attrs_post_init__(self) -> None:
        for name, value in (("width", self.width), ("height", self.height)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GeometryError(f"image {name} must be a positive int; got {value!r}")

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def vision_tokens(self, factor: int = FACTOR) -> int:
        """Number of merged vision tokens of a factor-aligned image: ``(W/32) * (H/32)``."""
        return (self.width // factor) * (self.height // factor)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def exceeds_aspect_ratio(size: ImageSize, max_ratio: int = MAX_ASPECT_RATIO) -> bool:
    """Step 1 of §3.1: ``max(h, w) / min(h, w) > 200`` (the image is rejected as ``aspect_ratio``)."""
    return max(size.width, size.height) > max_ratio * min(size.width, size.height)


def _ceil_sqrt(value: Fraction) -> int:
    """Smallest integer n >= 0 with n*n >= value (exact)."""
    n = math.isqrt(math.floor(value))
    return n if n * n >= value else n + 1


def _floor_sqrt(value: Fraction) -> int:
    """Largest integer n >= 0 with n*n <= value (exact; floor(sqrt(x)) == isqrt(floor(x)))."""
    return math.isqrt(math.floor(value))


def smart_resize(
    size: ImageSize,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = FACTOR,
    max_ratio: int = MAX_ASPECT_RATIO,
) -> ImageSize:
    """The target size of §3.1 for a source ``size``; raises GeometryError when the aspect ratio is > 200.

    Steps 3 and 4 use ``h / b`` with ``b = sqrt(h*w/max_pixels)``, i.e. ``sqrt(h * max_pixels / w)``;
    floors and ceilings of square roots are taken exactly on rationals, so no float lands a hair
    beside an integer.
    """
    if min_pixels <= 0 or max_pixels <= 0 or factor <= 0:
        raise GeometryError(
            f"smart_resize needs positive min_pixels, max_pixels, factor; got {min_pixels}, {max_pixels}, {factor}"
        )
    if exceeds_aspect_ratio(size, max_ratio):
        raise GeometryError(
            f"image {size} has aspect ratio above {max_ratio} (max(h,w)/min(h,w)); it cannot be resized"
        )
    w, h = size.width, size.height
    new_h = max(factor, round(Fraction(h, factor)) * factor)  # round() on Fraction is half-even
    new_w = max(factor, round(Fraction(w, factor)) * factor)
    f2 = factor * factor
    if new_h * new_w > max_pixels:
        # floor(h / b / F) with b = sqrt(h*w/max) == floor(sqrt(h*max / (w*F^2)))
        new_h = max(factor, _floor_sqrt(Fraction(h * max_pixels, w * f2)) * factor)
        new_w = max(factor, _floor_sqrt(Fraction(w * max_pixels, h * f2)) * factor)
    elif new_h * new_w < min_pixels:
        # ceil(h * b / F) with b = sqrt(min/(h*w)) == ceil(sqrt(h*min / (w*F^2)))
        new_h = _ceil_sqrt(Fraction(h * min_pixels, w * f2)) * factor
        new_w = _ceil_sqrt(Fraction(w * min_pixels, h * f2)) * factor
    return ImageSize(new_w, new_h)
