"""Post-rollout packing of Stage-2 segments (stage2.md §12 items 2-6), as pure functions of segment lengths.

A *segment* is one sample's teacher-forced encoding; its ``encoded_len`` is all the planner reads. Capacity
``packing_length`` is ``training.max_length`` and the buffer bound is ``training.packing_buffer``: both come
from :class:`domain.packing.PackingSettings`, the Stage-1 planner's settings.

- :class:`CarryBuffer` (scope ``micro``): segments wait across micro-steps in insertion order; an over-length
  segment is refused at insertion (the message is :func:`domain.stage2_targets.check_encoded_length`'s, the
  one owner of the segment over-length wording) and a push that would exceed ``packing_buffer`` is refused
  without touching the buffer. :func:`select_carry_pack` chooses each pack (item 3).
- :func:`schedule_window` (scope ``window``): the LPT placement of one window's segments into exactly ``gas``
  packs (item 5); infeasible -> :class:`WindowScheduleInfeasible` (Stage-2 AB falls back to carry packing).
- :func:`adaptive_raw_count` (item 6): the raw-sample count that should fill the next pack.
- :class:`PackLayout` (item 4): per-segment offsets (cumulative ``encoded_len``) that shift labels, positions
  and coord groups of a packed row; the cumulative boundaries are :func:`domain.packing.cu_seq_lens`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Generic, Protocol, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from domain.errors import InvariantViolation, StepError
from domain.packing import PackingSettings, cu_seq_lens, member_starts
from domain.stage2_targets import SampleRef, check_encoded_length

Int64Array = npt.NDArray[np.int64]
Int32Array = npt.NDArray[np.int32]

FILL_KEY = "packing/post_rollout_fill"
SELECTED_TOTAL_KEY = "packing/post_rollout_selected_total_len"
SEGMENTS_KEY = "packing/post_rollout_segments"
BUFFER_KEY = "packing/post_rollout_buffer"


class WindowScheduleInfeasible(StepError):
    """One window's segments cannot be placed into exactly ``gas`` packs (§12 item 5)."""


class Segment(Protocol):
    """What the packer reads of a segment: its encoded length and the raw sample it came from."""

    @property
    def encoded_len(self) -> int: ...

    @property
    def sample(self) -> SampleRef: ...


S = TypeVar("S", bound=Segment)


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    out = [int(n) for n in lengths]
    bad = [i for i, n in enumerate(out) if n <= 0]
    if bad:
        raise InvariantViolation(f"segment lengths must be > 0; positions {bad[:20]}")
    return out


def check_segment_length(encoded_len: int, packing_length: int, sample: SampleRef) -> None:
    """§12 item 2: a segment longer than ``packing_length`` is refused at insertion (equal is allowed)."""
    try:
        check_encoded_length(encoded_len, packing_length, sample)
    except StepError as exc:
        raise StepError(
            f"post-rollout packing refused a segment at insertion (packing_length={packing_length}): {exc}"
        ) from exc


# --------------------------------------------------------------------------------------------
# Carry-mode pack selection (item 3)
# --------------------------------------------------------------------------------------------


def fifo_greedy(lengths: Sequence[int], capacity: int) -> tuple[int, ...]:
    """The baseline: scan in insertion order from the pinned oldest segment, add each one that still fits."""
    lengths = _check_lengths(lengths)
    if lengths and lengths[0] > capacity:
        raise InvariantViolation(f"the oldest segment ({lengths[0]}) is longer than the capacity {capacity}")
    chosen: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if total + n <= capacity:
            chosen.append(i)
            total += n
    return tuple(chosen)


def first_fit_decreasing(lengths: Sequence[int], positions: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing of ``positions`` (by length descending, ties by position) into bins of ``capacity``.

    Positions longer than ``capacity`` fit in no bin and are left out. Bins are in creation order, each
    holding positions in placement order.
    """
    order = sorted((p for p in positions if lengths[p] <= capacity), key=lambda p: (-lengths[p], p))
    bins: list[list[int]] = []
    totals: list[int] = []
    for p in order:
        for b, total in enumerate(totals):
            if total + lengths[p] <= capacity:
                bins[b].append(p)
                totals[b] += lengths[p]
                break
        else:
            bins.append([p])
            totals.append(lengths[p])
    return bins


def select_carry_pack(lengths: Sequence[int], capacity: int) -> tuple[int, ...]:
    """§12 item 3: the buffer positions (insertion order) of the next pack; ``()`` for an empty buffer.

    The oldest segment (position 0) is pinned. Baseline: :func:`fifo_greedy`. Candidate: the pinned segment
    plus the best :func:`first_fit_decreasing` bin of the rest in the residual capacity (max total, then fewer
    segments, then lexicographically smallest sorted positions); used only if its total is strictly larger.
    Example (capacity 10): ``[6, 3, 2, 2, 2]`` -> ``(0, 2, 3)`` (FIFO gives ``(0, 1)``, fill 9).
    """
    lengths = _check_lengths(lengths)
    if not lengths:
        return ()
    baseline = fifo_greedy(lengths, capacity)
    residual = capacity - lengths[0]
    bins = first_fit_decreasing(lengths, range(1, len(lengths)), residual)
    if not bins:
        return baseline
    best = min((sorted(b) for b in bins), key=lambda b: (-sum(lengths[p] for p in b), len(b), b))
    candidate = (0, *best)
    if sum(lengths[p] for p in candidate) > sum(lengths[p] for p in baseline):
        return candidate
    return baseline


def _buffer_overflow_message(held: int, pushing: int, bound: int) -> str:
    return (
        f"post-rollout packing buffer overflow: {held} segment(s) held + {pushing} pushed would exceed "
        f"training.packing_buffer={bound}; the buffer is unchanged. Mitigations: raise "
        "training.packing_buffer or lower rollout.generate_batch_size."
    )


@attrs.define
class CarryBuffer(Generic[S]):
    """The carry buffer of scope ``micro`` (§12 items 2, 3): segments in insertion order, packs taken from it.

    Stage-2 AB keeps one buffer per channel. Every refusal leaves the buffer exactly as it was.
    """

    settings: PackingSettings
    _items: list[S] = attrs.field(factory=list, init=False)
    _inserted: int = attrs.field(default=0, init=False)

    @property
    def packing_length(self) -> int:
        return self.settings.max_length

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[S]:
        return iter(tuple(self._items))

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(int(s.encoded_len) for s in self._items)

    @property
    def inserted_total(self) -> int:
        """Segments ever pushed (their insertion indices are ``0 .. inserted_total - 1``)."""
        return self._inserted

    def push(self, segments: Sequence[S]) -> None:
        """Append ``segments`` in order, or refuse all of them (over-length, or over ``packing_buffer``)."""
        for seg in segments:
            check_segment_length(int(seg.encoded_len), self.packing_length, seg.sample)
        _check_lengths([s.encoded_len for s in segments])
        if len(self._items) + len(segments) > self.settings.packing_buffer:
            raise StepError(
                _buffer_overflow_message(len(self._items), len(segments), self.settings.packing_buffer)
            )
        self._items.extend(segments)
        self._inserted += len(segments)

    def next_pack(self) -> tuple[int, ...]:
        """The buffer positions :func:`select_carry_pack` would take now (nothing is removed)."""
        return select_carry_pack(self.lengths, self.packing_length)

    def pop_pack(self) -> tuple[S, ...]:
        """Remove and return the next pack's segments in insertion order; ``()`` when empty."""
        chosen = self.next_pack()
        taken = set(chosen)
        pack = tuple(self._items[p] for p in chosen)
        self._items = [s for p, s in enumerate(self._items) if p not in taken]
        return pack


# --------------------------------------------------------------------------------------------
# Window scope (item 5)
# --------------------------------------------------------------------------------------------


def schedule_window(lengths: Sequence[int], packing_length: int, gas: int) -> tuple[tuple[int, ...], ...]:
    """§12 item 5: all of one window's segments in exactly ``gas`` packs (segment indices, insertion order).

    Requires ``#segments >= gas`` and ``Σ len <= gas·packing_length``. LPT: pack ``j`` is seeded with the
    ``j``-th longest segment (ties by index); each remaining segment, longest first, goes into the least-filled
    pack it fits (ties: lowest pack). Anything infeasible raises :class:`WindowScheduleInfeasible`.
    Example: ``[9, 9, 9]``, capacity 10, gas 2 -> infeasible.
    """
    if isinstance(gas, bool) or not isinstance(gas, int) or gas < 1:
        raise InvariantViolation(f"gas (gradient accumulation steps) must be an integer >= 1; got {gas!r}")
    lengths = _check_lengths(lengths)
    total = sum(lengths)
    where = f"{len(lengths)} segment(s) of total length {total}, packing_length={packing_length}, gas={gas}"
    if len(lengths) < gas:
        raise WindowScheduleInfeasible(f"window scheduling infeasible: fewer segments than gas ({where})")
    if total > gas * packing_length:
        raise WindowScheduleInfeasible(f"window scheduling infeasible: Σ len > gas·packing_length ({where})")
    longest = [i for i, n in enumerate(lengths) if n > packing_length]
    if longest:
        raise WindowScheduleInfeasible(
            f"window scheduling infeasible: segment {longest[0]} has encoded_len={lengths[longest[0]]} ({where})"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = [[i] for i in order[:gas]]
    fills = [lengths[i] for i in order[:gas]]
    for i in order[gas:]:
        fits = [j for j in range(gas) if fills[j] + lengths[i] <= packing_length]
        if not fits:
            raise WindowScheduleInfeasible(
                f"window scheduling infeasible: segment {i} (encoded_len={lengths[i]}) fits no pack "
                f"(fills {fills}; {where})"
            )
        j = min(fits, key=lambda k: (fills[k], k))
        packs[j].append(i)
        fills[j] += lengths[i]
    return tuple(tuple(sorted(p)) for p in packs)


# --------------------------------------------------------------------------------------------
# Adaptive raw stacking (item 6)
# --------------------------------------------------------------------------------------------


def pack_fill(total: int, packing_length: int) -> Fraction:
    """``packing/post_rollout_fill`` exactly: selected length / packing_length."""
    if packing_length <= 0:
        raise InvariantViolation(f"packing_length must be > 0; got {packing_length}")
    return Fraction(int(total), int(packing_length))


def adaptive_raw_count(
    current: int, n_segments: int, last_fill: Fraction | float, min_fill_ratio: float
) -> int:
    """§12 item 6: after a pack of ``n_segments`` filled below ``min_fill_ratio``, the raw-sample count per
    micro-step rises to at least ``ceil(n_segments · min_fill_ratio / last_fill)``; otherwise it stays.

    Exact rationals (a float ratio is read as its decimal): 2 segments at fill 0.4, min 0.65 -> 4;
    3 at 0.4, min 0.8 -> 6 (float arithmetic gives 6.000000000000001 -> 7).
    """
    fill = last_fill if isinstance(last_fill, Fraction) else Fraction(str(last_fill))
    ratio = Fraction(str(min_fill_ratio))
    if not 0 < fill <= 1:
        raise InvariantViolation(f"last_fill must be in (0, 1]; got {last_fill}")
    if not 0 < ratio <= 1:
        raise InvariantViolation(f"packing_min_fill_ratio must be in (0, 1]; got {min_fill_ratio}")
    if n_segments < 1 or current < 1:
        raise InvariantViolation(f"need n_segments >= 1 and current >= 1; got {n_segments}, {current}")
    if fill >= ratio:
        return current
    return max(current, math.ceil(n_segments * ratio / fill))


# --------------------------------------------------------------------------------------------
# One packed row (item 4)
# --------------------------------------------------------------------------------------------


def _length_tuple(lengths: Sequence[int]) -> tuple[int, ...]:
    return tuple(_check_lengths(lengths))


@attrs.frozen
class PackLayout:
    """Where each segment of one packed row starts: ``offsets[k]`` = Σ ``encoded_len`` of segments before k."""

    lengths: tuple[int, ...] = attrs.field(converter=_length_tuple)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def offsets(self) -> Int64Array:
        return member_starts(self.lengths)

    @property
    def cu_seq_lens(self) -> Int32Array:
        """``[0, l1, l1+l2, ..., T]``: what flash attention's ``cu_seq_lens`` must equal (§10 debug asserts)."""
        return cu_seq_lens(self.lengths)

    def shift(self, k: int, positions: Sequence[int] | Int64Array) -> Int64Array:
        """Segment ``k``'s positions (labels, coord groups, desc spans) as positions of the packed row."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= self.lengths[k]):
            raise InvariantViolation(f"segment {k}: a position lies outside [0, {self.lengths[k]})")
        out: Int64Array = pos + int(self.offsets[k])
        return out

    def concat(self, rows: Sequence[Sequence[int] | Int64Array]) -> Int64Array:
        """The packed row of per-segment rows (labels, input ids): their concatenation, lengths checked."""
        if len(rows) != len(self.lengths):
            raise InvariantViolation(f"{len(rows)} rows for {len(self.lengths)} segments")
        arrays = [np.asarray(r, dtype=np.int64) for r in rows]
        for k, (a, n) in enumerate(zip(arrays, self.lengths)):
            if a.shape != (n,):
                raise InvariantViolation(f"segment {k}: row of shape {a.shape}, expected ({n},)")
        if not arrays:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(arrays)


def pack_gauges(pack_lengths: Sequence[int], packing_length: int, buffer_left: int) -> dict[str, float]:
    """The §18.5 packing gauges of one pack: fill, selected total, segments, segments left in the buffer."""
    total = sum(int(n) for n in pack_lengths)
    return {
        FILL_KEY: float(pack_fill(total, packing_length)),
        SELECTED_TOTAL_KEY: float(total),
        SEGMENTS_KEY: float(len(pack_lengths)),
        BUFFER_KEY: float(buffer_left),
    }
