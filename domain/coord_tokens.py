"""Coord tokens ``<|coord_0|>``..``<|coord_999|>`` (D7, data.md §4): surface form, codec, id checks.

This module is the one owner of the coord-token predicate; every other module calls it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from domain.errors import CoordTokenError, CoordVocabularyError

NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1
WILDCARD_TOKEN = "<|coord_*|>"
COORD_TOKEN_PATTERN = r"<\|coord_(0|[1-9][0-9]{0,2})\|>"
_COORD_TOKEN_FULL = re.compile(COORD_TOKEN_PATTERN)  # used with fullmatch: no trailing "\n" slips through
# Anything shaped like a coord token, to tell "not canonical" from "not a token" in messages.
_COORD_LIKE = re.compile(r"<\|coord_([^|]*)\|>")


def is_coord_token(text: str) -> bool:
    """True exactly for canonical, in-range coord tokens (never the wildcard)."""
    return _COORD_TOKEN_FULL.fullmatch(text) is not None


def bin_to_token(k: int) -> str:
    if isinstance(k, bool) or not isinstance(k, int):
        raise CoordTokenError(f"bin must be an int, got {k!r}")
    if not 0 <= k <= MAX_BIN:
        raise CoordTokenError(f"bin {k} out of range 0..{MAX_BIN}")
    return f"<|coord_{k}|>"


def token_to_bin(text: str) -> int:
    """The bin of a canonical coord token; raises :class:`CoordTokenError` on anything else."""
    m = _COORD_TOKEN_FULL.fullmatch(text)
    if m is not None:
        return int(m.group(1))
    like = _COORD_LIKE.fullmatch(text)
    if like is not None and like.group(1).isdigit():
        value = int(like.group(1))
        if value > MAX_BIN and not like.group(1).startswith("0"):
            raise CoordTokenError(f"coord token {text!r}: value {value} out of range 0..{MAX_BIN}")
    raise CoordTokenError(f"not a canonical coord token: {text!r}")


def coord_token_value(text: str) -> int | None:
    """The number inside a coord-token-shaped string with canonical digits (may exceed 999), else None.

    Used by validators to report ``value V out of range`` for ``<|coord_1000|>`` (data.md §1.5 step 7).
    """
    like = _COORD_LIKE.fullmatch(text)
    if like is None:
        return None
    digits = like.group(1)
    if not digits.isdigit() or (len(digits) > 1 and digits.startswith("0")):
        return None
    return int(digits)


def all_coord_tokens() -> list[str]:
    """The 1000 coord token strings in bin order."""
    return [f"<|coord_{k}|>" for k in range(NUM_BINS)]


def vocabulary_additions() -> list[str]:
    """What vocabulary expansion adds, in order: the wildcard, then the 1000 coord tokens."""
    return [WILDCARD_TOKEN, *all_coord_tokens()]


def values_to_bins(values: Sequence[int | str]) -> list[int]:
    """Ints and/or canonical token strings to bins (range-checked); bools and floats are rejected."""
    out: list[int] = []
    for j, v in enumerate(values):
        if isinstance(v, bool):
            raise CoordTokenError(f"[{j}]: expected an integer bin or a coord token string, got {v!r}")
        if isinstance(v, int):
            if not 0 <= v <= MAX_BIN:
                raise CoordTokenError(f"[{j}]: value {v} out of range 0..{MAX_BIN}")
            out.append(v)
        elif isinstance(v, str):
            out.append(token_to_bin(v))
        else:
            raise CoordTokenError(f"[{j}]: expected an integer bin or a coord token string, got {v!r}")
    return out


def check_even_length(values: Sequence[object]) -> None:
    if len(values) % 2:
        raise CoordTokenError(f"a flat coordinate list must have an even length; got len={len(values)}")


class CoordIdTable:
    """The validated coord ids of one tokenizer, in bin order (stage1.md §0.3)."""

    def __init__(self, ids: Sequence[int], wildcard_id: int | None = None) -> None:
        if len(ids) != NUM_BINS or len(set(ids)) != NUM_BINS:
            raise CoordVocabularyError(f"expected {NUM_BINS} distinct coord token ids, got {len(set(ids))}")
        if wildcard_id is not None and wildcard_id in set(ids):
            raise CoordVocabularyError(f"wildcard id {wildcard_id} collides with a coord id")
        self.ids: tuple[int, ...] = tuple(int(i) for i in ids)
        self.wildcard_id = wildcard_id
        self._bin_of = {i: k for k, i in enumerate(self.ids)}
        self.max_id = max(self.ids)
        self.is_contiguous = self.ids == tuple(range(self.ids[0], self.ids[0] + NUM_BINS))

    @classmethod
    def from_vocab(
        cls, token_to_id: Mapping[str, int | None], unk_id: int | None = None
    ) -> CoordIdTable:
        """Look up every coord token; fail listing what is missing or unknown (stage1.md §0.3.1)."""
        ids: list[int] = []
        bad: list[str] = []
        for tok in all_coord_tokens():
            i = token_to_id.get(tok)
            if i is None or (unk_id is not None and i == unk_id):
                bad.append(tok)
            else:
                ids.append(int(i))
        distinct = len(set(ids))
        if bad or distinct != NUM_BINS:
            shown = bad[:10]
            more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
            raise CoordVocabularyError(
                f"expected {NUM_BINS} distinct coord token ids, got {distinct}; "
                f"missing or unknown: {shown}{more}"
            )
        wildcard = token_to_id.get(WILDCARD_TOKEN)
        if wildcard is not None and unk_id is not None and wildcard == unk_id:
            wildcard = None
        return cls(ids, wildcard)

    def bin_of(self, token_id: int) -> int | None:
        return self._bin_of.get(int(token_id))

    def is_coord_id(self, token_id: int) -> bool:
        return int(token_id) in self._bin_of

    def check_vocab_size(self, vocab_size: int) -> None:
        """Every coord id must index the logits' last dimension (stage1.md §0.3.2)."""
        if self.max_id >= vocab_size:
            raise CoordVocabularyError(f"coord id {self.max_id} >= logits vocab size {vocab_size}")

    def bin_table(self, vocab_size: int) -> npt.NDArray[np.int64]:
        """id -> bin table of length ``vocab_size`` (-1 for non-coord ids); works for non-contiguous ids."""
        self.check_vocab_size(vocab_size)
        table = np.full(vocab_size, -1, dtype=np.int64)
        table[np.asarray(self.ids, dtype=np.int64)] = np.arange(NUM_BINS, dtype=np.int64)
        return table

    def mask(self, vocab_size: int) -> npt.NDArray[np.bool_]:
        """Boolean coord-id mask over the logits' vocabulary dimension: exactly 1000 true entries."""
        return self.bin_table(vocab_size) >= 0
