"""A vocabulary expander for use-case tests: "expands" by writing a ``config.json`` (no model, no framework)."""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from domain.errors import ConfigError

FAKE_TOKENS_BEFORE = 10


@attrs.frozen
class FakeExpansionSummary:
    """:class:`ports.vocabulary.ExpansionSummary` of a 10-token vocabulary grown by the 1001 coord tokens."""

    tokens_before: int = FAKE_TOKENS_BEFORE
    tokens_after: int = FAKE_TOKENS_BEFORE + 1001
    rows_after: int = FAKE_TOKENS_BEFORE + 1001
    tied: bool = True
    wildcard_id: int = FAKE_TOKENS_BEFORE
    coord_ids: tuple[int, ...] = tuple(range(FAKE_TOKENS_BEFORE + 1, FAKE_TOKENS_BEFORE + 1001))

    def to_json(self) -> dict[str, object]:
        return {"tied": self.tied}


@attrs.define
class FakeVocabularyExpander:
    """:class:`ports.vocabulary.VocabularyExpander`; writes ``config.json`` into the output directory, then
    raises a ``ConfigError`` when ``fail`` (a failure after a partial write). ``calls`` records
    ``(source, output, dtype)``."""

    calls: list[tuple[Path, Path, str]] = attrs.field(factory=list)
    fail: bool = False

    def __call__(
        self, source: str | os.PathLike[str], output: str | os.PathLike[str], *, dtype: str = "bfloat16"
    ) -> FakeExpansionSummary:
        self.calls.append((Path(source), Path(output), dtype))
        (Path(output) / "config.json").write_text("{}")
        if self.fail:
            raise ConfigError("simulated failure after a partial write")
        return FakeExpansionSummary()
