"""Geometry in bins (data.md §2.3-2.4, stage2.md §6 step 4): canonical polygons, bridging, IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from domain.codec import pixels_to_bins
from domain.errors import GeometryError
from domain.geometry import (
    BBox,
    Polygon,
    bbox_to_quad,
    box_iou,
    canonicalize_polygon,
    is_simple_polygon,
    mask_iou,
    masks_iou,
    poly_to_bbox,
    polygon_area,
    polygon_canonical_problem,
    rasterize_ring,
    rasterize_shape,
    shoelace_area2,
)
from domain.objects import GeometryKind

BBOX, POLY = GeometryKind.BBOX, GeometryKind.POLY

SQUARE_INPUT = [0, 0, 0, 10, 10, 10, 10, 0, 0, 0]
L_SHAPE_INPUT = [10, 30, 10, 10, 50, 10, 50, 20, 20, 20, 20, 30]
L_SHAPE_CANONICAL = (10, 10, 50, 10, 50, 20, 20, 20, 20, 30, 10, 30)
# What an angle sort around the centroid produces (data.md §2.4): a different region.
L_SHAPE_ANGLE_SORTED = [10, 10, 20, 20, 10, 30, 20, 30, 50, 20, 50, 10]

# ---------------------------------------------------------------------------------------------
# Canonical form: worked examples (acceptance test 9)


def test_square_example() -> None:
    assert canonicalize_polygon(SQUARE_INPUT) == (0, 0, 10, 0, 10, 10, 0, 10)


def test_l_shape_example() -> None:
    assert canonicalize_polygon(L_SHAPE_INPUT) == L_SHAPE_CANONICAL
    assert is_simple_polygon(L_SHAPE_CANONICAL)
    assert polygon_area(L_SHAPE_CANONICAL) == 500.0
    assert polygon_area(L_SHAPE_ANGLE_SORTED) != polygon_area(L_SHAPE_CANONICAL)
    # Same vertex set, so only adjacency tells them apart.
    assert sorted(zip(L_SHAPE_CANONICAL[0::2], L_SHAPE_CANONICAL[1::2])) == sorted(
        zip(L_SHAPE_ANGLE_SORTED[0::2], L_SHAPE_ANGLE_SORTED[1::2])
    )


def test_converter_worked_polygon_is_already_canonical() -> None:
    # data.md §9.5: bins (16,23),(469,47),(313,938), A2 = 407367 > 0.
    flat = [16, 23, 469, 47, 313, 938]
    assert shoelace_area2(flat) == 407367
    assert canonicalize_polygon(flat) == tuple(flat)
    assert polygon_canonical_problem(flat) is None


def test_rule_1_drops_repeats_cyclically() -> None:
    # Repeated closing vertex, consecutive duplicates, and a duplicate of the first at the end.
    assert canonicalize_polygon([0, 0, 10, 0, 10, 0, 10, 10, 0, 10, 0, 0, 0, 0]) == (
        0,
        0,
        10,
        0,
        10,
        10,
        0,
        10,
    )


def test_rule_2_degenerate_rings() -> None:
    assert canonicalize_polygon([0, 0, 5, 5, 10, 10]) is None  # collinear
    assert canonicalize_polygon([0, 0, 5, 5, 0, 0, 5, 5]) is None  # two distinct vertices
    assert canonicalize_polygon([3, 3, 3, 3, 3, 3]) is None


def test_acceptance_10_collinear_after_rounding_is_degenerate() -> None:
    # Pixels (0, 0), (1, 1.2), (2, 2) at 1000 x 1000 are not collinear, but their bins are.
    bins = pixels_to_bins([0, 0, 1, 1.2, 2, 2], 1000, 1000)
    assert bins == [0, 0, 1, 1, 2, 2]
    assert canonicalize_polygon(bins) is None


def test_odd_length_is_an_error() -> None:
    with pytest.raises(GeometryError, match="even length"):
        canonicalize_polygon([0, 0, 1])


@pytest.mark.parametrize(
    ("flat", "fragment"),
    [
        ([0, 0, 10, 0, 10, 10, 0, 10, 0, 0], "repeated closing vertex"),
        ([0, 0, 10, 0, 10, 0, 10, 10], "vertex 2 repeats its predecessor"),
        ([0, 0, 5, 5, 10, 10], "zero area"),
        ([0, 0, 0, 10, 10, 10, 10, 0], "counter-clockwise"),
        ([10, 0, 10, 10, 0, 10, 0, 0], "smallest (y, x), which is vertex 3 (0, 0)"),
    ],
)
def test_canonical_problem_names_the_rule(flat: list[int], fragment: str) -> None:
    problem = polygon_canonical_problem(flat)
    assert problem is not None and fragment in problem


def test_first_occurrence_of_a_repeated_minimum_vertex() -> None:
    # Two clockwise loops touching at (5, 0) (not simple, but canonicalisation is still defined):
    # the ring starts at the first of the two occurrences of the smallest (y, x).
    flat = [1, 4, 5, 0, 6, 8, 4, 8, 5, 0, 9, 4]
    canon = canonicalize_polygon(flat)
    assert canon == (5, 0, 6, 8, 4, 8, 5, 0, 9, 4, 1, 4)
    assert canonicalize_polygon(list(canon)) == canon


# ---------------------------------------------------------------------------------------------
# Canonical form: properties on random simple (star-shaped) polygons


@st.composite
def star_polygons(draw: st.DrawFn) -> list[int]:
    """Star-shaped rings around a centre: distinct angles in ascending order, random radii,
    rounded to bins; kept only if still simple after rounding. Random start and orientation."""
    n = draw(st.integers(min_value=3, max_value=12))
    cx = draw(st.integers(min_value=200, max_value=800))
    cy = draw(st.integers(min_value=200, max_value=800))
    angles = sorted(draw(st.lists(st.integers(0, 359), min_size=n, max_size=n, unique=True)))
    radii = draw(st.lists(st.integers(10, 199), min_size=n, max_size=n))
    pts = [
        (round(cx + r * math.cos(math.radians(a))), round(cy + r * math.sin(math.radians(a))))
        for a, r in zip(angles, radii)
    ]
    if draw(st.booleans()):
        pts.reverse()
    start = draw(st.integers(0, n - 1))
    pts = pts[start:] + pts[:start]
    flat = [c for p in pts for c in p]
    assume(is_simple_polygon(flat))
    return flat


def _cyclic_equal(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return len(a) == len(b) and any(a == b[i:] + b[:i] for i in range(len(b)))


@settings(max_examples=200)
@given(star_polygons())
def test_canonical_form_properties(flat: list[int]) -> None:
    canon = canonicalize_polygon(flat)
    assert canon is not None
    # Idempotent and reported canonical by the loader's check.
    assert canonicalize_polygon(list(canon)) == canon
    assert polygon_canonical_problem(list(canon)) is None
    # Never self-intersecting when the input is simple.
    assert is_simple_polygon(canon)
    # Clockwise on screen, same area, starting at the smallest (y, x).
    assert shoelace_area2(canon) == abs(shoelace_area2(flat)) > 0
    pts = list(zip(canon[0::2], canon[1::2]))
    assert (pts[0][1], pts[0][0]) == min((y, x) for x, y in pts)
    # Adjacency preserved: the same cyclic sequence, possibly reversed (never re-sorted).
    original = list(zip(flat[0::2], flat[1::2]))
    assert _cyclic_equal(pts, original) or _cyclic_equal(pts, original[::-1])


@given(st.lists(st.integers(0, 40), min_size=6, max_size=16).filter(lambda v: len(v) % 2 == 0))
def test_problem_is_none_exactly_for_fixed_points(flat: list[int]) -> None:
    canon = canonicalize_polygon(flat)
    assert (polygon_canonical_problem(flat) is None) == (canon == tuple(flat))
    if canon is not None:
        assert canonicalize_polygon(list(canon)) == canon


def test_is_simple_polygon_cases() -> None:
    assert is_simple_polygon([0, 0, 10, 0, 10, 10, 0, 10])
    assert not is_simple_polygon([0, 0, 10, 10, 10, 0, 0, 10])  # bow tie
    assert not is_simple_polygon([0, 0, 10, 0, 5, 0])  # folds back on itself
    assert not is_simple_polygon([0, 0, 10, 0, 10, 10, 0, 0, 0, 10])  # repeated vertex
    assert not is_simple_polygon([0, 0, 10, 0, 10, 10, 6, 10, 5, 0, 4, 10, 0, 10])  # vertex touches an edge
    assert is_simple_polygon([0, 0, 10, 0, 10, 10, 6, 10, 5, 1, 4, 10, 0, 10])  # ... and just misses it
    assert not is_simple_polygon([0, 0, 10, 0])


# ---------------------------------------------------------------------------------------------
# Value objects and bridging helpers (acceptance test 8)


def test_poly_to_bbox_and_bbox_to_quad_documented_values() -> None:
    assert poly_to_bbox(L_SHAPE_CANONICAL) == (10, 10, 50, 30)
    assert poly_to_bbox([16, 23, 469, 47, 313, 938]) == (16, 23, 469, 938)
    assert bbox_to_quad([1, 2, 3, 4]) == (1, 2, 3, 2, 3, 4, 1, 4)
    assert poly_to_bbox([1.5, 2.0, 0.5, 3.0, 2.0, 2.5]) == (0.5, 2.0, 2.0, 3.0)
    # The quad is clockwise on screen and canonical already.
    assert canonicalize_polygon(bbox_to_quad([10, 20, 30, 40])) == (10, 20, 30, 20, 30, 40, 10, 40)


def test_value_objects() -> None:
    box = BBox(1, 2, 3, 4)
    assert box.flat == (1, 2, 3, 4) and box.to_quad() == (1, 2, 3, 2, 3, 4, 1, 4)
    assert BBox(5, 5, 5, 9).is_degenerate and not box.is_degenerate
    with pytest.raises(GeometryError, match="x1 <= x2"):
        BBox(5, 0, 4, 1)
    with pytest.raises(GeometryError, match="out of range"):
        BBox(0, 0, 1000, 1)
    with pytest.raises(GeometryError, match="integer"):
        BBox(True, 0, 1, 1)
    poly = Polygon([10, 10, 50, 10, 50, 20])
    assert poly.vertices == ((10, 10), (50, 10), (50, 20))
    assert poly.to_bbox() == BBox(10, 10, 50, 20)
    with pytest.raises(GeometryError, match="at least 6"):
        Polygon([1, 2, 3, 4])


def test_polygon_area() -> None:
    assert polygon_area([0, 0, 10, 0, 10, 10, 0, 10]) == 100.0
    assert polygon_area([0, 0, 0, 10, 10, 10, 10, 0]) == 100.0
    assert polygon_area(L_SHAPE_CANONICAL) == 40 * 10 + 10 * 10


# ---------------------------------------------------------------------------------------------
# Box IoU


def test_box_iou_values() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert box_iou([0, 0, 0, 10], [0, 0, 0, 10]) == 0.0  # empty union
    # stage2.md §7.4: pred0 vs GT0 0.980, vs GT2 0.09.
    assert box_iou([118, 302, 421, 698], [120, 300, 420, 700]) == pytest.approx(0.980, abs=5e-4)
    assert box_iou([118, 302, 421, 698], [50, 600, 300, 980]) == pytest.approx(0.09, abs=5e-3)


boxes = st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)).map(
    lambda t: (min(t[0], t[2]), min(t[1], t[3]), max(t[0], t[2]), max(t[1], t[3]))
)


@given(boxes, boxes)
def test_box_iou_symmetric_and_bounded(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    assert box_iou(a, b) == box_iou(b, a)
    assert 0.0 <= box_iou(a, b) <= 1.0


# ---------------------------------------------------------------------------------------------
# Mask IoU on the virtual canvas


def test_mask_iou_worked_example_of_stage2() -> None:
    # stage2.md §7.4: mask IoU at R = 256 of pred0 vs GT0 is 0.977.
    assert mask_iou([118, 302, 421, 698], BBOX, [120, 300, 420, 700], BBOX, 256) == pytest.approx(
        0.977, abs=5e-4
    )


@given(boxes, boxes)
def test_mask_iou_of_integer_boxes_equals_box_iou_on_the_identity_canvas(
    a: tuple[int, ...], b: tuple[int, ...]
) -> None:
    # At R = 1000 the scale (R-1)/999 is exactly 1 and an integer box covers exactly its area in
    # pixel centres, so the raster IoU must equal the analytic box IoU.
    assert mask_iou(a, BBOX, b, BBOX, 1000) == pytest.approx(box_iou(a, b), abs=1e-12)


def test_mask_iou_bbox_equals_its_quad_polygon() -> None:
    a, b = [100, 120, 400, 500], [10, 10, 300, 20, 350, 450, 20, 400]
    assert mask_iou(a, BBOX, b, POLY, 256) == mask_iou(list(bbox_to_quad(a)), POLY, b, POLY, 256)
    assert mask_iou(a, BBOX, a, BBOX, 256) == 1.0
    assert mask_iou(a, BBOX, [600, 600, 900, 900], BBOX, 256) == 0.0


def test_mask_iou_failures_are_zero() -> None:
    good = [0, 0, 500, 500]
    assert mask_iou([1, 2, 3], BBOX, good, BBOX, 64) == 0.0
    assert mask_iou([1, 2, 3, 4], POLY, good, BBOX, 64) == 0.0  # < 3 points
    assert mask_iou([1, 2, 3, 4, 5], POLY, good, BBOX, 64) == 0.0  # odd length
    assert mask_iou([0, 0, float("nan"), 5], BBOX, good, BBOX, 64) == 0.0
    assert mask_iou([5, 5, 5, 9], BBOX, [5, 5, 5, 9], BBOX, 64) == 0.0  # empty union
    assert mask_iou(good, "line", good, BBOX, 64) == 0.0
    assert mask_iou(["a", 1, 2, 3], BBOX, good, BBOX, 64) == 0.0  # type: ignore[list-item]
    assert mask_iou(good, "bbox_2d", good, "bbox_2d", 64) == 1.0
    with pytest.raises(GeometryError, match="resolution"):
        mask_iou(good, BBOX, good, BBOX, 1)


def test_cached_masks_give_the_same_iou() -> None:
    a, b = [100, 120, 400, 500], [10, 10, 300, 20, 350, 450, 20, 400]
    mask_a, mask_b = rasterize_shape(a, BBOX, 128), rasterize_shape(b, POLY, 128)
    assert mask_a is not None and mask_a.shape == (128, 128)
    assert masks_iou(mask_a, mask_b) == mask_iou(a, BBOX, b, POLY, 128)
    assert rasterize_shape([1, 2], POLY, 128) is None
    assert masks_iou(None, mask_b) == 0.0


def test_mask_iou_clamps_to_the_bin_range() -> None:
    assert mask_iou([-50, -50, 1200, 1200], BBOX, [0, 0, 999, 999], BBOX, 64) == 1.0


def test_rasterised_square_covers_pixel_centres() -> None:
    # A ring from (1, 1) to (4, 3) on a 6 x 5 canvas covers columns 1..3, rows 1..2.
    mask = rasterize_ring(np.array([[1.0, 1.0], [4.0, 1.0], [4.0, 3.0], [1.0, 3.0]]), 5, 6)
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True
    assert (mask == expected).all()


@st.composite
def random_rings(draw: st.DrawFn) -> list[int]:
    n = draw(st.integers(3, 9))
    return draw(st.lists(st.integers(-20, 1020), min_size=2 * n, max_size=2 * n))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@settings(max_examples=150, deadline=None)
@given(random_rings(), random_rings(), st.sampled_from([16, 37, 100, 256]))
def test_mask_iou_equals_pycocotools(a: list[int], b: list[int], resolution: int) -> None:
    """stage2.md §6.4: the numpy rasteriser equals pycocotools frPyObjects / merge / iou, also on
    self-intersecting rings and coordinates clamped at the canvas edge."""
    mask_api = pytest.importorskip("pycocotools.mask")

    def rle(flat: list[int]) -> object:
        scaled = [min(max(float(v), 0.0), 999.0) * float(resolution - 1) / 999.0 for v in flat]
        return mask_api.merge(mask_api.frPyObjects([scaled], resolution, resolution))

    expected = float(mask_api.iou([rle(a)], [rle(b)], [0])[0][0])
    assert mask_iou(a, POLY, b, POLY, resolution) == expected
    ours = rasterize_ring(
        (np.clip(np.asarray(a, dtype=float), 0, 999) * (resolution - 1) / 999).reshape(-1, 2),
        resolution,
        resolution,
    )
    assert (ours == mask_api.decode(rle(a)).astype(bool)).all()


# ---------------------------------------------------------------------------------------------
# pairwise_box_iou: the vectorised box_iou (stage2.md §6 candidate pruning)

_xyxy = st.lists(st.integers(-5, 60), min_size=4, max_size=4)


@settings(max_examples=200, deadline=None)
@given(a=st.lists(_xyxy, max_size=6), b=st.lists(_xyxy, max_size=6))
def test_pairwise_box_iou_equals_box_iou_exactly(a: list[list[int]], b: list[list[int]]) -> None:
    from domain.geometry import pairwise_box_iou

    arr_a = np.asarray(a, dtype=np.int64).reshape(-1, 4)
    out = pairwise_box_iou(arr_a, np.asarray(b, dtype=np.int64).reshape(-1, 4))
    assert out.shape == (len(a), len(b))
    for i, box_a in enumerate(a):
        for j, box_b in enumerate(b):
            assert out[i, j] == box_iou(box_a, box_b)


# ---------------------------------------------------------------------------------------------
# The closed-form bbox mask (box_mask_spans / span_mask_iou): the matching fast path


@st.composite
def box_pairs(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Two boxes, corners in any order: random, degenerate (zero or sub-pixel extent), touching or
    nearly touching the first, or on / beyond the canvas border (clamped)."""
    coord = st.one_of(st.integers(0, 999), st.sampled_from([-20, 0, 1, 998, 999, 1020]))
    a = [draw(coord) for _ in range(4)]
    how = draw(st.sampled_from(["random", "tiny", "touching", "shifted"]))
    if how == "random":
        b = [draw(coord) for _ in range(4)]
    elif how == "tiny":
        x, y = draw(st.integers(0, 999)), draw(st.integers(0, 999))
        b = [x, y, min(999, x + draw(st.integers(0, 3))), min(999, y + draw(st.integers(0, 3)))]
    elif how == "touching":  # b starts where a ends, along x or y
        x1, y1, x2, y2 = min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3])
        if draw(st.booleans()):
            b = [x2, y1, x2 + draw(st.integers(0, 40)), y2]
        else:
            b = [x1, y2, x2, y2 + draw(st.integers(0, 40))]
    else:  # a copy moved by a few bins, below or around one pixel at most resolutions
        b = [v + draw(st.integers(-4, 4)) for v in a]
    return a, b


_resolutions = st.one_of(st.sampled_from([2, 3, 16, 37, 100, 256, 999, 1000]), st.integers(2, 400))


@settings(max_examples=400, deadline=None)
@given(box_pairs(), _resolutions)
def test_box_spans_equal_the_raster_path_exactly(pair: tuple[list[int], list[int]], resolution: int) -> None:
    from domain.geometry import box_mask_spans, span_mask_iou

    a, b = pair
    mask_a, mask_b = rasterize_shape(a, BBOX, resolution), rasterize_shape(b, BBOX, resolution)
    spans = box_mask_spans([a, b], resolution)
    for flat, mask, (c0, c1, r0, r1) in ((a, mask_a, spans[0]), (b, mask_b, spans[1])):
        expected = np.zeros((resolution, resolution), dtype=bool)
        expected[r0:r1, c0:c1] = True
        assert mask is not None and (mask == expected).all(), (flat, resolution)
    # The same float, not merely close: matching's gate and costs must not move.
    assert float(span_mask_iou(spans[0], spans[1])) == masks_iou(mask_a, mask_b)
    assert float(span_mask_iou(spans[0], spans[1])) == mask_iou(a, BBOX, b, BBOX, resolution)
    pairwise = span_mask_iou(spans[:, None, :], spans[None, :, :])
    assert pairwise.shape == (2, 2) and pairwise[0, 1] == pairwise[1, 0] == masks_iou(mask_a, mask_b)


def test_box_spans_worked_values() -> None:
    from domain.geometry import box_mask_spans, span_mask_iou

    # stage2.md §7.4 at R = 256: the same IoU as the raster path.
    spans = box_mask_spans([[118, 302, 421, 698], [120, 300, 420, 700]], 256)
    assert float(span_mask_iou(spans[0], spans[1])) == mask_iou(
        [118, 302, 421, 698], BBOX, [120, 300, 420, 700], BBOX, 256
    )
    # Zero width or height: an empty mask, IoU 0 even with itself.
    empty = box_mask_spans([[5, 5, 5, 900]], 64)[0]
    assert float(span_mask_iou(empty, empty)) == 0.0
    # The full canvas leaves the last column and row empty, as COCO's rasteriser does.
    assert box_mask_spans([[0, 0, 999, 999]], 64).tolist() == [[0, 63, 0, 63]]
    with pytest.raises(GeometryError, match="resolution"):
        box_mask_spans([[0, 0, 1, 1]], 1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@settings(max_examples=150, deadline=None)
@given(box_pairs(), st.sampled_from([16, 37, 100, 256]))
def test_box_spans_equal_pycocotools(pair: tuple[list[int], list[int]], resolution: int) -> None:
    """stage2.md §6.4 for the fast path: the closed-form bbox masks and their IoU equal pycocotools
    ``frPyObjects`` / ``merge`` / ``iou`` on the boxes' 4-corner quads."""
    from domain.geometry import box_mask_spans, span_mask_iou

    mask_api = pytest.importorskip("pycocotools.mask")

    def rle(flat: list[int]) -> object:
        quad = bbox_to_quad(flat)
        scaled = [min(max(float(v), 0.0), 999.0) * float(resolution - 1) / 999.0 for v in quad]
        return mask_api.merge(mask_api.frPyObjects([scaled], resolution, resolution))

    a, b = pair
    spans = box_mask_spans([a, b], resolution)
    expected = float(mask_api.iou([rle(a)], [rle(b)], [0])[0][0])
    assert float(span_mask_iou(spans[0], spans[1])) == expected
    c0, c1, r0, r1 = spans[0]
    ours = np.zeros((resolution, resolution), dtype=bool)
    ours[r0:r1, c0:c1] = True
    assert (ours == mask_api.decode(rle(a)).astype(bool)).all()
