"""Ports of the detection evaluator (infer-eval-config.md §4): the COCO library and the text encoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from domain.evaluation import CocoEvaluation


@runtime_checkable
class CocoEvaluator(Protocol):
    """A COCO library (faster-coco-eval or pycocotools); the project never re-implements COCOeval (D17).

    ``evaluate`` never calls the library's result loader with an empty results list: zero results
    still give every stat (0.0 where the bucket has non-crowd GT, -1.0 where it has none).
    Implementations must not mutate ``gt`` or ``results``.
    """

    backend: str

    def evaluate(
        self,
        gt: Mapping[str, Any],
        results: Sequence[Mapping[str, Any]],
        iou_type: str,
        *,
        iou_thrs: Sequence[float] | None = None,
        img_ids: Sequence[int] | None = None,
    ) -> CocoEvaluation:
        """Run COCOeval (``iou_type`` ``bbox`` or ``segm``; ``img_ids`` restricts ``params.imgIds``)."""
        ...

    def polygon_iou(
        self, preds: Sequence[Sequence[float]], gts: Sequence[Sequence[float]], width: int, height: int
    ) -> npt.NDArray[np.float64]:
        """Mask IoU ``[len(preds), len(gts)]`` from the library's mask utilities: every ring is rasterised
        at ``height x width`` (polygons as flat lists, boxes as 8-value quads, ``iscrowd = 0``)."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """Sentence embeddings for description -> category mapping (D19)."""

    model_path: str

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit-norm embeddings ``[len(texts), dim]``; cosine similarity is their dot product."""
        ...
