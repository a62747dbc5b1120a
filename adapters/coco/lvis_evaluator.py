"""LVIS federated AP from a library (D17, issue 16): faster-coco-eval's ``lvis_style`` (default) or the
reference ``lvis`` package's ``LVISEval`` (optional extra ``lvis``), one interface, LVISEval's numbers.

Both backends get the same inputs prepared by :mod:`domain.lvis`: the ground truth as LVISEval reads
it (:func:`federated_gt`) and LVIS's per-image limit of 300 detections applied first
(:func:`top_detections_per_image`; faster-coco-eval alone would cut 300 per image *and category*).
Quirks of ``lvis`` 0.5.3 handled here: ``import lvis`` calls ``logging.basicConfig`` (undone),
``accumulate`` uses ``np.float`` (removed in numpy 1.24; restored only for the call), ``LVIS`` only
loads from a path (the index is built from the dict instead), ``LVISResults`` indexes ``results[0]``
(an empty result set gets an empty index), and both mutate what they are given (fresh copies).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from domain.errors import ConfigError
from domain.evaluation import IOU_TYPES, canonical_coco_gt, per_class_ap, precision_curves
from domain.lvis import (
    LVIS_MAX_DETS,
    LVIS_STAT_NAMES,
    LvisEvaluation,
    federated_gt,
    frequencies_of,
    top_detections_per_image,
)

LVIS_BACKENDS: tuple[str, ...] = ("faster_coco_eval", "lvis")
_MODULES = {"faster_coco_eval": "faster_coco_eval", "lvis": "lvis"}
# faster-coco-eval's stats_as_dict labels of LVIS_STAT_NAMES (maxDets = [300]: AR_all is AR@300).
_FCE_LABELS: tuple[str, ...] = (
    "AP_all", "AP_50", "AP_75", "AP_small", "AP_medium", "AP_large", "APr", "APc", "APf",
    "AR_all", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip


def _quiet(*_args: object, **_kwargs: object) -> None:
    return None


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {list(IOU_TYPES)}, got {iou_type!r}")


def _prepared(
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return federated_gt(canonical_coco_gt(gt)), top_detections_per_image(results, LVIS_MAX_DETS)


def _evaluation(
    iou_type: str,
    stats: Sequence[float],
    precision: np.ndarray[Any, Any],
    cat_ids: Sequence[int],
    iou_thrs: Sequence[float],
    rec_thrs: Sequence[float],
    gt: Mapping[str, Any],
) -> LvisEvaluation:
    if precision.ndim == 4:  # LVISEval has no maxDets axis: one implicit 300
        precision = precision[..., np.newaxis]
    return LvisEvaluation(
        iou_type=iou_type,
        stats=tuple(float(s) for s in stats),
        per_class_ap=per_class_ap(precision, cat_ids, 0) if cat_ids else (),
        curves=precision_curves(precision, iou_thrs, rec_thrs, 0),
        frequencies=frequencies_of(gt),
    )


class FasterCocoEvalLvis:
    """:class:`ports.evaluation.LvisEvaluator` over ``faster_coco_eval.COCOeval_faster(lvis_style=True)``."""

    backend = "faster_coco_eval"

    def __init__(self) -> None:
        fce = importlib.import_module("faster_coco_eval")
        self._coco_cls: Any = fce.COCO
        self._eval_cls: Any = fce.COCOeval_faster

    def __repr__(self) -> str:
        return "FasterCocoEvalLvis()"

    def _coco(self, dataset: dict[str, Any]) -> Any:
        coco = self._coco_cls()
        coco.print_function = _quiet
        coco.dataset = dataset
        coco.createIndex()
        return coco

    def evaluate(
        self,
        gt: Mapping[str, Any],
        results: Sequence[Mapping[str, Any]],
        iou_type: str,
        *,
        iou_thrs: Sequence[float] | None = None,
        img_ids: Sequence[int] | None = None,
    ) -> LvisEvaluation:
        _check_iou_type(iou_type)
        dataset, dets = _prepared(gt, results)
        with contextlib.redirect_stdout(io.StringIO()):
            gt_coco = self._coco(dataset)
            if dets:
                dt_coco = gt_coco.loadRes(dets)
                if any(not float(a["area"]) > 0.0 for a in dt_coco.dataset["annotations"]):
                    # LVISEval evaluates only detections of area > 0 (its get_ann_ids filter)
                    dt_coco.dataset["annotations"] = [
                        a for a in dt_coco.dataset["annotations"] if float(a["area"]) > 0.0
                    ]
                    dt_coco.createIndex()
            else:  # the loader indexes results[0]; "no detections" is an empty set on the same images
                dt_coco = self._coco(
                    {
                        "images": list(dataset["images"]),
                        "categories": list(dataset["categories"]),
                        "annotations": [],
                    }
                )
            ev = self._eval_cls(gt_coco, dt_coco, iou_type, print_function=_quiet, lvis_style=True)
            ev.params.maxDets = [LVIS_MAX_DETS]
            if iou_thrs is not None:
                ev.params.iouThrs = np.asarray([float(t) for t in iou_thrs], dtype=np.float64)
            if img_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in img_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        labelled = ev.stats_as_dict
        return _evaluation(
            iou_type,
            [labelled[label] for label in _FCE_LABELS],
            np.asarray(ev.eval["precision"], dtype=np.float64),
            [int(c) for c in ev.params.catIds],
            [float(t) for t in ev.params.iouThrs],
            [float(r) for r in ev.params.recThrs],
            dataset,
        )


@contextlib.contextmanager
def _np_float_alias() -> Iterator[None]:
    """``lvis`` 0.5.3 calls ``np.float`` (removed in numpy 1.24): the alias exists only during the call."""
    had = "float" in np.__dict__
    if not had:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if not had:
            del np.float  # type: ignore[attr-defined]


@contextlib.contextmanager
def _lvis_logging_quiet() -> Iterator[None]:
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "Assuming user provided the results in correct format." per call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its Logger.warn calls
            yield
    finally:
        logger.setLevel(level)


def import_lvis() -> ModuleType:
    """``import lvis`` without its ``logging.basicConfig`` side effect on the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module("lvis")
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


class ReferenceLvisEval:
    """:class:`ports.evaluation.LvisEvaluator` over the reference ``lvis.LVISEval``."""

    backend = "lvis"

    def __init__(self) -> None:
        self._lvis = import_lvis()

    def __repr__(self) -> str:
        return "ReferenceLvisEval()"

    def _gt(self, dataset: dict[str, Any]) -> Any:
        gt = self._lvis.LVIS.__new__(self._lvis.LVIS)  # LVIS() only reads a path; same index from a dict
        gt.logger = logging.getLogger("lvis.lvis")
        gt.dataset = dataset
        gt._create_index()
        return gt

    def _results(self, gt: Any, dataset: dict[str, Any], dets: list[dict[str, Any]]) -> Any:
        if dets:
            return self._lvis.LVISResults(gt, dets, max_dets=LVIS_MAX_DETS)
        empty = self._lvis.LVISResults.__new__(self._lvis.LVISResults)  # LVISResults indexes results[0]
        empty.logger = logging.getLogger("lvis.results")
        empty.dataset = {**dataset, "annotations": []}
        empty._create_index()
        return empty

    def evaluate(
        self,
        gt: Mapping[str, Any],
        results: Sequence[Mapping[str, Any]],
        iou_type: str,
        *,
        iou_thrs: Sequence[float] | None = None,
        img_ids: Sequence[int] | None = None,
    ) -> LvisEvaluation:
        _check_iou_type(iou_type)
        dataset, dets = _prepared(gt, results)
        with _lvis_logging_quiet(), _np_float_alias():
            lvis_gt = self._gt(dataset)
            ev = self._lvis.LVISEval(lvis_gt, self._results(lvis_gt, dataset, dets), iou_type)
            if iou_thrs is not None:
                ev.params.iou_thrs = np.asarray([float(t) for t in iou_thrs], dtype=np.float64)
            if img_ids is not None:
                ev.params.img_ids = sorted(int(i) for i in img_ids)
            ev.run()
        return _evaluation(
            iou_type,
            [ev.results[name] for name in LVIS_STAT_NAMES],
            np.asarray(ev.eval["precision"], dtype=np.float64),
            [int(c) for c in ev.params.cat_ids],
            [float(t) for t in ev.params.iou_thrs],
            [float(r) for r in ev.params.rec_thrs],
            dataset,
        )


def lvis_evaluator_for(backend: str) -> FasterCocoEvalLvis | ReferenceLvisEval:
    """The evaluator of ``eval.lvis_backend``; a missing package is a config error naming the fix."""
    if backend not in LVIS_BACKENDS:
        raise ConfigError(f"'eval.lvis_backend' must be one of {list(LVIS_BACKENDS)}, got {backend!r}")
    if importlib.util.find_spec(_MODULES[backend]) is None:
        hint = (
            "install the optional extra: pip install -e '.[lvis]'"
            if backend == "lvis"
            else "install faster-coco-eval"
        )
        raise ConfigError(f"'eval.lvis_backend' is {backend} but the package is not installed; {hint}")
    if backend == "lvis":
        return ReferenceLvisEval()
    return FasterCocoEvalLvis()
