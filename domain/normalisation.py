"""Stage-1 normalisation per optimizer step (stage1.md §1.4, rules R1-R7): the one owner of the formulas.

The float64 reference (``domain.losses``), the torch kernel (``adapters.torch.coord_loss``) and the trainer
(``adapters.swift.stage1_trainer``) all call these: what a micro-batch contributes (:class:`MicroBatchSums`),
the step's global counts from the window pre-pass (R6, :class:`StepCounts`), the value each micro-batch
returns for backward (R3, :func:`micro_batch_lambda`, on floats or tensors), the step objective (R1), the
logged ``loss`` (R4) and ``eval_loss`` (R5), and the monitor's per-micro-batch objective. R2 (no /G, no
second ×W), R7 (a micro-batch with nothing counted returns a graph-connected zero) are the kernel's to
honour with these values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import attrs

from domain.errors import InvariantViolation


class _Scalar(Protocol):
    """A float or a 0-d tensor: what λ is computed on."""

    def __add__(self: S, other: S, /) -> S: ...

    def __truediv__(self: S, other: int, /) -> S: ...

    def __rmul__(self: S, other: int, /) -> S: ...


S = TypeVar("S", bound=_Scalar)


@attrs.frozen
class MicroBatchSums:
    """What one micro-batch contributes to the step objective (§1.4).

    ``sum_ce`` runs over N in distributional mode and over T in pure-CE mode; ``sum_coord`` is
    Σ_C ℓ_coord (0 in pure-CE mode, where the coord block is a metric only).
    """

    sum_ce: float
    sum_coord: float
    num_noncoord: int
    num_coord: int
    distributional: bool = True
    num_correct: int = 0  # token_acc numerator: full-vocab argmax == target over T (§1.5)

    @property
    def num_supervised(self) -> int:
        return self.num_noncoord + self.num_coord

    @property
    def ce_count(self) -> int:
        """The count the CE sum runs over: |N| (distributional) or |T| (pure-CE)."""
        return self.num_noncoord if self.distributional else self.num_supervised




@attrs.frozen
class StepCounts:
    """Global counts of one optimizer step (R6): summed over the window's micro-batches and all ranks."""

    noncoord: int
    coord: int

    @property
    def supervised(self) -> int:
        return self.noncoord + self.coord

    def __add__(self, other: StepCounts) -> StepCounts:
        return StepCounts(self.noncoord + other.noncoord, self.coord + other.coord)

    @classmethod
    def of_window(cls, supervised: int, coord: int) -> StepCounts:
        """R6 from the label pre-pass of a window: T supervised targets of which C are coord tokens."""
        if coord < 0 or supervised < coord:
            raise InvariantViolation(f"window counts: {coord} coord targets of {supervised} supervised")
        return cls(noncoord=supervised - coord, coord=coord)

    def for_backward(self, distributional: bool) -> tuple[int, int]:
        """(n_step, c_step) that :func:`micro_batch_lambda` divides by: (N, C), or (T, 0) in pure-CE mode
        where CE runs over every supervised target and the coord block is a metric only (R3)."""
        return (self.noncoord, self.coord) if distributional else (self.supervised, 0)


def step_counts(micro_batches: Iterable[MicroBatchSums]) -> StepCounts:
    n = c = 0
    for mb in micro_batches:
        n += mb.num_noncoord
        c += mb.num_coord
    return StepCounts(n, c)


def _check_world_size(world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvariantViolation(f"world_size must be an int >= 1, got {world_size!r}")


def micro_batch_lambda(sum_ce: S, sum_coord: S, n_step: int, c_step: int, world_size: int) -> S:
    """R3: ``λ = W · [Σ ce / max(1, N_step) + Σ ℓ_coord / max(1, C_step)]``, on floats (this reference) or
    on the kernel's tensors (the value the trainer returns for backward: the same expression, graph kept).

    Pure-CE: pass Σ_T ce, ``sum_coord = 0`` and ``n_step = T_step`` (:meth:`StepCounts.for_backward`).
    Nothing else scales λ: no /G and no second ×W anywhere after this.
    """
    _check_world_size(world_size)
    return world_size * (sum_ce / max(1, int(n_step)) + sum_coord / max(1, int(c_step)))


def lambda_of(mb: MicroBatchSums, counts: StepCounts, world_size: int) -> float:
    """R3 for one micro-batch given the step's global counts (mode taken from the micro-batch)."""
    if mb.distributional:
        return micro_batch_lambda(mb.sum_ce, mb.sum_coord, counts.noncoord, counts.coord, world_size)
    return micro_batch_lambda(mb.sum_ce, 0.0, counts.supervised, 0, world_size)


def _mode_of(micro_batches: Sequence[MicroBatchSums]) -> bool:
    modes = {mb.distributional for mb in micro_batches}
    if len(modes) > 1:
        raise InvariantViolation("micro-batches of one step mix distributional and pure-CE sums")
    return modes.pop() if modes else True


def step_objective(micro_batches: Sequence[MicroBatchSums]) -> float:
    """R1: ``L_step`` over every micro-batch of the window on every rank (0, never NaN, on empty counts)."""
    distributional = _mode_of(micro_batches)
    counts = step_counts(micro_batches)
    sum_ce = math.fsum(mb.sum_ce for mb in micro_batches)
    if not distributional:
        return sum_ce / max(1, counts.supervised)
    sum_coord = math.fsum(mb.sum_coord for mb in micro_batches)
    return sum_ce / max(1, counts.noncoord) + sum_coord / max(1, counts.coord)


def eval_objective(micro_batches: Sequence[MicroBatchSums]) -> float:
    """R5: ``eval_loss`` from sums and counts over the whole eval set and all ranks (no ×W)."""
    return step_objective(micro_batches)


def eval_loss(sum_ce: float, sum_coord: float, ce_count: float, coord_count: float) -> float:
    """R5 from sums and counts already added over the eval set and all ranks: ``Σ ce / max(1, |CE|) +
    Σ ℓ_coord / max(1, |C|)`` (pure-CE: ``|CE|`` = T and ``sum_coord`` = 0)."""
    return sum_ce / max(1.0, ce_count) + sum_coord / max(1.0, coord_count)


def step_lambdas(
    windows: Sequence[Sequence[MicroBatchSums]],
) -> list[list[float]]:
    """R3 for a whole step: ``windows[r]`` are rank r's micro-batches; W = len(windows)."""
    world = len(windows)
    counts = step_counts(mb for w in windows for mb in w)
    return [[lambda_of(mb, counts, world) for mb in w] for w in windows]


def logged_step_loss(lambdas_per_rank: Sequence[Sequence[float]]) -> float:
    """R4: the logged train ``loss`` of one step = mean over ranks of Σ_m λ(m, r)."""
    if not lambdas_per_rank:
        raise InvariantViolation("logged_step_loss needs at least one rank")
    return math.fsum(math.fsum(r) for r in lambdas_per_rank) / len(lambdas_per_rank)


def logging_window_loss(step_losses: Sequence[float]) -> float | None:
    """R4: over a logging window the logged ``loss`` is the mean of the per-step values."""
    return math.fsum(step_losses) / len(step_losses) if step_losses else None


def micro_batch_objective(mb: MicroBatchSums) -> float:
    """``L_mb`` of the instability monitor (§5): independent of G, W and the window."""
    if mb.distributional:
        return mb.sum_ce / max(1, mb.num_noncoord) + mb.sum_coord / max(1, mb.num_coord)
    return mb.sum_ce / max(1, mb.num_supervised)
