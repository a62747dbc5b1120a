"""The normalisation rules' one owner (domain.normalisation, stage1.md R1-R7): window counts, the counts λ divides
by in each mode, R3 on floats and tensors alike, and R5 from sums (properties against the micro-batch form)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import InvariantViolation
from domain.normalisation import MicroBatchSums, StepCounts, eval_loss, eval_objective, micro_batch_lambda


@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_window_counts_split_supervised_targets_into_noncoord_and_coord(a: int, b: int) -> None:
    supervised, coord = max(a, b), min(a, b)
    counts = StepCounts.of_window(supervised=supervised, coord=coord)
    assert (counts.noncoord, counts.coord, counts.supervised) == (supervised - coord, coord, supervised)


def test_window_counts_refuse_more_coord_than_supervised_targets() -> None:
    with pytest.raises(InvariantViolation, match="3 coord targets of 2 supervised"):
        StepCounts.of_window(supervised=2, coord=3)
    with pytest.raises(InvariantViolation):
        StepCounts.of_window(supervised=2, coord=-1)


@given(st.integers(0, 1000), st.integers(0, 1000))
def test_backward_counts_are_n_and_c_or_t_and_zero(n: int, c: int) -> None:
    counts = StepCounts(noncoord=n, coord=c)
    assert counts.for_backward(True) == (n, c)
    assert counts.for_backward(False) == (n + c, 0)


def test_r3_is_one_expression_on_floats_and_tensors() -> None:
    torch = pytest.importorskip("torch")
    assert micro_batch_lambda(5.0, 16.0, 40, 8, 2) == pytest.approx(4.25)
    value = micro_batch_lambda(torch.tensor(5.0, requires_grad=True), torch.tensor(16.0), 40, 8, 2)
    assert float(value) == pytest.approx(4.25) and value.requires_grad  # the graph is kept for backward
    assert micro_batch_lambda(3.0, 0.0, 0, 0, 1) == 3.0  # max(1, 0): an empty count never divides by zero


sums = st.builds(
    MicroBatchSums,
    sum_ce=st.floats(0, 100),
    sum_coord=st.floats(0, 100),
    num_noncoord=st.integers(0, 50),
    num_coord=st.integers(0, 50),
    distributional=st.just(True),
)


@given(st.lists(sums, max_size=6))
def test_r5_from_added_sums_equals_the_eval_objective_of_the_micro_batches(batches: list[MicroBatchSums]) -> None:
    added = eval_loss(
        math.fsum(b.sum_ce for b in batches),
        math.fsum(b.sum_coord for b in batches),
        sum(b.ce_count for b in batches),
        sum(b.num_coord for b in batches),
    )
    assert added == pytest.approx(eval_objective(batches), rel=1e-12, abs=1e-12)
