"""Overlays with Pillow (infer-eval-config.md §5): GT and predictions on the image as stored.

Drawing order: every shape on one transparent RGBA layer of the image's size (GT first, then
predictions, so a prediction's stroke is on top where they coincide), then every label, then one
alpha-composite over the image and an RGB PNG. The image is never resized; with a legend, a key
strip is appended below it, so image pixels keep their coordinates.

Box ``[x1, y1, x2, y2]`` is drawn with inclusive corners and the stroke inside the box (Pillow's
``rectangle`` with ``width``); a polygon as a closed polyline (first vertex repeated).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

from PIL import Image, ImageColor, ImageDraw, ImageFont

from domain.evaluation import PrecisionCurves
from domain.objects import GeometryKind
from ports.rendering import OverlayObject, OverlayRole, OverlayStyle
from ports.storage import RGBImage

LABEL_ALPHA = 200  # label backgrounds are translucent so the stroke colour stays the only exact match
LABEL_PAD = 2
TEXT_COLOR = (255, 255, 255, 255)
LEGEND_BACKGROUND = (32, 32, 32)
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

RGBA = tuple[int, int, int, int]


def font_size_for(width: int, height: int) -> int:
    """Label font size: about 1/32 of the shorter side, between 10 and 28 px."""
    return max(10, min(28, round(min(width, height) / 32)))


@lru_cache(maxsize=16)
def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _rgba(color: str, alpha: int = 255) -> RGBA:
    r, g, b = ImageColor.getrgb(color)[:3]
    return (r, g, b, alpha)


def _as_pil(image: RGBImage) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"the Pillow renderer draws on PIL images, got {type(image).__name__}")
    return image


def _extent(obj: OverlayObject) -> tuple[int, int, int, int]:
    xs, ys = obj.points[0::2], obj.points[1::2]
    return (min(xs), min(ys), max(xs), max(ys))


def _draw_shape(draw: ImageDraw.ImageDraw, obj: OverlayObject, color: RGBA, width: int) -> None:
    if obj.kind is GeometryKind.BBOX:
        if len(obj.points) != 4:
            raise ValueError(f"a bbox overlay needs 4 values, got {list(obj.points)}")
        x1, y1, x2, y2 = _extent(obj)
        if min(x2 - x1 + 1, y2 - y1 + 1) <= 2 * width:
            # every pixel is within the stroke of an edge; Pillow's outline would spill outside the box
            draw.rectangle((x1, y1, x2, y2), fill=color)
        else:
            draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        return
    if len(obj.points) < 6 or len(obj.points) % 2:
        raise ValueError(f"a polygon overlay needs an even number (>= 6) of values, got {list(obj.points)}")
    ring = list(zip(obj.points[0::2], obj.points[1::2]))
    draw.line([*ring, ring[0]], fill=color, width=width, joint="curve")


def _text_box(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int, int, int]:
    """The text's ink box at the origin, widened to whole pixels."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return (math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom))


def _draw_label(
    draw: ImageDraw.ImageDraw, obj: OverlayObject, color: RGBA, font: Font, size: tuple[int, int]
) -> None:
    text = obj.label
    if not text:
        return
    width, height = size
    left, top, right, bottom = _text_box(draw, text, font)
    box_w, box_h = right - left + 2 * LABEL_PAD, bottom - top + 2 * LABEL_PAD
    x1, y1, _, y2 = _extent(obj)
    if obj.role is OverlayRole.GT:  # desc above the box; inside its top edge when there is no room
        y = y1 - box_h if y1 - box_h >= 0 else y1
    else:  # desc and score below the box; inside its bottom edge when there is no room
        y = y2 + 1 if y2 + 1 + box_h <= height else y2 + 1 - box_h
    x = min(max(0, x1), max(0, width - box_w))
    y = min(max(0, y), max(0, height - box_h))
    draw.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=(color[0], color[1], color[2], LABEL_ALPHA))
    draw.text((x + LABEL_PAD - left, y + LABEL_PAD - top), text, font=font, fill=TEXT_COLOR)


def _legend_strip(width: int, style: OverlayStyle, font: Font) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = _text_box(probe, "Ag", font)
    text_h = bottom - top
    strip = Image.new("RGB", (width, text_h + 4 * LABEL_PAD), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    x = 2 * LABEL_PAD
    for role, name in ((OverlayRole.GT, "GT"), (OverlayRole.PRED, "prediction")):
        draw.rectangle(
            (x, 2 * LABEL_PAD, x + text_h - 1, 2 * LABEL_PAD + text_h - 1),
            fill=_rgba(style.color_of(role))[:3],
        )
        x += text_h + LABEL_PAD
        draw.text((x, 2 * LABEL_PAD - top), name, font=font, fill=TEXT_COLOR[:3])
        x += math.ceil(draw.textlength(name, font=font)) + 4 * LABEL_PAD
    return strip


def draw_overlay(image: Image.Image, objects: Sequence[OverlayObject], style: OverlayStyle) -> Image.Image:
    """The overlay as an RGB image (the source image's size, plus the legend strip when enabled)."""
    base = image.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    ordered = [o for o in objects if o.role is OverlayRole.GT] + [
        o for o in objects if o.role is OverlayRole.PRED
    ]
    font = _font(font_size_for(*base.size))
    for obj in ordered:
        _draw_shape(draw, obj, _rgba(style.color_of(obj.role)), style.line_width)
    for obj in ordered:
        _draw_label(draw, obj, _rgba(style.color_of(obj.role)), font, base.size)
    composed = Image.alpha_composite(base, layer).convert("RGB")
    if not style.legend:
        return composed
    strip = _legend_strip(composed.width, style, font)
    out = Image.new("RGB", (composed.width, composed.height + strip.height))
    out.paste(composed, (0, 0))
    out.paste(strip, (0, composed.height))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class PillowImageRenderer:
    """:class:`ports.rendering.ImageRenderer`: overlays with Pillow, plots with matplotlib (Agg).

    matplotlib is imported on the first plot only, so drawing overlays never needs it.
    """

    def overlay_png(self, image: RGBImage, objects: Sequence[OverlayObject], style: OverlayStyle) -> bytes:
        return png_bytes(draw_overlay(_as_pil(image), objects, style))

    def pr_curves_png(self, curves: PrecisionCurves, labels: Mapping[str, str], title: str) -> bytes:
        from adapters.vis.plots import pr_curves_png

        return pr_curves_png(curves, labels, title)

    def per_class_ap_png(self, rows: Sequence[tuple[str, float]], title: str) -> bytes:
        from adapters.vis.plots import per_class_ap_png

        return per_class_ap_png(rows, title)

    def drop_counts_png(self, counts: Sequence[tuple[str, int]], title: str) -> bytes:
        from adapters.vis.plots import drop_counts_png

        return drop_counts_png(counts, title)

    def frequency_ap_png(
        self, groups: Sequence[tuple[str, Sequence[tuple[str, float]]]], title: str
    ) -> bytes:
        from adapters.vis.plots import frequency_ap_png

        return frequency_ap_png(groups, title)
