"""Stage 1's largest-pack-first probe (issue 14 item 4; docs/training.md "Largest-pack-first probe").

Called by the engine after the trainer and its optimizer exist and before ``trainer.train``: picks the longest
unit of the train plan (:func:`adapters.torch.memory_probe.longest_unit`), builds its batch with the run's own
dataset and (a copy of) its collator, and runs one forward + backward through the trainer's own
``compute_loss`` (so whichever loss path the trainer takes, logits or hidden states, is what is measured).

Isolation: ``compute_loss`` runs against a copy of the runtime (``attrs.evolve``) with fresh metric
accumulators and diagnostics, no instability monitor (so no stop-flag collective, no monitor state and no
dump) and a sink that refuses events; the trainer's window counts are set to this batch's and put back. The
generic :func:`adapters.torch.memory_probe.probe_step` restores RNG states, gradients and module modes.

Distributed: every rank probes the same, globally longest unit (the plan is identical on every rank) on
its own device, on the not yet DDP-wrapped model, with no collective call. A rank whose probe fails raises
before its first collective; under torchrun the agent then stops the other ranks (a launcher that does not
would leave them waiting in their first collective until the process group's timeout).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from adapters.storage.atomic import write_text_atomically
from adapters.swift.stage1_runtime import window_counts
from adapters.torch.memory_probe import (
    LossFn,
    MemoryMeter,
    ProbeReport,
    ProbeUnit,
    adam_state_bytes,
    device_meter,
    longest_unit,
    probe_step,
)
from domain.errors import BestEffortDiagnostics, StepError
from ports.training import TrainerSettings, TrainingJob

PROBE_FILENAME = "probe.json"

MeterFactory = Callable[[torch.device, "float | None"], MemoryMeter]


class _RefusingSink:
    """The probe logs nothing: an event reaching this sink is a bug."""

    def log(self, event: Mapping[str, Any]) -> None:
        raise StepError(f"the largest-pack probe tried to log {sorted(event)}")

    def close(self) -> None:
        return None


def stage1_suggestions(training: TrainerSettings, unit: ProbeUnit) -> list[str]:
    """What can make the longest unit fit, for this configuration."""
    out = [f"lower training.max_length (now {training.max_length}; it bounds every sample"
           + (" and every pack" if training.packing else "") + ")"]
    if training.packing:
        out.append("training.packing: false (one sample per micro-batch instead of packs of up to max_length)")
    elif training.per_device_train_batch_size > 1:
        out.append(
            f"lower training.per_device_train_batch_size (now {training.per_device_train_batch_size}) and raise "
            "training.gradient_accumulation_steps to keep the effective batch"
        )
    if training.loss_from_hidden is not True:
        out.append("training.loss_from_hidden: true (the loss never builds [B, L, V] logits)")
    if not training.gradient_checkpointing:
        out.append("training.gradient_checkpointing: true")
    if not training.lora.enabled:
        out.append("training.lora.enabled: true (gradients and optimizer state of the adapters only)")
    out.append("training.probe_memory_limit_gb to set another budget, training.probe_largest_pack: false to skip")
    return out


def _runtime_copy(runtime: Any) -> Any:
    """The trainer's runtime with fresh accumulators and diagnostics, no monitor and a refusing sink."""
    wanted: dict[str, Any] = {
        "sink": _RefusingSink(),
        "monitor": None,
        "diagnostics": BestEffortDiagnostics(),
        "failed_enrichers": set(),
        "step_losses": [],
        "spy_backward_input": None,
    }
    aliases = {f.alias for f in attrs.fields(type(runtime)) if f.init}
    return attrs.evolve(runtime, **{k: v for k, v in wanted.items() if k in aliases})


def trainer_loss(trainer: Any) -> LossFn:
    """The trainer's own ``compute_loss`` (under its ``compute_loss_context_manager``, as ``training_step``
    calls it), isolated from the run's metrics, monitor and logging (see the module docstring)."""

    def loss(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        runtime = trainer.coordexp
        had_window = hasattr(trainer, "_window")
        window = getattr(trainer, "_window", None)
        counts = window_counts([inputs], runtime.coord_mask)  # before compute_loss pops the labels
        trainer.coordexp = _runtime_copy(runtime)
        if had_window:
            trainer._window = counts
        try:
            with trainer.compute_loss_context_manager():
                value: torch.Tensor = trainer.compute_loss(model, inputs)
            return value
        finally:
            trainer.coordexp = runtime
            if had_window:
                trainer._window = window

    return loss


def probe_largest_unit(
    trainer: Any,
    job: TrainingJob,
    dataset: Any,
    *,
    meter: MeterFactory = device_meter,
    rank: int = 0,
    world_size: int = 1,
    echo: Callable[[str], None] = print,
) -> ProbeReport | None:
    """Stage 1's probe (``training.probe_largest_pack``): None when off or under DeepSpeed (the engine only
    places the model when training starts); else the report, printed and written to ``probe.json`` on rank 0.
    Raises ``SetupError`` naming the unit's samples when it does not fit."""
    training = job.trainer
    if not training.probe_largest_pack:
        return None
    if training.deepspeed is not None:
        echo("probe: skipped under training.deepspeed (DeepSpeed places the model when training starts)")
        return None
    split = job.train
    ids = [f"{r.source}:{r.line}" for r in split.records]
    batch_size = 1 if training.packing else training.per_device_train_batch_size
    unit = longest_unit(split.plan.units, split.plan.lengths, ids, batch_size=batch_size)
    raw: Sequence[Any] = [dataset[unit.unit_index]] if unit.unit_index is not None else [dataset[i] for i in unit.indices]
    collator = trainer.coordexp.collator
    if attrs.has(type(collator)):  # a copy: the probe must not count typing failures or disable an enricher
        collator = attrs.evolve(collator, diagnostics=BestEffortDiagnostics(), typing_failures=0)
    batch = collator(raw)
    extra = adam_state_bytes(getattr(trainer, "optimizer", None))
    if world_size > 1:  # DDP's gradient buckets (a copy of the trainable gradients) come with the wrapper
        extra += sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    report = probe_step(
        trainer.model,
        batch,
        trainer_loss(trainer),
        unit=unit,
        meter=meter(torch.device(trainer.args.device), training.probe_memory_limit_gb),
        extra_bytes=extra,
        suggestions=stage1_suggestions(training, unit),
        device=torch.device(trainer.args.device),
    )
    echo(report.line() if world_size == 1 else f"[rank {rank}] {report.line()}")
    if rank == 0:
        write_text_atomically(job.run_dir / PROBE_FILENAME, json.dumps(report.as_json(), indent=2) + "\n")
    return report
