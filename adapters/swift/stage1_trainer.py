"""The Stage-1 trainer: ms-swift's ``Seq2SeqTrainer`` with the project's collator, loss, normalisation and
logging (D12; stage1.md §1.6). A named, importable, module-level class, like trl's trainers.

Everything the project decides lives in :class:`adapters.swift.stage1_runtime.Stage1Runtime` (testable
without the trainer); this class only routes the transformers loop's hooks into it: the R6 window pre-pass
(``get_batch_samples``), the R3 value for backward (``compute_loss``), the R5 eval loss (``evaluate``), the
non-finite gradient stop, one ``logging.jsonl`` writer and checkpoint completion.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from swift import Seq2SeqTrainer
from swift.trainers.patcher import PrinterCallbackNew, ProgressCallbackNew
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from adapters.swift.stage1_runtime import (
    SUMMARY_KEYS,
    Stage1Runtime,
    is_packed,
    window_counts,
    window_sample_ids,
)
from adapters.torch.collator import check_packed_inputs
from adapters.torch.coord_loss import lambda_for_backward
from adapters.torch.instability import InstabilityRunner
from adapters.torch.stage1_data import (
    EvalPaddedDataset,
    dist_rank_world,
    epoch_index_batch_sampler,
    eval_index_batches,
)
from adapters.torch.step_context import pop_step_context
from domain.errors import StepError
from domain.normalisation import StepCounts
from domain.normalisation import eval_loss as normalised_eval_loss


class CoordExpStage1Trainer(Seq2SeqTrainer):  # type: ignore[misc]
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
        rank, world = dist_rank_world()
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
        if is_packed(ctx, inputs):
            check_packed_inputs(inputs)  # 4-row positions, no mask, no cache (data.md §8.4)
        outputs, result = self.coordexp.forward_loss(model, inputs, ctx, self.state.global_step)
        training = bool(model.training)
        if training:
            noncoord, coord, _ = (int(v) for v in self._window.tolist())
            n_step, c_step = StepCounts(noncoord, coord).for_backward(result.distributional)
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
        if any(k in logs for k in SUMMARY_KEYS):
            super().log(logs, *args, **kwargs)
            return
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
                if placeholder:  # a rank's padding batch: the forward keeps ranks in step, nothing counts
                    model(**batch)
                    continue
                num_samples += ctx.samples_in_batch()
                num_batches += 1
                _, result = self.coordexp.forward_loss(model, batch, ctx, self.state.global_step)
                self.coordexp.record_metrics(result, ctx, train=False)
                decision = self.coordexp.observe_instability(self, result, ctx, training=False)
                if not decision.guard:  # a guarded eval batch (guard.in_eval) leaves sums and counts alike
                    sums += torch.tensor([float(result.sum_ce), float(result.sum_coord)], dtype=torch.float64)
                    counts += torch.tensor([result.ce_count, result.num_coord], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.cat([sums, counts]).to(self.args.device)
            torch.distributed.all_reduce(both)
            sums, counts = both[:2].cpu(), both[2:].cpu()
        eval_loss = normalised_eval_loss(float(sums[0]), float(sums[1]), float(counts[0]), float(counts[1]))
        metrics = {f"{metric_key_prefix}_loss": eval_loss}
        metrics.update(self.coordexp.flush_metrics(train=False))
        metrics.update(
            speed_metrics(  # type: ignore[no-untyped-call]  # transformers leaves it untyped
                metric_key_prefix, start, num_samples=num_samples, num_steps=num_batches
            )
        )
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

