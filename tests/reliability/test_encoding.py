"""Issue 11, item 7: one line that is not UTF-8 no longer hides the rest of the file, and training no
longer holds image problems back for a second run: every kind of problem is reported, per line, in one
pass (the message still lists 20 and says how many more, domain/errors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bad_data import (
    good_split,
    record_line,
    train_config,
    validate_config,
    write_jsonl,
    write_truncated_image,
)

from adapters.fakes.training import RecordingTrainingEngine
from application import wiring
from application.config import load_config
from train_runner import run_train
from application.validate_dataset import main as validate_main
from domain.errors import ArtifactError, DataContractError


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDEXP_CACHE_DIR", str(tmp_path / "cache"))


LATIN1 = b'{"images": ["img/1.png"], "desc": "caf\xe9'


def _mixed_split(folder: Path) -> Path:
    """Line 2 is not UTF-8, line 4 has a bad width, line 5's image is truncated, line 6's is missing."""
    good_split(folder, 3)
    write_truncated_image(folder / "img" / "2.png", seed=2)
    return write_jsonl(folder / "train.jsonl", [
        record_line("img/0.png"),
        LATIN1 + b'"}',  # Latin-1, as an old export writes it
        record_line("img/1.png"),
        record_line("img/0.png", width=50),
        record_line("img/2.png"),
        record_line("img/missing.png"),
    ])  # fmt: skip


EXPECTED = [(2, ""), (4, "width"), (5, "images[0]"), (6, "images[0]")]
NOT_UTF8 = f"not UTF-8 (invalid continuation byte at byte {len(LATIN1) - 1})"


def test_training_reports_every_kind_of_problem_at_once_before_the_engine(tmp_path: Path) -> None:
    jsonl = _mixed_split(tmp_path)
    engine = RecordingTrainingEngine()
    with pytest.raises(DataContractError) as info:
        run_train(load_config(train_config(tmp_path, jsonl), entry_point="train"), engine)
    problems = info.value.problems
    assert [(p.line, p.field) for p in problems] == EXPECTED
    assert problems[0].reason == NOT_UTF8
    assert "not a decodable image" in problems[2].reason and "file not found" in problems[3].reason
    assert str(info.value).splitlines()[0] == f"{jsonl}:2: {NOT_UTF8}"
    assert engine.jobs == [] and not (tmp_path / "out").exists()


def test_validate_dataset_lists_the_same_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = _mixed_split(tmp_path)
    assert validate_main(["--config", str(validate_config(tmp_path, jsonl))]) == 1
    out = capsys.readouterr().out
    reported = [line.strip() for line in out.splitlines() if line.startswith(f"  {jsonl}:")]
    assert [int(line.split(":")[1]) for line in reported] == [n for n, _ in EXPECTED]
    assert "FAILED with 4 problems" in out


def test_image_problems_are_not_held_back_behind_twenty_record_problems(tmp_path: Path) -> None:
    good_split(tmp_path, 1)
    lines: list[str | bytes] = [record_line("img/0.png", width=50) for _ in range(25)]  # lines 1..25
    lines += [record_line(f"img/gone{i}.png") for i in range(6)]  # lines 26..31: missing images
    jsonl = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataContractError) as info:
        run_train(load_config(train_config(tmp_path, jsonl), entry_point="train"), RecordingTrainingEngine())
    problems = info.value.problems
    assert len(problems) == 31 and [p.line for p in problems] == list(range(1, 32))
    assert [p.field for p in problems[25:]] == ["images[0]"] * 6
    message = str(info.value).splitlines()
    assert len(message) == 21 and message[-1] == "... and 11 more"  # the bounded list of domain/errors.py


def test_artifact_reads_stay_strict(tmp_path: Path) -> None:
    """Only dataset validation reads on past a bad line; artifacts still stop at it (infer-eval-config.md §4.1)."""
    path = write_jsonl(tmp_path / "gt_vs_pred.jsonl", [json.dumps({"index": 0}), b"\xff"])
    store = wiring.make_artifact_store()
    with pytest.raises(ArtifactError, match=r"gt_vs_pred\.jsonl:2: not UTF-8"):
        list(store.read_jsonl(path))
    assert [(n.number, n.problem) for n in store.read_data_lines(path)] == [
        (1, None), (2, "not UTF-8 (invalid start byte at byte 0)")]  # fmt: skip


def test_a_line_nested_beyond_the_recursion_limit_is_a_located_problem_not_a_recursion_error(tmp_path: Path) -> None:
    """A degenerate line (100,000 nested arrays) is one located problem; the other lines are still read."""
    from adapters.storage.jsonl import FileArtifactStore
    from domain.objects import Ordering
    from domain.records import validate_jsonl_records

    deep = "[" * 100_000 + "]" * 100_000
    _, problems = validate_jsonl_records([(1, deep), (2, "{")], "deep.jsonl", max_pixels=786432, bbox_only=False,
                                         ordering=Ordering.SORTED)  # fmt: skip
    assert [p.line for p in problems] == [1, 2] and "nested too deeply" in str(problems[0])
    path = tmp_path / "deep.json"
    path.write_text(deep)
    with pytest.raises(ArtifactError, match="nested too deeply"):
        FileArtifactStore().read_json(path)
