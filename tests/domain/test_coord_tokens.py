"""Coord-token surface form, codec and id table (data.md §4, stage1.md §0.3, acceptance tests 1-3 / 15 / 25-26)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.coord_tokens import (
    WILDCARD_TOKEN,
    CoordIdTable,
    all_coord_tokens,
    bin_to_token,
    check_even_length,
    coord_token_value,
    is_coord_token,
    token_to_bin,
    values_to_bins,
    vocabulary_additions,
)
from domain.errors import CoordTokenError, CoordVocabularyError


@pytest.mark.parametrize("text", ["<|coord_0|>", "<|coord_7|>", "<|coord_42|>", "<|coord_999|>"])
def test_canonical_tokens_match(text: str) -> None:
    assert is_coord_token(text)


@pytest.mark.parametrize(
    "text",
    ["<|coord_1000|>", "<|coord_007|>", "<|coord_-1|>", "<|coord_*|>", "coord_42", "<|coord_5|>\n",
     " <|coord_5|>", "<|coord_5|> ", "<|coord_ 5|>", "<|coord_|>", "<|coord_5|><|coord_6|>"],
)
def test_non_canonical_strings_are_not_coord_tokens(text: str) -> None:
    assert not is_coord_token(text)
    with pytest.raises(CoordTokenError):
        token_to_bin(text)


def test_out_of_range_token_reports_its_value() -> None:
    with pytest.raises(CoordTokenError, match="1000 out of range"):
        token_to_bin("<|coord_1000|>")
    assert coord_token_value("<|coord_1000|>") == 1000
    assert coord_token_value("<|coord_007|>") is None
    assert coord_token_value("<|coord_5|>\n") is None


@given(st.integers(min_value=0, max_value=999))
def test_bins_round_trip_through_tokens(k: int) -> None:
    token = bin_to_token(k)
    assert is_coord_token(token) and token_to_bin(token) == k


@pytest.mark.parametrize("bad", [-1, 1000, True, 1.0, "3"])
def test_bin_to_token_is_range_and_type_checked(bad: object) -> None:
    with pytest.raises(CoordTokenError):
        bin_to_token(bad)  # type: ignore[arg-type]


@given(st.lists(st.integers(min_value=0, max_value=999), max_size=12), st.randoms(use_true_random=False))
def test_values_to_bins_accepts_mixed_ints_and_tokens_in_order(bins: list[int], rnd: object) -> None:
    mixed = [bin_to_token(b) if rnd.random() < 0.5 else b for b in bins]  # type: ignore[attr-defined]
    assert values_to_bins(mixed) == bins


@pytest.mark.parametrize("bad", [True, 12.0, "12", "<|coord_007|>", "<|coord_1000|>", 1000, -1, None])
def test_values_to_bins_rejects(bad: object) -> None:
    with pytest.raises(CoordTokenError):
        values_to_bins([1, bad])  # type: ignore[list-item]


def test_even_length_check() -> None:
    check_even_length([1, 2, 3, 4])
    with pytest.raises(CoordTokenError, match="len=3"):
        check_even_length([1, 2, 3])


def test_vocabulary_additions_are_the_wildcard_then_1000_tokens_in_bin_order() -> None:
    adds = vocabulary_additions()
    assert adds[0] == WILDCARD_TOKEN and adds[1:] == all_coord_tokens()
    assert len(adds) == 1001 and len(set(adds)) == 1001
    assert not is_coord_token(WILDCARD_TOKEN)


def _vocab(offset: int = 5000, stride: int = 1) -> dict[str, int]:
    vocab = {tok: offset + stride * k for k, tok in enumerate(all_coord_tokens())}
    vocab[WILDCARD_TOKEN] = offset - 1
    return vocab


def test_id_table_from_a_non_contiguous_vocabulary() -> None:
    table = CoordIdTable.from_vocab(_vocab(stride=3), unk_id=0)
    assert not table.is_contiguous and table.wildcard_id == 4999
    bins = table.bin_table(9000)
    assert len(bins) == 9000 and int((bins >= 0).sum()) == 1000
    assert bins[5000 + 3 * 17] == 17 and bins[5001] == -1
    mask = table.mask(9000)
    assert int(mask.sum()) == 1000 and not mask[4999]  # the wildcard is never a coord id


def test_unknown_or_missing_ids_are_listed() -> None:
    vocab: dict[str, int | None] = dict(_vocab())
    vocab["<|coord_7|>"] = 0  # the unknown id
    vocab["<|coord_8|>"] = None
    with pytest.raises(CoordVocabularyError, match=r"got 998; missing or unknown: \['<\|coord_7\|>', '<\|coord_8\|>'\]"):
        CoordIdTable.from_vocab(vocab, unk_id=0)


def test_coord_id_beyond_the_logits_names_both_numbers() -> None:
    table = CoordIdTable.from_vocab(_vocab(offset=151670), unk_id=None)
    with pytest.raises(CoordVocabularyError, match="coord id 152669 >= logits vocab size 151936"):
        table.check_vocab_size(151936)


def test_duplicate_ids_are_rejected() -> None:
    vocab = _vocab()
    vocab["<|coord_1|>"] = vocab["<|coord_0|>"]
    with pytest.raises(CoordVocabularyError, match="distinct"):
        CoordIdTable.from_vocab(vocab)
