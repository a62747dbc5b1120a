"""Instability monitor decisions (stage1.md §5; acceptance test 42 and the rules of steps 2-8)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ConfigError
from domain.instability import (
    EarlyStopSettings,
    GuardSettings,
    InstabilityReason,
    InstabilitySettings,
    MicroStepStats,
    MonitorState,
    default_dump_dir,
    detect_reasons,
    events_file_name,
    instability_event,
    is_loss_spike,
    monitor_step,
    resolve_learning_rate,
    samples_file_name,
    should_stop,
    stop_flags,
    update_ema,
)

ON = InstabilitySettings(enabled=True)
R = InstabilityReason


def stats(loss: float = 1.0, n: int = 100, finite: bool = True, max_abs: float = 10.0, acc: float | None = 0.5) -> MicroStepStats:
    return MicroStepStats(loss=loss, supervised_tokens=n, finite_logits=finite, max_abs_logit=max_abs, token_acc=acc)


def test_nan_never_enters_the_ema() -> None:
    state = MonitorState()
    emas = []
    for loss in (1.0, math.nan, 1.0):
        state, decision = monitor_step(state, stats(loss=loss), ON, training=True)
        emas.append(decision.ema)
    assert emas == [1.0, 1.0, pytest.approx(1.0)]
    assert all(e is not None and math.isfinite(e) for e in emas)


@given(st.lists(st.one_of(st.floats(0, 100), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=40),
       st.floats(0, 0.9999))
@settings(max_examples=200, deadline=None)
def test_ema_is_finite_and_equals_the_ema_of_finite_values(losses: list[float], decay: float) -> None:
    ema: float | None = None
    finite = [x for x in losses if math.isfinite(x)]
    for x in losses:
        ema = update_ema(ema, x, decay)
    expected: float | None = None
    for x in finite:
        expected = x if expected is None else decay * expected + (1 - decay) * x
    assert ema == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    ("ema", "loss", "spike"),
    [(0.05, 0.5, True), (0.04, 0.25, True), (0.1, 0.5, False), (None, 5.0, False), (0.01, 0.1, False),
     (0.05, math.nan, False)],
)
def test_spike_examples_of_section_5(ema: float | None, loss: float, spike: bool) -> None:
    assert is_loss_spike(loss, ema, spike_factor=8.0, abs_loss_threshold=0.2) is spike


def test_ema_is_updated_before_the_checks() -> None:
    # Prior ema 0.05, L = 0.5: updated ema = 0.98*0.05 + 0.02*0.5 = 0.059; 0.5 > 8*0.059 = 0.472 -> spike.
    _, decision = monitor_step(MonitorState(ema=0.05), stats(loss=0.5), ON, training=True)
    assert decision.ema == pytest.approx(0.059)
    assert R.LOSS_SPIKE in decision.reasons
    # Prior ema 0.06: updated 0.0688; 8x = 0.5504 > 0.5 -> no spike (the pre-update ema would have said spike).
    _, decision = monitor_step(MonitorState(ema=0.06), stats(loss=0.5), ON, training=True)
    assert R.LOSS_SPIKE not in decision.reasons


def test_reasons() -> None:
    s = ON
    assert detect_reasons(stats(loss=math.nan, finite=False), 1.0, s, True) == (R.NONFINITE_LOSS, R.NONFINITE_LOGITS)
    assert detect_reasons(stats(max_abs=201.0), 1.0, s, True) == (R.LOGIT_OVERFLOW_LIKE,)
    assert detect_reasons(stats(acc=0.0), 1.0, s, True) == (R.ZERO_TOKEN_ACC,)
    assert detect_reasons(stats(acc=0.0, n=63), 1.0, s, True) == ()  # below min_supervised_tokens
    # low_token_acc needs the spike condition too.
    assert detect_reasons(stats(loss=0.5, acc=0.005), 0.05, s, True) == (R.LOSS_SPIKE, R.LOW_TOKEN_ACC)
    assert detect_reasons(stats(loss=0.5, acc=0.005), 0.1, s, True) == ()
    # eval: no loss_spike reason, but the spike condition still gates low_token_acc.
    assert detect_reasons(stats(loss=0.5, acc=0.005), 0.05, s, False) == (R.LOW_TOKEN_ACC,)
    off = InstabilitySettings(enabled=True, detect_nonfinite=False, detect_loss_spike=False, detect_low_acc=False)
    assert detect_reasons(stats(loss=math.nan, finite=False, acc=0.0), 0.05, off, True) == ()


def test_eval_does_not_update_the_ema() -> None:
    state = MonitorState(ema=1.0)
    new, decision = monitor_step(state, stats(loss=50.0), ON, training=False)
    assert new.ema == 1.0 and decision.ema == 1.0


def test_early_stop_forces_the_guard_in_train_only() -> None:
    cfg = InstabilitySettings(enabled=True, early_stop=EarlyStopSettings(enabled=True))
    _, d = monitor_step(MonitorState(ema=1.0), stats(acc=0.0), cfg, training=True)
    assert d.stop_requested and d.guard
    _, d = monitor_step(MonitorState(ema=1.0), stats(acc=0.0), cfg, training=False)
    assert not d.stop_requested and not d.guard
    _, d = monitor_step(MonitorState(ema=1.0), stats(max_abs=500.0), cfg, training=True)
    assert d.reasons == (R.LOGIT_OVERFLOW_LIKE,) and not d.stop_requested and not d.guard


def test_guard_modes() -> None:
    guard = InstabilitySettings(enabled=True, guard=GuardSettings(enabled=True))
    _, d = monitor_step(MonitorState(ema=1.0), stats(max_abs=500.0), guard, training=True)
    assert d.guard
    _, d = monitor_step(MonitorState(ema=1.0), stats(max_abs=500.0), guard, training=False)
    assert not d.guard
    in_eval = InstabilitySettings(enabled=True, guard=GuardSettings(enabled=True, in_eval=True))
    _, d = monitor_step(MonitorState(ema=1.0), stats(max_abs=500.0), in_eval, training=False)
    assert d.guard
    _, d = monitor_step(MonitorState(ema=1.0), stats(), guard, training=True)
    assert not d.guard and not d.triggered


def test_disabled_monitor_decides_nothing() -> None:
    state, d = monitor_step(MonitorState(ema=None, disabled=True), stats(loss=math.nan), ON, training=True)
    assert d.reasons == () and state.ema is None
    _, d = monitor_step(MonitorState(), stats(loss=math.nan), InstabilitySettings(), training=True)
    assert d.reasons == ()


def test_stop_flags_agree_across_ranks() -> None:
    ranks = [stop_flags(False), stop_flags(True)]
    reduced = [max(f[0] for f in ranks)]
    assert should_stop(reduced)
    assert not should_stop([max(stop_flags(False)[0], stop_flags(False)[0])])


def test_event_and_file_names() -> None:
    _, d = monitor_step(MonitorState(ema=0.05), stats(loss=math.nan, finite=False), ON, training=True)
    event = instability_event(d, stats(loss=math.nan, finite=False), training=True, global_step=12, epoch=0.5,
                              rank=1, learning_rate=resolve_learning_rate(None, 2e-4, 1e-3), meta_json="x" * 30000)
    assert set(event) == {"mode", "reasons", "global_step", "epoch", "rank", "loss", "ema_loss", "learning_rate",
                          "supervised_tokens", "token_acc", "max_abs_logit", "finite_loss", "finite_logits", "meta_json"}
    assert event["reasons"] == ["nonfinite_loss", "nonfinite_logits"]
    assert event["loss"] is None and event["finite_loss"] is False and event["learning_rate"] == 2e-4
    assert len(event["meta_json"]) == 20000  # type: ignore[arg-type]
    json.dumps(event, allow_nan=False)
    assert events_file_name(3) == "events.rank3.jsonl"
    assert samples_file_name(40, False, 0) == "samples_step40_eval_rank0.json"
    assert default_dump_dir("out/run1") == "out/run1/instability_dumps"
    assert resolve_learning_rate(1e-4, 2e-4, 3e-4) == 1e-4
    assert resolve_learning_rate(None, None, 3e-4) == 3e-4


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"spike_factor": 0.0}, "spike_factor"),
        ({"abs_loss_threshold": -1.0}, "abs_loss_threshold"),
        ({"min_supervised_tokens": -1}, "min_supervised_tokens"),
        ({"max_meta_samples": 1.5}, "max_meta_samples"),
        ({"min_token_acc": 1.5}, "min_token_acc"),
        ({"max_abs_logit": math.inf}, "max_abs_logit"),
        ({"early_stop": EarlyStopSettings(enabled=True, on_reasons=("nan_loss",))}, "early_stop.on_reasons[0]"),
    ],
)
def test_settings_rules_name_the_dotted_key(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError, match=r"objective\.instability_monitor\." + path.replace(".", r"\.").replace("[", r"\[")):
        InstabilitySettings(**kwargs)  # type: ignore[arg-type]


def test_defaults_of_section_5() -> None:
    d = InstabilitySettings()
    assert (d.enabled, d.max_meta_samples, d.ema_decay, d.spike_factor, d.abs_loss_threshold) == (False, 16, 0.98, 8.0, 0.2)
    assert (d.min_supervised_tokens, d.min_token_acc, d.max_abs_logit) == (64, 0.01, 200.0)
    assert (d.detect_nonfinite, d.detect_loss_spike, d.detect_low_acc, d.dump_samples, d.dump_dir) == (True, True, True, False, None)
    assert d.early_stop == EarlyStopSettings(False, ("zero_token_acc",)) and d.guard == GuardSettings(False, False)
