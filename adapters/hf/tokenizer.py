"""HF implementation of :class:`ports.tokenizer.TokenizerPort` (data.md §4, D7, D11)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from domain.coord_tokens import CoordIdTable, vocabulary_additions
from domain.errors import CoordVocabularyError, SetupError

IM_END = "<|im_end|>"


class HFTokenizer:
    """Wraps a transformers tokenizer; every decode keeps special tokens and skips clean-up (D11)."""

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        # piece() memo: an id's text never changes (new tokens get new ids); a rollout reuses few ids.
        self._pieces: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(
            self.hf.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )

    def piece(self, token_id: int) -> str:
        """``decode([token_id])``, memoised per id (the Channel-B scan decodes every rollout id, D11)."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[int(token_id)] = self.decode([token_id])
        return text

    def id_of(self, token: str) -> int:
        token_id = self.hf.convert_tokens_to_ids(token)
        unk = self.hf.unk_token_id
        if token_id is None or (unk is not None and token_id == unk and token != self.hf.unk_token):
            raise SetupError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    @cached_property
    def coord_ids(self) -> CoordIdTable:
        """Looked up and validated once (stage1.md §0.3): 1000 distinct known ids, all special tokens (D7)."""
        lookup = {tok: self.hf.convert_tokens_to_ids(tok) for tok in vocabulary_additions()}
        try:
            table = CoordIdTable.from_vocab(lookup, unk_id=self.hf.unk_token_id)
        except CoordVocabularyError as exc:
            raise CoordVocabularyError(
                f"the tokenizer does not carry the coord vocabulary ({exc}); a base checkpoint must be expanded "
                "first: `python -m application.expand_vocab --config ...` (D7), then use its output as 'model.path'"
            ) from exc
        decoder = self.hf.added_tokens_decoder
        not_special = [
            vocabulary_additions()[1 + k]
            for k, i in enumerate(table.ids)
            if i not in decoder or not decoder[i].special
        ]
        if not_special:
            raise CoordVocabularyError(
                f"{len(not_special)} coord tokens are not special tokens of this tokenizer (e.g. {not_special[:3]}); "
                "expand the checkpoint with `python -m application.expand_vocab --config ...` (D7)"
            )
        return table

    @cached_property
    def im_end_id(self) -> int:
        return self.id_of(IM_END)

    @cached_property
    def pad_id(self) -> int:
        pad = self.hf.pad_token_id
        if pad is None:
            pad = self.hf.eos_token_id
        if pad is None:
            raise SetupError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
        return int(pad)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)
