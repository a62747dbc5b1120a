"""``python -m application.train --config FILE``: Stage-1 training (stage1.md; D8, D12, D14, D15).

Run order: config (errors before anything else) -> every record and image validated -> run directory
checks (lock, resume) -> model checkpoint (a local ``model.path`` or the embedded tiny model) -> sample
lengths, over-long samples and the pack plans (``application.training_plan``: tokenizer only, no model) ->
resolved_config.json, run_metadata.json, metric_registry.json, the pack plan files, logging.jsonl -> the
engine's ``run`` with a typed :class:`ports.training.TrainingJob` (loads the model, trains) -> finished_at.

The use case receives its ports in :class:`TrainDependencies`; only :func:`default_dependencies` (called by
``main``) asks ``application.wiring`` for adapters, so :func:`train` runs on fakes alone.

Every check that can fail before step 1 without the model runs before the first run file is written
(issue 11 item 3): a run that fails there leaves its run directory as it found it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

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
from application.config.schema import ModelConfig
from application.datasets import LoadedSplit, load_split
from application.provenance import build_run_metadata, mark_finished
from application.training_plan import (
    plan_split,
    read_plan_cache,
    sha256_files,
    split_sources,
    tokenizer_fingerprint,
    write_plan_files,
)
from application.training_settings import model_settings, sample_settings, stage1_objective, trainer_settings
from domain.errors import ConfigError
from domain.metrics_registry import registry_snapshot
from domain.packing import PackingSettings
from domain.training_samples import SampleSource
from ports.metrics import MetricSink
from ports.provenance import ProvenanceCollector
from ports.storage import ArtifactStore, CheckpointStore, ImageStore
from ports.tokenizer import SampleEncoderPort
from ports.training import SampleSettings, SplitData, TrainingEngine, TrainingJob, TrainingOutcome

ENTRY_POINT = "application.train"
PROJECT_DIR = Path(__file__).resolve().parents[1]


@attrs.frozen(eq=False)
class TrainDependencies:
    """The ports of one training run (defaults: :func:`default_dependencies`).

    ``open_encoder`` gives the sample encoder (tokenizer + chat template, no model) of a checkpoint for the
    length pre-pass; ``metric_sink`` opens ``logging.jsonl`` (path, resume step); ``null_sink`` is what ranks
    other than 0 log to.
    """

    artifacts: ArtifactStore
    images: ImageStore
    checkpoints: CheckpointStore
    provenance: ProvenanceCollector
    resolve_checkpoint: Callable[[ModelConfig], Path]
    open_encoder: Callable[[Path], SampleEncoderPort]
    engine: TrainingEngine
    metric_sink: Callable[[Path, int], MetricSink]
    null_sink: Callable[[], MetricSink]


def default_dependencies(config: CoordExpConfig, *, engine: TrainingEngine | None = None) -> TrainDependencies:
    """The configured adapters (the entry point's); ``engine`` replaces the configured engine (tests pass an
    instrumented one)."""
    from application import wiring

    encoders = wiring.make_sample_encoders()
    return TrainDependencies(
        artifacts=wiring.make_artifact_store(),
        images=wiring.make_image_store(),
        checkpoints=wiring.make_checkpoint_store(),
        provenance=wiring.make_provenance_collector(),
        resolve_checkpoint=wiring.resolve_model_checkpoint,
        open_encoder=encoders,
        engine=engine if engine is not None else wiring.make_training_engine(config, encoders),
        metric_sink=lambda path, step: wiring.make_metric_sink(path, resume_step=step),
        null_sink=wiring.make_null_metric_sink,
    )


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


def resume_checkpoint(
    run_dir: Path, requested: str | None, store: CheckpointStore, *, check_fresh: bool = True
) -> Path | None:
    """``training.resume_from_checkpoint``: a checkpoint directory, or ``latest`` (newest complete one).

    A run directory that already holds a complete checkpoint or a logged step, without a resume
    request, is an error (infer-eval-config.md §7): runs are never silently mixed. A run that never
    completed a step (only the files written before step 1, an empty log, checkpoint directories
    without their completion marker) holds nothing to mix with and is simply started again; so is
    ``latest`` when no checkpoint is complete (step 0 is then the latest state: the log is cut back to
    it), which is the way forward after a kill during the first checkpoint save.
    """
    from application.checkpoints import checkpoint_problem, complete_checkpoints, latest_usable_checkpoint

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


def plan_training(
    config: CoordExpConfig,
    run_dir: Path,
    model_path: Path,
    train_split: LoadedSplit,
    val_split: LoadedSplit | None,
    encoder: SampleEncoderPort,
    samples: SampleSettings,
) -> tuple[SplitData, SplitData | None]:
    """Sample lengths (over-long samples raise, naming each) and the unit plans of both splits (data.md §6.5,
    §8.2): tokenizer only, no model, nothing written. The train plan reuses the run directory's plan cache
    when its fingerprint matches (a resumed run); validation packs never drop a sample (§8.1)."""
    training = config.training

    def packing(enabled: bool, drop_last: bool) -> PackingSettings | None:
        if not enabled:
            return None
        return PackingSettings(
            max_length=training.max_length,
            packing_buffer=training.packing_buffer,
            packing_min_fill_ratio=training.packing_min_fill_ratio,
            packing_drop_last=drop_last,
        )

    train_sources = split_sources(tuple(train_split.records), train_split.images)
    train_plan = plan_split(
        train_sources,
        encoder,
        samples,
        max_length=training.max_length,
        packing=packing(training.packing, training.packing_drop_last),
        fingerprint_inputs=(
            sha256_files(sorted({Path(r.source) for r in train_split.records})),
            tokenizer_fingerprint(model_path),
        ),
        cache_text=read_plan_cache(run_dir),
    )
    train = SplitData(tuple(train_split.records), tuple(train_split.images), train_plan)
    if val_split is None or not val_split.records:
        return train, None
    val_sources = split_sources(tuple(val_split.records), val_split.images)
    val_plan = plan_split(
        val_sources, encoder, samples, max_length=training.max_length, packing=packing(training.eval_packing, False)
    )
    return train, SplitData(tuple(val_split.records), tuple(val_split.images), val_plan)


def train(loaded: LoadedConfig, deps: TrainDependencies) -> TrainingOutcome:
    """Run the use case on the ports of ``deps``."""
    config = loaded.config
    # load_config(entry_point="train") requires these blocks
    assert config.run is not None and config.model is not None
    check_local_paths(config, entry_point="train")
    if config.objective.trainer_variant != "stage1":
        raise ConfigError(
            f"'objective.trainer_variant' = {config.objective.trainer_variant!r}: this build trains 'stage1' only"
        )
    artifacts = deps.artifacts
    data = config.data
    assert data.train_jsonl is not None
    train_split = load_split(
        Path(data.train_jsonl), data, config.prompt.variant, limit=data.train_limit, artifacts=artifacts,
        images=deps.images,
    )
    val_split = None
    if data.val_jsonl is not None and config.training.eval_strategy != "no":
        val_split = load_split(
            Path(data.val_jsonl), data, config.prompt.variant, limit=data.val_limit, artifacts=artifacts,
            images=deps.images,
        )

    # Only rank 0 checks the run directory and writes run files (infer-eval-config.md §7.1, §7.2); the
    # other ranks would otherwise find rank 0's fresh files and refuse to start.
    is_main = process_rank() == 0
    run_dir = run_dir_of(config)
    resume = resume_checkpoint(run_dir, config.training.resume_from_checkpoint, deps.checkpoints, check_fresh=is_main)
    model_path = deps.resolve_checkpoint(config.model)
    samples = sample_settings(config)
    # Lengths, over-long samples and the pack plan fail here, before any run file (issue 11 item 3).
    train_data, val_data = plan_training(
        config, run_dir, model_path, train_split, val_split, deps.open_encoder(model_path), samples
    )
    job = TrainingJob(
        run_dir=run_dir,
        model_path=model_path,
        resolved_config_path=run_dir / RESOLVED_CONFIG_FILENAME,
        seed=int(config.run.seed),
        model=model_settings(config.model),
        samples=samples,
        trainer=trainer_settings(config.training),
        objective=stage1_objective(config.objective, run_dir),
        train=train_data,
        val=val_data,
        resume_from=resume,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_main:
        return _run_engine(deps.engine, job, deps.null_sink())
    write_resolved_config(loaded, run_dir, kind="train", store=artifacts)
    collector = deps.provenance
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
    sink = deps.metric_sink(run_dir / "logging.jsonl", start_step)
    try:
        report_plan(run_dir, job.train, artifacts)  # the plan files come after every run file of §7.1
    except BaseException:
        sink.close()
        raise
    outcome = _run_engine(deps.engine, job, sink)
    artifacts.write_json(run_dir / "run_metadata.json", mark_finished(metadata, collector))
    return outcome


def report_plan(run_dir: Path, split: SplitData, artifacts: ArtifactStore) -> None:
    """Write the train split's plan files and say what the plan is (data.md §8.2.8)."""
    sources: tuple[SampleSource, ...] = split_sources(split.records, split.images)
    report = write_plan_files(run_dir, split.plan, sources, artifacts)
    if report is None:
        return
    print(
        f"pack plan: {report['packs']} packs of {report['samples']} samples, mean fill {report['mean_fill']:.3f}, "
        f"min fill {report['min_fill']:.3f}, dropped {report['dropped_samples']}"
        + (" (reused cached plan)" if split.plan.reused_cache else "")
    )
    if report["dropped_samples"]:
        warnings.warn(
            f"training.packing_drop_last dropped {report['dropped_samples']} samples from the static plan: "
            f"{report['dropped'][:10]}",
            RuntimeWarning,
            stacklevel=2,
        )


def _run_engine(engine: TrainingEngine, job: TrainingJob, sink: MetricSink) -> TrainingOutcome:
    try:
        return engine.run(job, sink)
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
            outcome = train(loaded, default_dependencies(loaded.config))
        if not is_main:
            return 0
        losses = ", ".join(f"{v:.4f}" for v in outcome.step_losses)
        print(f"Training complete: global_step={outcome.global_step} last_checkpoint={outcome.last_checkpoint}")
        print(f"per-step losses: [{losses}]")
        return 0

    return run_entry_point(argv, ENTRY_POINT, body)


if __name__ == "__main__":
    raise SystemExit(main())
