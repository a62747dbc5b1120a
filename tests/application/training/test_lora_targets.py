"""LoRA honours ``training.freeze_vit`` / ``freeze_aligner`` / ``freeze_llm`` (issue 11, finding 13): which modules
peft wraps, without training. The weights a few real LoRA steps change are checked in test_lora_merge.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.hf.model_parts import apply_lora, frozen_parts, model_part
from application.config.schema import LoraConfig, TrainingConfig
from domain.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapters.hf.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint({}, tmp_path_factory.mktemp("tiny_cache"))


def _adapted_parts(tiny_dir: Path, training: TrainingConfig) -> dict[str, int]:
    """How many linear modules of each part peft wrapped with LoRA."""
    from peft.tuners.lora import LoraLayer

    from adapters.hf.checkpoint import load_model_and_processor

    model = load_model_and_processor(tiny_dir, dtype="float32").model
    wrapped = apply_lora(model, LoraConfig(enabled=True, rank=2, alpha=4), frozen=frozen_parts(training))
    counts = {"vit": 0, "aligner": 0, "llm": 0}
    for name, module in wrapped.named_modules():
        if isinstance(module, LoraLayer):
            counts[model_part(name)] += 1
    return counts


def test_model_parts() -> None:
    assert model_part("model.visual.blocks.0.attn.qkv.weight") == "vit"
    assert model_part("model.visual.merger.linear_fc1") == "aligner"
    assert model_part("base_model.model.model.visual.deepstack_merger_list.1.linear_fc2") == "aligner"
    assert model_part("model.language_model.layers.0.self_attn.q_proj") == "llm"
    assert frozen_parts(TrainingConfig()) == {"vit", "aligner"}  # the schema defaults


@pytest.mark.parametrize(
    ("freeze", "expected_adapted"),
    [
        ({}, {"llm"}),  # defaults: freeze_vit and freeze_aligner true
        ({"freeze_vit": False}, {"vit", "llm"}),
        ({"freeze_vit": False, "freeze_aligner": False}, {"vit", "aligner", "llm"}),
        ({"freeze_vit": False, "freeze_aligner": False, "freeze_llm": True}, {"vit", "aligner"}),
    ],
)
def test_lora_targets_only_unfrozen_parts(tiny_dir: Path, freeze: dict[str, bool], expected_adapted: set[str]) -> None:
    counts = _adapted_parts(tiny_dir, TrainingConfig(**freeze))
    assert {part for part, n in counts.items() if n} == expected_adapted


def test_lora_with_every_part_frozen_is_a_config_error(tmp_path: Path) -> None:
    from application.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("training: {freeze_llm: true, lora: {enabled: true}}\n")
    with pytest.raises(ConfigError, match=r"training.lora.enabled.*nothing would be adapted"):
        load_config(path)
