"""AB scheduler (stage2.md §14; §22 acceptance tests 50, 51) and the realised-ratio tracker (§18.1)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.ab_schedule import (
    B_RATIO_KEY,
    ABSchedule,
    RealizedBRatio,
    b_ratio_fraction,
    b_steps_before,
    is_b_step,
)
from domain.errors import ConfigError, InvariantViolation

RATIOS = st.decimals(min_value=0, max_value=1, places=4).map(float)


def _pattern(b_ratio: float, steps: int) -> str:
    return "".join("B" if is_b_step(s, b_ratio) else "A" for s in range(steps))


# ----------------------------------------------------------------------------- §22 item 50


def test_half_alternates_a_then_b() -> None:
    assert _pattern(0.5, 8) == "ABABABAB"


def test_five_percent_over_twenty_steps_is_one_b_at_the_last_step() -> None:
    assert [s for s in range(20) if is_b_step(s, 0.05)] == [19]


def test_point_29_over_100_steps_is_exactly_29_b_the_last_at_99() -> None:
    b_steps = [s for s in range(100) if is_b_step(s, 0.29)]
    assert len(b_steps) == 29
    assert b_steps[-1] == 99
    # the float arithmetic §14 warns against gives 28
    assert sum(math.floor((s + 1) * 0.29) > math.floor(s * 0.29) for s in range(100)) == 28


def test_zero_is_always_a_and_one_is_always_b() -> None:
    assert _pattern(0.0, 50) == "A" * 50
    assert _pattern(1.0, 50) == "B" * 50
    assert _pattern(0, 5) == "AAAAA" and _pattern(1, 5) == "BBBBB"


def test_schedule_object_names_channels() -> None:
    schedule = ABSchedule(0.5)
    assert schedule.b_ratio == Fraction(1, 2)
    assert [schedule.channel(s) for s in range(4)] == ["A", "B", "A", "B"]


# ----------------------------------------------------------------------------- validation (§21)


@pytest.mark.parametrize("bad", [-0.01, 1.5, 2, -1])
def test_b_ratio_outside_unit_interval_is_a_located_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match=r"stage2_ab\.schedule\.b_ratio: must be in \[0, 1\]"):
        is_b_step(0, bad)
    with pytest.raises(ConfigError, match=B_RATIO_KEY.replace(".", r"\.")):
        ABSchedule(bad)


def test_missing_b_ratio_is_a_located_config_error() -> None:
    with pytest.raises(ConfigError, match=r"stage2_ab\.schedule\.b_ratio: required"):
        b_ratio_fraction(None)


@pytest.mark.parametrize("bad", ["0.5", True, float("nan"), float("inf"), [0.5]])
def test_b_ratio_that_is_not_a_finite_number_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"stage2_ab\.schedule\.b_ratio: must be a number"):
        b_ratio_fraction(bad)


def test_negative_step_is_an_invariant_violation() -> None:
    with pytest.raises(InvariantViolation):
        is_b_step(-1, 0.5)


def test_b_ratio_is_read_as_its_decimal_spelling() -> None:
    assert b_ratio_fraction(0.29) == Fraction(29, 100)
    assert b_ratio_fraction(0.1 + 0.2) == Fraction("0.30000000000000004")


# ----------------------------------------------------------------------------- properties


@given(RATIOS, st.integers(0, 5000))
def test_b_count_before_any_step_is_floor_of_step_times_ratio(b_ratio: float, step: int) -> None:
    r = Fraction(str(b_ratio))
    assert b_steps_before(step, b_ratio) == math.floor(step * r)
    assert b_steps_before(step + 1, b_ratio) - b_steps_before(step, b_ratio) == int(is_b_step(step, b_ratio))


@given(RATIOS, st.integers(0, 3000), st.integers(1, 400))
def test_any_window_of_steps_holds_ratio_times_length_b_steps_rounded(
    b_ratio: float, start: int, n: int
) -> None:
    count = sum(is_b_step(s, b_ratio) for s in range(start, start + n))
    exact = n * Fraction(str(b_ratio))
    assert math.floor(exact) <= count <= math.ceil(exact)


@given(st.integers(1, 200), st.integers(1, 200))
def test_every_denominator_period_holds_exactly_numerator_b_steps(p: int, q: int) -> None:
    if p > q:
        p, q = q, p
    r = Fraction(p, q)
    assert sum(is_b_step(s, r) for s in range(q)) == r.numerator * (q // r.denominator)


@given(RATIOS, st.integers(0, 10_000))
def test_schedule_is_a_pure_function_of_the_step(b_ratio: float, step: int) -> None:
    assert is_b_step(step, b_ratio) == ABSchedule(b_ratio).is_b_step(step) == is_b_step(step, b_ratio)


# ----------------------------------------------------------------------------- realised ratio (§22 item 51)


def test_realised_ratio_counts_each_step_once() -> None:
    tracker = RealizedBRatio()
    assert tracker.value == 0.0  # empty
    assert tracker.record(0, False) is True
    assert tracker.record(0, True) is False  # repeat of step 0: ignored
    assert tracker.record(1, True) is True
    assert tracker.value == 0.5
    assert tracker.counted_steps == 2 and tracker.last_step == 1


def test_realised_ratio_window_keeps_the_last_200_steps() -> None:
    tracker = RealizedBRatio()
    for s in range(200):
        tracker.record(s, True)
    for s in range(200, 300):
        tracker.record(s, False)
    assert tracker.counted_steps == 200
    assert tracker.value == 0.5


def test_realised_ratio_refuses_a_step_going_backwards() -> None:
    tracker = RealizedBRatio()
    tracker.record(5, True)
    with pytest.raises(InvariantViolation, match="backwards"):
        tracker.record(4, True)


def test_window_must_be_positive() -> None:
    with pytest.raises(InvariantViolation):
        RealizedBRatio(0)


@given(RATIOS, st.integers(0, 600), st.integers(1, 60))
def test_resumed_tracker_equals_an_uninterrupted_run(b_ratio: float, restored: int, more: int) -> None:
    schedule = ABSchedule(b_ratio)
    straight = RealizedBRatio()
    for s in range(restored + more):
        for _ in range(2):  # micro-steps call again for the same step
            straight.record(s, schedule.is_b_step(s))
    resumed = RealizedBRatio.resumed(schedule, restored)
    for s in range(restored, restored + more):
        resumed.record(s, schedule.is_b_step(s))
    assert resumed.value == straight.value
    assert resumed.counted_steps == straight.counted_steps == min(200, restored + more)


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=80), st.integers(1, 10))
def test_realised_ratio_is_the_mean_of_first_calls_in_the_window(
    calls: list[tuple[int, bool]], window: int
) -> None:
    tracker = RealizedBRatio(window)
    step = 0
    first: dict[int, bool] = {}
    for delta, executed in calls:
        step += delta
        first.setdefault(step, executed)
        tracker.record(step, executed)
    kept = [first[s] for s in sorted(first)][-window:]
    assert tracker.value == (sum(kept) / len(kept) if kept else 0.0)
