"""Torch Stage-2 AB geometry loss against the float64 reference ``domain.stage2_geometry`` (stage2.md §10)."""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters.torch.stage2_geometry import (
    Stage2GeometryLoss,
    ciou_loss,
    ciou_per_box,
    expectation_decode,
    geometry_loss,
    total_loss,
    weighted_ce,
)
from domain import stage2_geometry as ref
from domain.coord_tokens import MAX_BIN, NUM_BINS
from domain.errors import InvariantViolation
from domain.stage2_geometry import EPS, Stage2LossSettings

TERMS = ("bbox_smoothl1", "bbox_ciou", "coord_ce", "coord_el1", "coord_ehuber", "coord_entropy")
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- generators


@st.composite
def loss_settings(draw: Any) -> Stage2LossSettings:
    w = st.floats(0.0, 3.0, allow_nan=False)
    return Stage2LossSettings(
        softctx_temperature=draw(st.sampled_from([1.0, 0.5, 2.0, 0.75])),
        bbox_smoothl1_weight=draw(w),
        bbox_ciou_weight=draw(w),
        coord_ce_weight=draw(w),
        coord_el1_weight=draw(w),
        coord_ehuber_weight=draw(w),
        coord_entropy_weight=draw(st.floats(-2.0, 2.0, allow_nan=False)),
        # Large δ puts several bins in the quadratic branch (δ = 0.001 only the GT bin itself).
        coord_huber_delta=draw(st.sampled_from([0.001, 1e-6, 0.0105, 0.05, 0.3])),
    )


_BIN = st.one_of(st.sampled_from([0, MAX_BIN]), st.integers(0, MAX_BIN))


@st.composite
def gt_bins(draw: Any, n: int) -> np.ndarray:
    """GT boxes including zero width / height, swapped corners and bins 0 / 999."""
    rows = []
    for _ in range(n):
        x1, y1, x2, y2 = (draw(_BIN) for _ in range(4))
        kind = draw(st.sampled_from(["plain", "zero_w", "zero_h", "point", "swap", "full"]))
        if kind == "zero_w":
            x2 = x1
        elif kind == "zero_h":
            y2 = y1
        elif kind == "point":
            x2, y2 = x1, y1
        elif kind == "swap":
            x1, x2 = max(x1, x2), min(x1, x2)
        elif kind == "full":
            x1, y1, x2, y2 = MAX_BIN, MAX_BIN, 0, 0
        rows.append([x1, y1, x2, y2])
    return np.asarray(rows, dtype=np.int64).reshape(-1)


@st.composite
def logits_case(draw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Coord-column logits [4N, 1000] and GT bins [4N]; predicted boxes may be degenerate (identical
    rows for both corners of an axis -> zero width/height) or swapped; peaks at bins 0 / 999 too."""
    n = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sigma = draw(st.sampled_from([0.0, 0.3, 1.0, 3.0, 6.0]))
    z = rng.normal(0.0, 1.0, (4 * n, NUM_BINS)) * sigma
    for r in range(4 * n):
        if draw(st.booleans()):
            z[r, draw(_BIN)] += draw(st.sampled_from([2.0, 8.0, 25.0]))
    z = z.reshape(n, 4, NUM_BINS)
    for b in range(n):
        kind = draw(st.sampled_from(["plain", "zero_w", "zero_h", "point", "swap"]))
        if kind in ("zero_w", "point"):
            z[b, 2] = z[b, 0]
        if kind in ("zero_h", "point"):
            z[b, 3] = z[b, 1]
        if kind == "swap":
            z[b, [0, 2]] = z[b, [2, 0]]
    return z.reshape(4 * n, NUM_BINS), draw(gt_bins(n))


def _check(got: Stage2GeometryLoss, z: np.ndarray, bins: np.ndarray, s: Stage2LossSettings, rtol: float) -> None:
    """Every term within ``rtol`` relative to its scale (max(1, |value|); for weighted sums Σ|w·term|)."""
    want = ref.geometry_terms(z, bins, s)
    assert got.n_boxes == want.n_boxes
    for name in TERMS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dim() == 0 and g.requires_grad, name
        # Log-probability terms over 1000 bins live on the scale ln(1000) (fp32 sums of 1000 p·log p).
        unit = math.log(NUM_BINS) if name in ("coord_ce", "coord_entropy") else 1.0
        assert abs(float(g.detach()) - w) <= rtol * max(unit, abs(w)), (name, float(g.detach()), w)
    weights = {
        "bbox_smoothl1": s.bbox_smoothl1_weight, "bbox_ciou": s.bbox_ciou_weight, "coord_ce": s.coord_ce_weight,
        "coord_el1": s.coord_el1_weight, "coord_ehuber": s.coord_ehuber_weight, "coord_entropy": s.coord_entropy_weight,
    }
    units = {k: math.log(NUM_BINS) if k in ("coord_ce", "coord_entropy") else 1.0 for k in TERMS}
    scale = max(1.0, sum(abs(weights[k]) * max(units[k], abs(getattr(want, k))) for k in TERMS))
    assert abs(float(got.coord_reg.detach()) - want.coord_reg(s)) <= rtol * scale
    assert abs(float(got.coord.detach()) - want.coord(s)) <= rtol * scale
    # The total L = L_CE + geometry, against the domain's total.
    l_ce = torch.tensor(0.7, dtype=got.coord.dtype)
    assert abs(float(total_loss(l_ce, got).detach()) - ref.total_loss(0.7, want, s)) <= rtol * (scale + 0.7)


def _well_conditioned(z: np.ndarray, s: Stage2LossSettings) -> bool:
    """fp32 rounding of ĉ (~1e-7) is amplified by ρ²/c² and atan(w/h) for tiny nonzero predicted
    boxes; the fp32 comparison keeps predicted widths/heights either exactly 0 or ≥ 0.02."""
    c = ref.expectation_decode(z, s.softctx_temperature).reshape(-1, 4)
    ext = np.abs(np.concatenate([c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]]))
    return bool(np.all((ext == 0) | (ext >= 0.02)))


# ----------------------------------------------------------------------------- values against the reference


@HYP
@given(case=logits_case(), s=loss_settings())
def test_fp64_matches_reference_exactly(case: tuple[np.ndarray, np.ndarray], s: Stage2LossSettings) -> None:
    z, bins = case
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    got = geometry_loss(zt, torch.tensor(bins), s)
    _check(got, z, bins, s, 1e-10)
    got.coord.backward()
    assert zt.grad is not None and bool(torch.isfinite(zt.grad).all())


@HYP
@given(case=logits_case(), s=loss_settings())
def test_fp32_matches_float64_reference(case: tuple[np.ndarray, np.ndarray], s: Stage2LossSettings) -> None:
    z, bins = case
    z32 = z.astype(np.float32)
    assume(_well_conditioned(z32.astype(np.float64), s))
    zt = torch.tensor(z32, requires_grad=True)
    got = geometry_loss(zt, torch.tensor(bins, dtype=torch.int32), s)
    assert got.coord.dtype == torch.float32
    _check(got, z32.astype(np.float64), bins, s, 1e-6)
    got.coord.backward()
    assert zt.grad is not None and zt.grad.dtype == torch.float32 and bool(torch.isfinite(zt.grad).all())


def test_terms_view_matches_reference() -> None:
    z = np.random.default_rng(3).normal(0, 2, (8, NUM_BINS))
    bins = np.array([10, 20, 500, 999, 0, 0, 0, 0])
    s = Stage2LossSettings(coord_ce_weight=0.5, coord_entropy_weight=-0.25)
    got = geometry_loss(torch.tensor(z), torch.tensor(bins), s).terms()
    want = ref.geometry_terms(z, bins, s)
    assert got.n_boxes == want.n_boxes == 2
    for name in TERMS:
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-12)
    assert got.loss_metrics(s) == pytest.approx(want.loss_metrics(s), abs=1e-12)


def test_expectation_decode_matches_reference_and_half_at_ends() -> None:
    z = np.random.default_rng(0).normal(0, 3, (6, NUM_BINS))
    z[5] = -1e4
    z[5, [0, MAX_BIN]] = 0.0  # equal mass at bins 0 and 999
    got = expectation_decode(torch.tensor(z), 0.5)
    np.testing.assert_allclose(got.numpy(), ref.expectation_decode(z, 0.5), rtol=0, atol=1e-12)
    assert float(got[5]) == pytest.approx(0.5, abs=1e-12)


_COORD = st.one_of(st.sampled_from([0.0, 1.0, 0.5, -0.25, 1.5]), st.floats(-0.5, 1.5, allow_nan=False))


@HYP
@given(boxes=st.lists(st.tuples(*([_COORD] * 8)), min_size=1, max_size=6))
def test_ciou_per_box_matches_reference(boxes: list[tuple[float, ...]]) -> None:
    a = np.asarray(boxes, dtype=np.float64)
    p, g = a[:, :4].copy(), a[:, 4:].copy()
    p[0, 2] = p[0, 0]  # a zero-width predicted box
    got = ciou_per_box(torch.tensor(p), torch.tensor(g)).numpy()
    np.testing.assert_allclose(got, ref.ciou_per_box(p, g), rtol=1e-12, atol=1e-12)
    assert float(ciou_loss(torch.tensor(p), torch.tensor(g))) == pytest.approx(ref.ciou_loss(p, g), abs=1e-12)


def test_nonfinite_box_counts_zero_and_sends_no_gradient() -> None:
    p = torch.tensor([[0.1, 0.2, 0.5, 0.6], [float("nan"), 0.2, 0.3, 0.4], [0.3, 0.3, 0.9, 0.7]],
                     dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[0.15, 0.1, 0.45, 0.7], [0.1, 0.1, 0.2, 0.2], [0.2, 0.4, 0.8, 0.9]], dtype=torch.float64)
    loss = ciou_loss(p, g)
    assert float(loss.detach()) == pytest.approx(ref.ciou_loss(p.detach().numpy(), g.numpy()), abs=1e-12)
    loss.backward()
    assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    assert bool((p.grad[1] == 0).all()) and bool((p.grad[0] != 0).any())


# ----------------------------------------------------------------------------- gradients


def _grad_settings() -> Stage2LossSettings:
    return Stage2LossSettings(
        softctx_temperature=0.8, bbox_smoothl1_weight=1.3, bbox_ciou_weight=0.9, coord_ce_weight=0.4,
        coord_el1_weight=0.7, coord_ehuber_weight=0.6, coord_entropy_weight=-0.3, coord_huber_delta=0.0105,
    )


def _small_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(7)
    base = torch.tensor(rng.normal(0, 1.5, (8, NUM_BINS)))
    cols = torch.tensor([0, 1, 5, 100, 250, 400, 500, 650, 800, 990, 998, 999])
    base[:, cols] += torch.tensor(rng.normal(2.0, 1.0, (8, cols.numel())))
    bins = torch.tensor([120, 300, 600, 710, 999, 0, 400, 0])  # second box: swapped corners, bins 0 / 999
    return base, cols, bins, base[:, cols].clone()


def _embed(base: torch.Tensor, cols: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return base.index_put((torch.arange(base.shape[0]).unsqueeze(1), cols.unsqueeze(0)), x)


def test_gradcheck_float64_small_case() -> None:
    """torch.autograd.gradcheck (finite differences, float64): SmoothL1, every regulariser and the total
    without CIoU have exact gradients (CIoU's gradient is by design not the derivative of its value: α is
    a constant, see the next tests)."""
    base, cols, bins, x0 = _small_case()
    s = attrs.evolve(_grad_settings(), bbox_ciou_weight=0.0)

    def terms(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g = geometry_loss(_embed(base, cols, x), bins, s)
        return (g.coord, g.bbox_smoothl1, g.coord_ce, g.coord_el1, g.coord_ehuber, g.coord_entropy)

    assert torch.autograd.gradcheck(terms, (x0.requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)
    full = torch.tensor(np.random.default_rng(8).normal(0, 2, (8, NUM_BINS)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: geometry_loss(z, bins, s).coord, (full,), fast_mode=True,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ciou_gradient_is_finite_difference_minus_alpha_path() -> None:
    """The CIoU gradient (and the total's) equals the central finite difference of its value minus the
    v·∇α part that a constant α drops (§10); the full-α formula itself passes gradcheck."""
    base, cols, bins, x0 = _small_case()
    s = _grad_settings()
    c = (bins.double() / MAX_BIN).reshape(-1, 4)
    x = x0.clone().requires_grad_(True)
    g = geometry_loss(_embed(base, cols, x), bins, s)
    (grad_total,) = torch.autograd.grad(g.coord, x, retain_graph=True)
    (grad_ciou,) = torch.autograd.grad(g.bbox_ciou, x)
    assert bool(torch.isfinite(grad_total).all()) and bool(torch.isfinite(grad_ciou).all())

    def value(xx: torch.Tensor, attr: str) -> float:
        return float(getattr(geometry_loss(_embed(base, cols, xx), bins, s), attr))

    h = 1e-6
    fd_ciou, fd_total = torch.zeros_like(x0), torch.zeros_like(x0)
    for idx in np.ndindex(*x0.shape):
        up, dn = x0.clone(), x0.clone()
        up[idx] += h
        dn[idx] -= h
        fd_ciou[idx] = (value(up, "bbox_ciou") - value(dn, "bbox_ciou")) / (2 * h)
        fd_total[idx] = (value(up, "coord") - value(dn, "coord")) / (2 * h)

    xa = x0.clone().requires_grad_(True)
    _, alpha, v = _ciou_alpha_with_grad(expectation_decode(_embed(base, cols, xa), s.softctx_temperature).reshape(-1, 4), c)
    (alpha_path,) = torch.autograd.grad((v.detach() * alpha).mean(), xa)
    assert float(alpha_path.abs().max()) > 1e-4
    torch.testing.assert_close(grad_ciou, fd_ciou - alpha_path, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grad_total, fd_total - s.bbox_ciou_weight * alpha_path, rtol=1e-5, atol=1e-8)

    def full_ciou(xx: torch.Tensor) -> torch.Tensor:
        ciou, _, _ = _ciou_alpha_with_grad(expectation_decode(_embed(base, cols, xx), s.softctx_temperature).reshape(-1, 4), c)
        return (1 - ciou).mean()

    assert torch.autograd.gradcheck(full_ciou, (x0.clone().requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)


def _ciou_alpha_with_grad(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """§10 CIoU written independently, α NOT detached; returns (ciou, α, v) per box."""
    def canon(b: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.minimum(b[:, 0], b[:, 2]), torch.maximum(b[:, 0], b[:, 2])
        y1, y2 = torch.minimum(b[:, 1], b[:, 3]), torch.maximum(b[:, 1], b[:, 3])
        return torch.stack([x1, y1, x2, y2], 1).clamp(0, 1)

    p, g = canon(pred), canon(gt)
    wp, hp = (p[:, 2] - p[:, 0]).clamp_min(EPS), (p[:, 3] - p[:, 1]).clamp_min(EPS)
    wg, hg = (g[:, 2] - g[:, 0]).clamp_min(EPS), (g[:, 3] - g[:, 1]).clamp_min(EPS)
    inter = (torch.minimum(p[:, 2], g[:, 2]) - torch.maximum(p[:, 0], g[:, 0])).clamp_min(0) * (
        torch.minimum(p[:, 3], g[:, 3]) - torch.maximum(p[:, 1], g[:, 1])).clamp_min(0)
    iou = inter / (wp * hp + wg * hg - inter).clamp_min(EPS)
    rho2 = ((p[:, 0] + p[:, 2] - g[:, 0] - g[:, 2]) / 2) ** 2 + ((p[:, 1] + p[:, 3] - g[:, 1] - g[:, 3]) / 2) ** 2
    cw = torch.maximum(p[:, 2], g[:, 2]) - torch.minimum(p[:, 0], g[:, 0])
    ch = torch.maximum(p[:, 3], g[:, 3]) - torch.minimum(p[:, 1], g[:, 1])
    c2 = (cw**2 + ch**2).clamp_min(EPS)
    v = 4 / math.pi**2 * (torch.atan(wg / hg) - torch.atan(wp / hp)) ** 2
    alpha = v / (1 - iou + v + EPS)
    return iou - rho2 / c2 - alpha * v, alpha, v


def test_alpha_carries_no_gradient() -> None:
    """§10: α is a constant. With α differentiable, ∇(αv) = α∇v + v∇α; detaching α removes exactly
    the v·∇α part, so ∇_detached = ∇_full − ∇ mean(v_const·α)."""
    rng = np.random.default_rng(11)
    z = torch.tensor(rng.normal(0, 2.5, (12, NUM_BINS)))
    bins = torch.tensor([100, 200, 300, 900, 50, 60, 700, 150, 0, 999, 999, 0])
    s = Stage2LossSettings(bbox_smoothl1_weight=0.0, bbox_ciou_weight=1.0)
    c = bins.double() / MAX_BIN

    z1 = z.clone().requires_grad_(True)
    geometry_loss(z1, bins, s).coord.backward()

    z2 = z.clone().requires_grad_(True)
    ciou_full, _, _ = _ciou_alpha_with_grad(expectation_decode(z2).reshape(-1, 4), c.reshape(-1, 4))
    (1 - ciou_full).mean().backward()

    z3 = z.clone().requires_grad_(True)
    _, alpha, v = _ciou_alpha_with_grad(expectation_decode(z3).reshape(-1, 4), c.reshape(-1, 4))
    (v.detach() * alpha).mean().backward()

    assert z1.grad is not None and z2.grad is not None and z3.grad is not None
    assert float(z3.grad.abs().max()) > 1e-4  # the α path matters in this case
    assert float(geometry_loss(z, bins, s).bbox_ciou.detach()) == pytest.approx(float((1 - ciou_full).mean().detach()), abs=1e-12)
    torch.testing.assert_close(z1.grad, z2.grad - z3.grad, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(z1.grad, z2.grad, rtol=1e-6, atol=1e-9)


def test_zero_boxes_zero_loss_with_zero_gradient() -> None:
    big = torch.randn(3, 5, NUM_BINS, requires_grad=True)
    rows = big.reshape(-1, NUM_BINS)[torch.zeros(0, dtype=torch.int64)]
    g = geometry_loss(rows, torch.zeros(0, dtype=torch.int64), _grad_settings())
    assert g.n_boxes == 0
    for t in (*(getattr(g, k) for k in TERMS), g.coord_reg, g.coord):
        assert t.dim() == 0 and float(t.detach()) == 0.0 and t.grad_fn is not None
    total_loss(torch.zeros(()), g).backward()
    assert big.grad is not None and bool((big.grad == 0).all())
    assert ref.geometry_terms(np.zeros((0, NUM_BINS)), [], _grad_settings()).coord(_grad_settings()) == 0.0


def test_bf16_logits_are_computed_in_fp32() -> None:
    rng = np.random.default_rng(5)
    zb = torch.tensor(rng.normal(0, 3, (8, NUM_BINS)), dtype=torch.bfloat16, requires_grad=True)
    bins = torch.tensor([10, 20, 600, 700, 999, 999, 0, 0])
    s = _grad_settings()
    got = geometry_loss(zb, bins, s)
    assert all(getattr(got, k).dtype == torch.float32 for k in (*TERMS, "coord"))
    z64 = zb.detach().double().numpy()
    _check(got, z64, bins.numpy(), s, 1e-6)
    # A bf16 computation would be far off: the check above is sensitive to the compute dtype.
    p16 = torch.softmax(zb.detach() / s.softctx_temperature, -1)
    c16 = p16 @ (torch.arange(NUM_BINS, dtype=torch.bfloat16) / MAX_BIN)
    assert float((c16.double() - torch.tensor(ref.expectation_decode(z64, s.softctx_temperature))).abs().max()) > 1e-4
    got.coord.backward()
    assert zb.grad is not None and zb.grad.dtype == torch.bfloat16 and bool(torch.isfinite(zb.grad).all())


# ----------------------------------------------------------------------------- weighted CE


@HYP
@given(data=st.lists(st.tuples(st.floats(0.0, 20.0), st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 2.0])),
                     min_size=0, max_size=12))
def test_weighted_ce_matches_reference(data: list[tuple[float, float]]) -> None:
    ce = torch.tensor([c for c, _ in data], dtype=torch.float32, requires_grad=True)
    w = torch.tensor([x for _, x in data], dtype=torch.float32)
    got = weighted_ce(ce, w)
    want = ref.weighted_ce([c for c, _ in data], [x for _, x in data])
    assert got.dim() == 0 and got.dtype == torch.float32
    assert abs(float(got.detach()) - want) <= 1e-6 * max(1.0, abs(want))
    got.backward()
    assert ce.grad is not None and bool(torch.isfinite(ce.grad).all())


def test_weighted_ce_no_clamp_to_one_and_zero_weights() -> None:
    ce = torch.tensor([2.0, 4.0, 8.0], requires_grad=True)
    got = weighted_ce(ce, torch.tensor([0.25, 0.25, 0.0]))
    assert float(got.detach()) == pytest.approx(3.0)  # (0.5 + 1) / 0.5; a clamp to 1 would give 1.5
    zero = weighted_ce(ce, torch.zeros(3))
    assert float(zero.detach()) == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert ce.grad is not None and bool((ce.grad == 0).all())
    nan_ce = torch.tensor([float("nan"), 1.0], requires_grad=True)
    z2 = weighted_ce(nan_ce, torch.zeros(2))
    assert float(z2.detach()) == 0.0
    assert float(weighted_ce(torch.tensor([1.0, 3.0], dtype=torch.bfloat16), torch.tensor([1.0, 1.0]))) == 2.0
    assert weighted_ce(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.0])).dtype == torch.float32


def test_bad_inputs_raise() -> None:
    s = Stage2LossSettings()
    with pytest.raises(InvariantViolation, match="shape"):
        geometry_loss(torch.zeros(4, 999), torch.zeros(4, dtype=torch.int64), s)
    with pytest.raises(InvariantViolation, match="whole number of boxes"):
        geometry_loss(torch.zeros(3, NUM_BINS), torch.zeros(3, dtype=torch.int64), s)
    with pytest.raises(InvariantViolation, match="GT bins"):
        geometry_loss(torch.zeros(4, NUM_BINS), torch.tensor([0, 1, 2, 1000]), s)
    with pytest.raises(InvariantViolation, match="GT bins"):
        geometry_loss(torch.zeros(4, NUM_BINS), torch.zeros(3, dtype=torch.int64), s)
    with pytest.raises(InvariantViolation, match="integer"):
        geometry_loss(torch.zeros(4, NUM_BINS), torch.zeros(4), s)
    with pytest.raises(InvariantViolation, match="weights"):
        weighted_ce(torch.zeros(3), torch.zeros(2))
