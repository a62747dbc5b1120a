"""Geometry in bins: value objects, polygon canonical form, bridging helpers, box and mask IoU.

Rules: data.md §2.3 (kinds, bridging), §2.4 (polygon canonical form), stage2.md §6 step 4 (mask
IoU on an R x R virtual canvas). No helper drops, reorders or re-pairs coordinates except
:func:`canonicalize_polygon`, whose rules are the contract (and which never sorts vertices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from domain.codec import MAX_BIN
from domain.errors import GeometryError
from domain.objects import GeometryKind

N = TypeVar("N", int, float)

# Up-sampling factor of the boundary walk of the COCO polygon rasteriser (see mask_iou).
_RASTER_UPSAMPLE = 5


def _check_bins(values: Sequence[int], what: str) -> tuple[int, ...]:
    out: list[int] = []
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            raise GeometryError(f"{what}[{j}]: expected an integer bin, got {v!r}")
        if not 0 <= v <= MAX_BIN:
            raise GeometryError(f"{what}[{j}]: value {v} out of range 0..{MAX_BIN}")
        out.append(v)
    return tuple(out)


@attrs.frozen
class BBox:
    """An axis-aligned box in bins, ``x1 <= x2`` and ``y1 <= y2`` (zero extent allowed: predictions
    may carry it; the record contract additionally requires strict order, see ``is_degenerate``)."""

    x1: int
    y1: int
    x2: int
    y2: int

    def __attrs_post_init__(self) -> None:
        _check_bins((self.x1, self.y1, self.x2, self.y2), "bbox_2d")
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise GeometryError(f"bbox_2d: requires x1 <= x2 and y1 <= y2; got {list(self.flat)}")

    @classmethod
    def from_flat(cls, flat: Sequence[int]) -> BBox:
        if len(flat) != 4:
            raise GeometryError(f"bbox_2d: must contain exactly 4 values; got len={len(flat)}")
        return cls(flat[0], flat[1], flat[2], flat[3])

    @property
    def flat(self) -> tuple[int, int, int, int]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def is_degenerate(self) -> bool:
        """Zero width or height (``x1 == x2`` or ``y1 == y2``)."""
        return self.x1 == self.x2 or self.y1 == self.y2

    def to_quad(self) -> tuple[int, ...]:
        return bbox_to_quad(self.flat)


def _int_tuple(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(values)


@attrs.frozen
class Polygon:
    """One simple closed ring in bins, flat ``(x1, y1, x2, y2, ...)`` with >= 3 vertices, stored
    exactly as given (use :func:`canonicalize_polygon` to obtain the canonical form)."""

    flat: tuple[int, ...] = attrs.field(converter=_int_tuple)

    def __attrs_post_init__(self) -> None:
        if len(self.flat) % 2 or len(self.flat) < 6:
            raise GeometryError(
                f"poly: must contain an even number of values and at least 6; got len={len(self.flat)}"
            )
        _check_bins(self.flat, "poly")

    @property
    def vertices(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.flat[0::2], self.flat[1::2]))

    def to_bbox(self) -> BBox:
        return BBox.from_flat(poly_to_bbox(self.flat))


# ---------------------------------------------------------------------------------------------
# Shoelace, canonical form


def _pairs(flat: Sequence[N]) -> list[tuple[N, N]]:
    if len(flat) % 2:
        raise GeometryError(f"a flat coordinate list must have an even length; got len={len(flat)}")
    return list(zip(flat[0::2], flat[1::2]))


def _area2_of(vertices: Sequence[tuple[int, int]]) -> int:
    n = len(vertices)
    total = 0
    for i in range(n):
        x0, y0 = vertices[i]
        x1, y1 = vertices[(i + 1) % n]
        total += x0 * y1 - x1 * y0
    return total


def shoelace_area2(flat: Sequence[int]) -> int:
    """Twice the signed area ``sum(x_i*y_{i+1} - x_{i+1}*y_i)`` of a closed ring (exact on ints).

    With y growing downwards (screen coordinates), a positive value means clockwise on screen.
    """
    return _area2_of(_pairs(flat))


def polygon_area(flat: Sequence[float]) -> float:
    """Absolute area of a closed ring given as a flat list (any numbers)."""
    pts = _pairs(flat)
    n = len(pts)
    total = 0.0
    for i in range(n):
        x0, y0 = pts[i]
        x1, y1 = pts[(i + 1) % n]
        total += float(x0) * float(y1) - float(x1) * float(y0)
    return abs(total) / 2.0


def _dedup_cyclic(vertices: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Rule 1: drop any vertex equal to its predecessor, including a repeated closing vertex."""
    out: list[tuple[int, int]] = []
    for v in vertices:
        if not out or out[-1] != v:
            out.append(v)
    while len(out) > 1 and out[-1] == out[0]:
        out.pop()
    return out


def _start_index(vertices: Sequence[tuple[int, int]]) -> int:
    """Rule 4: index of the first vertex with the smallest ``(y, x)``."""
    best = 0
    for i, (x, y) in enumerate(vertices):
        bx, by = vertices[best]
        if (y, x) < (by, bx):
            best = i
    return best


def canonicalize_polygon(flat: Sequence[int]) -> tuple[int, ...] | None:
    """The canonical form of a ring in bins (data.md §2.4), or None when it is degenerate.

    1. drop a repeated closing vertex and any vertex equal to its predecessor (cyclically);
    2. fewer than 3 vertices left or zero shoelace sum -> degenerate (None);
    3. counter-clockwise on screen (``A2 < 0``) -> reverse the sequence (adjacency kept; vertices
       are never sorted by angle or coordinate);
    4. rotate so the first vertex with the smallest ``(y, x)`` comes first.
    """
    ring = _dedup_cyclic(_pairs(flat))
    if len(ring) < 3:
        return None
    area2 = _area2_of(ring)
    if area2 == 0:
        return None
    if area2 < 0:
        ring.reverse()
    start = _start_index(ring)
    ring = ring[start:] + ring[:start]
    return tuple(c for xy in ring for c in xy)


def polygon_canonical_problem(flat: Sequence[int]) -> str | None:
    """Which rule of §2.4 a stored polygon breaks (for the loader's message), or None if canonical.

    ``None`` exactly when ``canonicalize_polygon(flat) == tuple(flat)``.
    """
    vertices = _pairs(flat)
    n = len(vertices)
    if n >= 2 and vertices[-1] == vertices[0]:
        return "repeated closing vertex; the ring closes implicitly"
    for i in range(1, n):
        if vertices[i] == vertices[i - 1]:
            return f"vertex {i} repeats its predecessor"
    if n < 3:
        return f"fewer than 3 vertices ({n})"
    area2 = _area2_of(vertices)
    if area2 == 0:
        return "zero area (degenerate ring)"
    if area2 < 0:
        return "counter-clockwise on screen; must be clockwise (shoelace sum > 0)"
    start = _start_index(vertices)
    if start != 0:
        x, y = vertices[start]
        return f"must start at the vertex with the smallest (y, x), which is vertex {start} ({x}, {y})"
    return None


# ---------------------------------------------------------------------------------------------
# Bridging helpers (evaluation, visualisation)


def poly_to_bbox(flat: Sequence[N]) -> tuple[N, N, N, N]:
    """Tight bbox ``(min xs, min ys, max xs, max ys)`` of a flat polygon."""
    pts = _pairs(flat)
    if not pts:
        raise GeometryError("poly_to_bbox: empty polygon")
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def bbox_to_quad(xyxy: Sequence[N]) -> tuple[N, N, N, N, N, N, N, N]:
    """The box as a clockwise-on-screen quadrilateral ``(x1,y1, x2,y1, x2,y2, x1,y2)``."""
    if len(xyxy) != 4:
        raise GeometryError(f"bbox_to_quad: a bbox needs exactly 4 values; got len={len(xyxy)}")
    x1, y1, x2, y2 = xyxy
    return (x1, y1, x2, y1, x2, y2, x1, y2)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes (any numbers). A negative extent counts as 0; empty union -> 0.0."""
    if len(a) != 4 or len(b) != 4:
        raise GeometryError(f"box_iou: boxes need 4 values; got len={len(a)} and len={len(b)}")
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = area_a + area_b - inter
    if union <= 0.0:
        return 0.0
    return inter / union


def pairwise_box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """:func:`box_iou` of every row pair of two ``(n, 4)`` / ``(m, 4)`` xyxy arrays, shape ``(n, m)``;
    the same float64 operations in the same order, so each entry equals ``box_iou`` exactly."""
    p = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    g = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    area_a = np.maximum(0.0, p[..., 2] - p[..., 0]) * np.maximum(0.0, p[..., 3] - p[..., 1])
    area_b = np.maximum(0.0, g[..., 2] - g[..., 0]) * np.maximum(0.0, g[..., 3] - g[..., 1])
    iw = np.maximum(0.0, np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]))
    ih = np.maximum(0.0, np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]))
    inter = iw * ih
    union = area_a + area_b - inter
    out: npt.NDArray[np.float64] = np.zeros(inter.shape, dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# Simplicity (tests, converter checks)


def _orient(ax: int, ay: int, bx: int, by: int, cx: int, cy: int) -> int:
    v = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    return (v > 0) - (v < 0)


def _on_segment(ax: int, ay: int, bx: int, by: int, px: int, py: int) -> bool:
    return min(ax, bx) <= px <= max(ax, bx) and min(ay, by) <= py <= max(ay, by)


def _segments_touch(p: tuple[int, int], q: tuple[int, int], r: tuple[int, int], s: tuple[int, int]) -> bool:
    o1 = _orient(*p, *q, *r)
    o2 = _orient(*p, *q, *s)
    o3 = _orient(*r, *s, *p)
    o4 = _orient(*r, *s, *q)
    if o1 != o2 and o3 != o4 and 0 not in (o1, o2, o3, o4):
        return True
    if o1 == 0 and _on_segment(*p, *q, *r):
        return True
    if o2 == 0 and _on_segment(*p, *q, *s):
        return True
    if o3 == 0 and _on_segment(*r, *s, *p):
        return True
    return o4 == 0 and _on_segment(*r, *s, *q)


def is_simple_polygon(flat: Sequence[int]) -> bool:
    """True when the ring (>= 3 distinct vertices, integer coordinates) has no self-intersection,
    no self-touching and no repeated vertex; adjacent edges may only share their common vertex."""
    pts = _pairs(flat)
    n = len(pts)
    if n < 3 or len(set(pts)) != n:
        return False
    edges = [(pts[i], pts[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            p, q = edges[i]
            r, s = edges[j]
            if j == i + 1 or (i == 0 and j == n - 1):
                # Adjacent: they share one vertex; they must not fold back onto each other.
                shared = q if j == i + 1 else p
                other_i = p if shared == q else q
                other_j = s if shared == r else r
                if _orient(*shared, *other_i, *other_j) == 0:
                    # Collinear: fine only if they point in opposite directions from the shared vertex.
                    dxi, dyi = other_i[0] - shared[0], other_i[1] - shared[1]
                    dxj, dyj = other_j[0] - shared[0], other_j[1] - shared[1]
                    if dxi * dxj + dyi * dyj > 0:
                        return False
                continue
            if _segments_touch(p, q, r, s):
                return False
    return True


# ---------------------------------------------------------------------------------------------
# Mask IoU on a virtual R x R canvas (stage2.md §6 step 4)


def _ring_on_canvas(
    flat: Sequence[float], kind: GeometryKind | str, resolution: int
) -> npt.NDArray[np.float64] | None:
    try:
        kind = GeometryKind(kind)
        values = [float(v) for v in flat]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    if kind is GeometryKind.BBOX:
        if len(values) != 4:
            return None
        values = list(bbox_to_quad(values))
    elif kind is GeometryKind.POLY:
        if len(values) % 2 or len(values) < 6:
            return None
    else:
        return None
    arr = np.clip(np.asarray(values, dtype=np.float64), 0.0, float(MAX_BIN))
    return (arr * float(resolution - 1) / float(MAX_BIN)).reshape(-1, 2)


def rasterize_ring(points: npt.NDArray[np.float64], height: int, width: int) -> npt.NDArray[np.bool_]:
    """Rasterise one closed ring (canvas coordinates, shape (k, 2) as x, y) the way COCO's polygon
    RLE encoder does, returning a boolean ``(height, width)`` mask.

    The rule: vertices are scaled by 5 and rounded half up to an integer grid; each edge is walked
    one unit at a time along its longer axis (the other coordinate rounded half up from the
    endpoint with the smaller walking coordinate), listing both endpoints, edges concatenated in
    ring order. Wherever the walk's x changes between consecutive points, with ``xm`` the smaller of
    the two x values, the step crosses the centre line of pixel column ``c = (xm + 0.5) / 5 - 0.5``
    if that is an integer in ``[0, width-1]``; it then toggles the fill of column ``c`` from row
    ``ceil((ym + 0.5) / 5 - 0.5)`` (``ym`` the smaller y of the two points, clamped to
    ``[0, height]``) downwards. Filled pixels are those with an odd number of toggles at or above
    them in column-major order, i.e. the even-odd rule applied at pixel centres.
    """
    k = points.shape[0]
    if k < 3:
        return np.zeros((height, width), dtype=np.bool_)
    scale = float(_RASTER_UPSAMPLE)
    # C's (int)(v + .5) truncates toward zero; coordinates here are >= 0, so it is floor.
    xv = np.floor(scale * points[:, 0] + 0.5).astype(np.int64)
    yv = np.floor(scale * points[:, 1] + 0.5).astype(np.int64)
    xs, ys = xv, yv
    xe, ye = np.concatenate((xv[1:], xv[:1])), np.concatenate((yv[1:], yv[:1]))
    dx = np.abs(xe - xs)
    dy = np.abs(ye - ys)
    x_major = dx >= dy
    flip = (x_major & (xs > xe)) | (~x_major & (ys > ye))
    # Walk from the endpoint with the smaller walking coordinate.
    sx = np.where(flip, xe, xs)
    sy = np.where(flip, ye, ys)
    ex = np.where(flip, xs, xe)
    ey = np.where(flip, ys, ye)
    steps = np.where(x_major, dx, dy)
    safe = np.maximum(steps, 1)  # a zero-length edge yields one point; its slope is never used
    slope = np.where(x_major, (ey - sy).astype(np.float64) / safe, (ex - sx).astype(np.float64) / safe)
    counts = steps + 1
    edge = np.repeat(np.arange(k), counts)
    offsets = np.cumsum(counts) - counts
    d = np.arange(int(counts.sum()), dtype=np.int64) - offsets[edge]
    t = np.where(flip[edge], steps[edge] - d, d)
    minor = np.floor(
        np.where(x_major[edge], sy[edge], sx[edge]).astype(np.float64) + slope[edge] * t + 0.5
    ).astype(np.int64)
    minor = np.where(steps[edge] == 0, np.where(x_major[edge], sy[edge], sx[edge]), minor)
    u = np.where(x_major[edge], t + sx[edge], minor)
    v = np.where(x_major[edge], minor, t + sy[edge])

    changed = u[1:] != u[:-1]
    um = np.minimum(u[1:], u[:-1])[changed].astype(np.float64)
    vm = np.minimum(v[1:], v[:-1])[changed].astype(np.float64)
    xd = (um + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    col = xd[keep].astype(np.int64)
    yd = np.ceil(np.clip((vm[keep] + 0.5) / scale - 0.5, 0.0, float(height))).astype(np.int64)
    mask = np.zeros((height, width), dtype=np.bool_)
    if col.size == 0:
        return mask
    # Every column is crossed an even number of times (the walk is closed), so the column-major
    # parity can be computed over the touched columns only.
    c0, c1 = int(col.min()), int(col.max())
    span = (c1 - c0 + 1) * height
    toggles = np.bincount((col - c0) * height + yd, minlength=span + 1)[:span]
    filled = (np.cumsum(toggles, dtype=np.int64) & 1).astype(np.bool_)
    mask[:, c0 : c1 + 1] = filled.reshape(c1 - c0 + 1, height).T
    return mask


def rasterize_shape(
    flat: Sequence[float], kind: GeometryKind | str, resolution: int
) -> npt.NDArray[np.bool_] | None:
    """The boolean ``resolution x resolution`` mask of one shape in bins, as :func:`mask_iou` sees it
    (callers matching many pairs may cache these per shape), or None for a malformed shape."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise GeometryError(f"mask IoU resolution must be an integer >= 2, got {resolution!r}")
    ring = _ring_on_canvas(flat, kind, resolution)
    if ring is None:
        return None
    return rasterize_ring(ring, resolution, resolution)


def box_mask_spans(boxes: npt.ArrayLike, resolution: int) -> npt.NDArray[np.int64]:
    """The mask :func:`rasterize_shape` gives each bbox, in closed form: an ``(n, 4)`` array of
    ``(c0, c1, r0, r1)``, the mask being columns ``[c0, c1)`` x rows ``[r0, r1)`` (empty when either
    range is).

    Why it is exact: the box's quad, scaled and rounded like :func:`rasterize_ring` (``X = floor(5x +
    .5)``), has only two edges along which the walk's x changes, the top and bottom ones, each stepping
    through every integer from ``min X`` to ``max X``; a step from ``u`` to ``u + 1`` crosses pixel column
    ``c`` iff ``u = 5c + 2``, toggling it from row ``ceil((Y - 2) / 5)`` clamped to ``[0, R]``, i.e.
    ``(Y + 2) // 5``. So column ``c`` is filled iff ``min X <= 5c + 2 < max X``, between the two toggles.
    Input bins in any order per axis (non-finite values are the caller's to reject).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise GeometryError(f"mask IoU resolution must be an integer >= 2, got {resolution!r}")
    arr = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 0.0, float(MAX_BIN))
    # The same float64 operations, in the same order, as _ring_on_canvas and rasterize_ring.
    canvas = arr * float(resolution - 1) / float(MAX_BIN)
    grid = np.floor(float(_RASTER_UPSAMPLE) * canvas + 0.5).astype(np.int64)
    x_lo = np.minimum(grid[:, 0], grid[:, 2])
    x_hi = np.maximum(grid[:, 0], grid[:, 2])
    y_lo = np.minimum(grid[:, 1], grid[:, 3])
    y_hi = np.maximum(grid[:, 1], grid[:, 3])
    out = np.empty((arr.shape[0], 4), dtype=np.int64)
    out[:, 0] = np.maximum((x_lo + 2) // _RASTER_UPSAMPLE, 0)
    out[:, 1] = np.maximum(np.minimum((x_hi - 3) // _RASTER_UPSAMPLE + 1, resolution), out[:, 0])
    out[:, 2] = np.clip((y_lo + 2) // _RASTER_UPSAMPLE, 0, resolution)
    out[:, 3] = np.clip((y_hi + 2) // _RASTER_UPSAMPLE, 0, resolution)
    return out


def span_mask_iou(spans_a: npt.ArrayLike, spans_b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """:func:`masks_iou` of the masks two :func:`box_mask_spans` rows describe, by interval arithmetic;
    broadcasts over leading axes (``a[:, None]`` vs ``b[None]`` gives the pairwise matrix). Equal, float
    for float, to ``masks_iou`` of the rasterised masks: pixel counts are exact integers and the one
    division is the same correctly rounded float64 division."""
    a = np.asarray(spans_a, dtype=np.int64)
    b = np.asarray(spans_b, dtype=np.int64)
    area_a = (a[..., 1] - a[..., 0]) * np.maximum(a[..., 3] - a[..., 2], 0)
    area_b = (b[..., 1] - b[..., 0]) * np.maximum(b[..., 3] - b[..., 2], 0)
    iw = np.maximum(np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]), 0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 2], b[..., 2]), 0)
    inter = iw * ih
    union = area_a + area_b - inter
    out: npt.NDArray[np.float64] = np.zeros(np.shape(inter), dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def masks_iou(mask_a: npt.NDArray[np.bool_] | None, mask_b: npt.NDArray[np.bool_] | None) -> float:
    """IoU of two same-shaped boolean masks; a missing mask or an empty union gives 0.0."""
    if mask_a is None or mask_b is None:
        return 0.0
    union = int(np.count_nonzero(mask_a | mask_b))
    if union == 0:
        return 0.0
    return int(np.count_nonzero(mask_a & mask_b)) / union


def mask_iou(
    flat_a: Sequence[float],
    kind_a: GeometryKind | str,
    flat_b: Sequence[float],
    kind_b: GeometryKind | str,
    resolution: int,
) -> float:
    """Mask IoU of two shapes in bins on a virtual ``resolution x resolution`` canvas.

    Each shape becomes one ring (a bbox its 4-corner quad ``bbox_to_quad``, a poly its own ring),
    coordinates are clamped to [0, 999] and scaled by ``(R - 1) / 999`` in float64 (as
    ``bin * (R - 1) / 999``), then rasterised by :func:`rasterize_ring` (the COCO polygon RLE
    rule, so the result equals pycocotools ``frPyObjects`` + ``iou`` on the same scaled rings).
    ``kind`` is a :class:`GeometryKind` or its value (``"bbox_2d"`` / ``"poly"``). A malformed shape
    (unknown kind, wrong length, < 3 points, non-numeric or non-finite value) or an empty union
    gives 0.0.
    """
    return masks_iou(rasterize_shape(flat_a, kind_a, resolution), rasterize_shape(flat_b, kind_b, resolution))
