"""Turning a LoRA / DoRA adapter checkpoint into a full checkpoint (infer-eval-config.md §7.3, stage1.md §7.1).

A training run with ``training.lora`` saves only the adapter: its weights, ``adapter_config.json`` (which
names the base checkpoint), the trained coord offsets when ``training.coord_offset`` was on, the processor
and ``coord_tokens.json``. The merger bakes adapter and offsets into the base weights and writes a
checkpoint that every entry point accepts as ``model.path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import attrs

from ports.json_types import JsonValue

MergeDtype = Literal["bfloat16", "float16", "float32"]


@attrs.frozen
class AdapterCheckpoint:
    """What an adapter checkpoint declares in its ``adapter_config.json`` (read without loading weights).

    ``base_model``: ``base_model_name_or_path`` as training recorded it (a local directory);
    ``coord_offsets``: the coord-offset module is one of its saved modules (``modules_to_save``).
    """

    path: Path
    base_model: str
    peft_type: str
    use_dora: bool
    target_modules: tuple[str, ...]
    coord_offsets: bool


@attrs.frozen
class MergeRequest:
    """Merge ``adapter`` onto the checkpoint in ``base_dir``; write into the existing empty ``output_dir``."""

    adapter: AdapterCheckpoint
    base_dir: Path
    output_dir: Path
    dtype: MergeDtype


@attrs.frozen
class MergeReport:
    """What a merge did; ``to_json`` goes into the merged checkpoint's ``resolved_config.json``.

    ``probe_max_abs_diff``: the largest logit difference between the adapter model and the merged model
    on a fixed text probe (coord tokens included), measured by the merger before saving.
    """

    adapter_dir: Path
    base_dir: Path
    dtype: MergeDtype
    peft_type: str
    use_dora: bool
    merged_modules: int
    coord_offsets: bool
    tie_head: bool | None
    tied: bool
    probe_max_abs_diff: float
    files: tuple[str, ...]

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "adapter_dir": str(self.adapter_dir),
            "base_dir": str(self.base_dir),
            "dtype": self.dtype,
            "peft_type": self.peft_type,
            "use_dora": self.use_dora,
            "merged_modules": self.merged_modules,
            "coord_offsets": self.coord_offsets,
            "tie_head": self.tie_head,
            "tied": self.tied,
            "probe_max_abs_diff": self.probe_max_abs_diff,
            "files": list(self.files),
        }


class AdapterMerger(Protocol):
    def read_adapter(self, directory: Path) -> AdapterCheckpoint:
        """Parse ``<directory>/adapter_config.json``; an unreadable or unsupported one is an
        :class:`~domain.errors.ArtifactError` naming the file and the key."""
        ...

    def merge(self, request: MergeRequest) -> MergeReport:
        """Load base, adapter and coord offsets, merge, check the merged logits against the adapter
        model's, and save model, processor and ``coord_tokens.json`` into ``request.output_dir``."""
        ...
