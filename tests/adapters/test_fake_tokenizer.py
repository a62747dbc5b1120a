"""The deterministic toy tokenizer of adapters/fakes (a TokenizerPort for pure tests)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.fakes.tokenizer import QWEN_SPECIAL_TOKENS, FakeTokenizer
from domain.coord_tokens import WILDCARD_TOKEN, all_coord_tokens, bin_to_token
from domain.errors import SetupError
from ports.tokenizer import TokenizerPort

FAKE = FakeTokenizer()
PERMUTED = FakeTokenizer(coord_permutation_seed=7)
COORDS = st.integers(0, 999).map(bin_to_token)
PIECES = st.one_of(st.text(max_size=8), COORDS, st.sampled_from([*QWEN_SPECIAL_TOKENS, WILDCARD_TOKEN, "}]}", "},"]))


def test_is_a_tokenizer_port() -> None:
    assert isinstance(FAKE, TokenizerPort)


def test_layout() -> None:
    assert [FAKE.id_of(t) for t in QWEN_SPECIAL_TOKENS] == list(range(14))
    assert FAKE.id_of(WILDCARD_TOKEN) == 14
    assert FAKE.coord_ids.ids == tuple(range(15, 1015)) and FAKE.coord_ids.is_contiguous
    assert FAKE.coord_ids.wildcard_id == 14
    assert FAKE.im_end_id == FAKE.id_of("<|im_end|>") and FAKE.pad_id == FAKE.id_of("<|endoftext|>")
    assert FAKE.vocab_size > FAKE.coord_ids.max_id
    assert int(FAKE.coord_ids.mask(FAKE.vocab_size).sum()) == 1000


def test_permuted_coord_ids_are_non_contiguous_but_valid() -> None:
    table = PERMUTED.coord_ids
    assert not table.is_contiguous and sorted(table.ids) == list(range(15, 1015))
    assert [table.bin_of(PERMUTED.id_of(t)) for t in all_coord_tokens()] == list(range(1000))


def test_same_arguments_same_ids() -> None:
    text = '{"objects": [{"desc": "café", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}]}'
    assert FakeTokenizer().encode(text) == FAKE.encode(text)
    assert FakeTokenizer(coord_permutation_seed=7).encode(text) == PERMUTED.encode(text)


@given(st.lists(PIECES, max_size=8).map("".join))
def test_decode_inverts_encode(text: str) -> None:
    for tok in (FAKE, PERMUTED):
        assert tok.decode(tok.encode(text)) == text


@given(st.lists(st.one_of(st.text(alphabet=st.characters(max_codepoint=127), max_size=6), COORDS), max_size=8))
def test_every_coord_token_is_one_id_in_any_context(parts: list[str]) -> None:
    text = "".join(parts)
    ids = FAKE.encode(text)
    coords = [p for p in parts if p.startswith("<|coord_")]
    assert [FAKE.piece(i) for i in ids if FAKE.coord_ids.is_coord_id(i)] == coords
    assert "".join(FAKE.piece(i) for i in ids) == text  # ASCII: pieces concatenate to the decode


def test_fused_pieces_and_bytes() -> None:
    ids = FAKE.encode("]}]}")
    assert [FAKE.piece(i) for i in ids] == ["]}", "]}"]
    ids = FAKE.encode("x}, {")
    assert [FAKE.piece(i) for i in ids] == ["x", "},", " ", "{"]
    ids = FAKE.encode("é")  # two UTF-8 bytes: lone pieces are U+FFFD, the sequence decodes
    assert len(ids) == 2 and [FAKE.piece(i) for i in ids] == ["\ufffd", "\ufffd"] and FAKE.decode(ids) == "é"


def test_errors() -> None:
    with pytest.raises(SetupError, match="not in the fake tokenizer"):
        FAKE.id_of("<|coord_1000|>")
    with pytest.raises(SetupError, match="outside"):
        FAKE.piece(FAKE.vocab_size)
    with pytest.raises(ValueError, match="special-token markers"):
        FakeTokenizer(chunks=["<|x"])
    assert FAKE.encode("<|coord_1000|>") != [FAKE.id_of("<|coord_1|>")]  # unknown specials are plain text
    assert FAKE.decode(FAKE.encode("<|coord_1000|>")) == "<|coord_1000|>"
