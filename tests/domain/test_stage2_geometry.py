"""Stage-2 AB loss reference (stage2.md §10; §22 acceptance tests 31-35). torchvision is the CIoU oracle here
only (the domain must not import it)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from domain.errors import ConfigError, InvariantViolation
from domain.stage2_geometry import (
    EPS,
    Stage2LossSettings,
    canonical_boxes,
    ciou_loss,
    ciou_per_box,
    expectation_decode,
    geometry_terms,
    huber_delta,
    smooth_l1,
    total_loss,
    weighted_ce,
)

torch = pytest.importorskip("torch")
tv_ops = pytest.importorskip("torchvision.ops")

F64 = npt.NDArray[np.float64]
BINS = np.arange(1000, dtype=np.float64) / 999


def one_hot_logits(bins: list[int], peak: float = 50.0) -> F64:
    z = np.zeros((len(bins), 1000))
    z[np.arange(len(bins)), bins] = peak
    return z


def tv_ciou_loss(pred: F64, gt: F64) -> F64:
    """torchvision's per-box ``1 − CIoU`` on the boxes our oracle sees: canonicalised, clipped, and widened
    so that width and height are at least 1e-7 (the §10 clamp, which torchvision does not have)."""

    def seen(boxes: F64) -> torch.Tensor:
        b = canonical_boxes(boxes)
        b[:, 2] = np.maximum(b[:, 2], b[:, 0] + EPS)
        b[:, 3] = np.maximum(b[:, 3], b[:, 1] + EPS)
        return torch.tensor(b, dtype=torch.float64)

    out: F64 = tv_ops.complete_box_iou_loss(seen(pred), seen(gt), reduction="none").numpy()
    return out


def eps_tolerance(pred: F64, gt: F64) -> F64:
    """How far ``x / max(y, eps)`` (§10) and torchvision's ``x / (y + eps)`` can drift apart for the union and
    the enclosing diagonal: a few eps over each (the widening moves corners by eps too)."""
    p, g = canonical_boxes(pred), canonical_boxes(gt)
    wp, hp = np.maximum(p[:, 2] - p[:, 0], EPS), np.maximum(p[:, 3] - p[:, 1], EPS)
    wg, hg = np.maximum(g[:, 2] - g[:, 0], EPS), np.maximum(g[:, 3] - g[:, 1], EPS)
    union_lower = np.maximum(np.maximum(wp * hp, wg * hg), EPS)
    cw = np.maximum(p[:, 2], g[:, 2]) - np.minimum(p[:, 0], g[:, 0])
    ch = np.maximum(p[:, 3], g[:, 3]) - np.minimum(p[:, 1], g[:, 1])
    c2 = np.maximum(cw * cw + ch * ch, EPS)
    out: F64 = 1e-9 + 4 * EPS / union_lower + 4 * EPS / c2
    return out


# ----------------------------------------------------------------------------- expectation decode (test 32)


def test_equal_mass_at_bins_0_and_999_decodes_to_one_half() -> None:
    z = np.full((1, 1000), -1e4)
    z[0, 0] = z[0, 999] = 3.0
    assert expectation_decode(z)[0] == pytest.approx(0.5, abs=1e-15)


def test_uniform_logits_decode_to_one_half_and_one_hot_to_its_bin() -> None:
    assert expectation_decode(np.zeros((1, 1000)))[0] == pytest.approx(0.5)
    assert expectation_decode(one_hot_logits([0, 300, 999], peak=200.0)).tolist() == pytest.approx(
        [0.0, 300 / 999, 1.0]
    )


@given(
    hnp.arrays(np.float64, (3, 1000), elements=st.floats(-30, 30)), st.floats(0.05, 5.0), st.floats(-50, 50)
)
@settings(max_examples=40, deadline=None)
def test_decode_is_a_mean_in_unit_interval_and_shift_invariant(z: F64, tau: float, shift: float) -> None:
    c = expectation_decode(z, tau)
    assert np.all((c >= 0) & (c <= 1))
    np.testing.assert_allclose(expectation_decode(z + shift, tau), c, atol=1e-12)
    p = np.exp(z / tau - np.max(z / tau, axis=1, keepdims=True))
    np.testing.assert_allclose(c, (p / p.sum(axis=1, keepdims=True)) @ BINS, atol=1e-12)


# ----------------------------------------------------------------------------- SmoothL1


def test_smooth_l1_branches_and_mean() -> None:
    assert smooth_l1([0.5, 2.0], [0.0, 0.0]) == pytest.approx((0.5 * 0.25 + 1.5) / 2)
    assert smooth_l1([], []) == 0.0


@given(st.lists(st.floats(-3, 3), min_size=1, max_size=12), st.data())
def test_smooth_l1_matches_torch(pred: list[float], data: st.DataObject) -> None:
    gt = data.draw(st.lists(st.floats(0, 1), min_size=len(pred), max_size=len(pred)))
    expected = torch.nn.functional.smooth_l1_loss(
        torch.tensor(pred, dtype=torch.float64), torch.tensor(gt, dtype=torch.float64), beta=1.0
    )
    assert smooth_l1(pred, gt) == pytest.approx(float(expected), abs=1e-12)


# ----------------------------------------------------------------------------- CIoU (test 33)


def test_identical_non_degenerate_boxes_have_zero_ciou_loss() -> None:
    box = [[0.1, 0.2, 0.5, 0.9]]
    assert ciou_loss(box, box) == pytest.approx(0.0, abs=1e-12)


def test_reversed_and_out_of_range_predictions_are_finite_and_canonicalised() -> None:
    gt = [[0.1, 0.2, 0.5, 0.9]]
    reversed_pred = [[0.5, 0.9, 0.1, 0.2]]
    assert ciou_loss(reversed_pred, gt) == pytest.approx(0.0, abs=1e-12)
    wild = [[-3.0, 2.5, 4.0, -1.0], [7.0, 7.0, 7.0, 7.0], [0.3, 0.3, 0.3, 0.3]]
    per_box = ciou_per_box(wild, gt * 3)
    assert np.all(np.isfinite(per_box))
    assert math.isfinite(ciou_loss(wild, gt * 3))
    assert math.isfinite(smooth_l1(np.asarray(wild).ravel(), np.asarray(gt * 3).ravel()))


def test_non_finite_per_box_values_count_as_zero() -> None:
    gt = [[0.1, 0.2, 0.5, 0.9], [0.1, 0.2, 0.5, 0.9]]
    pred = [[np.nan, 0.2, 0.5, 0.9], [0.2, 0.2, 0.6, 0.8]]
    finite_one = float(1 - ciou_per_box(pred[1:], gt[1:])[0])
    assert ciou_loss(pred, gt) == pytest.approx(finite_one / 2)


def test_no_boxes_is_zero() -> None:
    assert ciou_loss(np.zeros((0, 4)), np.zeros((0, 4))) == 0.0


def test_ciou_spec_terms_by_hand() -> None:
    # pred [0, 0, .2, .2], gt [.1, 0, .3, .2]: IoU = .02/.06, ρ² = .01, c² = .3² + .2², v = 0 (same aspect)
    got = ciou_per_box([[0, 0, 0.2, 0.2]], [[0.1, 0, 0.3, 0.2]])[0]
    assert got == pytest.approx(0.02 / 0.06 - 0.01 / (0.09 + 0.04), abs=1e-12)


BOX_COORD = st.one_of(
    st.floats(-0.3, 1.3), st.integers(0, 999).map(lambda k: k / 999), st.sampled_from([0.0, 1.0])
)


@st.composite
def box_pairs(draw: st.DrawFn) -> tuple[F64, F64]:
    n = draw(st.integers(1, 6))
    pred = np.array(draw(st.lists(st.tuples(*[BOX_COORD] * 4), min_size=n, max_size=n)), dtype=np.float64)
    gt = np.array(draw(st.lists(st.tuples(*[BOX_COORD] * 4), min_size=n, max_size=n)), dtype=np.float64)
    # degenerate boxes: collapse some axes of some boxes
    for arr in (pred, gt):
        for i in range(n):
            kind = draw(st.integers(0, 5))
            if kind == 1:
                arr[i, 2] = arr[i, 0]  # zero width
            elif kind == 2:
                arr[i, 3] = arr[i, 1]  # zero height
            elif kind == 3:
                arr[i, 2], arr[i, 3] = arr[i, 0], arr[i, 1]  # a point
    return pred, gt


@given(box_pairs())
@settings(max_examples=300, deadline=None)
def test_ciou_matches_torchvision_on_random_and_degenerate_boxes(pair: tuple[F64, F64]) -> None:
    pred, gt = pair
    ours = 1 - ciou_per_box(pred, gt)
    assert np.all(np.isfinite(ours))
    assert np.all((ours >= -1e-12) & (ours < 3))
    theirs = tv_ciou_loss(pred, gt)
    assert np.all(np.isfinite(theirs))
    assert np.all(np.abs(ours - theirs) <= eps_tolerance(pred, gt))


def test_ciou_matches_torchvision_tightly_on_ordinary_boxes() -> None:
    rng = np.random.default_rng(7)
    pred, gt = rng.uniform(-0.1, 1.1, size=(2000, 4)), rng.uniform(0, 1, size=(2000, 4))
    p, g = canonical_boxes(pred), canonical_boxes(gt)
    ordinary = np.all(np.concatenate([p[:, 2:] - p[:, :2], g[:, 2:] - g[:, :2]], axis=1) > 0.05, axis=1)
    assert ordinary.sum() > 500
    ours = 1 - ciou_per_box(pred[ordinary], gt[ordinary])
    np.testing.assert_allclose(ours, tv_ciou_loss(pred[ordinary], gt[ordinary]), rtol=0, atol=2e-6)
    assert float(np.mean(ours)) == pytest.approx(
        float(
            tv_ops.complete_box_iou_loss(
                torch.tensor(p[ordinary]), torch.tensor(g[ordinary]), reduction="mean"
            )
        ),
        abs=1e-5,
    )


@given(box_pairs())
@settings(max_examples=100, deadline=None)
def test_ciou_is_symmetric_and_invariant_to_corner_order(pair: tuple[F64, F64]) -> None:
    pred, gt = pair
    np.testing.assert_allclose(ciou_per_box(pred, gt), ciou_per_box(gt, pred), atol=1e-12)
    flipped = pred[:, [2, 3, 0, 1]]
    np.testing.assert_allclose(ciou_per_box(flipped, gt), ciou_per_box(pred, gt), atol=0)


# ----------------------------------------------------------------------------- regularisers


def test_huber_branch_at_delta() -> None:
    d = np.array([0.0005, -0.0005, 0.001, 0.01])
    np.testing.assert_allclose(huber_delta(d, 0.001), [0.125e-3, 0.125e-3, 0.0005, 0.0095])


def test_one_hot_at_gt_has_zero_regularisers() -> None:
    bins = [10, 20, 400, 500]
    terms = geometry_terms(one_hot_logits(bins, peak=1e3), bins, Stage2LossSettings())
    assert terms.n_boxes == 1
    for value in (
        terms.coord_ce,
        terms.coord_el1,
        terms.coord_ehuber,
        terms.coord_entropy,
        terms.bbox_smoothl1,
    ):
        assert value == pytest.approx(0.0, abs=1e-12)
    assert terms.bbox_ciou == pytest.approx(0.0, abs=1e-9)


def test_uniform_slot_regularisers() -> None:
    bins = [0, 0, 999, 999]
    terms = geometry_terms(np.zeros((4, 1000)), bins, Stage2LossSettings(coord_huber_delta=0.01))
    assert terms.coord_entropy == pytest.approx(math.log(1000))
    assert terms.coord_ce == pytest.approx(math.log(1000))
    assert terms.coord_el1 == pytest.approx(0.5)  # E|k/999 − 0| over a uniform k
    expected_eh = float(np.mean(huber_delta(BINS, 0.01)))
    assert terms.coord_ehuber == pytest.approx(expected_eh)


@given(
    hnp.arrays(np.float64, (8, 1000), elements=st.floats(-20, 20)),
    st.lists(st.integers(0, 999), min_size=8, max_size=8),
)
@settings(max_examples=30, deadline=None)
def test_regularisers_match_torch(z: F64, bins: list[int]) -> None:
    s = Stage2LossSettings(softctx_temperature=0.7, coord_huber_delta=0.05)
    terms = geometry_terms(z, bins, s)
    zt = torch.tensor(z / 0.7)
    logp = torch.log_softmax(zt, dim=-1)
    p = logp.exp()
    c = torch.tensor(bins, dtype=torch.float64) / 999
    d = torch.tensor(BINS)[None, :] - c[:, None]
    assert terms.coord_ce == pytest.approx(
        float(torch.nn.functional.nll_loss(logp, torch.tensor(bins))), abs=1e-10
    )
    assert terms.coord_el1 == pytest.approx(float((p * d.abs()).sum(1).mean()), abs=1e-10)
    huber = torch.nn.functional.huber_loss(d, torch.zeros_like(d), reduction="none", delta=0.05) / 0.05
    assert terms.coord_ehuber == pytest.approx(float((p * huber).sum(1).mean()), abs=1e-10)
    assert terms.coord_entropy == pytest.approx(float(-(p * logp).sum(1).mean()), abs=1e-10)
    c_hat = p @ torch.tensor(BINS)
    assert terms.bbox_smoothl1 == pytest.approx(
        float(torch.nn.functional.smooth_l1_loss(c_hat, c)), abs=1e-12
    )


# ----------------------------------------------------------------------------- pooling, CE, total (tests 31, 34, 35)


def test_fn_only_geometry_is_positive() -> None:
    terms = geometry_terms(np.zeros((4, 1000)), [100, 100, 300, 400], Stage2LossSettings())
    assert terms.bbox_smoothl1 > 0 and terms.bbox_ciou > 0


def test_one_matched_and_two_fn_boxes_form_one_mean_over_three() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 1000)) * 3
    bins = [10, 20, 300, 400, 500, 500, 700, 900, 0, 100, 999, 999]
    s = Stage2LossSettings()
    matched, fn, pooled = (
        geometry_terms(z[:4], bins[:4], s),
        geometry_terms(z[4:], bins[4:], s),
        geometry_terms(z, bins, s),
    )
    assert pooled.bbox_ciou == pytest.approx((matched.bbox_ciou + 2 * fn.bbox_ciou) / 3)
    assert pooled.bbox_smoothl1 == pytest.approx((matched.bbox_smoothl1 + 2 * fn.bbox_smoothl1) / 3)
    assert pooled.bbox_ciou != pytest.approx(matched.bbox_ciou + fn.bbox_ciou)


def test_no_boxes_means_zero_geometry() -> None:
    terms = geometry_terms(np.zeros((0, 1000)), [], Stage2LossSettings())
    assert terms.n_boxes == 0 and terms.coord(Stage2LossSettings(coord_ce_weight=1.0)) == 0.0


def test_ce_is_zero_when_nothing_is_supervised_and_weighted_otherwise() -> None:
    assert weighted_ce([2.0, 3.0], [0.0, 0.0]) == 0.0
    assert weighted_ce([], []) == 0.0
    assert weighted_ce([2.0, 3.0, 5.0], [1.0, 0.5, 0.0]) == pytest.approx((2.0 + 1.5) / 1.5)


def test_total_is_ce_plus_weighted_terms_and_metrics_name_loss_keys() -> None:
    s = Stage2LossSettings(
        bbox_smoothl1_weight=2.0, bbox_ciou_weight=0.5, coord_ce_weight=0.1, coord_el1_weight=0.2,
        coord_ehuber_weight=0.3, coord_entropy_weight=-0.4,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    terms = geometry_terms(rng.normal(size=(8, 1000)), rng.integers(0, 1000, size=8), s)
    reg = 0.1 * terms.coord_ce + 0.2 * terms.coord_el1 + 0.3 * terms.coord_ehuber - 0.4 * terms.coord_entropy
    assert total_loss(1.25, terms, s) == pytest.approx(
        1.25 + 2.0 * terms.bbox_smoothl1 + 0.5 * terms.bbox_ciou + reg
    )
    metrics = terms.loss_metrics(s)
    assert metrics["loss/coord_reg"] == pytest.approx(reg)
    from domain.metrics_registry import is_registered

    assert all(is_registered(k) for k in metrics)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"softctx_temperature": 0.0}, "softctx_temperature"),
        ({"bbox_ciou_weight": -1.0}, "bbox_ciou_weight"),
        ({"coord_huber_delta": 1e-7}, "coord_huber_delta"),
        ({"coord_el1_weight": float("nan")}, "coord_el1_weight"),
    ],
)
def test_settings_errors_name_the_key(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"stage2_ab\.losses\.{key}"):
        Stage2LossSettings(**kwargs)


def test_signed_entropy_weight_is_allowed() -> None:
    assert Stage2LossSettings(coord_entropy_weight=-0.5).coord_entropy_weight == -0.5


def test_shape_errors() -> None:
    with pytest.raises(InvariantViolation):
        geometry_terms(np.zeros((3, 1000)), [1, 2, 3], Stage2LossSettings())
    with pytest.raises(InvariantViolation):
        geometry_terms(np.zeros((4, 999)), [1, 2, 3, 4], Stage2LossSettings())
    with pytest.raises(InvariantViolation):
        geometry_terms(np.zeros((4, 1000)), [1, 2, 3, 1000], Stage2LossSettings())
