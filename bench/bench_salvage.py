"""Salvage parse time vs ``json.loads`` of the same content after ``transpile_strict`` (same process).

Run: ``python bench/bench_salvage.py [--n 2000] [--repeat 5] [--seed 0]``. Prints the per-document
times and the ratio salvage / json.loads (best of ``--repeat`` runs each). No assertion: a benchmark.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.coordjson import render, salvage, transpile_strict
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

WORDS = [
    "cat",
    "dog",
    "person",
    "traffic light",
    "tool cabinet",
    "café table",
    'a "quoted" sign',
    "bow (weapon)",
]


def random_object(rng: random.Random) -> DetObject:
    desc = rng.choice(WORDS)
    if rng.random() < 0.8:
        x1, x2 = sorted(rng.sample(range(1000), 2))
        y1, y2 = sorted(rng.sample(range(1000), 2))
        return DetObject(desc, GeometryKind.BBOX, (x1, y1, x2, y2))
    n = rng.randint(3, 12)
    return DetObject(desc, GeometryKind.POLY, tuple(rng.randrange(1000) for _ in range(2 * n)))


def best_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000, help="number of documents")
    ap.add_argument("--max-objects", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for mode in (CoordMode.TOKENS, CoordMode.NUMERIC):
        docs = [
            render(
                [random_object(rng) for _ in range(rng.randint(0, args.max_objects))],
                FieldOrder.DESC_FIRST,
                mode,
            )
            for _ in range(args.n)
        ]
        strict_json = [transpile_strict(d, FieldOrder.DESC_FIRST, mode) for d in docs]
        n_objects = sum(len(json.loads(s)["objects"]) for s in strict_json)
        t_salvage = best_time(
            lambda docs=docs, mode=mode: [salvage(d, FieldOrder.DESC_FIRST, mode) for d in docs], args.repeat
        )
        t_json = best_time(lambda strict_json=strict_json: [json.loads(s) for s in strict_json], args.repeat)
        print(
            f"coord_mode={mode.value}: {args.n} documents, {n_objects} objects, {sum(map(len, docs))} chars | "
            f"salvage {t_salvage / args.n * 1e6:.1f} us/doc, json.loads {t_json / args.n * 1e6:.1f} us/doc | "
            f"ratio salvage/json.loads = {t_salvage / t_json:.1f}x"
        )


if __name__ == "__main__":
    main()
