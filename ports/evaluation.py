"""Ports of the detection evaluator (infer-eval-config.md §4): the COCO library, the text encoder and the
semantic step a run gets from wiring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs
import numpy as np
import numpy.typing as npt

from domain.evaluation import CocoEvaluation
from domain.lvis import LvisEvaluation
from ports.json_types import JsonObject


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
        gt: JsonObject,
        results: Sequence[JsonObject],
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
class LvisEvaluator(Protocol):
    """LVIS federated evaluation from a library (faster-coco-eval ``lvis_style`` or ``lvis.LVISEval``).

    ``gt`` is an LVIS-format ground truth (checked by :func:`domain.lvis.check_lvis_gt`). Detections
    of a category that an image neither contains nor lists in ``neg_category_ids`` are not
    evaluated; an unmatched detection of a category in the image's ``not_exhaustive_category_ids``
    is not a false positive; at most 300 detections per image across categories
    (:func:`domain.lvis.top_detections_per_image`). Every backend gives LVISEval's numbers.
    Implementations must not mutate ``gt`` or ``results``, and handle an empty ``results``.
    """

    backend: str

    def evaluate(
        self,
        gt: JsonObject,
        results: Sequence[JsonObject],
        iou_type: str,
        *,
        iou_thrs: Sequence[float] | None = None,
        img_ids: Sequence[int] | None = None,
    ) -> LvisEvaluation:
        """Run the federated evaluation (``iou_type`` ``bbox`` or ``segm``)."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """Sentence embeddings for description -> category mapping (D19)."""

    model_path: str

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit-norm embeddings ``[len(texts), dim]``; cosine similarity is their dot product."""
        ...


@attrs.frozen
class SemanticStep:
    """The semantic step of a run (§4.2): an encoder, or the reason it is off (recorded in ``meta.semantic``)."""

    encoder: TextEncoder | None
    disabled_reason: str | None = None

    @classmethod
    def off(cls, reason: str) -> SemanticStep:
        return cls(None, reason)
