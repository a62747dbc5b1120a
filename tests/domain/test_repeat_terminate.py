"""The repeat-terminate rule (stage2.md §16.6)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ConfigError
from domain.repeat_terminate import (
    MAX_OBJECTS,
    NGRAM_REPEAT,
    TOKEN_REPEAT,
    RepeatTerminateSettings,
    records_started,
    repeat_terminate_reason,
)


def rule(**kw: int | None) -> RepeatTerminateSettings:
    base: dict[str, int | None] = {
        "min_new_tokens": 0,
        "max_consecutive_token_repeats": 4,
        "ngram_size": 3,
        "ngram_repeats": 3,
        "max_objects": None,
    }
    base.update(kw)
    return RepeatTerminateSettings(**base)  # type: ignore[arg-type]


def test_defaults_are_the_spec_defaults() -> None:
    s = RepeatTerminateSettings()
    assert (
        s.min_new_tokens,
        s.max_consecutive_token_repeats,
        s.ngram_size,
        s.ngram_repeats,
        s.max_objects,
    ) == (256, 64, 64, 2, None)
    assert s.window == 128


def test_token_repeat_needs_k_in_a_row() -> None:
    s = rule()
    assert repeat_terminate_reason([1, 2, 7, 7, 7], s) is None
    assert repeat_terminate_reason([1, 2, 7, 7, 7, 7], s) == TOKEN_REPEAT
    assert repeat_terminate_reason([7, 7, 7, 7, 1], s) is None  # the run must end at the last token


def test_ngram_repeat_compares_consecutive_non_overlapping_ngrams() -> None:
    s = rule(max_consecutive_token_repeats=99)
    abc = [1, 2, 3]
    assert repeat_terminate_reason([9] + abc * 3, s) == NGRAM_REPEAT  # last 3-gram equals the 2 before it
    assert repeat_terminate_reason([9] + abc * 2, s) is None  # only one earlier copy, 3 needed in total
    assert repeat_terminate_reason(abc + [4, 2, 3] + abc, s) is None
    assert repeat_terminate_reason(abc * 3 + [1], s) == NGRAM_REPEAT  # (2, 3, 1) three times, any phase
    assert repeat_terminate_reason([9, 9] + abc * 2 + [1], s) is None  # the third copy starts too late


def test_max_objects_counts_records_started() -> None:
    s = rule(max_objects=2, max_consecutive_token_repeats=99, ngram_repeats=99)
    text = '{"objects": [{"desc": "a", "bbox_2d": [..]}, {"desc": "b"'
    assert records_started(text) == 2 and records_started('{"desc":"a"}') == 0
    assert repeat_terminate_reason([1, 2, 3], s, n_records=1) is None
    assert repeat_terminate_reason([1, 2, 3], s, n_records=2) == MAX_OBJECTS
    assert repeat_terminate_reason([1, 2, 3], rule(), n_records=10**6) is None  # max_objects off


def test_min_new_tokens_gates_every_condition() -> None:
    s = rule(min_new_tokens=6, max_objects=1)
    assert repeat_terminate_reason([7] * 5, s, n_records=3) is None
    assert repeat_terminate_reason([7] * 6, s, n_records=3) == MAX_OBJECTS
    assert repeat_terminate_reason([7] * 6, s) == TOKEN_REPEAT
    # Only the last window of ids with the full length, as the logits processor passes them.
    assert repeat_terminate_reason([7] * 4, s, gen_len=6) == TOKEN_REPEAT
    assert repeat_terminate_reason([7] * 4, s, gen_len=5) is None


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2), max_size=40),
    k=st.integers(1, 5),
    n=st.integers(1, 4),
    r=st.integers(2, 4),
    m=st.integers(0, 12),
)
def test_the_last_window_decides_like_the_whole_generation(
    ids: list[int], k: int, n: int, r: int, m: int
) -> None:
    s = rule(min_new_tokens=m, max_consecutive_token_repeats=k, ngram_size=n, ngram_repeats=r)
    tail = ids[-s.window :] if s.window else []
    assert repeat_terminate_reason(tail, s, gen_len=len(ids)) == repeat_terminate_reason(ids, s)
    # Brute force of the spec's sentences.
    run = 0
    for t in reversed(ids):
        if t != ids[-1]:
            break
        run += 1
    grams = [ids[len(ids) - (j + 1) * n : len(ids) - j * n] for j in range(r)] if len(ids) >= n * r else []
    expected = len(ids) >= m and (run >= k or (bool(grams) and all(g == grams[0] for g in grams)))
    assert (repeat_terminate_reason(ids, s) is not None) == expected


@pytest.mark.parametrize(
    "kw",
    [
        {"min_new_tokens": -1},
        {"max_consecutive_token_repeats": 0},
        {"ngram_size": 0},
        {"ngram_repeats": 1},
        {"max_objects": 0},
        {"ngram_size": True},
    ],
)
def test_bad_settings_name_the_key(kw: dict[str, int]) -> None:
    key = next(iter(kw))
    with pytest.raises(ConfigError, match=f"rollout.repeat_terminate.{key}"):
        RepeatTerminateSettings(**kw)  # type: ignore[arg-type]
