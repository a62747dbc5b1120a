"""Coverage-guided fuzzing of the CoordJSON parsers (salvage, strict, token scanner) with atheris / libFuzzer.

Run: ``pip install atheris`` (into the venv), then
``python bench/fuzz_atheris.py [--seconds 600] [--workdir DIR]``.

The driver seeds a corpus (rendered documents in both modes and orders, the examples of data.md §5.8 and
stage2.md §3.8, deep and doubled-bracket nests), runs the instrumented harness in a child process for
``--seconds`` and prints the executions count, the final coverage and the number of findings.

One input = one flag byte (field order, coord mode, tokenisation chunk size and seed, "repeat") + UTF-8 text
(bytes that are not UTF-8 become lone surrogates, still a ``str``). With "repeat" set, the text is split at
``\x01`` and every second part (``a \x01 U \x01 b \x01 V \x01 c``: U and V) is repeated to about 12,000
characters: a degenerate repeating rollout (thousands of nesting levels or records) that byte mutations
alone would take long to grow. Per input the harness checks:
- ``salvage`` returns (never raises) and its objects are well-formed; its canonical text strict-parses back
  to exactly those objects;
- ``parse_strict`` raises nothing but ``CoordJSONError``;
- ``scan_tokens`` on a tokenisation that keeps specials whole agrees with salvage (objects, drops, flags;
  data.md §5.5.4) without a cut fallback; on a tokenisation that also splits specials it never raises.
A failing input is saved under ``<workdir>/findings`` (input and traceback) and fuzzing goes on, so the
count is of distinct failing inputs, not only the first. Exit status 1 if there is any finding.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import subprocess
import sys
import tempfile
import traceback
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "domain"))  # the toy tokenizer shared with the parser tests

import atheris  # after the path set-up; `pip install atheris`

with atheris.instrument_imports(include=["domain"]):
    from domain.coordjson import parse_strict, render, salvage, scan_tokens
    from domain.errors import CoordJSONError
    from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

from coordjson_toy import ToyTokenizer

ORDERS = (FieldOrder.DESC_FIRST, FieldOrder.GEOMETRY_FIRST)
MODES = (CoordMode.TOKENS, CoordMode.NUMERIC)
REPEAT_CHARS = 12_000
RESET_VOCAB_EVERY = 5000  # the toy tokenizer's vocabulary grows with every new chunk
DONE = re.compile(r"Done (\d+) runs in (\d+) second")
COV = re.compile(r"cov: (\d+) ft: (\d+)")


class Harness:
    def __init__(self, findings: Path) -> None:
        self.findings = findings
        self.tok = ToyTokenizer()
        self.runs = 0

    def __call__(self, data: bytes) -> None:
        self.runs += 1
        if self.runs % RESET_VOCAB_EVERY == 0:
            self.tok = ToyTokenizer()
        try:
            self.check(data)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding; fuzzing goes on
            self.record(data, exc)

    def check(self, data: bytes) -> None:
        if not data:
            return
        flags = data[0]
        order, mode = ORDERS[flags & 1], MODES[(flags >> 1) & 1]
        max_chunk = 1 + ((flags >> 2) & 7)
        text = data[1:].decode("utf-8", errors="surrogateescape")
        if flags & 0x80:
            parts = text.split("\x01")
            text = "".join(p * (REPEAT_CHARS // max(1, len(p))) if k % 2 else p for k, p in enumerate(parts))
        r = salvage(text, order, mode)
        if r.parse_failed and (r.objects or r.drops or r.truncated):
            raise AssertionError("parse_failed with objects, drops or truncated")
        for o in r.objects:
            if not o.desc or o.desc != o.desc.strip() or not all(0 <= k <= 999 for k in o.bins):
                raise AssertionError(f"malformed object {o!r}")
            if o.kind is GeometryKind.BBOX and (
                len(o.bins) != 4 or o.bins[2] < o.bins[0] or o.bins[3] < o.bins[1]
            ):
                raise AssertionError(f"invalid bbox {o!r}")
            if o.kind is GeometryKind.POLY and (len(o.bins) < 6 or len(o.bins) % 2):
                raise AssertionError(f"invalid poly {o!r}")
        if tuple(parse_strict(r.canonical_text, order, mode)) != r.objects:
            raise AssertionError("canonical text does not strict-parse back to the salvaged objects")
        try:
            parse_strict(text, order, mode)
        except CoordJSONError:
            pass
        tok = self.tok
        rng = random.Random((flags >> 5) & 3)
        ids = tok.tokenize(text, rng, max_chunk)  # specials whole: §5.5.4 holds exactly
        s = scan_tokens(ids, tok.piece_list(ids), tok.encode, tok.coord_table, order, mode,
                        frozenset({tok.im_end, tok.endoftext}), decode=tok.decode)  # fmt: skip
        if s.cut_fallback:
            raise AssertionError("cut fallback with a round-tripping encode")
        got = (
            s.valid_objects,
            s.drops,
            s.truncated,
            s.parse_failed,
            s.trailing_junk,
            s.had_stop,
            s.array_closed,
        )
        want = (r.objects, r.drops, r.truncated, r.parse_failed, r.trailing_junk, r.had_stop, r.array_closed)
        if got != want:
            raise AssertionError(f"scanner != salvage: {got!r} vs {want!r}")
        # Specials split into plain pieces too (coord literals spelled by text, §5.8.8): never raises.
        plain = tok.tokenize_chunks([text[i : i + max_chunk] for i in range(0, len(text), max_chunk)])
        scan_tokens(plain, tok.piece_list(plain), tok.encode, tok.coord_table, order, mode, decode=tok.decode)

    def record(self, data: bytes, exc: Exception) -> None:
        name = f"{type(exc).__name__}-{hashlib.sha1(data).hexdigest()[:16]}"
        self.findings.mkdir(parents=True, exist_ok=True)
        (self.findings / f"{name}.bin").write_bytes(data)
        (self.findings / f"{name}.txt").write_text(traceback.format_exc())


def seed_corpus(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    texts: list[tuple[int, str]] = []
    for flags in range(4):
        order, mode = ORDERS[flags & 1], MODES[(flags >> 1) & 1]
        for n in (0, 1, 3):
            objs = [DetObject("cat", GeometryKind.BBOX, (1, 2, 3 + k, 4 + k)) for k in range(n)]
            objs.append(DetObject("poly", GeometryKind.POLY, tuple(rng.randrange(1000) for _ in range(6))))
            doc = render(objs, order, mode)
            body = doc[len('{"objects": [') : -2]
            texts += [(flags, doc), (flags, doc + "<|im_end|>"), (flags, doc[: len(doc) // 2])]
            texts += [
                (flags, '{"objects": [[' + body + "]]}"),
                (flags, '{"objects": [[1, [2]], ' + body + "]}"),
            ]
            texts.append(
                (flags, '{"objects": [{"desc": "d", "bbox_2d": ' + "[" * 70 + "]" * 70 + "}, " + body + "]}")
            )
            texts.append((flags, '{"objects": [{"desc": "d", "x": ' + '{"a": ' * 70 + "1" + "}" * 70 + "}]}"))
    texts += [(0, 'Here: {"objects": [{"desc": "a]}\\"x", "bbox_2d": [<|coord_1|>, <|coord_2|>]}, ]} junk'),
              (0, '{"object_1": {"desc": "a"}}'), (0, '{"objects": [{}, {"desc": "   "}, x "]{" ]')]  # fmt: skip
    for unit in ("[", '{"a": ', "[{", '[{"a": [', '{"desc": "d", "bbox_2d": [<|coord_1|>, <|coord_2|>]}, '):
        texts.append((0x80, '{"objects": [{"desc": "d", "bbox_2d": \x01' + unit + "\x01"))  # unclosed
        texts.append((0x82, '{"objects": [[\x01' + unit + "\x01]]}"))
    head = '{"objects": [{"desc": "d", "bbox_2d": '
    for opener, closer in (("[", "]"), ('{"a": ', "}"), ("[{", "}]"), ('{"a": [', "]}")):
        texts.append((0x80, f"{head}\x01{opener}\x01<|coord_1|>\x01{closer}\x01}}]}}"))  # closed, deep
        texts.append((0x82, f'{{"objects": [[\x01{opener}\x011\x01{closer}\x01]]}}'))
    for k, (flags, text) in enumerate(texts):
        (directory / f"seed{k:03d}").write_bytes(bytes([flags | (k % 8) << 2]) + text.encode("utf-8"))
    return len(texts)


def worker(argv: list[str]) -> None:
    findings = Path(argv.pop(argv.index("--findings") + 1))
    argv.remove("--findings")
    atheris.Setup(argv, Harness(findings))
    atheris.Fuzz()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--max-len", type=int, default=8192, help="libFuzzer -max_len (bytes)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="coordjson_fuzz_"))
    corpus, findings = work / "corpus", work / "findings"
    seeds = seed_corpus(corpus)
    log = work / "libfuzzer.log"
    cmd = [sys.executable, __file__, "--worker", "--findings", str(findings), f"-max_total_time={args.seconds}",
           f"-max_len={args.max_len}", "-rss_limit_mb=4096", "-timeout=30", "-print_final_stats=1",
           f"-artifact_prefix={work}/", str(corpus)]  # fmt: skip
    with open(log, "w") as handle:
        rc = subprocess.run(cmd, stderr=handle, stdout=handle, check=False).returncode
    text = log.read_text(errors="replace")
    done = DONE.findall(text)
    cov = COV.findall(text)
    found = sorted(p.name for p in findings.glob("*.bin")) if findings.exists() else []
    runs = done[-1][0] if done else "?"
    coverage = "cov {} ft {}".format(*cov[-1]) if cov else "?"
    print(
        f"atheris {version('atheris')}: {runs} executions in {done[-1][1] if done else '?'} s from {seeds} "
        f"seeds; final coverage {coverage}; libFuzzer exit {rc}; findings: {len(found)} (workdir {work})"
    )
    for name in found[:10]:
        print("  ", findings / name)
    return 1 if found or rc != 0 else 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        args = list(sys.argv)
        args.remove("--worker")
        worker(args)
    else:
        raise SystemExit(main())
