"""Object order (data.md §2.5, D6): anchors, the canonical sort key, the loader's order check, and
the seeded per-sample shuffle of ``data.ordering: random``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from domain.errors import GeometryError
from domain.objects import DetObject, GeometryKind

_GOLDEN = 0x9E3779B1
_MASK32 = 0xFFFFFFFF


def anchor(obj: DetObject) -> tuple[int, int]:
    """``(anchor_y, anchor_x)``: bbox -> ``(y1, x1)``; poly -> ``(min y, min x)`` over all vertices
    (the two minima may come from different vertices; never the first vertex's x)."""
    bins = obj.bins
    if obj.kind is GeometryKind.BBOX:
        if len(bins) != 4:
            raise GeometryError(f"bbox_2d: must contain exactly 4 values; got len={len(bins)}")
        return (bins[1], bins[0])
    if len(bins) < 2 or len(bins) % 2:
        raise GeometryError(f"poly: must contain an even number of values; got len={len(bins)}")
    return (min(bins[1::2]), min(bins[0::2]))


def sort_key(obj: DetObject) -> tuple[int, int, tuple[int, ...], str]:
    """``(anchor_y, anchor_x, flat bins, desc)``, compared in bins."""
    ay, ax = anchor(obj)
    return (ay, ax, tuple(obj.bins), obj.desc)


def sort_objects(objects: Iterable[DetObject]) -> tuple[DetObject, ...]:
    """Canonical top-left-to-bottom-right order; stable, so exact duplicates keep their order."""
    return tuple(sorted(objects, key=sort_key))


class OrderViolation(NamedTuple):
    """Object ``object_index`` has an anchor after the anchor of object ``object_index + 1``."""

    object_index: int
    anchor: tuple[int, int]
    next_anchor: tuple[int, int]

    @property
    def reason(self) -> str:
        (ay, ax), (by, bx) = self.anchor, self.next_anchor
        return (
            f"not top-left-to-bottom-right sorted: objects[{self.object_index}] anchor (y={ay}, x={ax}) "
            f"before objects[{self.object_index + 1}] anchor (y={by}, x={bx})"
        )

    @property
    def message(self) -> str:
        return f"objects: {self.reason}"


def first_order_violation(objects: Sequence[DetObject]) -> OrderViolation | None:
    """The first adjacent pair whose anchors decrease (``data.ordering: sorted`` check), or None.

    Only anchors are compared (non-decreasing ``(ay, ax)``); ties in the anchor are accepted.
    """
    anchors = [anchor(o) for o in objects]
    for i in range(len(anchors) - 1):
        if anchors[i] > anchors[i + 1]:
            return OrderViolation(i, anchors[i], anchors[i + 1])
    return None


def mix_seed(base: int, *parts: int) -> int:
    """``base XOR ((p0+1)*0x9E3779B1 mod 2^32) XOR ((p1+2)*0x9E3779B1 mod 2^32) ...``, mod 2^32."""
    for value in (base, *parts):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"mix_seed takes integers, got {value!r}")
    seed = base & _MASK32
    for i, part in enumerate(parts):
        seed ^= ((part + i + 1) * _GOLDEN) & _MASK32
    return seed


def shuffled_objects(
    objects: Sequence[DetObject], run_seed: int, epoch: int, record_index: int
) -> tuple[DetObject, ...]:
    """The per-sample order under ``data.ordering: random``: ``random.Random(mix_seed(run_seed,
    epoch, record_index)).shuffle`` of the stored order. A pure function of its arguments, so the
    main process and every dataloader worker agree as long as the epoch reaches them."""
    order = list(objects)
    random.Random(mix_seed(run_seed, epoch, record_index)).shuffle(order)
    return tuple(order)
