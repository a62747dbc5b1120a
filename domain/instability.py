"""The instability monitor's decisions (stage1.md §5), free of torch and I/O.

Per micro-step the adapter measures :class:`MicroStepStats` (L_mb, never λ; statistics over the
supervised pairs T) and calls :func:`monitor_step`, which updates the loss EMA (train only, only
with finite values, before the checks), names the reasons, and says whether to request a stop and
whether to guard (return ``0 · Σ sanitised logits``). The monitor emits no metric keys.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence

import attrs

from domain.errors import ConfigError

CONFIG_PATH = "objective.instability_monitor"
META_JSON_MAX_CHARS = 20_000


class InstabilityReason(str, enum.Enum):
    NONFINITE_LOSS = "nonfinite_loss"
    NONFINITE_LOGITS = "nonfinite_logits"
    LOGIT_OVERFLOW_LIKE = "logit_overflow_like"
    LOSS_SPIKE = "loss_spike"
    ZERO_TOKEN_ACC = "zero_token_acc"
    LOW_TOKEN_ACC = "low_token_acc"


REASON_NAMES: tuple[str, ...] = tuple(r.value for r in InstabilityReason)


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _reason_tuple(reasons: Iterable[str]) -> tuple[str, ...]:
    return tuple(reasons)


@attrs.frozen
class EarlyStopSettings:
    enabled: bool = False
    on_reasons: tuple[str, ...] = attrs.field(default=("zero_token_acc",), converter=_reason_tuple)


@attrs.frozen
class GuardSettings:
    enabled: bool = False
    in_eval: bool = False


@attrs.frozen
class InstabilitySettings:
    """``objective.instability_monitor`` with the defaults of §5; construction validates the table."""

    enabled: bool = False
    max_meta_samples: int = 16
    ema_decay: float = 0.98
    spike_factor: float = 8.0
    abs_loss_threshold: float = 0.2
    min_supervised_tokens: int = 64
    min_token_acc: float = 0.01
    max_abs_logit: float = 200.0
    detect_nonfinite: bool = True
    detect_loss_spike: bool = True
    detect_low_acc: bool = True
    dump_samples: bool = False
    dump_dir: str | None = None
    early_stop: EarlyStopSettings = EarlyStopSettings()
    guard: GuardSettings = GuardSettings()

    def __attrs_post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        p = CONFIG_PATH
        out: list[str] = []
        for name in ("enabled", "detect_nonfinite", "detect_loss_spike", "detect_low_acc", "dump_samples"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{p}.{name}: must be true or false, got {getattr(self, name)!r}")
        for name, sub in (("early_stop", self.early_stop), ("guard", self.guard)):
            for f in attrs.fields(type(sub)):
                if f.name != "on_reasons" and not isinstance(getattr(sub, f.name), bool):
                    out.append(f"{p}.{name}.{f.name}: must be true or false, got {getattr(sub, f.name)!r}")
        for name in ("max_meta_samples", "min_supervised_tokens"):
            v = getattr(self, name)
            if not _int(v) or v < 0:
                out.append(f"{p}.{name}: must be an int >= 0, got {v!r}")
        checks: tuple[tuple[str, float, float, bool, str], ...] = (
            # name, low, high, low bound exclusive, rule text
            ("ema_decay", 0.0, 0.9999, False, "in [0, 0.9999]"),
            ("spike_factor", 0.0, math.inf, True, "> 0"),
            ("abs_loss_threshold", 0.0, math.inf, False, ">= 0"),
            ("min_token_acc", 0.0, 1.0, False, "in [0, 1]"),
            ("max_abs_logit", 0.0, math.inf, True, "> 0"),
        )
        for name, low, high, open_low, rule in checks:
            v = getattr(self, name)
            ok = _real(v) and (float(v) > low if open_low else float(v) >= low) and float(v) <= high
            if not ok:
                out.append(f"{p}.{name}: must be a finite real {rule}, got {v!r}")
        if self.dump_dir is not None and (not isinstance(self.dump_dir, str) or not self.dump_dir):
            out.append(f"{p}.dump_dir: must be null or a non-empty path, got {self.dump_dir!r}")
        for j, r in enumerate(self.early_stop.on_reasons):
            if r not in REASON_NAMES:
                out.append(f"{p}.early_stop.on_reasons[{j}]: unknown reason {r!r}; expected one of {list(REASON_NAMES)}")
        return out


@attrs.frozen
class MicroStepStats:
    """What the adapter measures on one micro-step (statistics over the supervised pairs T).

    ``loss`` is L_mb (§5: Σ_N ce/max(1,|N|) + Σ_C ℓ/max(1,|C|), or the pure-CE mean): it does not
    depend on G, W or the window. ``max_abs_logit`` is taken after sanitising.
    """

    loss: float
    supervised_tokens: int
    finite_logits: bool
    max_abs_logit: float
    token_acc: float | None  # None when there are no supervised pairs

    @property
    def finite_loss(self) -> bool:
        return math.isfinite(self.loss)


def update_ema(ema: float | None, loss: float, decay: float) -> float | None:
    """EMA of L_mb: initialised by the first finite value; a non-finite value never enters it."""
    if not math.isfinite(loss):
        return ema
    if ema is None:
        return float(loss)
    return decay * ema + (1.0 - decay) * loss


def is_loss_spike(loss: float, ema: float | None, spike_factor: float, abs_loss_threshold: float) -> bool:
    """``L ≥ thr AND ((ema > 0 AND L > factor·ema) OR ema < thr/4)``; False without an EMA or for NaN."""
    if ema is None or not math.isfinite(loss):
        return False
    if not loss >= abs_loss_threshold:
        return False
    return (ema > 0 and loss > spike_factor * ema) or ema < abs_loss_threshold / 4.0


def detect_reasons(
    stats: MicroStepStats, ema: float | None, settings: InstabilitySettings, training: bool
) -> tuple[InstabilityReason, ...]:
    """The reasons of §5 step 3, in declaration order. ``ema`` is the value AFTER this step's update.

    In eval the train EMA is read but never updated; ``loss_spike`` itself is train only, while the
    spike condition inside ``low_token_acc`` uses the current EMA in both modes.
    """
    out: list[InstabilityReason] = []
    s = settings
    if s.detect_nonfinite:
        if not stats.finite_loss:
            out.append(InstabilityReason.NONFINITE_LOSS)
        if not stats.finite_logits:
            out.append(InstabilityReason.NONFINITE_LOGITS)
    if stats.max_abs_logit > s.max_abs_logit:
        out.append(InstabilityReason.LOGIT_OVERFLOW_LIKE)
    spike = is_loss_spike(stats.loss, ema, s.spike_factor, s.abs_loss_threshold)
    if training and s.detect_loss_spike and spike:
        out.append(InstabilityReason.LOSS_SPIKE)
    if s.detect_low_acc and stats.token_acc is not None and stats.supervised_tokens >= s.min_supervised_tokens:
        if stats.token_acc <= 0.0:
            out.append(InstabilityReason.ZERO_TOKEN_ACC)
        elif stats.token_acc < s.min_token_acc and spike:
            out.append(InstabilityReason.LOW_TOKEN_ACC)
    return tuple(out)


@attrs.frozen
class MonitorState:
    """Carried between micro-steps on one rank."""

    ema: float | None = None
    disabled: bool = False  # an internal failure switched the monitor off (it still joins the stop collective)


@attrs.frozen
class MonitorDecision:
    reasons: tuple[InstabilityReason, ...]
    ema: float | None
    stop_requested: bool
    guard: bool

    @property
    def triggered(self) -> bool:
        return bool(self.reasons)


def monitor_step(
    state: MonitorState, stats: MicroStepStats, settings: InstabilitySettings, training: bool
) -> tuple[MonitorState, MonitorDecision]:
    """One micro-step: update the EMA (train), detect, decide stop request and guard."""
    if state.disabled or not settings.enabled:
        return state, MonitorDecision((), state.ema, False, False)
    ema = update_ema(state.ema, stats.loss, settings.ema_decay) if training else state.ema
    reasons = detect_reasons(stats, ema, settings, training)
    stop = (
        training
        and settings.early_stop.enabled
        and any(r.value in settings.early_stop.on_reasons for r in reasons)
    )
    guard_on = settings.guard.enabled and (training or settings.guard.in_eval)
    guard = bool(reasons) and (guard_on or stop)
    return attrs.evolve(state, ema=ema), MonitorDecision(reasons, ema, stop, guard)


def stop_flags(stop_requested: bool) -> list[float]:
    """The per-micro-step vector every rank all-reduces (MAX) when the monitor is on and W > 1."""
    return [1.0 if stop_requested else 0.0]


def should_stop(reduced_flags: Sequence[float]) -> bool:
    """After the MAX all-reduce: every rank stops at the same step iff some rank requested it."""
    return bool(reduced_flags) and reduced_flags[0] > 0.0


def resolve_learning_rate(group0: float | None, scheduler_last: float | None, configured: float) -> float:
    """Event ``learning_rate``: optimizer group 0, else the scheduler's last lr, else the configured lr."""
    if group0 is not None:
        return float(group0)
    if scheduler_last is not None:
        return float(scheduler_last)
    return float(configured)


def truncate_meta_json(meta_json: str | None, limit: int = META_JSON_MAX_CHARS) -> str | None:
    return None if meta_json is None else meta_json[:limit]


def instability_event(
    decision: MonitorDecision,
    stats: MicroStepStats,
    *,
    training: bool,
    global_step: int,
    epoch: float | None,
    rank: int,
    learning_rate: float,
    meta_json: str | None,
) -> dict[str, object]:
    """The JSON line of §5 step 4 (non-finite floats become None so the line is strict JSON)."""

    def num(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    return {
        "mode": "train" if training else "eval",
        "reasons": [r.value for r in decision.reasons],
        "global_step": int(global_step),
        "epoch": num(epoch),
        "rank": int(rank),
        "loss": num(stats.loss),
        "ema_loss": num(decision.ema),
        "learning_rate": num(learning_rate),
        "supervised_tokens": int(stats.supervised_tokens),
        "token_acc": num(stats.token_acc),
        "max_abs_logit": num(stats.max_abs_logit),
        "finite_loss": stats.finite_loss,
        "finite_logits": bool(stats.finite_logits),
        "meta_json": truncate_meta_json(meta_json),
    }


def events_file_name(rank: int) -> str:
    return f"events.rank{int(rank)}.jsonl"


def samples_file_name(global_step: int, training: bool, rank: int) -> str:
    return f"samples_step{int(global_step)}_{'train' if training else 'eval'}_rank{int(rank)}.json"


def default_dump_dir(run_dir: str) -> str:
    """``<run_dir>/instability_dumps`` (run_dir = run.output_dir/run.name)."""
    return f"{run_dir.rstrip('/')}/instability_dumps"
