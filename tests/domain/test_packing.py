"""Static pack plan (data.md §8.2, tests 42-44) and packed-row positions (§8.4, §8.5)."""

from __future__ import annotations

import random
from fractions import Fraction

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import DataContractError, InvariantViolation
from domain.packing import (
    Pack,
    PackingSettings,
    PlanFingerprint,
    best_fit_decreasing,
    boundaries_from_text_row,
    cached_or_planned,
    check_sample_lengths,
    cu_seq_lens,
    mrope_position_rows,
    over_long_samples,
    packed_position_ids,
    plan_cache_text,
    plan_from_cache_text,
    plan_packs,
    text_position_row,
    visit_order,
)

EXAMPLE = PackingSettings(max_length=80, packing_buffer=6, packing_min_fill_ratio=0.6)


def _lengths_of(plan_packs_: tuple[Pack, ...], lengths: list[int]) -> list[list[int]]:
    return [[lengths[i] for i in p.members] for p in plan_packs_]


# --- test 42: the two worked examples of §8.2 -------------------------------------------------


def test_worked_example_one_window_carries_the_underfilled_bin() -> None:
    lengths = [30, 30, 20, 60, 50, 10]
    ident = range(len(lengths))
    kept = plan_packs(lengths, EXAMPLE, seed=0, order=ident)
    # window bins {60, 20}, {50, 30}, {30, 10}; the last (40 < 48) is carried and emitted at the end
    assert _lengths_of(kept.packs, lengths) == [[60, 20], [50, 30], [30, 10]]
    assert [p.members for p in kept.packs] == [(3, 2), (4, 0), (1, 5)]
    assert kept.dropped == () and kept.final_step_start == 2
    dropped = plan_packs(lengths, attrs.evolve(EXAMPLE, packing_drop_last=True), seed=0, order=ident)
    assert _lengths_of(dropped.packs, lengths) == [[60, 20], [50, 30]]
    assert sorted(dropped.dropped) == [1, 5]
    assert dropped.stats().dropped_samples == 2


def test_worked_example_two_carried_bin_meets_the_tail() -> None:
    lengths = [30, 30, 20, 60, 50, 10, 70, 25]
    for drop_last in (False, True):
        s = attrs.evolve(EXAMPLE, packing_drop_last=drop_last)
        plan = plan_packs(lengths, s, seed=0, order=range(len(lengths)))
        assert _lengths_of(plan.packs, lengths) == [[60, 20], [50, 30], [70, 10], [30, 25]]
        assert plan.dropped == ()
        assert [p.total for p in plan.packs] == [80, 80, 80, 55]
        assert plan.final_step_start == 2


def test_threshold_is_exact_decimal() -> None:
    # 0.7 * 80 is 56.00000000000001 in binary floating point; the rule means 56.
    assert PackingSettings(80, 6, 0.7).threshold == Fraction(56)
    plan = plan_packs([56, 24], PackingSettings(56, 1, 1.0, True), seed=0, order=[0, 1])
    assert [p.members for p in plan.packs] == [(0,)] and plan.dropped == (1,)


def test_a_window_pack_filled_to_exactly_f_times_c_is_emitted_not_carried() -> None:
    """§8.2: a bin is carried only when its total is *below* f*C. With a buffer of one sample, 56 = 0.7*80 is
    emitted from its own window; carried, it would have been merged with the 20 that follows."""
    plan = plan_packs([56, 20], PackingSettings(80, 1, 0.7), seed=0, order=[0, 1])
    assert [p.members for p in plan.packs] == [(0,), (1,)]
    assert plan.final_step_start == 1 and plan.dropped == ()
    just_below = plan_packs([55, 20], PackingSettings(80, 1, 0.7), seed=0, order=[0, 1])
    assert [p.members for p in just_below.packs] == [(0, 1)]  # carried, then packed with the next sample


def test_default_visit_order_is_the_seeded_shuffle() -> None:
    order = list(range(10))
    random.Random(7).shuffle(order)
    assert visit_order(10, 7) == order
    lengths = [10 * (i + 1) for i in range(10)]
    s = PackingSettings(100, 4, 0.5)
    assert plan_packs(lengths, s, seed=7) == plan_packs(lengths, s, seed=7, order=order)


# --- test 43 --------------------------------------------------------------------------------


def test_sample_longer_than_capacity_is_a_data_error_listing_locations() -> None:
    locations = [f"train.jsonl:{i + 1}" for i in range(25)]
    lengths = [81] * 22 + [80, 10, 5]
    with pytest.raises(DataContractError) as info:
        plan_packs(lengths, EXAMPLE, seed=0, locations=locations)
    text = str(info.value)
    assert "train.jsonl:1 length=81" in text and "train.jsonl:20 length=81" in text
    assert "train.jsonl:21 " not in text and "... and 2 more" in text
    assert "training.max_length=80" in text and "Mitigations" in text


def test_sample_equal_to_capacity_is_a_single_sample_pack() -> None:
    plan = plan_packs([80, 30, 40], EXAMPLE, seed=0, order=[0, 1, 2])
    assert plan.packs[0] == Pack((0,), (80,))
    assert any(p.members == (0,) for p in plan.packs)
    check_sample_lengths([80], 80)


def test_empty_plan_names_n_c_and_f() -> None:
    with pytest.raises(DataContractError, match=r"N=0.*C=80.*f=0.6"):
        plan_packs([], EXAMPLE, seed=0)
    with pytest.raises(DataContractError, match=r"N=2.*C=80.*f=0.6"):
        plan_packs([5, 5], attrs.evolve(EXAMPLE, packing_drop_last=True), seed=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_length", 0),
        ("packing_buffer", 0),
        ("packing_min_fill_ratio", 0.0),
        ("packing_min_fill_ratio", 1.5),
    ],
)
def test_settings_are_validated(field: str, value: float) -> None:
    kwargs: dict[str, object] = {"max_length": 80, "packing_buffer": 6, "packing_min_fill_ratio": 0.6}
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        PackingSettings(**kwargs)  # type: ignore[arg-type]


# --- test 42 (invariants of §8.2.6, property) -------------------------------------------------


def _reference_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Independent restatement of §8.2.3 used as an oracle (sort once, scan bins by fill)."""
    items = sorted(enumerate(lengths), key=lambda t: (-t[1], t[0]))
    bins: list[tuple[int, int, list[int]]] = []  # (created, total, members)
    for pos, n in items:
        fits = [b for b in bins if b[1] + n <= capacity]
        if not fits:
            bins.append((len(bins), n, [pos]))
            continue
        target = min(fits, key=lambda b: (-b[1], b[0]))
        bins[target[0]] = (target[0], target[1] + n, [*target[2], pos])
    return [b[2] for b in bins]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 120).flatmap(
        lambda c: st.tuples(st.just(c), st.lists(st.integers(1, c), min_size=0, max_size=40))
    )
)
def test_best_fit_decreasing_matches_the_rule(case: tuple[int, list[int]]) -> None:
    capacity, lengths = case
    bins = best_fit_decreasing(lengths, capacity)
    assert bins == _reference_best_fit(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(10, 200),
    lengths_frac=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=60),
    buffer=st.integers(1, 12),
    fill=st.sampled_from([0.05, 0.3, 0.5, 0.65, 0.8, 0.95, 1.0]),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_plan_invariants(
    capacity: int, lengths_frac: list[float], buffer: int, fill: float, drop_last: bool, seed: int
) -> None:
    lengths = [max(1, min(capacity, round(f * capacity))) for f in lengths_frac]
    s = PackingSettings(capacity, buffer, fill, drop_last)
    try:
        plan = plan_packs(lengths, s, seed=seed)
    except DataContractError as exc:  # everything dropped: only possible with drop_last
        assert drop_last and "empty pack plan" in str(exc)
        return
    members = [m for p in plan.packs for m in p.members]
    # each sample in at most one pack; exactly one unless dropped
    assert len(members) == len(set(members))
    assert sorted(members + list(plan.dropped)) == list(range(len(lengths)))
    assert not plan.dropped or drop_last
    for p in plan.packs:
        assert p.total <= capacity
        assert p.lengths == tuple(lengths[i] for i in p.members)
    # every pack emitted before the final step has total >= f*C
    threshold = s.threshold
    assert 0 <= plan.final_step_start <= len(plan.packs)
    assert all(p.total >= threshold for p in plan.packs[: plan.final_step_start])
    if drop_last:
        assert all(p.total >= threshold for p in plan.packs)
    # pure: same inputs, same plan
    assert plan_packs(lengths, s, seed=seed) == plan


# --- test 44: cache -------------------------------------------------------------------------


def _fingerprint(**changes: object) -> PlanFingerprint:
    base = PlanFingerprint(
        jsonl_sha256="a" * 64,
        tokenizer_sha256="b" * 64,
        prompt_texts=("system text", "user text"),
        coord_mode="tokens",
        field_order="desc_first",
        settings=PackingSettings(80, 6, 0.6, False),
        seed=3,
    )
    return attrs.evolve(base, **changes)


FINGERPRINT_CHANGES: list[dict[str, object]] = [
    {"jsonl_sha256": "c" * 64},
    {"tokenizer_sha256": "d" * 64},
    {"prompt_texts": ("system text", "other user text")},
    {"coord_mode": "numeric"},
    {"field_order": "geometry_first"},
    {"settings": PackingSettings(81, 6, 0.6, False)},
    {"settings": PackingSettings(80, 7, 0.6, False)},
    {"settings": PackingSettings(80, 6, 0.61, False)},
    {"settings": PackingSettings(80, 6, 0.6, True)},
    {"seed": 4},
]


@pytest.mark.parametrize("change", FINGERPRINT_CHANGES, ids=lambda c: next(iter(c)))
def test_cache_is_rebuilt_when_any_fingerprint_field_changes(change: dict[str, object]) -> None:
    lengths = [30, 30, 20, 60, 50, 10, 70, 25]
    fp = _fingerprint()
    plan, reused = cached_or_planned(None, fp, lengths)
    assert not reused
    text = plan_cache_text(plan, fp, lengths)
    again, reused = cached_or_planned(text, fp, lengths)
    assert reused and again == plan
    other = _fingerprint(**change)
    assert other.key() != fp.key()
    assert plan_from_cache_text(text, other, lengths) is None
    rebuilt, reused = cached_or_planned(text, other, lengths)
    assert not reused
    assert rebuilt == plan_packs(lengths, other.settings, other.seed)


def test_cache_with_other_lengths_or_garbage_is_rebuilt() -> None:
    lengths = [30, 30, 20, 60, 50, 10]
    fp = _fingerprint()
    plan, _ = cached_or_planned(None, fp, lengths)
    text = plan_cache_text(plan, fp, lengths)
    assert plan_from_cache_text(text, fp, [31, *lengths[1:]]) is None
    assert plan_from_cache_text("{not json", fp, lengths) is None
    assert plan_from_cache_text("[]", fp, lengths) is None


def test_identical_inputs_give_identical_plan_and_cache_text() -> None:
    lengths = [random.Random(1).randint(1, 80) for _ in range(50)]
    a, _ = cached_or_planned(None, _fingerprint(), lengths)
    b, _ = cached_or_planned(None, _fingerprint(), lengths)
    assert a == b
    assert plan_cache_text(a, _fingerprint(), lengths) == plan_cache_text(b, _fingerprint(), lengths)


# --- positions (§8.4) and boundaries (§8.5) ---------------------------------------------------

VISION = 99


def test_mrope_worked_example_of_8_4() -> None:
    ids = [1, 2, 3, 4, 5] + [VISION] * 6 + [6]
    rows = mrope_position_rows(ids, VISION, [[1, 4, 6]], spatial_merge_size=2)
    assert rows[0].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 8]
    assert rows[1].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 6, 8]
    assert rows[2].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8]
    full = packed_position_ids([rows])
    assert full[0].tolist() == list(range(12))


def test_mrope_grid_mismatch_is_an_invariant_violation() -> None:
    with pytest.raises(InvariantViolation):
        mrope_position_rows([1, VISION, VISION, 2], VISION, [[1, 4, 6]], 2)
    with pytest.raises(InvariantViolation):
        mrope_position_rows([1, 2], VISION, [[1, 4, 6]], 2)
    with pytest.raises(InvariantViolation):
        mrope_position_rows([1, VISION], VISION, [], 2)


def test_packed_rows_of_two_members_restart_at_zero() -> None:
    a = mrope_position_rows([7, VISION, VISION, VISION, VISION, 8], VISION, [[1, 4, 4]], 2)
    b = mrope_position_rows([9, 9, 9], VISION, np.zeros((0, 3), dtype=np.int64), 2)
    full = packed_position_ids([a, b])
    assert full.shape == (4, 9)
    assert full[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert full[1:, 6:].tolist() == [[0, 1, 2]] * 3
    assert boundaries_from_text_row(full[0]).tolist() == [0, 6, 9]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=0, max_size=12))
def test_boundaries_recovered_from_the_text_row(lengths: list[int]) -> None:
    row = text_position_row(lengths)
    cu = cu_seq_lens(lengths)
    assert cu.dtype == np.int32
    assert cu.tolist() == [0, *np.cumsum(lengths).tolist()] if lengths else cu.tolist() == [0]
    assert boundaries_from_text_row(row).tolist() == (cu.tolist() if lengths else [0])
    # the spec's second statement of the same rule: indices where the text row is 0, plus T
    assert [*np.flatnonzero(row == 0).tolist(), len(row)] == (cu.tolist() if lengths else [0])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("text"), st.integers(1, 6)),
            st.tuples(st.just("image"), st.tuples(st.integers(1, 4), st.integers(1, 4))),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_mrope_rows_follow_the_rule(layout: list[tuple[str, object]]) -> None:
    ids: list[int] = []
    grids: list[list[int]] = []
    expected: list[tuple[int, int, int]] = []
    pos = 0
    for kind, spec in layout:
        if kind == "text":
            assert isinstance(spec, int)
            for _ in range(spec):
                ids.append(5)
                expected.append((pos, pos, pos))
                pos += 1
        else:
            assert isinstance(spec, tuple)
            gh, gw = spec
            if ids and ids[-1] == VISION:  # real layouts separate images by vision_end / vision_start
                ids.append(6)
                expected.append((pos, pos, pos))
                pos += 1
            grids.append([1, 2 * gh, 2 * gw])
            for r in range(gh):
                for c in range(gw):
                    ids.append(VISION)
                    expected.append((pos, pos + r, pos + c))
            pos += max(gh, gw)
    rows = mrope_position_rows(ids, VISION, grids, 2)
    assert [tuple(int(v) for v in col) for col in rows.T] == expected


def test_over_long_samples_is_the_rule_both_checks_use() -> None:
    """data.md §6.5: longer than C is over-long, equal to C is not (validate_dataset and training ask this)."""
    assert over_long_samples([80, 81, 79, 200], 80) == [1, 3]
    assert over_long_samples([], 80) == []
    with pytest.raises(DataContractError, match=r"2 sample\(s\) longer than training\.max_length=80"):
        check_sample_lengths([80, 81, 79, 200], 80)
