"""Where run provenance comes from (infer-eval-config.md §6): git, package metadata, hardware, environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from ports.json_types import JsonObject


class ProvenanceCollector(Protocol):
    """Probes the outside world; every method returns plain JSON-able data and never raises.

    A failing probe returns ``{"error": "<ExcType>: <msg>"}`` in place of its mapping.
    """

    def python_version(self) -> str: ...

    def platform(self) -> str: ...

    def git(self, directory: str) -> JsonObject:
        """``{sha, branch, dirty, status_porcelain}`` of the checkout holding ``directory``."""
        ...

    def package(self, distribution: str) -> JsonObject:
        """``{version, location}`` from distribution metadata (never importing the package), or ``{error}``."""
        ...

    def module_dir(self, module: str) -> str | None:
        """Directory of an importable top-level package, from its module spec (no import)."""
        ...

    def checkout_root(self, directory: str) -> str | None:
        """The nearest directory at or above ``directory`` that contains ``.git``, else None."""
        ...

    def hardware(self) -> JsonObject: ...

    def environment(self, names: Sequence[str]) -> Mapping[str, str]:
        """Only the whitelisted variables that are set."""
        ...

    def now_utc(self) -> str:
        """UTC ISO-8601 with a trailing ``Z``."""
        ...
