"""Where metric events go (stage1.md §3.1, infer-eval-config.md §7.2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

MetricValue = float | int | str


class MetricSink(Protocol):
    """Receives flat log events: bookkeeping keys plus registered metric keys only."""

    def log(self, event: Mapping[str, MetricValue]) -> None: ...

    def close(self) -> None: ...
