"""Port of the vocabulary expansion (D7, data.md §4.3): add the coord tokens to a checkpoint.

``application.expand_vocab`` receives a :class:`VocabularyExpander`; wiring gives it the Hugging Face one
(``adapters.hf.vocab.expand_checkpoint``), tests give it fakes.
"""

from __future__ import annotations

import os
from typing import Protocol


class ExpansionSummary(Protocol):
    """What an expander reports (adapters.hf.vocab.ExpansionReport)."""

    @property
    def tokens_before(self) -> int: ...

    @property
    def tokens_after(self) -> int: ...

    @property
    def rows_after(self) -> int: ...

    @property
    def tied(self) -> bool: ...

    @property
    def wildcard_id(self) -> int: ...

    @property
    def coord_ids(self) -> tuple[int, ...]: ...

    def to_json(self) -> dict[str, object]: ...


class VocabularyExpander(Protocol):
    """Expands ``source`` into the empty directory ``output`` (adapters.hf.vocab.expand_checkpoint)."""

    def __call__(
        self, source: str | os.PathLike[str], output: str | os.PathLike[str], *, dtype: str = ...
    ) -> ExpansionSummary: ...
