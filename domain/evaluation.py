"""The detection evaluator's pure core (infer-eval-config.md §4, D17-D19).

What lives here: validation of ``gt_vs_pred.jsonl`` records and their objects (§4.1), description
normalisation and the description -> category mapping rules (§4.2; the semantic step is a function
handed in by the caller), the COCO ground truth / predictions documents the library consumes
(§4.3), the per-class AP and precision-curve arithmetic on the library's precision array, the
F1-ish greedy 1:1 matching and its counters (§4.4), the counter and metric key names (§4.5).

What does not: reading files, COCOeval itself (a library behind ``ports.evaluation.CocoEvaluator``),
mask IoU (the COCO library's mask utilities, same port), sentence embeddings (``TextEncoder``).
"""

from __future__ import annotations

import enum
import functools
import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from domain.codec import bins_to_pixels
from domain.errors import ArtifactError, DataContractError, DataProblem
from domain.geometry import bbox_to_quad, poly_to_bbox, polygon_area
from domain.objects import GeometryKind

FloatArray = npt.NDArray[np.float64]
_BBOX = GeometryKind.BBOX
_POLY = GeometryKind.POLY

# --------------------------------------------------------------------------------------------
# Key names (§4.3, §4.5). The metric registry (D14) declares every key listed here.
# --------------------------------------------------------------------------------------------

COCO_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")

F1ISH_KEY_SUFFIXES: tuple[str, ...] = (
    "tp_loc", "fp_loc", "fn_loc", "pred_total", "pred_eval", "pred_ignored",
    "precision_loc_micro", "precision_loc_macro", "recall_loc_micro", "recall_loc_macro",
    "f1_loc_micro", "f1_loc_macro",
    "matched_sem_ok", "matched_sem_bad", "sem_acc_on_matched", "tp_full", "fp_full", "fn_full",
    "precision_full_micro", "precision_full_macro", "recall_full_micro", "recall_full_macro",
    "f1_full_micro", "f1_full_macro",
)  # fmt: skip

F1ISH_DEFAULT_IOU_THRS: tuple[float, ...] = (0.3, 0.5)
# A ratio with nothing to measure (no evaluated prediction, no ground truth): COCO's spelling of "undefined".
UNDEFINED_METRIC = -1.0

# Per-object prediction codes (§4.1), in the order the checks run.
PRED_INVALID_CODES: tuple[str, ...] = (
    "geometry_kind", "geometry_points", "bbox_points", "poly_points", "coord_parse", "coord_range", "degenerate",
)  # fmt: skip
INVALID_GEOMETRY_CODES: frozenset[str] = frozenset(
    {"geometry_kind", "geometry_points", "bbox_points", "poly_points", "degenerate"}
)
INVALID_COORD_CODES: frozenset[str] = frozenset({"coord_parse", "coord_range"})

COUNTER_KEYS: tuple[str, ...] = (
    "images", "gt_objects", "pred_objects", "invalid_geometry", "invalid_coord", "degenerate", "empty_pred",
    "exact_mapped", "normalized_mapped", "semantic_mapped", "unmapped_dropped", "semantic_report_failed",
)  # fmt: skip

SEMANTIC_REPORT_MAX_ROWS = 200
UNKNOWN_CATEGORY = "unknown"
MALFORMED_SNIPPET_CHARS = 200


def coco_metric_keys(iou_type: str) -> tuple[str, ...]:
    """``bbox_AP`` .. ``bbox_ARl`` (or ``segm_``), in ``stats[0..11]`` order."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {list(IOU_TYPES)}, got {iou_type!r}")
    return tuple(f"{iou_type}_{name}" for name in COCO_STAT_NAMES)


def f1ish_threshold_label(thr: float) -> str:
    """``0.3`` -> ``"0.30"`` (the spelling used in keys and file names)."""
    return f"{thr:.2f}"


def f1ish_metric_keys(thr: float) -> tuple[str, ...]:
    prefix = f"f1ish@{f1ish_threshold_label(thr)}_"
    return tuple(prefix + suffix for suffix in F1ISH_KEY_SUFFIXES)


def eval_metric_keys(f1ish_iou_thrs: Sequence[float] = F1ISH_DEFAULT_IOU_THRS) -> tuple[str, ...]:
    """Every metric key an evaluation with these F1-ish thresholds can emit (registry entries)."""
    keys: list[str] = []
    for iou_type in IOU_TYPES:
        keys.extend(coco_metric_keys(iou_type))
    for thr in f1ish_iou_thrs:
        keys.extend(f1ish_metric_keys(thr))
    return tuple(keys)


def primary_f1ish_threshold(thrs: Sequence[float]) -> float:
    """0.50 if listed, else the largest listed threshold (§4.4)."""
    if not thrs:
        raise ValueError("f1ish_iou_thrs must not be empty")
    for thr in thrs:
        if f1ish_threshold_label(thr) == "0.50":
            return thr
    return max(thrs)


def matches_file_name(thr: float, primary: float) -> str:
    """``matches.jsonl`` for the primary threshold, ``matches@0.30.jsonl`` for the others (§4.5)."""
    if f1ish_threshold_label(thr) == f1ish_threshold_label(primary):
        return "matches.jsonl"
    return f"matches@{f1ish_threshold_label(thr)}.jsonl"


def check_f1ish_iou_thrs(thrs: Sequence[float]) -> list[str]:
    """Problems of ``eval.f1ish_iou_thrs`` (non-empty, unique, each in (0, 1]); ``[]`` when valid."""
    problems: list[str] = []
    if len(thrs) == 0:
        problems.append("'eval.f1ish_iou_thrs' must not be empty")
    labels = [f1ish_threshold_label(t) for t in thrs]
    if len(set(labels)) != len(labels):
        problems.append(f"'eval.f1ish_iou_thrs' must be unique (at 2 decimals), got {list(thrs)}")
    for i, t in enumerate(thrs):
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < float(t) <= 1.0):
            problems.append(f"'eval.f1ish_iou_thrs[{i}]' must be in (0, 1], got {t!r}")
    return problems


def check_coco_iou_thrs(thrs: Sequence[float] | None) -> list[str]:
    """Problems of ``eval.iou_thrs``: strictly increasing in (0, 1], containing 0.5 and 0.75 (§4.3)."""
    if thrs is None:
        return []
    problems: list[str] = []
    values = [float(t) for t in thrs]
    if not values:
        return ["'eval.iou_thrs' must not be empty (use null for the library default 0.50:0.05:0.95)"]
    if any(not 0.0 < v <= 1.0 for v in values):
        problems.append(f"'eval.iou_thrs' values must lie in (0, 1], got {values}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        problems.append(f"'eval.iou_thrs' must be strictly increasing, got {values}")
    for required in (0.5, 0.75):
        if not any(math.isclose(v, required, abs_tol=1e-12) for v in values):
            problems.append(
                f"'eval.iou_thrs' must contain {required} (AP50 / AP75 read those rows), got {values}"
            )
    return problems


# --------------------------------------------------------------------------------------------
# Artifact records (§3.1, §4.1)
# --------------------------------------------------------------------------------------------


class CoordSpace(str, enum.Enum):
    PIXEL = "pixel"
    NORM1000 = "norm1000"


class ScoreMode(str, enum.Enum):
    TOKEN_PROB = "token_prob"
    CONSTANT = "constant"


class PredScope(str, enum.Enum):
    ANNOTATED = "annotated"
    ALL = "all"


@attrs.frozen
class EvalObject:
    """A validated object in the record's pixel space (ints); ``score`` is None for ground truth."""

    kind: GeometryKind
    points: tuple[int, ...]
    desc: str
    score: float | None = None

    @property
    def is_poly(self) -> bool:
        return self.kind is _POLY

    def bbox_xyxy(self) -> tuple[int, int, int, int]:
        """The box itself, or a polygon's tight box ``[min xs, min ys, max xs, max ys]``."""
        if self.kind is _BBOX:
            x1, y1, x2, y2 = self.points
            return (x1, y1, x2, y2)
        return poly_to_bbox(self.points)

    def polygon(self) -> tuple[int, ...]:
        """The flat ring for mask IoU: a polygon's points, a box's 8-value quad (never 4 values)."""
        if self.kind is _POLY:
            return self.points
        return bbox_to_quad(self.points)

    def area(self) -> float:
        """COCO area: shoelace (absolute) for a polygon, ``w * h`` for a box."""
        if self.kind is _POLY:
            return polygon_area(self.points)
        x1, y1, x2, y2 = self.points
        return float((x2 - x1) * (y2 - y1))


@attrs.frozen
class InvalidPrediction:
    """A prediction that failed §4.1 validation: its position in ``pred``, its code and the raw JSON."""

    index: int
    reason: str
    raw: Any = attrs.field(eq=False)


@attrs.frozen
class EvalImage:
    """One artifact record after validation: an image of the evaluation (empty GT included)."""

    image_id: int
    line: int
    file_name: str
    width: int
    height: int
    source_image_id: int | None
    gt: tuple[EvalObject, ...]
    preds: tuple[EvalObject, ...]
    invalid_preds: tuple[InvalidPrediction, ...]

    @property
    def pred_total(self) -> int:
        return len(self.preds) + len(self.invalid_preds)


def malformed_line_message(path: str, line: int, text: str) -> str:
    snippet = text[:MALFORMED_SNIPPET_CHARS]
    ellipsis = "…" if len(text) > MALFORMED_SNIPPET_CHARS else ""
    return f"Malformed JSONL at {path}:{line}: {snippet}{ellipsis}"


def parse_artifact_line(text: str, path: str, line: int) -> dict[str, Any] | None:
    """One physical line of ``gt_vs_pred.jsonl``: None for a blank line, else the JSON object.

    Strict (D15): a non-JSON line or a JSON value that is not an object raises :class:`ArtifactError`.
    """
    stripped = text.strip()
    if not stripped:
        return None
    try:
        value = json.loads(stripped, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ArtifactError(malformed_line_message(path, line, text.rstrip("\r\n"))) from None
    if not isinstance(value, dict):
        raise ArtifactError(f"Non-object JSONL record at {path}:{line}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def assign_image_ids(records: Sequence[Mapping[str, Any]], path: str, lines: Sequence[int]) -> list[int]:
    """``image_id`` per record (§4.1): its ``index``; the 0-based ordinal when no record has one.

    Indices must be unique non-negative ints; a mix of records with and without ``index`` is an error.
    """
    has_index = ["index" in r for r in records]
    if not any(has_index):
        return list(range(len(records)))
    problems: list[DataProblem] = []
    if not all(has_index):
        first_missing = has_index.index(False)
        problems.append(
            DataProblem(
                path,
                lines[first_missing],
                "index",
                "missing while other records have one; give every record an index or none",
            )
        )
    seen: dict[int, int] = {}
    ids: list[int] = []
    for rec, ln in zip(records, lines):
        if "index" not in rec:
            ids.append(-1)
            continue
        value = rec["index"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(DataProblem(path, ln, "index", f"must be a non-negative int, got {value!r}"))
            ids.append(-1)
            continue
        if value in seen:
            problems.append(
                DataProblem(path, ln, "index", f"duplicate index {value} (first at line {seen[value]})")
            )
        seen.setdefault(value, ln)
        ids.append(value)
    if problems:
        raise DataContractError(problems)
    return ids


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@attrs.frozen
class _GeometryCheck:
    """Outcome of the geometry checks shared by GT and predictions: pixel points or a code + reason."""

    kind: GeometryKind | None
    points: tuple[int, ...] | None
    code: str | None
    reason: str


_KINDS: dict[object, GeometryKind] = {_BBOX.value: _BBOX, _POLY.value: _POLY}
_KIND_NAMES: dict[GeometryKind, str] = {_BBOX: "bbox_2d", _POLY: "poly"}


def _check_geometry(obj: Mapping[str, Any], width: int, height: int, space: CoordSpace) -> _GeometryCheck:
    kind = _KINDS.get(obj.get("type")) if isinstance(obj.get("type"), str) else None
    if kind is None:
        return _GeometryCheck(
            None, None, "geometry_kind", f"type must be 'bbox_2d' or 'poly', got {obj.get('type')!r}"
        )
    points = obj.get("points")
    if not isinstance(points, list):
        return _GeometryCheck(kind, None, "geometry_points", f"points must be a flat list, got {points!r}")
    all_int = all(type(v) is int for v in points)  # exact type: bool (an int subclass) is not a coordinate
    if not all_int and any(isinstance(v, (list, dict)) for v in points):
        return _GeometryCheck(kind, None, "geometry_points", "points must be a flat list (nested values)")
    n = len(points)
    if kind is _BBOX and n != 4:
        return _GeometryCheck(kind, None, "bbox_points", f"a bbox needs exactly 4 values; got len={n}")
    if kind is _POLY and (n % 2 or n < 6):
        return _GeometryCheck(
            kind, None, "poly_points", f"a poly needs an even number of values, at least 6; got len={n}"
        )
    if not all_int:
        j = next(j for j, v in enumerate(points) if type(v) is not int)
        return _GeometryCheck(kind, None, "coord_parse", f"points[{j}] must be an integer, got {points[j]!r}")
    if space is CoordSpace.NORM1000:
        if min(points) < 0 or max(points) > 999:
            j = next(j for j, v in enumerate(points) if not 0 <= v <= 999)
            return _GeometryCheck(kind, None, "coord_range", f"points[{j}] = {points[j]} outside bins 0..999")
        return _GeometryCheck(kind, tuple(bins_to_pixels(points, width, height)), None, "")
    xs, ys = points[0::2], points[1::2]
    if min(xs) < 0 or max(xs) > width - 1 or min(ys) < 0 or max(ys) > height - 1:
        j = next(j for j, v in enumerate(points) if not 0 <= v <= (width if j % 2 == 0 else height) - 1)
        axis, limit = ("x", width - 1) if j % 2 == 0 else ("y", height - 1)
        return _GeometryCheck(
            kind, None, "coord_range", f"points[{j}] ({axis}) = {points[j]} outside [0, {limit}]"
        )
    return _GeometryCheck(kind, tuple(points), None, "")


def _has_zero_extent(kind: GeometryKind, points: Sequence[int]) -> bool:
    if kind is _BBOX:
        x1, y1, x2, y2 = points
        return x2 <= x1 or y2 <= y1
    return polygon_area(points) == 0.0


def validate_prediction(
    obj: object, width: int, height: int, space: CoordSpace, score: float
) -> EvalObject | str:
    """A valid prediction as an :class:`EvalObject`, or its §4.1 code (first failing check).

    A box with ``x2 <= x1`` or ``y2 <= y1`` (zero or negative extent) and a polygon of zero area are
    ``degenerate``. A missing or non-string ``desc`` becomes ``""`` (mapped nowhere, §4.2 rule 4).
    """
    if not isinstance(obj, dict):
        return "geometry_kind"
    check = _check_geometry(obj, width, height, space)
    if check.code is not None:
        return check.code
    assert check.kind is not None and check.points is not None
    if _has_zero_extent(check.kind, check.points):
        return "degenerate"
    desc = obj.get("desc")
    return EvalObject(check.kind, check.points, desc.strip() if isinstance(desc, str) else "", score)


def validate_gt_object(
    obj: object, index: int, width: int, height: int, space: CoordSpace, path: str, line: int
) -> EvalObject:
    """Re-validate one GT object; raise :class:`DataContractError` naming ``path:line`` and ``gt[i]``.

    Ground truth that collapses to zero pixel extent (adjacent bins on a small image) stays valid;
    an inverted box does not.
    """
    where = f"gt[{index}]"
    if not isinstance(obj, dict):
        raise DataContractError([DataProblem(path, line, where, f"must be an object, got {obj!r}")])
    check = _check_geometry(obj, width, height, space)
    if check.code is not None:
        raise DataContractError([DataProblem(path, line, where, f"{check.code}: {check.reason}")])
    assert check.kind is not None and check.points is not None
    if check.kind is _BBOX:
        x1, y1, x2, y2 = check.points
        if x2 < x1 or y2 < y1:
            raise DataContractError(
                [
                    DataProblem(
                        path,
                        line,
                        f"{where}.points",
                        f"requires x1 <= x2 and y1 <= y2; got {list(check.points)}",
                    )
                ]
            )
    desc = obj.get("desc")
    if not isinstance(desc, str) or not desc.strip():
        raise DataContractError(
            [DataProblem(path, line, f"{where}.desc", f"must be a non-empty string, got {desc!r}")]
        )
    return EvalObject(check.kind, check.points, desc.strip(), None)


def _prediction_score(obj: object, mode: ScoreMode, path: str, line: int) -> float:
    if mode is ScoreMode.CONSTANT:
        return 1.0
    value = obj.get("score") if isinstance(obj, dict) else None
    if not _is_real(value) or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ArtifactError(
            f"prediction without a valid score at {path}:{line}; "
            "set eval.score_mode: constant to evaluate unscored artifacts"
        )
    return float(value)  # type: ignore[arg-type]


def _plain_pixel_box(obj: object, last_x: int, last_y: int) -> tuple[int, int, int, int] | None:
    """The common object in a pixel record, checked in one expression: a ``bbox_2d`` of four plain ints
    inside the image with ``x1 <= x2`` and ``y1 <= y2``; None sends the object through the full checks
    (:func:`validate_gt_object`, :func:`validate_prediction`), which decide everything else as before."""
    if type(obj) is not dict or obj.get("type") != "bbox_2d":
        return None
    points = obj.get("points")
    if type(points) is not list or len(points) != 4:
        return None
    x1, y1, x2, y2 = points
    if (
        type(x1) is int and type(y1) is int and type(x2) is int and type(y2) is int
        and 0 <= x1 <= x2 <= last_x and 0 <= y1 <= y2 <= last_y
    ):  # fmt: skip
        return (x1, y1, x2, y2)
    return None


def prepare_record(
    record: Mapping[str, Any], *, image_id: int, path: str, line: int, score_mode: ScoreMode
) -> EvalImage:
    """Validate one artifact record (§4.1): record fields raise, GT objects raise, predictions are
    kept or counted by code. ``coord_mode: norm1000`` records are denormalised with the codec (§2.4).
    """
    problems: list[DataProblem] = []
    image = record.get("image")
    if not isinstance(image, str):
        problems.append(DataProblem(path, line, "image", f"must be a string, got {image!r}"))
    width, height = record.get("width"), record.get("height")
    for name, value in (("width", width), ("height", height)):
        if not _is_int(value) or value <= 0:  # type: ignore[operator]
            problems.append(DataProblem(path, line, name, f"must be a positive int, got {value!r}"))
    mode = record.get("coord_mode")
    if mode not in (CoordSpace.PIXEL.value, CoordSpace.NORM1000.value):
        problems.append(DataProblem(path, line, "coord_mode", f"must be 'pixel' or 'norm1000', got {mode!r}"))
    for name in ("gt", "pred"):
        if not isinstance(record.get(name), list):
            problems.append(DataProblem(path, line, name, f"must be a list, got {record.get(name)!r}"))
    source_id = record.get("image_id")
    if source_id is not None and not _is_int(source_id):
        problems.append(DataProblem(path, line, "image_id", f"must be an int, got {source_id!r}"))
    if problems:
        raise DataContractError(problems)
    assert isinstance(image, str) and isinstance(width, int) and isinstance(height, int)
    space = CoordSpace(mode)
    pixel = space is CoordSpace.PIXEL
    last_x, last_y = width - 1, height - 1
    gt_objects: list[EvalObject] = []
    for i, obj in enumerate(record["gt"]):
        box = _plain_pixel_box(obj, last_x, last_y) if pixel else None
        desc = obj.get("desc") if box is not None else None
        if box is not None and isinstance(desc, str) and desc.strip():
            gt_objects.append(EvalObject(_BBOX, box, desc.strip(), None))
        else:
            gt_objects.append(validate_gt_object(obj, i, width, height, space, path, line))
    gt = tuple(gt_objects)
    preds: list[EvalObject] = []
    invalid: list[InvalidPrediction] = []
    constant = score_mode is ScoreMode.CONSTANT
    for i, obj in enumerate(record["pred"]):
        box = _plain_pixel_box(obj, last_x, last_y) if pixel else None
        value = 1.0 if constant else obj.get("score") if box is not None else None
        if type(value) is float and 0.0 <= value <= 1.0:
            score = value
        else:
            score = _prediction_score(obj, score_mode, path, line)
        if box is not None and box[0] < box[2] and box[1] < box[3]:
            desc = obj.get("desc")
            preds.append(EvalObject(_BBOX, box, desc.strip() if isinstance(desc, str) else "", score))
            continue
        outcome = validate_prediction(obj, width, height, space, score)
        if isinstance(outcome, str):
            invalid.append(InvalidPrediction(i, outcome, obj))
        else:
            preds.append(outcome)
    return EvalImage(
        image_id=image_id,
        line=line,
        file_name=image,
        width=width,
        height=height,
        source_image_id=source_id if isinstance(source_id, int) else None,
        gt=gt,
        preds=tuple(preds),
        invalid_preds=tuple(invalid),
    )


# --------------------------------------------------------------------------------------------
# Description -> category (§4.2, D19)
# --------------------------------------------------------------------------------------------

# cosine(query, candidates) on normalised strings; one value per candidate, in candidate order.
Similarity = Callable[[str, Sequence[str]], Sequence[float]]


@functools.lru_cache(maxsize=65536)
def normalize_desc(text: str) -> str:
    """lowercase; ``_`` and ``/`` -> space; delete ``(`` ``)``; collapse whitespace; strip."""
    lowered = text.lower().replace("_", " ").replace("/", " ").replace("(", "").replace(")", "")
    return " ".join(lowered.split())


@attrs.frozen
class Category:
    id: int
    name: str
    # LVIS categories list alternative names; a prediction desc equal to one maps like the name (§4.2).
    synonyms: tuple[str, ...] = ()


class MappingRule(str, enum.Enum):
    EXACT = "exact_mapped"
    NORMALIZED = "normalized_mapped"
    SEMANTIC = "semantic_mapped"
    UNMAPPED = "unmapped_dropped"


@attrs.frozen
class DescMapping:
    """Where one prediction desc went; ``best_*`` and ``score`` are set whenever rule 3 ran."""

    rule: MappingRule
    category_id: int | None
    semantic_ran: bool = False
    best_category_id: int | None = None
    score: float | None = None


def categories_from_gt(images: Iterable[EvalImage]) -> tuple[Category, ...]:
    """Distinct stripped GT descs (case-sensitive), first seen by image_id then object order; ids from 1."""
    names: dict[str, None] = {}
    for image in sorted(images, key=lambda im: im.image_id):
        for obj in image.gt:
            names.setdefault(obj.desc, None)
    return tuple(Category(i, name) for i, name in enumerate(names, start=1))


def _sorted_categories(categories: Iterable[Category]) -> tuple[Category, ...]:
    return tuple(sorted(categories, key=lambda c: c.id))


@attrs.frozen
class CategoryTable:
    """Categories by id with the exact and normalised lookups of §4.2 rules 1-2."""

    categories: tuple[Category, ...] = attrs.field(converter=_sorted_categories)
    _exact: dict[str, int] = attrs.field(init=False, eq=False)
    _normalized: dict[str, int] = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        exact: dict[str, int] = {}
        normalized: dict[str, int] = {}
        for cat in self.categories:  # ascending id: setdefault keeps the lowest id
            exact.setdefault(cat.name, cat.id)
            normalized.setdefault(normalize_desc(cat.name), cat.id)
        for cat in self.categories:  # synonyms after every name: a name always wins over a synonym
            for synonym in cat.synonyms:
                exact.setdefault(synonym, cat.id)
                normalized.setdefault(normalize_desc(synonym), cat.id)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_normalized", normalized)

    def name_of(self, category_id: int) -> str:
        for cat in self.categories:
            if cat.id == category_id:
                return cat.name
        raise KeyError(category_id)

    def semantic_candidates(self) -> tuple[Category, ...]:
        """Every category except the literal ``unknown`` (never a semantic target)."""
        return tuple(c for c in self.categories if normalize_desc(c.name) != UNKNOWN_CATEGORY)

    def map_desc(self, desc: str, similarity: Similarity | None, threshold: float) -> DescMapping:
        """Rules 1-4 of §4.2 for one prediction desc (already stripped)."""
        if not desc:
            return DescMapping(MappingRule.UNMAPPED, None)
        if desc in self._exact:
            return DescMapping(MappingRule.EXACT, self._exact[desc])
        norm = normalize_desc(desc)
        if norm in self._normalized and norm:
            return DescMapping(MappingRule.NORMALIZED, self._normalized[norm])
        if similarity is None:
            return DescMapping(MappingRule.UNMAPPED, None)
        candidates = self.semantic_candidates()
        if not candidates or not norm:
            return DescMapping(MappingRule.UNMAPPED, None)
        scores = similarity(norm, [normalize_desc(c.name) for c in candidates])
        best_i = 0
        for i in range(1, len(candidates)):  # strict '>' keeps the lowest id on ties (ascending ids)
            if float(scores[i]) > float(scores[best_i]):
                best_i = i
        best = candidates[best_i]
        best_score = float(scores[best_i])
        if best_score >= threshold:
            return DescMapping(MappingRule.SEMANTIC, best.id, True, best.id, best_score)
        return DescMapping(MappingRule.UNMAPPED, None, True, best.id, best_score)


@attrs.frozen
class SemanticReportRow:
    pred_desc: str
    count: int
    best_category: str | None
    score: float | None
    mapped: bool


def semantic_report(
    mappings: Mapping[str, DescMapping],
    counts: Mapping[str, int],
    table: CategoryTable,
    *,
    model_path: str,
    threshold: float,
    unmapped_total_preds: int,
) -> dict[str, Any]:
    """``semantic_desc_report.json`` (§4.2): descs that went through rule 3, top 200 by count, score."""
    rows = [
        SemanticReportRow(
            desc,
            counts[desc],
            table.name_of(m.best_category_id) if m.best_category_id is not None else None,
            m.score,
            m.rule is MappingRule.SEMANTIC,
        )
        for desc, m in mappings.items()
        if m.semantic_ran
    ]
    rows.sort(key=lambda r: (-r.count, -(r.score if r.score is not None else -math.inf), r.pred_desc))
    unique_unmapped = sum(1 for m in mappings.values() if m.rule is MappingRule.UNMAPPED)
    return {
        "semantic_model_path": model_path,
        "semantic_threshold": threshold,
        "behavior": "map-or-drop",
        "unique_unmapped_desc": unique_unmapped,
        "unmapped_total_preds": unmapped_total_preds,
        "rows": [attrs.asdict(r) for r in rows[:SEMANTIC_REPORT_MAX_ROWS]],
    }


# --------------------------------------------------------------------------------------------
# COCO documents (§4.3)
# --------------------------------------------------------------------------------------------


def canonical_coco_id(value: object, where: str) -> int:
    """A COCO id as an int: ints as they are, digit strings converted (some public files mix both)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise ArtifactError(f"{where}: COCO id must be an int, got {value!r}")


def is_image_info(gt: Mapping[str, Any]) -> bool:
    """True for an image-info file (COCO test-dev, any split without public annotations): a document
    with ``images`` and ``categories`` but no ``annotations`` key. An empty ``annotations`` list is a
    ground truth (every image without objects), not an image-info file."""
    return "annotations" not in gt and "images" in gt and "categories" in gt


def canonical_coco_gt(
    gt: Mapping[str, Any], source: str = "coco_gt_json", *, image_info: bool = False
) -> dict[str, Any]:
    """A copy of an official COCO GT with integer image ids everywhere (both libraries then agree).

    ``image_info=True`` accepts an image-info file (:func:`is_image_info`): its ``annotations`` is
    then the empty list. Without it a missing ``annotations`` is refused."""
    keys = ("images", "categories") if image_info else ("images", "annotations", "categories")
    for key in keys:
        if not isinstance(gt.get(key), list):
            raise ArtifactError(f"{source}: '{key}' must be a list")
    if image_info and "annotations" in gt:
        raise ArtifactError(f"{source}: an image-info file has no 'annotations'")
    # a plain int id is kept as is without formatting the error location (canonical_coco_id would keep it too)
    images = [
        {
            **img,
            "id": v if type(v := img.get("id")) is int else canonical_coco_id(v, f"{source}: images[{i}].id"),
        }
        for i, img in enumerate(gt["images"])
    ]
    annotations = [
        {**ann, "image_id": v if type(v := ann.get("image_id")) is int
         else canonical_coco_id(v, f"{source}: annotations[{i}].image_id")}
        for i, ann in enumerate(gt.get("annotations", ()))
    ]  # fmt: skip
    out = dict(gt)
    out["images"] = images
    out["annotations"] = annotations
    return out


def has_polygon_segmentation(gt: Mapping[str, Any]) -> bool:
    """True when at least one GT annotation carries a segmentation (polygon or RLE)."""
    return any(ann.get("segmentation") for ann in gt.get("annotations", []))


def coco_bbox_xywh(xyxy: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = xyxy
    return [x1, y1, x2 - x1, y2 - y1]


def rebuilt_coco_gt(
    images: Sequence[EvalImage], table: CategoryTable, *, with_segmentation: bool
) -> dict[str, Any]:
    """``coco_gt.json`` from the artifact's inline GT: annotation ids from 1, polygon areas by shoelace.

    Every GT desc must be a category name of ``table`` (true for :func:`categories_from_gt`).
    """
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    by_name = {c.name: c.id for c in table.categories}
    for image in sorted(images, key=lambda im: im.image_id):
        coco_images.append(
            {"id": image.image_id, "file_name": image.file_name, "width": image.width, "height": image.height}
        )
        for obj in image.gt:
            if obj.kind is _BBOX and not with_segmentation:  # the common annotation, built at once
                x1, y1, x2, y2 = obj.points
                annotations.append({"id": len(annotations) + 1, "image_id": image.image_id,
                                    "category_id": by_name[obj.desc], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "iscrowd": 0, "area": float((x2 - x1) * (y2 - y1))})  # fmt: skip
                continue
            ann: dict[str, Any] = {
                "id": len(annotations) + 1,
                "image_id": image.image_id,
                "category_id": by_name[obj.desc],
                "bbox": coco_bbox_xywh(obj.bbox_xyxy()),
                "iscrowd": 0,
                "area": obj.area(),
            }
            if obj.is_poly:
                ann["segmentation"] = [list(obj.points)]
            elif with_segmentation:
                ann["segmentation"] = [list(obj.polygon())]
            annotations.append(ann)
    return {
        "info": {},
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": c.id, "name": c.name} for c in table.categories],
    }


def coco_prediction(
    obj: EvalObject,
    *,
    coco_image_id: int,
    category_id: int,
    with_segmentation: bool,
    scale: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One ``coco_preds.json`` entry; ``scale = (W_off / W_rec, H_off / H_rec)`` for an official GT."""
    assert obj.score is not None
    if scale is None and obj.kind is _BBOX:  # the common entry, built at once (the same values)
        x1, y1, x2, y2 = obj.points
        return {"image_id": coco_image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": obj.score}  # fmt: skip
    xyxy: list[float] = list(obj.bbox_xyxy())
    ring: list[float] = list(obj.points)
    if scale is not None:
        sx, sy = scale
        xyxy = [v * (sx if j % 2 == 0 else sy) for j, v in enumerate(xyxy)]
        ring = [v * (sx if j % 2 == 0 else sy) for j, v in enumerate(ring)]
    out: dict[str, Any] = {
        "image_id": coco_image_id,
        "category_id": category_id,
        "bbox": coco_bbox_xywh(xyxy),
        "score": obj.score,
    }
    if with_segmentation and obj.is_poly:
        out["segmentation"] = [ring]
    return out


def join_official_images(
    images: Sequence[EvalImage], official_gt: Mapping[str, Any], *, artifact: str, gt_source: str
) -> dict[int, dict[str, Any]]:
    """Artifact image_id -> official image (§4.3): by the record's ``image_id``, else by the basename
    of ``image`` equal to ``file_name``. Unjoined records and two records on one image raise."""
    by_id = {int(img["id"]): img for img in official_gt["images"]}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for img in official_gt["images"]:
        by_name.setdefault(str(img.get("file_name", "")), []).append(img)
    joined: dict[int, dict[str, Any]] = {}
    owner: dict[int, EvalImage] = {}
    problems: list[DataProblem] = []
    for image in images:
        official: dict[str, Any] | None
        if image.source_image_id is not None:
            official = by_id.get(image.source_image_id)
            how = f"image_id {image.source_image_id}"
        else:
            base = image.file_name.replace("\\", "/").rsplit("/", 1)[-1]
            hits = by_name.get(base, [])
            official = hits[0] if len(hits) == 1 else None
            how = f"file_name {base!r}" + (" (ambiguous)" if len(hits) > 1 else "")
        if official is None:
            problems.append(DataProblem(artifact, image.line, "image", f"no image in {gt_source} with {how}"))
            continue
        oid = int(official["id"])
        if oid in owner:
            problems.append(
                DataProblem(
                    artifact, image.line, "image",
                    f"joins official image {oid} already joined by the record at line {owner[oid].line}",
                )
            )  # fmt: skip
            continue
        owner[oid] = image
        joined[image.image_id] = official
    if problems:
        raise DataContractError(problems)
    return joined


@attrs.frozen
class PrecisionCurves:
    """Class-averaged precision at each recall threshold (area all, maxDets 100), for the report."""

    recall_thresholds: tuple[float, ...]
    curves: tuple[tuple[str, tuple[float, ...]], ...]  # ("0.50", [...]), ("0.75", [...]), ("mean", [...])

    def to_json(self) -> dict[str, Any]:
        return {
            "recall_thresholds": list(self.recall_thresholds),
            "curves": {k: list(v) for k, v in self.curves},
        }


@attrs.frozen
class CocoEvaluation:
    """What a COCO evaluation returns: the 12 stats verbatim, per-class AP, precision curves."""

    iou_type: str
    stats: tuple[float, ...]
    per_class_ap: tuple[tuple[int, float], ...]
    curves: PrecisionCurves

    def metrics(self) -> dict[str, float]:
        return dict(zip(coco_metric_keys(self.iou_type), self.stats))


def _mean_defined(values: FloatArray) -> float:
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else math.nan


def per_class_ap(
    precision: FloatArray, category_ids: Sequence[int], max_dets_index: int
) -> tuple[tuple[int, float], ...]:
    """AP of category k: mean of ``precision[:, :, k, area=all, maxDets=100]`` over values > -1, NaN if none."""
    if precision.ndim != 5 or precision.shape[2] != len(category_ids):
        raise ValueError(
            f"precision array of shape {precision.shape} does not match {len(category_ids)} categories"
        )
    return tuple(
        (int(cid), _mean_defined(precision[:, :, k, 0, max_dets_index])) for k, cid in enumerate(category_ids)
    )


def precision_curves(
    precision: FloatArray, iou_thrs: Sequence[float], recall_thrs: Sequence[float], max_dets_index: int
) -> PrecisionCurves:
    """Class-averaged precision (values > -1) at IoU 0.50, 0.75 and the mean over all thresholds."""

    def curve(p: FloatArray) -> tuple[float, ...]:  # p: [R, K]
        out = []
        for r in range(p.shape[0]):
            value = _mean_defined(p[r])
            out.append(-1.0 if math.isnan(value) else value)
        return tuple(out)

    sel = (
        precision[:, :, :, 0, max_dets_index]
        if precision.size
        else np.zeros((len(iou_thrs), len(recall_thrs), 0))
    )
    named: list[tuple[str, tuple[float, ...]]] = []
    for label, target in (("0.50", 0.5), ("0.75", 0.75)):
        rows = [t for t, v in enumerate(iou_thrs) if math.isclose(float(v), target, abs_tol=1e-9)]
        if rows:
            named.append((label, curve(sel[rows[0]])))
    if sel.shape[0]:
        flat = np.transpose(sel, (1, 0, 2)).reshape(sel.shape[1], -1)  # [R, T*K]
        named.append(("mean", curve(flat)))
    return PrecisionCurves(tuple(float(r) for r in recall_thrs), tuple(named))


# --------------------------------------------------------------------------------------------
# F1-ish set matching (§4.4, D19)
# --------------------------------------------------------------------------------------------


def box_iou_matrix(preds: Sequence[EvalObject], gts: Sequence[EvalObject]) -> FloatArray:
    """xyxy box IoU (``w = x2 - x1``, zero union -> 0) of every (pred, gt) pair; polygons by tight box.

    The vectorised form of :func:`domain.geometry.box_iou` (tests hold it equal pair by pair).
    """
    if not preds or not gts:
        return np.zeros((len(preds), len(gts)), dtype=np.float64)
    p = np.asarray([o.bbox_xyxy() for o in preds], dtype=np.float64)[:, None, :]
    g = np.asarray([o.bbox_xyxy() for o in gts], dtype=np.float64)[None, :, :]
    iw = np.clip(np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]), 0.0, None)
    ih = np.clip(np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]), 0.0, None)
    inter = iw * ih
    area_p = np.clip(p[..., 2] - p[..., 0], 0.0, None) * np.clip(p[..., 3] - p[..., 1], 0.0, None)
    area_g = np.clip(g[..., 2] - g[..., 0], 0.0, None) * np.clip(g[..., 3] - g[..., 1], 0.0, None)
    union = area_p + area_g - inter
    out: FloatArray = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def needs_mask_iou(pred: EvalObject, gt: EvalObject) -> bool:
    """Mask IoU when either side is a polygon; box IoU otherwise (§4.4)."""
    return pred.is_poly or gt.is_poly


def greedy_match(
    iou: FloatArray, thr: float, eligible: Sequence[bool] | None = None
) -> tuple[tuple[int, int, float], ...]:
    """Greedy 1:1: pairs with IoU >= thr sorted by (-IoU, pred_idx, gt_idx), accepted when both are free.

    ``eligible[i]`` False excludes prediction i (ignored by the scope). Returns pairs in acceptance order.
    """
    n_pred, n_gt = iou.shape
    pairs = [
        (-float(iou[p, g]), p, g)
        for p in range(n_pred)
        if eligible is None or eligible[p]
        for g in range(n_gt)
        if iou[p, g] >= thr
    ]
    pairs.sort()
    taken_p: set[int] = set()
    taken_g: set[int] = set()
    accepted: list[tuple[int, int, float]] = []
    for neg_iou, p, g in pairs:
        if p in taken_p or g in taken_g:
            continue
        taken_p.add(p)
        taken_g.add(g)
        accepted.append((p, g, -neg_iou))
    return tuple(accepted)


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """P = tp/(tp+fp) (1.0 if empty), R = tp/(tp+fn) (1.0 if empty), F1 = 2PR/(P+R) (0.0 if P+R = 0)."""
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f1


@attrs.frozen
class F1ishMatch:
    pred_idx: int
    gt_idx: int
    iou: float
    sem_sim: float | None
    sem_ok: bool


@attrs.frozen
class F1ishImage:
    """One image at one IoU threshold: matches in acceptance order and the index sets of §4.5."""

    iou_thr: float
    pred_count: int
    gt_count: int
    matches: tuple[F1ishMatch, ...]
    ignored_pred_indices: tuple[int, ...]
    unmatched_pred_indices: tuple[int, ...]
    unmatched_gt_indices: tuple[int, ...]

    @property
    def pred_count_eval(self) -> int:
        return self.pred_count - len(self.ignored_pred_indices)

    @property
    def tp_loc(self) -> int:
        return len(self.matches)

    @property
    def fp_loc(self) -> int:
        return self.pred_count_eval - self.tp_loc

    @property
    def fn_loc(self) -> int:
        return self.gt_count - self.tp_loc

    @property
    def sem_ok(self) -> int:
        return sum(1 for m in self.matches if m.sem_ok)

    @property
    def sem_bad(self) -> int:
        return self.tp_loc - self.sem_ok

    @property
    def tp_full(self) -> int:
        return self.sem_ok

    @property
    def fp_full(self) -> int:
        return self.fp_loc + self.sem_bad

    @property
    def fn_full(self) -> int:
        return self.fn_loc + self.sem_bad

    @property
    def sem_acc_on_matched(self) -> float:
        return self.sem_ok / self.tp_loc if self.tp_loc else 1.0

    def counts(self) -> dict[str, int | float]:
        """The per-image block of ``per_image.json`` (§4.5)."""
        return {
            "tp_loc": self.tp_loc,
            "fp_loc": self.fp_loc,
            "fn_loc": self.fn_loc,
            "pred_count_eval": self.pred_count_eval,
            "pred_count_ignored": len(self.ignored_pred_indices),
            "matched_sem_ok": self.sem_ok,
            "matched_sem_bad": self.sem_bad,
            "sem_acc_on_matched": self.sem_acc_on_matched,
            "tp_full": self.tp_full,
            "fp_full": self.fp_full,
            "fn_full": self.fn_full,
        }


def _sem_sims(pred_norm: str, gt_norms: Sequence[str], similarity: Similarity | None) -> list[float] | None:
    if similarity is None or not gt_norms or not pred_norm:
        return None
    return [float(v) for v in similarity(pred_norm, gt_norms)]


def f1ish_scope_mask(
    image: EvalImage, scope: PredScope, similarity: Similarity | None, sem_threshold: float
) -> list[bool]:
    """Which predictions F1-ish evaluates: all, or (``annotated``) those whose normalised desc is
    non-empty and equals a GT desc of the image or has cosine >= threshold to one."""
    if scope is PredScope.ALL:
        return [True] * len(image.preds)
    gt_norms = [normalize_desc(g.desc) for g in image.gt]
    gt_set = {n for n in gt_norms if n}
    mask: list[bool] = []
    for p in image.preds:
        norm = normalize_desc(p.desc)
        if not norm:
            mask.append(False)
        elif norm in gt_set:
            mask.append(True)
        else:
            sims = _sem_sims(norm, gt_norms, similarity)
            mask.append(sims is not None and any(s >= sem_threshold for s in sims))
    return mask


def f1ish_image(
    image: EvalImage,
    iou: FloatArray,
    thr: float,
    eligible: Sequence[bool],
    similarity: Similarity | None,
    sem_threshold: float,
) -> F1ishImage:
    """F1-ish at one threshold for one image, given the IoU matrix ``[pred, gt]`` and the scope mask."""
    if iou.shape != (len(image.preds), len(image.gt)):
        raise ValueError(f"IoU matrix shape {iou.shape} != ({len(image.preds)}, {len(image.gt)})")
    pairs = greedy_match(iou, thr, eligible)
    matches: list[F1ishMatch] = []
    for p, g, value in pairs:
        pn, gn = normalize_desc(image.preds[p].desc), normalize_desc(image.gt[g].desc)
        sims = _sem_sims(pn, [gn], similarity)
        sim = sims[0] if sims is not None else None
        ok = (bool(pn) and pn == gn) or (sim is not None and sim >= sem_threshold)
        matches.append(F1ishMatch(p, g, value, sim, ok))
    matched_p = {m.pred_idx for m in matches}
    matched_g = {m.gt_idx for m in matches}
    return F1ishImage(
        iou_thr=thr,
        pred_count=len(image.preds),
        gt_count=len(image.gt),
        matches=tuple(matches),
        ignored_pred_indices=tuple(i for i, e in enumerate(eligible) if not e),
        unmatched_pred_indices=tuple(i for i, e in enumerate(eligible) if e and i not in matched_p),
        unmatched_gt_indices=tuple(j for j in range(len(image.gt)) if j not in matched_g),
    )


def f1ish_summary(results: Sequence[F1ishImage], thr: float) -> dict[str, int | float]:
    """The ``f1ish@{thr:.2f}_*`` keys: global sums, micro P/R/F1 from sums, macro = mean over images."""
    tp_loc = sum(r.tp_loc for r in results)
    fp_loc = sum(r.fp_loc for r in results)
    fn_loc = sum(r.fn_loc for r in results)
    tp_full = sum(r.tp_full for r in results)
    fp_full = sum(r.fp_full for r in results)
    fn_full = sum(r.fn_full for r in results)
    sem_ok = sum(r.sem_ok for r in results)
    sem_bad = sum(r.sem_bad for r in results)
    values: dict[str, int | float] = {
        "tp_loc": tp_loc,
        "fp_loc": fp_loc,
        "fn_loc": fn_loc,
        "pred_total": sum(r.pred_count for r in results),
        "pred_eval": sum(r.pred_count_eval for r in results),
        "pred_ignored": sum(len(r.ignored_pred_indices) for r in results),
    }
    for level, sums, per_image in (
        ("loc", (tp_loc, fp_loc, fn_loc), [prf(r.tp_loc, r.fp_loc, r.fn_loc) for r in results]),
        ("full", (tp_full, fp_full, fn_full), [prf(r.tp_full, r.fp_full, r.fn_full) for r in results]),
    ):
        micro = prf(*sums)
        # Nothing predicted and nothing annotated: no score at all, never a perfect one (COCO's -1).
        undefined = sum(sums) == 0
        for k, name in enumerate(("precision", "recall", "f1")):
            values[f"{name}_{level}_micro"] = UNDEFINED_METRIC if undefined else micro[k]
            values[f"{name}_{level}_macro"] = (
                UNDEFINED_METRIC if undefined else sum(v[k] for v in per_image) / len(per_image)
            )
        if level == "loc":
            values["matched_sem_ok"] = sem_ok
            values["matched_sem_bad"] = sem_bad
            values["sem_acc_on_matched"] = (
                UNDEFINED_METRIC if undefined else (sem_ok / tp_loc if tp_loc else 1.0)
            )
            values["tp_full"] = tp_full
            values["fp_full"] = fp_full
            values["fn_full"] = fn_full
    prefix = f"f1ish@{f1ish_threshold_label(thr)}_"
    return {prefix + suffix: values[suffix] for suffix in F1ISH_KEY_SUFFIXES}


def f1ish_undefined_problem(summary: Mapping[str, int | float], thr: float) -> str | None:
    """Why the ``f1ish@{thr}`` ratios of ``summary`` are undefined (-1.0), or None when they are defined."""
    prefix = f"f1ish@{f1ish_threshold_label(thr)}_"
    if summary[prefix + "tp_loc"] or summary[prefix + "fp_loc"] or summary[prefix + "fn_loc"]:
        return None
    return (
        f"{prefix[:-1]}: no evaluated prediction and no ground-truth object in the artifact; precision, "
        f"recall and F1 are undefined and reported as {UNDEFINED_METRIC} (as COCO does), not as a score"
    )


def match_row(image: EvalImage, result: F1ishImage, scope: PredScope) -> dict[str, Any]:
    """One ``matches*.jsonl`` row (§4.5); indices refer to the validated lists."""
    return {
        "image_id": image.image_id,
        "file_name": image.file_name,
        "width": image.width,
        "height": image.height,
        "iou_thr": result.iou_thr,
        "gt_count": result.gt_count,
        "pred_count": result.pred_count,
        "pred_count_eval": result.pred_count_eval,
        "pred_count_ignored": len(result.ignored_pred_indices),
        "pred_scope": scope.value,
        "tp_loc": result.tp_loc,
        "fp_loc": result.fp_loc,
        "fn_loc": result.fn_loc,
        "matches": [
            {
                "pred_idx": m.pred_idx,
                "gt_idx": m.gt_idx,
                "iou": m.iou,
                "pred_desc": image.preds[m.pred_idx].desc,
                "gt_desc": image.gt[m.gt_idx].desc,
                "sem_sim": m.sem_sim,
                "sem_ok": m.sem_ok,
                "pred_bbox": list(image.preds[m.pred_idx].bbox_xyxy()),
                "gt_bbox": list(image.gt[m.gt_idx].bbox_xyxy()),
                "pred_type": _KIND_NAMES[image.preds[m.pred_idx].kind],
                "gt_type": _KIND_NAMES[image.gt[m.gt_idx].kind],
            }
            for m in result.matches
        ],
        "unmatched_pred_indices": list(result.unmatched_pred_indices),
        "ignored_pred_indices": list(result.ignored_pred_indices),
        "unmatched_gt_indices": list(result.unmatched_gt_indices),
    }


# --------------------------------------------------------------------------------------------
# Counters and the summary document (§4.5)
# --------------------------------------------------------------------------------------------


def empty_counters() -> dict[str, int]:
    """Every counter key of ``metrics.json`` at zero, plus the fine prediction codes of §4.1."""
    counters = {key: 0 for key in COUNTER_KEYS}
    for code in PRED_INVALID_CODES:
        counters.setdefault(code, 0)
    return counters


def count_images(images: Sequence[EvalImage]) -> dict[str, int]:
    """Image, object and validation counters (mapping counters are added by the caller)."""
    counters = empty_counters()
    counters["images"] = len(images)
    for image in images:
        counters["gt_objects"] += len(image.gt)
        counters["pred_objects"] += image.pred_total
        if not image.preds:
            counters["empty_pred"] += 1
        for bad in image.invalid_preds:
            counters[bad.reason] += 1
            if bad.reason in INVALID_GEOMETRY_CODES:
                counters["invalid_geometry"] += 1
            if bad.reason in INVALID_COORD_CODES:
                counters["invalid_coord"] += 1
    return counters


def per_image_entry(image: EvalImage, f1ish: Mapping[float, F1ishImage]) -> dict[str, Any]:
    """One element of ``per_image.json`` (§4.5)."""
    return {
        "image_id": image.image_id,
        "file_name": image.file_name,
        "gt_count": len(image.gt),
        "pred_count": len(image.preds),
        "invalid_pred": [{"reason": bad.reason, "raw": bad.raw} for bad in image.invalid_preds],
        "f1ish": {f1ish_threshold_label(thr): result.counts() for thr, result in f1ish.items()},
    }


@attrs.frozen
class EvalSummary:
    """The content of ``metrics.json``: metrics, counters, meta (§4.5)."""

    metrics: Mapping[str, int | float]
    counters: Mapping[str, int]
    meta: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "counters": dict(self.counters), "meta": dict(self.meta)}
