"""The instability monitor's trainer-side runner (stage1.md §5; decisions in :mod:`domain.instability`).

Per micro-step, after the loss: the statistics of §5 step 1 come from the kernel result (called with
``logit_stats=True``), :func:`domain.instability.monitor_step` updates the EMA and names the reasons,
and this runner does the I/O and the torch parts:

- one JSON line per triggered micro-step appended to ``<dump_dir>/events.rank<r>.jsonl`` plus one
  warning line (step 4);
- with ``dump_samples``, ``samples_step<s>_<mode>_rank<r>.json`` written atomically with the raw JSONL
  records named by (source, line) in the micro-batch's instability meta (step 5);
- the guard value ``0 · Σ sanitised inputs`` (``CoordLossResult.zero_anchor``, built on
  :func:`adapters.torch.coord_loss.guarded_zero`; step 7);
- the cross-rank stop flag: a MAX all-reduce of ``[stop_requested]`` at every training micro-step when
  W > 1, entered by every rank unconditionally, also when this rank's monitor is disabled (step 8).

The monitor is best-effort (§6.4, name ``instability_monitor``): an internal failure warns once,
switches it off (it still joins the stop collective, sending 0) and leaves the loss unchanged.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from adapters.storage.atomic import write_text_atomically
from adapters.torch.coord_loss import CoordLossResult, micro_step_stats
from domain.errors import BestEffortDiagnostics
from domain.instability import (
    InstabilitySettings,
    MicroStepStats,
    MonitorDecision,
    MonitorState,
    events_file_name,
    instability_event,
    monitor_step,
    resolve_learning_rate,
    samples_file_name,
    should_stop,
    stop_flags,
)

logger = logging.getLogger(__name__)

DIAGNOSTIC_NAME = "instability_monitor"
NO_DECISION = MonitorDecision(reasons=(), ema=None, stop_requested=False, guard=False)

#: ``fn(flags)`` all-reduces the float64 flag tensor in place with MAX across ranks.
AllReduceMax = Callable[[torch.Tensor], None]


def torch_all_reduce_max(flags: torch.Tensor) -> None:
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)


def learning_rate_of(optimizer: Any, scheduler: Any, configured: float) -> float:
    """Event ``learning_rate``: optimizer group 0, else the scheduler's last lr, else the configured lr."""
    group0: float | None = None
    last: float | None = None
    try:
        if optimizer is not None and optimizer.param_groups:
            group0 = float(optimizer.param_groups[0]["lr"])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        group0 = None
    try:
        if scheduler is not None:
            values = scheduler.get_last_lr()
            last = float(values[0]) if values else None
    except (AttributeError, IndexError, TypeError, ValueError, RuntimeError):
        last = None
    return resolve_learning_rate(group0, last, configured)


def meta_samples(meta_json: str | None) -> list[Mapping[str, Any]]:
    """The members named in an ``instability_meta_json`` value (every row, meta order)."""
    if meta_json is None:
        return []
    rows = json.loads(meta_json)
    out: list[Mapping[str, Any]] = []
    for row in rows:
        out.extend(row.get("samples", []))
    return out


def read_records(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The raw JSONL record at (source, line) of each sample, in order; one pass per source file.

    A record that cannot be read or parsed is reported in place (``record`` null, ``error`` set).
    """
    wanted: dict[str, set[int]] = {}
    for s in samples:
        wanted.setdefault(str(s["source"]), set()).add(int(s["line"]))
    lines: dict[tuple[str, int], str] = {}
    errors: dict[str, str] = {}
    for source, numbers in wanted.items():
        last = max(numbers)
        try:
            with open(source, encoding="utf-8") as handle:
                for number, physical in enumerate(handle, start=1):
                    if number in numbers:
                        lines[(source, number)] = physical.rstrip("\r\n")
                    if number >= last:
                        break
        except OSError as exc:
            errors[source] = f"{type(exc).__name__}: {exc}"
    out: list[dict[str, Any]] = []
    for s in samples:
        source, line = str(s["source"]), int(s["line"])
        entry: dict[str, Any] = {
            "source": source,
            "line": line,
            "sample_id": s.get("sample_id"),
            "dataset": s.get("dataset"),
        }
        text = lines.get((source, line))
        if text is None:
            entry["record"] = None
            entry["error"] = errors.get(source, f"{source} has no line {line}")
        else:
            try:
                entry["record"] = json.loads(text)
            except json.JSONDecodeError as exc:
                entry["record"] = None
                entry["error"] = f"line is not JSON: {exc.msg}"
        out.append(entry)
    return out


@attrs.define
class InstabilityRunner:
    """One rank's monitor: state (EMA), event and sample dumps, guard, cross-rank stop flag."""

    settings: InstabilitySettings
    dump_dir: Path
    rank: int = 0
    world_size: int = 1
    diagnostics: BestEffortDiagnostics = attrs.field(factory=BestEffortDiagnostics)
    all_reduce_max: AllReduceMax = torch_all_reduce_max
    state: MonitorState = attrs.field(factory=MonitorState)
    stop_issued: bool = False
    events_written: int = 0
    corrupt_dump_warned: bool = False

    @property
    def disabled(self) -> bool:
        return self.state.disabled or self.diagnostics.is_disabled(DIAGNOSTIC_NAME)

    # --- steps 1-5
    def observe(
        self,
        result: CoordLossResult,
        meta_json: str | None,
        *,
        training: bool,
        global_step: int,
        epoch: float | None,
        learning_rate: float,
    ) -> MonitorDecision:
        """Run the monitor on one micro-step; never raises (best-effort)."""
        if self.disabled or not self.settings.enabled:
            return NO_DECISION
        decision = self.diagnostics.run(
            DIAGNOSTIC_NAME,
            lambda: self._observe(result, meta_json, training, global_step, epoch, learning_rate),
        )
        if decision is None:
            self.state = attrs.evolve(self.state, disabled=True)
            return NO_DECISION
        return decision

    def _observe(
        self,
        result: CoordLossResult,
        meta_json: str | None,
        training: bool,
        global_step: int,
        epoch: float | None,
        learning_rate: float,
    ) -> MonitorDecision:
        stats = micro_step_stats(result)
        state, decision = monitor_step(self.state, stats, self.settings, training)
        self.state = state
        if decision.triggered:
            self.report(decision, stats, meta_json, training=training, global_step=global_step, epoch=epoch,
                        learning_rate=learning_rate)
        return decision

    def report(
        self,
        decision: MonitorDecision,
        stats: MicroStepStats,
        meta_json: str | None,
        *,
        training: bool,
        global_step: int,
        epoch: float | None,
        learning_rate: float,
    ) -> None:
        event = instability_event(
            decision,
            stats,
            training=training,
            global_step=global_step,
            epoch=epoch,
            rank=self.rank,
            learning_rate=learning_rate,
            meta_json=meta_json,
        )
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.dump_dir / events_file_name(self.rank)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, allow_nan=False, ensure_ascii=True) + "\n")
            handle.flush()
        self.events_written += 1
        logger.warning(
            "instability monitor: %s at global_step=%d (%s, rank %d): loss=%s ema=%s token_acc=%s "
            "max_abs_logit=%s; event appended to %s",
            ",".join(r.value for r in decision.reasons),
            global_step,
            "train" if training else "eval",
            self.rank,
            event["loss"],
            event["ema_loss"],
            event["token_acc"],
            event["max_abs_logit"],
            path,
        )
        if self.settings.dump_samples:
            self.dump_samples(decision, meta_json, training=training, global_step=global_step)

    def dump_samples(
        self, decision: MonitorDecision, meta_json: str | None, *, training: bool, global_step: int
    ) -> Path:
        """Step 5: the raw records of the micro-batch's samples, written atomically (D16).

        Several triggered micro-batches of one (step, mode, rank) share the file name; the file then
        holds the union of their records (first occurrence order) and of their reasons.
        """
        path = self.dump_dir / samples_file_name(global_step, training, self.rank)
        body: dict[str, Any] = {
            "global_step": int(global_step),
            "mode": "train" if training else "eval",
            "rank": int(self.rank),
            "reasons": [],
            "samples": [],
        }
        if path.is_file():
            body["reasons"], body["samples"] = self._previous_dump(path)
        for reason in decision.reasons:
            if reason.value not in body["reasons"]:
                body["reasons"].append(reason.value)
        seen = {(str(e.get("source")), int(e.get("line", 0))) for e in body["samples"]}
        for entry in read_records(meta_samples(meta_json)):
            key = (str(entry["source"]), int(entry["line"]))
            if key not in seen:
                seen.add(key)
                body["samples"].append(entry)
        if meta_json is None:
            body["error"] = "the micro-batch carried no instability_meta_json"
        write_text_atomically(path, json.dumps(body, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        return path

    def _previous_dump(self, path: Path) -> tuple[list[Any], list[Any]]:
        """Reasons and samples of an earlier dump with this file name, to merge into.

        An unreadable one is kept beside it as ``<name>.corrupt`` (nothing written is lost) and replaced
        by the new dump, with one warning per run (best-effort, D15).
        """
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(previous, dict):
                raise TypeError(f"expected a JSON object, got {type(previous).__name__}")
            reasons = previous.get("reasons", [])
            samples = previous.get("samples", [])
            if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
                raise TypeError("'reasons' is not a list of strings")
            if not isinstance(samples, list) or not all(
                isinstance(e, dict) and isinstance(e.get("line", 0), int) for e in samples
            ):
                raise TypeError("'samples' is not a list of objects with an integer 'line'")
            return list(reasons), list(samples)
        except (OSError, ValueError, TypeError) as exc:
            aside = path.with_name(path.name + ".corrupt")
            try:
                path.replace(aside)
                kept = f"kept as {aside}"
            except OSError:
                kept = "could not be moved aside"
            if not self.corrupt_dump_warned:
                self.corrupt_dump_warned = True
                warnings.warn(
                    f"instability monitor: earlier sample dump {path} is unreadable ({type(exc).__name__}: "
                    f"{exc}); it is {kept} and a new dump replaces it (warned once per run)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return [], []

    # --- step 7
    @staticmethod
    def guarded_loss(result: CoordLossResult) -> torch.Tensor:
        """``0 · Σ sanitised inputs`` (the logits, or hidden states, weight and offsets): an exact zero
        connected to the graph (zero, not None, gradients)."""
        return result.zero_anchor()

    # --- step 8
    def exchange_stop(self, requested: bool, device: torch.device | str = "cpu") -> bool:
        """The agreed stop flag of this micro-step (call at every training micro-step).

        With W > 1 every rank all-reduces (MAX) ``[stop_requested]`` unconditionally; a disabled
        monitor sends 0. Returns True on every rank iff some rank requested a stop.
        """
        flags = stop_flags(bool(requested) and not self.disabled)
        if self.world_size > 1:
            tensor = torch.tensor(flags, dtype=torch.float64, device=device)
            self.all_reduce_max(tensor)
            flags = [float(v) for v in tensor.cpu().tolist()]
        return should_stop(flags)

    def apply_stop(self, control: Any) -> bool:
        """Set the trainer's stop flags once (``should_training_stop``, ``should_epoch_stop``)."""
        if self.stop_issued:
            return False
        control.should_training_stop = True
        control.should_epoch_stop = True
        self.stop_issued = True
        logger.warning("instability monitor: early stop requested; stopping training on every rank")
        return True
