"""Post-rollout packing (stage2.md §12; §22 acceptance tests 39-43): carry selection, the carry buffer,
window LPT scheduling, adaptive raw stacking and the packed-row layout."""

from __future__ import annotations

import itertools
import math

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import InvariantViolation, StepError
from domain.metrics_registry import is_registered
from domain.packing import PackingSettings, cu_seq_lens
from domain.post_rollout_packing import (
    BUFFER_KEY,
    FILL_KEY,
    SEGMENTS_KEY,
    SELECTED_TOTAL_KEY,
    CarryBuffer,
    PackLayout,
    WindowScheduleInfeasible,
    adaptive_raw_count,
    fifo_greedy,
    first_fit_decreasing,
    pack_fill,
    pack_gauges,
    schedule_window,
    select_carry_pack,
)
from domain.stage2_targets import SampleRef


@attrs.frozen
class Seg:
    encoded_len: int
    sample: SampleRef


def seg(n: int, i: int = 0) -> Seg:
    return Seg(n, SampleRef("train.jsonl", i + 1, i))


def buffer(capacity: int = 10, bound: int = 512) -> CarryBuffer[Seg]:
    return CarryBuffer(PackingSettings(max_length=capacity, packing_buffer=bound))


@st.composite
def buffers(draw: st.DrawFn) -> tuple[list[int], int]:
    capacity = draw(st.integers(1, 30))
    lengths = draw(st.lists(st.integers(1, capacity), min_size=0, max_size=10))
    return lengths, capacity


def total(lengths: list[int], idx: tuple[int, ...]) -> int:
    return sum(lengths[i] for i in idx)


# ----------------------------------------------------------------------------- selection (item 3; test 40)


def test_spec_example_6_3_2_2_2() -> None:
    assert select_carry_pack([6, 3, 2, 2, 2], 10) == (0, 2, 3)


def test_spec_example_6_3_2_2_fills_10_where_fifo_fills_9() -> None:
    assert fifo_greedy([6, 3, 2, 2], 10) == (0, 1)
    assert select_carry_pack([6, 3, 2, 2], 10) == (0, 2, 3)


def test_candidate_used_only_when_strictly_larger() -> None:
    # FIFO: (0, 1) = 10 already full; FFD's best bin (2, 3) also totals 10 -> keep the baseline
    assert select_carry_pack([6, 4, 2, 2], 10) == (0, 1)
    # equal totals but the candidate has fewer segments: still the baseline (not strictly larger)
    assert select_carry_pack([5, 1, 1, 3, 5], 10) == (0, 1, 2, 3)


def test_candidate_ties_prefer_fewer_segments_then_smallest_indices() -> None:
    # FIFO (0, 1) = 9; residual 5, FFD bins {4}=5, {1}=4, {2, 3}=5: max total, then fewer segments -> {4}
    lengths = [5, 4, 3, 2, 5]
    assert select_carry_pack(lengths, 10) == (0, 4)
    # FIFO (0, 1) = 9; bins {2}=5, {3}=5, {1}=4: equal total and size -> smallest indices {2}
    lengths = [5, 4, 5, 5]
    assert select_carry_pack(lengths, 10) == (0, 2)


def test_empty_buffer_selects_nothing_and_full_pin_selects_only_it() -> None:
    assert select_carry_pack([], 10) == ()
    assert select_carry_pack([10, 1, 1], 10) == (0,)


@given(buffers())
def test_selection_fits_keeps_the_oldest_is_sorted_and_beats_fifo(case: tuple[list[int], int]) -> None:
    lengths, capacity = case
    chosen = select_carry_pack(lengths, capacity)
    if not lengths:
        assert chosen == ()
        return
    assert chosen[0] == 0
    assert list(chosen) == sorted(set(chosen))
    assert total(lengths, chosen) <= capacity
    assert total(lengths, chosen) >= total(lengths, fifo_greedy(lengths, capacity))


@given(buffers())
def test_candidate_is_the_best_ffd_bin_when_it_is_used(case: tuple[list[int], int]) -> None:
    lengths, capacity = case
    if not lengths:
        return
    chosen = select_carry_pack(lengths, capacity)
    baseline = fifo_greedy(lengths, capacity)
    bins = first_fit_decreasing(lengths, range(1, len(lengths)), capacity - lengths[0])
    best = max((total(lengths, tuple(b)) for b in bins), default=0)
    if chosen != baseline:
        assert total(lengths, chosen) == lengths[0] + best > total(lengths, baseline)
    else:
        assert lengths[0] + best <= total(lengths, baseline)


@given(buffers())
def test_ffd_bins_partition_the_fitting_positions(case: tuple[list[int], int]) -> None:
    lengths, capacity = case
    bins = first_fit_decreasing(lengths, range(len(lengths)), capacity)
    placed = sorted(p for b in bins for p in b)
    assert placed == list(range(len(lengths)))
    assert all(total(lengths, tuple(b)) <= capacity for b in bins)


# ----------------------------------------------------------------------------- carry buffer (item 2; test 41)


def test_oversize_insertion_names_encoded_len_packing_length_and_mitigations() -> None:
    buf = buffer(10)
    buf.push([seg(4, 0)])
    with pytest.raises(StepError) as err:
        buf.push([seg(3, 1), seg(11, 2)])
    message = str(err.value)
    assert "encoded_len=11" in message and "packing_length=10" in message and "Mitigations:" in message
    assert "sample_id=2 (train.jsonl:3)" in message
    assert buf.lengths == (4,)  # nothing of the refused push was inserted


def test_equal_to_capacity_is_accepted() -> None:
    buf = buffer(10)
    buf.push([seg(10)])
    assert buf.pop_pack() == (seg(10),)


def test_overflow_leaves_the_buffer_unchanged() -> None:
    buf = buffer(10, bound=3)
    first = [seg(2, 0), seg(3, 1)]
    buf.push(first)
    with pytest.raises(StepError, match=r"training\.packing_buffer=3") as err:
        buf.push([seg(1, 2), seg(1, 3)])
    assert "Mitigations:" in str(err.value)
    assert list(buf) == first and buf.inserted_total == 2
    buf.push([seg(1, 2)])  # exactly at the bound is fine
    assert len(buf) == 3


def test_buffer_pops_spec_example_in_insertion_order() -> None:
    buf = buffer(10)
    segments = [seg(n, i) for i, n in enumerate([6, 3, 2, 2, 2])]
    buf.push(segments)
    assert buf.next_pack() == (0, 2, 3)
    assert buf.pop_pack() == (segments[0], segments[2], segments[3])
    assert list(buf) == [segments[1], segments[4]]
    assert buf.pop_pack() == (segments[1], segments[4])
    assert buf.pop_pack() == () and len(buf) == 0


@given(buffers(), st.integers(1, 4))
def test_draining_the_buffer_loses_and_duplicates_nothing(case: tuple[list[int], int], chunks: int) -> None:
    lengths, capacity = case
    buf = buffer(capacity)
    segments = [seg(n, i) for i, n in enumerate(lengths)]
    size = max(1, math.ceil(len(segments) / chunks))
    for start in range(0, len(segments), size):
        buf.push(segments[start : start + size])
    seen: list[Seg] = []
    while len(buf):
        pack = buf.pop_pack()
        assert pack and sum(s.encoded_len for s in pack) <= capacity
        ids = [s.sample.sample_id for s in pack]
        assert ids == sorted(ids)  # insertion order within a pack
        assert pack[0].sample.sample_id == min(s.sample.sample_id for s in [*pack, *buf])  # oldest pinned
        seen.extend(pack)
    assert sorted(s.sample.sample_id for s in seen) == list(range(len(lengths)))


# ----------------------------------------------------------------------------- window scope (item 5; test 42)


def test_window_9_9_9_capacity_10_gas_2_is_infeasible() -> None:
    with pytest.raises(WindowScheduleInfeasible, match="infeasible"):
        schedule_window([9, 9, 9], 10, 2)


def test_window_needs_at_least_gas_segments() -> None:
    with pytest.raises(WindowScheduleInfeasible, match="fewer segments than gas"):
        schedule_window([1, 1], 10, 3)


def test_window_lpt_failure_after_the_sum_check_raises() -> None:
    # Σ = 20 = gas·L, but no pack can take a fifth 4
    with pytest.raises(WindowScheduleInfeasible, match="fits no pack"):
        schedule_window([4, 4, 4, 4, 4], 10, 2)


def test_window_infeasible_is_a_step_error() -> None:
    assert issubclass(WindowScheduleInfeasible, StepError)


def test_window_lpt_example() -> None:
    # seeds 7 (idx 1) and 6 (idx 3); 3 (idx 0) -> least-filled pack 1 (9); 2 (idx 2) -> pack 0 (9);
    # 1 (idx 4): fills tie at 9 -> the lower pack 0
    assert schedule_window([3, 7, 2, 6, 1], 10, 2) == ((1, 2, 4), (0, 3))


def test_window_is_deterministic() -> None:
    lengths = [5, 3, 5, 2, 2, 3, 1, 4]
    assert schedule_window(lengths, 10, 3) == schedule_window(list(lengths), 10, 3)


@given(st.integers(1, 20), st.integers(1, 5), st.data())
def test_window_places_every_segment_exactly_once_or_raises(
    capacity: int, gas: int, data: st.DataObject
) -> None:
    lengths = data.draw(st.lists(st.integers(1, capacity + 2), max_size=12))
    try:
        packs = schedule_window(lengths, capacity, gas)
    except WindowScheduleInfeasible:
        # a raise is allowed only when some requirement fails or LPT got stuck; never on the trivially feasible
        # case of at most one segment per pack
        assert not (len(lengths) == gas and all(n <= capacity for n in lengths))
        return
    assert len(packs) == gas
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    for p in packs:
        assert p and list(p) == sorted(p)
        assert sum(lengths[i] for i in p) <= capacity


@given(st.lists(st.integers(1, 10), min_size=1, max_size=7), st.integers(1, 3))
def test_window_never_raises_when_lpt_cannot_get_stuck(lengths: list[int], gas: int) -> None:
    # with Σ ≤ gas·L/2 and every segment ≤ L/2 the least-filled pack always has room
    capacity = max(2 * sum(lengths), 2 * max(lengths))
    if len(lengths) < gas:
        return
    packs = schedule_window(lengths, capacity, gas)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))


def test_window_gas_must_be_positive() -> None:
    with pytest.raises(InvariantViolation):
        schedule_window([1], 10, 0)


# ----------------------------------------------------------------------------- adaptive stacking (item 6; test 43)


def test_two_segments_at_fill_04_with_min_065_raise_the_target_to_4() -> None:
    assert adaptive_raw_count(2, 2, 0.4, 0.65) >= 4
    assert adaptive_raw_count(2, 2, pack_fill(4, 10), 0.65) == 4


def test_adaptive_uses_exact_rationals() -> None:
    assert math.ceil(3 * 0.8 / 0.4) == 7  # float arithmetic: 6.000000000000001
    assert adaptive_raw_count(1, 3, 0.4, 0.8) == 6


def test_adaptive_keeps_the_count_when_fill_is_reached_and_never_lowers_it() -> None:
    assert adaptive_raw_count(3, 2, 0.65, 0.65) == 3
    assert adaptive_raw_count(9, 2, 0.4, 0.65) == 9


@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 100), st.integers(1, 100))
def test_adaptive_target_would_reach_min_fill_at_the_last_density(
    current: int, n: int, total_len: int, capacity_extra: int
) -> None:
    capacity = total_len + capacity_extra - 1
    fill = pack_fill(total_len, capacity)
    target = adaptive_raw_count(current, n, fill, 0.65)
    assert target >= current
    if fill < pack_fill(65, 100):
        # target segments at the last mean length fill at least min_fill
        assert target * fill / n >= pack_fill(65, 100)


def test_adaptive_rejects_bad_inputs() -> None:
    with pytest.raises(InvariantViolation):
        adaptive_raw_count(1, 2, 0.0, 0.65)
    with pytest.raises(InvariantViolation):
        adaptive_raw_count(1, 0, 0.5, 0.65)


# ----------------------------------------------------------------------------- packed row (item 4; test 39)


def test_packed_labels_equal_concatenated_labels_and_positions_shift() -> None:
    labels = [[-100, -100, 5, 6], [-100, 7, 8], [-100, -100, 9]]
    layout = PackLayout([len(r) for r in labels])
    assert layout.concat(labels).tolist() == list(itertools.chain(*labels))
    assert layout.offsets.tolist() == [0, 4, 7]
    assert layout.cu_seq_lens.tolist() == [0, 4, 7, 10] == cu_seq_lens([4, 3, 3]).tolist()
    # a coord group at positions (1, 2) of segment 1 sits at (5, 6) of the row
    assert layout.shift(1, [1, 2]).tolist() == [5, 6]
    packed = layout.concat(labels)
    for k, row in enumerate(labels):
        pos = np.arange(len(row))
        assert packed[layout.shift(k, pos)].tolist() == row


@given(st.lists(st.lists(st.integers(-100, 50), min_size=1, max_size=6), max_size=6))
def test_concat_and_shift_round_trip(rows: list[list[int]]) -> None:
    layout = PackLayout([len(r) for r in rows])
    packed = layout.concat(rows)
    assert packed.size == layout.total
    for k, row in enumerate(rows):
        assert packed[layout.shift(k, range(len(row)))].tolist() == row


def test_layout_rejects_mismatched_rows_and_positions() -> None:
    layout = PackLayout([2, 3])
    with pytest.raises(InvariantViolation):
        layout.concat([[1, 2], [1, 2]])
    with pytest.raises(InvariantViolation):
        layout.shift(0, [2])
    with pytest.raises(InvariantViolation):
        PackLayout([2, 0])


def test_pack_gauges_name_the_registry_keys() -> None:
    gauges = pack_gauges([6, 2, 2], 10, buffer_left=2)
    assert gauges == {FILL_KEY: 1.0, SELECTED_TOTAL_KEY: 10.0, SEGMENTS_KEY: 3.0, BUFFER_KEY: 2.0}
    assert all(is_registered(key) for key in gauges)
