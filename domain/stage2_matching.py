"""Stage-2 matching of predictions to ground truth: geometry only, deterministic (stage2.md §6).

The rule, in order: candidate pruning on axis-aligned boxes (top-k by AABB IoU, ties by GT index;
when a prediction's best AABB IoU is 0, the k GTs nearest by squared centre distance instead),
mask IoU of each candidate pair on the R x R virtual canvas (``domain.geometry`` owns the
rasteriser), the IoU gate (``iou < gate`` -> infeasible and one gating rejection), then one
Hungarian solve (``scipy.optimize.linear_sum_assignment``) of the dummy-padded square matrix

    [[C (P x G), fp_cost (P x P)],
     [fn_cost (G x G), 0 (G x P)]]

Prediction i is matched to GT j iff its column is ``j < G`` and ``C[i, j] < INF / 2``. There is no
description cost. Inputs are shapes in norm1000 bins: any object with ``kind`` and ``bins``
(:class:`BinGeometry`, or a :class:`domain.objects.DetObject` as the scanner and the loader give).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from domain.codec import MAX_BIN, check_bins, plain_canonical_bbox
from domain.errors import ConfigError, GeometryError
from domain.geometry import box_mask_spans, masks_iou, pairwise_box_iou, rasterize_shape, span_mask_iou
from domain.objects import DetObject, GeometryKind

#: Cost of an infeasible edge (non-candidate or gated pair); an assignment at or above INF / 2 is no match.
INF = 1e6


class BinShape(Protocol):
    """What matching reads of a shape: its kind and its flat coordinates in bins (x at even index)."""

    @property
    def kind(self) -> GeometryKind: ...

    @property
    def bins(self) -> tuple[int, ...]: ...


def _kind(value: GeometryKind | str) -> GeometryKind:
    try:
        return GeometryKind(value)
    except ValueError:
        raise GeometryError(f"geometry kind must be 'bbox_2d' or 'poly', got {value!r}") from None


def _bins(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(values)


@attrs.frozen
class BinGeometry:
    """One shape in norm1000 bins: ``bbox_2d`` (4 values) or ``poly`` (flat ring), checked on use."""

    kind: GeometryKind = attrs.field(converter=_kind)
    bins: tuple[int, ...] = attrs.field(converter=_bins)


def _check_number(key: str, value: object, *, integer: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"matching.{key}: expected a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"matching.{key}: expected an integer, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"matching.{key}: must be finite, got {value!r}")


def _gate(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _check_number(attribute.name, value, integer=False)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"matching.{attribute.name}: must be in [0, 1], got {value}")


def _at_least(bound: int, *, integer: bool) -> Callable[[object, attrs.Attribute[Any], float], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
        _check_number(attribute.name, value, integer=integer)
        if value < bound:
            raise ConfigError(f"matching.{attribute.name}: must be >= {bound}, got {value}")

    return check


@attrs.frozen
class MatchSettings:
    """The ``matching`` block's keys that §6 reads (defaults as stage2.md §20 and the config schema)."""

    candidate_top_k: int = attrs.field(default=5, validator=_at_least(1, integer=True))
    maskiou_gate: float = attrs.field(default=0.3, validator=_gate)
    maskiou_resolution: int = attrs.field(default=256, validator=_at_least(16, integer=True))
    fp_cost: float = attrs.field(default=0.5, validator=_at_least(0, integer=False))
    fn_cost: float = attrs.field(default=2.0, validator=_at_least(0, integer=False))


@attrs.frozen
class MatchResult:
    """§6 output. ``matched_pairs`` are ``(pred_idx, gt_idx)`` sorted by pred_idx; index sets ascending."""

    matched_pairs: tuple[tuple[int, int], ...]
    fp_pred_indices: tuple[int, ...]
    fn_gt_indices: tuple[int, ...]
    gating_rejections: int
    candidate_pairs: int
    matched_maskiou_sum: float
    matched_maskiou_count: int


def _checked_aabb(shape: BinShape, where: str) -> tuple[int, int, int, int]:
    """The shape's canonical (min/max) axis-aligned box; bad bins or arity raise naming ``where``."""
    kind = shape.kind
    bins = shape.bins
    if kind is GeometryKind.BBOX:  # the common case, checked in one expression
        plain = plain_canonical_bbox(bins)
        if plain is not None:
            return plain
    if not isinstance(kind, GeometryKind):
        raise GeometryError(f"{where}.kind: expected 'bbox_2d' or 'poly', got {kind!r}")
    check_bins(bins, where)
    if kind is GeometryKind.BBOX:
        if len(bins) != 4:
            raise GeometryError(f"{where}.bins: a bbox_2d needs exactly 4 values, got {len(bins)}")
    elif len(bins) < 2 or len(bins) % 2:
        raise GeometryError(f"{where}.bins: a poly needs an even number (>= 2) of values, got {len(bins)}")
    xs = [int(v) for v in bins[0::2]]
    ys = [int(v) for v in bins[1::2]]
    return (min(xs), min(ys), max(xs), max(ys))


def _aabb_array(shapes: Sequence[BinShape], name: str) -> npt.NDArray[np.int64]:
    """``[_checked_aabb(s, f"{name}[{i}]") for i, s in enumerate(shapes)]`` as an ``(n, 4)`` int64 array.

    Fast path: every shape a :class:`DetObject` bbox of 4 bins (its converter makes them ``int``), all in
    range, read in one ``fromiter``; anything else (a bad shape raises there) goes shape by shape.
    """
    n = len(shapes)
    if all(type(s) is DetObject and s.kind is GeometryKind.BBOX and len(s.bins) == 4 for s in shapes):
        try:
            arr = np.fromiter(
                itertools.chain.from_iterable(s.bins for s in shapes), dtype=np.int64, count=4 * n
            ).reshape(n, 4)
        except OverflowError:
            arr = None
        if arr is not None and (n == 0 or (int(arr.min()) >= 0 and int(arr.max()) <= MAX_BIN)):
            out = np.empty_like(arr)
            np.minimum(arr[:, :2], arr[:, 2:], out=out[:, :2])
            np.maximum(arr[:, :2], arr[:, 2:], out=out[:, 2:])
            return out
    boxes = [_checked_aabb(s, f"{name}[{i}]") for i, s in enumerate(shapes)]
    return np.fromiter(itertools.chain.from_iterable(boxes), dtype=np.int64, count=4 * n).reshape(n, 4)


def _canvas_flat(shape: BinShape, aabb: tuple[int, int, int, int]) -> tuple[int, ...]:
    # §3.9 item 8: a bbox's polygon is built from its canonical (min/max) corners.
    return aabb if shape.kind is GeometryKind.BBOX else tuple(int(v) for v in shape.bins)


def prune_candidates(
    pred_boxes: Sequence[tuple[int, int, int, int]],
    gt_boxes: Sequence[tuple[int, int, int, int]],
    top_k: int,
) -> tuple[tuple[int, ...], ...]:
    """§6 step 3: per prediction, the GT indices whose pairs get a mask IoU, in preference order.

    GTs sorted by (-AABB IoU, GT index), the first ``max(1, top_k)`` kept; when the best AABB IoU is 0,
    the ``max(1, top_k)`` GTs with the smallest squared centre distance (ties by GT index) instead.
    Boxes are canonical ``(x1, y1, x2, y2)`` with ``x1 <= x2``, ``y1 <= y2``.
    """
    if not len(gt_boxes):
        return tuple(() for _ in pred_boxes)
    if not len(pred_boxes):
        return ()
    return tuple(tuple(row) for row in _candidate_order(pred_boxes, gt_boxes, top_k).tolist())


def _candidate_order(pred_boxes: npt.ArrayLike, gt_boxes: npt.ArrayLike, top_k: int) -> npt.NDArray[np.intp]:
    """:func:`prune_candidates` as a ``(P, min(k, G))`` array (both sides non-empty)."""
    k = max(1, top_k)
    iou = pairwise_box_iou(pred_boxes, gt_boxes)
    p = np.asarray(pred_boxes, dtype=np.int64).reshape(-1, 4)
    g = np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
    # Doubled centres keep the squared distance an exact integer (and exact in float64: < 2**53).
    dx = (g[:, 0] + g[:, 2])[None, :] - (p[:, 0] + p[:, 2])[:, None]
    dy = (g[:, 1] + g[:, 3])[None, :] - (p[:, 1] + p[:, 3])[:, None]
    d2 = (dx * dx + dy * dy).astype(np.float64)
    key = np.where((iou.max(axis=1) > 0.0)[:, None], -iou, d2)
    # A stable sort keeps equal keys in GT index order.
    order: npt.NDArray[np.intp] = np.argsort(key, axis=1, kind="stable")[:, :k]
    return order


def candidate_cost_matrix(
    preds: Sequence[BinShape], gts: Sequence[BinShape], settings: MatchSettings
) -> tuple[npt.NDArray[np.float64], int, int]:
    """§6 steps 2-5: the P x G cost matrix (``1 - maskIoU`` on gated candidates, INF elsewhere),
    the number of gating rejections and the number of evaluated candidate pairs."""
    pred_boxes = _aabb_array(preds, "preds")
    gt_boxes = _aabb_array(gts, "gts")
    cost = np.full((len(preds), len(gts)), INF, dtype=np.float64)
    if not preds or not gts:
        return cost, 0, 0
    resolution = settings.maskiou_resolution
    # prune_candidates in array form: row i's candidates in preference order, rows in order.
    order = _candidate_order(pred_boxes, gt_boxes, settings.candidate_top_k)
    rows = np.repeat(np.arange(order.shape[0], dtype=np.int64), order.shape[1])
    cols = order.reshape(-1).astype(np.int64)
    iou = np.zeros(rows.shape, dtype=np.float64)
    pred_bbox = np.fromiter((s.kind is GeometryKind.BBOX for s in preds), dtype=np.bool_, count=len(preds))
    gt_bbox = np.fromiter((s.kind is GeometryKind.BBOX for s in gts), dtype=np.bool_, count=len(gts))
    both_bbox = pred_bbox[rows] & gt_bbox[cols]
    if both_bbox.any():
        # bbox vs bbox: the rasterised masks are pixel rectangles in closed form (equal to the raster path);
        # box_mask_spans works row by row, so one call on both sides' boxes gives each side's rows.
        spans = box_mask_spans(np.concatenate([pred_boxes, gt_boxes]), resolution)
        pred_spans, gt_spans = spans[: len(preds)], spans[len(preds) :]
        if both_bbox.all():
            iou = span_mask_iou(pred_spans[rows], gt_spans[cols])
        else:
            iou[both_bbox] = span_mask_iou(pred_spans[rows[both_bbox]], gt_spans[cols[both_bbox]])
    if not both_bbox.all():
        pred_masks: dict[int, npt.NDArray[np.bool_] | None] = {}  # rasterised once, only when needed
        gt_masks: dict[int, npt.NDArray[np.bool_] | None] = {}
        pred_list = [tuple(b) for b in pred_boxes.tolist()]
        gt_list = [tuple(b) for b in gt_boxes.tolist()]
        for n in np.flatnonzero(~both_bbox).tolist():
            i, j = int(rows[n]), int(cols[n])
            if i not in pred_masks:
                pred_masks[i] = rasterize_shape(
                    _canvas_flat(preds[i], pred_list[i]), preds[i].kind, resolution
                )
            if j not in gt_masks:
                gt_masks[j] = rasterize_shape(_canvas_flat(gts[j], gt_list[j]), gts[j].kind, resolution)
            iou[n] = masks_iou(pred_masks[i], gt_masks[j])
    accepted = iou >= settings.maskiou_gate
    cost[rows[accepted], cols[accepted]] = 1.0 - iou[accepted]
    return cost, int(rows.size - np.count_nonzero(accepted)), int(rows.size)


def match_predictions(
    preds: Sequence[BinShape], gts: Sequence[BinShape], settings: MatchSettings
) -> MatchResult:
    """Match predictions to GT objects per stage2.md §6 (see the module docstring)."""
    n_pred, n_gt = len(preds), len(gts)
    cost, rejections, pairs = candidate_cost_matrix(preds, gts, settings)
    if n_pred == 0 or n_gt == 0:
        return MatchResult(
            matched_pairs=(),
            fp_pred_indices=tuple(range(n_pred)),
            fn_gt_indices=tuple(range(n_gt)),
            gating_rejections=rejections,
            candidate_pairs=pairs,
            matched_maskiou_sum=0.0,
            matched_maskiou_count=0,
        )
    size = n_pred + n_gt
    square = np.zeros((size, size), dtype=np.float64)
    square[:n_pred, :n_gt] = cost
    square[:n_pred, n_gt:] = float(settings.fp_cost)
    square[n_pred:, :n_gt] = float(settings.fn_cost)
    rows, cols = linear_sum_assignment(square)
    # Assigned real pairs below INF / 2, in row order (the solver's rows ascend), as the per-pair loop took them.
    real = (rows < n_pred) & (cols < n_gt)
    r_real, c_real = rows[real], cols[real]
    c_cost = cost[r_real, c_real]
    ok = c_cost < INF / 2
    matched = list(zip(r_real[ok].tolist(), c_real[ok].tolist()))
    iou_sum = 0.0
    for value in (1.0 - c_cost[ok]).tolist():  # summed one by one, in that order
        iou_sum += value
    matched.sort()
    matched_preds = {p for p, _ in matched}
    matched_gts = {g for _, g in matched}
    return MatchResult(
        matched_pairs=tuple(matched),
        fp_pred_indices=tuple(i for i in range(n_pred) if i not in matched_preds),
        fn_gt_indices=tuple(j for j in range(n_gt) if j not in matched_gts),
        gating_rejections=rejections,
        candidate_pairs=pairs,
        matched_maskiou_sum=iou_sum,
        matched_maskiou_count=len(matched),
    )
