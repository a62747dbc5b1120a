"""The duplicate monitor (stage2.md §18.7): duplicate-like boxes in one rollout, and their totals.

Over the valid bbox objects of one rollout, two objects are duplicate-like when their descriptions
are equal after casefolding and collapsing whitespace and their box IoU (norm1000 bins, boxes
canonicalised by min/max as in §6) is >= the threshold. Clusters are the connected components of
that relation. The same function feeds Channel-B metrics (``dup/raw/*``), the inference summary and
the evaluation report, so training and evaluation count duplicates alike. A monitor only: it never
changes supervision.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from domain.codec import MAX_BIN, check_bins, int_boxes_to_bins, pixels_to_bins, plain_canonical_bbox
from domain.errors import ArtifactError, ConfigError, GeometryError
from domain.geometry import pairwise_box_iou
from domain.objects import DetObject, GeometryKind

#: ``stage2_ab.channel_b.duplicate_monitor.iou_threshold`` default (stage2.md §20); also the inference summary's.
DEFAULT_DUPLICATE_IOU_THRESHOLD = 0.7
THRESHOLD_KEY = "stage2_ab.channel_b.duplicate_monitor.iou_threshold"


class DescribedShape(Protocol):
    """What the monitor reads of an object (``domain.objects.DetObject`` satisfies it)."""

    @property
    def desc(self) -> str: ...

    @property
    def kind(self) -> GeometryKind: ...

    @property
    def bins(self) -> tuple[int, ...]: ...


class PixelShape(Protocol):
    """An object in an image's pixel space (``gt_vs_pred.jsonl`` predictions, evaluation objects)."""

    @property
    def desc(self) -> str: ...

    @property
    def kind(self) -> GeometryKind: ...

    @property
    def points(self) -> tuple[int, ...]: ...


def objects_in_bins(objects: Iterable[PixelShape], width: int, height: int) -> tuple[DetObject, ...]:
    """Pixel objects back in norm1000 bins (the codec's pixel -> bin rule), for the monitor on artifacts."""
    return tuple(DetObject(o.desc, o.kind, pixels_to_bins(o.points, width, height)) for o in objects)


def _plain_box(points: Sequence[object], last_x: int, last_y: int) -> bool:
    if len(points) != 4:
        return False
    x1, y1, x2, y2 = points
    return (
        type(x1) is int and type(y1) is int and type(x2) is int and type(y2) is int
        and 0 <= x1 <= last_x and 0 <= x2 <= last_x and 0 <= y1 <= last_y and 0 <= y2 <= last_y
    )  # fmt: skip


def objects_in_bins_batch(images: Sequence[tuple[Sequence[PixelShape], int, int]]) -> list[tuple[DetObject, ...]]:
    """:func:`objects_in_bins` of many images at once: the boxes of plain in-range ints (the common case)
    go through :func:`domain.codec.int_boxes_to_bins` in one numpy pass; anything else takes the exact
    per-object path. Equal to
    ``[objects_in_bins(o, w, h) for o, w, h in images]`` (tests/domain/test_duplicates.py holds it)."""
    fast_points: list[Sequence[object]] = []
    fast_sizes: list[tuple[int, int]] = []
    slots: list[list[DetObject | None]] = []
    where: list[tuple[int, int]] = []
    for k, (objects, width, height) in enumerate(images):
        row: list[DetObject | None] = []
        plain_size = type(width) is int and type(height) is int and width > 0 and height > 0
        for j, o in enumerate(objects):
            points = o.points
            if plain_size and o.kind is GeometryKind.BBOX and _plain_box(points, width - 1, height - 1):
                fast_points.append(points)
                fast_sizes.append((width, height))
                where.append((k, j))
                row.append(None)
            else:
                row.append(DetObject(o.desc, o.kind, pixels_to_bins(o.points, width, height)))
        slots.append(row)
    for (k, j), box in zip(where, int_boxes_to_bins(fast_points, fast_sizes)):  # type: ignore[arg-type]
        o = images[k][0][j]
        slots[k][j] = DetObject(o.desc, o.kind, box)
    return [tuple(o for o in row if o is not None) for row in slots]


def artifact_line_objects(line: Mapping[str, Any]) -> tuple[DetObject, ...]:
    """The predictions of one ``gt_vs_pred.jsonl`` line (infer-eval-config.md §3.1) as objects in bins:
    ``coord_mode: pixel`` points go back through the codec, ``norm1000`` points are bins already."""
    where = f"gt_vs_pred line index={line.get('index')!r}"
    try:
        width, height = int(line["width"]), int(line["height"])
        preds = list(line.get("pred") or ())
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{where}: width/height/pred unreadable for the duplicate monitor: {exc!r}"
        ) from None
    pixel = line.get("coord_mode", "pixel") != "norm1000"
    out: list[DetObject] = []
    for j, pred in enumerate(preds):
        try:
            kind, points = GeometryKind(pred["type"]), [int(v) for v in pred["points"]]
            bins = pixels_to_bins(points, width, height) if pixel else points
            out.append(DetObject(str(pred.get("desc", "")), kind, bins))
        except (KeyError, TypeError, ValueError) as exc:  # GeometryError is a ValueError
            raise ArtifactError(f"{where}: pred[{j}]: unreadable for the duplicate monitor: {exc}") from None
    return tuple(out)


def duplicate_desc_key(desc: str) -> str:
    """The description as the monitor compares it: casefolded, whitespace runs collapsed, stripped."""
    return " ".join(desc.casefold().split())


@attrs.frozen
class DuplicateStats:
    """Per-rollout figures of §18.7.

    ``valid_objects``: bbox objects considered (polygons are skipped); ``pairs``: duplicate-like pairs;
    ``max_cluster_size``: largest cluster (1 when there is no duplicate, 0 objects included);
    ``excess_objects``: Σ over clusters of (size − 1); ``clusters``: the clusters of size >= 2 as input
    indices, each ascending, ordered by their first index.
    """

    valid_objects: int
    pairs: int
    max_cluster_size: int
    excess_objects: int
    clusters: tuple[tuple[int, ...], ...]


def _check_threshold(iou_threshold: float) -> None:
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)):
        raise ConfigError(f"{THRESHOLD_KEY}: expected a number, got {iou_threshold!r}")
    if not (math.isfinite(iou_threshold) and 0.0 < iou_threshold <= 1.0):
        raise ConfigError(f"{THRESHOLD_KEY}: must be in (0, 1], got {iou_threshold!r}")


def _canonical_box(obj: DescribedShape, index: int) -> tuple[int, int, int, int]:
    bins = obj.bins
    plain = plain_canonical_bbox(bins)
    if plain is not None:
        return plain
    where = f"objects[{index}]"
    if len(bins) != 4:
        raise GeometryError(f"{where}.bins: a bbox_2d needs exactly 4 values, got {len(bins)}")
    check_bins(bins, where)
    x1, y1, x2, y2 = (int(v) for v in bins)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _canonical_boxes(objects: Sequence[DescribedShape], index: Sequence[int]) -> npt.NDArray[np.int64]:
    """``[_canonical_box(objects[i], i) for i in index]`` as an ``(n, 4)`` int64 array; when every object there is a :class:`DetObject`
    (its converter makes the bins ``int``) with 4 bins, all in range, read and canonicalised at once."""
    n = len(index)
    if n and all(type(objects[i]) is DetObject and len(objects[i].bins) == 4 for i in index):
        try:
            arr = np.fromiter(
                itertools.chain.from_iterable(objects[i].bins for i in index), dtype=np.int64, count=4 * n
            ).reshape(n, 4)
        except OverflowError:
            arr = None
        if arr is not None and int(arr.min()) >= 0 and int(arr.max()) <= MAX_BIN:
            lo = np.minimum(arr[:, :2], arr[:, 2:])
            hi = np.maximum(arr[:, :2], arr[:, 2:])
            return np.concatenate([lo, hi], axis=1)
    boxes = [_canonical_box(objects[i], i) for i in index]
    return np.fromiter(itertools.chain.from_iterable(boxes), dtype=np.int64, count=4 * n).reshape(n, 4)


_OVERLAP_SCAN = 8  # groups up to this size are pre-scanned in Python; larger ones go to numpy directly


def _any_overlap(boxes: Sequence[tuple[int, int, int, int]]) -> bool:
    """True when two canonical boxes share a positive area. IoU >= a threshold > 0 needs that, so a
    group without it has no duplicate-like pair: the numpy IoU matrix is skipped, nothing changes."""
    for a, (ax1, ay1, ax2, ay2) in enumerate(boxes):
        for bx1, by1, bx2, by2 in boxes[a + 1 :]:
            if min(ax2, bx2) > max(ax1, bx1) and min(ay2, by2) > max(ay1, by1):
                return True
    return False


_GLOBAL_MATRIX_MAX = 256  # up to this many boxes, one IoU matrix over all of them (masked by desc key)


@functools.lru_cache(maxsize=8)
def _upper(n: int) -> npt.NDArray[np.bool_]:
    """``np.triu(ones((n, n)), k=1)`` as booleans (read-only, shared)."""
    mask = np.triu(np.ones((n, n), dtype=np.bool_), k=1)
    mask.flags.writeable = False
    return mask


def _duplicate_pairs(
    keys: Sequence[str], box_array: npt.NDArray[np.int64], iou_threshold: float
) -> list[tuple[int, int]]:
    """Duplicate-like pairs ``(a, b)``, ``a < b`` (local indices): equal desc keys and box IoU >= the threshold.

    Up to :data:`_GLOBAL_MATRIX_MAX` boxes, one :func:`pairwise_box_iou` matrix over all boxes (each entry
    equals the per-group matrix's: the same float64 operations per pair); more, one matrix per desc group.
    """
    n = len(box_array)
    if n <= _GLOBAL_MATRIX_MAX:
        code_of: dict[str, int] = {}
        codes = np.fromiter((code_of.setdefault(k, len(code_of)) for k in keys), dtype=np.int64, count=n)
        if len(code_of) == n:  # no two objects share a description
            return []
        same = codes[:, None] == codes[None, :]
        hit = same & _upper(n)
        if not hit.any():
            return []
        hit &= pairwise_box_iou(box_array, box_array) >= iou_threshold
        first, second = np.nonzero(hit)
        return list(zip(first.tolist(), second.tolist()))
    boxes: list[tuple[int, int, int, int]] = [tuple(b) for b in box_array.tolist()]
    groups: dict[str, list[int]] = {}
    for local, key in enumerate(keys):
        groups.setdefault(key, []).append(local)
    pairs: list[tuple[int, int]] = []
    for members in groups.values():
        if len(members) < 2 or (
            len(members) <= _OVERLAP_SCAN and not _any_overlap([boxes[m] for m in members])
        ):
            continue
        iou = pairwise_box_iou([boxes[m] for m in members], [boxes[m] for m in members])
        first, second = np.nonzero(np.triu(iou >= iou_threshold, k=1))
        pairs += [(members[a], members[b]) for a, b in zip(first.tolist(), second.tolist())]
    return pairs


def _components(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of size >= 2) of the undirected graph on ``0 .. n-1`` with edges ``pairs``:
    union-find with path halving; each component ascending."""
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members_of: dict[int, list[int]] = {}
    for node in sorted({v for pair in pairs for v in pair}):
        members_of.setdefault(root(node), []).append(node)
    return [m for m in members_of.values() if len(m) > 1]


def duplicate_stats(
    objects: Sequence[DescribedShape], iou_threshold: float = DEFAULT_DUPLICATE_IOU_THRESHOLD
) -> DuplicateStats:
    """§18.7 for one rollout: duplicate-like pairs, clusters and excess objects of its bbox objects."""
    _check_threshold(iou_threshold)
    index = [i for i, o in enumerate(objects) if o.kind is GeometryKind.BBOX]
    boxes = _canonical_boxes(objects, index)
    key_of: dict[str, str] = {}  # descriptions repeat: each distinct one keyed once
    keys = []
    for i in index:
        desc = objects[i].desc
        key = key_of.get(desc)
        if key is None:
            key = key_of[desc] = duplicate_desc_key(desc)
        keys.append(key)
    pairs = _duplicate_pairs(keys, boxes, iou_threshold)
    n = len(index)
    if not pairs:
        return DuplicateStats(valid_objects=n, pairs=0, max_cluster_size=1, excess_objects=0, clusters=())
    clusters = sorted(tuple(index[local] for local in m) for m in _components(n, pairs))
    return DuplicateStats(
        valid_objects=n,
        pairs=len(pairs),
        max_cluster_size=max(len(c) for c in clusters),
        excess_objects=sum(len(c) - 1 for c in clusters),
        clusters=tuple(clusters),
    )


@attrs.frozen
class DuplicateSummary:
    """Totals over rollouts with the §18.7 reductions: per-sample means and a ``sum/sum`` fraction.

    The means are None when there is no sample; ``excess_object_frac`` is 0.0 with no valid object.
    """

    iou_threshold: float
    samples: int
    samples_with_duplicates: int
    valid_objects: int
    pairs: int
    excess_objects: int
    max_cluster_size: int
    pairs_mean: float | None
    max_cluster_size_mean: float | None
    excess_object_frac: float

    def to_json(self) -> dict[str, int | float | None]:
        return attrs.asdict(self)

    def metrics(self) -> dict[str, float]:
        """The ``dup/raw/*`` registry keys; the per-sample means are omitted when there is no sample."""
        out: dict[str, float] = {}
        if self.pairs_mean is not None and self.max_cluster_size_mean is not None:
            out["dup/raw/pairs"] = self.pairs_mean
            out["dup/raw/max_cluster_size"] = self.max_cluster_size_mean
        out["dup/raw/excess_object_frac"] = self.excess_object_frac
        return out


def summarize_duplicates(
    rollouts: Iterable[Sequence[DescribedShape]], iou_threshold: float = DEFAULT_DUPLICATE_IOU_THRESHOLD
) -> DuplicateSummary:
    """:func:`duplicate_stats` of every rollout, combined: ``pairs`` and ``max_cluster_size`` as means
    over samples (``dup/raw/pairs``, ``dup/raw/max_cluster_size``), ``excess_object_frac`` as Σ excess
    objects / Σ valid objects (``dup/raw/excess_object_frac``); ``max_cluster_size`` is the largest of all."""
    _check_threshold(iou_threshold)
    items: list[DuplicateStats] = []
    for k, objects in enumerate(rollouts):
        try:
            items.append(duplicate_stats(objects, iou_threshold))
        except GeometryError as exc:
            raise GeometryError(f"rollouts[{k}].{exc}") from None
    return summarize_duplicate_stats(items, iou_threshold)


def summarize_duplicate_stats(
    items: Sequence[DuplicateStats], iou_threshold: float = DEFAULT_DUPLICATE_IOU_THRESHOLD
) -> DuplicateSummary:
    """Per-rollout figures already computed (e.g. each Channel-B sample's ``counters.duplicates``),
    combined as :func:`summarize_duplicates` does; ``iou_threshold`` is the one they were computed with."""
    _check_threshold(iou_threshold)
    n = len(items)
    valid = sum(s.valid_objects for s in items)
    excess = sum(s.excess_objects for s in items)
    pairs = sum(s.pairs for s in items)
    return DuplicateSummary(
        iou_threshold=float(iou_threshold),
        samples=n,
        samples_with_duplicates=sum(1 for s in items if s.pairs > 0),
        valid_objects=valid,
        pairs=pairs,
        excess_objects=excess,
        max_cluster_size=max((s.max_cluster_size for s in items), default=1),
        pairs_mean=pairs / n if n else None,
        max_cluster_size_mean=sum(s.max_cluster_size for s in items) / n if n else None,
        excess_object_frac=excess / valid if valid else 0.0,
    )
