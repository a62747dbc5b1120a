"""Stage-2 matching (stage2.md §6) per rollout: pruned (top-k) vs every pair as a candidate, and the duplicate
monitor (§18.7) on the same predictions.

Run: ``python bench/bench_stage2_matching.py [--objects 20 60 120] [--repeat 5] [--seed 0]``.

Each rollout: ``n`` GT boxes spread over the canvas, predictions = GT jittered by a few bins, a tenth of them
missed, a tenth spurious and a few spammed copies. Times are best of ``--repeat`` (ms per rollout); the ratios
are side by side. ``raster k=5`` matches the same boxes given as 4-corner polygons, which takes the rasteriser
for every pair (the same IoUs, as the tests hold): the closed-form bbox path against the raster path it
replaced for bbox pairs. No assertion: a benchmark.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.duplicates import duplicate_stats
from domain.geometry import bbox_to_quad
from domain.objects import DetObject, GeometryKind
from domain.stage2_matching import MatchSettings, match_predictions


def rollout(n: int, rng: random.Random) -> tuple[list[DetObject], list[DetObject]]:
    def box() -> tuple[int, int, int, int]:
        x, y = rng.randint(0, 900), rng.randint(0, 900)
        return (x, y, min(999, x + rng.randint(8, 120)), min(999, y + rng.randint(8, 120)))

    gts = [DetObject("thing", GeometryKind.BBOX, box()) for _ in range(n)]
    preds = []
    for g in gts:
        if rng.random() < 0.1:
            continue
        jitter = [min(999, max(0, v + rng.randint(-4, 4))) for v in g.bins]
        x1, y1, x2, y2 = jitter
        preds.append(
            DetObject("thing", GeometryKind.BBOX, (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
        )
    preds += [DetObject("thing", GeometryKind.BBOX, box()) for _ in range(n // 10)]
    preds += preds[: max(1, n // 20)]  # spam
    return preds, gts


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, nargs="+", default=[20, 60, 120])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(
        f"{'objects':>8} {'pruned k=5 ms':>14} {'all pairs ms':>13} {'all/pruned':>11} {'dup ms':>8} {'dup/pruned':>11}"
        f" {'raster k=5 ms':>14} {'raster/pruned':>14}"
    )
    for n in args.objects:
        preds, gts = rollout(n, rng)
        pruned = best_ms(lambda p=preds, g=gts: match_predictions(p, g, MatchSettings()), args.repeat)
        full = best_ms(
            lambda p=preds, g=gts: match_predictions(p, g, MatchSettings(candidate_top_k=len(g))), args.repeat
        )
        dup = best_ms(lambda p=preds: duplicate_stats(p), args.repeat)
        quads = [[DetObject(o.desc, GeometryKind.POLY, bbox_to_quad(o.bins)) for o in side] for side in (preds, gts)]
        raster = best_ms(lambda q=quads: match_predictions(q[0], q[1], MatchSettings()), args.repeat)
        print(
            f"{n:>8} {pruned:>14.2f} {full:>13.2f} {full / pruned:>11.2f} {dup:>8.2f} {dup / pruned:>11.3f}"
            f" {raster:>14.2f} {raster / pruned:>14.1f}"
        )


if __name__ == "__main__":
    main()
