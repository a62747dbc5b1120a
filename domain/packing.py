"""Packing: the static pack plan (data.md §8.2), per-sample restart positions (§8.4), boundaries (§8.5).

Everything here is a pure function of sample lengths and settings. The planner's bin-packing step
(:func:`best_fit_decreasing`) and the position/boundary helpers take plain lengths, so Stage-2's
post-rollout packer (stage2.md §12) can reuse them on segments without touching the static plan.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from fractions import Fraction

import attrs
import numpy as np
import numpy.typing as npt

from domain.errors import DataContractError, InvariantViolation

MAX_LISTED_SAMPLES = 20
PLAN_CACHE_FORMAT = 1

Int64Array = npt.NDArray[np.int64]
Int32Array = npt.NDArray[np.int32]

_MITIGATIONS = (
    "Mitigations: raise training.max_length, lower data.max_pixels and re-convert, "
    "or set data.convert.max_objects."
)


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"training.{attribute.alias}: must be an integer > 0; got {value!r}")


def _fill_ratio(_inst: object, _attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"training.packing_min_fill_ratio: must be in (0, 1]; got {value!r}")


@attrs.frozen
class PackingSettings:
    """The planner's settings (data.md §8.1): capacity C, buffer B, min fill ratio f, drop-last."""

    max_length: int = attrs.field(validator=_positive)
    packing_buffer: int = attrs.field(default=512, validator=_positive)
    packing_min_fill_ratio: float = attrs.field(default=0.65, validator=_fill_ratio)
    packing_drop_last: bool = False

    @property
    def capacity(self) -> int:
        return self.max_length

    @property
    def threshold(self) -> Fraction:
        """f*C exactly: the ratio is read as the decimal the user wrote (0.7*80 is 56, not 56.000...01)."""
        return Fraction(repr(float(self.packing_min_fill_ratio))) * self.max_length


@attrs.frozen
class Pack:
    """One emitted pack: sample indices in pack (bin) order and their lengths."""

    members: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def num_samples(self) -> int:
        return len(self.members)


@attrs.frozen
class PackPlanStats:
    """What the plan report records (data.md §8.2.8); fill is total / C."""

    packs: int
    samples: int
    mean_fill: float
    min_fill: float
    dropped_samples: int


@attrs.frozen
class PackPlan:
    packs: tuple[Pack, ...]
    dropped: tuple[int, ...]
    capacity: int
    # index of the first pack emitted by the final step (after the last sample); packs before it
    # all have total >= f*C
    final_step_start: int

    def __len__(self) -> int:
        return len(self.packs)

    def stats(self) -> PackPlanStats:
        fills = [p.total / self.capacity for p in self.packs]
        return PackPlanStats(
            packs=len(self.packs),
            samples=sum(p.num_samples for p in self.packs),
            mean_fill=float(np.mean(fills)) if fills else 0.0,
            min_fill=min(fills) if fills else 0.0,
            dropped_samples=len(self.dropped),
        )


def visit_order(num_samples: int, seed: int) -> list[int]:
    """Step 1 of §8.2: the order in which samples enter the planning buffer."""
    order = list(range(num_samples))
    random.Random(seed).shuffle(order)
    return order


def over_long_samples(lengths: Sequence[int], capacity: int) -> list[int]:
    """data.md §6.5 / §8.2.2: indices of the samples longer than C (equal to C is allowed).

    The one owner of the over-length rule: training's pre-pass (:func:`check_sample_lengths`) and
    ``validate_dataset`` both ask it.
    """
    return [i for i, n in enumerate(lengths) if n > capacity]


def check_sample_lengths(
    lengths: Sequence[int], capacity: int, locations: Sequence[str] | None = None
) -> None:
    """data.md §6.5 / §8.2.2: any sample longer than C is a data error; equal to C is allowed.

    ``locations[i]`` names sample i as ``<file>:<line>``; without it the message uses ``sample <i>``.
    """
    if locations is not None and len(locations) != len(lengths):
        raise InvariantViolation(f"{len(locations)} locations for {len(lengths)} sample lengths")
    too_long = over_long_samples(lengths, capacity)
    bad_nonpositive = [i for i, n in enumerate(lengths) if n <= 0]
    if bad_nonpositive:
        raise InvariantViolation(f"sample lengths must be > 0; sample indices {bad_nonpositive[:20]}")
    if not too_long:
        return
    where = [locations[i] if locations is not None else f"sample {i}" for i in too_long]
    shown = [f"{w} length={lengths[i]}" for w, i in zip(where[:MAX_LISTED_SAMPLES], too_long)]
    rest = len(too_long) - len(shown)
    if rest > 0:
        shown.append(f"... and {rest} more")
    raise DataContractError(
        f"{len(too_long)} sample(s) longer than training.max_length={capacity} "
        "(samples are never truncated):\n" + "\n".join(shown) + "\n" + _MITIGATIONS
    )


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing (§8.2.3) over positions ``0..len(lengths)-1``.

    Sort by length descending (ties: position ascending); put each item into the fullest open bin
    it fits in (sum <= capacity; ties: earliest created bin), else open a new bin. Returns bins in
    creation order, each holding positions in insertion order. Items longer than ``capacity`` are a
    caller error.
    """
    if any(n > capacity for n in lengths):
        raise InvariantViolation(f"an item is longer than the bin capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    totals: list[int] = []
    for i in order:
        n = lengths[i]
        best = -1
        for b, total in enumerate(totals):
            if total + n <= capacity and (best < 0 or total > totals[best]):
                best = b
        if best < 0:
            bins.append([i])
            totals.append(n)
        else:
            bins[best].append(i)
            totals[best] += n
    return bins


def plan_packs(
    lengths: Sequence[int],
    settings: PackingSettings,
    seed: int,
    *,
    order: Sequence[int] | None = None,
    locations: Sequence[str] | None = None,
) -> PackPlan:
    """The static pack plan of data.md §8.2.

    ``order`` overrides the visit order (default :func:`visit_order` of ``seed``); the worked
    examples of the spec are stated in visit order. Raises :class:`DataContractError` for samples
    longer than C and for an empty plan.
    """
    capacity = settings.capacity
    lengths = [int(n) for n in lengths]
    check_sample_lengths(lengths, capacity, locations)
    visit = list(order) if order is not None else visit_order(len(lengths), seed)
    if sorted(visit) != list(range(len(lengths))):
        raise InvariantViolation("the visit order must be a permutation of the sample indices")
    threshold = settings.threshold

    packs: list[Pack] = []
    buffer: list[int] = []

    def bins_of(window: list[int]) -> list[list[int]]:
        bins = best_fit_decreasing([lengths[s] for s in window], capacity)
        return [[window[p] for p in b] for b in bins]

    def as_pack(members: list[int]) -> Pack:
        return Pack(tuple(members), tuple(lengths[s] for s in members))

    for sample in visit:
        buffer.append(sample)
        if len(buffer) < settings.packing_buffer:
            continue
        carried: list[int] = []
        for members in bins_of(buffer):
            pack = as_pack(members)
            if pack.total < threshold:
                carried.extend(members)
            else:
                packs.append(pack)
        buffer = carried

    dropped: list[int] = []
    final_step_start = len(packs)
    for members in bins_of(buffer):
        pack = as_pack(members)
        if pack.total < threshold and settings.packing_drop_last:
            dropped.extend(members)
        else:
            packs.append(pack)

    if not packs:
        # name the data file(s): "<file>:<line>" locations, the line cut off at its last colon
        files = sorted({loc.rpartition(":")[0] or loc for loc in locations}) if locations else []
        where = f" for {', '.join(files)}" if files else ""
        raise DataContractError(
            f"empty pack plan{where}: N={len(lengths)} samples, C={capacity} (training.max_length), "
            f"f={settings.packing_min_fill_ratio} (training.packing_min_fill_ratio), "
            f"drop_last={settings.packing_drop_last}; add data or set training.packing_drop_last: false"
        )
    return PackPlan(tuple(packs), tuple(dropped), capacity, final_step_start)


# ---------------------------------------------------------------------------------------------
# Plan cache (§8.2): a fingerprint names every input the plan depends on.


def _text_tuple(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(texts)


@attrs.frozen
class PlanFingerprint:
    """Everything the static plan depends on (data.md §8.2); a mismatch means rebuild, never reuse."""

    jsonl_sha256: str
    tokenizer_sha256: str  # tokenizer files and chat template together
    prompt_texts: tuple[str, ...] = attrs.field(converter=_text_tuple)
    coord_mode: str
    field_order: str
    settings: PackingSettings
    seed: int

    def key(self) -> str:
        body = {
            "jsonl_sha256": self.jsonl_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "prompt_texts": list(self.prompt_texts),
            "coord_mode": self.coord_mode,
            "field_order": self.field_order,
            "max_length": self.settings.max_length,
            "packing_buffer": self.settings.packing_buffer,
            "packing_min_fill_ratio": repr(float(self.settings.packing_min_fill_ratio)),
            "packing_drop_last": self.settings.packing_drop_last,
            "seed": self.seed,
        }
        text = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("ascii")).hexdigest()


def _lengths_digest(lengths: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(n)) for n in lengths).encode("ascii")).hexdigest()


def plan_cache_text(plan: PackPlan, fingerprint: PlanFingerprint, lengths: Sequence[int]) -> str:
    """The cache file body: the fingerprint key, a digest of the lengths, the plan and its stats."""
    stats = plan.stats()
    body = {
        "format": PLAN_CACHE_FORMAT,
        "fingerprint": fingerprint.key(),
        "lengths_sha256": _lengths_digest(lengths),
        "capacity": plan.capacity,
        "packs": [list(p.members) for p in plan.packs],
        "dropped": list(plan.dropped),
        "final_step_start": plan.final_step_start,
        "stats": attrs.asdict(stats),
    }
    return json.dumps(body, sort_keys=True, ensure_ascii=True) + "\n"


def plan_from_cache_text(text: str, fingerprint: PlanFingerprint, lengths: Sequence[int]) -> PackPlan | None:
    """The cached plan if it was made from exactly these inputs, else None (the caller rebuilds)."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if (
        body.get("format") != PLAN_CACHE_FORMAT
        or body.get("fingerprint") != fingerprint.key()
        or body.get("lengths_sha256") != _lengths_digest(lengths)
        or body.get("capacity") != fingerprint.settings.max_length
    ):
        return None
    try:
        packs = tuple(
            Pack(tuple(int(s) for s in members), tuple(int(lengths[int(s)]) for s in members))
            for members in body["packs"]
        )
        dropped = tuple(int(s) for s in body["dropped"])
        final_step_start = int(body["final_step_start"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return PackPlan(packs, dropped, fingerprint.settings.max_length, final_step_start)


def cached_or_planned(
    cache_text: str | None,
    fingerprint: PlanFingerprint,
    lengths: Sequence[int],
    *,
    locations: Sequence[str] | None = None,
) -> tuple[PackPlan, bool]:
    """Reuse a cached plan whose fingerprint and lengths match, else plan again. Returns (plan, reused)."""
    if cache_text is not None:
        cached = plan_from_cache_text(cache_text, fingerprint, lengths)
        if cached is not None:
            return cached, True
    plan = plan_packs(lengths, fingerprint.settings, fingerprint.seed, locations=locations)
    return plan, False


# ---------------------------------------------------------------------------------------------
# Positions and boundaries of a packed row (§8.4, §8.5)


def cu_seq_lens(lengths: Sequence[int]) -> Int32Array:
    """``[0, l1, l1+l2, ..., T]`` as int32 (flash-attention's cumulative boundaries)."""
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:], dtype=np.int32)
    return out


def member_starts(lengths: Sequence[int]) -> Int64Array:
    return np.asarray(cu_seq_lens(lengths)[:-1], dtype=np.int64)


def text_position_row(lengths: Sequence[int]) -> Int64Array:
    """The text row of a packed row: ``0..l_i-1`` for every member in turn."""
    if not lengths:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])


def boundaries_from_text_row(text_row: Sequence[int] | Int64Array) -> Int32Array:
    """cu_seq_lens recovered from the text row alone: a member starts where a position is not previous + 1.

    The t/h/w rows are not sequential through image tokens and are never used for this (§8.4).
    """
    row = np.asarray(text_row, dtype=np.int64)
    if row.size == 0:
        return np.zeros(1, dtype=np.int32)
    starts = np.flatnonzero(np.diff(row, prepend=row[0] - 1) != 1)
    starts = np.concatenate([[0], starts[starts > 0]])
    return np.asarray(np.concatenate([starts, [row.size]]), dtype=np.int32)


def mrope_position_rows(
    token_ids: Sequence[int] | Int64Array,
    vision_token_id: int,
    image_grid_thw: Sequence[Sequence[int]] | Int64Array,
    spatial_merge_size: int,
) -> Int64Array:
    """The three mRoPE rows (t, h, w) of ONE sample, starting at 0 (data.md §8.4).

    Text tokens advance all three rows by 1. The placeholders of an image with merged grid
    ``gh x gw`` (``image_grid_thw = [t, gh*m, gw*m]``) starting at base s get ``t = s + frame``,
    ``h = s + r``, ``w = s + c`` (row-major); the next token gets ``s + max(gh, gw)``. Images are
    consumed in order from the placeholder runs; a placeholder count that does not match the grids
    is an :class:`InvariantViolation`.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    grids = [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)]
    rows = np.zeros((3, ids.size), dtype=np.int64)
    is_vision = ids == vision_token_id
    pos = 0
    i = 0
    g = 0
    while i < ids.size:
        if not is_vision[i]:
            rows[:, i] = pos
            pos += 1
            i += 1
            continue
        if g >= len(grids):
            raise InvariantViolation(
                f"vision placeholder at token {i} but only {len(grids)} image grid(s) were given"
            )
        t, h, w = grids[g]
        if h % spatial_merge_size or w % spatial_merge_size:
            raise InvariantViolation(
                f"image grid {grids[g]} is not divisible by merge size {spatial_merge_size}"
            )
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        count = t * gh * gw
        if i + count > ids.size or not bool(is_vision[i : i + count].all()):
            raise InvariantViolation(
                f"image {g} with grid {grids[g]} needs {count} consecutive placeholders from token {i}"
            )
        frame, rem = np.divmod(np.arange(count, dtype=np.int64), gh * gw)
        r, c = np.divmod(rem, gw)
        rows[0, i : i + count] = pos + frame
        rows[1, i : i + count] = pos + r
        rows[2, i : i + count] = pos + c
        pos += max(gh, gw)
        i += count
        g += 1
    if g != len(grids):
        raise InvariantViolation(f"{len(grids)} image grid(s) given but {g} placeholder run(s) found")
    return rows


def packed_position_ids(member_mrope_rows: Sequence[Int64Array]) -> Int64Array:
    """``[4, T]`` = ``[text; t; h; w]``: every member restarts at 0 on all four rows (§8.4)."""
    lengths = [int(r.shape[1]) for r in member_mrope_rows]
    for k, r in enumerate(member_mrope_rows):
        if r.ndim != 2 or r.shape[0] != 3:
            raise InvariantViolation(f"member {k}: mRoPE rows must have shape [3, l]; got {tuple(r.shape)}")
    text = text_position_row(lengths)
    if not member_mrope_rows:
        return np.zeros((4, 0), dtype=np.int64)
    mrope = np.concatenate([np.asarray(r, dtype=np.int64) for r in member_mrope_rows], axis=1)
    return np.concatenate([text[None, :], mrope], axis=0)
