"""``python -m application.train --config FILE``: Stage-1 training (stage1.md; D8, D12, D14, D15).

Run order: config (errors before anything else) -> every record and image validated -> run directory
checks -> resolved_config.json, run_metadata.json, metric_registry.json -> model checkpoint (a local
``model.path`` or the embedded tiny model) -> the training engine -> finished_at.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from application import wiring
from application.cli import parse_config_argument
from application.config import CoordExpConfig, LoadedConfig, check_local_paths, load_config, resolved_sha256, write_resolved_config
from application.datasets import LoadedSplit, load_split
from application.provenance import build_run_metadata, mark_finished
from domain.errors import ConfigError, CoordExpError, DataContractError
from domain.metrics_registry import registry_snapshot
from ports.metrics import MetricSink
from ports.training import TrainingEngine, TrainingJob, TrainingOutcome

ENTRY_POINT = "application.train"
PROJECT_DIR = Path(__file__).resolve().parents[1]


def run_dir_of(config: CoordExpConfig) -> Path:
    assert config.run is not None and config.run.output_dir is not None
    return Path(config.run.output_dir) / str(config.run.name)


def process_rank() -> int:
    """This process's rank as the distributed launcher set it (``RANK``); 0 without a launcher."""
    return int(os.environ.get("RANK", "0") or 0)


def resume_checkpoint(run_dir: Path, requested: str | None, *, check_fresh: bool = True) -> Path | None:
    """``training.resume_from_checkpoint``: a checkpoint directory, or ``latest`` (newest complete one).

    A run directory that already holds checkpoints or a ``logging.jsonl`` without a resume request is
    an error (infer-eval-config.md §7): runs are never silently mixed.
    """
    from application.checkpoints import complete_checkpoints

    if requested is None:
        if not check_fresh:
            return None
        existing = sorted(p.name for p in run_dir.glob("checkpoint-*")) if run_dir.exists() else []
        if existing or (run_dir / "logging.jsonl").exists():
            raise ConfigError(
                f"run directory {run_dir} already holds {existing or ['logging.jsonl']}; set "
                "'training.resume_from_checkpoint' (a checkpoint path or 'latest') or choose a new 'run.name'"
            )
        return None
    if requested == "latest":
        complete = complete_checkpoints(run_dir)
        if not complete:
            raise ConfigError(
                f"'training.resume_from_checkpoint: latest' but {run_dir} holds no complete checkpoint"
            )
        return complete[-1]
    path = Path(requested)
    if not (path / "checkpoint_complete.json").is_file():
        raise ConfigError(
            f"'training.resume_from_checkpoint' = {requested!r} is not a complete checkpoint "
            "(no checkpoint_complete.json)"
        )
    return path


def train(loaded: LoadedConfig, engine: TrainingEngine | None = None) -> TrainingOutcome:
    """Run the use case; ``engine`` overrides the configured engine (tests pass an instrumented one)."""
    config = loaded.config
    # load_config(entry_point="train") requires these blocks
    assert config.run is not None and config.model is not None
    check_local_paths(config, entry_point="train")
    if config.objective.trainer_variant != "stage1":
        raise ConfigError(
            f"'objective.trainer_variant' = {config.objective.trainer_variant!r}: this build trains 'stage1' only"
        )
    artifacts = wiring.make_artifact_store()
    images = wiring.make_image_store()
    data = config.data
    assert data.train_jsonl is not None
    train_split = load_split(
        Path(data.train_jsonl), data, config.prompt.variant, limit=data.train_limit, artifacts=artifacts, images=images
    )
    val_split = None
    if data.val_jsonl is not None and config.training.eval_strategy != "no":
        val_split = load_split(
            Path(data.val_jsonl), data, config.prompt.variant, limit=data.val_limit, artifacts=artifacts, images=images
        )
    if config.objective.trainer_variant == "stage2_ab" and train_split.num_poly_objects:
        raise DataContractError(
            f"{train_split.path}: {train_split.num_poly_objects} polygon objects, but Stage-2 AB v1 is bbox-only (D9)"
        )

    # Only rank 0 checks the run directory and writes run files (infer-eval-config.md §7.1, §7.2); the
    # other ranks would otherwise find rank 0's fresh files and refuse to start.
    is_main = process_rank() == 0
    run_dir = run_dir_of(config)
    resume = resume_checkpoint(run_dir, config.training.resume_from_checkpoint, check_fresh=is_main)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_main:
        return _run_engine(loaded, engine, run_dir, run_dir / "resolved_config.json", wiring.make_null_metric_sink(),
                           train_split, val_split, resume)
    resolved_path = write_resolved_config(loaded, run_dir, kind="train")
    collector = wiring.make_provenance_collector()
    metadata = build_run_metadata(
        kind="train",
        collector=collector,
        entry_point=ENTRY_POINT,
        argv=["--config", str(loaded.path)],
        config_path=str(loaded.path),
        extends_chain=[str(p) for p in loaded.extends_chain],
        resolved_config_sha256=resolved_sha256(config),
        run_name=str(config.run.name),
        output_dir=str(config.run.output_dir),
        run_dir=str(run_dir),
        seed=int(config.run.seed),
        project_dir=str(PROJECT_DIR),
        artifacts={
            "resolved_config": "resolved_config.json",
            "run_metadata": "run_metadata.json",
            "metric_registry": "metric_registry.json",
            "logging": "logging.jsonl",
        },
    )
    artifacts.write_json(run_dir / "run_metadata.json", metadata)
    artifacts.write_json(run_dir / "metric_registry.json", registry_snapshot())

    sink = wiring.make_metric_sink(
        run_dir / "logging.jsonl", resume_step=_checkpoint_step(resume) if resume is not None else None
    )
    outcome = _run_engine(loaded, engine, run_dir, resolved_path, sink, train_split, val_split, resume)
    artifacts.write_json(run_dir / "run_metadata.json", mark_finished(metadata, collector))
    return outcome


def _run_engine(
    loaded: LoadedConfig,
    engine: TrainingEngine | None,
    run_dir: Path,
    resolved_path: Path,
    sink: MetricSink,
    train_split: LoadedSplit,
    val_split: LoadedSplit | None,
    resume: Path | None,
) -> TrainingOutcome:
    config = loaded.config
    assert config.model is not None
    model_path = wiring.resolve_model_checkpoint(config.model)
    if engine is None:
        engine = wiring.make_training_engine(config)
    try:
        return engine.run(
            TrainingJob(
                config=config,
                run_dir=run_dir,
                model_path=model_path,
                train_records=tuple(train_split.records),
                train_images=train_split.images,
                val_records=tuple(val_split.records) if val_split is not None else None,
                val_images=val_split.images if val_split is not None else None,
                resolved_config_path=resolved_path,
                metric_sink=sink,
                resume_from=resume,
            )
        )
    finally:
        sink.close()


def _checkpoint_step(path: Path) -> int:
    return int(json.loads((path / "checkpoint_complete.json").read_text())["global_step"])


def main(argv: Sequence[str] | None = None) -> int:
    config_path = parse_config_argument(sys.argv[1:] if argv is None else argv, ENTRY_POINT)
    try:
        loaded = load_config(config_path, entry_point="train")
        outcome = train(loaded)
    except CoordExpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    losses = ", ".join(f"{v:.4f}" for v in outcome.step_losses)
    print(f"Training complete: global_step={outcome.global_step} last_checkpoint={outcome.last_checkpoint}")
    print(f"per-step losses: [{losses}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
