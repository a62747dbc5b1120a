"""``python -m application.train --config FILE``: Stage-1 training (stage1.md; D8, D12, D14, D15).

Run order: config (errors before anything else) -> every record and image validated -> run directory
checks (lock, resume) -> model checkpoint (a local ``model.path`` or the embedded tiny model) -> the engine's
``prepare`` (sample lengths, over-long samples, the pack plans: tokenizer only, no model) -> resolved_config.json,
run_metadata.json, metric_registry.json, logging.jsonl -> the engine's ``run`` (writes the pack plan files,
loads the model, trains) -> finished_at.

Every check that can fail before step 1 without the model runs before the first run file is written
(issue 11 item 3): a run that fails there leaves its run directory as it found it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

from application import wiring
from application.cli import run_entry_point
from application.config import (
    RESOLVED_CONFIG_FILENAME,
    CoordExpConfig,
    LoadedConfig,
    check_local_paths,
    load_config,
    resolved_sha256,
    write_resolved_config,
)
from application.datasets import load_split
from application.provenance import build_run_metadata, mark_finished
from domain.errors import ConfigError, DataContractError
from domain.metrics_registry import registry_snapshot
from ports.metrics import MetricSink
from ports.training import PreparedTraining, TrainingEngine, TrainingJob, TrainingOutcome

ENTRY_POINT = "application.train"
PROJECT_DIR = Path(__file__).resolve().parents[1]


def run_dir_of(config: CoordExpConfig) -> Path:
    assert config.run is not None and config.run.output_dir is not None
    return Path(config.run.output_dir) / str(config.run.name)


def process_rank() -> int:
    """This process's rank as the distributed launcher set it (``RANK``); 0 without a launcher."""
    return int(os.environ.get("RANK", "0") or 0)


def logged_steps(log: Path) -> int:
    """The highest ``global_step`` logged in ``logging.jsonl`` (0 when none: absent, empty, or only a line
    torn by a kill). Lines that are not JSON objects are skipped here; the metric sink judges them."""
    if not log.is_file():
        return 0
    highest = 0
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        step = event.get("global_step") if isinstance(event, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            highest = max(highest, step)
    return highest


def discard_incomplete_checkpoints(run_dir: Path, *, after_step: int) -> list[Path]:
    """Remove ``checkpoint-<step>`` directories past ``after_step`` that carry no completion marker.

    They are interrupted saves of the trajectory being abandoned (a kill during a save): never usable
    (infer-eval-config.md §7.3), and the restarted run writes them afresh, so none of their stale files may
    linger. A directory with a marker is never touched here.
    """
    from application.checkpoints import COMPLETE_MARKER

    removed: list[Path] = []
    for path in sorted(Path(run_dir).glob("checkpoint-*")):
        suffix = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and suffix.isdigit() and int(suffix) > after_step and not (path / COMPLETE_MARKER).exists():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def resume_checkpoint(run_dir: Path, requested: str | None, *, check_fresh: bool = True) -> Path | None:
    """``training.resume_from_checkpoint``: a checkpoint directory, or ``latest`` (newest complete one).

    A run directory that already holds a complete checkpoint or a logged step, without a resume
    request, is an error (infer-eval-config.md §7): runs are never silently mixed. A run that never
    completed a step (only the files written before step 1, an empty log, checkpoint directories
    without their completion marker) holds nothing to mix with and is simply started again; so is
    ``latest`` when no checkpoint is complete (step 0 is then the latest state: the log is cut back to
    it), which is the way forward after a kill during the first checkpoint save.
    """
    from application.checkpoints import checkpoint_problem, complete_checkpoints, latest_usable_checkpoint

    store = wiring.make_checkpoint_store()
    if requested is None:
        if not check_fresh:
            return None
        names = [p.name for p in complete_checkpoints(run_dir, store)] if run_dir.exists() else []
        logged = logged_steps(run_dir / "logging.jsonl")
        if names or logged:
            held = names + ([f"logging.jsonl (steps up to {logged})"] if logged else [])
            raise ConfigError(
                f"run directory {run_dir} already holds {held}; set "
                "'training.resume_from_checkpoint' (a checkpoint path or 'latest') or choose a new 'run.name'"
            )
        return None
    if requested == "latest":
        complete = complete_checkpoints(run_dir, store)
        if not complete:
            if check_fresh:
                warnings.warn(
                    f"'training.resume_from_checkpoint: latest': {run_dir} holds no complete checkpoint; "
                    "starting from step 0",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        # a complete checkpoint whose files no longer match its marker is skipped with a warning (issue 11 item 5)
        return latest_usable_checkpoint(run_dir, "training.resume_from_checkpoint", store)
    path = Path(requested)
    if not (path / "checkpoint_complete.json").is_file():
        raise ConfigError(
            f"'training.resume_from_checkpoint' = {requested!r} is not a complete checkpoint "
            "(no checkpoint_complete.json)"
        )
    problem = checkpoint_problem(path, "training.resume_from_checkpoint", store)
    if problem is not None:
        raise ConfigError(problem)
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
    if engine is None:
        engine = wiring.make_training_engine(config)
    job = TrainingJob(
        config=config,
        run_dir=run_dir,
        model_path=wiring.resolve_model_checkpoint(config.model),
        train_records=tuple(train_split.records),
        train_images=train_split.images,
        val_records=tuple(val_split.records) if val_split is not None else None,
        val_images=val_split.images if val_split is not None else None,
        resolved_config_path=run_dir / RESOLVED_CONFIG_FILENAME,
        resume_from=resume,
    )
    # Lengths, over-long samples and the pack plan fail here, before any run file (issue 11 item 3).
    prepared = engine.prepare(job)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_main:
        return _run_engine(engine, job, prepared, wiring.make_null_metric_sink())
    write_resolved_config(loaded, run_dir, kind="train", store=artifacts)
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

    # A restart (nothing complete) cuts an old log back to step 0 and drops interrupted checkpoint saves.
    start_step = _checkpoint_step(resume) if resume is not None else 0
    discard_incomplete_checkpoints(run_dir, after_step=start_step)
    sink = wiring.make_metric_sink(run_dir / "logging.jsonl", resume_step=start_step)
    outcome = _run_engine(engine, job, prepared, sink)
    artifacts.write_json(run_dir / "run_metadata.json", mark_finished(metadata, collector))
    return outcome


def _run_engine(
    engine: TrainingEngine, job: TrainingJob, prepared: PreparedTraining, sink: MetricSink
) -> TrainingOutcome:
    try:
        return engine.run(job, prepared, sink)
    finally:
        sink.close()


def _checkpoint_step(path: Path) -> int:
    return int(json.loads((path / "checkpoint_complete.json").read_text())["global_step"])


def main(argv: Sequence[str] | None = None) -> int:
    def body(config_path: Path) -> int:
        from contextlib import nullcontext

        from application.run_lock import hold_run_directory

        loaded = load_config(config_path, entry_point="train")
        is_main = process_rank() == 0  # the other ranks of a torchrun job share rank 0's run directory and lock
        with hold_run_directory(loaded.config, ENTRY_POINT) if is_main else nullcontext():
            outcome = train(loaded)
        if not is_main:
            return 0
        losses = ", ".join(f"{v:.4f}" for v in outcome.step_losses)
        print(f"Training complete: global_step={outcome.global_step} last_checkpoint={outcome.last_checkpoint}")
        print(f"per-step losses: [{losses}]")
        return 0

    return run_entry_point(argv, ENTRY_POINT, body)


if __name__ == "__main__":
    raise SystemExit(main())
