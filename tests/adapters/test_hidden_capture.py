"""The final hidden states the loss-from-hidden path reads (issue 14): captured from the model's own forward,
they reproduce the head's logits exactly, also with ``logits_to_keep=1`` and with coord-row head offsets."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from adapters.hf.coord_offsets import install_coord_offsets
from adapters.hf.hidden_capture import FinalHiddenStates, head_offsets
from domain.coord_tokens import CoordIdTable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _model(tokenizer: Any, tied: bool) -> Any:
    from adapters.hf import tiny

    model = tiny._build_model(tiny.TinyModelSettings(text=tiny.TinyTextSettings(tie_word_embeddings=tied)), tokenizer)
    return model.eval()


def _ids(table: CoordIdTable) -> torch.Tensor:
    return torch.tensor([[1, 20, table.ids[0], 30, table.ids[517], table.ids[999], 40, 2]])


@pytest.mark.parametrize("tied", [True, False])
def test_captured_hidden_states_times_the_head_are_the_logits(tokenizer: Any, table: CoordIdTable, tied: bool) -> None:
    model = _model(tokenizer, tied)
    source = FinalHiddenStates.find(model)
    assert source is not None and source.weight is model.get_output_embeddings().weight
    ids = _ids(table)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with source.capture() as captured:
            one = model(input_ids=ids, logits_to_keep=1).logits
    assert captured.hidden is not None and tuple(captured.hidden.shape[:2]) == tuple(ids.shape)
    assert one.shape[1] == 1  # the head built one position, not [B, L, V]
    torch.testing.assert_close(captured.hidden @ source.weight.T, full, rtol=1e-5, atol=1e-5)
    captured.hidden = None
    with torch.no_grad():
        model(input_ids=ids)
    assert captured.hidden is None  # the hook is gone after the block


@pytest.mark.parametrize("tie_head", [True, False])
def test_head_offsets_reproduce_the_offset_logits(
    tokenizer: Any, table: CoordIdTable, tie_head: bool
) -> None:
    model = _model(tokenizer, tied=False)
    assert head_offsets(model) is None  # no adapter installed
    adapter = install_coord_offsets(model, table, tie_head=tie_head)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        adapter.embed_offset.copy_(torch.randn(adapter.embed_offset.shape, generator=generator))
        if adapter.head_offset is not None:
            adapter.head_offset.copy_(torch.randn(adapter.head_offset.shape, generator=generator))
    source = FinalHiddenStates.find(model)
    assert source is not None
    ids = _ids(table)
    with torch.no_grad(), source.capture() as captured:
        logits = model(input_ids=ids).logits
    offsets = head_offsets(model)
    assert offsets is not None and captured.hidden is not None
    rebuilt = captured.hidden @ source.weight.T
    cols = torch.as_tensor(sorted(table.ids))  # the adapter's rows: ascending coord id
    rebuilt[..., cols] += captured.hidden @ offsets.T
    torch.testing.assert_close(rebuilt, logits, rtol=1e-5, atol=1e-5)


def test_a_model_without_a_final_norm_or_with_a_biased_head_is_not_a_source() -> None:
    class Head(torch.nn.Linear):
        pass

    class NoNorm(torch.nn.Module):
        def get_decoder(self) -> torch.nn.Module:
            return torch.nn.Identity()

        def get_output_embeddings(self) -> torch.nn.Module:
            return torch.nn.Linear(4, 8, bias=False)

    class Biased(NoNorm):
        def get_decoder(self) -> torch.nn.Module:
            decoder = torch.nn.Module()
            decoder.norm = torch.nn.LayerNorm(4)
            return decoder

        def get_output_embeddings(self) -> torch.nn.Module:
            return Head(4, 8, bias=True)

    assert FinalHiddenStates.find(NoNorm()) is None
    assert FinalHiddenStates.find(Biased()) is None
    assert FinalHiddenStates.find(torch.nn.Linear(2, 2)) is None
