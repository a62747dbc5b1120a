"""Sinkhorn OT targets for matched pairs that involve a polygon (stage2.md §11.2, ``rollout_matching_sft``).

Points are in norm1000 bins (a bbox contributes its 4 corners ``(x1,y1),(x2,y1),(x2,y2),(x1,y2)``);
cost ``C = cdist(P, G)`` (``l2`` Euclidean or ``l1`` city-block); ``K = exp(clip(-C / eps, -50, 50))``;
uniform marginals; ``iters`` Sinkhorn updates ``u = a / max(K v, 1e-12)``, ``v = b / max(K^T u, 1e-12)``;
plan ``T = diag(u) K diag(v)``; each prediction point's target is its barycentric projection
``sum_j T_ij g_j / sum_j T_ij``, rounded half-even and clamped to ``[0, 999]``. A bbox prediction's four
projected corners collapse to their axis-aligned box. Any non-finite value or zero row mass is a failure
(``None``): the caller excludes the pair from supervision.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt
from scipy.spatial.distance import cdist

from domain.codec import MAX_BIN
from domain.errors import ConfigError, GeometryError
from domain.geometry import bbox_to_quad
from domain.objects import DetObject, GeometryKind

__all__ = ["OTSettings", "ot_target_bins", "shape_points", "sinkhorn_plan"]

F64 = npt.NDArray[np.float64]

_ROW_MASS_FLOOR = 1e-12
_LOG_CLAMP = 50.0


def _positive_finite(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"matching.{attribute.name}: must be a finite number > 0, got {value!r}")


def _iters(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"matching.{attribute.name}: must be an integer >= 1, got {value!r}")


def _cost(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in ("l1", "l2"):
        raise ConfigError(f"matching.{attribute.name}: must be 'l1' or 'l2', got {value!r}")


@attrs.frozen
class OTSettings:
    """The ``matching.ot_*`` keys (stage2.md §20; defaults as the config schema)."""

    ot_cost: Literal["l1", "l2"] = attrs.field(default="l2", validator=_cost)
    ot_epsilon: float = attrs.field(default=10.0, validator=_positive_finite)
    ot_iters: int = attrs.field(default=30, validator=_iters)


def shape_points(obj: DetObject) -> F64:
    """``(n, 2)`` points of a shape in bins: a bbox's 4 corners, or a polygon's vertices in stored order."""
    bins = obj.bins
    if obj.kind is GeometryKind.BBOX:
        if len(bins) != 4:
            raise GeometryError(f"bbox_2d needs exactly 4 values, got {len(bins)}")
        flat: tuple[int, ...] = bbox_to_quad(bins)
    else:
        if len(bins) < 2 or len(bins) % 2:
            raise GeometryError(f"poly needs an even number (>= 2) of values, got {len(bins)}")
        flat = bins
    return np.asarray(flat, dtype=np.float64).reshape(-1, 2)


def sinkhorn_plan(pred_points: F64, gt_points: F64, settings: OTSettings) -> F64:
    """The entropic transport plan ``T`` (n x m) between two point sets with uniform marginals."""
    metric = "euclidean" if settings.ot_cost == "l2" else "cityblock"
    cost = cdist(pred_points, gt_points, metric=metric)
    kernel = np.exp(np.clip(-cost / settings.ot_epsilon, -_LOG_CLAMP, _LOG_CLAMP))
    n, m = kernel.shape
    a = np.full(n, 1.0 / n)
    b = np.full(m, 1.0 / m)
    v = np.ones(m)
    u = np.ones(n)
    for _ in range(settings.ot_iters):
        u = a / np.maximum(kernel @ v, _ROW_MASS_FLOOR)
        v = b / np.maximum(kernel.T @ u, _ROW_MASS_FLOOR)
    plan: F64 = u[:, None] * kernel * v[None, :]
    return plan


def ot_target_bins(pred: DetObject, gt: DetObject, settings: OTSettings) -> tuple[int, ...] | None:
    """Target bins for ``pred``'s coordinates (same count as ``pred.bins``), or None when construction fails."""
    try:
        p, g = shape_points(pred), shape_points(gt)
    except GeometryError:
        return None
    if p.shape[0] == 0 or g.shape[0] == 0:
        return None
    plan = sinkhorn_plan(p, g, settings)
    mass = plan.sum(axis=1)
    if not np.all(np.isfinite(plan)) or not np.all(mass > 0.0):
        return None
    projected = (plan @ g) / mass[:, None]
    if not np.all(np.isfinite(projected)):
        return None
    q = np.clip(np.rint(projected), 0, MAX_BIN).astype(np.int64)
    if pred.kind is GeometryKind.BBOX:
        xs, ys = q[:, 0], q[:, 1]
        return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return tuple(int(v) for v in q.reshape(-1))
