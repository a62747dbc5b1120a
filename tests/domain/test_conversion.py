"""The converter's pure core: data.md §9.5 (geometry, worked example), §9.6 (descs), §9.8 (reasons),
§9.3 steps 3/5/6 (per-image decisions), test 10 (degenerate polygon fallback per mode)."""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from domain.codec import bin_to_pixel, bins_to_pixels
from domain.conversion import (
    ConversionDrop,
    ConversionFallback,
    GeometryMode,
    GeometrySettings,
    MultipartPolicy,
    SourceFormat,
    category_desc,
    convert_annotation,
    convert_image,
    output_file_name,
    parse_annotation,
    parse_category,
    parse_image,
)
from domain.errors import ConversionError
from domain.geometry import canonicalize_polygon, is_simple_polygon
from domain.objects import GeometryKind
from domain.ordering import first_order_violation
from domain.resize import ImageSize

SRC = ImageSize(640, 427)
DST = ImageSize(640, 416)
CATS = {1: "cat", 2: "dog"}
BBOX = GeometrySettings()
POLY = GeometrySettings(geometry=GeometryMode.POLY)
PREFERRED = GeometrySettings(geometry=GeometryMode.POLY_PREFERRED)


def ann(text_or_dict: str | dict[str, Any], index: int = 0) -> Any:
    """Parse an annotation the way the converter does: JSON floats as Decimal."""
    raw = text_or_dict if isinstance(text_or_dict, str) else json.dumps(text_or_dict)
    return parse_annotation(json.loads(raw, parse_float=Decimal), index)


def base(**extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100], "iscrowd": 0}
    out.update(extra)
    return out


# ----------------------------------------------------------------------------------------------
# Worked example of §9.5


def test_worked_bbox_example_of_9_5() -> None:
    a = ann('{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100.5, 200.25, 50.0, 80.0], "iscrowd": 0}')
    out = convert_annotation(a, CATS, SRC, DST, BBOX)
    assert out.drop is None and len(out.objects) == 1
    obj = out.objects[0]
    assert obj.kind is GeometryKind.BBOX and obj.bins == (157, 469, 236, 658)
    assert bins_to_pixels(list(obj.bins), 640, 416) == [100, 195, 151, 273]
    assert (obj.category_id, obj.ann_id, obj.desc) == (1, 1, "cat")


@pytest.mark.parametrize("settings", [POLY, PREFERRED])
def test_worked_polygon_example_of_9_5(settings: GeometrySettings) -> None:
    a = ann(base(segmentation=[[10, 10, 300, 20, 200, 400]]))
    out = convert_annotation(a, CATS, SRC, DST, settings)
    assert [o.bins for o in out.objects] == [(16, 23, 469, 47, 313, 938)]
    assert out.objects[0].kind is GeometryKind.POLY
    assert out.fallbacks == ()


def test_bbox_mode_ignores_the_polygon() -> None:
    a = ann(base(segmentation=[[10, 10, 300, 20, 200, 400]]))
    out = convert_annotation(a, CATS, SRC, DST, BBOX)
    assert out.objects[0].kind is GeometryKind.BBOX


def test_exact_decimals_differ_from_float_arithmetic() -> None:
    # At W = 1000 (no resize), x2 = 125 must give bin 125 (float: 126) and x1 = 63 bin 63 (float: 62).
    size = ImageSize(1000, 1000)
    a = ann(base(bbox=[63, 63, 62, 62]))
    out = convert_annotation(a, CATS, size, size, BBOX)
    assert out.objects[0].bins == (63, 63, 125, 125)


# ----------------------------------------------------------------------------------------------
# Drops


def test_nonpositive_size_and_outside_image() -> None:
    assert convert_annotation(ann(base(bbox=[5, 5, 0, 10])), CATS, SRC, DST, BBOX).drop is ConversionDrop.NONPOSITIVE_SIZE
    assert convert_annotation(ann(base(bbox=[5, 5, 10, -1])), CATS, SRC, DST, BBOX).drop is ConversionDrop.NONPOSITIVE_SIZE
    assert convert_annotation(ann(base(bbox=[640, 5, 10, 10])), CATS, SRC, DST, BBOX).drop is ConversionDrop.OUTSIDE_IMAGE
    assert convert_annotation(ann(base(bbox=[-20, 5, 20, 10])), CATS, SRC, DST, BBOX).drop is ConversionDrop.OUTSIDE_IMAGE


def test_box_is_clipped_to_the_image_then_clamped() -> None:
    out = convert_annotation(ann(base(bbox=[-10, -10, 1000, 1000])), CATS, SRC, DST, BBOX)
    assert out.objects[0].bins == (0, 0, 999, 999)


def test_unknown_category_and_crowd() -> None:
    assert convert_annotation(ann(base(category_id=9)), CATS, SRC, DST, BBOX).drop is ConversionDrop.UNKNOWN_CATEGORY
    crowd = ann(base(iscrowd=1, segmentation={"counts": "abc", "size": [427, 640]}))
    assert convert_annotation(crowd, CATS, SRC, DST, PREFERRED).drop is ConversionDrop.CROWD
    kept = convert_annotation(crowd, CATS, SRC, DST, GeometrySettings(geometry=GeometryMode.POLY, drop_crowd=False))
    assert kept.drop is None and kept.objects[0].kind is GeometryKind.BBOX


def test_rle_segmentation_has_no_polygon() -> None:
    rle = ann(base(segmentation={"counts": [1, 2], "size": [427, 640]}))
    assert convert_annotation(rle, CATS, SRC, DST, POLY).drop is ConversionDrop.NO_POLYGON
    assert convert_annotation(rle, CATS, SRC, DST, PREFERRED).objects[0].kind is GeometryKind.BBOX


def test_unusable_parts_are_ignored() -> None:
    a = ann(base(segmentation=[[1, 2, 3], [1, 2, 3, 4], [700, 10, 800, 10, 750, 100], [10, 10, 300, 20, 200, 400]]))
    out = convert_annotation(a, CATS, SRC, DST, POLY)
    assert [o.bins for o in out.objects] == [(16, 23, 469, 47, 313, 938)]
    assert out.fallbacks == ()  # one usable part: not multi-part


# ----------------------------------------------------------------------------------------------
# Multi-part, degenerate, max points (test 10)

TWO_PARTS = [[10, 10, 20, 10, 20, 20, 10, 20], [100, 100, 300, 100, 300, 300, 100, 300]]


def test_multipart_bbox_policy() -> None:
    a = ann(base(bbox=[10, 10, 290, 290], segmentation=TWO_PARTS))
    out = convert_annotation(a, CATS, SRC, DST, PREFERRED)
    assert out.objects[0].kind is GeometryKind.BBOX
    assert out.fallbacks == (ConversionFallback.POLY_TO_BBOX_MULTIPART,)
    # from the annotation bbox, not from the vertices
    assert out.objects[0].bins == convert_annotation(a, CATS, SRC, DST, BBOX).objects[0].bins
    assert convert_annotation(a, CATS, SRC, DST, POLY).drop is ConversionDrop.NO_POLYGON


def test_multipart_largest_and_split() -> None:
    a = ann(base(segmentation=TWO_PARTS))
    largest = convert_annotation(a, CATS, SRC, DST, attrs_evolve(POLY, poly_multipart=MultipartPolicy.LARGEST))
    assert len(largest.objects) == 1
    assert min(largest.objects[0].bins[0::2]) > 100  # the 200x200 part, not the 10x10 one
    split = convert_annotation(a, CATS, SRC, DST, attrs_evolve(POLY, poly_multipart=MultipartPolicy.SPLIT))
    assert len(split.objects) == 2
    assert {(o.ann_id, o.category_id, o.desc) for o in split.objects} == {(7, 1, "cat")}


def test_largest_ties_take_the_first_part() -> None:
    parts = [[10, 10, 20, 10, 20, 20, 10, 20], [110, 110, 110, 120, 120, 120, 120, 110]]  # same area
    out = convert_annotation(ann(base(segmentation=parts)), CATS, SRC, DST, attrs_evolve(POLY, poly_multipart=MultipartPolicy.LARGEST))
    assert min(out.objects[0].bins[0::2]) < 50


def test_degenerate_polygon_falls_back_per_mode() -> None:
    # not collinear in source pixels (area > 0), collinear after rounding to bins
    a = ann(base(segmentation=[[10, 50, 100, 50.05, 200, 50]]))
    dropped = convert_annotation(a, CATS, SRC, DST, POLY)
    assert dropped.drop is ConversionDrop.DEGENERATE_POLY and dropped.objects == ()
    fallback = convert_annotation(a, CATS, SRC, DST, PREFERRED)
    obj = fallback.objects[0]
    assert obj.kind is GeometryKind.BBOX
    assert ConversionFallback.POLY_TO_BBOX_DEGENERATE in fallback.fallbacks
    # extent-preserving bbox of the scaled vertices: x 10 -> floor(15.6) = 15, 200 -> ceil(312.7) = 313;
    # y 50 -> 48.71 px -> floor(117.26) = 117, 50.05 -> 48.76 px -> ceil(117.38) = 118
    assert obj.bins == (15, 117, 313, 118)
    assert fallback.fallbacks == (ConversionFallback.POLY_TO_BBOX_DEGENERATE,)


def test_degenerate_fallback_box_on_a_bin_boundary_is_nudged() -> None:
    # at 1000x1000 (no resize) pixel 100 is exactly bin 100: a horizontal sliver collapses to y1 == y2
    size = ImageSize(1000, 1000)
    a = ann(base(segmentation=[[10, 100, 500, 100, 900, 100]]))
    out = convert_annotation(a, CATS, size, size, PREFERRED)
    assert out.objects[0].bins == (10, 100, 900, 101)
    assert out.fallbacks == (ConversionFallback.POLY_TO_BBOX_DEGENERATE, ConversionFallback.BBOX_NUDGED)


def test_poly_max_points() -> None:
    square_plus = [[10, 10, 50, 10, 90, 10, 90, 90, 10, 90]]  # 5 vertices, one collinear
    settings = GeometrySettings(geometry=GeometryMode.POLY_PREFERRED, poly_max_points=4)
    out = convert_annotation(ann(base(segmentation=square_plus)), CATS, SRC, DST, settings)
    assert out.objects[0].kind is GeometryKind.BBOX
    assert out.fallbacks == (ConversionFallback.POLY_TO_BBOX_MAX_POINTS,)
    strict = attrs_evolve(settings, geometry=GeometryMode.POLY)
    assert convert_annotation(ann(base(segmentation=square_plus)), CATS, SRC, DST, strict).drop is ConversionDrop.NO_POLYGON
    assert convert_annotation(ann(base(segmentation=square_plus)), CATS, SRC, DST, attrs_evolve(settings, poly_max_points=5)).objects[0].kind is GeometryKind.POLY


def attrs_evolve(settings: GeometrySettings, **changes: Any) -> GeometrySettings:
    import attrs

    return attrs.evolve(settings, **changes)


# ----------------------------------------------------------------------------------------------
# Per-image decisions


def test_image_objects_are_sorted_and_counts_collected() -> None:
    anns = [
        ann(base(id=3, bbox=[300, 300, 10, 10])),
        ann(base(id=1, bbox=[10, 10, 10, 10])),
        ann(base(id=2, bbox=[5, 5, 0, 5])),
        ann(base(id=4, iscrowd=1)),
    ]
    out = convert_image(anns, CATS, SRC, GeometrySettings())
    assert out.kept and out.target == DST
    assert [o.ann_id for o in out.objects] == [1, 3]
    assert first_order_violation([o.det for o in out.objects]) is None
    assert sorted(out.object_drops) == sorted([ConversionDrop.NONPOSITIVE_SIZE, ConversionDrop.CROWD])


def test_max_objects_drops_the_whole_image_and_keep_empty() -> None:
    anns = [ann(base(id=i, bbox=[10 * i, 10, 5, 5])) for i in range(1, 4)]
    assert convert_image(anns, CATS, SRC, GeometrySettings(max_objects=2)).drop is ConversionDrop.TOO_MANY_OBJECTS
    assert convert_image(anns, CATS, SRC, GeometrySettings(max_objects=3)).kept
    assert convert_image([], CATS, SRC, GeometrySettings(keep_empty=False)).drop is ConversionDrop.EMPTY
    only_crowd = [ann(base(iscrowd=1))]
    assert convert_image(only_crowd, CATS, SRC, GeometrySettings(keep_empty=False)).drop is ConversionDrop.EMPTY
    kept_empty = convert_image([], CATS, SRC, GeometrySettings())
    assert kept_empty.kept and kept_empty.objects == ()


def test_aspect_ratio_drop() -> None:
    out = convert_image([], CATS, ImageSize(6432, 32), GeometrySettings())
    assert out.drop is ConversionDrop.ASPECT_RATIO and out.target is None


# ----------------------------------------------------------------------------------------------
# Descriptions, categories, images


def test_category_desc_normalisation() -> None:
    assert category_desc("bow_(weapon)") == "bow (weapon)"
    assert category_desc("traffic light") == "traffic light"
    assert category_desc("  a__b \t c ") == "a b c"
    with pytest.raises(ConversionError, match="<|"):
        category_desc("x<|coord_5|>")
    with pytest.raises(ConversionError, match="non-empty"):
        category_desc("__")


def test_parse_category_names_the_category_on_a_bad_desc() -> None:
    with pytest.raises(ConversionError, match=r"categories\[3\] \(id 44\)"):
        parse_category({"id": 44, "name": "a|>b"}, 3)
    lvis = parse_category({"id": 1, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)"], "frequency": "r"}, 0)
    assert lvis.to_json() == {"id": 1, "name": "bow_(weapon)", "desc": "bow (weapon)", "synonyms": ["bow_(weapon)"], "frequency": "r"}


def test_parse_image_coco_and_lvis() -> None:
    coco = parse_image({"id": 5, "width": 640, "height": 427, "file_name": "a/b.jpg"}, 0, SourceFormat.COCO)
    assert coco.relative_path == "a/b.jpg" and coco.neg_category_ids is None
    lvis = parse_image(
        {"id": 391895, "width": 640, "height": 360, "neg_category_ids": [9, 3], "not_exhaustive_category_ids": [],
         "coco_url": "http://images.cocodataset.org/train2017/000000391895.jpg"},
        0,
        SourceFormat.LVIS,
    )
    assert lvis.relative_path == "train2017/000000391895.jpg"
    assert lvis.neg_category_ids == (9, 3) and lvis.not_exhaustive_category_ids == ()
    with pytest.raises(ConversionError, match="relative"):
        parse_image({"id": 1, "width": 1, "height": 1, "file_name": "../x.jpg"}, 0, SourceFormat.COCO)
    with pytest.raises(ConversionError, match=r"images\[0\] \(id 1\)\.width"):
        parse_image({"id": 1, "width": True, "height": 1, "file_name": "x.jpg"}, 0, SourceFormat.COCO)


def test_parse_annotation_rejects_bad_numbers() -> None:
    with pytest.raises(ConversionError, match=r"bbox\[2\]"):
        ann(base(bbox=[1, 2, True, 4]))
    with pytest.raises(ConversionError, match="bbox"):
        ann(base(bbox=[1, 2, 3]))


def test_output_file_name() -> None:
    assert output_file_name("train2017/0001.jpg", copied=True, jpeg_output=True) == "0001.jpg"
    assert output_file_name("x/0001.JPEG", copied=False, jpeg_output=True) == "0001.JPEG"
    assert output_file_name("x/0001.webp", copied=False, jpeg_output=False) == "0001.png"
    assert output_file_name("x/0001.webp", copied=True, jpeg_output=False) == "0001.webp"


# ----------------------------------------------------------------------------------------------
# Properties

aligned = st.builds(ImageSize, st.integers(1, 31).map(lambda k: 32 * k), st.integers(1, 31).map(lambda k: 32 * k))


@given(aligned, st.data())
def test_unresized_integer_boxes_decode_within_one_pixel(size: ImageSize, data: st.DataObject) -> None:
    x = data.draw(st.integers(0, size.width - 2))
    y = data.draw(st.integers(0, size.height - 2))
    w = data.draw(st.integers(1, size.width - 1 - x))
    h = data.draw(st.integers(1, size.height - 1 - y))
    out = convert_annotation(ann(base(bbox=[x, y, w, h])), CATS, size, size, BBOX)
    bins = out.objects[0].bins
    assert bins[0] < bins[2] and bins[1] < bins[3]
    decoded = bins_to_pixels(list(bins), size.width, size.height)
    for got, want in zip(decoded, [x, y, x + w, y + h]):
        assert abs(got - want) <= 1


@given(
    st.builds(ImageSize, st.integers(32, 2000), st.integers(32, 2000)),
    st.lists(st.tuples(st.integers(-50, 2100), st.integers(-50, 2100)), min_size=3, max_size=12),
)
def test_polygon_outputs_are_canonical_or_fall_back(source: ImageSize, pts: list[tuple[int, int]]) -> None:
    target = ImageSize(max(32, source.width // 64 * 32), max(32, source.height // 64 * 32))
    flat = [c for p in pts for c in p]
    a = ann(base(bbox=[0, 0, source.width, source.height], segmentation=[flat]))
    xs, ys = flat[0::2], flat[1::2]
    assume(max(xs) > 0 and min(xs) < source.width and max(ys) > 0 and min(ys) < source.height)
    out = convert_annotation(a, CATS, source, target, PREFERRED)
    assert len(out.objects) == 1
    obj = out.objects[0]
    if obj.kind is GeometryKind.POLY:
        assert canonicalize_polygon(obj.bins) == obj.bins
        assert out.fallbacks == ()
    else:
        assert ConversionFallback.POLY_TO_BBOX_DEGENERATE in out.fallbacks
        assert obj.bins[0] < obj.bins[2] and obj.bins[1] < obj.bins[3]


@given(st.integers(3, 10), st.data())
def test_simple_convex_polygons_stay_simple(n: int, data: st.DataObject) -> None:
    # vertices of a regular n-gon scaled into a 640x427 image, possibly rotated start / reversed order
    import math

    pts = [(320 + 150 * math.cos(2 * math.pi * i / n), 200 + 150 * math.sin(2 * math.pi * i / n)) for i in range(n)]
    if data.draw(st.booleans()):
        pts.reverse()
    start = data.draw(st.integers(0, n - 1))
    pts = pts[start:] + pts[:start]
    flat = [Decimal(repr(round(c, 3))) for p in pts for c in p]
    a = parse_annotation({"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 1, 1], "segmentation": [flat]}, 0)
    out = convert_annotation(a, CATS, SRC, DST, POLY)
    assert out.objects[0].kind is GeometryKind.POLY
    assert is_simple_polygon(out.objects[0].bins)


def test_bin_decoding_is_the_codec_one() -> None:
    # sanity for the fixture numbers used elsewhere: the codec decodes bin 469 to pixel 195 at H = 416
    assert bin_to_pixel(469, 416) == 195
    assert Fraction(416, 427) * Fraction("200.25") < 196
