"""COCO metrics from a library (D17): faster-coco-eval (default) or pycocotools, one interface.

Both backends receive the same inputs prepared the same way, so they print the same numbers. The
libraries mutate what they are given (``createIndex`` rewrites ids, ``loadRes`` adds ``area`` /
``id`` / ``segmentation``, ``_prepare`` sets ``ignore``); every call works on per-call copies.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import io
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from domain.errors import ConfigError
from domain.evaluation import (
    COCO_STAT_NAMES,
    IOU_TYPES,
    CocoEvaluation,
    canonical_coco_gt,
    per_class_ap,
    precision_curves,
)

BACKENDS: tuple[str, ...] = ("faster_coco_eval", "pycocotools")
_MODULES = {"faster_coco_eval": "faster_coco_eval", "pycocotools": "pycocotools"}


def _quiet(*_args: object, **_kwargs: object) -> None:
    return None


def _copy_gt(gt: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical integer ids, fresh image / annotation dicts (the libraries write into them)."""
    canonical = canonical_coco_gt(gt)  # its image and annotation dicts are new already: not copied twice
    return {**canonical, "categories": [dict(cat) for cat in canonical["categories"]]}


def _faster_cpp() -> Any:
    return importlib.import_module("faster_coco_eval.faster_eval_api_cpp")


def _faster_version() -> str:
    try:
        return str(importlib.metadata.version("faster-coco-eval"))
    except importlib.metadata.PackageNotFoundError:
        return ""


# The batched path replays COCOeval_faster.evaluate of these releases (its _prepare, get_instances and
# COCOevalEvaluateAccumulate); another release takes the library's own evaluate until checked.
_BATCHED_IOU_VERSION_OK = _faster_version().startswith("1.8.")


def batched_box_ious(
    gt_lists: Sequence[Sequence[Mapping[str, Any]]],
    dt_lists: Sequence[Sequence[Mapping[str, Any]]],
    max_det: int,
) -> list[npt.NDArray[np.float64]] | None:
    """For each (image, category) cell with ground truth and detections, the IoU matrix the library's
    ``computeIoU`` returns: detections by descending score (stable, as its mergesort), the first
    ``max_det`` kept, shape ``(detections, ground truths)``; crowd ground truth divides by the detection's
    area. The C mask library's ``bbIou`` operations in the same order on float64, so the values are the
    same bits. None when a box or score is not finite (``fmin`` / ``fmax`` and NaN differ from numpy)."""
    if not gt_lists:
        return []
    n_gt = np.fromiter((len(g) for g in gt_lists), dtype=np.int64, count=len(gt_lists))
    n_dt = np.fromiter((len(d) for d in dt_lists), dtype=np.int64, count=len(dt_lists))
    gt_box = np.asarray([o["bbox"] for g in gt_lists for o in g], dtype=np.float64).reshape(-1, 4)
    crowd = np.asarray([int(o.get("iscrowd", 0)) for g in gt_lists for o in g], dtype=np.int64) != 0
    dt_box = np.asarray([o["bbox"] for d in dt_lists for o in d], dtype=np.float64).reshape(-1, 4)
    score = np.asarray([o["score"] for d in dt_lists for o in d], dtype=np.float64)
    if not (np.isfinite(gt_box).all() and np.isfinite(dt_box).all() and np.isfinite(score).all()):
        return None
    cells = len(gt_lists)
    cell_of_dt = np.repeat(np.arange(cells), n_dt)
    order = np.argsort(-score, kind="stable")
    order = order[np.argsort(cell_of_dt[order], kind="stable")]  # by cell, then by descending score
    dt_start = np.cumsum(n_dt) - n_dt
    rank = np.arange(order.size) - dt_start[cell_of_dt[order]]
    kept = order[rank < max_det]
    m = np.minimum(n_dt, max_det)
    kept_start = np.cumsum(m) - m
    gt_start = np.cumsum(n_gt) - n_gt
    sizes = m * n_gt
    block_start = np.cumsum(sizes) - sizes
    cell = np.repeat(np.arange(cells), sizes)
    local = np.arange(int(sizes.sum())) - block_start[cell]
    d_index = kept[kept_start[cell] + local // n_gt[cell]]
    g_index = gt_start[cell] + local % n_gt[cell]
    d, g = dt_box[d_index], gt_box[g_index]
    with np.errstate(divide="ignore", invalid="ignore"):
        da = d[:, 2] * d[:, 3]
        ga = g[:, 2] * g[:, 3]
        w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
        h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
        inter = w * h
        union = np.where(crowd[g_index], da, da + ga - inter)
        iou = np.where((w > 0) & (h > 0), inter / union, 0.0)
    ends = np.cumsum(sizes).tolist()
    starts = block_start.tolist()
    shapes = zip(m.tolist(), n_gt.tolist())
    return [iou[a:b].reshape(shape) for a, b, shape in zip(starts, ends, shapes)]


class LibraryCocoEvaluator:
    """:class:`ports.evaluation.CocoEvaluator` over one COCO library."""

    def __init__(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"'eval.coco_backend' must be one of {list(BACKENDS)}, got {backend!r}")
        if importlib.util.find_spec(_MODULES[backend]) is None:
            other = next(b for b in BACKENDS if b != backend)
            raise ConfigError(
                f"'eval.coco_backend' is {backend} but the package is not installed; "
                f"install it or set eval.coco_backend: {other}"
            )
        self.backend = backend
        if backend == "faster_coco_eval":
            fce = importlib.import_module("faster_coco_eval")
            self._coco_cls: Any = fce.COCO
            self._eval_cls: Any = fce.COCOeval_faster
            self._mask: ModuleType = importlib.import_module("faster_coco_eval.core.mask")
        else:
            self._coco_cls = importlib.import_module("pycocotools.coco").COCO
            self._eval_cls = importlib.import_module("pycocotools.cocoeval").COCOeval
            self._mask = importlib.import_module("pycocotools.mask")

    def __repr__(self) -> str:
        return f"LibraryCocoEvaluator({self.backend!r})"

    # -- COCO objects ---------------------------------------------------------------------------

    def _coco(self, dataset: dict[str, Any]) -> Any:
        coco = self._coco_cls()
        if self.backend == "faster_coco_eval":
            coco.print_function = _quiet
        coco.dataset = dataset
        coco.createIndex()
        return coco

    def _results(self, gt_coco: Any, results: Sequence[Mapping[str, Any]]) -> Any:
        if not results:
            # Never hand the loader an empty list (pitfall 12): an empty result set with the GT's
            # images and categories is what the evaluation of "no detections" needs.
            return self._coco(
                {
                    "images": list(gt_coco.dataset["images"]),
                    "categories": [dict(c) for c in gt_coco.dataset["categories"]],
                    "annotations": [],
                }
            )
        return gt_coco.loadRes([dict(r) for r in results])

    def _eval(self, gt_coco: Any, dt_coco: Any, iou_type: str) -> Any:
        if self.backend == "faster_coco_eval":
            return self._eval_cls(gt_coco, dt_coco, iou_type, print_function=_quiet)
        return self._eval_cls(gt_coco, dt_coco, iou_type)

    def _evaluate_boxes_batched(self, ev: Any, iou_type: str) -> bool:
        """faster-coco-eval's ``COCOeval_faster.evaluate`` for plain COCO boxes with every box IoU of the
        run computed in one numpy pass (:func:`batched_box_ious`) instead of one library call per image
        and category (a third of the evaluation on the 5,000-image benchmark); the same IoU matrices,
        bit for bit, go to the same C++ evaluation. False (nothing done) outside that case: the library's
        own ``evaluate`` then runs. tests/adapters/test_coco_evaluator.py holds both equal."""
        if self.backend != "faster_coco_eval" or iou_type != "bbox" or not _BATCHED_IOU_VERSION_OK:
            return False
        p = ev.params
        if (
            ev.lvis_style or ev.separate_eval or ev.extra_calc or not p.useCats
            or p.compute_rle or p.compute_boundary or p.iouType != "bbox"
        ):  # fmt: skip
            return False
        p.imgIds = list(np.unique(p.imgIds))
        p.catIds = list(np.unique(p.catIds))
        p.maxDets = sorted(p.maxDets)
        ev.params = p
        ev._prepare()
        gts = ev.gt_dataset.get_instances(p.imgIds, p.catIds, True)
        dts = ev.dt_dataset.get_instances(p.imgIds, p.catIds, True)
        where: list[tuple[int, int]] = []
        gt_lists: list[list[Mapping[str, Any]]] = []
        dt_lists: list[list[Mapping[str, Any]]] = []
        for i, (gt_row, dt_row) in enumerate(zip(gts, dts)):
            for c, (g, d) in enumerate(zip(gt_row, dt_row)):
                if g and d:
                    where.append((i, c))
                    gt_lists.append(g)
                    dt_lists.append(d)
        blocks = batched_box_ious(gt_lists, dt_lists, int(p.maxDets[-1]))
        if blocks is None:  # a non-finite coordinate or score: the library decides
            ev.evaluate()
            return True
        ious: list[list[Any]] = [[[] for _ in p.catIds] for _ in p.imgIds]
        for (i, c), block in zip(where, blocks):
            ious[i][c] = block
        ev._paramsEval = copy.deepcopy(p)
        ev.eval = _faster_cpp().COCOevalEvaluateAccumulate(
            ev._paramsEval, ious, ev.gt_dataset, ev.dt_dataset, p.imgIds, p.catIds, True
        )
        return True

    # -- port ----------------------------------------------------------------------------------

    def evaluate(
        self,
        gt: Mapping[str, Any],
        results: Sequence[Mapping[str, Any]],
        iou_type: str,
        *,
        iou_thrs: Sequence[float] | None = None,
        img_ids: Sequence[int] | None = None,
    ) -> CocoEvaluation:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {list(IOU_TYPES)}, got {iou_type!r}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
            gt_coco = self._coco(_copy_gt(gt))
            dt_coco = self._results(gt_coco, results)
            ev = self._eval(gt_coco, dt_coco, iou_type)
            if iou_thrs is not None:
                ev.params.iouThrs = np.asarray([float(t) for t in iou_thrs], dtype=np.float64)
            if img_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in img_ids)
            if not self._evaluate_boxes_batched(ev, iou_type):
                ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = tuple(float(v) for v in np.asarray(ev.stats, dtype=np.float64)[: len(COCO_STAT_NAMES)])
        precision = np.asarray(ev.eval["precision"], dtype=np.float64)
        max_dets = [int(m) for m in ev.params.maxDets]
        md_index = max_dets.index(100)
        cat_ids = [int(c) for c in ev.params.catIds]
        return CocoEvaluation(
            iou_type=iou_type,
            stats=stats,
            per_class_ap=per_class_ap(precision, cat_ids, md_index) if cat_ids else (),
            curves=precision_curves(
                precision,
                [float(t) for t in ev.params.iouThrs],
                [float(r) for r in ev.params.recThrs],
                md_index,
            ),
        )

    def polygon_iou(
        self, preds: Sequence[Sequence[float]], gts: Sequence[Sequence[float]], width: int, height: int
    ) -> npt.NDArray[np.float64]:
        out = np.zeros((len(preds), len(gts)), dtype=np.float64)
        if not preds or not gts:
            return out
        for ring in (*preds, *gts):
            if len(ring) < 6 or len(ring) % 2:
                # A 4-value list would be read as a box by the mask library (pitfall 10).
                raise ValueError(f"polygon_iou needs flat rings of >= 6 values, got len={len(ring)}")
        dt = self._mask.frPyObjects([[float(v) for v in p] for p in preds], height, width)
        gt = self._mask.frPyObjects([[float(v) for v in g] for g in gts], height, width)
        iou = np.asarray(self._mask.iou(dt, gt, [0] * len(gts)), dtype=np.float64)
        return iou.reshape(len(preds), len(gts))


def coco_evaluator_for(backend: str) -> LibraryCocoEvaluator:
    """The evaluator of ``eval.coco_backend``; a missing package is a config error naming the other."""
    return LibraryCocoEvaluator(backend)
