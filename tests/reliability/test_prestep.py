"""Issue 11, item 3: a failure before the first step never blocks the rerun.

Checks that can fail before step 1 without a tokenizer (records, images, an empty file) run before anything
is written. A run that never completed a step (its directory holds only the files written before step 1)
is started again by the same command; after a kill during the first checkpoint save,
``resume_from_checkpoint: latest`` starts from step 0, cuts the log back and drops the interrupted save.
A run that did log a step is still never silently mixed with a new one.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from bad_data import good_split, train_config, validate_config

from adapters.fakes.training import RecordingTrainingEngine
from application.config import load_config
from application.train import train
from application.validate_dataset import main as validate_main
from domain.errors import ConfigError, DataContractError
from ports.training import TrainingJob, TrainingOutcome


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDEXP_CACHE_DIR", str(tmp_path / "cache"))


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["global_step"] for line in log.read_text().splitlines()]


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_an_empty_jsonl_fails_before_anything_is_written(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    good_split(tmp_path, 1)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(content)
    engine = RecordingTrainingEngine()
    with pytest.raises(DataContractError, match=r"train\.jsonl: holds no records \(the file is empty"):
        train(load_config(train_config(tmp_path, jsonl), entry_point="train"), engine)
    assert engine.jobs == [] and not (tmp_path / "out").exists()
    assert validate_main(["--config", str(validate_config(tmp_path, jsonl))]) == 1
    assert f"data.train_jsonl: {jsonl}: holds no records" in capsys.readouterr().out


@attrs.define
class FailsBeforeStepOne:
    """An engine that stops where the real one checks lengths and the pack plan (after the run files)."""

    calls: int = 0

    def run(self, job: TrainingJob) -> TrainingOutcome:
        self.calls += 1
        raise DataContractError(f"{job.train_records[0].source}:1 length=5000 longer than training.max_length")


def test_a_run_that_failed_before_its_first_step_is_run_again_by_the_same_command(tmp_path: Path) -> None:
    config = train_config(tmp_path, good_split(tmp_path, 3))
    failing = FailsBeforeStepOne()
    with pytest.raises(DataContractError, match="max_length"):
        train(load_config(config, entry_point="train"), failing)
    run_dir = tmp_path / "out" / "t"
    assert failing.calls == 1 and (run_dir / "logging.jsonl").read_text() == ""  # the files of §7.1 exist
    engine = RecordingTrainingEngine()
    outcome = train(load_config(config, entry_point="train"), engine)  # no new run.name, no resume key
    assert outcome.global_step == 2 and _steps(run_dir / "logging.jsonl") == [1, 2]


def _killed_during_first_save(run_dir: Path) -> Path:
    """What a kill -9 during the save of checkpoint-2 leaves: two logged steps, a torn log line, a
    checkpoint directory with part of its files and no completion marker."""
    run_dir.mkdir(parents=True)
    (run_dir / "resolved_config.json").write_text("{}\n")
    (run_dir / "logging.jsonl").write_text(
        '{"global_step": 1, "loss": 3.0}\n{"global_step": 2, "loss": 2.5}\n{"global_step": 2, "eval_lo'
    )
    partial = run_dir / "checkpoint-2"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    return partial


def test_a_kill_during_the_first_checkpoint_save_resumes_with_latest(tmp_path: Path) -> None:
    jsonl = good_split(tmp_path, 3)
    run_dir = tmp_path / "out" / "t"
    partial = _killed_during_first_save(run_dir)
    # without a resume request the logged steps are protected: never silently mixed (§7)
    with pytest.raises(ConfigError, match=r"logging\.jsonl \(steps up to 2\).*'latest'"):
        train(load_config(train_config(tmp_path, jsonl), entry_point="train"), RecordingTrainingEngine())
    latest = train_config(tmp_path, jsonl, name="t", training={"resume_from_checkpoint": "latest"})
    engine = RecordingTrainingEngine(losses=(4.0, 3.5, 3.0))
    with pytest.warns(RuntimeWarning, match="no complete checkpoint; starting from step 0"):
        train(load_config(latest, entry_point="train"), engine)
    assert engine.jobs[0].resume_from is None
    assert not partial.exists()  # the interrupted save is gone, not mixed into the new checkpoint-2
    assert _steps(run_dir / "logging.jsonl") == [1, 2, 3]  # only the new trajectory, no torn line
    assert json.loads((run_dir / "logging.jsonl").read_text().splitlines()[0])["loss"] == 4.0


@pytest.mark.slow
def test_an_over_long_sample_fails_before_the_model_loads_and_the_rerun_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Stage-1 engine on the tiny model: the length check needs only the tokenizer and runs before
    the model loads; the run directory it leaves does not block the corrected rerun."""
    import swift

    monkeypatch.delenv("COORDEXP_CACHE_DIR")  # share the built tiny checkpoint with the other tests
    loads: list[str] = []

    def no_model(path: str, *args: object, **kwargs: object) -> None:
        loads.append(path)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(swift, "get_model_processor", no_model)
    jsonl = good_split(tmp_path, 2)
    tiny = {"tiny": {"seed": 0}, "path": None, "dtype": "float32", "attn_implementation": "eager"}
    short = train_config(tmp_path, jsonl, model=tiny, training={"max_length": 32})
    with pytest.raises(DataContractError, match=r"2 sample\(s\) longer than training\.max_length=32") as info:
        train(load_config(short, entry_point="train"))
    assert f"{jsonl}:1 length=" in str(info.value) and f"{jsonl}:2 length=" in str(info.value)
    assert loads == []
    fixed = train_config(tmp_path, jsonl, model=tiny, training={"max_length": 4096})
    outcome = train(load_config(fixed, entry_point="train"), RecordingTrainingEngine())
    assert outcome.global_step == 2 and _steps(tmp_path / "out" / "t" / "logging.jsonl") == [1, 2]
