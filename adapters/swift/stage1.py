"""Stage-1 training through ms-swift's trainer (D12; stage1.md §1.6).

ms-swift's ``Seq2SeqTrainer`` (a transformers ``Trainer``) runs the loop, the optimizer, checkpoints,
DDP / DeepSpeed and logging callbacks. This adapter supplies the dataset (our encoder, our pack plan),
the collator (extras beside the batch), the loss (our kernel, our normalisation R1-R7) and the callbacks
(one ``logging.jsonl`` writer, TensorBoard, checkpoint completion markers). No upstream file is patched;
the engine knobs of stage1.md §1.6 are set and asserted at startup.

Diagnostics (stage1.md §3, §5, §6.4): every metric family of a micro-batch runs as a named best-effort
diagnostic (``Stage1Runtime.metric_updates``), the token/type family and coord monitors come from
``adapters.torch.stage1_metrics``, and the instability monitor (``adapters.torch.instability``) runs after
the metrics on every train and eval micro-batch; its guard may replace λ and its stop flag is agreed
across ranks at every training micro-step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
import torch

from adapters.hf.checkpoint import check_processor, load_processor
from adapters.hf.coord_offsets import (
    attach_coord_offset_hooks,
    coord_offset_param_groups,
    setup_coord_offsets,
)
from adapters.hf.encoding import HFSampleEncoder
from adapters.hf.tokenizer import HFTokenizer
from adapters.storage.atomic import give_umask_modes
from adapters.storage.atomic import write_text_atomically as atomic_write_text
from adapters.storage.checkpoints import complete_checkpoints, write_completion_marker
from adapters.torch.collator import (
    ProjectCollator,
    TargetTokenTyper,
    TrainItem,
    check_packed_inputs,
    model_rope_index,
)
from adapters.torch.coord_loss import CoordLossKernel, CoordLossResult, lambda_for_backward
from adapters.torch.instability import NO_DECISION, InstabilityRunner, learning_rate_of
from adapters.torch.stage1_metrics import (
    TokenTypeMetricSettings,
    coord_monitor_updates,
    token_type_metric_updates,
)
from adapters.torch.step_context import StepContext, pop_step_context
from domain.batch_extras import INSTABILITY_META_JSON, TOKEN_TYPES
from domain.coord_tokens import CoordIdTable, vocabulary_additions
from domain.coordjson import render
from domain.errors import BestEffortDiagnostics, SetupError, StepError
from domain.instability import (
    EarlyStopSettings,
    GuardSettings,
    InstabilitySettings,
    MonitorDecision,
    default_dump_dir,
)
from domain.losses import CoordLossSettings, MicroBatchSums, objective_metric_updates
from domain.metrics_registry import (
    DIAGNOSTIC_NAMES,
    REGISTRY,
    MetricAccumulator,
    MetricLayout,
    MetricUpdate,
    Mode,
)
from domain.objects import CoordMode, DetObject, Ordering
from domain.ordering import shuffled_objects
from domain.packing import (
    PackingSettings,
    PackPlan,
    PlanFingerprint,
    cached_or_planned,
    plan_cache_text,
    plan_packs,
)
from domain.prompts import PromptTexts, build_prompt
from domain.records import Record
from domain.token_types import DatasetFilter
from ports.metrics import MetricSink
from ports.tokenizer import ChatSample, SampleOrigin
from ports.training import PreparedTraining, TrainingJob, TrainingOutcome, UnitPlan

PLAN_CACHE_FILE = "pack_plan_cache.json"
PLAN_REPORT_FILE = "pack_plan.json"
BOOKKEEPING_KEYS = ("global_step", "max_steps", "epoch", "time", "elapsed_s")
# The trainer's end-of-training summary is not a metric event (it restates the run, not a window).
_SUMMARY_KEYS = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}
)
# Keys the transformers loop logs on its own that the registry names under its own spelling.
_ENGINE_KEYS = frozenset({"loss", "grad_norm", "learning_rate", "epoch"})


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("USE_HF", "1")
    os.environ.setdefault("MODELSCOPE_OFFLINE", "1")


# -------------------------------------------------------------------------------------------------
# Dataset


@attrs.frozen
class SampleSource:
    """What one training sample is made of before encoding."""

    record: Record
    record_index: int
    image_path: str


class Stage1Dataset(torch.utils.data.Dataset[Any]):
    """Items are single samples (padded batches) or packs (lists of samples, one per micro-batch).

    ``ordering: random`` shuffles objects per (run.seed, epoch, record_index); the epoch travels in the
    item index (``index = epoch * len + i``) so it survives dataloader worker processes (data.md §2.5).
    """

    def __init__(
        self,
        sources: Sequence[SampleSource],
        units: Sequence[Sequence[int]] | None,
        encoder: HFSampleEncoder,
        prompt: PromptTexts,
        config: Any,
    ) -> None:
        self.sources = list(sources)
        self.units = [list(u) for u in units] if units is not None else None
        self.encoder = encoder
        self.prompt = prompt
        self.field_order = config.data.field_order
        self.coord_mode = config.data.coord_mode
        self.ordering = config.data.ordering
        self.seed = int(config.run.seed)

    def __len__(self) -> int:
        return len(self.units) if self.units is not None else len(self.sources)

    def objects_for(self, i: int, epoch: int) -> tuple[DetObject, ...]:
        src = self.sources[i]
        if self.ordering is Ordering.RANDOM:
            return tuple(shuffled_objects(src.record.objects, self.seed, epoch, src.record_index))
        return src.record.objects

    def item(self, i: int, epoch: int) -> TrainItem:
        src = self.sources[i]
        objects = self.objects_for(i, epoch)
        chat = ChatSample(
            prompt=self.prompt,
            image_path=src.image_path,
            width=src.record.width,
            height=src.record.height,
            target=render(objects, self.field_order, self.coord_mode),
            origin=SampleOrigin(source=src.record.source, line=src.record.line, record_index=src.record_index),
        )
        return TrainItem(self.encoder.encode_sample(chat), objects)

    def __getitem__(self, index: int) -> Any:
        epoch, unit = divmod(int(index), len(self))
        if self.units is None:
            return self.item(unit, epoch)
        return [self.item(i, epoch) for i in self.units[unit]]


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochIndexBatchSampler:
    """The train batch sampler: per-epoch seeded shuffle, rank sharding, and indices that carry the epoch.

    - Index ``epoch * num_items + i`` (data.md §2.5): the epoch reaches the dataset inside workers too.
    - Every item is trained every epoch: the shuffled order is padded to a multiple of W by repeating its
      first items (at most W - 1 repeats, data.md §8.2.7), never truncated, then strided over the ranks.
    - A pure function of (seed, epoch, rank, W), so a resumed run replays the same batches; ``epoch`` is what
      ms-swift reads back when it rebuilds the loader to skip already-trained batches.
    """

    def __init__(
        self, num_items: int, *, batch_size: int, drop_last: bool, seed: int,
        rank: int | None = None, world_size: int | None = None,
    ) -> None:
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0
        self._rank, self._world = rank, world_size

    def _rank_world(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return _dist_rank_world()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_indices(self) -> list[int]:
        rank, world = self._rank_world()
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        padded = -(-self.num_items // world) * world
        order = [order[k % self.num_items] for k in range(padded)]
        return order[rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        base = self.epoch * self.num_items
        indices = [base + i for i in self.rank_indices()]
        for k in range(0, len(indices), self.batch_size):
            batch = indices[k:k + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch

    def __len__(self) -> int:
        _, world = self._rank_world()
        per_rank = -(-self.num_items // world)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)


def epoch_index_batch_sampler(num_items: int, *, batch_size: int, drop_last: bool, seed: int) -> EpochIndexBatchSampler:
    return EpochIndexBatchSampler(num_items, batch_size=batch_size, drop_last=drop_last, seed=seed)


def eval_index_batches(num_items: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Eval batches of one rank: every item exactly once over all ranks (rank-strided), never dropped; ranks
    with fewer items get placeholder index ``-1`` batches so every rank runs the same number of forwards."""
    per_rank = -(-num_items // world)
    mine = list(range(rank, num_items, world))
    mine += [-1] * (per_rank - len(mine))
    return [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]


class EvalPaddedDataset(torch.utils.data.Dataset[Any]):
    """Index ``-1`` is item 0 with every label ``-100``: it runs a forward but adds nothing to eval sums/counts."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index >= 0:
            return self.dataset[index]
        item = self.dataset[0]
        return [_masked(m) for m in item] if isinstance(item, list) else _masked(item)


def _masked(item: TrainItem) -> TrainItem:
    import numpy as np

    labels = np.full_like(np.asarray(item.sample.labels), -100)
    return TrainItem(attrs.evolve(item.sample, labels=labels), item.objects)


def _chat_sample(src: SampleSource, prompt: PromptTexts, objects: Sequence[DetObject], config: Any) -> ChatSample:
    return ChatSample(
        prompt=prompt,
        image_path=src.image_path,
        width=src.record.width,
        height=src.record.height,
        target=render(objects, config.data.field_order, config.data.coord_mode),
        origin=SampleOrigin(source=src.record.source, line=src.record.line, record_index=src.record_index),
    )


def training_prompt(config: Any) -> PromptTexts:
    """The Stage-1 prompt texts of ``config`` (its ``prompt`` and ``data`` blocks)."""
    return build_prompt(
        config.prompt.variant,
        config.data.coord_mode,
        config.data.ordering,
        config.data.field_order,
        system_override=config.prompt.system,
        user_override=config.prompt.user,
    )


def training_samples(sources: Sequence[SampleSource], prompt: PromptTexts, config: Any) -> list[ChatSample]:
    """The conversations the length pre-pass measures (objects in record order, data.md §6.5).

    The one place the pre-pass builds them: :func:`plan_units` (training) and ``validate_dataset``
    (through ``application.wiring.make_sample_lengths``) both measure these.
    """
    return [_chat_sample(s, prompt, s.record.objects, config) for s in sources]


def build_sources(records: Sequence[Record], images: Sequence[Path]) -> list[SampleSource]:
    if len(records) != len(images):
        raise SetupError(f"{len(records)} records but {len(images)} image paths")
    return [SampleSource(record=r, record_index=i, image_path=str(p)) for i, (r, p) in enumerate(zip(records, images))]


def plan_cache_text_for(plan: UnitPlan) -> str | None:
    if plan.plan is None or plan.fingerprint is None:
        return None
    return plan_cache_text(plan.plan, plan.fingerprint, plan.lengths)


def plan_units(
    sources: Sequence[SampleSource],
    encoder: HFSampleEncoder,
    prompt: PromptTexts,
    config: Any,
    *,
    packing: bool,
    drop_last: bool,
    fingerprint_inputs: tuple[str, str] | None = None,
    cache_text: str | None = None,
) -> UnitPlan:
    """Lengths without decoding images (data.md §6.5; over-long samples raise) and the static pack plan (§8.2).

    ``fingerprint_inputs`` = (JSONL sha256, tokenizer+template sha256) enables the plan cache: a cached plan
    with the same fingerprint and lengths is reused, anything else is rebuilt.
    """
    training = config.training
    samples = training_samples(sources, prompt, config)
    lengths = tuple(encoder.checked_lengths(samples, training.max_length))
    if not packing:
        return UnitPlan(None, lengths)
    settings = PackingSettings(
        max_length=training.max_length,
        packing_buffer=training.packing_buffer,
        packing_min_fill_ratio=training.packing_min_fill_ratio,
        packing_drop_last=drop_last,
    )
    locations = [f"{s.record.source}:{s.record.line}" for s in sources]
    if fingerprint_inputs is None:
        plan = plan_packs(lengths, settings, seed=int(config.run.seed), locations=locations)
        return UnitPlan(tuple(p.members for p in plan.packs), lengths, plan)
    fingerprint = PlanFingerprint(
        jsonl_sha256=fingerprint_inputs[0],
        tokenizer_sha256=fingerprint_inputs[1],
        prompt_texts=cast(Any, (prompt.system, prompt.user)),
        coord_mode=str(config.data.coord_mode.value),
        field_order=str(config.data.field_order.value),
        settings=settings,
        seed=int(config.run.seed),
    )
    plan, reused = cached_or_planned(cache_text, fingerprint, lengths, locations=locations)
    return UnitPlan(tuple(p.members for p in plan.packs), lengths, plan, reused, fingerprint)


def plan_report(plan: PackPlan, sources: Sequence[SampleSource], *, reused: bool) -> dict[str, Any]:
    """The plan report of data.md §8.2.8: statistics plus the samples a drop-last plan left out."""
    stats = plan.stats()
    return {
        "schema_version": 1,
        "packs": stats.packs,
        "samples": stats.samples,
        "mean_fill": stats.mean_fill,
        "min_fill": stats.min_fill,
        "dropped_samples": stats.dropped_samples,
        "dropped": [f"{sources[i].record.source}:{sources[i].record.line}" for i in plan.dropped],
        "capacity": plan.capacity,
        "reused_cache": reused,
    }


def _sha256_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode("utf-8"))
        digest.update(path.read_bytes() if path.is_file() else b"<absent>")
    return digest.hexdigest()


def tokenizer_fingerprint(model_path: Path) -> str:
    """Hash of the tokenizer and chat-template files of a checkpoint (the plan depends on them)."""
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
             "special_tokens_map.json", "added_tokens.json")
    return _sha256_files([Path(model_path) / n for n in names])


# -------------------------------------------------------------------------------------------------
# Window pre-pass (R6)


def _is_packed(ctx: StepContext, inputs: Mapping[str, Any]) -> bool:
    counts = ctx.pack_num_samples
    return counts is not None and int(inputs["input_ids"].shape[0]) == 1 and int(counts.sum()) > 1


def window_counts(batches: Sequence[Mapping[str, Any]], coord_mask: torch.Tensor) -> torch.Tensor:
    """``[N_step, C_step, T_step]`` over the window's labels, before any forward (stage1.md R6)."""
    n = c = t = 0
    for batch in batches:
        labels = batch["labels"]
        targets = labels[:, 1:]
        supervised = targets != -100
        safe = targets.clamp_min(0)
        is_coord = coord_mask.to(labels.device)[safe] & supervised
        t += int(supervised.sum())
        c += int(is_coord.sum())
    n = t - c
    return torch.tensor([n, c, t], dtype=torch.float64)


def window_sample_ids(batches: Sequence[Mapping[str, Any]]) -> list[str]:
    ids: list[str] = []
    for batch in batches:
        meta = batch.get("instability_meta_json")
        if isinstance(meta, str):
            for row in json.loads(meta):
                ids.extend(f"{s['source']}:{s['line']}" for s in row.get("samples", []))
    return ids


# -------------------------------------------------------------------------------------------------
# Trainer


def _make_trainer_class() -> type:
    from swift import Seq2SeqTrainer
    from swift.trainers.patcher import PrinterCallbackNew, ProgressCallbackNew
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class CoordExpStage1Trainer(Seq2SeqTrainer):  # type: ignore[misc, valid-type]
        """ms-swift's trainer with the project's collator, loss, normalisation and logging."""

        def __init__(self, *args: Any, coordexp: Stage1Runtime, **kwargs: Any) -> None:
            self.coordexp = coordexp
            super().__init__(*args, **kwargs)
            # One logging.jsonl writer (ours): drop ms-swift's writers, keep a plain progress bar.
            self.remove_callback(ProgressCallbackNew)
            self.remove_callback(PrinterCallbackNew)
            self.add_callback(PrinterCallback if self.args.disable_tqdm else ProgressCallback)
            self._window = torch.zeros(3, dtype=torch.float64)
            self._window_ids: list[str] = []
            self._window_len = 0
            self.coordexp.check_engine(self)

        def _get_data_collator(self, args: Any, template: Any) -> Any:
            return self.coordexp.collator

        def get_train_dataloader(self, skip_batches: int = 0) -> Any:
            """ms-swift's map-style train loader, with a batch sampler whose indices carry the epoch."""
            from functools import partial

            from accelerate.data_loader import SkipBatchSampler
            from swift.dataloader import DataLoaderShard
            from transformers.trainer_utils import seed_worker

            args = self.args
            batch_sampler: Any = epoch_index_batch_sampler(
                len(self.train_dataset), batch_size=self._train_batch_size,
                drop_last=args.dataloader_drop_last, seed=int(args.data_seed if args.data_seed is not None else args.seed),
            )
            if skip_batches > 0:
                batch_sampler = SkipBatchSampler(batch_sampler, skip_batches=skip_batches)
            params: dict[str, Any] = {
                "collate_fn": self.data_collator,
                "num_workers": args.dataloader_num_workers,
                "pin_memory": args.dataloader_pin_memory,
                "persistent_workers": args.dataloader_persistent_workers,
                "batch_sampler": batch_sampler,
                "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
            }
            if args.dataloader_num_workers > 0:
                params["prefetch_factor"] = args.dataloader_prefetch_factor
            return DataLoaderShard(self.train_dataset, device=self.accelerator.device, **params)

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            """Every eval item exactly once across ranks, never dropped (R5 over the whole eval set)."""
            dataset = self.eval_dataset if eval_dataset is None else eval_dataset
            rank, world = _dist_rank_world()
            batches = eval_index_batches(len(dataset), int(self.args.per_device_eval_batch_size), rank, world)
            return torch.utils.data.DataLoader(
                EvalPaddedDataset(dataset), batch_sampler=batches, collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
            )

        # R6: counts over the whole window before its first forward, all-reduced once per step.
        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list[Any], Any]:
            batch_samples: list[Any] = []
            for _ in range(num_batches):
                try:
                    batch_samples.append(next(epoch_iterator))
                except StopIteration:
                    break
            counts = window_counts(batch_samples, self.coordexp.coord_mask)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                reduced = counts.to(self.args.device)
                torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
                counts = reduced.cpu()
            self._window = counts
            self._window_ids = window_sample_ids(batch_samples)
            self._window_len = len(batch_samples)
            # A non-None count keeps transformers from dividing the loss by the accumulation steps.
            return batch_samples, torch.tensor(int(counts[2]), device=device)

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            inputs.pop("compute_loss_func", None)
            ctx = pop_step_context(inputs)
            if "logits_to_keep" in inputs:
                raise StepError("logits_to_keep reached the model: Stage-1 needs full-length logits")
            if _is_packed(ctx, inputs):
                check_packed_inputs(inputs)  # 4-row positions, no mask, no cache (data.md §8.4)
            seq_len = int(inputs["input_ids"].shape[1])
            outputs = model(**inputs)
            if outputs.logits is not None and int(outputs.logits.shape[1]) != seq_len:
                raise StepError(
                    f"sliced logits: {list(outputs.logits.shape)} for input_ids of length {seq_len} "
                    f"at global_step={self.state.global_step}"
                )
            result = self.coordexp.loss(outputs.logits, ctx, self.state.global_step)
            training = bool(model.training)
            if training:
                n_step, c_step, t_step = (int(v) for v in self._window.tolist())
                if not result.distributional:
                    n_step = t_step
                lam = lambda_for_backward(result, n_step, c_step, self.coordexp.world_size)
            else:
                lam = result.sum_ce.detach() + result.sum_coord.detach()
            # §4.3 order: loss -> metric components -> instability monitor -> return λ (or the guard).
            self.coordexp.record_metrics(result, ctx, train=training, window_len=self._window_len)
            decision = self.coordexp.observe_instability(self, result, ctx, training=training)
            if decision.guard:
                lam = InstabilityRunner.guarded_loss(result)
            if training:
                self.coordexp.exchange_stop(self, decision)
                if not bool(torch.isfinite(lam.detach())):
                    raise StepError(
                        f"non-finite loss at global_step={self.state.global_step + 1} for samples "
                        f"{self._window_ids or self.coordexp.describe(ctx)}"
                    )
            return (lam, outputs) if return_outputs else lam

        def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            self.coordexp.spy_backward_input = None
            return super().training_step(model, inputs, *args, **kwargs)

        def _clip_grad_norm(self, model: Any) -> Any:
            """The pre-clip gradient norm; a non-finite one stops the run BEFORE the optimizer step (§6.3)."""
            grad_norm = super()._clip_grad_norm(model)
            if grad_norm is not None:
                value = float(grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm)
                if not math.isfinite(value):
                    raise StepError(
                        f"non-finite gradient norm at global_step={self.state.global_step + 1} for samples "
                        f"{self._window_ids}"
                    )
            return grad_norm

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if any(k in logs for k in _SUMMARY_KEYS):
                return super().log(logs, *args, **kwargs)
            is_eval = any(k.startswith("eval_") for k in logs)
            logs.update(self.coordexp.flush_metrics(train=not is_eval))
            super().log(logs, *args, **kwargs)
            self.coordexp.write_log_event(logs, self.state)

        def evaluate(
            self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
        ) -> dict[str, float]:
            """R5: eval_loss from sums and counts over the whole eval set (not a mean of batch means).

            Every eval metric family (objective, token/type, health) goes through the eval buffer and is
            merged, ``eval_``-prefixed, into the returned dict before it is logged and before best-model
            selection reads it; the instability monitor sees each eval micro-batch in eval mode.
            """
            import time

            from transformers.trainer_utils import speed_metrics

            start = time.time()
            dataloader = self.get_eval_dataloader(eval_dataset)
            model = self.model
            was_training = model.training
            model.eval()
            sums = torch.zeros(2, dtype=torch.float64)
            counts = torch.zeros(2, dtype=torch.float64)
            num_samples = num_batches = 0
            with torch.no_grad():
                for batch in dataloader:
                    batch = self._prepare_inputs(batch)
                    batch.pop("compute_loss_func", None)
                    ctx = pop_step_context(batch)
                    placeholder = ctx.labels is not None and not bool((ctx.labels != -100).any())
                    outputs = model(**batch)
                    if placeholder:  # a rank's padding batch: the forward keeps ranks in step, nothing counts
                        continue
                    num_samples += ctx.samples_in_batch()
                    num_batches += 1
                    result = self.coordexp.loss(outputs.logits, ctx, self.state.global_step)
                    self.coordexp.record_metrics(result, ctx, train=False)
                    decision = self.coordexp.observe_instability(self, result, ctx, training=False)
                    if not decision.guard:  # a guarded eval batch (guard.in_eval) leaves sums and counts alike
                        sums += torch.tensor([float(result.sum_ce), float(result.sum_coord)], dtype=torch.float64)
                        counts += torch.tensor([result.ce_count, result.num_coord], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                both = torch.cat([sums, counts]).to(self.args.device)
                torch.distributed.all_reduce(both)
                sums, counts = both[:2].cpu(), both[2:].cpu()
            eval_loss = float(sums[0] / max(1.0, float(counts[0])) + sums[1] / max(1.0, float(counts[1])))
            metrics = {f"{metric_key_prefix}_loss": eval_loss}
            metrics.update(self.coordexp.flush_metrics(train=False))
            metrics.update(speed_metrics(metric_key_prefix, start, num_samples=num_samples, num_steps=num_batches))
            if was_training:
                model.train()
            self.log(dict(metrics))
            handler: Any = self.callback_handler
            trainer: Any = self  # the transformers base class leaves ``control`` untyped
            trainer.control = handler.on_evaluate(self.args, self.state, trainer.control, metrics)
            return metrics

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if self.args.should_save and folder.is_dir():
                self.coordexp.complete_checkpoint(folder, self.state)

    return CoordExpStage1Trainer


# -------------------------------------------------------------------------------------------------
# Runtime: loss, metrics, logging, checkpoint completion


@attrs.define
class Stage1Runtime:
    """The project's parts the trainer calls into; kept out of the trainer class so they are testable."""

    coord_table: CoordIdTable
    kernel: CoordLossKernel
    collator: ProjectCollator
    coord_mask: torch.Tensor
    run_dir: Path
    max_steps: int
    sink: MetricSink
    resolved_config_path: Path
    processor: Any
    world_size: int = 1
    token_types: TokenTypeMetricSettings | None = None  # objective.token_type_metrics on
    monitor: InstabilityRunner | None = None  # objective.instability_monitor on
    grad_steps: int = 1  # configured G (accum/grad_steps)
    configured_lr: float = 0.0  # training.learning_rate (the monitor event's last fallback)
    save_total_limit: int | None = None
    best_metric_key: str | None = None
    diagnostics: BestEffortDiagnostics = attrs.field(factory=BestEffortDiagnostics)
    train_acc: MetricAccumulator = attrs.field(init=False)
    eval_acc: MetricAccumulator = attrs.field(init=False)
    step_losses: list[float] = attrs.field(factory=list)
    spy_backward_input: Any = None
    _start: float = attrs.field(factory=lambda: __import__("time").time())
    _failed_enrichers: set[str] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        self.train_acc = MetricAccumulator(MetricLayout.for_mode(Mode.TRAIN, "stage1"), Mode.TRAIN)
        self.eval_acc = MetricAccumulator(MetricLayout.for_mode(Mode.EVAL, "stage1"), Mode.EVAL)

    # --- startup checks of stage1.md §1.6
    def check_engine(self, trainer: Any) -> None:
        args = trainer.args
        if args.n_gpu > 1:
            raise SetupError(
                "args.n_gpu > 1 (single-process DataParallel) is unsupported: launch one process per GPU (torchrun)"
            )
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is False or (scaled is None and not trainer.model_accepts_loss_kwargs):
            raise SetupError("the trainer would divide the loss by gradient_accumulation_steps (stage1.md §1.6)")
        if not getattr(args, "average_tokens_across_devices", True):
            raise SetupError("average_tokens_across_devices must be true (stage1.md §1.6)")
        if args.remove_unused_columns:
            raise SetupError("remove_unused_columns must be false so batch extras reach compute_loss")
        if getattr(args, "use_logits_to_keep", None) is not False:
            raise SetupError("use_logits_to_keep must be false: Stage-1 needs full-length logits (stage1.md §1.6)")
        if getattr(args, "use_liger_kernel", False):
            raise SetupError("use_liger_kernel trims logits and is forbidden on Stage-1 (stage1.md §1.6)")

    def loss(self, logits: Any, ctx: StepContext, global_step: int) -> CoordLossResult:
        labels = ctx.labels
        if logits is None:
            raise StepError(
                f"Stage-1 loss failed at global_step={global_step}: the model returned no logits; "
                "refusing to train without coord supervision"
            )
        if labels is None or not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise StepError(f"Stage-1 loss failed at global_step={global_step}: labels missing or not [B, L]")
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape) or (
            logits.shape[2] < self.coord_table.max_id + 1
        ):
            raise StepError(
                f"Stage-1 loss failed at global_step={global_step}: logits {list(logits.shape)} do not cover "
                f"labels {list(labels.shape)} with every coord id (need [B, L, >= {self.coord_table.max_id + 1}]); "
                "sliced logits or a fused CE kernel are forbidden"
            )
        try:
            return self.kernel(logits, labels, coord_metrics=self.pure_ce_coord_metrics, logit_stats=self.monitor is not None)
        except StepError:
            raise
        except Exception as exc:
            raise StepError(
                f"Stage-1 loss failed at global_step={global_step}: {exc}; refusing to train without coord supervision"
            ) from exc

    def describe(self, ctx: StepContext) -> str:
        return ctx.instability_meta_json or "<unknown samples>"

    @property
    def pure_ce_coord_metrics(self) -> bool:
        """Pure-CE coord diagnostics (§3.2): coord loss off, token-type metrics on, tokens mode."""
        return (not self.kernel.settings.enabled) and self.token_types is not None and self.token_types.tokens_mode

    def record_metrics(
        self, result: CoordLossResult, ctx: StepContext, *, train: bool, window_len: int | None = None
    ) -> None:
        """Every metric family of one micro-batch into the train or eval buffer (§3.2, §6.4).

        Each family runs as a named best-effort diagnostic: a failure warns once, switches that family
        off and from then on emits ``health/diagnostic_disabled/<name>``; it never touches λ.
        """
        acc = self.train_acc if train else self.eval_acc
        acc.extend(self.metric_updates(result, ctx, train=train, window_len=window_len))

    def metric_updates(
        self, result: CoordLossResult, ctx: StepContext, *, train: bool, window_len: int | None = None
    ) -> list[MetricUpdate]:
        settings = self.kernel.settings
        run = self.diagnostics.run
        updates: list[MetricUpdate] = []

        def objective(prefixes: tuple[str, ...]) -> list[MetricUpdate]:
            sums = result.micro_batch_sums()
            block = result.coord_block_sums() if any(p.startswith(("coord_diag/", "stage1/")) for p in prefixes) else None
            return [
                u
                for u in objective_metric_updates(sums, block, settings, ctx.samples_in_batch())
                if u.key.startswith(prefixes)
            ]

        def add(name: str, produce: Any) -> None:
            got = run(name, produce)
            if got:
                updates.extend(got)

        add("runtime_metrics", lambda: self._runtime_updates(result.micro_batch_sums(), ctx, train, window_len))
        if settings.enabled:
            add("base_ce_metrics", lambda: objective(("base_ce/",)))
            add("coord_diag_metrics", lambda: objective(("coord_diag/", "stage1/")))
        elif result.coord_terms is not None:
            add("coord_diag_pure_ce", lambda: objective(("coord_diag/",)))
        tt = self.token_types
        if tt is not None:
            types = ctx.token_types()
            add("token_type_metrics", lambda: token_type_metric_updates(result, types, tt))
            if tt.tokens_mode:
                add(
                    "coord_monitor",
                    lambda: coord_monitor_updates(
                        result, types, self.coord_mask, self.kernel.coord_columns(result.logits.device), tt
                    ),
                )
        updates.extend(self.health_updates(ctx))
        return updates

    def _runtime_updates(
        self, sums: MicroBatchSums, ctx: StepContext, train: bool, window_len: int | None
    ) -> list[MetricUpdate]:
        out = [
            u
            for u in objective_metric_updates(sums, None, self.kernel.settings, ctx.samples_in_batch())
            if u.key in ("token_acc", "pack/num_samples")
        ]
        if train:
            out.append(MetricUpdate("accum/grad_steps", float(self.grad_steps), 1.0))
            if window_len:
                out.append(MetricUpdate("accum/current_grad_steps", float(window_len), 1.0))
        return out

    def disabled_diagnostics(self, ctx: StepContext | None = None) -> list[str]:
        """Names of the diagnostics switched off so far (runtime, monitor and collator enrichers).

        An enricher runs in the collator, possibly in a dataloader worker; its failure is seen here as
        its extra missing from a batch that should carry it (and, in-process, in the collator's record).
        """
        if ctx is not None:
            if self.token_types is not None and ctx.get(TOKEN_TYPES) is None:
                self._failed_enrichers.add("token_type_enricher")
            if self.collator.max_meta_samples is not None and ctx.get(INSTABILITY_META_JSON) is None:
                self._failed_enrichers.add("instability_meta_enricher")
        collator_names = {"token_types": "token_type_enricher", "instability_meta": "instability_meta_enricher"}
        for name in getattr(self.collator.diagnostics, "disabled", {}):
            if name in collator_names:
                self._failed_enrichers.add(collator_names[name])
        names = set(self.diagnostics.disabled) | self._failed_enrichers
        return [n for n in DIAGNOSTIC_NAMES if n in names]

    def health_updates(self, ctx: StepContext | None = None) -> list[MetricUpdate]:
        """``health/diagnostic_disabled/<name>`` = 1.0 (weight 1) for every disabled diagnostic (§3.2)."""
        return [MetricUpdate(f"health/diagnostic_disabled/{n}", 1.0, 1.0) for n in self.disabled_diagnostics(ctx)]

    # --- instability monitor (§5)
    def observe_instability(
        self, trainer: Any, result: CoordLossResult, ctx: StepContext, *, training: bool
    ) -> MonitorDecision:
        """Steps 1-5 of §5 on one micro-step; NO_DECISION when the monitor is off.

        The event's ``global_step`` is the optimizer step the micro-step belongs to in train
        (``state.global_step + 1``) and the step evaluated after in eval (``state.global_step``).
        """
        runner = self.monitor
        if runner is None:
            return NO_DECISION
        state = trainer.state
        return runner.observe(
            result,
            ctx.instability_meta_json,
            training=training,
            global_step=int(state.global_step) + (1 if training else 0),
            epoch=None if state.epoch is None else float(state.epoch),
            learning_rate=learning_rate_of(
                getattr(trainer, "optimizer", None), getattr(trainer, "lr_scheduler", None), self.configured_lr
            ),
        )

    def exchange_stop(self, trainer: Any, decision: MonitorDecision) -> None:
        """Step 8: the stop flag is agreed across ranks at every training micro-step, then applied once."""
        runner = self.monitor
        if runner is None:
            return
        if runner.exchange_stop(decision.stop_requested, trainer.args.device):
            runner.apply_stop(trainer.control)

    def flush_metrics(self, *, train: bool) -> dict[str, float]:
        acc = self.train_acc if train else self.eval_acc
        sum_vec, max_vec = acc.vectors()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank enters both collectives at every log event (stage1.md §3.1.3, §6.5).
            s_t, m_t = torch.as_tensor(sum_vec), torch.as_tensor(max_vec)
            torch.distributed.all_reduce(s_t, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(m_t, op=torch.distributed.ReduceOp.MAX)
            sum_vec, max_vec = s_t.numpy(), m_t.numpy()
        values = acc.layout.finalize(sum_vec, max_vec)
        acc.reset()
        if train:
            return {k: v for k, v in values.items() if k not in _ENGINE_KEYS}
        return {("eval_" + k if not k.startswith("eval_") else k): v for k, v in values.items()}

    def write_log_event(self, logs: Mapping[str, Any], state: Any) -> None:
        import datetime as _dt
        import time

        event: dict[str, Any] = {
            "global_step": int(state.global_step),
            "max_steps": int(self.max_steps),
            "epoch": float(state.epoch or 0.0),
            "time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "elapsed_s": time.time() - self._start,
        }
        for key, value in logs.items():
            if key in BOOKKEEPING_KEYS or key in event:
                continue
            if not REGISTRY.is_registered(key):
                warn_once(f"metric key {key!r} is not in the metric registry; dropped from logging.jsonl")
                continue
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                event[key] = float(value)
        if "loss" in event and not any(k.startswith("eval_") for k in event):
            self.step_losses.append(event["loss"])
        self.sink.log(event)

    def complete_checkpoint(self, folder: Path, state: Any) -> None:
        self.processor.save_pretrained(str(folder))
        table = {tok: int(i) for tok, i in zip(vocabulary_additions()[1:], self.coord_table.ids)}
        if self.coord_table.wildcard_id is not None:
            table = {vocabulary_additions()[0]: int(self.coord_table.wildcard_id), **table}
        atomic_write_text(folder / "coord_tokens.json", json.dumps(table, indent=2) + "\n")
        atomic_write_text(folder / "resolved_config.json", self.resolved_config_path.read_text())
        give_umask_modes(folder)  # the trainer's safetensors files are 0600; a team reads checkpoints too
        write_completion_marker(folder, global_step=int(state.global_step), epoch=float(state.epoch or 0.0))
        self.rotate(folder.parent, getattr(state, "best_model_checkpoint", None))

    def rotate(self, run_dir: Path, best: str | None) -> list[Path]:
        """``training.save_total_limit`` over COMPLETE checkpoints only, oldest first, never the best or newest.

        Directories without the marker are neither counted nor deleted (infer-eval-config.md §7.3).
        """
        limit = self.save_total_limit
        if limit is None:
            return []
        complete = complete_checkpoints(run_dir)
        protected = {complete[-1].resolve()} if complete else set()  # the newest is never rotated away
        if best:
            protected.add(Path(best).resolve())
        removable = [p for p in complete if p.resolve() not in protected]
        excess = len(complete) - limit
        removed: list[Path] = []
        for path in removable[: max(0, excess)]:
            shutil.rmtree(path)
            removed.append(path)
        return removed


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


# -------------------------------------------------------------------------------------------------
# Engine


def _torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def model_part(name: str) -> str:
    """The part a parameter or module name belongs to: ``vit``, ``aligner`` (any ``merger``) or ``llm``."""
    is_visual = ".visual." in f".{name}" or name.startswith("visual.")
    if not is_visual:
        return "llm"
    return "aligner" if "merger" in name else "vit"


def frozen_parts(training: Any) -> frozenset[str]:
    """``training.freeze_vit`` / ``freeze_aligner`` / ``freeze_llm`` as the set of parts that must not change."""
    flags = {"vit": training.freeze_vit, "aligner": training.freeze_aligner, "llm": training.freeze_llm}
    return frozenset(part for part, frozen in flags.items() if frozen)


def _freeze(model: Any, training: Any) -> None:
    """Full fine-tuning knobs: freeze the vision tower / aligner / language model as configured."""
    frozen = frozen_parts(training)
    for name, param in model.named_parameters():
        param.requires_grad_(model_part(name) not in frozen)


def apply_lora(model: Any, lora: Any, *, coord_offsets: bool = False, frozen: frozenset[str] = frozenset()) -> Any:
    """``training.lora``: LoRA / DoRA adapters through peft (what ms-swift's tuners use); base weights frozen.

    No adapter goes on a module of a ``frozen`` part (``freeze_vit`` / ``freeze_aligner`` / ``freeze_llm``):
    they are listed in peft's ``exclude_modules``, so a frozen part stays bit-identical after a merge.
    With coord offsets the adapter module is saved with the LoRA weights (``modules_to_save``) and its hooks
    are re-attached to the active copy after wrapping (stage1.md §7.1).
    """
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules)
    excluded = sorted(
        name for name, module in model.named_modules()
        if name and model_part(name) in frozen and isinstance(module, torch.nn.Linear)
    )  # fmt: skip
    peft_config = LoraConfig(
        r=int(lora.rank),
        lora_alpha=int(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        exclude_modules=excluded or None,
        use_dora=bool(lora.use_dora),
        modules_to_save=(list(lora.modules_to_save) + (["coord_offset_adapter"] if coord_offsets else [])) or None,
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_config)
    if coord_offsets:
        attach_coord_offset_hooks(wrapped)
    return wrapped


def optimizer_groups(model: Any, training: Any) -> list[dict[str, Any]]:
    """stage1.md §7.2 groups 3: vision / aligner / language model, each split into decay and no-decay."""
    groups: dict[tuple[str, bool], list[Any]] = {}
    lrs = {
        "vit": training.vit_lr or training.learning_rate,
        "aligner": training.aligner_lr or training.learning_rate,
        "llm": training.learning_rate,
    }
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        part = model_part(name)
        no_decay = param.dim() < 2 or name.endswith(".bias") or "norm" in name.lower()
        groups.setdefault((part, no_decay), []).append(param)
    out = []
    for (part, no_decay), params in groups.items():
        out.append({"params": params, "lr": lrs[part], "weight_decay": 0.0 if no_decay else training.weight_decay})
    return out


@attrs.define
class SwiftStage1Engine:
    """The TrainingEngine for ``objective.trainer_variant: stage1``.

    ``callbacks`` are extra transformers ``TrainerCallback`` objects (diagnostics, conformance tests).
    """

    callbacks: Sequence[Any] = ()
    _encoders: dict[Path, HFSampleEncoder] = attrs.field(factory=dict, init=False, repr=False)

    def _write_plan(self, job: TrainingJob, plan: UnitPlan, sources: Sequence[SampleSource], cache: Path) -> None:
        assert plan.plan is not None
        cache_body = None if plan.reused_cache else plan_cache_text_for(plan)
        if cache_body is not None:
            atomic_write_text(cache, cache_body)
        report = plan_report(plan.plan, sources, reused=plan.reused_cache)
        atomic_write_text(job.run_dir / PLAN_REPORT_FILE, json.dumps(report, indent=2) + "\n")
        print(
            f"pack plan: {report['packs']} packs of {report['samples']} samples, mean fill {report['mean_fill']:.3f}, "
            f"min fill {report['min_fill']:.3f}, dropped {report['dropped_samples']}"
            + (" (reused cached plan)" if plan.reused_cache else "")
        )
        if report["dropped_samples"]:
            warn_once(
                f"training.packing_drop_last dropped {report['dropped_samples']} samples from the static plan: "
                f"{report['dropped'][:10]}"
            )

    def _encoder(self, model_path: Path) -> HFSampleEncoder:
        """The sample encoder of ``model_path``'s processor (tokenizer and chat template only, no model);
        loaded once per engine, shared by :meth:`prepare` and :meth:`run`."""
        encoder = self._encoders.get(model_path)
        if encoder is None:
            processor = load_processor(model_path)
            check_processor(processor, model_path)
            encoder = HFSampleEncoder(processor, HFTokenizer(processor.tokenizer))
            self._encoders[model_path] = encoder
        return encoder

    def prepare(self, job: TrainingJob) -> PreparedTraining:
        """Lengths, over-length errors and the pack plans (data.md §6.5, §8.2): they need only the tokenizer,
        so they run before the model loads and before the use case writes a run file (issue 11 item 3).

        Reads the run directory's ``pack_plan_cache.json`` when one is there (a resumed run reuses its plan);
        writes nothing: :meth:`run` writes the plan files from what this returns.
        """
        _offline_env()
        config = job.config
        training = config.training
        encoder = self._encoder(job.model_path)
        prompt = training_prompt(config)
        train_sources = build_sources(job.train_records, job.train_images)
        cache_path = job.run_dir / PLAN_CACHE_FILE
        train_plan = plan_units(
            train_sources, encoder, prompt, config,
            packing=training.packing,
            drop_last=training.packing_drop_last,
            fingerprint_inputs=(
                _sha256_files(sorted({Path(r.source) for r in job.train_records})),
                tokenizer_fingerprint(job.model_path),
            ),
            cache_text=cache_path.read_text(encoding="utf-8") if cache_path.is_file() else None,
        )
        val_plan = None
        if job.val_records:
            val_sources = build_sources(job.val_records, job.val_images or ())
            # eval_packing never drops a validation sample (data.md §8.1)
            val_plan = plan_units(val_sources, encoder, prompt, config, packing=training.eval_packing, drop_last=False)
        return PreparedTraining(train=train_plan, val=val_plan)

    def run(self, job: TrainingJob, prepared: PreparedTraining, metric_sink: MetricSink) -> TrainingOutcome:
        _offline_env()
        from swift import Seq2SeqTrainingArguments, get_model_processor, get_template

        from adapters.swift.console import SWIFT_LOG_FILENAME, route_swift_logs

        config = job.config
        training = config.training
        if len(prepared.train.lengths) != len(job.train_records) or (prepared.val is None) != (not job.val_records):
            raise SetupError("run() was given a PreparedTraining that prepare() did not make for this job")
        torch.manual_seed(int(config.run.seed))
        rank = int(os.environ.get("RANK", "0"))
        route_swift_logs(job.run_dir / SWIFT_LOG_FILENAME if rank == 0 else None)
        # The trainer's arguments create the process group under a launcher; a group made by our caller stays.
        group_was_ours = not _distributed_ready()

        # The plans were made by prepare() before any run file was written; only their files are written here.
        encoder = self._encoder(job.model_path)
        tokenizer = encoder.tokenizer
        coord_table = tokenizer.coord_ids
        prompt = training_prompt(config)
        train_sources = build_sources(job.train_records, job.train_images)
        if prepared.train.plan is not None and rank == 0:
            self._write_plan(job, prepared.train, train_sources, job.run_dir / PLAN_CACHE_FILE)
        train_ds = Stage1Dataset(train_sources, prepared.train.units, encoder, prompt, config)
        eval_ds = None
        if job.val_records:
            assert prepared.val is not None
            val_sources = build_sources(job.val_records, job.val_images or ())
            eval_ds = Stage1Dataset(val_sources, prepared.val.units, encoder, prompt, config)

        dtype = _torch_dtype(config.model.dtype)
        attn = config.model.attn_implementation
        model, processor = get_model_processor(
            str(job.model_path),
            torch_dtype=dtype,
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
        _freeze(model, training)
        setup_coord_offsets(model, coord_table, training)  # no-op unless training.coord_offset.enabled
        if training.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if training.lora.enabled:
            model = apply_lora(model, training.lora, coord_offsets=training.coord_offset.enabled,
                               frozen=frozen_parts(training))

        c = config.objective.coord_soft_ce_w1
        settings = CoordLossSettings(
            enabled=c.enabled,
            ce_weight=c.ce_weight,
            soft_ce_weight=c.soft_ce_weight,
            w1_weight=c.w1_weight,
            gate_weight=c.gate_weight,
            temperature=c.temperature,
            target_sigma=c.target_sigma,
            target_truncate=c.target_truncate,
        )

        typer = None
        tt = config.objective.token_type_metrics
        tokens_mode = config.data.coord_mode is CoordMode.TOKENS
        type_settings = None
        if tt.enabled:
            typer = token_typer(processor.tokenizer, encoder, coord_table, config)
            type_settings = TokenTypeMetricSettings(
                log_top5=bool(tt.log_top5),
                coord_monitor_mass=bool(tt.coord_monitor_mass),
                coord_monitor_mass_max_tokens=int(tt.coord_monitor_mass_max_tokens),
                temperature=float(c.temperature),
                tokens_mode=tokens_mode,
            )
        monitor = config.objective.instability_monitor
        collator = ProjectCollator(
            pad_id=tokenizer.pad_id,
            rope_index=model_rope_index(model),
            token_typer=typer,
            # the non-finite error names every sample of the window (§6.3); the monitor may cap its own meta
            max_meta_samples=int(monitor.max_meta_samples) if monitor.enabled else 0,
        )
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        max_steps = int(training.max_steps) if training.max_steps else -1
        diagnostics = BestEffortDiagnostics()
        runner = None
        if monitor.enabled:
            runner = InstabilityRunner(
                instability_settings(monitor),
                dump_dir=Path(monitor.dump_dir) if monitor.dump_dir is not None
                else Path(default_dump_dir(str(job.run_dir))),
                rank=rank,
                world_size=world_size,
                diagnostics=diagnostics,
            )
        args = Seq2SeqTrainingArguments(
            output_dir=str(job.run_dir),
            max_steps=max_steps,
            num_train_epochs=float(training.num_train_epochs),
            per_device_train_batch_size=1 if training.packing else training.per_device_train_batch_size,
            per_device_eval_batch_size=1 if training.eval_packing else training.per_device_eval_batch_size,
            gradient_accumulation_steps=_grad_accum(training, world_size),
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
            seed=int(config.run.seed),
            data_seed=int(config.run.seed),
            dataloader_num_workers=training.dataloader_num_workers,
            dataloader_drop_last=training.dataloader_drop_last,
            remove_unused_columns=False,
            label_names=["labels"],
            prediction_loss_only=True,
            average_tokens_across_devices=True,
            bf16=config.model.dtype == "bfloat16" and torch.cuda.is_available(),
            fp16=config.model.dtype == "float16" and torch.cuda.is_available(),
            deepspeed=_checked_deepspeed(training.deepspeed),
            gradient_checkpointing=training.gradient_checkpointing,
            disable_tqdm=False,
            check_model=False,
            use_cpu=not torch.cuda.is_available(),
            use_logits_to_keep=False,
        )
        runtime = Stage1Runtime(
            coord_table=coord_table,
            kernel=CoordLossKernel(coord_table, settings),
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
        trainer_cls = _make_trainer_class()
        trainer = trainer_cls(
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


def token_typer(hf_tokenizer: Any, encoder: HFSampleEncoder, coord_table: CoordIdTable, config: Any) -> TargetTokenTyper:
    """The collator's token typer (stage1.md §2): the supervised part of the template's assistant-turn end
    (through ``<|im_end|>``) is the FORMAT suffix; ``include`` / ``exclude`` filter by dataset label."""
    tt = config.objective.token_type_metrics
    terminator = [int(i) for i in encoder.terminator_ids]
    im_end = int(encoder.tokenizer.im_end_id)
    supervised = terminator[: terminator.index(im_end) + 1]
    return TargetTokenTyper.from_hf_tokenizer(
        hf_tokenizer,
        coord_ids=[int(i) for i in coord_table.ids],
        field_order=config.data.field_order,
        coord_mode=config.data.coord_mode,
        dataset_filter=DatasetFilter(
            include=None if tt.include is None else tuple(tt.include), exclude=tuple(tt.exclude)
        ),
        suffix=tuple(hf_tokenizer.convert_ids_to_tokens(supervised)),
    )


def instability_settings(monitor: Any) -> InstabilitySettings:
    """``objective.instability_monitor`` as the pure monitor's settings (validated again there)."""
    reasons: tuple[str, ...] = tuple(str(r) for r in monitor.early_stop.on_reasons)
    return InstabilitySettings(
        enabled=bool(monitor.enabled),
        max_meta_samples=int(monitor.max_meta_samples),
        ema_decay=float(monitor.ema_decay),
        spike_factor=float(monitor.spike_factor),
        abs_loss_threshold=float(monitor.abs_loss_threshold),
        min_supervised_tokens=int(monitor.min_supervised_tokens),
        min_token_acc=float(monitor.min_token_acc),
        max_abs_logit=float(monitor.max_abs_logit),
        detect_nonfinite=bool(monitor.detect_nonfinite),
        detect_loss_spike=bool(monitor.detect_loss_spike),
        detect_low_acc=bool(monitor.detect_low_acc),
        dump_samples=bool(monitor.dump_samples),
        dump_dir=None if monitor.dump_dir is None else str(monitor.dump_dir),
        early_stop=EarlyStopSettings(
            enabled=bool(monitor.early_stop.enabled), on_reasons=reasons  # type: ignore[arg-type]
        ),
        guard=GuardSettings(enabled=bool(monitor.guard.enabled), in_eval=bool(monitor.guard.in_eval)),
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


def _grad_accum(training: Any, world_size: int) -> int:
    if training.gradient_accumulation_steps is not None:
        return int(training.gradient_accumulation_steps)
    if training.effective_batch_size is not None:
        per = 1 if training.packing else training.per_device_train_batch_size
        return max(1, math.ceil(training.effective_batch_size / (per * world_size)))
    return 1
