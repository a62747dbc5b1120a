"""The Stage-2 AB scheduler (stage2.md §14): which channel an optimizer step runs, and the realised B ratio.

- Step ``s`` (0-based ``global_step``) is a B step iff ``floor((s+1)·r) > floor(s·r)``, with ``r`` the exact
  rational ``Fraction(str(b_ratio))``: 0.29 over 100 steps gives exactly 29 B steps (float arithmetic gives 28).
  The schedule is a pure function of the step (no RNG), so a resumed run continues from its restored step.
- ``stage2_ab/b_ratio_realized`` (§18.1) is the mean of ``executed_b`` over the last 200 optimizer steps,
  each step counted once (the first call for its ``global_step``); 0 when nothing was counted yet.
"""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction

import attrs

from domain.errors import ConfigError, InvariantViolation

B_RATIO_KEY = "stage2_ab.schedule.b_ratio"
B_RATIO_REALIZED_KEY = "stage2_ab/b_ratio_realized"
REALIZED_WINDOW = 200


def b_ratio_fraction(b_ratio: object) -> Fraction:
    """The validated ``stage2_ab.schedule.b_ratio`` as the exact rational of its decimal spelling.

    Missing (``None``), not a finite number (a bool or a string included) or outside [0, 1] is a
    :class:`ConfigError` naming the key.
    """
    if isinstance(b_ratio, Fraction):
        value = b_ratio
    elif b_ratio is None:
        raise ConfigError(f"{B_RATIO_KEY}: required (a float in [0, 1]; e.g. 0.5 alternates A and B)")
    elif isinstance(b_ratio, bool) or not isinstance(b_ratio, (int, float)) or not math.isfinite(b_ratio):
        raise ConfigError(f"{B_RATIO_KEY}: must be a number in [0, 1]; got {b_ratio!r}")
    else:
        value = Fraction(str(b_ratio))
    if not 0 <= value <= 1:
        raise ConfigError(f"{B_RATIO_KEY}: must be in [0, 1]; got {b_ratio}")
    return value


def is_b_step(step: int, b_ratio: float | Fraction) -> bool:
    """§14: optimizer step ``step`` (0-based) runs Channel B iff ``floor((s+1)·r) > floor(s·r)``, exactly."""
    r = b_ratio_fraction(b_ratio)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvariantViolation(f"the optimizer step must be an integer >= 0; got {step!r}")
    p, q = r.numerator, r.denominator
    return ((step + 1) * p) // q > (step * p) // q


def b_steps_before(step: int, b_ratio: float | Fraction) -> int:
    """How many of the steps ``0 .. step-1`` are B steps: ``floor(step·r)`` (the sum of :func:`is_b_step`)."""
    r = b_ratio_fraction(b_ratio)
    if step < 0:
        raise InvariantViolation(f"the optimizer step must be >= 0; got {step}")
    return (step * r.numerator) // r.denominator


@attrs.frozen
class ABSchedule:
    """``stage2_ab.schedule``: the channel of every optimizer step. The channel is fixed for the whole window."""

    b_ratio: Fraction = attrs.field(converter=b_ratio_fraction)

    def is_b_step(self, step: int) -> bool:
        return is_b_step(step, self.b_ratio)

    def channel(self, step: int) -> str:
        """``"A"`` or ``"B"``."""
        return "B" if self.is_b_step(step) else "A"


def _positive_window(_inst: object, _attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvariantViolation(f"the realised-ratio window must be an integer > 0; got {value!r}")


@attrs.define
class RealizedBRatio:
    """The rolling ``executed_b`` window behind ``stage2_ab/b_ratio_realized`` (§14, §18.1).

    The trainer calls :meth:`record` once per optimizer step; a repeated call for a step already counted
    is ignored (micro-steps of one window, re-entries). A step older than the last counted one is a bug.
    ``executed_b`` is the scheduled channel, except in async mode where it is the gated decision.
    """

    window: int = attrs.field(default=REALIZED_WINDOW, validator=_positive_window)
    _executed: deque[int] = attrs.field(init=False)
    _last_step: int | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._executed = deque(maxlen=self.window)

    @classmethod
    def resumed(cls, schedule: ABSchedule, global_step: int, window: int = REALIZED_WINDOW) -> RealizedBRatio:
        """The tracker an uninterrupted run would hold before step ``global_step``: the scheduled channel
        of the last ``window`` steps (a pure function of the restored step; async gating is not replayed)."""
        tracker = cls(window)
        for s in range(max(0, global_step - window), global_step):
            tracker.record(s, schedule.is_b_step(s))
        return tracker

    def record(self, global_step: int, executed_b: bool) -> bool:
        """Count ``executed_b`` for ``global_step`` if it is the first call for that step; True if counted."""
        if self._last_step is not None:
            if global_step == self._last_step:
                return False
            if global_step < self._last_step:
                raise InvariantViolation(
                    f"realised B ratio: step {global_step} recorded after step {self._last_step} "
                    "(steps must not go backwards; build a fresh tracker with RealizedBRatio.resumed on resume)"
                )
        self._last_step = global_step
        self._executed.append(1 if executed_b else 0)
        return True

    @property
    def value(self) -> float:
        """The mean of the window; 0.0 when empty."""
        return sum(self._executed) / len(self._executed) if self._executed else 0.0

    @property
    def counted_steps(self) -> int:
        return len(self._executed)

    @property
    def last_step(self) -> int | None:
        return self._last_step
