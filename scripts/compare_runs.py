"""Are two Stage-1 training runs the same run? ``python scripts/compare_runs.py RUN_DIR_A RUN_DIR_B [--rtol R]``.

Compares what a refactor must not change (issue 10 item 6): every ``logging.jsonl`` event (all keys, except
wall-clock ones: ``time``, ``elapsed_s`` and the ``*_runtime`` / ``*_per_second`` speed keys), every tensor of
every checkpoint's ``model.safetensors`` (bit for bit), the checkpoint list, and the pack plan files. Prints
each difference and exits 1 if there is any, 0 (with a one-line summary) when the runs are identical.

``--rtol`` (default 0: bit-equal) lets logged floats differ by that relative amount; checkpoint tensors are always
compared bit for bit. Measured on this CPU: two runs of the same revision can differ in the last bits of a logged
loss (up to ~1.2e-7 relative, at the same steps each time) while every weight stays bit-equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WALL_CLOCK = ("time", "elapsed_s")
SPEED_SUFFIXES = ("_runtime", "_per_second")


def events(run: Path) -> list[dict[str, object]]:
    out = []
    for line in (run / "logging.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            event = json.loads(line)
            out.append({k: v for k, v in event.items() if k not in WALL_CLOCK and not k.endswith(SPEED_SUFFIXES)})
    return out


def checkpoint_tensors(folder: Path) -> dict[str, object]:
    from safetensors.numpy import load_file

    tensors: dict[str, object] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, value in load_file(str(path)).items():
            tensors[f"{path.name}:{name}"] = value
    return tensors


def _same(x: object, y: object, rtol: float) -> bool:
    if x == y:
        return True
    if isinstance(x, float) and isinstance(y, float) and rtol > 0:
        return abs(x - y) <= rtol * max(abs(x), abs(y))
    return False


def compare(a: Path, b: Path, rtol: float = 0.0) -> list[str]:
    import numpy as np

    problems: list[str] = []
    ea, eb = events(a), events(b)
    if len(ea) != len(eb):
        problems.append(f"logging.jsonl: {len(ea)} events vs {len(eb)}")
    for k, (x, y) in enumerate(zip(ea, eb)):
        keys = sorted(set(x) | set(y))
        diff = [f"{key}: {x.get(key)!r} vs {y.get(key)!r}" for key in keys if not _same(x.get(key), y.get(key), rtol)]
        if diff:
            problems.append(f"logging.jsonl event {k} (global_step {x.get('global_step')}): " + "; ".join(diff[:5]))
    ca = sorted(p.name for p in a.glob("checkpoint-*"))
    cb = sorted(p.name for p in b.glob("checkpoint-*"))
    if ca != cb:
        problems.append(f"checkpoints: {ca} vs {cb}")
    tensors = 0
    for name in sorted(set(ca) & set(cb)):
        ta, tb = checkpoint_tensors(a / name), checkpoint_tensors(b / name)
        if set(ta) != set(tb):
            problems.append(f"{name}: tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
        for key in sorted(set(ta) & set(tb)):
            tensors += 1
            if not np.array_equal(ta[key], tb[key]):
                problems.append(f"{name}/{key}: values differ")
    for plan in ("pack_plan.json", "pack_plan_cache.json"):
        pa, pb = a / plan, b / plan
        if pa.is_file() != pb.is_file() or (pa.is_file() and _plan_body(pa) != _plan_body(pb)):
            problems.append(f"{plan}: differs")
    if not problems:
        print(f"identical: {len(ea)} logging events, checkpoints {ca}, {tensors} tensors bit-equal, pack plan equal")
    return problems


def _plan_body(path: Path) -> object:
    body = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(body, dict):
        body.pop("jsonl_sha256", None)
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance of logged floats (default: exact)")
    args = parser.parse_args()
    problems = compare(args.run_a, args.run_b, args.rtol)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
