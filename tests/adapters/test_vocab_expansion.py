"""Vocabulary expansion (data.md §4.3, §11 test 24; D7): tokens, table resizing, tying, coord_tokens.json.

In memory on the tiny Qwen3-VL built WITHOUT coord tokens (the tiny builder with its coord additions
switched off), plus a small fake LM for the hypothesis properties of the resize. The end-to-end run
through the entry point is in tests/application/test_expand_vocab.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adapters.hf.tokenizer import HFTokenizer
from adapters.hf.vocab import (
    COORD_TOKENS_FILE,
    add_coord_tokens,
    check_coord_tokens_file,
    checkpoint_is_tied,
    coord_tokens_document,
    present_additions,
    resize_to_tokenizer,
    shares_storage,
)
from domain.coord_tokens import WILDCARD_TOKEN, all_coord_tokens, bin_to_token, vocabulary_additions
from domain.errors import ArtifactError, CoordVocabularyError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PLAIN_TOKENS = 432  # 14 specials + 406 BPE entries + 12 ordinary added tokens (docs/models.md)


def _tiny_settings(*, tied: bool, vocab_size: int) -> Any:
    from adapters.hf import tiny

    return tiny.TinyModelSettings(text=tiny.TinyTextSettings(vocab_size=vocab_size, tie_word_embeddings=tied))


@pytest.fixture(scope="module")
def plain_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer with its coord additions switched off, saved once."""
    from adapters.hf import tiny

    with mock.patch.object(tiny, "vocabulary_additions", list):
        tokenizer = tiny._build_tokenizer(_tiny_settings(tied=False, vocab_size=448))
    directory = tmp_path_factory.mktemp("plain_tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def plain_tokenizer(plain_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(plain_tokenizer_dir), local_files_only=True)
    assert present_additions(tokenizer) == []
    assert len(tokenizer) == PLAIN_TOKENS
    return tokenizer


@pytest.fixture
def plain_model() -> Callable[..., Any]:
    """A tiny Qwen3-VL for the plain tokenizer (``vocab_size`` rows), float32, eval mode."""
    from adapters.hf import tiny

    def build(tokenizer: Any, *, tied: bool, vocab_size: int = 448) -> Any:
        model = tiny._build_model(_tiny_settings(tied=tied, vocab_size=vocab_size), tokenizer)
        model.eval()
        return model

    return build


# --------------------------------------------------------------------------------------------------
# Tokenizer


def test_adds_1001_special_tokens_keeping_existing_specials(plain_tokenizer: Any) -> None:
    specials_before = list(plain_tokenizer.all_special_tokens)
    extra_before = [str(t) for t in plain_tokenizer.extra_special_tokens]
    assert specials_before, "the plain tokenizer must have special tokens for this test to mean anything"

    ids = add_coord_tokens(plain_tokenizer)

    assert len(ids) == 1001
    assert len(plain_tokenizer) == PLAIN_TOKENS + 1001
    assert [plain_tokenizer.convert_ids_to_tokens(i) for i in ids] == vocabulary_additions()
    decoder = plain_tokenizer.added_tokens_decoder
    assert all(decoder[i].special for i in ids)
    assert set(specials_before) <= set(plain_tokenizer.all_special_tokens)
    assert [str(t) for t in plain_tokenizer.extra_special_tokens][: len(extra_before)] == extra_before
    for token in specials_before:  # still one special id each
        assert decoder[plain_tokenizer.convert_tokens_to_ids(token)].special


def test_coord_ids_validate_after_expansion(plain_tokenizer: Any) -> None:
    ids = add_coord_tokens(plain_tokenizer)
    table = HFTokenizer(plain_tokenizer).coord_ids
    assert table.ids == ids[1:]
    assert len(set(table.ids)) == 1000
    assert plain_tokenizer.unk_token_id not in table.ids
    assert table.wildcard_id == ids[0] and ids[0] not in table.ids
    assert table.mask(1500).sum() == 1000


@settings(max_examples=25, deadline=None)
@given(a=st.integers(0, 999), b=st.integers(0, 999), prefix=st.sampled_from(["[", '{"bbox_2d": [', "box "]))
def test_every_coord_token_encodes_to_one_id_in_context(
    plain_tokenizer_dir: Path, a: int, b: int, prefix: str
) -> None:
    tokenizer = _expanded_tokenizer(plain_tokenizer_dir)
    table = HFTokenizer(tokenizer).coord_ids
    text = f"{prefix}{bin_to_token(a)}, {bin_to_token(b)}]"
    ids = tokenizer.encode(text, add_special_tokens=False)
    coord = [i for i in ids if table.is_coord_id(i)]
    assert coord == [table.ids[a], table.ids[b]]


_EXPANDED: dict[Path, Any] = {}


def _expanded_tokenizer(directory: Path) -> Any:
    if directory not in _EXPANDED:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        add_coord_tokens(tokenizer)
        _EXPANDED[directory] = tokenizer
    return _EXPANDED[directory]


def test_already_expanded_tokenizer_is_refused(plain_tokenizer: Any) -> None:
    add_coord_tokens(plain_tokenizer)
    size = len(plain_tokenizer)
    with pytest.raises(CoordVocabularyError, match="already expanded"):
        add_coord_tokens(plain_tokenizer, "model.path /x")
    assert len(plain_tokenizer) == size


def test_partially_expanded_tokenizer_is_refused(plain_tokenizer: Any) -> None:
    plain_tokenizer.add_special_tokens(
        {"extra_special_tokens": [bin_to_token(7), bin_to_token(8)]}, replace_extra_special_tokens=False
    )
    with pytest.raises(CoordVocabularyError, match=r"2 of the 1001 .*partially"):
        add_coord_tokens(plain_tokenizer)


# --------------------------------------------------------------------------------------------------
# coord_tokens.json


def test_coord_tokens_document_lists_the_1001_strings_and_ids(plain_tokenizer: Any) -> None:
    ids = add_coord_tokens(plain_tokenizer)
    document = coord_tokens_document(plain_tokenizer)
    assert list(document) == vocabulary_additions()
    assert list(document.values()) == list(ids)
    assert all(plain_tokenizer.convert_tokens_to_ids(tok) == i for tok, i in document.items())


def test_coord_tokens_file_is_checked_against_the_tokenizer(plain_tokenizer: Any, tmp_path: Path) -> None:
    add_coord_tokens(plain_tokenizer)
    document = coord_tokens_document(plain_tokenizer)
    path = tmp_path / COORD_TOKENS_FILE
    path.write_text(json.dumps(document))
    assert check_coord_tokens_file(tmp_path, plain_tokenizer).ids == tuple(
        document[t] for t in all_coord_tokens()
    )

    swapped = dict(document)
    swapped["<|coord_3|>"], swapped["<|coord_4|>"] = document["<|coord_4|>"], document["<|coord_3|>"]
    path.write_text(json.dumps(swapped))
    with pytest.raises(ArtifactError, match=r"2 ids disagree .*<\|coord_3\|>"):
        check_coord_tokens_file(tmp_path, plain_tokenizer)

    missing = {k: v for k, v in document.items() if k != "<|coord_500|>"}
    path.write_text(json.dumps(missing))
    with pytest.raises(ArtifactError, match=r"got 999; missing or unknown: \['<\|coord_500\|>'\]"):
        check_coord_tokens_file(tmp_path, plain_tokenizer)

    wrong_wildcard = {**document, WILDCARD_TOKEN: 0}
    path.write_text(json.dumps(wrong_wildcard))
    with pytest.raises(ArtifactError, match=r"coord_\*"):
        check_coord_tokens_file(tmp_path, plain_tokenizer)

    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        check_coord_tokens_file(tmp_path, plain_tokenizer)


# --------------------------------------------------------------------------------------------------
# Tables on the tiny Qwen3-VL


def _mean64(rows: torch.Tensor) -> torch.Tensor:
    return rows.to(torch.float64).mean(dim=0)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_grows_tables_keeps_tying_and_mean_initialises(
    plain_tokenizer: Any, plain_model: Callable[..., Any], tied: bool
) -> None:
    model = plain_model(plain_tokenizer, tied=tied, vocab_size=448)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert shares_storage(embedding.weight, head.weight) is tied
    old_embedding = embedding.weight.detach().clone()
    old_head = head.weight.detach().clone()
    probe = torch.tensor([[1, 20, 77, 300, 2]])
    with torch.no_grad():
        logits_before = model(input_ids=probe).logits

    ids = add_coord_tokens(plain_tokenizer)
    with torch.no_grad():
        result = resize_to_tokenizer(model, len(plain_tokenizer), PLAIN_TOKENS, ids, tied=tied)

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert result.rows_after == len(plain_tokenizer) == 1433
    assert embedding.weight.shape == (1433, 128) and head.weight.shape == (1433, 128)
    assert embedding.num_embeddings == 1433 and head.out_features == 1433
    assert shares_storage(embedding.weight, head.weight) is tied
    assert (head.weight is embedding.weight) is tied
    assert model.config.tie_word_embeddings is tied and model.config.text_config.tie_word_embeddings is tied
    assert model.config.text_config.vocab_size == 1433
    # Old token rows untouched; added rows (including the old padding rows 432..447) = the old tokens' mean.
    assert torch.equal(embedding.weight[:PLAIN_TOKENS], old_embedding[:PLAIN_TOKENS])
    added = torch.tensor(ids)
    expected_embedding = _mean64(old_embedding[:PLAIN_TOKENS]).to(torch.float32)
    assert torch.allclose(embedding.weight[added], expected_embedding.expand(len(ids), -1), atol=1e-6)
    assert torch.equal(head.weight[:PLAIN_TOKENS], old_head[:PLAIN_TOKENS])
    expected_head = _mean64(old_head[:PLAIN_TOKENS]).to(torch.float32)
    assert torch.allclose(head.weight[added], expected_head.expand(len(ids), -1), atol=1e-6)
    if not tied:
        assert not torch.allclose(expected_head, expected_embedding)  # each table used its own rows
    # The model still computes the same logits for the old vocabulary.
    with torch.no_grad():
        logits_after = model(input_ids=probe).logits
    assert logits_after.shape[-1] == 1433
    assert torch.allclose(logits_after[..., :PLAIN_TOKENS], logits_before[..., :PLAIN_TOKENS], atol=1e-5)


def test_resize_never_shrinks_a_larger_table(plain_tokenizer: Any, plain_model: Callable[..., Any]) -> None:
    model = plain_model(plain_tokenizer, tied=False, vocab_size=1472)
    old = model.get_input_embeddings().weight.detach().clone()
    ids = add_coord_tokens(plain_tokenizer)
    with torch.no_grad():
        result = resize_to_tokenizer(model, len(plain_tokenizer), PLAIN_TOKENS, ids, tied=False)
    weight = model.get_input_embeddings().weight
    assert result.rows_after == 1472 and weight.shape[0] == 1472
    assert torch.equal(weight[1433:], old[1433:])  # rows past the tokenizer stay as they were
    assert torch.allclose(weight[432:1433], _mean64(old[:PLAIN_TOKENS]).float().expand(1001, -1), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Properties of the resize on a small fake LM


class _TextConfig:
    def __init__(self) -> None:
        self.vocab_size = -1
        self.tie_word_embeddings: bool | None = None


class _Config:
    def __init__(self) -> None:
        self.text_config = _TextConfig()
        self.tie_word_embeddings: bool | None = None

    def get_text_config(self) -> _TextConfig:
        return self.text_config


class _FakeLM(nn.Module):
    def __init__(self, rows: int, width: int, *, tied: bool, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(rows, width)
        self.head = nn.Linear(width, rows, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(rows, width, generator=generator))
            self.head.weight.copy_(torch.randn(rows, width, generator=generator))
        if tied:
            self.head.weight = self.embed.weight
        self.config = _Config()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head


@settings(max_examples=60, deadline=None)
@given(
    tokens_before=st.integers(1, 40),
    padding=st.integers(0, 12),
    added=st.integers(1, 30),
    width=st.integers(1, 6),
    tied=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_resize_properties(
    tokens_before: int, padding: int, added: int, width: int, tied: bool, seed: int
) -> None:
    rows_before = tokens_before + padding
    model = _FakeLM(rows_before, width, tied=tied, seed=seed)
    old_embedding = model.embed.weight.detach().clone()
    old_head = model.head.weight.detach().clone()
    new_ids = list(range(tokens_before, tokens_before + added))
    with torch.no_grad():
        result = resize_to_tokenizer(model, tokens_before + added, tokens_before, new_ids, tied=tied)

    rows = max(rows_before, tokens_before + added)
    assert result.rows_after == rows == model.embed.weight.shape[0] == model.head.weight.shape[0]
    assert model.config.text_config.vocab_size == rows
    assert model.config.tie_word_embeddings is tied and model.config.text_config.tie_word_embeddings is tied
    assert shares_storage(model.embed.weight, model.head.weight) is tied
    initialised = set(new_ids) | set(range(rows_before, rows))
    assert set(result.initialised_rows) == initialised
    for table, old in (
        (model.embed.weight, old_embedding),
        (model.head.weight, old_head if not tied else old_embedding),
    ):
        mean = old[:tokens_before].to(torch.float64).mean(dim=0)
        for i in range(rows):
            if i in initialised:
                assert torch.allclose(table[i].to(torch.float64), mean, atol=1e-5)
            else:
                assert torch.equal(table[i], old[i])


def test_tying_detection() -> None:
    tied = _FakeLM(8, 3, tied=True, seed=0)
    untied = _FakeLM(8, 3, tied=False, seed=0)
    stored_with_head = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    stored_without_head = {"model.language_model.embed_tokens.weight"}
    flags = {"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}}
    assert checkpoint_is_tied(tied, {}, stored_with_head)  # one shared tensor is tied whatever the config
    assert not checkpoint_is_tied(untied, {}, stored_without_head)
    # Only text_config says tied and no head was stored: a loader that ignored text_config left a fresh head.
    assert checkpoint_is_tied(untied, flags, stored_without_head)
    # A stored head that differs from the embedding is untied, whatever the flags say (never force-tie).
    assert not checkpoint_is_tied(untied, {"tie_word_embeddings": True, **flags}, stored_with_head)
