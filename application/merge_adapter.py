"""``python -m application.merge_adapter --config FILE``: a LoRA / DoRA checkpoint -> a full checkpoint (§7.3).

A training run with ``training.lora`` saves only the adapter (``adapter_config.json``, adapter weights, the
coord offsets when ``training.coord_offset`` was on, processor, ``coord_tokens.json``); inference and the
Stage-2 server need full weights. This use case reads ``model.path`` (the adapter checkpoint, e.g.
``<train run_dir>/checkpoint-2000``) and writes the merged checkpoint to ``run_dir = run.output_dir /
run.name``, usable as ``model.path`` everywhere. Config keys read: ``run.name``, ``run.output_dir``,
``model.path``, ``model.dtype`` (the dtype the base is loaded, merged and saved in).

The base checkpoint is the one the adapter config names (``base_model_name_or_path``). When the training
run used the embedded tiny model (its ``resolved_config.json`` copy in the checkpoint records
``model.tiny``), the tiny checkpoint is rebuilt from exactly those settings (a no-op while it is cached);
its directory name (the settings and library fingerprint) must equal the recorded one.

Rules:
- config errors (no ``model.path``, ``model.tiny`` given, missing directory, ``run_dir`` present, equal to
  or inside the input) and a ``model.path`` that is not an adapter checkpoint (no ``adapter_config.json``;
  an incompletely written training checkpoint) are raised before any model is loaded or anything written;
- the merged checkpoint is written into a hidden staging directory next to ``run_dir`` and renamed into
  place only when complete and verified;
- its ``resolved_config.json`` (``kind: merge_adapter``) carries a ``merge`` summary, the adapter
  checkpoint's path and the training run's recorded config hash.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from application.checkpoints import incomplete_checkpoint_problem
from application.cli import run_entry_point
from application.config import CONVERTER, LoadedConfig, check_local_paths, load_config, write_resolved_config
from application.config.schema import ModelConfig, TinyModelConfig
from application.expand_vocab import check_new_checkpoint_dir
from domain.errors import ArtifactError, ConfigError
from ports.adapter_merge import AdapterCheckpoint, AdapterMerger, MergeReport, MergeRequest
from ports.storage import ArtifactStore, CheckpointStore

ENTRY_POINT = "application.merge_adapter"
RESOLVED_KIND = "merge_adapter"
ADAPTER_CONFIG = "adapter_config.json"
TRAINING_RECORD = "resolved_config.json"


@attrs.frozen(eq=False)
class MergeDependencies:
    """The ports of one merge (real ones: :func:`default_dependencies`; tests pass fakes).

    ``resolve_checkpoint``: ``model`` block -> checkpoint directory (rebuilds the embedded tiny base)."""

    merger: AdapterMerger
    store: ArtifactStore
    checkpoints: CheckpointStore
    resolve_checkpoint: Callable[[ModelConfig], Path]


def default_dependencies() -> MergeDependencies:
    """The configured adapters, from the composition root (called by :func:`main` only)."""
    from application import wiring

    return MergeDependencies(
        merger=wiring.make_adapter_merger(),
        store=wiring.make_artifact_store(),
        checkpoints=wiring.make_checkpoint_store(),
        resolve_checkpoint=wiring.resolve_model_checkpoint,
    )


@attrs.frozen
class MergeOutcome:
    run_dir: Path
    report: MergeReport


def planned_paths(loaded: LoadedConfig, checkpoints: CheckpointStore) -> tuple[Path, Path]:
    """``(model.path, run_dir)`` after the checks that load nothing: raises :class:`ConfigError`."""
    config = loaded.config
    if config.model is None or config.model.path is None or config.model.tiny is not None:
        raise ConfigError(
            "'model.path' (and not 'model.tiny') is required by application.merge_adapter: the adapter "
            "checkpoint to merge, e.g. <training run_dir>/checkpoint-<step>"
        )
    check_local_paths(config, entry_point="merge_adapter")
    source = Path(config.model.path)
    problem = incomplete_checkpoint_problem(source, checkpoints)
    if problem is not None:
        raise ConfigError(problem)
    if not (source / ADAPTER_CONFIG).is_file():
        full = (source / "config.json").is_file()
        raise ConfigError(
            f"'model.path' = {str(source)!r} is not a LoRA/DoRA adapter checkpoint (no {ADAPTER_CONFIG})"
            + ("; it holds config.json: a full checkpoint, usable as 'model.path' as is" if full else "")
        )
    if config.run is None:
        raise ConfigError("'run.name' and 'run.output_dir' are required by application.merge_adapter")
    run_dir = config.run.run_dir
    check_new_checkpoint_dir(source, run_dir, "the merged checkpoint")
    return source, run_dir


def recorded_tiny(checkpoint: Path) -> TinyModelConfig | None:
    """``model.tiny`` of the training config recorded in the checkpoint, or None (no record, or ``model.path``)."""
    record = checkpoint / TRAINING_RECORD
    if not record.is_file():
        return None
    try:
        document = json.loads(record.read_text(encoding="utf-8"))
        tiny = document["resolved"]["model"]["tiny"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{record}: cannot read the training run's 'resolved.model': {exc}") from exc
    if tiny is None:
        return None
    try:
        settings = CONVERTER.structure(tiny, TinyModelConfig)
    except Exception as exc:  # cattrs raises its own exception groups
        raise ArtifactError(f"{record}: 'resolved.model.tiny' is not a valid tiny-model block: {exc}") from exc
    assert isinstance(settings, TinyModelConfig)
    return settings


def resolve_base(adapter: AdapterCheckpoint, resolve_checkpoint: Callable[[ModelConfig], Path]) -> Path:
    """The base checkpoint directory of ``adapter`` (see the module docstring); raises a located error."""
    named = Path(adapter.base_model)
    where = f"{adapter.path / ADAPTER_CONFIG}: 'base_model_name_or_path' = {adapter.base_model!r}"
    tiny = recorded_tiny(adapter.path)
    if tiny is not None:
        base = resolve_checkpoint(ModelConfig(tiny=tiny))
        if base.name != named.name:
            raise ArtifactError(
                f"{where}, but the tiny model rebuilt from the recorded 'model.tiny' is {base}: the settings or "
                "the transformers / tokenizers versions differ from training, so the base weights would too"
            )
        return base
    if not (named / "config.json").is_file():
        raise ArtifactError(
            f"{where} is not a local checkpoint directory (no config.json); put the base checkpoint the "
            "adapter was trained on back at that path"
        )
    return named


def merge_adapter(loaded: LoadedConfig, deps: MergeDependencies) -> MergeOutcome:
    """Run the use case with the merger, stores and checkpoint resolver of ``deps``."""
    source, run_dir = planned_paths(loaded, deps.checkpoints)
    model = loaded.config.model
    assert model is not None  # planned_paths checked it
    merger, store = deps.merger, deps.store
    adapter = merger.read_adapter(source)
    base = resolve_base(adapter, deps.resolve_checkpoint)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # not mkdtemp: the merged model gets the umask's mode, not 0700 (issue 11 item 14)
    staging = store.make_staging_directory(run_dir.parent, prefix=f".{run_dir.name}.", suffix=".partial")
    try:
        report = merger.merge(MergeRequest(adapter=adapter, base_dir=base, output_dir=staging, dtype=model.dtype))
        write_resolved_config(
            loaded,
            staging,
            kind=RESOLVED_KIND,
            extra={"run_dir": str(run_dir), "merge": report.to_json(), "training": _training_record(source)},
            store=store,
        )
        if run_dir.exists():
            raise ConfigError(f"run directory {run_dir} appeared while merging; the result was discarded")
        os.rename(staging, run_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return MergeOutcome(run_dir=run_dir, report=report)


def _training_record(checkpoint: Path) -> dict[str, Any] | None:
    """Where the adapter came from: the checkpoint and its training run's recorded config path and hash."""
    record = checkpoint / TRAINING_RECORD
    if not record.is_file():
        return None
    document = json.loads(record.read_text(encoding="utf-8"))
    return {
        "checkpoint": str(checkpoint),
        "config_path": document.get("config_path"),
        "resolved_config_sha256": document.get("resolved_config_sha256"),
    }


def summary_text(outcome: MergeOutcome) -> str:
    r = outcome.report
    kind = "DoRA" if r.use_dora else "LoRA"
    offsets = f"coord offsets merged (tie_head: {str(r.tie_head).lower()})" if r.coord_offsets else "no coord offsets"
    return "\n".join(
        [
            f"Merged checkpoint written to {outcome.run_dir}",
            f"{kind}: {r.merged_modules} modules merged into {r.base_dir}; {offsets}; tied: {str(r.tied).lower()}",
            f"probe: max |logit difference| adapter vs merged = {r.probe_max_abs_diff:.3g} ({r.dtype})",
            f"Use it with:  model: {{path: {outcome.run_dir}}}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    def body(config_path: Path) -> int:
        from application import wiring

        loaded = load_config(config_path, entry_point="merge_adapter")
        # config errors before the merger (and its frameworks) is imported, as merge_adapter checks them first
        planned_paths(loaded, wiring.make_checkpoint_store())
        outcome = merge_adapter(loaded, default_dependencies())
        print(summary_text(outcome))
        return 0

    return run_entry_point(argv, ENTRY_POINT, body)


if __name__ == "__main__":
    raise SystemExit(main())
