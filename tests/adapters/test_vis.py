"""The visualization adapters (infer-eval-config.md §5): Pillow overlays, matplotlib plots, the HTML page.

Overlay tests draw known shapes on a blank image and compare the pixels that carry the exact GT or
prediction colour against the set of pixels a 3-px stroke on the box edges must cover, computed
here independently of the renderer.
"""

from __future__ import annotations

import io
import re

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from adapters.vis.overlay import PillowImageRenderer, draw_overlay
from adapters.vis.plots import BAR_COLOR, DROP_COLOR, drop_counts_png, per_class_ap_png, pr_curves_png
from adapters.vis.report import HtmlReportRenderer
from domain.evaluation import PrecisionCurves
from domain.objects import GeometryKind
from ports.rendering import (
    GT_COLOR,
    PRED_COLOR,
    ImageRenderer,
    OverlayObject,
    OverlayRole,
    OverlayStyle,
    ReportFigure,
    ReportPage,
    ReportRenderer,
)

BBOX, POLY = GeometryKind.BBOX, GeometryKind.POLY
GT, PRED = OverlayRole.GT, OverlayRole.PRED
NO_LEGEND = OverlayStyle(legend=False)
GREEN = (0x2C, 0xA0, 0x2C)
RED = (0xD6, 0x27, 0x28)
Mask = npt.NDArray[np.bool_]


def blank(width: int, height: int, color: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def pixels(png: bytes) -> npt.NDArray[np.uint8]:
    """An overlay PNG's pixels (overlays are saved as RGB, §5)."""
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image).copy()


def plot_pixels(png: bytes) -> npt.NDArray[np.uint8]:
    """A plot PNG's pixels as RGB (matplotlib writes opaque RGBA)."""
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).copy()


def exact(array: npt.NDArray[np.uint8], rgb: tuple[int, int, int]) -> Mask:
    return np.all(array == np.array(rgb, dtype=np.uint8), axis=-1)


def ring(width: int, height: int, box: tuple[int, int, int, int], stroke: int = 3) -> Mask:
    """Pixels of a ``stroke``-wide outline drawn inside the inclusive box ``[x1, y1, x2, y2]``."""
    x1, y1, x2, y2 = box
    ys, xs = np.mgrid[0:height, 0:width]
    inside = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
    near_edge = (xs < x1 + stroke) | (xs > x2 - stroke) | (ys < y1 + stroke) | (ys > y2 - stroke)
    return inside & near_edge


def test_the_spec_colours_are_the_port_defaults() -> None:
    style = OverlayStyle()
    assert (GT_COLOR, PRED_COLOR, style.line_width) == ("#2ca02c", "#d62728", 3)
    assert style.color_of(GT) == GT_COLOR and style.color_of(PRED) == PRED_COLOR


def test_box_strokes_lie_exactly_on_the_box_edges_in_their_colours() -> None:
    gt_box, pred_box = (5, 4, 20, 15), (24, 8, 37, 27)
    objects = [
        OverlayObject(GT, BBOX, gt_box, ""),
        OverlayObject(PRED, BBOX, pred_box, ""),
    ]
    out = pixels(PillowImageRenderer().overlay_png(blank(40, 30), objects, NO_LEGEND))
    assert out.shape == (30, 40, 3)  # never resized
    assert np.array_equal(exact(out, GREEN), ring(40, 30, gt_box))
    assert np.array_equal(exact(out, RED), ring(40, 30, pred_box))
    untouched = ~(ring(40, 30, gt_box) | ring(40, 30, pred_box))
    assert not out[untouched].any()  # everything else stays black
    assert tuple(out[9, 6]) == GREEN and tuple(out[10, 12]) == (0, 0, 0)  # an edge pixel / the interior


def test_a_prediction_is_drawn_over_a_coinciding_ground_truth() -> None:
    box = (3, 3, 16, 12)
    objects = [OverlayObject(PRED, BBOX, box, ""), OverlayObject(GT, BBOX, box, "")]  # GT listed last
    out = pixels(PillowImageRenderer().overlay_png(blank(20, 16), objects, NO_LEGEND))
    assert np.array_equal(exact(out, RED), ring(20, 16, box))
    assert not exact(out, GREEN).any()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(8, 48),
    st.integers(8, 48),
    st.data(),
)
def test_property_any_box_inside_the_image_colours_exactly_its_ring(
    width: int, height: int, data: st.DataObject
) -> None:
    x1 = data.draw(st.integers(0, width - 1))
    x2 = data.draw(st.integers(x1, width - 1))
    y1 = data.draw(st.integers(0, height - 1))
    y2 = data.draw(st.integers(y1, height - 1))
    role = data.draw(st.sampled_from([GT, PRED]))
    out = draw_overlay(blank(width, height), [OverlayObject(role, BBOX, (x1, y1, x2, y2), "")], NO_LEGEND)
    array = np.asarray(out)
    color = GREEN if role is GT else RED
    assert array.shape == (height, width, 3)
    assert np.array_equal(exact(array, color), ring(width, height, (x1, y1, x2, y2)))


def test_polygon_is_a_closed_polyline() -> None:
    square = (10, 10, 50, 10, 50, 50, 10, 50)  # the closing edge x=10 exists only if the ring is closed
    out = pixels(
        PillowImageRenderer().overlay_png(blank(60, 60), [OverlayObject(PRED, POLY, square, "")], NO_LEGEND)
    )
    red = exact(out, RED)
    assert red[30, 10] and red[10, 30] and red[30, 50] and red[50, 30]  # all four edges, closing one included
    assert not red[30, 30] and not red[30, 20] and not red[2, 2]  # inside and outside stay clear
    assert not exact(out, GREEN).any()


def test_image_pixels_are_kept_as_stored_under_a_legend_strip() -> None:
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8), "RGB")
    objects = [OverlayObject(GT, BBOX, (5, 5, 20, 20), "")]
    with_legend = pixels(PillowImageRenderer().overlay_png(source, objects, OverlayStyle()))
    without = pixels(PillowImageRenderer().overlay_png(source, objects, NO_LEGEND))
    assert with_legend.shape[1] == 40 and with_legend.shape[0] > 30  # strip below, width unchanged
    assert np.array_equal(with_legend[:30], without)
    strip = with_legend[30:]
    assert exact(strip, GREEN).any() and exact(strip, RED).any()  # the key shows both colours
    far = ~ring(40, 30, (5, 5, 20, 20))
    assert np.array_equal(without[far], np.asarray(source)[far])  # untouched pixels are the source's


def test_labels_gt_above_and_prediction_below_the_box() -> None:
    gt_box, pred_box = (40, 60, 100, 100), (120, 60, 180, 100)
    objects = [
        OverlayObject(GT, BBOX, gt_box, "chair"),
        OverlayObject(PRED, BBOX, pred_box, "table", 0.913402),
    ]
    out = pixels(PillowImageRenderer().overlay_png(blank(200, 200), objects, NO_LEGEND))
    above_gt = out[40:60, 40:101]
    below_gt = out[101:125, 40:101]
    above_pred = out[40:60, 120:181]
    below_pred = out[101:125, 120:181]
    assert above_gt.any() and not below_gt.any()
    assert below_pred.any() and not above_pred.any()
    # label backgrounds are translucent blends, so the exact colours still mark only the strokes
    assert np.array_equal(exact(out, GREEN), ring(200, 200, gt_box))
    assert np.array_equal(exact(out, RED), ring(200, 200, pred_box))
    # the label backgrounds carry the role's hue
    assert above_gt[..., 1].astype(int).sum() > above_gt[..., 0].astype(int).sum()
    assert below_pred[..., 0].astype(int).sum() > below_pred[..., 1].astype(int).sum()


def test_label_text_of_predictions_carries_the_score() -> None:
    assert OverlayObject(PRED, BBOX, (0, 0, 1, 1), "chair", 0.913402).label == "chair 0.91"
    assert OverlayObject(PRED, BBOX, (0, 0, 1, 1), "chair").label == "chair"
    assert OverlayObject(GT, BBOX, (0, 0, 1, 1), "chair", 0.5).label == "chair"


def test_labels_stay_inside_the_image_at_its_borders() -> None:
    objects = [
        OverlayObject(GT, BBOX, (0, 0, 30, 20), "a long ground truth description"),
        OverlayObject(PRED, BBOX, (10, 40, 63, 47), "a long prediction description", 0.5),
    ]
    out = draw_overlay(blank(64, 48), objects, NO_LEGEND)
    assert out.size == (64, 48)


def test_malformed_geometry_is_refused() -> None:
    with pytest.raises(ValueError, match="4 values"):
        draw_overlay(blank(10, 10), [OverlayObject(GT, BBOX, (1, 2, 3), "")], NO_LEGEND)
    with pytest.raises(ValueError, match=">= 6"):
        draw_overlay(blank(10, 10), [OverlayObject(GT, POLY, (1, 2, 3, 4), "")], NO_LEGEND)


def test_the_renderers_satisfy_their_ports() -> None:
    renderer: ImageRenderer = PillowImageRenderer()
    report: ReportRenderer = HtmlReportRenderer()
    assert callable(renderer.overlay_png) and callable(report.report_html)
    with pytest.raises(TypeError, match="PIL"):
        renderer.overlay_png(np.zeros((4, 4, 3), dtype=np.uint8), [], NO_LEGEND)  # type: ignore[arg-type]


# --- plots ------------------------------------------------------------------------------------------


def has_color(png: bytes, hex_color: str) -> bool:
    rgb = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return bool(exact(plot_pixels(png), rgb).any())  # type: ignore[arg-type]


def color_count(png: bytes, hex_color: str) -> int:
    rgb = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return int(exact(plot_pixels(png), rgb).sum())  # type: ignore[arg-type]


def test_pr_curves_plot_draws_defined_curves_and_gaps_for_undefined() -> None:
    recall = tuple(i / 100 for i in range(101))
    line = tuple(1.0 - r / 2 for r in recall)
    png = pr_curves_png(PrecisionCurves(recall, (("0.50", line),)), {"0.50": "IoU 0.50 (AP 0.750)"}, "PR")
    assert plot_pixels(png).shape == (480, 640, 3)
    undefined = pr_curves_png(PrecisionCurves(recall, (("0.50", (-1.0,) * 101),)), {}, "PR")
    half = pr_curves_png(PrecisionCurves(recall, (("0.50", line[:50] + (-1.0,) * 51),)), {}, "PR")
    full, gap, none = (color_count(x, "#1f77b4") for x in (png, half, undefined))
    # matplotlib's first colour: the legend swatch only, then half a line, then the whole line
    assert none < gap < full and full > 5 * none


def test_pr_curves_plot_refuses_a_curve_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="recall thresholds"):
        pr_curves_png(PrecisionCurves((0.0, 1.0), (("0.50", (1.0,)),)), {}, "PR")


def test_bar_charts_show_bars_only_for_non_zero_values_and_grow_with_rows() -> None:
    assert has_color(per_class_ap_png([("cat", 0.5), ("dog", 0.25)], "AP"), BAR_COLOR)
    assert not has_color(per_class_ap_png([], "AP"), BAR_COLOR)
    assert has_color(drop_counts_png([("wrong_arity", 3), ("other", 0)], "drops"), DROP_COLOR)
    assert not has_color(drop_counts_png([("wrong_arity", 0), ("other", 0)], "drops"), DROP_COLOR)
    few = plot_pixels(drop_counts_png([(f"c{i}", i) for i in range(3)], "drops"))
    many = plot_pixels(drop_counts_png([(f"c{i}", i) for i in range(60)], "drops"))
    assert many.shape[0] > few.shape[0]


# --- report page ------------------------------------------------------------------------------------


def test_report_page_links_its_images_and_escapes_text() -> None:
    page = ReportPage(
        title="report <1>",
        figures=(
            ReportFigure("PR", "report_pr_curves.png", "note & more"),
            ReportFigure("AP", None, "missing"),
        ),
        metrics=(("bbox_AP", "0.5000"),),
        counters=(("images", "3"),),
        notes=("<script>alert(1)</script>",),
    )
    text = HtmlReportRenderer().report_html(page)
    assert re.findall(r'<img src="([^"]+)"', text) == ["report_pr_curves.png"]
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "report &lt;1&gt;" in text and "note &amp; more" in text
    assert "<td>bbox_AP</td>" in text and ">0.5000</td>" in text and "<td>images</td>" in text
    assert text.startswith("<!DOCTYPE html>") and text.endswith("</html>\n")
