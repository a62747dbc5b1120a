"""The config -> typed training settings mapping (issue 10): every knob arrives, each with one default."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from application.config.schema import (
    CoordExpConfig,
    CoordSoftCEW1Config,
    DataConfig,
    EarlyStopConfig,
    GuardConfig,
    InstabilityMonitorConfig,
    LoraConfig,
    ObjectiveConfig,
    RunConfig,
    TokenTypeMetricsConfig,
    TrainingConfig,
)
from application.training_settings import (
    coord_loss_settings,
    instability_settings,
    sample_settings,
    stage1_objective,
    trainer_settings,
)
from domain.instability import InstabilitySettings
from domain.losses import CoordLossSettings
from domain.objects import Ordering


def test_the_schema_defaults_are_the_domain_defaults() -> None:
    """One default per knob: the config blocks read the spec's typed settings, so mapping an empty block gives
    exactly the domain's defaults."""
    assert coord_loss_settings(CoordSoftCEW1Config()) == CoordLossSettings()
    assert instability_settings(InstabilityMonitorConfig()) == InstabilitySettings()


LOSS_VALUES = {"enabled": True, "ce_weight": 0.25, "soft_ce_weight": 3.0, "w1_weight": 0.5, "gate_weight": 2.0,
               "temperature": 0.9, "target_sigma": 1.5, "target_truncate": 8}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LOSS_VALUES))
def test_every_coord_loss_knob_reaches_the_kernel_settings(name: str) -> None:
    block = CoordSoftCEW1Config(**{"enabled": True, name: LOSS_VALUES[name]})  # type: ignore[arg-type]
    assert getattr(coord_loss_settings(block), name) == LOSS_VALUES[name]


MONITOR_VALUES = {"enabled": True, "max_meta_samples": 3, "ema_decay": 0.5, "spike_factor": 2.0,
                  "abs_loss_threshold": 0.7, "min_supervised_tokens": 5, "min_token_acc": 0.3, "max_abs_logit": 50.0,
                  "detect_nonfinite": False, "detect_loss_spike": False, "detect_low_acc": False, "dump_samples": True}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MONITOR_VALUES))
def test_every_monitor_knob_reaches_the_monitor_settings(name: str) -> None:
    block = InstabilityMonitorConfig(**{name: MONITOR_VALUES[name]})  # type: ignore[arg-type]
    assert getattr(instability_settings(block), name) == MONITOR_VALUES[name]


def test_monitor_sub_blocks_and_dump_dir_arrive(tmp_path: Path) -> None:
    block = InstabilityMonitorConfig(enabled=True, dump_dir=tmp_path / "d",
                                     early_stop=EarlyStopConfig(enabled=True, on_reasons=("loss_spike",)),
                                     guard=GuardConfig(enabled=True, in_eval=False))  # fmt: skip
    settings = instability_settings(block)
    assert settings.dump_dir == str(tmp_path / "d")
    assert (settings.early_stop.enabled, settings.early_stop.on_reasons) == (True, ("loss_spike",))
    assert (settings.guard.enabled, settings.guard.in_eval) == (True, False)
    objective = stage1_objective(ObjectiveConfig(instability_monitor=block), tmp_path / "run")
    assert objective.instability == settings and objective.instability_dump_dir == tmp_path / "d"
    off = stage1_objective(ObjectiveConfig(), tmp_path / "run")
    assert off.instability is None and off.token_types is None
    assert off.instability_dump_dir.parent == tmp_path / "run"  # the default dump dir is inside the run


def test_token_type_settings_only_when_enabled(tmp_path: Path) -> None:
    on = TokenTypeMetricsConfig(enabled=True, include=("coco",), exclude=("lvis",), log_top5=False,
                                coord_monitor_mass=False, coord_monitor_mass_max_tokens=7)  # fmt: skip
    got = stage1_objective(ObjectiveConfig(token_type_metrics=on), tmp_path).token_types
    assert got is not None
    assert (got.include, got.exclude, got.log_top5, got.coord_monitor_mass, got.coord_monitor_mass_max_tokens) == (
        ("coco",), ("lvis",), False, False, 7)


def test_every_trainer_setting_is_the_training_key_of_the_same_name() -> None:
    """``TrainerSettings`` names are config keys: each value is the ``training`` block's (a non-default block,
    so a knob dropped or crossed in the mapping shows)."""
    block = TrainingConfig(max_steps=7, num_train_epochs=2.0, per_device_train_batch_size=3, per_device_eval_batch_size=5,
                           gradient_accumulation_steps=4, learning_rate=1e-3, vit_lr=2e-5, aligner_lr=3e-5,
                           weight_decay=0.1, lr_scheduler_type="constant", warmup_ratio=0.2, max_grad_norm=0.5,
                           gradient_checkpointing=True, freeze_vit=False, freeze_aligner=False, freeze_llm=True,
                           max_length=999, packing=True, eval_packing=True, dataloader_drop_last=True,
                           dataloader_num_workers=2, logging_steps=3, eval_strategy="steps", eval_steps=9,
                           save_strategy="epoch", save_steps=11, save_total_limit=2, save_only_model=True,
                           metric_for_best_model="eval_loss", greater_is_better=False, report_to=("tensorboard",),
                           loss_from_hidden=False, probe_largest_pack=False, probe_memory_limit_gb=3.5,
                           lora=LoraConfig(enabled=True, rank=4, alpha=8))  # fmt: skip
    settings = trainer_settings(block)
    for field in attrs.fields(type(settings)):
        value, configured = getattr(settings, field.name), getattr(block, field.name)
        if field.name in ("lora", "coord_offset"):
            assert attrs.asdict(value) == {k: getattr(configured, k) for k in attrs.asdict(value)}, field.name
        else:
            assert value == configured, field.name


def test_sample_settings_carry_the_run_seed_or_the_schema_default() -> None:
    config = CoordExpConfig(run=RunConfig(seed=23), data=DataConfig(ordering=Ordering.RANDOM))
    assert (sample_settings(config).seed, sample_settings(config).ordering) == (23, Ordering.RANDOM)
    assert sample_settings(CoordExpConfig()).seed == RunConfig().seed
