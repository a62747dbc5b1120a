"""application.train with a recording engine: run-directory rules, rank-0-only files, data errors first."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.fakes.training import RecordingTrainingEngine
from application.config import load_config
from train_runner import run_train
from domain.errors import ConfigError, DataContractError


def _cfg(make_config: Callable[..., Path], train_jsonl: Path, tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    return make_config(train_jsonl, model={"path": str(model_dir), "tiny": None, "dtype": "float32"})


def test_rank_zero_writes_the_run_files_and_logs(
    shapes3_bbox: Path, make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    cfg = _cfg(make_config, shapes3_bbox, tmp_path)
    engine = RecordingTrainingEngine()
    outcome = run_train(load_config(cfg, entry_point="train"), engine)
    run_dir = tmp_path / "out" / "t"
    assert outcome.global_step == 2
    assert {p.name for p in run_dir.iterdir()} >= {"resolved_config.json", "run_metadata.json",
                                                  "metric_registry.json", "logging.jsonl"}
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in lines] == [1, 2]
    job = engine.jobs[0]
    assert len(job.train.records) == len(job.train.images) == len(job.train.plan.lengths) == 3
    assert all(p.is_file() for p in job.train.images)


def test_other_ranks_write_nothing_and_do_not_trip_over_rank_zeros_files(
    shapes3_bbox: Path, make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(make_config, shapes3_bbox, tmp_path)
    run_dir = tmp_path / "out" / "t"
    run_dir.mkdir(parents=True)
    logged = '{"global_step": 1, "loss": 1.0}\n'
    (run_dir / "logging.jsonl").write_text(logged)  # rank 0 got there first (and logged a step)
    monkeypatch.setenv("RANK", "1")
    run_train(load_config(cfg, entry_point="train"), RecordingTrainingEngine())
    assert [p.name for p in run_dir.iterdir()] == ["logging.jsonl"]
    assert (run_dir / "logging.jsonl").read_text() == logged
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        run_train(load_config(cfg, entry_point="train"), RecordingTrainingEngine())


def test_a_bad_record_fails_before_the_engine_or_any_run_file(
    shapes3_bbox: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = shapes3_bbox.read_text().splitlines()
    record = json.loads(lines[1])
    record["width"] = 250
    bad.write_text("\n".join([lines[0], json.dumps(record), lines[2]]) + "\n")
    for name in ("images",):
        (tmp_path / name).symlink_to(shapes3_bbox.parent / name)
    engine = RecordingTrainingEngine()
    with pytest.raises(DataContractError, match=r"bad.jsonl:2: width: must be a positive multiple of 32"):
        run_train(load_config(_cfg(make_config, bad, tmp_path), entry_point="train"), engine)
    assert engine.jobs == [] and not (tmp_path / "out").exists()


def test_resume_requires_a_complete_checkpoint(
    shapes3_bbox: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    incomplete = tmp_path / "out" / "t" / "checkpoint-3"
    incomplete.mkdir(parents=True)
    cfg = make_config(shapes3_bbox, model={"path": str(tmp_path), "tiny": None, "dtype": "float32"},
                      training={"resume_from_checkpoint": str(incomplete)})
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        run_train(load_config(cfg, entry_point="train"), RecordingTrainingEngine())
    latest = make_config(shapes3_bbox, model={"path": str(tmp_path), "tiny": None, "dtype": "float32"},
                         training={"resume_from_checkpoint": "latest"})
    # 'latest' with nothing complete starts from step 0 and drops the interrupted save (issue 11, item 3)
    engine = RecordingTrainingEngine()
    with pytest.warns(RuntimeWarning, match="no complete checkpoint; starting from step 0"):
        run_train(load_config(latest, entry_point="train"), engine)
    assert engine.jobs[0].resume_from is None and not incomplete.exists()


def test_model_path_to_an_incomplete_training_checkpoint_is_refused(tmp_path: Path) -> None:
    from application.checkpoints import COMPLETE_MARKER, complete_checkpoints
    from application.config.schema import ModelConfig
    from application import wiring

    run = tmp_path / "run"
    for step in (2, 4, 6):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    (run / "checkpoint-2" / COMPLETE_MARKER).write_text('{"files": []}')
    (run / "checkpoint-6" / COMPLETE_MARKER).write_text('{"files": []}')
    assert [p.name for p in complete_checkpoints(run, wiring.make_checkpoint_store())] == ["checkpoint-2", "checkpoint-6"]
    with pytest.raises(ConfigError, match="without checkpoint_complete.json"):
        wiring.resolve_model_checkpoint(ModelConfig(path=run / "checkpoint-4"))
    assert wiring.resolve_model_checkpoint(ModelConfig(path=run / "checkpoint-6")) == run / "checkpoint-6"
    merged = tmp_path / "merged-export"
    merged.mkdir()
    assert wiring.resolve_model_checkpoint(ModelConfig(path=merged)) == merged
