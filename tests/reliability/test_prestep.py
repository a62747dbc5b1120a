"""Issue 11, item 3: a failure before the first step never blocks the rerun.

Every check that can fail before step 1 without the model runs before anything is written: records, images
and an empty file; sample lengths (the tokenizer only), over-long samples and an empty pack plan; all in the
use case before its first run file (order: lengths and plans -> run files -> plan files -> the engine's run). A run that failed later but never completed a step (its directory holds only the files written before
step 1, e.g. when the model failed to load) is started again by the same command; after a kill during the
first checkpoint save,
``resume_from_checkpoint: latest`` starts from step 0, cuts the log back and drops the interrupted save.
A run that did log a step is still never silently mixed with a new one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs
import pytest
from bad_data import good_split, train_config, validate_config

from adapters.fakes.training import RecordingTrainingEngine
from application.config import load_config
from train_runner import run_train
from application.validate_dataset import main as validate_main
from domain.errors import ConfigError, DataContractError, SetupError
from ports.metrics import MetricSink
from adapters.fakes.training import FakeSampleEncoder
from ports.tokenizer import ChatSample
from ports.training import TrainingJob, TrainingOutcome, UnitPlan

RUN_FILES = ("logging.jsonl", "metric_registry.json", "resolved_config.json", "run_metadata.json")


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
        run_train(load_config(train_config(tmp_path, jsonl), entry_point="train"), engine)
    assert engine.jobs == [] and not (tmp_path / "out").exists()
    assert validate_main(["--config", str(validate_config(tmp_path, jsonl))]) == 1
    assert f"data.train_jsonl: {jsonl}: holds no records" in capsys.readouterr().out


def _run_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []


@attrs.define
class WatchingEncoder(FakeSampleEncoder):
    """Records the run directory's files each time it measures."""

    run_dir: Path = Path()
    files_when_measured: list[list[str]] = attrs.field(factory=list)

    def lengths(self, samples: "list[ChatSample]") -> list[int]:  # type: ignore[override]
        self.files_when_measured.append(_run_files(self.run_dir))
        return super().lengths(samples)


def test_lengths_are_measured_before_the_run_files_and_the_engine_runs_after_them(tmp_path: Path) -> None:
    engine = RecordingTrainingEngine()
    encoder = WatchingEncoder(base_length=10, chars_per_token=None, run_dir=tmp_path / "out" / "t")
    run_train(load_config(train_config(tmp_path, good_split(tmp_path, 3)), entry_point="train"), engine, encoder=encoder)
    assert encoder.files_when_measured == [[]] and len(encoder.measured) == 3
    assert engine.calls == [("run", RUN_FILES)]


@pytest.mark.parametrize(
    ("training", "error"),
    [
        ({"max_length": 8}, r"3 sample\(s\) longer than training\.max_length=8 .*\n\S*train\.jsonl:1 length=10"),
        ({"packing": True, "max_length": 100, "packing_min_fill_ratio": 0.9, "packing_drop_last": True},
         r"empty pack plan for \S*train\.jsonl: N=3 samples, C=100"),
    ],
    ids=["over-long sample", "empty pack plan"],
)
def test_a_failure_in_the_engines_preflight_leaves_no_run_file(
    tmp_path: Path, training: dict[str, object], error: str
) -> None:
    jsonl = good_split(tmp_path, 3)
    engine = RecordingTrainingEngine()  # 10 tokens a sample: over max_length 8; 30 in all fill no 90-token pack
    with pytest.raises(DataContractError, match=error):
        run_train(load_config(train_config(tmp_path, jsonl, training=training), entry_point="train"), engine)
    assert engine.calls == [] and engine.jobs == []
    assert _run_files(tmp_path / "out" / "t") == []
    # nothing blocks the corrected rerun: same run.name, no resume key
    run_train(load_config(train_config(tmp_path, jsonl), entry_point="train"), engine)
    assert _steps(tmp_path / "out" / "t" / "logging.jsonl") == [1, 2]


@attrs.define
class FailsBeforeStepOne:
    """An engine whose ``run`` fails after the run files were written and before step 1 (the model does not
    load)."""

    calls: int = 0

    def run(self, job: TrainingJob, metric_sink: MetricSink) -> TrainingOutcome:
        self.calls += 1
        raise SetupError(f"{job.model_path}: the model cannot be loaded")


def test_a_run_that_failed_before_its_first_step_is_run_again_by_the_same_command(tmp_path: Path) -> None:
    config = train_config(tmp_path, good_split(tmp_path, 3))
    failing = FailsBeforeStepOne()
    with pytest.raises(SetupError, match="cannot be loaded"):
        run_train(load_config(config, entry_point="train"), failing, encoder=FakeSampleEncoder(chars_per_token=None))
    run_dir = tmp_path / "out" / "t"
    assert failing.calls == 1 and (run_dir / "logging.jsonl").read_text() == ""  # the files of §7.1 exist
    engine = RecordingTrainingEngine()
    outcome = run_train(load_config(config, entry_point="train"), engine)  # no new run.name, no resume key
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
        run_train(load_config(train_config(tmp_path, jsonl), entry_point="train"), RecordingTrainingEngine())
    latest = train_config(tmp_path, jsonl, name="t", training={"resume_from_checkpoint": "latest"})
    engine = RecordingTrainingEngine(losses=(4.0, 3.5, 3.0))
    with pytest.warns(RuntimeWarning, match="no complete checkpoint; starting from step 0"):
        run_train(load_config(latest, entry_point="train"), engine)
    assert engine.jobs[0].resume_from is None
    assert not partial.exists()  # the interrupted save is gone, not mixed into the new checkpoint-2
    assert _steps(run_dir / "logging.jsonl") == [1, 2, 3]  # only the new trajectory, no torn line
    assert json.loads((run_dir / "logging.jsonl").read_text().splitlines()[0])["loss"] == 4.0


@pytest.mark.slow
def test_an_over_long_sample_fails_before_the_model_loads_and_any_run_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real Stage-1 engine on the tiny model: the length check needs only the tokenizer and runs in the
    use case, before the model loads and before any run file is written."""
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
        run_train(load_config(short, entry_point="train"))
    assert f"{jsonl}:1 length=" in str(info.value) and f"{jsonl}:2 length=" in str(info.value)
    assert loads == [] and _run_files(tmp_path / "out" / "t") == []
    # validate_dataset measures the same lengths as the training pre-pass and names the same lines (issue 10).
    training_says = re.findall(r"(\S+:\d+) length=(\d+)", str(info.value))
    assert validate_main(["--config", str(validate_config(tmp_path, jsonl, training={"max_length": 32}))]) == 1
    validate_says = re.findall(r"(\S+:\d+): sample length (\d+) exceeds", capsys.readouterr().out)
    assert validate_says == training_says and len(training_says) == 2
    fixed = train_config(tmp_path, jsonl, model=tiny, training={"max_length": 4096})
    outcome = run_train(load_config(fixed, entry_point="train"), RecordingTrainingEngine())
    assert outcome.global_step == 2 and _steps(tmp_path / "out" / "t" / "logging.jsonl") == [1, 2]


_TINY = {"tiny": {"seed": 0}, "path": None, "dtype": "float32", "attn_implementation": "eager"}


@pytest.mark.slow
def test_an_empty_pack_plan_of_the_real_engine_fails_before_the_model_loads_and_any_run_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import swift

    monkeypatch.delenv("COORDEXP_CACHE_DIR")  # share the built tiny checkpoint with the other tests
    monkeypatch.setattr(swift, "get_model_processor", lambda *a, **k: pytest.fail("the model was loaded"))
    jsonl = good_split(tmp_path, 2)
    config = train_config(tmp_path, jsonl, model=_TINY, training={
        "packing": True, "max_length": 4096, "packing_min_fill_ratio": 0.9, "packing_drop_last": True})
    with pytest.raises(DataContractError, match=rf"empty pack plan for {re.escape(str(jsonl))}: N=2 samples"):
        run_train(load_config(config, entry_point="train"))
    assert _run_files(tmp_path / "out" / "t") == []


@pytest.mark.slow
def test_the_real_engine_trains_on_the_plan_made_before_the_run_files_and_never_plans_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One packed step on the tiny model: the plan is made once (before any run file), its files are written
    after the run files, the cache holds exactly that plan, and the engine trains on it."""
    from application import train as train_module
    from application.training_plan import PLAN_CACHE_FILE, PLAN_REPORT_FILE
    from domain.packing import plan_cache_text

    monkeypatch.delenv("COORDEXP_CACHE_DIR")
    planned: list[UnitPlan] = []
    original_plan_split = train_module.plan_split

    def counting_plan_split(*args: object, **kwargs: object) -> UnitPlan:
        planned.append(original_plan_split(*args, **kwargs))  # type: ignore[arg-type]
        return planned[-1]

    files_at_plan_write: list[list[str]] = []
    original_write = train_module.write_plan_files

    def recording_write(run_dir: Path, *args: object) -> object:
        files_at_plan_write.append(_run_files(run_dir))
        return original_write(run_dir, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "plan_split", counting_plan_split)
    monkeypatch.setattr(train_module, "write_plan_files", recording_write)
    config = train_config(tmp_path, good_split(tmp_path, 2), model=_TINY, training={
        "max_steps": 1, "packing": True, "packing_min_fill_ratio": 0.01})
    outcome = run_train(load_config(config, entry_point="train"))
    run_dir = tmp_path / "out" / "t"
    assert outcome.global_step == 1 and len(planned) == 1 and planned[0].plan is not None
    assert len(files_at_plan_write) == 1 and set(RUN_FILES) <= set(files_at_plan_write[0])
    assert PLAN_CACHE_FILE not in files_at_plan_write[0]
    assert planned[0].fingerprint is not None
    assert (run_dir / PLAN_CACHE_FILE).read_text() == plan_cache_text(
        planned[0].plan, planned[0].fingerprint, planned[0].lengths
    )
    assert json.loads((run_dir / PLAN_REPORT_FILE).read_text())["samples"] == 2
