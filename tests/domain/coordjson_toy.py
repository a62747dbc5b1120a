"""A toy tokenizer and value generators shared by the CoordJSON tests (no test functions here).

Special tokens (the 1000 coord tokens, the wildcard, ``<|im_end|>``, ``<|endoftext|>``, ``<|im_start|>``)
are single ids, as an HF tokenizer with added special tokens gives; other text is split into chunks
(random lengths for rollouts, fixed lengths for ``encode``). Coord ids are deliberately non-contiguous.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from hypothesis import strategies as st

from domain.coord_tokens import CoordIdTable, all_coord_tokens
from domain.objects import DetObject, GeometryKind

SPECIAL_TEXTS = ["<|coord_*|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>"]
_SPECIAL_RE = re.compile(
    r"<\|coord_(?:0|[1-9][0-9]{0,2})\|>|" + "|".join(re.escape(s) for s in SPECIAL_TEXTS)
)


class ToyTokenizer:
    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.ids: dict[str, int] = {}
        for s in SPECIAL_TEXTS:
            self._add(s)
        # Non-contiguous coord ids: interleave a filler piece between coord tokens.
        for k, tok in enumerate(all_coord_tokens()):
            self._add(f"\x00filler{k}\x00")
            self._add(tok)
        self.coord_table = CoordIdTable([self.ids[t] for t in all_coord_tokens()], self.ids["<|coord_*|>"])
        self.im_end = self.ids["<|im_end|>"]
        self.endoftext = self.ids["<|endoftext|>"]

    def _add(self, piece: str) -> int:
        i = self.ids.get(piece)
        if i is None:
            i = len(self.pieces)
            self.pieces.append(piece)
            self.ids[piece] = i
        return i

    def _split(self, text: str) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            if m.start() > pos:
                out.append((False, text[pos : m.start()]))
            out.append((True, m.group()))
            pos = m.end()
        if pos < len(text):
            out.append((False, text[pos:]))
        return out

    def tokenize(self, text: str, rng: random.Random, max_chunk: int = 6) -> list[int]:
        """A random tokenisation: specials whole, other text in chunks of 1..max_chunk characters."""
        ids: list[int] = []
        for special, part in self._split(text):
            if special:
                ids.append(self.ids[part])
                continue
            pos = 0
            while pos < len(part):
                n = rng.randint(1, max_chunk)
                ids.append(self._add(part[pos : pos + n]))
                pos += n
        return ids

    def tokenize_chunks(self, chunks: Sequence[str]) -> list[int]:
        """Exactly the given pieces (each must be a special or plain text)."""
        return [self._add(c) for c in chunks]

    def encode(self, text: str) -> list[int]:
        """Deterministic and round-tripping: specials whole, other text in chunks of 2 characters."""
        ids: list[int] = []
        for special, part in self._split(text):
            if special:
                ids.append(self.ids[part])
            else:
                ids.extend(self._add(part[i : i + 2]) for i in range(0, len(part), 2))
        return ids

    def bad_encode(self, text: str) -> list[int]:
        """Does not round-trip: the re-tokenised text loses its last character."""
        return self.encode(text[:-1]) if len(text) > 1 else self.encode("?")

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids)

    def piece_list(self, ids: Sequence[int]) -> list[str]:
        return [self.pieces[i] for i in ids]


def c(k: int) -> str:
    return f"<|coord_{k}|>"


def box(desc: str, x1: int, y1: int, x2: int, y2: int) -> DetObject:
    return DetObject(desc, GeometryKind.BBOX, (x1, y1, x2, y2))


# Descriptions as the data contract allows them (stripped, non-empty, no "<|" / "|>", no control chars),
# including JSON-escaped characters and non-ASCII.
DESCS = (
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc"))
        | st.sampled_from(['"', "\\", "}", "]", "{", "[", ","]),
        min_size=1,
        max_size=12,
    )
    .map(lambda s: " ".join(s.split()))
    .filter(lambda s: s != "" and "<|" not in s and "|>" not in s)
)


@st.composite
def det_objects(draw: st.DrawFn, allow_poly: bool = True) -> DetObject:
    desc = draw(DESCS)
    if allow_poly and draw(st.booleans()):
        n = draw(st.integers(3, 8))
        bins = draw(st.lists(st.integers(0, 999), min_size=2 * n, max_size=2 * n))
        return DetObject(desc, GeometryKind.POLY, tuple(bins))
    x1, x2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
    y1, y2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
    return DetObject(desc, GeometryKind.BBOX, (x1, y1, x2, y2))


OBJECT_LISTS = st.lists(det_objects(), max_size=6)
