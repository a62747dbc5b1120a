"""The offline converter's pure core (data.md §9.3 steps 3, 5, 6; §9.5; §9.6; §9.8).

Source annotations (COCO / LVIS instances JSON, numbers taken at their exact decimal value) become
objects in bins on the resized pixel grid. Every pixel -> bin conversion goes through
``domain.codec`` (one codec, D4), polygons through ``domain.geometry.canonicalize_polygon`` and the
object order through ``domain.ordering`` (D6). Image files, JSON parsing and writing live in the
application and the storage adapters.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import PurePosixPath
from typing import Any

import attrs

from domain.codec import bbox_pixels_to_bins, exact_value, pixel_to_bin
from domain.errors import ConversionError, GeometryError
from domain.geometry import canonicalize_polygon
from domain.objects import DetObject, GeometryKind
from domain.ordering import sort_key
from domain.records import desc_problem
from domain.resize import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageSize,
    exceeds_aspect_ratio,
    smart_resize,
)

# ------------------------------------------------------------------------------------------------
# Settings and reasons


class SourceFormat(str, enum.Enum):
    COCO = "coco"
    LVIS = "lvis"


class GeometryMode(str, enum.Enum):
    """``data.convert.geometry``: ``bbox`` always uses the annotation bbox; ``poly`` requires a polygon;
    ``poly_preferred`` uses the polygon when usable, else the bbox."""

    BBOX = "bbox"
    POLY = "poly"
    POLY_PREFERRED = "poly_preferred"


class MultipartPolicy(str, enum.Enum):
    """``data.convert.poly_multipart``: what a segmentation with more than one part becomes."""

    BBOX = "bbox"
    LARGEST = "largest"
    SPLIT = "split"


class ConversionDrop(str, enum.Enum):
    """Why the converter dropped an object or a whole image (data.md §9.8)."""

    # object level
    CROWD = "crowd"
    NONPOSITIVE_SIZE = "nonpositive_size"
    OUTSIDE_IMAGE = "outside_image"
    UNKNOWN_CATEGORY = "unknown_category"
    NO_POLYGON = "no_polygon"
    DEGENERATE_POLY = "degenerate_poly"
    # image level
    IMAGE_SIZE_MISMATCH = "image_size_mismatch"
    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"
    ASPECT_RATIO = "aspect_ratio"
    TOO_MANY_OBJECTS = "too_many_objects"
    EMPTY = "empty"


OBJECT_DROPS = (
    ConversionDrop.CROWD,
    ConversionDrop.NONPOSITIVE_SIZE,
    ConversionDrop.OUTSIDE_IMAGE,
    ConversionDrop.UNKNOWN_CATEGORY,
    ConversionDrop.NO_POLYGON,
    ConversionDrop.DEGENERATE_POLY,
)
IMAGE_DROPS = tuple(d for d in ConversionDrop if d not in OBJECT_DROPS)


class ConversionFallback(str, enum.Enum):
    """Counters of fallbacks the converter applied (data.md §9.8)."""

    BBOX_NUDGED = "bbox_nudged"
    POLY_TO_BBOX_MULTIPART = "poly_to_bbox_multipart"
    POLY_TO_BBOX_DEGENERATE = "poly_to_bbox_degenerate"
    POLY_TO_BBOX_MAX_POINTS = "poly_to_bbox_max_points"


@attrs.frozen
class GeometrySettings:
    """The ``data.convert`` keys that decide geometry and per-image drops."""

    geometry: GeometryMode = GeometryMode.BBOX
    poly_multipart: MultipartPolicy = MultipartPolicy.BBOX
    poly_max_points: int | None = None
    drop_crowd: bool = True
    keep_empty: bool = True
    max_objects: int | None = None
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------------------------------------
# Source data (parsed from the instances JSON; numbers exact)


@attrs.frozen
class SourceAnnotation:
    """One instances-JSON annotation. ``bbox`` is ``[x, y, w, h]`` in source pixels; ``parts`` are the
    polygon parts (flat lists) or None for RLE / absent segmentation."""

    ann_id: int
    image_id: int
    category_id: int
    bbox: tuple[Fraction, Fraction, Fraction, Fraction]
    parts: tuple[tuple[Fraction, ...], ...] | None
    iscrowd: bool


@attrs.frozen
class SourceImage:
    """One instances-JSON image: id, recorded size, and its path relative to ``image_root``."""

    image_id: int
    size: ImageSize
    relative_path: str
    neg_category_ids: tuple[int, ...] | None = None
    not_exhaustive_category_ids: tuple[int, ...] | None = None


@attrs.frozen
class Category:
    """A row of ``categories.json``: ``{id, name, desc}`` plus LVIS ``synonyms`` / ``frequency``."""

    id: int
    name: str
    desc: str
    synonyms: tuple[str, ...] | None = None
    frequency: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "desc": self.desc}
        if self.synonyms is not None:
            out["synonyms"] = list(self.synonyms)
        if self.frequency is not None:
            out["frequency"] = self.frequency
        return out


def _where(kind: str, index: int, entry: Mapping[str, Any]) -> str:
    ident = entry.get("id") if isinstance(entry, Mapping) else None
    return f"{kind}[{index}]" + (f" (id {ident})" if ident is not None else "")


def _int_field(entry: Mapping[str, Any], key: str, where: str) -> int:
    if key not in entry:
        raise ConversionError(f"{where}: missing '{key}'")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"{where}.{key}: expected an integer, got {value!r}")
    return value


def _number(value: object, where: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, float, Fraction)):
        raise ConversionError(f"{where}: expected a number, got {value!r}")
    try:
        return exact_value(value)
    except GeometryError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def _int_list(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ConversionError(f"{where}: expected a list of integers, got {value!r}")
    return tuple(value)


def parse_annotation(entry: Mapping[str, Any], index: int) -> SourceAnnotation:
    """An ``annotations[index]`` entry; JSON non-integers must arrive as ``Decimal`` (exact values)."""
    if not isinstance(entry, Mapping):
        raise ConversionError(f"annotations[{index}]: expected an object, got {type(entry).__name__}")
    where = _where("annotations", index, entry)
    ann_id = _int_field(entry, "id", where)
    image_id = _int_field(entry, "image_id", where)
    category_id = _int_field(entry, "category_id", where)
    raw_bbox = entry.get("bbox")
    if not isinstance(raw_bbox, list) or len(raw_bbox) != 4:
        raise ConversionError(f"{where}.bbox: expected [x, y, w, h], got {raw_bbox!r}")
    b = [_number(v, f"{where}.bbox[{j}]") for j, v in enumerate(raw_bbox)]
    bbox = (b[0], b[1], b[2], b[3])
    crowd = entry.get("iscrowd", 0)
    if isinstance(crowd, bool) or crowd not in (0, 1):
        raise ConversionError(f"{where}.iscrowd: expected 0 or 1, got {crowd!r}")
    seg = entry.get("segmentation")
    parts: tuple[tuple[Fraction, ...], ...] | None
    if isinstance(seg, list):
        collected: list[tuple[Fraction, ...]] = []
        for p, part in enumerate(seg):
            if not isinstance(part, list):
                raise ConversionError(f"{where}.segmentation[{p}]: expected a flat list of numbers")
            collected.append(tuple(_number(v, f"{where}.segmentation[{p}][{j}]") for j, v in enumerate(part)))
        parts = tuple(collected)
    elif seg is None or isinstance(seg, Mapping):  # absent or RLE: no polygon
        parts = None
    else:
        raise ConversionError(f"{where}.segmentation: expected a list of polygons or an RLE object")
    return SourceAnnotation(ann_id, image_id, category_id, bbox, parts, crowd == 1)


def _safe_relative(path: str, where: str) -> str:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise ConversionError(f"{where}: image path {path!r} must be relative, without '..' or backslashes")
    return str(pure)


def parse_image(entry: Mapping[str, Any], index: int, source: SourceFormat) -> SourceImage:
    """An ``images[index]`` entry. COCO: ``file_name``; LVIS: the last two components of ``coco_url``
    (e.g. ``train2017/000000391895.jpg``), relative to ``image_root`` (data.md §9.3 step 1)."""
    if not isinstance(entry, Mapping):
        raise ConversionError(f"images[{index}]: expected an object, got {type(entry).__name__}")
    where = _where("images", index, entry)
    image_id = _int_field(entry, "id", where)
    width = _int_field(entry, "width", where)
    height = _int_field(entry, "height", where)
    if width <= 0 or height <= 0:
        raise ConversionError(f"{where}: width/height must be positive, got {width}x{height}")
    neg: tuple[int, ...] | None = None
    not_exhaustive: tuple[int, ...] | None = None
    if source is SourceFormat.COCO:
        name = entry.get("file_name")
        if not isinstance(name, str):
            raise ConversionError(f"{where}.file_name: expected a string, got {name!r}")
        relative = _safe_relative(name, f"{where}.file_name")
    else:
        url = entry.get("coco_url")
        if not isinstance(url, str):
            raise ConversionError(f"{where}.coco_url: expected a string, got {url!r}")
        components = [c for c in url.split("/") if c]
        if len(components) < 2:
            raise ConversionError(f"{where}.coco_url: {url!r} has fewer than two path components")
        relative = _safe_relative("/".join(components[-2:]), f"{where}.coco_url")
        neg = _int_list(entry.get("neg_category_ids", []), f"{where}.neg_category_ids")
        not_exhaustive = _int_list(
            entry.get("not_exhaustive_category_ids", []), f"{where}.not_exhaustive_category_ids"
        )
    return SourceImage(image_id, ImageSize(width, height), relative, neg, not_exhaustive)


# ------------------------------------------------------------------------------------------------
# Descriptions (§9.6)


def category_desc(name: str) -> str:
    """``desc`` of a category name: ``_`` -> space, whitespace runs collapsed, stripped
    (LVIS ``bow_(weapon)`` -> ``bow (weapon)``); raises when the result breaks data.md §1.4."""
    desc = " ".join(name.replace("_", " ").split())
    problem = desc_problem(desc)
    if problem is not None:
        raise ConversionError(f"category name {name!r} gives desc {desc!r}, which {problem}")
    return desc


def parse_category(entry: Mapping[str, Any], index: int) -> Category:
    if not isinstance(entry, Mapping):
        raise ConversionError(f"categories[{index}]: expected an object, got {type(entry).__name__}")
    where = _where("categories", index, entry)
    cat_id = _int_field(entry, "id", where)
    name = entry.get("name")
    if not isinstance(name, str):
        raise ConversionError(f"{where}.name: expected a string, got {name!r}")
    try:
        desc = category_desc(name)
    except ConversionError as exc:
        raise ConversionError(f"{where}: {exc}") from None
    synonyms = entry.get("synonyms")
    if synonyms is not None and (
        not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms)
    ):
        raise ConversionError(f"{where}.synonyms: expected a list of strings")
    frequency = entry.get("frequency")
    if frequency is not None and not isinstance(frequency, str):
        raise ConversionError(f"{where}.frequency: expected a string")
    return Category(cat_id, name, desc, tuple(synonyms) if synonyms is not None else None, frequency)


# ------------------------------------------------------------------------------------------------
# Geometry pipeline (§9.5)


@attrs.frozen
class ConvertedObject:
    """An object of the output record: desc, geometry in bins, and the source ids."""

    desc: str
    kind: GeometryKind
    bins: tuple[int, ...]
    category_id: int
    ann_id: int

    @property
    def det(self) -> DetObject:
        return DetObject(self.desc, self.kind, self.bins)


@attrs.frozen
class AnnotationOutcome:
    """What one annotation became: objects (0, 1, or one per part under ``split``), a drop reason
    when nothing was kept, and the fallbacks applied."""

    objects: tuple[ConvertedObject, ...] = ()
    drop: ConversionDrop | None = None
    fallbacks: tuple[ConversionFallback, ...] = ()


def _clamp(v: Fraction, hi: int) -> Fraction:
    return min(max(v, Fraction(0)), Fraction(hi))


def _area2(part: Sequence[Fraction]) -> Fraction:
    xs, ys = part[0::2], part[1::2]
    n = len(xs)
    return sum((xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n)), Fraction(0))


def _usable_parts(parts: Sequence[Sequence[Fraction]], source: ImageSize) -> list[tuple[Fraction, ...]]:
    """Parts with an even length >= 6 whose bounding box overlaps the image (§9.5 polygon step 1)."""
    out: list[tuple[Fraction, ...]] = []
    for part in parts:
        if len(part) % 2 or len(part) < 6:
            continue
        xs, ys = part[0::2], part[1::2]
        if max(xs) <= 0 or min(xs) >= source.width or max(ys) <= 0 or min(ys) >= source.height:
            continue
        out.append(tuple(part))
    return out


@attrs.frozen
class _Scale:
    source: ImageSize
    target: ImageSize

    def x(self, v: Fraction) -> Fraction:
        return _clamp(v * Fraction(self.target.width, self.source.width), self.target.width - 1)

    def y(self, v: Fraction) -> Fraction:
        return _clamp(v * Fraction(self.target.height, self.source.height), self.target.height - 1)


def _bbox_from_annotation(
    ann: SourceAnnotation, desc: str, scale: _Scale
) -> AnnotationOutcome:
    x, y, w, h = ann.bbox
    if w <= 0 or h <= 0:
        return AnnotationOutcome(drop=ConversionDrop.NONPOSITIVE_SIZE)
    src = scale.source
    x1, x2 = _clamp(x, src.width), _clamp(x + w, src.width)
    y1, y2 = _clamp(y, src.height), _clamp(y + h, src.height)
    if x2 <= x1 or y2 <= y1:
        return AnnotationOutcome(drop=ConversionDrop.OUTSIDE_IMAGE)
    return _bbox_object((scale.x(x1), scale.y(y1), scale.x(x2), scale.y(y2)), desc, ann, scale.target)


def _bbox_object(
    xyxy: tuple[Fraction, Fraction, Fraction, Fraction],
    desc: str,
    ann: SourceAnnotation,
    target: ImageSize,
    fallback: ConversionFallback | None = None,
) -> AnnotationOutcome:
    bins, nudged = bbox_pixels_to_bins(xyxy, target.width, target.height)
    fallbacks = ((fallback,) if fallback is not None else ()) + (
        (ConversionFallback.BBOX_NUDGED,) if nudged else ()
    )
    obj = ConvertedObject(desc, GeometryKind.BBOX, bins, ann.category_id, ann.ann_id)
    return AnnotationOutcome(objects=(obj,), fallbacks=fallbacks)


def _polygon_object(
    part: Sequence[Fraction],
    desc: str,
    ann: SourceAnnotation,
    scale: _Scale,
    settings: GeometrySettings,
) -> AnnotationOutcome:
    """Polygon steps 3-4 for one part: scale, clamp, round half-even, canonicalise, or fall back."""
    sx = [scale.x(v) for v in part[0::2]]
    sy = [scale.y(v) for v in part[1::2]]
    flat: list[int] = []
    for px, py in zip(sx, sy):
        flat.append(pixel_to_bin(px, scale.target.width))
        flat.append(pixel_to_bin(py, scale.target.height))
    canonical = canonicalize_polygon(flat)
    why: ConversionFallback | None = None
    if canonical is None:
        why = ConversionFallback.POLY_TO_BBOX_DEGENERATE
    elif settings.poly_max_points is not None and len(canonical) // 2 > settings.poly_max_points:
        why = ConversionFallback.POLY_TO_BBOX_MAX_POINTS
    if why is None and canonical is not None:
        obj = ConvertedObject(desc, GeometryKind.POLY, canonical, ann.category_id, ann.ann_id)
        return AnnotationOutcome(objects=(obj,))
    if settings.geometry is GeometryMode.POLY:
        drop = (
            ConversionDrop.DEGENERATE_POLY
            if why is ConversionFallback.POLY_TO_BBOX_DEGENERATE
            else ConversionDrop.NO_POLYGON
        )
        return AnnotationOutcome(drop=drop)
    # poly_preferred: the extent-preserving bbox of the (scaled, clamped) vertices.
    return _bbox_object((min(sx), min(sy), max(sx), max(sy)), desc, ann, scale.target, why)


def _merge(outcomes: Sequence[AnnotationOutcome]) -> AnnotationOutcome:
    objects = tuple(o for out in outcomes for o in out.objects)
    fallbacks = tuple(f for out in outcomes for f in out.fallbacks)
    drops = [out.drop for out in outcomes if out.drop is not None]
    return AnnotationOutcome(objects, drops[0] if not objects and drops else None, fallbacks)


def convert_annotation(
    ann: SourceAnnotation,
    categories: Mapping[int, str],
    source: ImageSize,
    target: ImageSize,
    settings: GeometrySettings,
) -> AnnotationOutcome:
    """One annotation through §9.5 (``categories`` maps category id -> desc).

    Order of decisions: unknown category, crowd, then geometry per ``settings.geometry``. Crowd
    annotations kept with ``drop_crowd: false`` are always boxes.
    """
    desc = categories.get(ann.category_id)
    if desc is None:
        return AnnotationOutcome(drop=ConversionDrop.UNKNOWN_CATEGORY)
    if ann.iscrowd and settings.drop_crowd:
        return AnnotationOutcome(drop=ConversionDrop.CROWD)
    scale = _Scale(source, target)
    if settings.geometry is GeometryMode.BBOX or ann.iscrowd:
        return _bbox_from_annotation(ann, desc, scale)
    parts = _usable_parts(ann.parts, source) if ann.parts is not None else []
    if not parts:
        if settings.geometry is GeometryMode.POLY:
            return AnnotationOutcome(drop=ConversionDrop.NO_POLYGON)
        return _bbox_from_annotation(ann, desc, scale)
    if len(parts) > 1:
        if settings.poly_multipart is MultipartPolicy.BBOX:
            if settings.geometry is GeometryMode.POLY:
                return AnnotationOutcome(drop=ConversionDrop.NO_POLYGON)
            out = _bbox_from_annotation(ann, desc, scale)
            if out.objects:
                return attrs.evolve(out, fallbacks=(ConversionFallback.POLY_TO_BBOX_MULTIPART, *out.fallbacks))
            return out
        if settings.poly_multipart is MultipartPolicy.LARGEST:
            areas = [abs(_area2(p)) for p in parts]
            parts = [parts[areas.index(max(areas))]]  # index() finds the first on ties
        else:  # split: one object per part, same desc and ids
            return _merge([_polygon_object(p, desc, ann, scale, settings) for p in parts])
    return _polygon_object(parts[0], desc, ann, scale, settings)


# ------------------------------------------------------------------------------------------------
# Per-image decision (§9.3 steps 3, 5, 6)


@attrs.frozen
class ImageConversion:
    """The pure outcome for one image: target size, sorted objects, or the reason the image is dropped.

    ``object_drops`` and ``fallbacks`` list one entry per event (the caller counts them).
    """

    target: ImageSize | None
    objects: tuple[ConvertedObject, ...] = ()
    drop: ConversionDrop | None = None
    object_drops: tuple[ConversionDrop, ...] = ()
    fallbacks: tuple[ConversionFallback, ...] = ()

    @property
    def kept(self) -> bool:
        return self.drop is None


def target_size(source: ImageSize, settings: GeometrySettings) -> ImageSize | None:
    """The smart-resize target (§3.1), or None when the aspect ratio exceeds 200."""
    if exceeds_aspect_ratio(source):
        return None
    return smart_resize(source, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)


def convert_image(
    annotations: Sequence[SourceAnnotation],
    categories: Mapping[int, str],
    source: ImageSize,
    settings: GeometrySettings,
) -> ImageConversion:
    """Convert an image's annotations (processed in ascending annotation id), sort the objects
    (D6), then apply ``max_objects`` (the whole image is dropped, never truncated) and ``keep_empty``."""
    target = target_size(source, settings)
    if target is None:
        return ImageConversion(None, drop=ConversionDrop.ASPECT_RATIO)
    objects: list[ConvertedObject] = []
    drops: list[ConversionDrop] = []
    fallbacks: list[ConversionFallback] = []
    for ann in sorted(annotations, key=lambda a: a.ann_id):
        out = convert_annotation(ann, categories, source, target, settings)
        objects.extend(out.objects)
        fallbacks.extend(out.fallbacks)
        if out.drop is not None:
            drops.append(out.drop)
    ordered = tuple(sorted(objects, key=lambda o: sort_key(o.det)))
    drop: ConversionDrop | None = None
    if settings.max_objects is not None and len(ordered) > settings.max_objects:
        drop = ConversionDrop.TOO_MANY_OBJECTS
    elif not ordered and not settings.keep_empty:
        drop = ConversionDrop.EMPTY
    return ImageConversion(target, ordered, drop, tuple(drops), tuple(fallbacks))


# ------------------------------------------------------------------------------------------------
# Output naming (§9.3 step 4, §9.7)

JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def output_file_name(relative_path: str, *, copied: bool, jpeg_output: bool) -> str:
    """``<file stem>.<ext>`` of a written image: the source name for byte copies, else the source
    name when it already has a JPEG suffix and the output is JPEG, else ``.jpg`` / ``.png``."""
    name = PurePosixPath(relative_path).name
    stem, suffix = PurePosixPath(name).stem, PurePosixPath(name).suffix
    if copied:
        return name
    if jpeg_output:
        return name if suffix.lower() in JPEG_SUFFIXES else f"{stem}.jpg"
    return f"{stem}.png"
