"""The project's side of the Stage-1 trainer (stage1.md §1-§6): loss, metrics, instability monitor, logging and
checkpoint completion, kept out of the trainer class so each is testable without ms-swift's loop.

Diagnostics (stage1.md §3, §5, §6.4): every metric family of a micro-batch runs as a named best-effort
diagnostic (:meth:`Stage1Runtime.metric_updates`), the token/type family and coord monitors come from
``adapters.torch.stage1_metrics``, and the instability monitor (``adapters.torch.instability``) runs after
the metrics on every train and eval micro-batch; its guard may replace λ and its stop flag is agreed
across ranks at every training micro-step.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from adapters.hf.hidden_capture import FinalHiddenStates
from adapters.storage.atomic import give_umask_modes
from adapters.storage.atomic import write_text_atomically as atomic_write_text
from adapters.storage.checkpoints import complete_checkpoints, write_completion_marker
from adapters.torch.collator import ProjectCollator
from adapters.torch.coord_loss import CoordLossKernel, CoordLossResult
from adapters.torch.instability import NO_DECISION, InstabilityRunner, learning_rate_of
from adapters.torch.stage1_metrics import (
    TokenTypeMetricSettings,
    coord_monitor_updates,
    token_type_metric_updates,
)
from adapters.torch.step_context import StepContext
from domain.batch_extras import INSTABILITY_META_JSON, TOKEN_TYPES
from domain.coord_tokens import CoordIdTable, vocabulary_additions
from domain.errors import BestEffortDiagnostics, SetupError, StepError
from domain.instability import MonitorDecision
from domain.losses import objective_metric_updates
from domain.metrics_registry import (
    DIAGNOSTIC_NAMES,
    REGISTRY,
    MetricAccumulator,
    MetricLayout,
    MetricUpdate,
    Mode,
)
from domain.normalisation import MicroBatchSums, StepCounts
from ports.metrics import MetricSink

BOOKKEEPING_KEYS = ("global_step", "max_steps", "epoch", "time", "elapsed_s")
# The trainer's end-of-training summary is not a metric event (it restates the run, not a window).
SUMMARY_KEYS = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}
)
# Keys the transformers loop logs on its own that the registry names under its own spelling.
_ENGINE_KEYS = frozenset({"loss", "grad_norm", "learning_rate", "epoch"})


def is_packed(ctx: StepContext, inputs: Mapping[str, Any]) -> bool:
    counts = ctx.pack_num_samples
    return counts is not None and int(inputs["input_ids"].shape[0]) == 1 and int(counts.sum()) > 1


def window_counts(batches: Sequence[Mapping[str, Any]], coord_mask: torch.Tensor) -> torch.Tensor:
    """``[N_step, C_step, T_step]`` over the window's labels, before any forward (stage1.md R6)."""
    c = t = 0
    for batch in batches:
        labels = batch["labels"]
        targets = labels[:, 1:]
        supervised = targets != -100
        safe = targets.clamp_min(0)
        is_coord = coord_mask.to(labels.device)[safe] & supervised
        t += int(supervised.sum())
        c += int(is_coord.sum())
    counts = StepCounts.of_window(supervised=t, coord=c)
    return torch.tensor([counts.noncoord, counts.coord, counts.supervised], dtype=torch.float64)


def window_sample_ids(batches: Sequence[Mapping[str, Any]]) -> list[str]:
    ids: list[str] = []
    for batch in batches:
        meta = batch.get("instability_meta_json")
        if isinstance(meta, str):
            for row in json.loads(meta):
                ids.extend(f"{s['source']}:{s['line']}" for s in row.get("samples", []))
    return ids



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
    hidden: FinalHiddenStates | None = None  # training.loss_from_hidden resolved on: the loss reads hidden states
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
        return _located(
            global_step,
            lambda: self.kernel(
                logits, labels, coord_metrics=self.pure_ce_coord_metrics, logit_stats=self.monitor is not None
            ),
        )

    def forward_loss(
        self, model: Any, inputs: dict[str, Any], ctx: StepContext, global_step: int
    ) -> tuple[Any, CoordLossResult]:
        """The model's forward on ``inputs`` and the Stage-1 loss of it: the one place the trainer's step, its
        evaluation and the largest-pack probe run a micro-batch.

        With ``hidden`` (``training.loss_from_hidden`` resolved on) the model is called with
        ``logits_to_keep=1`` (one position of logits, never ``[B, L, V]``) and the kernel reads the final hidden
        states captured from that same forward times the head's weight (and coord-row offsets), chunk by chunk.
        Otherwise the full-length logits are checked and handed to the kernel.
        """
        seq_len = int(inputs["input_ids"].shape[1])
        source = self.hidden
        if source is None:
            outputs = model(**inputs)
            if outputs.logits is not None and int(outputs.logits.shape[1]) != seq_len:
                raise StepError(
                    f"sliced logits: {list(outputs.logits.shape)} for input_ids of length {seq_len} "
                    f"at global_step={global_step}"
                )
            return outputs, self.loss(outputs.logits, ctx, global_step)
        with source.capture() as captured:
            outputs = model(**inputs, logits_to_keep=1)
        hidden = captured.hidden
        if hidden is None or hidden.dim() != 3 or int(hidden.shape[1]) != seq_len:
            raise StepError(
                f"Stage-1 loss failed at global_step={global_step}: the final hidden states were not captured at "
                f"full length ({None if hidden is None else list(hidden.shape)} for {seq_len} tokens); "
                "set training.loss_from_hidden: false"
            )
        return outputs, self.loss_from_hidden(hidden, model, ctx, global_step)

    def loss_from_hidden(self, hidden: torch.Tensor, model: Any, ctx: StepContext, global_step: int) -> CoordLossResult:
        """:meth:`loss` from the final hidden states and the output head (issue 14): the same terms, no logits."""
        from adapters.hf.hidden_capture import head_offsets

        source = self.hidden
        assert source is not None
        labels = ctx.labels
        if labels is None or not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise StepError(f"Stage-1 loss failed at global_step={global_step}: labels missing or not [B, L]")
        weight = source.weight
        if tuple(hidden.shape[:2]) != tuple(labels.shape) or int(weight.shape[0]) < self.coord_table.max_id + 1:
            raise StepError(
                f"Stage-1 loss failed at global_step={global_step}: hidden states {list(hidden.shape)} and head "
                f"{list(weight.shape)} do not cover labels {list(labels.shape)} with every coord id"
            )
        return _located(
            global_step,
            lambda: self.kernel.from_hidden(
                hidden,
                weight,
                labels,
                head_offsets=head_offsets(model),
                coord_metrics=self.pure_ce_coord_metrics,
                logit_stats=self.monitor is not None,
            ),
        )

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
                        result, types, self.coord_mask, self.kernel.coord_columns(result.device), tt
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


def _located(global_step: int, compute: Callable[[], CoordLossResult]) -> CoordLossResult:
    """Run the kernel; any failure but a StepError becomes one (training never continues without coord
    supervision)."""
    try:
        return compute()
    except StepError:
        raise
    except Exception as exc:
        raise StepError(
            f"Stage-1 loss failed at global_step={global_step}: {exc}; refusing to train without coord supervision"
        ) from exc


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


