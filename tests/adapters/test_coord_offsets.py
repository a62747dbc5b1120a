"""The coord-offset adapter (stage1.md §7, §9 tests 46-50, §6.2, §10 pitfall 15) on the tiny Qwen3-VL.

The tiny model is built in memory (the tiny builder's tokenizer and model, float32), tied and untied.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.hf.coord_offsets import (
    COORD_OFFSET_MODULE,
    CoordOffsetAdapter,
    active_adapter,
    attach_coord_offset_hooks,
    check_optimizer_coverage,
    coord_offset_hook_count,
    coord_offset_param_groups,
    install_coord_offsets,
    merge_coord_offsets,
    restore_coord_offsets,
    setup_coord_offsets,
    trainable_offsets,
)
from adapters.hf.vocab import shares_storage
from application.config.schema import CoordOffsetConfig, TrainingConfig
from domain.coord_tokens import CoordIdTable
from domain.errors import ArtifactError, SetupError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def base_models(tokenizer: Any) -> dict[bool, Any]:
    from adapters.hf import tiny

    models = {}
    for tied in (True, False):
        settings_ = tiny.TinyModelSettings(text=tiny.TinyTextSettings(tie_word_embeddings=tied))
        model = tiny._build_model(settings_, tokenizer)
        model.eval()
        models[tied] = model
    return models


@pytest.fixture
def fresh(base_models: dict[bool, Any]) -> Callable[[bool], Any]:
    """A deep copy of the tied (True) or untied (False) tiny model with every parameter frozen."""

    def make(tied: bool) -> Any:
        model = copy.deepcopy(base_models[tied])
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    return make


def _randomise(adapter: CoordOffsetAdapter, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.embed_offset.copy_(torch.randn(adapter.embed_offset.shape, generator=generator))
        if adapter.head_offset is not None:
            adapter.head_offset.copy_(torch.randn(adapter.head_offset.shape, generator=generator))


def _coord_mask(table: CoordIdTable, size: int) -> torch.Tensor:
    return torch.as_tensor(table.mask(size))


def _row(adapter: CoordOffsetAdapter, token_id: int) -> int:
    return int((adapter.coord_ids == token_id).nonzero().item())


NO_COORD = torch.tensor([[1, 20, 30, 40, 41, 2]])


def _with_coords(table: CoordIdTable) -> torch.Tensor:
    return torch.tensor(
        [[1, 20, table.ids[0], 30, table.ids[517], table.ids[999], table.wildcard_id or 3, 2]]
    )


# --------------------------------------------------------------------------------------------------
# 46: forward semantics


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_changes_only_at_coord_ids(
    fresh: Callable[[bool], Any], table: CoordIdTable, tied: bool
) -> None:
    model = fresh(tied)
    embedding = model.get_input_embeddings()
    ids = _with_coords(table)
    with torch.no_grad():
        base = embedding(ids)
    adapter = install_coord_offsets(model, table, tie_head=True)
    _randomise(adapter)
    with torch.no_grad():
        out = embedding(ids)
    is_coord = torch.tensor([[table.is_coord_id(int(i)) for i in ids[0]]])
    assert torch.equal(out[~is_coord], base[~is_coord])  # wildcard and text ids: bit-identical
    for position, token in enumerate(ids[0].tolist()):
        if table.is_coord_id(token):
            expected = base[0, position] + adapter.embed_offset[_row(adapter, token)]
            assert torch.equal(out[0, position], expected)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_head_adds_h_dot_offset_to_coord_columns_only(
    fresh: Callable[[bool], Any], table: CoordIdTable, tied: bool
) -> None:
    model = fresh(tied)
    head = model.get_output_embeddings()
    hidden = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = head(hidden)
    adapter = install_coord_offsets(model, table, tie_head=True)
    _randomise(adapter)
    with torch.no_grad():
        out = head(hidden)
    mask = _coord_mask(table, out.shape[-1])
    assert torch.equal(out[..., ~mask], base[..., ~mask])
    ids = torch.tensor(table.ids)
    rows = torch.tensor([_row(adapter, i) for i in table.ids])
    expected = base[..., ids] + hidden @ adapter.embed_offset[rows].T
    assert torch.allclose(out[..., ids], expected, atol=1e-5)
    assert not torch.allclose(out[..., ids], base[..., ids])


def test_full_forward_without_coord_ids_keeps_non_coord_logits_bit_identical(
    fresh: Callable[[bool], Any], table: CoordIdTable
) -> None:
    model = fresh(True)
    with torch.no_grad():
        base = model(input_ids=NO_COORD).logits
    _randomise(install_coord_offsets(model, table, tie_head=True))
    with torch.no_grad():
        out = model(input_ids=NO_COORD).logits
    mask = _coord_mask(table, out.shape[-1])
    assert torch.equal(out[..., ~mask], base[..., ~mask])
    assert not torch.allclose(out[..., mask], base[..., mask])


def test_zero_offsets_leave_the_model_unchanged(fresh: Callable[[bool], Any], table: CoordIdTable) -> None:
    model = fresh(False)
    ids = _with_coords(table)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    install_coord_offsets(model, table, tie_head=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)


@settings(max_examples=30, deadline=None)
@given(
    ids=st.lists(st.integers(0, 1471), min_size=1, max_size=12),
    scale=st.floats(0.1, 5.0),
)
def test_embedding_hook_property(table: CoordIdTable, ids: list[int], scale: float) -> None:
    """For any id sequence: the hook output equals base + offset exactly at coord ids, base elsewhere."""
    adapter = CoordOffsetAdapter(table.ids, 4, tie_head=True)
    with torch.no_grad():
        adapter.embed_offset.copy_(torch.arange(4000, dtype=torch.float32).reshape(1000, 4) * scale)
    base = torch.randn(1, len(ids), 4, generator=torch.Generator().manual_seed(len(ids)))
    out = adapter("embed", torch.tensor([ids]), base)
    for j, token in enumerate(ids):
        if table.is_coord_id(token):
            assert torch.equal(out[0, j], base[0, j] + adapter.embed_offset[_row(adapter, token)])
        else:
            assert torch.equal(out[0, j], base[0, j])


def test_rows_follow_sorted_ids_for_non_contiguous_tables() -> None:
    ids = [5000 - 3 * k for k in range(1000)]  # descending, non-contiguous
    table = CoordIdTable(ids)
    adapter = CoordOffsetAdapter(table.ids, 2, tie_head=True)
    assert adapter.coord_ids.tolist() == sorted(ids)
    with torch.no_grad():
        adapter.embed_offset.copy_(torch.arange(2000, dtype=torch.float32).reshape(1000, 2))
    out = adapter("embed", torch.tensor([[ids[0], 1, ids[-1]]]), torch.zeros(1, 3, 2))
    assert out[0, 0].tolist() == adapter.embed_offset[999].tolist()  # the largest id is the last row
    assert out[0, 1].tolist() == [0.0, 0.0]
    assert out[0, 2].tolist() == adapter.embed_offset[0].tolist()


# --------------------------------------------------------------------------------------------------
# 47: gradients


@pytest.mark.parametrize("tie_head", [True, False])
def test_only_offsets_get_gradients(
    fresh: Callable[[bool], Any], table: CoordIdTable, tie_head: bool
) -> None:
    model = fresh(False)
    install_coord_offsets(model, table, tie_head=tie_head)
    model(input_ids=_with_coords(table)).logits.sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    expected = {f"{COORD_OFFSET_MODULE}.embed_offset"}
    if not tie_head:
        expected.add(f"{COORD_OFFSET_MODULE}.head_offset")
    assert with_grad == expected
    assert model.get_input_embeddings().weight.grad is None
    assert model.get_output_embeddings().weight.grad is None


def test_untied_head_uses_its_own_table(fresh: Callable[[bool], Any], table: CoordIdTable) -> None:
    model = fresh(False)
    adapter = install_coord_offsets(model, table, tie_head=False)
    head = model.get_output_embeddings()
    hidden = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = head(hidden)
        adapter.embed_offset.fill_(1.0)
        assert torch.equal(head(hidden), base)  # the embedding offset does not reach the head
        assert adapter.head_offset is not None
        adapter.head_offset.fill_(0.5)
        assert not torch.allclose(head(hidden), base)


@pytest.mark.parametrize("tie_head", [True, False])
def test_no_coord_id_in_input_gives_zero_not_none_gradients(
    fresh: Callable[[bool], Any], table: CoordIdTable, tie_head: bool
) -> None:
    model = fresh(False)
    adapter = install_coord_offsets(model, table, tie_head=tie_head)
    # Only the non-coord logits enter the loss: the head path gives no signal either.
    logits = model(input_ids=NO_COORD).logits
    mask = _coord_mask(table, logits.shape[-1])
    logits[..., ~mask].sum().backward()
    assert adapter.embed_offset.grad is not None
    assert torch.count_nonzero(adapter.embed_offset.grad) == 0
    if not tie_head:
        assert adapter.head_offset is not None and adapter.head_offset.grad is not None
        assert torch.count_nonzero(adapter.head_offset.grad) == 0


def test_offset_dtype_and_cast(fresh: Callable[[bool], Any], table: CoordIdTable) -> None:
    model = fresh(False).to(torch.bfloat16)
    adapter = install_coord_offsets(model, table, tie_head=True, dtype="fp32")
    assert adapter.embed_offset.dtype == torch.float32
    out = model(input_ids=_with_coords(table)).logits
    assert out.dtype == torch.bfloat16
    assert install_coord_offsets(fresh(False).to(torch.bfloat16), table).embed_offset.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# 48: optimizer groups


def _training(**offset: Any) -> TrainingConfig:
    return TrainingConfig(
        learning_rate=2e-4,
        vit_lr=1e-4,
        aligner_lr=4e-4,
        weight_decay=0.1,
        freeze_vit=False,
        freeze_aligner=False,
        freeze_llm=False,
        coord_offset=CoordOffsetConfig(enabled=True, **offset),
    )


def _engine_groups(model: Any, table: CoordIdTable, training: TrainingConfig) -> list[dict[str, Any]]:
    """The engine's order: freeze per config, install the offsets, then the §7.2 groups."""
    from adapters.hf.model_parts import freeze as _freeze, optimizer_groups

    _freeze(model, training)
    setup_coord_offsets(model, table, training)
    return coord_offset_param_groups(model, training, optimizer_groups(model, training))


@pytest.mark.parametrize("tie_head", [True, False])
def test_optimizer_groups(fresh: Callable[[bool], Any], table: CoordIdTable, tie_head: bool) -> None:
    model = fresh(False)
    training = _training(tie_head=tie_head, embed_lr=1e-4, head_lr=3e-5, weight_decay=0.0)
    groups = _engine_groups(model, table, training)
    adapter = active_adapter(model)

    offset_groups = [
        g for g in groups if any(p is adapter.embed_offset or p is adapter.head_offset for p in g["params"])
    ]
    if tie_head:
        assert groups[0]["params"] == [adapter.embed_offset] and len(offset_groups) == 1
        assert (groups[0]["lr"], groups[0]["weight_decay"]) == (1e-4, 0.0)
    else:
        assert groups[0]["params"] == [adapter.embed_offset] and groups[1]["params"] == [adapter.head_offset]
        assert (groups[0]["lr"], groups[1]["lr"]) == (1e-4, 3e-5)
        assert groups[0]["weight_decay"] == groups[1]["weight_decay"] == 0.0
        assert len(offset_groups) == 2
    rest = groups[len(offset_groups) :]
    assert not any(p is adapter.embed_offset or p is adapter.head_offset for g in rest for p in g["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    lrs: dict[tuple[float, float], list[str]] = {}
    for group in rest:
        lrs.setdefault((group["lr"], group["weight_decay"]), []).extend(names[id(p)] for p in group["params"])
    # vision 1e-4, aligner 4e-4, language model 2e-4; each with decay 0.1 and a no-decay 0.0 sub-group
    assert set(lrs) == {(lr, wd) for lr in (1e-4, 4e-4, 2e-4) for wd in (0.0, 0.1)}
    assert all("visual" in n and "merger" in n for n in lrs[(4e-4, 0.1)] + lrs[(4e-4, 0.0)])
    assert all("visual" in n and "merger" not in n for n in lrs[(1e-4, 0.1)] + lrs[(1e-4, 0.0)])
    assert all("visual" not in n for n in lrs[(2e-4, 0.1)] + lrs[(2e-4, 0.0)])
    assert all(
        p.dim() < 2 or "norm" in names[id(p)] for g in rest if g["weight_decay"] == 0.0 for p in g["params"]
    )
    # every trainable parameter exactly once; base embedding / head are not trainable any more
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable)
    assert not model.get_input_embeddings().weight.requires_grad


def test_offset_lrs_default_to_the_learning_rate(fresh: Callable[[bool], Any], table: CoordIdTable) -> None:
    model = fresh(False)
    groups = _engine_groups(model, table, _training(tie_head=False))
    assert groups[0]["lr"] == groups[1]["lr"] == 2e-4


def test_optimizer_coverage_errors(fresh: Callable[[bool], Any], table: CoordIdTable) -> None:
    model = fresh(False)
    install_coord_offsets(model, table, tie_head=True)
    offset = active_adapter(model).embed_offset
    with pytest.raises(
        SetupError, match=r"1 trainable parameters missing .*coord_offset_adapter.embed_offset"
    ):
        check_optimizer_coverage(model, [])
    with pytest.raises(SetupError, match="present more than once"):
        check_optimizer_coverage(model, [{"params": [offset]}, {"params": [offset]}])
    # The classic mistake: name-prefix groups that skip the root; the offsets are then missing.
    disabled = TrainingConfig(coord_offset=CoordOffsetConfig(enabled=False))
    with pytest.raises(SetupError, match="missing from the optimizer groups"):
        coord_offset_param_groups(model, disabled, [])


def test_setup_errors(fresh: Callable[[bool], Any], table: CoordIdTable) -> None:
    model = fresh(False)
    assert setup_coord_offsets(model, table, TrainingConfig()) is None  # disabled: nothing installed
    assert not hasattr(model, COORD_OFFSET_MODULE)
    install_coord_offsets(model, table)
    with pytest.raises(SetupError, match="already installed"):
        install_coord_offsets(model, table)

    narrow = fresh(False)
    narrow.lm_head = torch.nn.Linear(64, narrow.lm_head.out_features, bias=False)
    with pytest.raises(SetupError, match=r"embedding width \(128\) to equal the head's input width \(64\)"):
        install_coord_offsets(narrow, table, tie_head=True)
    install_coord_offsets(narrow, table, tie_head=False)  # untied: its own [1000, 64] table
    assert active_adapter(narrow).head_offset is not None
    assert active_adapter(narrow).head_offset.shape == (1000, 64)  # type: ignore[union-attr]

    headless = fresh(False)
    headless.get_output_embeddings = lambda: None  # type: ignore[method-assign]
    with pytest.raises(SetupError, match="LM-head module was not found"):
        install_coord_offsets(headless, table)

    small = CoordIdTable([2000 + k for k in range(1000)])
    with pytest.raises(SetupError, match="coord id 2999 is outside the embedding"):
        install_coord_offsets(fresh(False), small)


# --------------------------------------------------------------------------------------------------
# 49: PEFT wrapping


def test_after_peft_wrapping_the_active_copy_drives_the_logits(
    fresh: Callable[[bool], Any], table: CoordIdTable
) -> None:
    from peft import LoraConfig, get_peft_model

    model = fresh(False)
    original = install_coord_offsets(model, table, tie_head=True)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=[COORD_OFFSET_MODULE]
        ),
    )
    attach_coord_offset_hooks(peft_model)
    assert coord_offset_hook_count(peft_model) == 2
    live = active_adapter(peft_model)
    assert live is not original and isinstance(live, CoordOffsetAdapter)
    assert set(trainable_offsets(peft_model).values()) == {live.embed_offset}
    assert not original.embed_offset.requires_grad

    with torch.no_grad():
        before = peft_model(input_ids=NO_COORD).logits
        original.embed_offset.fill_(3.0)  # the frozen original is not what the forward uses
        assert torch.equal(peft_model(input_ids=NO_COORD).logits, before)
        live.embed_offset.fill_(3.0)
        after = peft_model(input_ids=NO_COORD).logits
    mask = _coord_mask(table, after.shape[-1])
    assert not torch.allclose(after[..., mask], before[..., mask])
    assert torch.equal(after[..., ~mask], before[..., ~mask])

    # Gradients reach the live copy through the hooks.
    peft_model(input_ids=_with_coords(table)).logits[..., mask].sum().backward()
    assert live.embed_offset.grad is not None and torch.count_nonzero(live.embed_offset.grad) > 0
    assert original.embed_offset.grad is None


def test_reattach_without_adapter_is_a_setup_error(fresh: Callable[[bool], Any]) -> None:
    with pytest.raises(SetupError, match="no 'coord_offset_adapter' module"):
        attach_coord_offset_hooks(fresh(False))


# --------------------------------------------------------------------------------------------------
# Persistence


def test_offsets_are_saved_with_the_checkpoint_and_restored(
    fresh: Callable[[bool], Any], table: CoordIdTable, tmp_path: Path
) -> None:
    model = fresh(False)
    adapter = install_coord_offsets(model, table, tie_head=False)
    _randomise(adapter, seed=5)
    model.save_pretrained(tmp_path)
    ids = _with_coords(table)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    reloaded = fresh(False)
    restored = install_coord_offsets(reloaded, table, tie_head=False)
    restore_coord_offsets(reloaded, tmp_path)
    assert torch.equal(restored.embed_offset, adapter.embed_offset)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-6)

    mismatched = fresh(False)
    install_coord_offsets(mismatched, table, tie_head=True)
    with pytest.raises(ArtifactError, match="tie_head mismatch"):
        restore_coord_offsets(mismatched, tmp_path)


# --------------------------------------------------------------------------------------------------
# 50: export


@pytest.mark.parametrize(
    ("tied_base", "tie_head"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_merged_logits_equal_adapter_logits(
    fresh: Callable[[bool], Any], table: CoordIdTable, tied_base: bool, tie_head: bool
) -> None:
    model = fresh(tied_base)
    base_embedding = model.get_input_embeddings().weight.detach().clone()
    base_head = model.get_output_embeddings().weight.detach().clone()
    adapter = install_coord_offsets(model, table, tie_head=tie_head)
    _randomise(adapter, seed=3)
    embed_offset = adapter.embed_offset.detach().clone()
    head_offset = adapter.head_table.detach().clone()
    ids = _with_coords(table)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    report = merge_coord_offsets(model)

    assert not hasattr(model, COORD_OFFSET_MODULE) and coord_offset_hook_count(model) == 0
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert torch.allclose(merged, expected, atol=1e-4)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    rows = torch.tensor(sorted(table.ids))
    # The offset is added exactly once to each table (a shared storage is not added to twice).
    assert torch.allclose(embedding[rows], base_embedding[rows] + embed_offset, atol=1e-6)
    assert torch.allclose(head[rows], base_head[rows] + head_offset, atol=1e-6)
    mask = _coord_mask(table, embedding.shape[0])
    assert torch.equal(embedding[~mask], base_embedding[~mask]) and torch.equal(head[~mask], base_head[~mask])
    assert report.tied_before is tied_base
    assert report.tied_after is (tied_base and tie_head) is shares_storage(embedding, head)
    assert model.config.tie_word_embeddings is (tied_base and tie_head)
    assert model.config.text_config.tie_word_embeddings is (tied_base and tie_head)


def test_untied_export_reloads_untied(
    fresh: Callable[[bool], Any], table: CoordIdTable, tmp_path: Path
) -> None:
    from transformers import Qwen3VLForConditionalGeneration

    model = fresh(True)
    _randomise(install_coord_offsets(model, table, tie_head=False), seed=4)
    ids = _with_coords(table)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merge_coord_offsets(model)
    model.save_pretrained(tmp_path)
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.tie_word_embeddings is False
    assert not shares_storage(reloaded.get_input_embeddings().weight, reloaded.get_output_embeddings().weight)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-4)
