"""Longer Stage-1 runs on CPU: the loss goes down, and coord offsets train alone on a frozen model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from application import wiring
from application.config import load_config
from train_runner import run_train

pytestmark = pytest.mark.slow


def test_loss_decreases_over_a_longer_smoke_run(shapes3_bbox: Path, make_config: Callable[..., Path]) -> None:
    cfg = make_config(shapes3_bbox, training={"max_steps": 12, "learning_rate": 2.0e-3})
    losses = run_train(load_config(cfg, entry_point="train")).step_losses
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses


def test_coord_offsets_alone_move_only_the_coord_rows(shapes3_bbox: Path, make_config: Callable[..., Path]) -> None:
    """Everything frozen but the coord-offset adapter (stage1.md §7): the base weights stay bit-identical and
    the trained offsets are non-zero exactly on the coord rows they cover."""
    cfg = make_config(
        shapes3_bbox,
        training={
            "max_steps": 2, "save_strategy": "steps", "save_steps": 2,
            "freeze_vit": True, "freeze_aligner": True, "freeze_llm": True,
            "coord_offset": {"enabled": True, "tie_head": True},
        },
    )
    loaded = load_config(cfg, entry_point="train")
    base_dir = wiring.resolve_model_checkpoint(loaded.config.model)
    before = load_file(str(base_dir / "model.safetensors"))
    run_train(loaded)
    after = load_file(str(Path(loaded.config.run.output_dir) / "t" / "checkpoint-2" / "model.safetensors"))
    offsets = {k: v for k, v in after.items() if "coord_offset_adapter" in k}
    assert offsets, f"no offset tensors saved: {sorted(after)[:5]}"
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"frozen weight changed: {key}"
    embed = next(v for k, v in offsets.items() if "embed" in k)
    assert embed.shape[0] == 1000
    assert float(embed.abs().sum()) > 0.0


def test_lora_with_coord_offsets_trains_and_saves_both(shapes3_bbox: Path, make_config: Callable[..., Path]) -> None:
    """The production combination (DoRA + coord offsets): the offsets ride along as a saved module of the
    adapter checkpoint and keep training through their hooks on the peft-wrapped model."""
    from safetensors.torch import load_file

    cfg = make_config(
        shapes3_bbox,
        training={"max_steps": 2, "save_strategy": "steps", "save_steps": 2,
                  "lora": {"enabled": True, "use_dora": True, "rank": 4, "alpha": 8},
                  "coord_offset": {"enabled": True, "tie_head": True}},
    )
    loaded = load_config(cfg, entry_point="train")
    outcome = run_train(loaded)
    assert outcome.global_step == 2
    ckpt = Path(loaded.config.run.output_dir) / "t" / "checkpoint-2"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    offsets = {k: v for k, v in adapter.items() if "coord_offset_adapter" in k}
    assert offsets, sorted(adapter)[:8]
    assert any(float(v.abs().sum()) > 0 for v in offsets.values())
    assert any("lora" in k for k in adapter)
