"""The peft merger (adapters/hf/merge.py) on a hand-made adapter of the tiny Qwen3-VL, without training: random
non-zero LoRA weights on language, vision and aligner layers plus untied coord offsets. The trained path
(train -> merge -> infer) is tests/application/training/test_lora_merge.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.hf import merge as merge_module
from adapters.hf.checkpoint import load_model_and_processor
from adapters.hf.coord_offsets import active_adapter, attach_coord_offset_hooks, install_coord_offsets
from adapters.hf.merge import PeftAdapterMerger
from adapters.hf.vocab import coord_tokens_document
from domain.errors import SetupError
from ports.adapter_merge import MergeRequest

TEXT = '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_0|>, <|coord_41|>, <|coord_700|>, <|coord_999|>]}]}'


def _ids(processor: Any) -> torch.Tensor:
    return torch.tensor([processor.tokenizer.encode(TEXT, add_special_tokens=False)])


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """An adapter checkpoint laid out like training's, and the adapter model's logits on TEXT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    loaded = load_model_and_processor(tiny_checkpoint, dtype="float32", attn_implementation="eager")
    install_coord_offsets(loaded.model, loaded.coord_ids, tie_head=False, dtype="float32")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "qkv", "linear_fc1"],
                        modules_to_save=["coord_offset_adapter"], init_lora_weights=False)  # fmt: skip
    model: Any = get_peft_model(loaded.model, config)
    attach_coord_offset_hooks(model)
    offsets = active_adapter(model)
    with torch.no_grad():
        offsets.embed_offset.normal_(std=0.05)
        assert offsets.head_offset is not None
        offsets.head_offset.normal_(std=0.05)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=_ids(loaded.processor)).logits
    directory = tmp_path_factory.mktemp("adapter") / "checkpoint-1"
    model.save_pretrained(str(directory))
    loaded.processor.save_pretrained(str(directory))
    document = coord_tokens_document(loaded.processor.tokenizer)  # what training writes into each checkpoint
    (directory / "coord_tokens.json").write_text(json.dumps(document))
    return directory, logits


def _merge(adapter_dir: Path, base: Path, out: Path) -> Any:
    merger = PeftAdapterMerger()
    out.mkdir()
    return merger.merge(MergeRequest(merger.read_adapter(adapter_dir), base, out, "float32"))


def test_merged_checkpoint_reproduces_the_adapter_model(
    adapter: tuple[Path, torch.Tensor], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    adapter_dir, expected = adapter
    report = _merge(adapter_dir, tiny_checkpoint, tmp_path / "merged")
    assert report.coord_offsets and report.tie_head is False and report.merged_modules > 0
    assert report.probe_max_abs_diff <= 1e-5
    merged = load_model_and_processor(tmp_path / "merged", dtype="float32", attn_implementation="eager")
    base = load_model_and_processor(tiny_checkpoint, dtype="float32", attn_implementation="eager")
    with torch.no_grad():
        got = merged.model(input_ids=_ids(merged.processor)).logits
        plain = base.model(input_ids=_ids(base.processor)).logits
    assert float((expected - plain).abs().max()) > 1e-2  # the adapter really changes the model
    assert float((got - expected).abs().max()) <= 1e-5
    assert {"config.json", "model.safetensors", "coord_tokens.json", "tokenizer.json"} <= set(report.files)


def test_offsets_left_unmerged_are_refused_before_saving(
    adapter: tuple[Path, torch.Tensor], tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merge_module, "merge_coord_offsets", lambda model: None)
    with pytest.raises(SetupError, match="still holds adapter parts"):
        _merge(adapter[0], tiny_checkpoint, tmp_path / "merged")
    assert list((tmp_path / "merged").iterdir()) == []
