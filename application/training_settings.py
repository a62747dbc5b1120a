"""The config -> typed training settings mapping (issue 10): one function per config block, no defaults.

Every default of a training knob is the config schema's (``application.config.schema``); these functions
copy the validated values into the settings types of :mod:`ports.training` and :mod:`domain`, whose own
construction re-checks the rules that belong to the domain (``CoordLossSettings``, ``InstabilitySettings``).
The engine receives only these settings, never the config.
"""

from __future__ import annotations

from pathlib import Path

from application.config.schema import (
    CoordExpConfig,
    CoordOffsetConfig,
    CoordSoftCEW1Config,
    InstabilityMonitorConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    TokenTypeMetricsConfig,
    TrainingConfig,
)
from domain.instability import EarlyStopSettings, GuardSettings, InstabilitySettings, default_dump_dir
from domain.losses import CoordLossSettings
from domain.prompts import PromptTexts, build_prompt
from ports.training import (
    CoordOffsetSettings,
    LoraSettings,
    ModelSettings,
    SampleSettings,
    Stage1Objective,
    TokenTypeSettings,
    TrainerSettings,
)


def prompt_texts(config: CoordExpConfig) -> PromptTexts:
    """``prompt`` (with the ``data`` conventions it describes) -> the system and user texts (data.md §6.1)."""
    data = config.data
    return build_prompt(
        config.prompt.variant,
        data.coord_mode,
        data.ordering,
        data.field_order,
        system_override=config.prompt.system,
        user_override=config.prompt.user,
    )


def sample_settings(config: CoordExpConfig) -> SampleSettings:
    """``data`` + ``prompt`` + ``run.seed`` -> how records become conversations (a config without a ``run``
    block, e.g. ``validate_dataset``'s, has the schema's seed)."""
    run = config.run if config.run is not None else RunConfig()
    data = config.data
    return SampleSettings(
        field_order=data.field_order,
        coord_mode=data.coord_mode,
        ordering=data.ordering,
        seed=int(run.seed),
        prompt=prompt_texts(config),
    )


def model_settings(model: ModelConfig) -> ModelSettings:
    return ModelSettings(dtype=model.dtype, attn_implementation=str(model.attn_implementation))


def lora_settings(lora: LoraConfig) -> LoraSettings:
    return LoraSettings(
        enabled=lora.enabled,
        use_dora=lora.use_dora,
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=tuple(lora.target_modules),
        modules_to_save=tuple(lora.modules_to_save),
    )


def coord_offset_settings(block: CoordOffsetConfig) -> CoordOffsetSettings:
    return CoordOffsetSettings(
        enabled=block.enabled,
        tie_head=block.tie_head,
        embed_lr=block.embed_lr,
        head_lr=block.head_lr,
        weight_decay=block.weight_decay,
        dtype=None if block.dtype is None else str(block.dtype),
    )


def trainer_settings(training: TrainingConfig) -> TrainerSettings:
    return TrainerSettings(
        max_steps=training.max_steps,
        num_train_epochs=training.num_train_epochs,
        per_device_train_batch_size=training.per_device_train_batch_size,
        per_device_eval_batch_size=training.per_device_eval_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        effective_batch_size=training.effective_batch_size,
        learning_rate=training.learning_rate,
        vit_lr=training.vit_lr,
        aligner_lr=training.aligner_lr,
        weight_decay=training.weight_decay,
        lr_scheduler_type=str(training.lr_scheduler_type),
        warmup_ratio=training.warmup_ratio,
        max_grad_norm=training.max_grad_norm,
        gradient_checkpointing=training.gradient_checkpointing,
        freeze_vit=training.freeze_vit,
        freeze_aligner=training.freeze_aligner,
        freeze_llm=training.freeze_llm,
        max_length=training.max_length,
        packing=training.packing,
        eval_packing=training.eval_packing,
        dataloader_drop_last=training.dataloader_drop_last,
        dataloader_num_workers=training.dataloader_num_workers,
        logging_steps=training.logging_steps,
        eval_strategy=str(training.eval_strategy),
        eval_steps=training.eval_steps,
        save_strategy=str(training.save_strategy),
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        save_only_model=training.save_only_model,
        metric_for_best_model=training.metric_for_best_model,
        greater_is_better=training.greater_is_better,
        report_to=tuple(training.report_to),
        deepspeed=training.deepspeed,
        loss_from_hidden=training.loss_from_hidden,
        probe_largest_pack=training.probe_largest_pack,
        probe_memory_limit_gb=training.probe_memory_limit_gb,
        lora=lora_settings(training.lora),
        coord_offset=coord_offset_settings(training.coord_offset),
    )


def coord_loss_settings(block: CoordSoftCEW1Config) -> CoordLossSettings:
    return CoordLossSettings(
        enabled=block.enabled,
        ce_weight=block.ce_weight,
        soft_ce_weight=block.soft_ce_weight,
        w1_weight=block.w1_weight,
        gate_weight=block.gate_weight,
        temperature=block.temperature,
        target_sigma=block.target_sigma,
        target_truncate=block.target_truncate,
    )


def token_type_settings(block: TokenTypeMetricsConfig) -> TokenTypeSettings | None:
    if not block.enabled:
        return None
    return TokenTypeSettings(
        include=None if block.include is None else tuple(block.include),
        exclude=tuple(block.exclude),
        log_top5=block.log_top5,
        coord_monitor_mass=block.coord_monitor_mass,
        coord_monitor_mass_max_tokens=block.coord_monitor_mass_max_tokens,
    )


def instability_settings(monitor: InstabilityMonitorConfig) -> InstabilitySettings:
    """``objective.instability_monitor`` as the pure monitor's settings (validated again there)."""
    reasons: tuple[str, ...] = tuple(monitor.early_stop.on_reasons)
    return InstabilitySettings(
        enabled=monitor.enabled,
        max_meta_samples=monitor.max_meta_samples,
        ema_decay=monitor.ema_decay,
        spike_factor=monitor.spike_factor,
        abs_loss_threshold=monitor.abs_loss_threshold,
        min_supervised_tokens=monitor.min_supervised_tokens,
        min_token_acc=monitor.min_token_acc,
        max_abs_logit=monitor.max_abs_logit,
        detect_nonfinite=monitor.detect_nonfinite,
        detect_loss_spike=monitor.detect_loss_spike,
        detect_low_acc=monitor.detect_low_acc,
        dump_samples=monitor.dump_samples,
        dump_dir=None if monitor.dump_dir is None else str(monitor.dump_dir),
        early_stop=EarlyStopSettings(enabled=monitor.early_stop.enabled, on_reasons=reasons),
        guard=GuardSettings(enabled=monitor.guard.enabled, in_eval=monitor.guard.in_eval),
    )


def stage1_objective(objective: ObjectiveConfig, run_dir: Path) -> Stage1Objective:
    monitor = objective.instability_monitor
    dump_dir = Path(monitor.dump_dir) if monitor.dump_dir is not None else Path(default_dump_dir(str(run_dir)))
    return Stage1Objective(
        coord_loss=coord_loss_settings(objective.coord_soft_ce_w1),
        token_types=token_type_settings(objective.token_type_metrics),
        instability=instability_settings(monitor) if monitor.enabled else None,
        instability_dump_dir=dump_dir,
    )
