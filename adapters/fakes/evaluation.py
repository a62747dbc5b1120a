"""A fake of the evaluator port (``ports.evaluation.CocoEvaluator``) for running the evaluate use case end to
end without a COCO library (with :class:`adapters.fakes.storage.RecordingArtifactStore` as its store).

``CountingCocoEvaluator`` returns fixed, recognisable stats derived from what it was given
(so a test can tell its numbers reached ``metrics.json``) and records each call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from domain.evaluation import COCO_STAT_NAMES, CocoEvaluation, PrecisionCurves


@attrs.frozen
class EvaluateCall:
    """One ``evaluate`` call as the fake saw it."""

    iou_type: str
    images: int
    annotations: int
    results: int
    img_ids: tuple[int, ...] | None


class CountingCocoEvaluator:
    """:class:`ports.evaluation.CocoEvaluator` without a library: ``stats[k] = (k + 1) / 100`` except
    ``AP`` = results / (results + annotations); one per-class AP of 0.5 per GT category; flat curves.
    ``polygon_iou`` is 1.0 where a prediction and a GT ring are equal, else 0.0."""

    backend = "fake"

    def __init__(self) -> None:
        self.calls: list[EvaluateCall] = []

    def evaluate(
        self,
        gt: Mapping[str, Any],
        results: Sequence[Mapping[str, Any]],
        iou_type: str,
        *,
        iou_thrs: Sequence[float] | None = None,
        img_ids: Sequence[int] | None = None,
    ) -> CocoEvaluation:
        annotations = len(gt.get("annotations", ()))
        self.calls.append(
            EvaluateCall(iou_type, len(gt.get("images", ())), annotations, len(results),
                         tuple(img_ids) if img_ids is not None else None)
        )  # fmt: skip
        total = len(results) + annotations
        stats = [(k + 1) / 100 for k in range(len(COCO_STAT_NAMES))]
        stats[0] = len(results) / total if total else -1.0
        thresholds = tuple(float(t) for t in (iou_thrs or (0.5, 0.75)))
        recall = (0.0, 0.5, 1.0)
        curve = (1.0, 0.5, 0.0)
        return CocoEvaluation(
            iou_type=iou_type,
            stats=tuple(stats),
            per_class_ap=tuple((int(c["id"]), 0.5) for c in gt.get("categories", ())),
            curves=PrecisionCurves(
                recall, (("0.50", curve), ("0.75", curve), ("mean", curve)) if thresholds else ()
            ),
        )

    def polygon_iou(
        self, preds: Sequence[Sequence[float]], gts: Sequence[Sequence[float]], width: int, height: int
    ) -> npt.NDArray[np.float64]:
        out = np.zeros((len(preds), len(gts)), dtype=np.float64)
        for i, p in enumerate(preds):
            for j, g in enumerate(gts):
                out[i, j] = 1.0 if list(p) == list(g) else 0.0
        return out
