"""COCO metrics from a library (D17): faster-coco-eval (default) or pycocotools, one interface.

Both backends receive the same inputs prepared the same way, so they print the same numbers. The
libraries mutate what they are given (``createIndex`` rewrites ids, ``loadRes`` adds ``area`` /
``id`` / ``segmentation``, ``_prepare`` sets ``ignore``); every call works on per-call copies.
"""

from __future__ import annotations

import contextlib
import importlib
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
