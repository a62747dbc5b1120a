"""Torch Stage-1 loss kernel against the float64 reference (stage1.md §1; tests 8-13, 19, 21, 38)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from adapters.torch.coord_loss import (
    CoordLossKernel,
    coord_loss_sums,
    guarded_zero,
    lambda_for_backward,
    micro_step_stats,
)
from domain.coord_tokens import NUM_BINS, CoordIdTable
from domain.errors import StepError
from domain.losses import (
    PRODUCTION_SETTINGS,
    CoordLossSettings,
    gaussian_target,
    micro_batch_reference,
    objective_metric_updates,
)
from domain.normalisation import micro_batch_lambda, step_lambdas, step_objective

V = 1100
_rng = np.random.default_rng(1234)
COORD_IDS = [int(x) for x in _rng.permutation(np.arange(60, 1100))[:NUM_BINS]]  # non-contiguous, not sorted
TABLE = CoordIdTable(COORD_IDS)
COORD_SET = set(COORD_IDS)
NONCOORD = [v for v in range(V) if v not in COORD_SET]
COLS = torch.tensor(COORD_IDS)


def random_batch(seed: int, b: int, length: int, p_sup: float, p_coord: float, scale: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0.0, scale, (b, length, V))).to(dtype)
    labels = torch.full((b, length), -100, dtype=torch.int64)
    for r in range(b):
        for j in range(length):
            if rng.random() < p_sup:
                labels[r, j] = int(rng.choice(COORD_IDS)) if rng.random() < p_coord else int(rng.choice(NONCOORD))
    return logits, labels


SETTINGS = st.builds(
    CoordLossSettings,
    enabled=st.booleans(),
    ce_weight=st.sampled_from([0.0, 0.5, 1.0]),
    soft_ce_weight=st.sampled_from([0.0, 1.0, 3.0]),
    w1_weight=st.sampled_from([0.0, 1.0]),
    gate_weight=st.sampled_from([1.0, 2.0]),
    temperature=st.sampled_from([0.5, 0.9, 1.0, 1.7]),
    target_sigma=st.sampled_from([0.5, 1.0, 2.0, 30.0]),
    target_truncate=st.sampled_from([None, 0, 8, 16]),
)


# ----------------------------------------------------------------------------- kernel == reference


@given(
    seed=st.integers(0, 2**31),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9)),
    p_sup=st.floats(0.0, 1.0),
    p_coord=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 2.0, 8.0]),
    cfg=SETTINGS,
    chunk_rows=st.integers(1, 6),
)
@settings(max_examples=40, deadline=None)
def test_kernel_matches_the_float64_reference(
    seed: int, shape: tuple[int, int], p_sup: float, p_coord: float, scale: float,
    cfg: CoordLossSettings, chunk_rows: int,
) -> None:
    logits, labels = random_batch(seed, shape[0], shape[1], p_sup, p_coord, scale)
    res = coord_loss_sums(logits, labels, TABLE, cfg, coord_metrics=True, chunk_bytes=chunk_rows * 4 * V)
    ref, block, pairs = micro_batch_reference(logits.double().numpy(), labels.numpy(), TABLE, cfg)
    got = res.micro_batch_sums()
    assert (got.num_noncoord, got.num_coord, got.num_correct) == (ref.num_noncoord, ref.num_coord, ref.num_correct)
    assert got.sum_ce == pytest.approx(ref.sum_ce, rel=1e-5, abs=1e-4)
    assert got.sum_coord == pytest.approx(ref.sum_coord, rel=1e-5, abs=1e-4)
    gb = res.coord_block_sums()
    assert gb is not None and gb.count == block.count
    for name in ("loss", "soft_ce", "ce", "gate", "mass", "p_gt", "margin", "abs_err", "w1_to_delta"):
        assert getattr(gb, name) == pytest.approx(getattr(block, name), rel=1e-4, abs=1e-3), name
    assert gb.w1 == pytest.approx(block.w1, rel=1e-4, abs=1e-6)
    assert gb.top5_hits == block.top5_hits
    if block.abs_err_p90 is None:
        assert gb.abs_err_p90 is None
    else:
        assert gb.abs_err_p90 == pytest.approx(block.abs_err_p90, rel=1e-4, abs=1e-3)
    assert res.targets.tolist() == pairs.target.tolist()
    assert res.is_coord.tolist() == pairs.is_coord.tolist()


def test_float64_kernel_is_exact_to_the_reference() -> None:
    logits, labels = random_batch(7, 2, 8, 0.9, 0.5, 3.0, torch.float64)
    res = coord_loss_sums(logits, labels, TABLE, PRODUCTION_SETTINGS)
    ref, _, _ = micro_batch_reference(logits.numpy(), labels.numpy(), TABLE, PRODUCTION_SETTINGS)
    assert float(res.sum_ce) == pytest.approx(ref.sum_ce, rel=1e-12)
    assert float(res.sum_coord) == pytest.approx(ref.sum_coord, rel=1e-12)


def test_bf16_logits_are_upcast() -> None:
    logits, labels = random_batch(8, 1, 12, 1.0, 0.5, 2.0, torch.bfloat16)
    res = coord_loss_sums(logits, labels, TABLE, PRODUCTION_SETTINGS)
    ref, _, _ = micro_batch_reference(logits.double().numpy(), labels.numpy(), TABLE, PRODUCTION_SETTINGS)
    assert res.sum_ce.dtype == torch.float32
    assert float(res.sum_coord) == pytest.approx(ref.sum_coord, rel=1e-4)


def test_worked_pair_through_the_kernel() -> None:
    k = np.arange(NUM_BINS)
    logits = torch.full((1, 2, V), -1e4, dtype=torch.float64)
    logits[0, 0, COLS] = torch.from_numpy(0.9 * (-((k - 502.0) ** 2) / 2))
    logits[0, 0, NONCOORD[0]] = 0.0
    labels = torch.tensor([[-100, COORD_IDS[500]]])
    res = coord_loss_sums(logits, labels, TABLE, PRODUCTION_SETTINGS)
    t = res.coord_terms
    assert t is not None
    assert float(t["soft_ce"][0]) == pytest.approx(3.418938, abs=1e-5)
    assert float(t["w1"][0]) == pytest.approx(0.002002, abs=1e-5)
    assert float(t["gate"][0]) == pytest.approx(0.335716, abs=1e-5)
    assert float(t["mass"][0]) == pytest.approx(0.714826, abs=1e-5)
    assert float(t["ce"][0]) == pytest.approx(2.771619, abs=1e-5)
    assert float(res.sum_coord) == pytest.approx(10.594532, abs=1e-5)
    assert float(t["w1_to_delta"][0]) == pytest.approx(2.0094, abs=1e-4)
    assert float(t["margin"][0]) == pytest.approx(2.0, abs=1e-5)


# ----------------------------------------------------------------------------- gradients


def naive_lambda(logits: torch.Tensor, labels: torch.Tensor, cfg: CoordLossSettings, n_step: int, c_step: int,
                 world: int) -> torch.Tensor:
    """Straightforward autograd version over the full vocabulary (oracle for gradients)."""
    y = labels[:, 1:]
    mask = y != -100
    rows = logits[:, :-1][mask]
    tgt = y[mask]
    is_c = torch.tensor([int(t) in COORD_SET for t in tgt], dtype=torch.bool)
    ce = -torch.log_softmax(rows, -1).gather(1, tgt.unsqueeze(1)).squeeze(1)
    if not cfg.enabled:
        return world * ce.sum() / max(1, n_step)
    sum_ce = ce[~is_c].sum()
    zc = torch.nan_to_num(rows[is_c], nan=0.0, posinf=1e4, neginf=-1e4).clamp(-1e4, 1e4)
    bins = torch.tensor([COORD_IDS.index(int(t)) for t in tgt[is_c]], dtype=torch.int64)
    u = zc[:, COLS]
    s = u / cfg.temperature
    logp = torch.log_softmax(s, -1)
    p = torch.exp(logp)
    p = p / p.sum(-1, keepdim=True)
    q = torch.stack([torch.from_numpy(gaussian_target(int(b), cfg.target_sigma, cfg.target_truncate)) for b in bins]) \
        if len(bins) else torch.zeros((0, NUM_BINS), dtype=torch.float64)
    q = q.to(logits.dtype)
    soft = -(q * logp).sum(-1)
    w1 = (torch.cumsum(p, -1) - torch.cumsum(q, -1)).abs().sum(-1) / 999
    gate = (torch.logsumexp(zc / cfg.temperature, -1) - torch.logsumexp(s, -1)).clamp_min(0)
    ce_bin = -torch.log_softmax(u, -1).gather(1, bins.unsqueeze(1)).squeeze(1)
    ell = cfg.ce_weight * ce_bin + cfg.soft_ce_weight * soft + cfg.w1_weight * w1 + cfg.gate_weight * gate
    return world * (sum_ce / max(1, n_step) + ell.sum() / max(1, c_step))


@given(seed=st.integers(0, 2**31), cfg=SETTINGS, chunk_rows=st.integers(1, 5), world=st.integers(1, 3))
@settings(max_examples=25, deadline=None)
def test_gradient_matches_the_naive_full_vocabulary_autograd(
    seed: int, cfg: CoordLossSettings, chunk_rows: int, world: int
) -> None:
    logits, labels = random_batch(seed, 2, 6, 0.8, 0.5, 3.0, torch.float64)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    kernel = CoordLossKernel(TABLE, cfg, chunk_bytes=chunk_rows * 4 * V)
    counts = kernel.count_pairs(labels, V)
    n_step = counts.noncoord + 3 if cfg.enabled else counts.supervised + 3
    c_step = counts.coord + 2
    lam = lambda_for_backward(kernel(a, labels), n_step, c_step, world)
    ref = naive_lambda(b, labels, cfg, n_step, c_step, world)
    assert float(lam.detach()) == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12)
    lam.backward()
    ref.backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_gradcheck_fast_mode() -> None:
    logits, labels = random_batch(3, 1, 5, 1.0, 0.5, 2.0, torch.float64)
    cfg = CoordLossSettings(enabled=True, ce_weight=0.7, target_truncate=5, temperature=0.8)
    x = logits.clone().requires_grad_(True)

    def f(z: torch.Tensor) -> torch.Tensor:
        return lambda_for_backward(coord_loss_sums(z, labels, TABLE, cfg, chunk_bytes=2 * 4 * V), 7, 5, 2)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gate_weight_zero_gives_no_gradient_outside_the_coord_columns() -> None:
    """Test 12; and the labels are untouched in identity and values."""
    logits, labels = random_batch(11, 2, 7, 1.0, 1.0, 2.0)  # every supervised pair is a coord pair
    labels_before = labels.clone()
    labels_id = id(labels)
    noncoord_cols = torch.tensor(NONCOORD)
    for gate_weight, expect_zero in ((0.0, True), (1.0, False)):
        cfg = CoordLossSettings(enabled=True, ce_weight=1.0, gate_weight=gate_weight, target_truncate=8)
        x = logits.clone().requires_grad_(True)
        res = coord_loss_sums(x, labels, TABLE, cfg)
        lambda_for_backward(res, 0, res.num_coord, 1).backward()
        assert x.grad is not None
        b, i = res.pair_index
        outside = x.grad[b, i][:, noncoord_cols]
        assert bool((outside == 0).all()) is expect_zero
        assert float(x.grad[b, i][:, COLS].abs().sum()) > 0
        assert id(labels) == labels_id
        assert torch.equal(labels, labels_before)


# ----------------------------------------------------------------------------- tests 8-11 through the kernel


def _sharp(t: int, extra: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.full((1, 2, V), -1e4)
    logits[0, 0, COLS] = 0.0
    logits[0, 0, COORD_IDS[t]] = 30.0
    if extra is not None:
        logits[0, 0, NONCOORD[4]] = extra
    return logits, torch.tensor([[-100, COORD_IDS[t]]])


def test_confident_pair_and_leak() -> None:
    cfg = CoordLossSettings(enabled=True, target_truncate=0)
    sharp = float(coord_loss_sums(*_sharp(77), TABLE, cfg).sum_coord)
    leak = float(coord_loss_sums(*_sharp(77, extra=40.0), TABLE, cfg).sum_coord)
    assert sharp < 1e-3
    assert leak - sharp > 1.0


def test_non_finite_logits_give_finite_coord_terms_and_gradients() -> None:
    logits, labels = random_batch(5, 1, 6, 1.0, 1.0, 2.0)
    logits[0, :, COLS[:5]] = math.nan
    logits[0, :, COLS[5:9]] = math.inf
    logits[0, :, COLS[9:12]] = -math.inf
    logits[0, :, NONCOORD[:3]] = math.inf
    x = logits.clone().requires_grad_(True)
    res = coord_loss_sums(x, labels, TABLE, PRODUCTION_SETTINGS)
    assert res.num_coord > 0 and math.isfinite(float(res.sum_coord.detach()))
    lambda_for_backward(res, 0, res.num_coord, 1).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_temperature_changes_soft_ce_not_hard_ce() -> None:
    logits, labels = random_batch(9, 1, 10, 1.0, 1.0, 2.0)
    a = coord_loss_sums(logits, labels, TABLE, CoordLossSettings(enabled=True, ce_weight=1.0, temperature=1.0))
    b = coord_loss_sums(logits, labels, TABLE, CoordLossSettings(enabled=True, ce_weight=1.0, temperature=0.5))
    sa, sb = a.coord_block_sums(), b.coord_block_sums()
    assert sa is not None and sb is not None
    assert sa.ce == sb.ce
    assert sa.soft_ce != pytest.approx(sb.soft_ce, rel=1e-3)
    ua = {u.key: u.value for u in objective_metric_updates(a.micro_batch_sums(), sa, a.settings, 1)}
    ub = {u.key: u.value for u in objective_metric_updates(b.micro_batch_sums(), sb, b.settings, 1)}
    assert ua["coord_diag/ce"] == ub["coord_diag/ce"] and ua["coord_diag/soft_ce"] != ub["coord_diag/soft_ce"]


# ----------------------------------------------------------------------------- normalisation (tests 13, 19, 21)


def test_worked_lambdas_on_tensors() -> None:
    """R3 on the kernel's tensors is the domain's one formula (domain.normalisation.micro_batch_lambda)."""
    micro_batch_lambda_tensor = micro_batch_lambda
    five, sixteen, nine, zero = (torch.tensor(x) for x in (5.0, 16.0, 9.0, 0.0))
    assert float(micro_batch_lambda_tensor(five, sixteen, 40, 8, 1)) == pytest.approx(2.125)
    assert float(micro_batch_lambda_tensor(nine, zero, 40, 8, 1)) == pytest.approx(0.225)
    assert float(micro_batch_lambda_tensor(five, sixteen, 40, 8, 2)) == pytest.approx(4.25)
    assert float(micro_batch_lambda_tensor(nine, zero, 40, 8, 2)) == pytest.approx(0.45)


@pytest.mark.parametrize("enabled", [True, False])
def test_lambdas_of_a_window_sum_to_the_step_objective(enabled: bool) -> None:
    cfg = CoordLossSettings(enabled=enabled, target_truncate=8)
    kernel = CoordLossKernel(TABLE, cfg, chunk_bytes=3 * 4 * V)
    batches = [random_batch(s, b, ln, 0.7, 0.4, 2.0, torch.float64) for s, b, ln in ((1, 2, 5), (2, 1, 9), (3, 3, 4))]
    counts = [kernel.count_pairs(lab, V) for _, lab in batches]
    n_step = sum(c.noncoord for c in counts)
    c_step = sum(c.coord for c in counts)
    t_step = n_step + c_step
    results = [kernel(lg, lab) for lg, lab in batches]
    world = 2
    lambdas = [float(lambda_for_backward(r, n_step if enabled else t_step, c_step, world)) for r in results]
    refs = [micro_batch_reference(lg.numpy(), lab.numpy(), TABLE, cfg)[0] for lg, lab in batches]
    expected = step_objective(refs)
    # Two ranks: rank 0 runs batches 0 and 1, rank 1 runs batch 2.
    windows = [[refs[0], refs[1]], [refs[2]]]
    assert step_lambdas(windows) == [[pytest.approx(lambdas[0]), pytest.approx(lambdas[1])], [pytest.approx(lambdas[2])]]
    assert (lambdas[0] + lambdas[1] + lambdas[2]) / world == pytest.approx(expected, rel=1e-12)
    if not enabled:  # test 21: pure CE is Σ_T ce / T_step
        assert expected == pytest.approx(sum(r.sum_ce for r in refs) / t_step, rel=1e-12)
    for (_, lab), c, r in zip(batches, counts, results):
        assert (c.noncoord, c.coord) == (r.num_noncoord, r.num_coord)


def test_micro_batch_without_supervised_pairs_returns_a_connected_zero() -> None:
    logits = torch.randn(1, 5, V, requires_grad=True)
    labels = torch.full((1, 5), -100)
    res = coord_loss_sums(logits, labels, TABLE, PRODUCTION_SETTINGS)
    lam = lambda_for_backward(res, 0, 0, 2)
    assert float(lam.detach()) == 0.0 and lam.grad_fn is not None
    lam.backward()
    assert logits.grad is not None and bool((logits.grad == 0).all())


def test_zero_anchor_survives_non_finite_logits() -> None:
    logits = torch.randn(1, 3, V)
    logits[0, 0, 0] = math.inf
    logits[0, 1, 1] = math.nan
    x = logits.requires_grad_(True)
    z = guarded_zero(x)
    assert float(z.detach()) == 0.0
    z.backward()
    assert x.grad is not None and bool((x.grad == 0).all())


def test_window_without_noncoord_pairs_has_no_nan() -> None:
    logits, labels = random_batch(4, 1, 8, 1.0, 1.0, 2.0)
    res = coord_loss_sums(logits.requires_grad_(True), labels, TABLE, PRODUCTION_SETTINGS)
    assert res.num_noncoord == 0 and float(res.sum_ce) == 0.0
    lam = lambda_for_backward(res, 0, res.num_coord, 1)
    assert math.isfinite(float(lam.detach())) and lam.grad_fn is not None


def test_token_acc_numerator_counts_coord_pairs() -> None:
    logits = torch.full((1, 4, V), -5.0)
    labels = torch.tensor([[-100, NONCOORD[1], COORD_IDS[10], COORD_IDS[20]]])
    logits[0, 0, NONCOORD[1]] = 5.0
    logits[0, 1, COORD_IDS[10]] = 5.0
    logits[0, 2, NONCOORD[2]] = 5.0
    res = coord_loss_sums(logits, labels, TABLE, PRODUCTION_SETTINGS)
    assert (res.num_correct, res.num_supervised) == (2, 3)


def test_logit_stats_for_the_monitor() -> None:
    logits = torch.zeros(1, 3, V)
    logits[0, 0, 5] = math.inf
    logits[0, 1, 6] = -250.0
    labels = torch.tensor([[-100, NONCOORD[0], NONCOORD[1]]])
    res = coord_loss_sums(logits, labels, TABLE, PRODUCTION_SETTINGS, logit_stats=True)
    assert res.row_finite is not None and res.row_max_abs is not None
    assert res.row_finite.tolist() == [False, True]
    assert res.row_max_abs.tolist() == [1e4, 250.0]
    stats = micro_step_stats(res)
    assert (stats.supervised_tokens, stats.finite_logits, stats.max_abs_logit) == (2, False, 1e4)
    assert stats.loss == float("inf") and not stats.finite_loss  # CE of the row holding +inf
    with pytest.raises(StepError, match="logit_stats"):
        micro_step_stats(coord_loss_sums(logits, labels, TABLE, PRODUCTION_SETTINGS))


# ----------------------------------------------------------------------------- input checks


def test_shape_errors_name_the_shapes() -> None:
    labels = torch.full((1, 4), -100)
    with pytest.raises(StepError, match=r"\[1, 4\].*\(1, 1, 1100\)"):
        coord_loss_sums(torch.zeros(1, 1, V), labels, TABLE, PRODUCTION_SETTINGS)
    with pytest.raises(StepError, match="vocab size 900"):
        coord_loss_sums(torch.zeros(1, 4, 900), labels, TABLE, PRODUCTION_SETTINGS)
    with pytest.raises(StepError, match="labels must be"):
        coord_loss_sums(torch.zeros(1, 4, V), torch.zeros(4), TABLE, PRODUCTION_SETTINGS)
    with pytest.raises(StepError, match=r"labels\[0, 2\]"):
        coord_loss_sums(torch.zeros(1, 4, V), torch.tensor([[-100, 3, V + 5, 4]]), TABLE, PRODUCTION_SETTINGS)


# ----------------------------------------------------------------------------- memory: no second full-vocab copy


class _AllocationLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []
        self.storages: dict[int, tuple[str, int]] = {}  # distinct storages produced, by data pointer

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
                # Keep, per storage, the op that first produced it at its largest size (pointers get reused).
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.storages or self.storages[ptr][1] < t.numel():
                    self.storages[ptr] = (str(func), t.numel())
        return out


def test_no_op_output_is_as_large_as_the_logits_except_the_one_gradient_buffer() -> None:
    logits, labels = random_batch(2, 2, 64, 1.0, 0.3, 2.0)
    x = logits.clone().requires_grad_(True)
    full = x.numel()
    kernel = CoordLossKernel(TABLE, PRODUCTION_SETTINGS, chunk_bytes=4 * 4 * V)
    kernel(logits[:, :2], labels[:, :2])  # builds the cached tables (target table is [1000, 1000])
    with _AllocationLog() as fwd:
        res = kernel(x, labels, coord_metrics=True)
        lam = lambda_for_backward(res, res.num_noncoord, res.num_coord, 1)
    bound = max(4 * V, res.num_coord * NUM_BINS)
    assert bound < full / 2
    assert max(n for _, n in fwd.sizes) <= bound, "forward materialised more than a chunk / the coord columns"
    with _AllocationLog() as bwd:
        lam.backward()
    big = [f for f, n in bwd.storages.values() if n >= full]
    assert big == ["aten.zeros_like.default"], big  # the gradient buffer, written in place chunk by chunk
