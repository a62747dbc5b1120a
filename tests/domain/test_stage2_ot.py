"""Sinkhorn OT targets of rollout_matching_sft (stage2.md §11.2, §22.24)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ConfigError
from domain.objects import DetObject, GeometryKind
from domain.stage2_ot import OTSettings, ot_target_bins, shape_points, sinkhorn_plan

BBOX, POLY = GeometryKind.BBOX, GeometryKind.POLY


def square_poly(x1: int, y1: int, x2: int, y2: int) -> DetObject:
    return DetObject("g", POLY, (x1, y1, x2, y1, x2, y2, x1, y2))


def test_spec_examples() -> None:
    s = OTSettings()
    assert ot_target_bins(DetObject("p", BBOX, (100, 100, 200, 200)), square_poly(100, 100, 200, 200), s) == (
        100,
        100,
        200,
        200,
    )
    assert ot_target_bins(DetObject("p", BBOX, (100, 100, 110, 110)), square_poly(100, 100, 110, 110), s) == (
        103,
        103,
        107,
        107,
    )


def test_bbox_corners_and_poly_vertices() -> None:
    assert shape_points(DetObject("a", BBOX, (1, 2, 3, 4))).tolist() == [[1, 2], [3, 2], [3, 4], [1, 4]]
    assert shape_points(DetObject("a", POLY, (1, 2, 3, 4, 5, 6))).tolist() == [[1, 2], [3, 4], [5, 6]]


def test_polygon_prediction_keeps_its_vertex_count_and_x_y_order() -> None:
    pred = DetObject("p", POLY, (100, 500, 300, 500, 300, 900, 100, 900, 50, 700))
    gt = DetObject("g", BBOX, (110, 510, 310, 910))
    out = ot_target_bins(pred, gt, OTSettings())
    assert out is not None and len(out) == 10
    xs, ys = out[0::2], out[1::2]
    assert all(110 <= x <= 310 for x in xs) and all(510 <= y <= 910 for y in ys)


def test_l1_cost_differs_from_l2_and_both_are_valid() -> None:
    pred = DetObject("p", BBOX, (100, 100, 130, 160))
    gt = DetObject("g", POLY, (90, 80, 140, 100, 150, 150, 100, 140))
    l1 = ot_target_bins(pred, gt, OTSettings(ot_cost="l1"))
    l2 = ot_target_bins(pred, gt, OTSettings(ot_cost="l2"))
    assert l1 is not None and l2 is not None and l1 != l2  # the setting is honoured
    for out in (l1, l2):
        assert 90 <= out[0] <= out[2] <= 150 and 80 <= out[1] <= out[3] <= 150


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="matching.ot_epsilon"):
        OTSettings(ot_epsilon=0.0)
    with pytest.raises(ConfigError, match="matching.ot_iters"):
        OTSettings(ot_iters=0)
    with pytest.raises(ConfigError, match="matching.ot_cost"):
        OTSettings(ot_cost="cosine")  # type: ignore[arg-type]


def test_shapes_without_points_fail_softly() -> None:
    assert ot_target_bins(DetObject("p", POLY, ()), square_poly(1, 1, 5, 5), OTSettings()) is None
    assert ot_target_bins(DetObject("p", BBOX, (1, 2, 3)), square_poly(1, 1, 5, 5), OTSettings()) is None


BINS = st.integers(0, 999)


@st.composite
def shapes(draw: st.DrawFn) -> DetObject:
    if draw(st.booleans()):
        x1, x2 = sorted(draw(st.lists(BINS, min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(BINS, min_size=2, max_size=2)))
        return DetObject("b", BBOX, (x1, y1, x2, y2))
    n = draw(st.integers(3, 8))
    return DetObject("p", POLY, tuple(draw(st.lists(BINS, min_size=2 * n, max_size=2 * n))))


@settings(max_examples=200, deadline=None)
@given(shapes(), shapes(), st.sampled_from(["l1", "l2"]), st.floats(0.5, 200.0), st.integers(1, 40))
def test_targets_are_convex_projections(
    pred: DetObject, gt: DetObject, cost: str, eps: float, iters: int
) -> None:
    s = OTSettings(ot_cost=cost, ot_epsilon=eps, ot_iters=iters)  # type: ignore[arg-type]
    out = ot_target_bins(pred, gt, s)
    assert out is not None and len(out) == len(pred.bins)
    g = shape_points(gt)
    xs, ys = out[0::2], out[1::2]
    assert g[:, 0].min() <= min(xs) and max(xs) <= g[:, 0].max()
    assert g[:, 1].min() <= min(ys) and max(ys) <= g[:, 1].max()
    if pred.kind is BBOX:
        assert out[0] <= out[2] and out[1] <= out[3]
    plan = sinkhorn_plan(shape_points(pred), g, s)
    assert np.all(plan >= 0) and np.all(np.isfinite(plan))
    # The last update is on v, so the column marginals are met exactly when no kernel floor is reached.
    spread = np.abs(shape_points(pred)[:, None, :] - g[None, :, :]).sum(-1).max() / eps
    if spread < 20:
        assert np.allclose(plan.sum(axis=0), 1.0 / g.shape[0], rtol=1e-6)


@settings(max_examples=100, deadline=None)
@given(shapes())
def test_far_apart_identical_shapes_map_onto_themselves(obj: DetObject) -> None:
    """With eps small against the vertex spacing the plan is a permutation: targets equal the GT."""
    pts = shape_points(obj)
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    if d.min() < 20:
        return
    gt = DetObject("g", obj.kind, obj.bins)
    assert ot_target_bins(obj, gt, OTSettings(ot_epsilon=1.0)) == obj.bins
