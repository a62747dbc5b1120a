"""The exception taxonomy (D15).

Objective-changing or evaluation-invalidating faults raise at once with what failed and where.
Diagnostics and telemetry are best-effort: see :class:`BestEffortDiagnostics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import attrs

T = TypeVar("T")

MAX_LISTED_PROBLEMS = 20


class CoordExpError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(CoordExpError):
    """A configuration is invalid. Raised before any model, dataset image or server is touched."""

    def __init__(self, messages: str | Sequence[str]) -> None:
        self.messages: tuple[str, ...] = (messages,) if isinstance(messages, str) else tuple(messages)
        super().__init__("\n".join(self.messages))


class UsageError(CoordExpError):
    """An entry point was called with arguments other than ``--config FILE`` (exit code 2)."""


@attrs.frozen
class DataProblem:
    """One data-contract violation: ``<file>:<line>: <dotted.field>: <reason>``."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class DataContractError(CoordExpError):
    """One or more records violate the JSONL contract; lists at most 20 problems then ``... and N more``."""

    def __init__(self, problems: Sequence[DataProblem] | str, *, limit: int = MAX_LISTED_PROBLEMS) -> None:
        if isinstance(problems, str):
            self.problems: tuple[DataProblem, ...] = ()
            message = problems
        else:
            self.problems = tuple(problems)
            shown = [str(p) for p in self.problems[:limit]]
            rest = len(self.problems) - len(shown)
            if rest > 0:
                shown.append(f"... and {rest} more")
            message = "\n".join(shown)
        super().__init__(message)


class CoordJSONError(CoordExpError):
    """Strict CoordJSON transpile failed: carries the record index (or None) and the reason bucket."""

    def __init__(self, message: str, *, record_index: int | None = None, reason: str | None = None) -> None:
        self.record_index = record_index
        self.reason = reason
        super().__init__(message)


class CoordTokenError(CoordExpError, ValueError):
    """A string is not a canonical coord token, or a bin is out of range."""


class CoordVocabularyError(CoordExpError):
    """A tokenizer / model does not carry the 1000 coord tokens as required (D7)."""


class GeometryError(CoordExpError, ValueError):
    """A coordinate or geometry breaks a codec rule (e.g. a pixel outside ``[0, W-1]``)."""


class InvariantViolation(CoordExpError):
    """An internal invariant failed: a bug, never a user error. Fail fast."""


class SetupError(CoordExpError):
    """The runtime setup (model, tokenizer, trainer knobs) contradicts a requirement of the spec."""


class StepError(CoordExpError):
    """An objective-changing fault during a training or inference step (e.g. non-finite loss)."""


class ArtifactError(CoordExpError):
    """An artifact on disk is malformed, missing, or cannot be resumed."""


@attrs.define
class BestEffortDiagnostics:
    """Runs diagnostics so that a failing one warns once, switches itself off and changes nothing else.

    ``disabled`` maps a diagnostic name to the first error text; the metric key
    ``health/diagnostic_disabled/<name>`` is derived from it by the caller.
    """

    disabled: dict[str, str] = attrs.field(factory=dict)

    def run(self, name: str, fn: Callable[[], T]) -> T | None:
        if name in self.disabled:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - diagnostics are best-effort by contract (D15)
            self.disabled[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"Diagnostic '{name}' failed (best-effort): {type(exc).__name__}: {exc}; "
                "disabled for the rest of the run",
                RuntimeWarning,
                stacklevel=2,
            )
            return None

    def is_disabled(self, name: str) -> bool:
        return name in self.disabled


class ImageFileError(CoordExpError):
    """An image file cannot be used: ``kind`` is ``missing`` or ``unreadable``; ``path`` is the resolved path."""

    def __init__(self, message: str, *, path: str, kind: str) -> None:
        self.path = path
        self.kind = kind
        super().__init__(message)


class ConversionError(CoordExpError):
    """The offline converter cannot proceed: its source annotations or settings break a rule (data.md §9)."""


class GenerationError(CoordExpError):
    """Generating one sample failed (backend exception, transport failure, server error, missing log-probs).

    ``index`` is the sample's 0-based input index when known. Under ``infer.on_generation_error: raise``
    it propagates; under ``record`` the sample becomes a ``generation_failed`` record.
    """

    def __init__(self, message: str, *, index: int | None = None) -> None:
        self.index = index
        super().__init__(message)
