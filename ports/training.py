"""The training engine port (D12): the use case hands over validated records, their plans and typed settings;
the adapter trains.

Shaped for every trainer variant: Stage-1 (teacher forcing) now, Stage-2 AB / rollout_matching_sft later,
whose engines receive the same job (plus a rollout backend, :mod:`ports.rollout`) and reuse its pieces: the
sample settings and sources, the unit/pack plans, the loss and monitor settings, the trainer knobs.

The use case (``application.train``) does everything that needs no model before it writes a run file: it maps
the config to these settings (``application.training_settings``, one function per block), measures every
sample with the tokenizer and plans the packs (``application.training_plan``). The engine then only loads
the model and template, builds the trainer and runs (:meth:`TrainingEngine.run`). No setting here is ``Any``
and none has a default of its own: every default is the config schema's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import attrs

from domain.instability import InstabilitySettings
from domain.losses import CoordLossSettings
from domain.objects import CoordMode, DetObject, FieldOrder, Ordering
from domain.packing import PackPlan, PlanFingerprint
from domain.prompts import PromptTexts
from domain.records import Record
from domain.training_samples import SampleSource, target_text
from ports.metrics import MetricSink
from ports.tokenizer import ChatSample, SampleOrigin


@attrs.frozen
class SampleSettings:
    """How a record becomes a training conversation (data.md §2.5, §4): the assistant text's conventions,
    the object ordering (``random`` shuffles per (seed, epoch, record index)) and the prompt texts."""

    field_order: FieldOrder
    coord_mode: CoordMode
    ordering: Ordering
    seed: int
    prompt: PromptTexts


def training_chat_sample(source: SampleSource, settings: SampleSettings, objects: Sequence[DetObject]) -> ChatSample:
    """The conversation of one training sample with ``objects`` as its assistant text: the one constructor
    the length pre-pass (objects in record order) and the engines' datasets (per-epoch order) both call."""
    record = source.record
    return ChatSample(
        prompt=settings.prompt,
        image_path=source.image_path,
        width=record.width,
        height=record.height,
        target=target_text(objects, settings.field_order, settings.coord_mode),
        origin=SampleOrigin(source=record.source, line=record.line, record_index=source.record_index),
    )


@attrs.frozen
class UnitPlan:
    """What one split trains on: single samples (``units`` None) or the packs of a static plan (data.md §8.2).

    ``lengths`` are the data.md §6.5 sample lengths in record order; ``plan`` / ``fingerprint`` the static
    plan and what it depends on (``reused_cache``: it came from a matching plan cache).
    """

    units: tuple[tuple[int, ...], ...] | None
    lengths: tuple[int, ...]
    plan: PackPlan | None = None
    reused_cache: bool = False
    fingerprint: PlanFingerprint | None = None


@attrs.frozen
class SplitData:
    """One split: validated records, their resolved image files (record order, data.md §3.3) and its plan."""

    records: tuple[Record, ...]
    images: tuple[Path, ...]
    plan: UnitPlan

    def __attrs_post_init__(self) -> None:
        if not (len(self.records) == len(self.images) == len(self.plan.lengths)):
            raise ValueError(
                f"a split needs one image and one length per record: {len(self.records)} records, "
                f"{len(self.images)} images, {len(self.plan.lengths)} lengths"
            )


@attrs.frozen
class ModelSettings:
    """``model``: the numeric type and attention kernel the engine loads the checkpoint with."""

    dtype: Literal["bfloat16", "float16", "float32"]
    attn_implementation: str


@attrs.frozen
class LoraSettings:
    """``training.lora`` (stage1.md §7.2)."""

    enabled: bool
    use_dora: bool
    rank: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]


@attrs.frozen
class CoordOffsetSettings:
    """``training.coord_offset`` (stage1.md §7)."""

    enabled: bool
    tie_head: bool
    embed_lr: float | None
    head_lr: float | None
    weight_decay: float
    dtype: str | None


@attrs.frozen
class TrainerSettings:
    """The ``training`` block's knobs the engine passes to the trainer loop, the optimizer and the model parts.

    Attribute names are the config keys (so an error can name ``training.<name>``).
    """

    max_steps: int | None
    num_train_epochs: float
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int | None
    effective_batch_size: int | None
    learning_rate: float
    vit_lr: float | None
    aligner_lr: float | None
    weight_decay: float
    lr_scheduler_type: str
    warmup_ratio: float
    max_grad_norm: float
    gradient_checkpointing: bool
    freeze_vit: bool
    freeze_aligner: bool
    freeze_llm: bool
    max_length: int
    packing: bool
    eval_packing: bool
    dataloader_drop_last: bool
    dataloader_num_workers: int
    logging_steps: int
    eval_strategy: str
    eval_steps: int | None
    save_strategy: str
    save_steps: int
    save_total_limit: int | None
    save_only_model: bool
    metric_for_best_model: str | None
    greater_is_better: bool | None
    report_to: tuple[str, ...]
    deepspeed: Path | None
    loss_from_hidden: bool | None
    probe_largest_pack: bool
    probe_memory_limit_gb: float | None
    lora: LoraSettings
    coord_offset: CoordOffsetSettings


@attrs.frozen
class TokenTypeSettings:
    """``objective.token_type_metrics`` when enabled (stage1.md §2, §3.2)."""

    include: tuple[str, ...] | None
    exclude: tuple[str, ...]
    log_top5: bool
    coord_monitor_mass: bool
    coord_monitor_mass_max_tokens: int


@attrs.frozen
class Stage1Objective:
    """``objective`` for Stage 1: the coord loss (§1), the token-type metrics and the instability monitor
    (§5; ``None`` when off), and where the monitor dumps samples (resolved against the run directory)."""

    coord_loss: CoordLossSettings
    token_types: TokenTypeSettings | None
    instability: InstabilitySettings | None
    instability_dump_dir: Path


@attrs.frozen
class TrainingJob:
    """Everything an engine needs, already validated and planned (config, data and length errors raised
    before this exists). ``resolved_config_path`` is where the use case wrote ``resolved_config.json``
    (copied into every checkpoint)."""

    run_dir: Path
    model_path: Path
    resolved_config_path: Path
    seed: int
    model: ModelSettings
    samples: SampleSettings
    trainer: TrainerSettings
    objective: Stage1Objective
    train: SplitData
    val: SplitData | None = None
    resume_from: Path | None = None


@attrs.frozen
class TrainingOutcome:
    global_step: int
    step_losses: tuple[float, ...]
    last_checkpoint: Path | None
    eval_metrics: dict[str, float] | None = None


class TrainingEngine(Protocol):
    def run(self, job: TrainingJob, metric_sink: MetricSink) -> TrainingOutcome:
        """Load the model of ``job``, train on its plans and log to ``metric_sink``."""
        ...

