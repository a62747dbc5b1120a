"""Stage-1 objective reference (stage1.md §1; acceptance tests 4-11, 13, 19, 21, 38, 39)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.coord_tokens import NUM_BINS, CoordIdTable
from domain.errors import ConfigError
from domain.losses import (
    BASE_STAGE1_SETTINGS,
    PRODUCTION_SETTINGS,
    CoordBlockSums,
    CoordLossSettings,
    coord_pair_terms,
    cross_entropy,
    gate_term,
    gaussian_target,
    log_softmax,
    micro_batch_reference,
    objective_metric_updates,
    sanitize_logits,
    sanitize_result,
    soft_ce,
    supervised_pairs,
    w1_distance,
)
from domain.metrics_registry import is_registered
from domain.normalisation import (
    MicroBatchSums,
    StepCounts,
    eval_objective,
    logged_step_loss,
    logging_window_loss,
    micro_batch_lambda,
    micro_batch_objective,
    step_counts,
    step_lambdas,
    step_objective,
)

K = np.arange(NUM_BINS)
V = 1100
# Non-contiguous coord ids in bin order: ids 60..1059 with a gap, shuffled blocks.
COORD_IDS = [*range(100, 600), *range(40, 90), *range(650, 1100)]
TABLE = CoordIdTable(COORD_IDS)
NONCOORD = [v for v in range(V) if v not in set(COORD_IDS)]


def row_with_coord_logits(u: np.ndarray, noncoord: float = -1e4) -> np.ndarray:
    z = np.full(V, noncoord, dtype=np.float64)
    z[np.asarray(COORD_IDS)] = u
    return z


# ----------------------------------------------------------------------------- targets (test 4)


@pytest.mark.parametrize(
    ("t", "sigma", "r", "expected", "nonzero", "mean"),
    [
        (500, 1.0, 8, {500: 0.398942, 501: 0.241971, 502: 0.053991, 503: 0.004432}, 17, 500.0),
        (0, 1.0, 8, {0: 0.570348, 1: 0.345934, 2: 0.077188}, 9, 0.520094),
        (500, 2.0, 16, {500: 0.199471, 501: 0.176033}, 33, 500.0),
    ],
)
def test_worked_target_rows(t: int, sigma: float, r: int, expected: dict[int, float], nonzero: int, mean: float) -> None:
    q = gaussian_target(t, sigma, r)
    for k, v in expected.items():
        assert q[k] == pytest.approx(v, abs=1e-6)
    assert int(np.count_nonzero(q)) == nonzero
    assert float(np.sum(K * q)) == pytest.approx(mean, abs=1e-6)


@given(
    t=st.integers(-5, 1004),
    sigma=st.floats(0.05, 300.0),
    r=st.one_of(st.none(), st.integers(0, 1200)),
)
@settings(max_examples=150, deadline=None)
def test_target_is_a_unimodal_distribution_peaked_at_t(t: int, sigma: float, r: int | None) -> None:
    q = gaussian_target(t, sigma, r)
    tc = min(max(t, 0), NUM_BINS - 1)
    assert q.shape == (NUM_BINS,)
    assert np.all(q >= 0)
    assert float(np.sum(q)) == pytest.approx(1.0, abs=1e-12)
    assert int(np.argmax(q)) == tc
    assert np.all(np.diff(q[: tc + 1]) >= 0), "non-decreasing up to t"
    assert np.all(np.diff(q[tc:]) <= 0), "non-increasing after t"
    if r is not None:
        assert np.all(q[np.abs(K - tc) > r] == 0)


def test_radius_zero_is_one_hot_and_edges_are_cut_not_mirrored() -> None:
    q = gaussian_target(7, 2.0, 0)
    assert q[7] == 1.0 and np.count_nonzero(q) == 1
    edge = gaussian_target(999, 1.0, 8)
    assert np.count_nonzero(edge) == 9
    assert float(np.sum(K * edge)) == pytest.approx(999 - 0.520094, abs=1e-6)


# ----------------------------------------------------------------------------- elementary terms (tests 5, 6)


def test_w1_worked_numbers_and_identity() -> None:
    a = np.zeros(NUM_BINS)
    a[10] = 1.0
    b = np.zeros(NUM_BINS)
    b[12] = 1.0
    assert w1_distance(a, b) == pytest.approx(0.002002, abs=1e-6)
    assert w1_distance(a, b) == pytest.approx(2 / 999, abs=1e-15)


@st.composite
def distributions(draw: st.DrawFn) -> np.ndarray:
    """A probability vector over the bins: random weights (seeded), some bins zeroed, spiky or flat."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 50.0]))
    w = np.exp(rng.normal(0, scale, NUM_BINS))
    w[rng.random(NUM_BINS) < draw(st.floats(0.0, 0.99))] = 0.0
    w[draw(st.integers(0, NUM_BINS - 1))] += 1.0
    return w / np.sum(w)


@given(distributions())
@settings(max_examples=60, deadline=None)
def test_w1_of_identical_distributions_is_exactly_zero(p: np.ndarray) -> None:
    assert w1_distance(p, p.copy()) == 0.0


@given(st.integers(0, 999), st.integers(0, 999))
@settings(max_examples=100, deadline=None)
def test_w1_of_shifted_deltas_is_distance_over_999(i: int, j: int) -> None:
    a = np.zeros(NUM_BINS)
    a[i] = 1.0
    b = np.zeros(NUM_BINS)
    b[j] = 1.0
    assert w1_distance(a, b) == pytest.approx(abs(i - j) / 999, abs=1e-12)


def test_soft_ce_of_uniform_against_one_hot_is_ln_1000() -> None:
    log_p = np.full(NUM_BINS, -math.log(NUM_BINS))
    q = gaussian_target(123, 1.0, 0)
    assert soft_ce(log_p, q) == pytest.approx(6.907755, abs=1e-6)


@given(distributions(), st.integers(0, 999), st.floats(0.3, 20.0), st.one_of(st.none(), st.integers(0, 40)))
@settings(max_examples=60, deadline=None)
def test_soft_ce_is_at_least_the_target_entropy(p: np.ndarray, t: int, sigma: float, r: int | None) -> None:
    q = gaussian_target(t, sigma, r)
    log_p = log_softmax(np.log(np.maximum(p, 1e-300)))
    entropy = -float(np.sum(q[q > 0] * np.log(q[q > 0])))
    assert soft_ce(log_p, q) >= entropy - 1e-9


@given(st.integers(0, 999), st.floats(0.2, 3.0))
@settings(max_examples=30, deadline=None)
def test_radius_zero_soft_ce_is_minus_log_p_at_t_with_temperature(t: int, tau: float) -> None:
    rng = np.random.default_rng(t)
    u = rng.normal(0, 3, NUM_BINS)
    cfg = CoordLossSettings(enabled=True, temperature=tau, target_truncate=0)
    terms = coord_pair_terms(row_with_coord_logits(u), TABLE, t, cfg)
    assert terms.soft_ce == pytest.approx(-log_softmax(u / tau)[t], rel=1e-10)


def test_sanitize_maps_non_finite_values() -> None:
    out = sanitize_logits([math.nan, math.inf, -math.inf, 3e4, -3e4, 1.5])
    assert out.tolist() == [0.0, 1e4, -1e4, 1e4, -1e4, 1.5]
    assert sanitize_result(math.nan) == 0.0
    assert sanitize_result(math.inf) == 1e4
    assert sanitize_result(2.5) == 2.5


# ----------------------------------------------------------------------------- the worked pair (test 7)


def test_full_worked_pair_of_section_1_3() -> None:
    u = 0.9 * (-((K - 502.0) ** 2) / 2)
    z = row_with_coord_logits(u)
    z[NONCOORD[0]] = 0.0
    t = coord_pair_terms(z, TABLE, 500, PRODUCTION_SETTINGS)
    assert t.p_gt == pytest.approx(0.053991, abs=1e-5)
    assert t.soft_ce == pytest.approx(3.418938, abs=1e-5)
    assert t.w1 == pytest.approx(0.002002, abs=1e-5)
    assert t.gate == pytest.approx(0.335716, abs=1e-5)
    assert t.mass == pytest.approx(0.714826, abs=1e-5)
    assert t.ce == pytest.approx(2.771619, abs=1e-5)
    assert t.loss == pytest.approx(10.594532, abs=1e-5)
    assert t.expected_bin == pytest.approx(502.0, abs=1e-5)
    assert t.abs_err == pytest.approx(2.0, abs=1e-5)
    assert t.w1_to_delta == pytest.approx(2.0094, abs=1e-4)
    assert t.margin == pytest.approx(2.0, abs=1e-5)
    # p(502) from the same distribution: a discrete unit Gaussian peak.
    p = np.exp(log_softmax(u / 0.9))
    assert p[502] == pytest.approx(0.398942, abs=1e-5)
    # softCE = H(q) + KL: H(q) of the σ=1, R=8 target is 1.418938.
    q = gaussian_target(500, 1.0, 8)
    assert -float(np.sum(q[q > 0] * np.log(q[q > 0]))) == pytest.approx(1.418938, abs=1e-5)
    assert t.top5_hit


def test_gate_term_matches_pair_gate() -> None:
    u = np.linspace(-3, 3, NUM_BINS)
    z = row_with_coord_logits(u, noncoord=1.0)
    assert gate_term(z, COORD_IDS, 0.7) == pytest.approx(
        coord_pair_terms(z, TABLE, 3, CoordLossSettings(enabled=True, temperature=0.7)).gate, rel=1e-12
    )


# ----------------------------------------------------------------------------- tests 8-11


def _sharp_row(t: int) -> np.ndarray:
    u = np.zeros(NUM_BINS)
    u[t] = 30.0
    return row_with_coord_logits(u)


def test_confident_correct_pair_costs_almost_nothing() -> None:
    cfg = CoordLossSettings(enabled=True, target_truncate=0, temperature=1.0)
    assert coord_pair_terms(_sharp_row(321), TABLE, 321, cfg).loss < 1e-3


def test_mass_leaking_to_a_text_token_is_charged_by_the_gate() -> None:
    cfg = CoordLossSettings(enabled=True, target_truncate=0, temperature=1.0)
    base = coord_pair_terms(_sharp_row(321), TABLE, 321, cfg)
    z = _sharp_row(321)
    z[NONCOORD[3]] = 40.0
    leaked = coord_pair_terms(z, TABLE, 321, cfg)
    assert leaked.loss - base.loss > 1.0
    assert leaked.gate - base.gate > 1.0


@st.composite
def hostile_rows(draw: st.DrawFn) -> np.ndarray:
    """Full rows with NaN / ±inf / huge values sprinkled in (seeded), including the target's column."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    row = rng.normal(0, draw(st.sampled_from([1.0, 1e3, 1e6, 1e300])), V)
    specials = np.array([math.nan, math.inf, -math.inf, 1e38, -1e38])
    hit = rng.random(V) < draw(st.floats(0.0, 1.0))
    row[hit] = rng.choice(specials, int(hit.sum()))
    return row


@given(hostile_rows(), st.integers(0, 999))
@settings(max_examples=40, deadline=None)
def test_non_finite_rows_give_finite_terms(row: np.ndarray, t: int) -> None:
    terms = coord_pair_terms(row, TABLE, t, PRODUCTION_SETTINGS)
    for name in ("soft_ce", "w1", "gate", "mass", "ce", "loss", "expected_bin", "margin", "p_gt"):
        assert math.isfinite(getattr(terms, name)), name


def test_temperature_changes_soft_ce_but_not_hard_ce() -> None:
    rng = np.random.default_rng(3)
    z = row_with_coord_logits(rng.normal(0, 2, NUM_BINS), noncoord=-2.0)
    a = coord_pair_terms(z, TABLE, 40, CoordLossSettings(enabled=True, ce_weight=1.0, temperature=1.0))
    b = coord_pair_terms(z, TABLE, 40, CoordLossSettings(enabled=True, ce_weight=1.0, temperature=0.5))
    assert a.soft_ce != pytest.approx(b.soft_ce, rel=1e-3)
    assert a.ce == b.ce


# ----------------------------------------------------------------------------- normalisation (tests 13, 19, 21)


MB1 = MicroBatchSums(sum_ce=5.0, sum_coord=16.0, num_noncoord=10, num_coord=8)
MB2 = MicroBatchSums(sum_ce=9.0, sum_coord=0.0, num_noncoord=30, num_coord=0)


def test_worked_normalisation_example_one_rank() -> None:
    counts = step_counts([MB1, MB2])
    assert counts == StepCounts(noncoord=40, coord=8)
    l1 = micro_batch_lambda(5.0, 16.0, 40, 8, 1)
    l2 = micro_batch_lambda(9.0, 0.0, 40, 8, 1)
    assert (l1, l2) == (pytest.approx(2.125), pytest.approx(0.225))
    assert step_lambdas([[MB1, MB2]]) == [[pytest.approx(2.125), pytest.approx(0.225)]]
    assert step_objective([MB1, MB2]) == pytest.approx(2.35)
    assert logged_step_loss([[l1, l2]]) == pytest.approx(2.35)
    # The common mistake (mean of per-micro-batch objectives) gives 1.4, which is NOT the objective.
    wrong = (micro_batch_objective(MB1) + micro_batch_objective(MB2)) / 2
    assert wrong == pytest.approx(1.4)


def test_worked_normalisation_example_two_ranks() -> None:
    lambdas = step_lambdas([[MB1], [MB2]])
    assert lambdas == [[pytest.approx(4.25)], [pytest.approx(0.45)]]
    assert (lambdas[0][0] + lambdas[1][0]) / 2 == pytest.approx(2.35)
    assert logged_step_loss(lambdas) == pytest.approx(2.35)


def test_empty_counts_give_zero_never_nan() -> None:
    only_coord = MicroBatchSums(sum_ce=0.0, sum_coord=6.0, num_noncoord=0, num_coord=3)
    assert step_objective([only_coord]) == pytest.approx(2.0)
    empty = MicroBatchSums(sum_ce=0.0, sum_coord=0.0, num_noncoord=0, num_coord=0)
    assert step_objective([empty]) == 0.0
    assert micro_batch_lambda(0.0, 0.0, 0, 0, 4) == 0.0
    assert step_objective([]) == 0.0


def test_pure_ce_step_objective_is_mean_over_all_supervised_pairs() -> None:
    a = MicroBatchSums(sum_ce=6.0, sum_coord=0.0, num_noncoord=3, num_coord=2, distributional=False)
    b = MicroBatchSums(sum_ce=4.0, sum_coord=0.0, num_noncoord=5, num_coord=0, distributional=False)
    assert step_objective([a, b]) == pytest.approx(10.0 / 10)
    lambdas = step_lambdas([[a], [b]])
    assert lambdas == [[pytest.approx(2 * 6.0 / 10)], [pytest.approx(2 * 4.0 / 10)]]
    assert micro_batch_objective(a) == pytest.approx(6.0 / 5)


@st.composite
def split_pairs(draw: st.DrawFn) -> tuple[list[tuple[bool, float]], list[int], list[int]]:
    pairs = draw(st.lists(st.tuples(st.booleans(), st.floats(0.0, 20.0)), min_size=0, max_size=40))
    mb_of = [draw(st.integers(0, 5)) for _ in pairs]
    rank_of_mb = [draw(st.integers(0, 2)) for _ in range(6)]
    return pairs, mb_of, rank_of_mb


@given(split_pairs(), st.booleans())
@settings(max_examples=150, deadline=None)
def test_objective_does_not_depend_on_the_split(
    drawn: tuple[list[tuple[bool, float]], list[int], list[int]], distributional: bool
) -> None:
    """R1/R2/R4: any split of the same pairs into micro-batches and ranks gives the same L_step."""
    pairs, mb_of, rank_of_mb = drawn
    n = [x for c, x in pairs if not c]
    c = [x for is_c, x in pairs if is_c]
    if distributional:
        expected = math.fsum(n) / max(1, len(n)) + math.fsum(c) / max(1, len(c))
    else:
        expected = math.fsum(x for _, x in pairs) / max(1, len(pairs))
    world = 3
    windows: list[list[MicroBatchSums]] = [[] for _ in range(world)]
    for m in range(6):
        members = [pairs[j] for j in range(len(pairs)) if mb_of[j] == m]
        ce = [x for is_c, x in members if not is_c or not distributional]
        co = [x for is_c, x in members if is_c and distributional]
        windows[rank_of_mb[m]].append(
            MicroBatchSums(
                sum_ce=math.fsum(ce),
                sum_coord=math.fsum(co),
                num_noncoord=sum(1 for is_c, _ in members if not is_c),
                num_coord=sum(1 for is_c, _ in members if is_c),
                distributional=distributional,
            )
        )
    flat = [mb for w in windows for mb in w]
    assert step_objective(flat) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert logged_step_loss(step_lambdas(windows)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert eval_objective(flat) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_logging_window_is_the_mean_of_step_values() -> None:
    assert logging_window_loss([2.35, 1.65]) == pytest.approx(2.0)
    assert logging_window_loss([]) is None


def test_world_size_must_be_positive() -> None:
    from domain.errors import InvariantViolation

    with pytest.raises(InvariantViolation):
        micro_batch_lambda(1.0, 1.0, 1, 1, 0)


# ----------------------------------------------------------------------------- pairs and the micro-batch reference


def test_pairs_use_the_shifted_labels_and_find_coord_pairs_by_id() -> None:
    labels = np.array([[-100, 7, COORD_IDS[5], -100], [-100, -100, COORD_IDS[999], 3]])
    pairs = supervised_pairs(labels, TABLE, V)
    assert pairs.batch_index.tolist() == [0, 0, 1, 1]
    assert pairs.position.tolist() == [0, 1, 1, 2]
    assert pairs.is_coord.tolist() == [False, True, True, False]
    assert pairs.bin.tolist() == [-1, 5, 999, -1]
    assert (pairs.num_supervised, pairs.num_coord, pairs.num_noncoord) == (4, 2, 2)


def test_token_acc_counts_coord_pairs_by_full_vocab_argmax() -> None:
    """Test 38: token_acc over T, coord pairs included, argmax over the full vocabulary."""
    z = np.full((1, 4, V), -5.0)
    labels = np.array([[-100, NONCOORD[1], COORD_IDS[10], COORD_IDS[20]]])
    z[0, 0, NONCOORD[1]] = 5.0  # correct text pair
    z[0, 1, COORD_IDS[10]] = 5.0  # correct coord pair
    z[0, 2, NONCOORD[2]] = 5.0  # coord pair whose argmax is a text token
    sums, block, _ = micro_batch_reference(z, labels, TABLE, PRODUCTION_SETTINGS)
    assert sums.num_correct == 2 and sums.num_supervised == 3
    assert block.count == 2
    assert sums.sum_ce == pytest.approx(cross_entropy(z[0, 0], NONCOORD[1]))


# ----------------------------------------------------------------------------- settings


def test_settings_defaults_and_named_settings_of_section_8_1() -> None:
    d = CoordLossSettings()
    assert (d.enabled, d.ce_weight, d.soft_ce_weight, d.w1_weight, d.gate_weight) == (False, 0.0, 1.0, 1.0, 1.0)
    assert (d.temperature, d.target_sigma, d.target_truncate) == (1.0, 2.0, None)
    assert BASE_STAGE1_SETTINGS.target_truncate == 16 and BASE_STAGE1_SETTINGS.enabled
    p = PRODUCTION_SETTINGS
    assert (p.soft_ce_weight, p.temperature, p.target_sigma, p.target_truncate) == (3.0, 0.9, 1.0, 8)


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"temperature": 0.0}, "objective.coord_soft_ce_w1.temperature"),
        ({"target_sigma": -1.0}, "objective.coord_soft_ce_w1.target_sigma"),
        ({"w1_weight": -0.5}, "objective.coord_soft_ce_w1.w1_weight"),
        ({"gate_weight": math.nan}, "objective.coord_soft_ce_w1.gate_weight"),
        ({"target_truncate": -1}, "objective.coord_soft_ce_w1.target_truncate"),
        ({"target_truncate": 2.5}, "objective.coord_soft_ce_w1.target_truncate"),
        (
            {"enabled": True, "ce_weight": 0.0, "soft_ce_weight": 0.0, "w1_weight": 0.0, "gate_weight": 0.0},
            "all four weights 0",
        ),
    ],
)
def test_settings_rules_name_the_dotted_key(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        CoordLossSettings(**kwargs)  # type: ignore[arg-type]


def test_all_zero_weights_are_fine_when_disabled() -> None:
    """The all-zero rule applies to an enabled block only: disabled, the same weights are kept as given."""
    zeros = {"ce_weight": 0.0, "soft_ce_weight": 0.0, "w1_weight": 0.0, "gate_weight": 0.0}
    off = CoordLossSettings(enabled=False, **zeros)
    assert off.problems() == [] and off.weights == (0.0, 0.0, 0.0, 0.0) and not off.enabled
    with pytest.raises(ConfigError, match="all four weights 0"):
        CoordLossSettings(enabled=True, **zeros)


# ----------------------------------------------------------------------------- metric updates (tests 20, 39)


def _block(count: int) -> CoordBlockSums:
    return CoordBlockSums(
        count=count, loss=12.0, soft_ce=3.0, w1=0.01, ce=2.0, gate=0.5, mass=2.5, top5_hits=2.0,
        p_gt=0.4, margin=3.0, abs_err=6.0, w1_to_delta=7.0, abs_err_p90=2.5,
    )


def test_total_loss_estimate_is_base_plus_coord_per_sample() -> None:
    mb = MicroBatchSums(sum_ce=9.0, sum_coord=12.0, num_noncoord=30, num_coord=4, num_correct=20)
    ups = {u.key: u for u in objective_metric_updates(mb, _block(4), PRODUCTION_SETTINGS, num_samples=3)}
    assert ups["stage1/total_loss_per_sample_est"].value == pytest.approx(
        ups["base_ce/loss_per_sample"].value + ups["coord_diag/loss_per_sample"].value
    )
    assert ups["token_acc"].value == pytest.approx(20 / 34) and ups["token_acc"].weight == 34
    assert ups["coord_diag/soft_ce"].value == pytest.approx(3.0 * 3.0 / 4)  # weighted by soft_ce_weight 3
    assert ups["coord_diag/ce"].value == 0.0  # ce_weight 0
    assert ups["coord_diag/loss"].weight == 4
    assert ups["base_ce/loss"].value == pytest.approx(9.0 / 30) and ups["base_ce/loss"].weight == 30
    assert ups["coord_diag/enabled"].value == 1.0
    assert all(is_registered(k) for k in ups)


def test_each_coord_part_is_weighted_by_its_own_weight() -> None:
    """``coord_diag/{ce,soft_ce,w1,gate}`` are weighted contributions, each with its own weight (four distinct
    weights, none 1, so a dropped or swapped weight changes a value); ``coord_diag/loss`` is the block's loss."""
    weights = CoordLossSettings(enabled=True, ce_weight=2.0, soft_ce_weight=3.0, w1_weight=5.0, gate_weight=7.0)
    mb = MicroBatchSums(sum_ce=9.0, sum_coord=12.0, num_noncoord=30, num_coord=4, num_correct=20)
    ups = {u.key: u for u in objective_metric_updates(mb, _block(4), weights, num_samples=3)}
    # _block(4): soft_ce 3.0, w1 0.01, ce 2.0, gate 0.5, loss 12.0, over 4 coord pairs
    expected = {"ce": 2.0 * 2.0 / 4, "soft_ce": 3.0 * 3.0 / 4, "w1": 5.0 * 0.01 / 4, "gate": 7.0 * 0.5 / 4}
    for part, value in expected.items():
        update = ups[f"coord_diag/{part}"]
        assert (update.value, update.weight) == (pytest.approx(value, rel=1e-12), 4.0), part
    assert ups["coord_diag/loss"].value == pytest.approx(12.0 / 4, rel=1e-12)


def test_no_coord_pairs_emit_only_the_enabled_flag_of_the_coord_block() -> None:
    mb = MicroBatchSums(sum_ce=9.0, sum_coord=0.0, num_noncoord=30, num_coord=0)
    keys = {u.key for u in objective_metric_updates(mb, CoordBlockSums(), PRODUCTION_SETTINGS, num_samples=1)}
    assert {k for k in keys if k.startswith("coord_diag/")} == {"coord_diag/enabled"}
    assert "stage1/total_loss_per_sample_est" not in keys
    assert "base_ce/loss" in keys


def test_pure_ce_diagnostics_have_no_base_ce_and_enabled_zero() -> None:
    cfg = CoordLossSettings(enabled=False)
    mb = MicroBatchSums(sum_ce=9.0, sum_coord=0.0, num_noncoord=30, num_coord=4, distributional=False)
    ups = {u.key: u for u in objective_metric_updates(mb, _block(4), cfg, num_samples=2)}
    assert ups["coord_diag/enabled"].value == 0.0
    assert not any(k.startswith("base_ce/") for k in ups)
    assert "stage1/total_loss_per_sample_est" not in ups
    assert "coord_diag/loss" in ups
    none = {u.key for u in objective_metric_updates(mb, None, cfg, num_samples=2)}
    assert none == {"pack/num_samples", "token_acc"}
