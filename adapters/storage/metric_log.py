"""``logging.jsonl``: the one metric log of a run (infer-eval-config.md §7.2)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from adapters.storage.atomic import naming, write_lines_atomically
from domain.errors import ArtifactError
from ports.metrics import MetricValue


class JsonlMetricSink:
    """Appends one flat JSON object per log event and flushes it (rank 0 only, one writer per run)."""

    def __init__(self, path: Path, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._handle = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        """On resume from step ``s``: keep only the lines with ``global_step <= s`` (atomic rewrite)."""
        kept: list[str] = []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == len(lines) and not text.endswith("\n"):
                    # the last line was torn by a kill mid-write: it belongs to the abandoned trajectory
                    warnings.warn(f"{self.path}:{number}: dropped a torn last log line: {line[:200]}",
                                  RuntimeWarning, stacklevel=2)  # fmt: skip
                    continue
                raise ArtifactError(f"{self.path}:{number}: malformed log line: {line[:200]}") from exc
            if int(event.get("global_step", 0)) <= step:
                kept.append(line)
        write_lines_atomically(self.path, kept)

    def log(self, event: Mapping[str, MetricValue]) -> None:
        try:
            self._handle.write(json.dumps(dict(event), ensure_ascii=False, sort_keys=False) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:  # a full disk reports no path: name the log
            raise naming(exc, self.path) from exc

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


class NullMetricSink:
    """Drops every event: what ranks other than 0 log to."""

    def log(self, event: Mapping[str, MetricValue]) -> None:
        return None

    def close(self) -> None:
        return None
