"""Stage-1 training through ms-swift's trainer (D12; stage1.md §1.6): the engine behind
:class:`ports.training.TrainingEngine`.

The use case hands over a typed :class:`ports.training.TrainingJob` (settings, records, the unit/pack plans
made before any run file); this adapter does what only ms-swift and transformers can: load the model and the
template, build the training arguments and the trainer (:class:`adapters.swift.stage1_trainer.CoordExpStage1Trainer`
with :class:`adapters.swift.stage1_runtime.Stage1Runtime`), and run. ms-swift's ``Seq2SeqTrainer`` runs the
loop, the optimizer, checkpoints, DDP / DeepSpeed and logging callbacks; no upstream file is patched; the
engine knobs of stage1.md §1.6 are set and asserted at startup.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from adapters.hf.checkpoint import check_processor
from adapters.hf.coord_offsets import coord_offset_param_groups, setup_coord_offsets
from adapters.hf.encoding import sample_encoder_loader
from adapters.hf.hidden_capture import FinalHiddenStates
from adapters.hf.model_parts import apply_lora, freeze, frozen_parts, optimizer_groups
from adapters.storage.checkpoints import complete_checkpoints
from adapters.swift.probe import MeterFactory, probe_largest_unit
from adapters.swift.stage1_runtime import Stage1Runtime
from adapters.torch.collator import ProjectCollator, TargetTokenTyper, model_rope_index
from adapters.torch.coord_loss import DEFAULT_CHUNK_BYTES, CoordLossKernel
from adapters.torch.instability import InstabilityRunner
from adapters.torch.memory_probe import device_meter
from adapters.torch.stage1_data import Stage1Dataset
from adapters.torch.stage1_metrics import TokenTypeMetricSettings
from domain.coord_tokens import CoordIdTable
from domain.errors import BestEffortDiagnostics, SetupError
from domain.objects import CoordMode, FieldOrder
from domain.token_types import DatasetFilter
from domain.training_samples import build_sources, gradient_accumulation_steps
from ports.metrics import MetricSink
from ports.tokenizer import SampleEncoderPort
from ports.training import SplitData, TokenTypeSettings, TrainingJob, TrainingOutcome


#: Rows per chunk of the loss-from-hidden path: 64 MiB of fp32 logits rows (bench/bench_coord_loss_hidden.py: at
#: 16-32 MiB the recomputed chunk matmuls cost 1.5-1.8x the logits path's time, at 64 MiB 1.1-1.5x).
HIDDEN_CHUNK_BYTES = 64 * 1024 * 1024


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("USE_HF", "1")
    os.environ.setdefault("MODELSCOPE_OFFLINE", "1")


def _torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _dataset(split: SplitData, encoder: SampleEncoderPort, job: TrainingJob) -> Stage1Dataset:
    sources = build_sources(split.records, [str(p) for p in split.images])
    return Stage1Dataset(sources, split.plan.units, encoder, job.samples)


@attrs.define
class SwiftStage1Engine:
    """The TrainingEngine for ``objective.trainer_variant: stage1``.

    ``open_encoder`` gives a checkpoint's sample encoder (shared with the use case's length pre-pass, so the
    processor loads once); ``callbacks`` are extra transformers ``TrainerCallback`` objects (diagnostics,
    conformance tests); ``probe_meter`` measures the largest-pack-first probe (tests inject one).
    """

    open_encoder: Callable[[Path], SampleEncoderPort] = attrs.field(factory=sample_encoder_loader)
    callbacks: Sequence[Any] = ()
    probe_meter: MeterFactory = device_meter

    def run(self, job: TrainingJob, metric_sink: MetricSink) -> TrainingOutcome:
        _offline_env()
        from swift import Seq2SeqTrainingArguments, get_model_processor, get_template

        from adapters.swift.console import SWIFT_LOG_FILENAME, route_swift_logs
        from adapters.swift.stage1_trainer import CoordExpStage1Trainer

        training = job.trainer
        objective = job.objective
        torch.manual_seed(job.seed)
        rank = int(os.environ.get("RANK", "0"))
        route_swift_logs(job.run_dir / SWIFT_LOG_FILENAME if rank == 0 else None)
        # The trainer's arguments create the process group under a launcher; a group made by our caller stays.
        group_was_ours = not _distributed_ready()

        encoder = self.open_encoder(job.model_path)
        coord_table = encoder.tokenizer.coord_ids
        train_ds = _dataset(job.train, encoder, job)
        eval_ds = _dataset(job.val, encoder, job) if job.val is not None else None

        attn = job.model.attn_implementation
        model, processor = get_model_processor(
            str(job.model_path),
            torch_dtype=_torch_dtype(job.model.dtype),
            model_type="qwen3_vl",
            use_hf=True,
            download_model=False,
            attn_impl=None if attn == "auto" else attn,
        )
        check_processor(processor, job.model_path)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        coord_table.check_vocab_size(vocab)
        template = get_template(processor, template_type="qwen3_vl", max_length=training.max_length)
        # ms-swift's Qwen-VL template carries Qwen's real image/video ids; ours come from the processor.
        template.image_token_id = int(processor.image_token_id)
        template.video_token_id = int(getattr(processor, "video_token_id", processor.image_token_id))
        template.set_mode("train")
        template.model = model
        freeze(model, training)
        setup_coord_offsets(model, coord_table, training)  # no-op unless training.coord_offset.enabled
        if training.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if training.lora.enabled:
            model = apply_lora(model, training.lora, coord_offsets=training.coord_offset.enabled,
                               frozen=frozen_parts(training))

        loss_settings = objective.coord_loss
        tokens_mode = job.samples.coord_mode is CoordMode.TOKENS
        typer = None
        type_settings = None
        if objective.token_types is not None:
            tt = objective.token_types
            typer = token_typer(processor.tokenizer, encoder, coord_table, job.samples.field_order,
                                job.samples.coord_mode, tt)
            type_settings = TokenTypeMetricSettings(
                log_top5=tt.log_top5,
                coord_monitor_mass=tt.coord_monitor_mass,
                coord_monitor_mass_max_tokens=tt.coord_monitor_mass_max_tokens,
                temperature=float(loss_settings.temperature),
                tokens_mode=tokens_mode,
            )
        monitor = objective.instability
        collator = ProjectCollator(
            pad_id=encoder.tokenizer.pad_id,
            rope_index=model_rope_index(model),
            token_typer=typer,
            # the non-finite error names every sample of the window (§6.3); the monitor may cap its own meta
            max_meta_samples=int(monitor.max_meta_samples) if monitor is not None else 0,
        )
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        max_steps = int(training.max_steps) if training.max_steps else -1
        diagnostics = BestEffortDiagnostics()
        runner = None
        if monitor is not None:
            runner = InstabilityRunner(
                monitor,
                dump_dir=objective.instability_dump_dir,
                rank=rank,
                world_size=world_size,
                diagnostics=diagnostics,
            )
        per_device_train = 1 if training.packing else training.per_device_train_batch_size
        args = Seq2SeqTrainingArguments(
            output_dir=str(job.run_dir),
            max_steps=max_steps,
            num_train_epochs=float(training.num_train_epochs),
            per_device_train_batch_size=per_device_train,
            per_device_eval_batch_size=1 if training.eval_packing else training.per_device_eval_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps(
                training.gradient_accumulation_steps, training.effective_batch_size, per_device_train, world_size
            ),
            learning_rate=training.learning_rate,
            weight_decay=training.weight_decay,
            lr_scheduler_type=training.lr_scheduler_type,
            warmup_ratio=training.warmup_ratio,
            max_grad_norm=training.max_grad_norm,
            logging_steps=training.logging_steps,
            eval_strategy=training.eval_strategy if eval_ds is not None else "no",
            eval_steps=training.eval_steps,
            save_strategy=training.save_strategy,
            save_steps=training.save_steps,
            save_total_limit=None,  # rotation is ours: it only ever counts complete checkpoints
            save_only_model=training.save_only_model,
            metric_for_best_model=training.metric_for_best_model,
            greater_is_better=training.greater_is_better,
            load_best_model_at_end=False,
            report_to=list(training.report_to),
            seed=job.seed,
            data_seed=job.seed,
            dataloader_num_workers=training.dataloader_num_workers,
            dataloader_drop_last=training.dataloader_drop_last,
            remove_unused_columns=False,
            label_names=["labels"],
            prediction_loss_only=True,
            average_tokens_across_devices=True,
            bf16=job.model.dtype == "bfloat16" and torch.cuda.is_available(),
            fp16=job.model.dtype == "float16" and torch.cuda.is_available(),
            deepspeed=_checked_deepspeed(training.deepspeed),
            gradient_checkpointing=training.gradient_checkpointing,
            disable_tqdm=False,
            check_model=False,
            use_cpu=not torch.cuda.is_available(),
            use_logits_to_keep=False,
        )
        hidden = hidden_source(model, training.loss_from_hidden)
        runtime = Stage1Runtime(
            coord_table=coord_table,
            # the hidden path recomputes h @ W.T per chunk: bigger chunks keep its matmuls efficient (issue 14 bench)
            kernel=CoordLossKernel(
                coord_table, loss_settings, chunk_bytes=HIDDEN_CHUNK_BYTES if hidden is not None else DEFAULT_CHUNK_BYTES
            ),
            collator=collator,
            coord_mask=torch.as_tensor(coord_table.mask(vocab)),
            run_dir=job.run_dir,
            max_steps=max_steps,
            sink=metric_sink,
            resolved_config_path=job.resolved_config_path,
            processor=processor,
            world_size=world_size,
            token_types=type_settings,
            monitor=runner,
            grad_steps=int(args.gradient_accumulation_steps),
            save_total_limit=training.save_total_limit,
            best_metric_key=training.metric_for_best_model,
            configured_lr=float(training.learning_rate),
            diagnostics=diagnostics,
        )
        runtime.hidden = hidden
        trainer = CoordExpStage1Trainer(
            model=model,
            args=args,
            template=template,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            coordexp=runtime,
        )
        for callback in self.callbacks:
            trainer.add_callback(callback)
        groups = coord_offset_param_groups(model, training, optimizer_groups(model, training))
        trainer.optimizer = torch.optim.AdamW(groups, lr=training.learning_rate)
        # One forward + backward on the plan's longest unit before step 1 (training.probe_largest_pack).
        probe_largest_unit(trainer, job, train_ds, meter=self.probe_meter, rank=rank, world_size=world_size)
        resume = str(job.resume_from) if job.resume_from is not None else None
        trainer.train(resume_from_checkpoint=resume)
        checkpoints = complete_checkpoints(job.run_dir)
        if group_was_ours and _distributed_ready():
            # Not on the error path (a rank that raised would leave the others waiting in the barrier).
            release_process_group(trainer)
        return TrainingOutcome(
            global_step=int(trainer.state.global_step),
            step_losses=tuple(runtime.step_losses),
            last_checkpoint=checkpoints[-1] if checkpoints else None,
        )


def hidden_source(model: Any, setting: bool | None) -> FinalHiddenStates | None:
    """``training.loss_from_hidden`` resolved against the loaded model (issue 14): the final-norm hook and head
    the loss reads instead of ``[B, L, V]`` logits, or None for the logits path. ``null`` (the default) takes
    the hidden path whenever the model exposes both; ``true`` requires it; ``false`` never takes it."""
    if setting is False:
        print("loss: from logits (training.loss_from_hidden: false)")
        return None
    source = FinalHiddenStates.find(model)
    if source is None:
        if setting is True:
            raise SetupError(
                "training.loss_from_hidden: true, but the model exposes no final norm and bias-free output embedding "
                "to compute the loss from; set it to null (auto) or false"
            )
        print("loss: from logits (the model exposes no final hidden states and output embedding)")
        return None
    print("loss: from the final hidden states and the output embedding, chunk by chunk (no full-vocabulary logits)")
    return source


def _distributed_ready() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def release_process_group(trainer: Any) -> None:
    """After a finished run on every rank: barrier, then destroy the process group the trainer created.

    Left alive, gloo's worker threads can still hold tensors while the interpreter finalises, and a run
    that finished aborts at exit (SIGABRT, "terminate called without an active exception"), so torchrun
    reports the rank as failed. ``end_training`` is accelerate's public way to destroy the group.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def token_typer(
    hf_tokenizer: Any,
    encoder: SampleEncoderPort,
    coord_table: CoordIdTable,
    field_order: FieldOrder,
    coord_mode: CoordMode,
    settings: TokenTypeSettings,
) -> TargetTokenTyper:
    """The collator's token typer (stage1.md §2): the supervised part of the template's assistant-turn end
    (through ``<|im_end|>``) is the FORMAT suffix; ``include`` / ``exclude`` filter by dataset label."""
    terminator = [int(i) for i in encoder.terminator_ids]
    im_end = int(encoder.tokenizer.im_end_id)
    supervised = terminator[: terminator.index(im_end) + 1]
    return TargetTokenTyper.from_hf_tokenizer(
        hf_tokenizer,
        coord_ids=[int(i) for i in coord_table.ids],
        field_order=field_order,
        coord_mode=coord_mode,
        dataset_filter=DatasetFilter(include=settings.include, exclude=settings.exclude),
        suffix=tuple(hf_tokenizer.convert_ids_to_tokens(supervised)),
    )


def _checked_deepspeed(path: Path | None) -> str | None:
    """A DeepSpeed JSON whose ``gradient_accumulation_steps`` is ``auto`` (the trainer's), else a setup error.

    Any other value would let DeepSpeed scale the loss by its own accumulation count (stage1.md §1.6).
    """
    if path is None:
        return None
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SetupError(f"training.deepspeed: cannot read {path}: {exc}") from exc
    value = document.get("gradient_accumulation_steps", "auto") if isinstance(document, dict) else None
    if value != "auto":
        raise SetupError(
            f"training.deepspeed: {path} sets gradient_accumulation_steps = {value!r}; write \"auto\" so the "
            "trainer owns accumulation and DeepSpeed never rescales the loss (stage1.md §1.6)"
        )
    return str(path)


