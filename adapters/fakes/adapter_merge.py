"""An adapter merger for use-case tests: reads ``adapter_config.json`` with the stdlib and "merges" by writing
a ``config.json`` (no peft, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from domain.errors import ArtifactError
from ports.adapter_merge import AdapterCheckpoint, MergeReport, MergeRequest

COORD_OFFSET_MODULE = "coord_offset"


@attrs.define
class FakeAdapterMerger:
    """:class:`ports.adapter_merge.AdapterMerger`; ``requests`` records every merge. With ``fail`` the merge
    raises an ``ArtifactError`` after writing ``config.json`` (a failure after a partial write)."""

    requests: list[MergeRequest] = attrs.field(factory=list)
    fail: bool = False

    def read_adapter(self, directory: Path) -> AdapterCheckpoint:
        path = Path(directory) / "adapter_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            saved = config.get("modules_to_save") or []
            return AdapterCheckpoint(
                path=Path(directory), base_model=str(config["base_model_name_or_path"]),
                peft_type=str(config["peft_type"]), use_dora=bool(config.get("use_dora", False)),
                target_modules=tuple(config.get("target_modules") or ()),
                coord_offsets=any(COORD_OFFSET_MODULE in str(m) for m in saved),
            )  # fmt: skip
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ArtifactError(f"{path}: not a readable adapter config: {exc!r}") from None

    def merge(self, request: MergeRequest) -> MergeReport:
        self.requests.append(request)
        (request.output_dir / "config.json").write_text("{}")
        if self.fail:
            raise ArtifactError("simulated failure after a partial write")
        adapter = request.adapter
        return MergeReport(
            adapter_dir=adapter.path, base_dir=request.base_dir, dtype=request.dtype, peft_type=adapter.peft_type,
            use_dora=adapter.use_dora, merged_modules=len(adapter.target_modules),
            coord_offsets=adapter.coord_offsets, tie_head=None, tied=False, probe_max_abs_diff=0.0,
            files=("config.json",),
        )  # fmt: skip
