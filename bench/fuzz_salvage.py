"""Fuzz salvage (D2b: never raises on any string) with generated and mutated CoordJSON outputs.

Run: ``python bench/fuzz_salvage.py --n 1000000 [--seed 0]``. Each case is one of: a rendered document
with 1–6 random mutations (insert a grammar / special-token fragment, delete, replace, duplicate a
slice, truncate), a fragment soup, or random Unicode text; coord mode and field order are random.
Prints the number of cases checked, the number of exceptions (must be 0) and the number of results
that break an invariant (valid objects are well-formed; every 50th case: the canonical text
strict-parses back to exactly the salvaged objects). Exit status 1 if either count is non-zero.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.coordjson import SalvageResult, parse_strict, render, salvage
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

FRAGMENTS = [
    "{", "}", "[", "]", '"', "\\", ",", ":", " ", "\n", "\t", '{"objects": [', '{ "objects" :[', "]}", "}]}",
    "}, {", '"desc": ', '"bbox_2d": [', '"poly": [', '"score": 0.9', "null", "true", "-1", "1.0", "1e2", "+1",
    "01", "999", "1000", "<|coord_0|>", "<|coord_999|>", "<|coord_1000|>", "<|coord_*|>", "<|coord_007|>",
    "<|coord_ 5|>", "<|coord_", "|>", "<|", "<|im_end|>", "<|endoftext|>", "<|im_start|>", '"<|coord_5|>"',
    "\\u00e9", "\\ud800", '\\"', "é", "猫", "\x00", "\x7f", "\u2028", "\ufeff",
]  # fmt: skip
DESCS = ["cat", "dog", "traffic light", "café", 'a "b" c', "a]}b", "x\\y", "  spaced  ", "{", "<|x|>"]


def random_object(rng: random.Random) -> DetObject:
    desc = rng.choice(DESCS)
    if rng.random() < 0.75:
        x1, x2 = sorted(rng.randrange(1000) for _ in range(2))
        y1, y2 = sorted(rng.randrange(1000) for _ in range(2))
        return DetObject(desc, GeometryKind.BBOX, (x1, y1, x2, y2))
    return DetObject(
        desc, GeometryKind.POLY, tuple(rng.randrange(1000) for _ in range(2 * rng.randint(3, 6)))
    )


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        at = rng.randint(0, len(text))
        if op == 0:
            text = text[:at] + rng.choice(FRAGMENTS) + text[at:]
        elif op == 1:
            text = text[:at] + text[at + rng.randint(1, 8) :]
        elif op == 2:
            text = text[:at] + rng.choice(FRAGMENTS) + text[at + 1 :]
        elif op == 3:
            end = min(len(text), at + rng.randint(1, 40))
            text = text[:end] + text[at:end] + text[end:]
        elif op == 4:
            text = text[:at]
        else:
            text = text[:at] + chr(rng.randrange(0x20, 0x3000)) + text[at:]
    return text


def make_case(rng: random.Random) -> tuple[str, FieldOrder, CoordMode]:
    order = rng.choice((FieldOrder.DESC_FIRST, FieldOrder.GEOMETRY_FIRST))
    mode = rng.choice((CoordMode.TOKENS, CoordMode.NUMERIC))
    kind = rng.random()
    if kind < 0.8:
        text = render([random_object(rng) for _ in range(rng.randint(0, 6))], order, mode)
        if rng.random() < 0.3:
            text = (
                rng.choice(["", "Sure: ", "```json\n"])
                + text
                + rng.choice(["", "<|im_end|>", "\n```", "junk"])
            )
        return mutate(text, rng), order, mode
    if kind < 0.95:
        return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 40))), order, mode
    return "".join(chr(rng.randrange(0, 0x11000)) for _ in range(rng.randint(0, 60))), order, mode


def invariant_broken(r: SalvageResult, order: FieldOrder, mode: CoordMode, deep: bool) -> bool:
    if r.parse_failed and (r.objects or r.drops or r.truncated):
        return True
    for o in r.objects:
        if not o.desc or o.desc != o.desc.strip() or not all(0 <= k <= 999 for k in o.bins):
            return True
        if o.kind is GeometryKind.BBOX:
            if len(o.bins) != 4 or o.bins[2] < o.bins[0] or o.bins[3] < o.bins[1]:
                return True
        elif len(o.bins) < 6 or len(o.bins) % 2:
            return True
    return deep and tuple(parse_strict(r.canonical_text, order, mode)) != r.objects


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    exceptions = broken = checked = 0
    n_objects = n_drops = n_parse_failed = n_truncated = 0
    t0 = time.perf_counter()
    for i in range(args.n):
        text, order, mode = make_case(rng)
        try:
            r = salvage(text, order, mode)
            checked += 1
            n_objects += len(r.objects)
            n_drops += len(r.drops)
            n_parse_failed += r.parse_failed
            n_truncated += r.truncated
            if invariant_broken(r, order, mode, deep=i % 50 == 0):
                broken += 1
                if broken <= 5:
                    print(f"invariant broken on case {i}: {text!r}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - counting them is the point
            exceptions += 1
            if exceptions <= 5:
                print(f"exception on case {i}: {text!r}", file=sys.stderr)
                traceback.print_exc()
    elapsed = time.perf_counter() - t0
    print(
        f"checked {checked} of {args.n} generated/mutated outputs in {elapsed:.0f} s; "
        f"exceptions: {exceptions}; invariant violations: {broken}; "
        f"salvaged objects {n_objects}, drops {n_drops}, parse_failed {n_parse_failed}, truncated {n_truncated}"
    )
    return 1 if exceptions or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
