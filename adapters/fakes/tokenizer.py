"""A deterministic byte-level toy tokenizer implementing :class:`ports.tokenizer.TokenizerPort`.

For pure tests: no files, no framework. Layout of the ids:
- ``0..13``: the 14 Qwen3-VL special tokens (``<|endoftext|>`` = pad, ``<|im_end|>`` = turn end);
- ``14``: the wildcard ``<|coord_*|>``; ``15..1014``: ``<|coord_0|>``..``<|coord_999|>`` (in bin
  order, or permuted within that block with ``coord_permutation_seed`` to exercise non-contiguous lookups);
- then the multi-character chunks (``DEFAULT_CHUNKS`` or the caller's), e.g. the fused ``}]}`` and
  ``},`` pieces a real BPE produces;
- then 256 byte ids. ASCII text outside chunks is one id per character; any other character is one id
  per UTF-8 byte, so, exactly like a byte-level BPE, a lone piece of a multi-byte character decodes to
  U+FFFD while the whole sequence decodes correctly.

Encoding is greedy: a known ``<|...|>`` special first, else the longest chunk, else one byte.
Every special token, coord tokens included, is always one id in any context.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from domain.coord_tokens import WILDCARD_TOKEN, CoordIdTable, all_coord_tokens
from domain.errors import SetupError
from domain.special_tokens import QWEN_SPECIAL_TOKENS

DEFAULT_CHUNKS: tuple[str, ...] = (
    '{"objects": [',
    '"desc": "',
    '"bbox_2d": [',
    '"poly": [',
    "}]}",
    "},",
    "]}",
    "],",
    '",',
    ", ",
    ": ",
    "cat",
    "dog",
    "person",
)
_SPECIAL = re.compile(r"<\|[^|<>]*\|>")


class FakeTokenizer:
    """Deterministic toy tokenizer; two instances built with the same arguments are identical."""

    def __init__(
        self,
        chunks: Sequence[str] = DEFAULT_CHUNKS,
        coord_permutation_seed: int | None = None,
    ) -> None:
        for chunk in chunks:
            if not chunk or "<|" in chunk or "|>" in chunk:
                raise ValueError(f"chunk {chunk!r}: must be non-empty text without special-token markers")
        specials = [*QWEN_SPECIAL_TOKENS, WILDCARD_TOKEN]
        coord_ids = list(range(len(specials), len(specials) + 1000))
        if coord_permutation_seed is not None:
            random.Random(coord_permutation_seed).shuffle(coord_ids)
        self._token_to_id: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
        self._token_to_id.update(zip(all_coord_tokens(), coord_ids))
        self._bytes: dict[int, bytes] = {i: tok.encode("utf-8") for tok, i in self._token_to_id.items()}
        next_id = len(specials) + 1000
        self._chunks: dict[str, int] = {}
        for chunk in dict.fromkeys(chunks):
            self._chunks[chunk] = next_id
            self._bytes[next_id] = chunk.encode("utf-8")
            next_id += 1
        self._chunk_lengths = sorted({len(c) for c in self._chunks}, reverse=True)
        self._byte_base = next_id
        for b in range(256):
            self._bytes[next_id + b] = bytes([b])
        self._size = next_id + 256
        self._coord_table = CoordIdTable.from_vocab(self._token_to_id)

    # --- TokenizerPort -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos, n = 0, len(text)
        while pos < n:
            if text.startswith("<|", pos):
                m = _SPECIAL.match(text, pos)
                if m is not None and m.group(0) in self._token_to_id:
                    ids.append(self._token_to_id[m.group(0)])
                    pos = m.end()
                    continue
            for length in self._chunk_lengths:
                chunk_id = self._chunks.get(text[pos : pos + length])
                if chunk_id is not None:
                    ids.append(chunk_id)
                    pos += length
                    break
            else:
                ids.extend(self._byte_base + b for b in text[pos].encode("utf-8"))
                pos += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self._bytes_of(i) for i in ids).decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> str:
        return self._bytes_of(token_id).decode("utf-8", errors="replace")

    def id_of(self, token: str) -> int:
        if token in self._token_to_id:
            return self._token_to_id[token]
        if token in self._chunks:
            return self._chunks[token]
        raw = token.encode("utf-8")
        if len(raw) == 1:
            return self._byte_base + raw[0]
        raise SetupError(f"token {token!r} is not in the fake tokenizer's vocabulary")

    @property
    def coord_ids(self) -> CoordIdTable:
        return self._coord_table

    @property
    def im_end_id(self) -> int:
        return self._token_to_id["<|im_end|>"]

    @property
    def pad_id(self) -> int:
        return self._token_to_id["<|endoftext|>"]

    @property
    def vocab_size(self) -> int:
        return self._size

    def _bytes_of(self, token_id: int) -> bytes:
        try:
            return self._bytes[int(token_id)]
        except KeyError:
            raise SetupError(f"id {token_id} is outside the fake tokenizer's {self._size} ids") from None
