"""Stage-2 matching (stage2.md §6, acceptance §22 items 20-23): pruning, gate, Hungarian optimality."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ConfigError, GeometryError
from domain.geometry import box_iou, mask_iou
from domain.objects import DetObject, GeometryKind
from domain.stage2_matching import (
    INF,
    BinGeometry,
    MatchResult,
    MatchSettings,
    candidate_cost_matrix,
    match_predictions,
    prune_candidates,
)

BBOX, POLY = GeometryKind.BBOX, GeometryKind.POLY


def box(x1: int, y1: int, x2: int, y2: int) -> BinGeometry:
    return BinGeometry(BBOX, (x1, y1, x2, y2))


def canon(g: BinGeometry) -> tuple[int, ...]:
    if g.kind is BBOX:
        x1, y1, x2, y2 = g.bins
        return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    return g.bins


def aabb(g: BinGeometry) -> tuple[int, int, int, int]:
    xs, ys = g.bins[0::2], g.bins[1::2]
    return (min(xs), min(ys), max(xs), max(ys))


# ---------------------------------------------------------------------------------------------
# Brute-force reference: every partial 1:1 assignment under the §6 cost model


def brute_force(
    iou: list[list[float]], feasible: list[list[bool]], n_gt: int, fp_cost: float, fn_cost: float
) -> tuple[float, list[frozenset[tuple[int, int]]]]:
    """(optimal total cost, every optimal pair set) by enumerating all partial injective assignments."""
    n_pred = len(iou)
    best = math.inf
    winners: list[frozenset[tuple[int, int]]] = []

    def walk(i: int, used: frozenset[int], pairs: tuple[tuple[int, int], ...], acc: float) -> None:
        nonlocal best, winners
        if i == n_pred:
            total = acc + fn_cost * (n_gt - len(pairs))
            if total < best - 1e-9:
                best, winners = total, [frozenset(pairs)]
            elif abs(total - best) <= 1e-9:
                winners.append(frozenset(pairs))
            return
        walk(i + 1, used, pairs, acc + fp_cost)
        for j in range(n_gt):
            if j not in used and feasible[i][j]:
                walk(i + 1, used | {j}, (*pairs, (i, j)), acc + 1.0 - iou[i][j])

    walk(0, frozenset(), (), 0.0)
    return best, winners


def result_cost(res: MatchResult, iou: list[list[float]], fp_cost: float, fn_cost: float) -> float:
    return (
        sum(1.0 - iou[i][j] for i, j in res.matched_pairs)
        + fp_cost * len(res.fp_pred_indices)
        + fn_cost * len(res.fn_gt_indices)
    )


def check_partition(res: MatchResult, n_pred: int, n_gt: int) -> None:
    preds = [i for i, _ in res.matched_pairs]
    gts = [j for _, j in res.matched_pairs]
    assert preds == sorted(preds) and len(set(preds)) == len(preds) and len(set(gts)) == len(gts)
    assert sorted(preds + list(res.fp_pred_indices)) == list(range(n_pred))
    assert sorted(gts + list(res.fn_gt_indices)) == list(range(n_gt))
    assert list(res.fp_pred_indices) == sorted(res.fp_pred_indices)
    assert list(res.fn_gt_indices) == sorted(res.fn_gt_indices)
    assert res.matched_maskiou_count == len(res.matched_pairs)


# Shapes crowded into a small corner of the canvas so that overlaps (and gate decisions) are common.
coord = st.integers(0, 240)


@st.composite
def shapes(draw: st.DrawFn) -> BinGeometry:
    if draw(st.integers(0, 2)) == 0:  # a third polygons (any ring, self-intersecting ones too)
        n = draw(st.integers(3, 5))
        return BinGeometry(POLY, tuple(draw(coord) for _ in range(2 * n)))
    x1, x2 = sorted((draw(coord), draw(coord)))
    y1, y2 = sorted((draw(coord), draw(coord)))
    if draw(st.integers(0, 4)) == 0:  # a reversed box: matching canonicalises by min/max
        x1, x2 = x2, x1
    return BinGeometry(BBOX, (x1, y1, x2, y2))


costs = st.floats(0.0, 3.0, allow_nan=False)
RES = 64


@settings(max_examples=150, deadline=None)
@given(
    preds=st.lists(shapes(), max_size=4),
    gts=st.lists(shapes(), max_size=4),
    gate=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9]),
    fp_cost=costs,
    fn_cost=costs,
)
def test_hungarian_equals_brute_force_without_pruning(
    preds: list[BinGeometry], gts: list[BinGeometry], gate: float, fp_cost: float, fn_cost: float
) -> None:
    s = MatchSettings(
        candidate_top_k=10, maskiou_gate=gate, maskiou_resolution=RES, fp_cost=fp_cost, fn_cost=fn_cost
    )
    res = match_predictions(preds, gts, s)
    check_partition(res, len(preds), len(gts))
    iou = [[mask_iou(canon(p), p.kind, canon(g), g.kind, RES) for g in gts] for p in preds]
    feasible = [[v >= gate for v in row] for row in iou]
    best, winners = brute_force(iou, feasible, len(gts), fp_cost, fn_cost)
    assert all(feasible[i][j] for i, j in res.matched_pairs)
    assert result_cost(res, iou, fp_cost, fn_cost) == pytest.approx(best, abs=1e-9)
    if len(winners) == 1:
        assert frozenset(res.matched_pairs) == winners[0]
    # Every pair is a candidate (k >= G): each infeasible pair is one rejection.
    assert res.candidate_pairs == len(preds) * len(gts)
    assert res.gating_rejections == sum(not f for row in feasible for f in row)
    assert res.matched_maskiou_sum == pytest.approx(sum(iou[i][j] for i, j in res.matched_pairs))


@settings(max_examples=150, deadline=None)
@given(
    preds=st.lists(shapes(), max_size=4),
    gts=st.lists(shapes(), min_size=1, max_size=4),
    k=st.integers(1, 3),
    gate=st.sampled_from([0.0, 0.2, 0.5]),
)
def test_pruned_solve_is_optimal_over_candidates(
    preds: list[BinGeometry], gts: list[BinGeometry], k: int, gate: float
) -> None:
    s = MatchSettings(candidate_top_k=k, maskiou_gate=gate, maskiou_resolution=RES)
    res = match_predictions(preds, gts, s)
    check_partition(res, len(preds), len(gts))
    cands = prune_candidates([aabb(p) for p in preds], [aabb(g) for g in gts], k)
    iou = [[mask_iou(canon(p), p.kind, canon(g), g.kind, RES) for g in gts] for p in preds]
    feasible = [[j in cands[i] and iou[i][j] >= gate for j in range(len(gts))] for i in range(len(preds))]
    best, _ = brute_force(iou, feasible, len(gts), s.fp_cost, s.fn_cost)
    assert all(feasible[i][j] for i, j in res.matched_pairs)
    assert result_cost(res, iou, s.fp_cost, s.fn_cost) == pytest.approx(best, abs=1e-9)
    assert res.candidate_pairs == len(preds) * min(k, len(gts))
    assert res.gating_rejections == sum(1 for i in range(len(preds)) for j in cands[i] if iou[i][j] < gate)


@settings(max_examples=200, deadline=None)
@given(
    preds=st.lists(shapes(), min_size=1, max_size=5),
    gts=st.lists(shapes(), min_size=1, max_size=7),
    k=st.integers(1, 8),
)
def test_candidates_are_the_best_by_the_spec_order(
    preds: list[BinGeometry], gts: list[BinGeometry], k: int
) -> None:
    gt_boxes = [aabb(g) for g in gts]
    cands = prune_candidates([aabb(p) for p in preds], gt_boxes, k)
    for p, chosen in zip(preds, cands):
        assert len(chosen) == min(k, len(gts)) and len(set(chosen)) == len(chosen)
        ious = [box_iou(aabb(p), g) for g in gt_boxes]
        if max(ious) > 0:
            keys = [(-ious[j], j) for j in range(len(gts))]
        else:
            cx, cy = (aabb(p)[0] + aabb(p)[2]) / 2, (aabb(p)[1] + aabb(p)[3]) / 2
            keys = [
                (((g[0] + g[2]) / 2 - cx) ** 2 + ((g[1] + g[3]) / 2 - cy) ** 2, j)
                for j, g in enumerate(gt_boxes)
            ]
        # Chosen in preference order, and no left-out GT precedes a chosen one.
        assert [keys[j] for j in chosen] == sorted(keys[j] for j in chosen)
        left_out = set(range(len(gts))) - set(chosen)
        assert all(keys[j] > keys[c] for j in left_out for c in chosen)


# ---------------------------------------------------------------------------------------------
# Acceptance §22 items 20-23 and the §6 edge cases


def test_identical_boxes_match_one_to_one() -> None:
    gts = [box(100, 100, 200, 200), box(300, 300, 420, 380), box(600, 50, 700, 90)]
    preds = [gts[2], gts[0], gts[1]]
    res = match_predictions(preds, gts, MatchSettings())
    assert res.matched_pairs == ((0, 2), (1, 0), (2, 1))
    assert res.fp_pred_indices == () and res.fn_gt_indices == ()
    assert res.matched_maskiou_sum == pytest.approx(3.0) and res.matched_maskiou_count == 3


def test_disjoint_boxes_with_gate_half_are_all_fp_and_fn() -> None:
    gts = [box(0, 0, 100, 100), box(0, 500, 100, 600)]
    preds = [box(500, 0, 600, 100), box(500, 500, 600, 600), box(800, 800, 900, 900)]
    res = match_predictions(preds, gts, MatchSettings(maskiou_gate=0.5))
    assert res.matched_pairs == ()
    assert res.fp_pred_indices == (0, 1, 2) and res.fn_gt_indices == (0, 1)
    assert res.matched_maskiou_count == 0 and res.matched_maskiou_sum == 0.0


def _shifted_pair_with_iou(lo: float, hi: float) -> tuple[BinGeometry, BinGeometry, float]:
    gt = box(100, 100, 300, 300)
    for dx in range(200):
        pred = box(100 + dx, 100, 300 + dx, 300)
        iou = mask_iou(pred.bins, BBOX, gt.bins, BBOX, 256)
        if lo < iou < hi:
            return pred, gt, iou
    raise AssertionError(f"no shift gives a mask IoU in ({lo}, {hi})")


def test_gate_rejects_0_29_and_accepts_0_31() -> None:
    s = MatchSettings(maskiou_gate=0.3)
    pred, gt, iou = _shifted_pair_with_iou(0.28, 0.295)
    res = match_predictions([pred], [gt], s)
    assert (res.matched_pairs, res.gating_rejections, res.candidate_pairs) == ((), 1, 1)
    assert res.fp_pred_indices == (0,) and res.fn_gt_indices == (0,)
    pred, gt, iou = _shifted_pair_with_iou(0.305, 0.32)
    res = match_predictions([pred], [gt], s)
    assert (res.matched_pairs, res.gating_rejections, res.candidate_pairs) == (((0, 0),), 0, 1)
    assert res.matched_maskiou_sum == pytest.approx(iou)


def test_gate_boundary_is_inclusive() -> None:
    pred, gt, iou = _shifted_pair_with_iou(0.4, 0.6)
    at = match_predictions([pred], [gt], MatchSettings(maskiou_gate=iou))
    assert at.matched_pairs == ((0, 0),) and at.gating_rejections == 0
    above = match_predictions([pred], [gt], MatchSettings(maskiou_gate=float(np.nextafter(iou, 1.0))))
    assert above.matched_pairs == () and above.gating_rejections == 1


def test_zero_iou_prediction_uses_centre_distance_candidates_with_index_ties() -> None:
    # The prediction overlaps no GT. GT 1 and GT 3 are equally near (mirror images); GT 0 is farther,
    # GT 2 farthest.
    pred = box(480, 480, 520, 520)
    gts = [box(0, 480, 40, 520), box(600, 480, 640, 520), box(900, 900, 999, 999), box(360, 480, 400, 520)]
    assert prune_candidates([aabb(pred)], [aabb(g) for g in gts], 2) == ((1, 3),)
    assert prune_candidates([aabb(pred)], [aabb(g) for g in gts], 3) == ((1, 3, 0),)
    for k in (1, 2, 3, 4, 9):
        res = match_predictions([pred], gts, MatchSettings(candidate_top_k=k))
        assert res.gating_rejections == min(len(gts), k) == res.candidate_pairs
        assert res.matched_pairs == () and res.fn_gt_indices == (0, 1, 2, 3)


def test_top_k_ties_broken_by_gt_index() -> None:
    pred = box(100, 100, 200, 200)
    # GT 0 and GT 2 are the same box (equal AABB IoU); GT 1 overlaps more.
    gts = [box(150, 100, 250, 200), box(110, 100, 210, 200), box(150, 100, 250, 200)]
    assert prune_candidates([aabb(pred)], [aabb(g) for g in gts], 2) == ((1, 0),)
    assert prune_candidates([aabb(pred)], [aabb(g) for g in gts], 5) == ((1, 0, 2),)
    # A positive-IoU prediction keeps zero-IoU GTs after the overlapping ones, not by distance.
    far_first = [box(900, 900, 950, 950), box(150, 100, 250, 200), box(210, 100, 260, 200)]
    assert prune_candidates([aabb(pred)], [aabb(g) for g in far_first], 3) == ((1, 0, 2),)


def test_non_candidates_are_infeasible_and_not_rejections() -> None:
    pred = box(100, 100, 200, 200)
    gts = [box(105, 100, 205, 200), box(700, 700, 800, 800)]
    one = match_predictions([pred], gts, MatchSettings(candidate_top_k=1))
    assert (one.candidate_pairs, one.gating_rejections, one.matched_pairs) == (1, 0, ((0, 0),))
    two = match_predictions([pred], gts, MatchSettings(candidate_top_k=2))
    assert (two.candidate_pairs, two.gating_rejections, two.matched_pairs) == (2, 1, ((0, 0),))
    cost, rejections, pairs = candidate_cost_matrix([pred], gts, MatchSettings(candidate_top_k=1))
    assert cost[0, 1] == INF and cost[0, 0] < 1.0 and (rejections, pairs) == (0, 1)


def test_an_infeasible_edge_the_solver_takes_is_no_match() -> None:
    # Costs above INF make the solver prefer an INF edge to the dummies; §6 step 7 still calls it FP.
    pred = box(100, 100, 200, 200)
    gts = [box(190, 190, 290, 290), box(700, 700, 800, 800)]
    s = MatchSettings(candidate_top_k=1, fp_cost=1e7, fn_cost=1e7)
    res = match_predictions([pred], gts, s)
    assert (res.matched_pairs, res.fp_pred_indices, res.fn_gt_indices) == ((), (0,), (0, 1))
    assert res.gating_rejections == 1 and res.matched_maskiou_count == 0


def test_pruning_can_force_a_worse_match() -> None:
    # k = 1: each prediction may only use its best-AABB GT; both want GT 0, so one of them stays FP
    # even though GT 1 would pass the gate for it.
    gts = [box(100, 100, 200, 200), box(130, 100, 230, 200)]
    preds = [box(100, 100, 200, 200), box(110, 100, 210, 200)]
    k1 = match_predictions(preds, gts, MatchSettings(candidate_top_k=1))
    assert k1.matched_pairs == ((0, 0),) and k1.fp_pred_indices == (1,) and k1.fn_gt_indices == (1,)
    k2 = match_predictions(preds, gts, MatchSettings(candidate_top_k=2))
    assert k2.matched_pairs == ((0, 0), (1, 1))


def test_empty_sides() -> None:
    gts = [box(0, 0, 10, 10), box(20, 20, 30, 30)]
    no_pred = match_predictions([], gts, MatchSettings())
    assert (no_pred.matched_pairs, no_pred.fp_pred_indices, no_pred.fn_gt_indices) == ((), (), (0, 1))
    no_gt = match_predictions(gts, [], MatchSettings())
    assert (no_gt.matched_pairs, no_gt.fp_pred_indices, no_gt.fn_gt_indices) == ((), (0, 1), ())
    both = match_predictions([], [], MatchSettings())
    assert (both.candidate_pairs, both.gating_rejections, both.matched_maskiou_count) == (0, 0, 0)


def test_polygon_with_fewer_than_three_points_has_iou_zero() -> None:
    gt = box(100, 100, 200, 200)
    for bins in [(100, 100, 200, 200), (100, 100)]:
        res = match_predictions([BinGeometry(POLY, bins)], [gt], MatchSettings(maskiou_gate=0.01))
        assert (res.matched_pairs, res.gating_rejections, res.candidate_pairs) == ((), 1, 1)
    cost, _, _ = candidate_cost_matrix(
        [BinGeometry(POLY, (100, 100, 200, 200))], [gt], MatchSettings(maskiou_gate=0.0)
    )
    assert cost[0, 0] == 1.0  # IoU 0 passes a zero gate with cost 1


def test_polygon_matches_its_own_box() -> None:
    quad = BinGeometry(POLY, (100, 100, 200, 100, 200, 200, 100, 200))
    res = match_predictions([quad], [box(100, 100, 200, 200)], MatchSettings())
    assert res.matched_pairs == ((0, 0),) and res.matched_maskiou_sum == pytest.approx(1.0)


def test_reversed_bbox_is_canonicalised() -> None:
    res = match_predictions([box(200, 200, 100, 100)], [box(100, 100, 200, 200)], MatchSettings())
    assert res.matched_pairs == ((0, 0),) and res.matched_maskiou_sum == pytest.approx(1.0)


def test_accepts_det_objects() -> None:
    gt = DetObject("cat", BBOX, (100, 100, 200, 200))
    pred = DetObject("dog", BBOX, (100, 100, 200, 200))  # no desc cost
    assert match_predictions([pred], [gt], MatchSettings()).matched_pairs == ((0, 0),)


@settings(max_examples=60, deadline=None)
@given(preds=st.lists(shapes(), max_size=5), gts=st.lists(shapes(), max_size=5), k=st.integers(1, 6))
def test_deterministic(preds: list[BinGeometry], gts: list[BinGeometry], k: int) -> None:
    s = MatchSettings(candidate_top_k=k, maskiou_resolution=RES)
    assert match_predictions(preds, gts, s) == match_predictions(list(preds), list(gts), s)


@settings(max_examples=100, deadline=None)
@given(preds=st.lists(shapes(), min_size=1, max_size=4), gts=st.lists(shapes(), max_size=4), data=st.data())
def test_permuting_predictions_permutes_a_unique_optimum(
    preds: list[BinGeometry], gts: list[BinGeometry], data: st.DataObject
) -> None:
    # Candidates are chosen per prediction, so permuting predictions permutes the problem; when the
    # optimum is unique the matching follows the permutation.
    s = MatchSettings(candidate_top_k=2, maskiou_resolution=RES)
    perm = data.draw(st.permutations(range(len(preds))))
    base = match_predictions(preds, gts, s)
    moved = match_predictions([preds[i] for i in perm], gts, s)
    cands = prune_candidates([aabb(p) for p in preds], [aabb(g) for g in gts], 2)
    iou = [[mask_iou(canon(p), p.kind, canon(g), g.kind, RES) for g in gts] for p in preds]
    feasible = [
        [j in cands[i] and iou[i][j] >= s.maskiou_gate for j in range(len(gts))] for i in range(len(preds))
    ]
    _, winners = brute_force(iou, feasible, len(gts), s.fp_cost, s.fn_cost)
    assert moved.gating_rejections == base.gating_rejections
    assert moved.candidate_pairs == base.candidate_pairs
    if len(winners) == 1:
        assert {(perm[i], j) for i, j in moved.matched_pairs} == set(base.matched_pairs)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (BinGeometry(BBOX, (1, 2, 3)), r"preds\[1\]\.bins: a bbox_2d needs exactly 4 values, got 3"),
        (BinGeometry(BBOX, (1, 2, 3, 1000)), r"preds\[1\]\.bins\[3\]: value 1000 out of range"),
        (BinGeometry(POLY, (1, 2, 3)), r"preds\[1\]\.bins: a poly needs an even number"),
        (BinGeometry(POLY, ()), r"preds\[1\]\.bins: a poly needs an even number"),
        (BinGeometry(BBOX, (1, 2, 3.5, 4)), r"preds\[1\]\.bins\[2\]: expected an integer bin"),  # type: ignore[arg-type]
        (BinGeometry(BBOX, (1, 2, True, 4)), r"preds\[1\]\.bins\[2\]: expected an integer bin"),
    ],
)
def test_bad_shapes_raise_naming_the_place(shape: BinGeometry, message: str) -> None:
    with pytest.raises(GeometryError, match=message):
        match_predictions([box(0, 0, 5, 5), shape], [box(0, 0, 5, 5)], MatchSettings())


def test_bad_kind_raises() -> None:
    with pytest.raises(GeometryError, match="'bbox_2d' or 'poly'"):
        BinGeometry("mask", (1, 2, 3, 4))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"maskiou_gate": 1.5}, r"matching\.maskiou_gate: must be in \[0, 1\]"),
        ({"maskiou_gate": -0.1}, r"matching\.maskiou_gate: must be in \[0, 1\]"),
        ({"maskiou_gate": float("nan")}, r"matching\.maskiou_gate: must be finite"),
        ({"candidate_top_k": 0}, r"matching\.candidate_top_k: must be >= 1"),
        ({"candidate_top_k": 2.0}, r"matching\.candidate_top_k: expected an integer"),
        ({"maskiou_resolution": 15}, r"matching\.maskiou_resolution: must be >= 16"),
        ({"fp_cost": -1.0}, r"matching\.fp_cost: must be >= 0"),
        ({"fn_cost": "2"}, r"matching\.fn_cost: expected a number"),
    ],
)
def test_bad_settings_raise_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MatchSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_defaults_are_the_spec_defaults() -> None:
    s = MatchSettings()
    assert (s.maskiou_gate, s.candidate_top_k, s.maskiou_resolution, s.fp_cost, s.fn_cost) == (
        0.3,
        5,
        256,
        0.5,
        2.0,
    )


@settings(max_examples=150, deadline=None)
@given(
    preds=st.lists(shapes(), max_size=6),
    gts=st.lists(shapes(), max_size=6),
    k=st.integers(1, 7),
    gate=st.sampled_from([0.0, 0.3, 0.7]),
    resolution=st.sampled_from([16, 64, 256]),
)
def test_cost_matrix_equals_the_raster_path_exactly(
    preds: list[BinGeometry], gts: list[BinGeometry], k: int, gate: float, resolution: int
) -> None:
    """bbox-vs-bbox pairs take the closed-form masks, the others the rasteriser: every cost is the
    same float the per-pair raster path (``mask_iou`` of the canonical shapes) gives."""
    s = MatchSettings(candidate_top_k=k, maskiou_gate=gate, maskiou_resolution=resolution)
    cost, rejections, pairs = candidate_cost_matrix(preds, gts, s)
    cands = prune_candidates([aabb(p) for p in preds], [aabb(g) for g in gts], k)
    expected = np.full((len(preds), len(gts)), INF)
    n_rejected = 0
    for i, p in enumerate(preds):
        for j in cands[i] if gts else ():
            iou = mask_iou(canon(p), p.kind, canon(gts[j]), gts[j].kind, resolution)
            if iou < gate:
                n_rejected += 1
            else:
                expected[i, j] = 1.0 - iou
    assert np.array_equal(cost, expected)
    assert (rejections, pairs) == (n_rejected, sum(len(c) for c in cands) if gts else 0)
