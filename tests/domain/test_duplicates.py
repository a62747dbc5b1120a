"""Duplicate monitor (stage2.md §18.7): pairs, clusters, excess objects, and their totals."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from domain.codec import bins_to_pixels
from domain.duplicates import (
    DEFAULT_DUPLICATE_IOU_THRESHOLD,
    DuplicateStats,
    duplicate_desc_key,
    duplicate_stats,
    objects_in_bins,
    objects_in_bins_batch,
    summarize_duplicates,
)
from domain.errors import ConfigError, GeometryError
from domain.evaluation import EvalObject
from domain.geometry import box_iou
from domain.objects import DetObject, GeometryKind

BBOX, POLY = GeometryKind.BBOX, GeometryKind.POLY


def obj(desc: str, *bins: int) -> DetObject:
    return DetObject(desc, BBOX, bins)


def canon(o: DetObject) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = o.bins
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def related(a: DetObject, b: DetObject, thr: float) -> bool:
    return (
        a.kind is BBOX
        and b.kind is BBOX
        and duplicate_desc_key(a.desc) == duplicate_desc_key(b.desc)
        and box_iou(canon(a), canon(b)) >= thr
    )


# Few descriptions and boxes on a coarse grid, so that duplicates (and chains of them) are common.
descs = st.sampled_from(["cat", "Cat ", "CAT", "dog", "hot  dog", "hot dog", "cats"])
grid = st.integers(0, 6).map(lambda v: v * 40)


@st.composite
def objects(draw: st.DrawFn) -> DetObject:
    desc = draw(descs)
    if draw(st.integers(0, 5)) == 0:
        return DetObject(desc, POLY, tuple(draw(grid) for _ in range(6)))
    x1, x2 = draw(grid), draw(grid)
    y1, y2 = draw(grid), draw(grid)
    return obj(desc, x1, y1, x2, y2)


thresholds = st.sampled_from([0.3, 0.5, 0.7, 1.0])


@settings(max_examples=300, deadline=None)
@given(objs=st.lists(objects(), max_size=12), thr=thresholds)
def test_clusters_are_the_connected_components_of_the_relation(objs: list[DetObject], thr: float) -> None:
    s = duplicate_stats(objs, thr)
    n = len(objs)
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if related(objs[i], objs[j], thr)]
    assert s.pairs == len(edges)
    assert s.valid_objects == sum(o.kind is BBOX for o in objs)
    members = [i for c in s.clusters for i in c]
    assert len(members) == len(set(members)) and all(len(c) >= 2 for c in s.clusters)
    assert all(list(c) == sorted(c) for c in s.clusters) and [c[0] for c in s.clusters] == sorted(
        c[0] for c in s.clusters
    )
    cluster_of = {i: k for k, c in enumerate(s.clusters) for i in c}
    # Every related pair lies in one cluster; every clustered object has a partner.
    assert all(i in cluster_of and cluster_of.get(j) == cluster_of[i] for i, j in edges)
    assert set(cluster_of) == {i for e in edges for i in e}
    # Each cluster is connected through the relation (walk it from its first member).
    for c in s.clusters:
        seen, todo = {c[0]}, [c[0]]
        while todo:
            a = todo.pop()
            for b in c:
                if b not in seen and (min(a, b), max(a, b)) in set(edges):
                    seen.add(b)
                    todo.append(b)
        assert seen == set(c)
    assert s.excess_objects == len(members) - len(s.clusters)
    assert s.max_cluster_size == max((len(c) for c in s.clusters), default=1)
    assert 0 <= s.excess_objects < max(1, s.valid_objects)


@settings(max_examples=150, deadline=None)
@given(objs=st.lists(objects(), max_size=10), thr=thresholds, data=st.data())
def test_permutation_invariant(objs: list[DetObject], thr: float, data: st.DataObject) -> None:
    perm = data.draw(st.permutations(range(len(objs))))
    base = duplicate_stats(objs, thr)
    moved = duplicate_stats([objs[p] for p in perm], thr)
    assert (moved.pairs, moved.max_cluster_size, moved.excess_objects) == (
        base.pairs,
        base.max_cluster_size,
        base.excess_objects,
    )
    assert {frozenset(perm[i] for i in c) for c in moved.clusters} == {frozenset(c) for c in base.clusters}


@settings(max_examples=150, deadline=None)
@given(objs=st.lists(objects(), max_size=10), data=st.data())
def test_a_higher_threshold_never_finds_more(objs: list[DetObject], data: st.DataObject) -> None:
    lo, hi = sorted((data.draw(thresholds), data.draw(thresholds)))
    a, b = duplicate_stats(objs, lo), duplicate_stats(objs, hi)
    assert (
        b.pairs <= a.pairs
        and b.excess_objects <= a.excess_objects
        and b.max_cluster_size <= a.max_cluster_size
    )


@settings(max_examples=150, deadline=None)
@given(objs=st.lists(objects(), max_size=10), k=st.integers(0, 9), thr=thresholds)
def test_a_spammed_copy_adds_exactly_one_excess_object(objs: list[DetObject], k: int, thr: float) -> None:
    assume(objs and objs[k % len(objs)].kind is BBOX)
    original = objs[k % len(objs)]
    x1, y1, x2, y2 = canon(original)
    assume(x1 < x2 and y1 < y2)  # a zero-area box has IoU 0 even with itself
    before = duplicate_stats(objs, thr)
    after = duplicate_stats([*objs, original], thr)
    assert after.excess_objects == before.excess_objects + 1
    assert after.pairs > before.pairs and after.valid_objects == before.valid_objects + 1


def test_spam_of_identical_boxes() -> None:
    spam = [obj("person", 100, 100, 300, 400) for _ in range(5)] + [obj("dog", 500, 500, 600, 600)]
    s = duplicate_stats(spam)
    assert (s.pairs, s.max_cluster_size, s.excess_objects, s.clusters) == (10, 5, 4, ((0, 1, 2, 3, 4),))


def test_a_chain_is_one_cluster() -> None:
    # a~b and b~c (IoU 0.8 each), a and c only 0.6 apart: one cluster of three, two pairs.
    a, b, c = obj("car", 0, 0, 100, 100), obj("car", 0, 0, 100, 80), obj("car", 0, 0, 100, 60)
    assert box_iou(a.bins, b.bins) == pytest.approx(0.8) and box_iou(a.bins, c.bins) == pytest.approx(0.6)
    s = duplicate_stats([a, b, c], 0.7)
    assert (s.pairs, s.max_cluster_size, s.excess_objects, s.clusters) == (2, 3, 2, ((0, 1, 2),))


def test_threshold_is_inclusive() -> None:
    a, b = obj("car", 0, 0, 100, 100), obj("car", 0, 0, 100, 70)
    assert box_iou(a.bins, b.bins) == 0.7
    assert duplicate_stats([a, b], 0.7).pairs == 1
    assert duplicate_stats([a, b], 0.7000001).pairs == 0


def test_descriptions_compare_casefolded_with_collapsed_whitespace() -> None:
    box = (10, 10, 50, 50)
    assert duplicate_stats([obj("Hot  Dog", *box), obj(" hot dog\t", *box)]).pairs == 1
    assert duplicate_stats([obj("STRASSE", *box), obj("straße", *box)]).pairs == 1  # casefold, not lower
    assert duplicate_stats([obj("hotdog", *box), obj("hot dog", *box)]).pairs == 0
    assert duplicate_stats([obj("cat", *box), obj("cats", *box)]).pairs == 0


def test_polygons_are_not_counted_and_reversed_boxes_are_canonical() -> None:
    poly = DetObject("cat", POLY, (10, 10, 50, 10, 50, 50))
    s = duplicate_stats([poly, obj("cat", 10, 10, 50, 50), obj("cat", 50, 50, 10, 10)])
    assert (s.valid_objects, s.pairs, s.clusters) == (2, 1, ((1, 2),))


def test_no_objects() -> None:
    s = duplicate_stats([])
    assert (s.valid_objects, s.pairs, s.max_cluster_size, s.excess_objects, s.clusters) == (0, 0, 1, 0, ())


def test_summary_uses_means_over_samples_and_a_sum_over_sum_fraction() -> None:
    box = (100, 100, 200, 200)
    rollouts = [
        [obj("a", *box)] * 3,  # 3 pairs, cluster 3, excess 2
        [obj("a", *box), obj("b", *box)],  # none
        [],  # none, no objects
        [obj("c", *box)] * 2 + [obj("d", 0, 0, 10, 10)] * 2 + [obj("e", *box)],  # 2 pairs, 2 clusters of 2
    ]
    s = summarize_duplicates(rollouts)
    assert (s.samples, s.samples_with_duplicates, s.valid_objects, s.pairs, s.excess_objects) == (
        4,
        2,
        10,
        5,
        4,
    )
    assert s.pairs_mean == pytest.approx(5 / 4)
    assert s.max_cluster_size_mean == pytest.approx((3 + 1 + 1 + 2) / 4)
    assert s.excess_object_frac == pytest.approx(4 / 10)
    assert s.max_cluster_size == 3 and s.iou_threshold == DEFAULT_DUPLICATE_IOU_THRESHOLD
    empty = summarize_duplicates([])
    assert (empty.pairs_mean, empty.max_cluster_size_mean, empty.excess_object_frac) == (None, None, 0.0)
    assert summarize_duplicates([[]]).excess_object_frac == 0.0


@pytest.mark.parametrize("thr", [0.0, -0.1, 1.01, float("nan"), True, "0.7"])
def test_bad_threshold_is_a_config_error(thr: object) -> None:
    with pytest.raises(ConfigError, match=r"stage2_ab\.channel_b\.duplicate_monitor\.iou_threshold"):
        duplicate_stats([], thr)  # type: ignore[arg-type]


def test_bad_box_names_the_rollout_and_object() -> None:
    with pytest.raises(GeometryError, match=r"objects\[1\]\.bins: a bbox_2d needs exactly 4 values"):
        duplicate_stats([obj("a", 0, 0, 1, 1), obj("a", 0, 0, 1)])
    with pytest.raises(
        GeometryError, match=r"rollouts\[1\]\.objects\[0\]\.bins\[2\]: value 1000 out of range"
    ):
        summarize_duplicates([[], [obj("a", 0, 0, 1000, 5)]])


@settings(max_examples=100, deadline=None)
@given(objs=st.lists(objects(), max_size=8), width=st.integers(1000, 3000), height=st.integers(1000, 3000))
def test_artifact_pixels_come_back_to_the_same_bins(objs: list[DetObject], width: int, height: int) -> None:
    # With W - 1 and H - 1 >= 999 the bin -> pixel -> bin round trip is exact, so the monitor on an
    # artifact counts what it counts on the rollout.
    pixel_objs = [EvalObject(o.kind, tuple(bins_to_pixels(o.bins, width, height)), o.desc) for o in objs]
    back = objects_in_bins(pixel_objs, width, height)
    assert back == tuple(objs)
    assert duplicate_stats(back) == duplicate_stats(objs)


@st.composite
def pixel_images(draw: st.DrawFn) -> list[tuple[list[EvalObject], int, int]]:
    """Images of 1..3000 px sides (tie-heavy sizes included) with boxes, polygons and odd values."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        width = draw(st.one_of(st.integers(1, 3000), st.sampled_from([1, 2, 3, 1000, 1999, 2000, 1998])))
        height = draw(st.one_of(st.integers(1, 3000), st.sampled_from([1, 2, 3, 1000, 1999, 2000, 1998])))
        xs, ys = st.integers(0, width - 1), st.integers(0, height - 1)
        objects = []
        for _ in range(draw(st.integers(0, 5))):
            if draw(st.booleans()):
                x1, x2 = sorted((draw(xs), draw(xs)))
                y1, y2 = sorted((draw(ys), draw(ys)))
                objects.append(EvalObject(GeometryKind.BBOX, (x1, y1, x2, y2), "a"))
            else:
                objects.append(EvalObject(GeometryKind.POLY, (draw(xs), draw(ys), draw(xs), draw(ys), draw(xs),
                                                              draw(ys)), "b"))  # fmt: skip
        out.append((objects, width, height))
    return out


@given(pixel_images())
@settings(max_examples=200, deadline=None)
def test_the_batch_conversion_equals_the_exact_codec_object_by_object(
    images: list[tuple[list[EvalObject], int, int]],
) -> None:
    assert objects_in_bins_batch(images) == [objects_in_bins(o, w, h) for o, w, h in images]


def test_the_batch_conversion_rounds_ties_to_even_like_the_codec() -> None:
    """Width 1999: d = 1998 and v * 999 / 1998 = v / 2, a tie for every odd v."""
    boxes = [EvalObject(GeometryKind.BBOX, (v, v, v + 2, v + 2), "t") for v in range(1, 41, 2)]
    (batch,) = objects_in_bins_batch([(boxes, 1999, 1999)])
    assert batch == objects_in_bins(boxes, 1999, 1999)
    assert [o.bins[0] for o in batch] == [round(v / 2) for v in range(1, 41, 2)]  # Python rounds half to even


# --- The fast monitor (one masked IoU matrix, union-find) held equal to the monitor as first written. ---


def _duplicate_stats_reference(objects: list[DetObject], iou_threshold: float) -> DuplicateStats:
    """Per-group IoU matrices and scipy's connected components (the pre-optimisation monitor)."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from domain.geometry import pairwise_box_iou

    index = [i for i, o in enumerate(objects) if o.kind is BBOX]
    boxes = [canon(objects[i]) for i in index]
    groups: dict[str, list[int]] = {}
    for local, i in enumerate(index):
        groups.setdefault(duplicate_desc_key(objects[i].desc), []).append(local)
    rows: list[int] = []
    cols: list[int] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        iou = pairwise_box_iou([boxes[m] for m in members], [boxes[m] for m in members])
        first, second = np.nonzero(np.triu(iou >= iou_threshold, k=1))
        rows += [members[a] for a in first.tolist()]
        cols += [members[b] for b in second.tolist()]
    n = len(index)
    if not rows:
        return DuplicateStats(valid_objects=n, pairs=0, max_cluster_size=1, excess_objects=0, clusters=())
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    members_of: dict[int, list[int]] = {}
    for local, label in enumerate(labels.tolist()):
        members_of.setdefault(label, []).append(index[local])
    clusters = sorted(tuple(m) for m in members_of.values() if len(m) > 1)
    return DuplicateStats(
        valid_objects=n,
        pairs=len(rows),
        max_cluster_size=max(len(c) for c in clusters),
        excess_objects=sum(len(c) - 1 for c in clusters),
        clusters=tuple(clusters),
    )


fine_grid = st.integers(0, 999)


@st.composite
def jittered_objects(draw: st.DrawFn) -> list[DetObject]:
    """A rollout-like list: boxes, some copied with a small jitter (chains), some polygons."""
    out: list[DetObject] = []
    for _ in range(draw(st.integers(0, 40))):
        if out and draw(st.booleans()):
            base = draw(st.sampled_from(out))
            if base.kind is BBOX:
                d = draw(st.integers(-30, 30))
                x1, y1, x2, y2 = base.bins
                out.append(obj(draw(descs), min(999, max(0, x1 + d)), y1, x2, min(999, max(0, y2 - d))))
                continue
        if draw(st.integers(0, 7)) == 0:
            out.append(DetObject(draw(descs), POLY, tuple(draw(fine_grid) for _ in range(6))))
        else:
            out.append(obj(draw(descs), *(draw(fine_grid) for _ in range(4))))
    return out


@settings(max_examples=300, deadline=None)
@given(objs=jittered_objects(), thr=st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.9, 1.0]), small=st.booleans())
def test_fast_monitor_equals_the_reference(objs: list[DetObject], thr: float, small: bool) -> None:
    import domain.duplicates as dup

    # ``small`` sends every list through the per-group path (the one for many objects).
    saved = dup._GLOBAL_MATRIX_MAX
    dup._GLOBAL_MATRIX_MAX = 3 if small else saved
    try:
        assert duplicate_stats(objs, thr) == _duplicate_stats_reference(objs, thr)
    finally:
        dup._GLOBAL_MATRIX_MAX = saved
