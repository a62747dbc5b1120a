"""Issue 11, item 1: a truncated image (header intact, pixel data cut) is found by validation and by the
eager check before any model loads, in one pass, in parallel; a clean verdict is cached by real path,
size and mtime so a second run does not decode again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bad_data import (
    CountingImageStore,
    good_split,
    record_line,
    train_config,
    validate_config,
    write_image,
    write_jsonl,
    write_truncated_image,
)
from fake_pipeline import ScriptedDeps, write_infer_config, write_split

from adapters.fakes.training import RecordingTrainingEngine
from application import wiring
from application.config import load_config
from application.dataset_images import ImageVerdictCache, image_problems, image_root_for
from application.infer import run_pipeline
from train_runner import run_train
from application.validate_dataset import main as validate_main
from domain.errors import DataContractError
from domain.objects import Ordering
from domain.records import RecordSet, parse_jsonl_records


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("COORDEXP_CACHE_DIR", str(cache))
    return cache


def _split_with_truncated(folder: Path) -> Path:
    jsonl = good_split(folder, 3)
    write_truncated_image(folder / "img" / "1.png", seed=1)  # line 2's image
    return jsonl


def test_validate_dataset_reports_a_truncated_image_with_file_line_and_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl = _split_with_truncated(tmp_path)
    assert validate_main(["--config", str(validate_config(tmp_path, jsonl))]) == 1
    out = capsys.readouterr().out
    bad = (tmp_path / "img" / "1.png").absolute()
    assert f"{jsonl}:2: images[0]: file is not a decodable image: {bad}" in out
    assert "truncated" in out and "FAILED with 1 problems" in out


def test_training_refuses_a_truncated_image_before_the_engine_and_writes_nothing(tmp_path: Path) -> None:
    jsonl = _split_with_truncated(tmp_path)
    engine = RecordingTrainingEngine()
    with pytest.raises(DataContractError) as info:
        run_train(load_config(train_config(tmp_path, jsonl), entry_point="train"), engine)
    assert str(info.value).startswith(f"{jsonl}:2: images[0]: file is not a decodable image:")
    assert engine.jobs == []  # the engine (and so the model) was never reached
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_inference_refuses_a_truncated_image_before_the_model_loads(tmp_path: Path) -> None:
    """infer-eval-config.md §2.9: an unreadable image is operator input: raised before the model loads
    (the campaign saw the run stop at that batch, after the model had loaded and earlier batches ran)."""
    jsonl = write_split(tmp_path, 5)
    write_truncated_image(tmp_path / "img" / "3.png", seed=3)
    scripted = ScriptedDeps()
    with pytest.raises(DataContractError, match=r"val\.jsonl:4: images\[0\]: file is not a decodable image"):
        run_pipeline(load_config(write_infer_config(tmp_path, jsonl), entry_point="infer"), scripted.deps())
    assert scripted.engines_opened == 0
    assert not (tmp_path / "out").exists()


def _records(jsonl: Path) -> RecordSet:
    lines = list(enumerate(jsonl.read_text().splitlines(), start=1))
    return parse_jsonl_records(lines, str(jsonl), max_pixels=786432, bbox_only=False, ordering=Ordering.SORTED)


def test_clean_verdicts_are_cached_by_path_size_and_mtime(tmp_path: Path, _cache_dir: Path) -> None:
    jsonl = good_split(tmp_path / "data", 4)
    write_truncated_image(tmp_path / "data" / "img" / "3.png", seed=3)
    records = _records(jsonl)
    root = image_root_for(jsonl, None)
    artifacts = wiring.make_artifact_store()

    def run() -> tuple[list[str], int]:
        store = CountingImageStore()
        found = image_problems(records, root, store, workers=2, cache=ImageVerdictCache(artifacts, root))
        return sorted(store.decoded), len(found)

    assert run() == (["0.png", "1.png", "2.png", "3.png"], 1)
    assert [p.parent.name for p in _cache_dir.rglob("*.json")] == ["image_checks"]
    # second run: only the bad file is decoded again (bad verdicts are never cached)
    assert run() == (["3.png"], 1)
    # a changed file (new bytes, new mtime) is decoded again; so is one whose mtime alone moved
    write_image(tmp_path / "data" / "img" / "0.png", seed=99)
    one = tmp_path / "data" / "img" / "1.png"
    os.utime(one, ns=(one.stat().st_atime_ns, one.stat().st_mtime_ns + 5_000_000_000))
    assert run() == (["0.png", "1.png", "3.png"], 1)
    # repairing the bad file clears the problem
    write_image(tmp_path / "data" / "img" / "3.png", seed=3)
    assert run() == (["3.png"], 0)
    assert run() == ([], 0)


def test_a_corrupt_cache_file_is_ignored_with_a_warning(tmp_path: Path, _cache_dir: Path) -> None:
    jsonl = good_split(tmp_path / "data", 2)
    records = _records(jsonl)
    root = image_root_for(jsonl, None)
    artifacts = wiring.make_artifact_store()
    cache = ImageVerdictCache(artifacts, root)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("{not json")
    store = CountingImageStore()
    with pytest.warns(RuntimeWarning, match="image check cache .* ignored"):
        fresh = ImageVerdictCache(artifacts, root)
    assert image_problems(records, root, store, workers=1, cache=fresh) == ()
    assert sorted(store.decoded) == ["0.png", "1.png"]


def test_a_size_mismatch_is_still_found_from_a_cached_verdict(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write_image(folder / "img" / "0.png")
    jsonl = write_jsonl(folder / "train.jsonl", [record_line("img/0.png")])
    root = image_root_for(jsonl, None)
    artifacts = wiring.make_artifact_store()
    assert image_problems(_records(jsonl), root, CountingImageStore(), cache=ImageVerdictCache(artifacts, root)) == ()
    lying = write_jsonl(folder / "train.jsonl", [record_line("img/0.png", 96, 64)])
    store = CountingImageStore()
    found = image_problems(_records(lying), root, store, cache=ImageVerdictCache(artifacts, root))
    assert store.decoded == [] and [p.reason.split(";")[0] for p in found] == ["file is 64x64, record says 96x64"]
