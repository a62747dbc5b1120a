"""validate_dataset (data.md §9.9): every problem reported, statistics, exit status."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from adapters.storage.images import PillowImageStore
from adapters.storage.jsonl import FileArtifactStore
from application import validate_dataset as vd
from application.config import load_config
from domain.records import RecordSet


def _good(image: str, width: int = 64, height: int = 32, n: int = 1) -> str:
    objects = [{"desc": "thing", "bbox_2d": [1 + i, 2 + i, 30 + i, 40 + i]} for i in range(n)]
    return json.dumps({"images": [image], "width": width, "height": height, "coord_space": "norm1000", "objects": objects})


def _config(tmp_path: Path, body: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def _setup(tmp_path: Path, bad_lines: int) -> Path:
    Image.new("RGB", (64, 32)).save(tmp_path / "a.jpg")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.jpg")
    lines = [_good("a.jpg", n=1), _good("a.jpg", n=3), _good("b.jpg")]  # line 3: b.jpg is 64x64
    lines += ['{"images": ["a.jpg"], "width": 427}'] * bad_lines
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text(_good("a.jpg") + "\n", encoding="utf-8")
    return _config(tmp_path, f"data:\n  train_jsonl: {tmp_path / 'train.jsonl'}\n  val_jsonl: {tmp_path / 'val.jsonl'}\n")


def test_every_problem_is_reported_not_only_twenty(tmp_path: Path) -> None:
    config = load_config(_setup(tmp_path, bad_lines=25)).config
    result = vd.validate_dataset(config, artifacts=FileArtifactStore(), images=PillowImageStore())
    train, val = result.splits
    assert not result.ok and val.ok
    lines_with_problems = {p.line for p in train.problems if not isinstance(p, str)}
    assert lines_with_problems == {3, *range(4, 29)}
    assert any("file is 64x64, record says 64x32" in str(p) for p in train.problems)
    assert train.records == 3 and train.bbox_objects == 5 and train.poly_objects == 0
    assert train.objects_per_image is not None
    assert (train.objects_per_image.minimum, train.objects_per_image.maximum) == (1, 3)
    text = vd.report_text(result)
    assert f"{tmp_path / 'train.jsonl'}:28: width: must be a positive multiple of 32; got 427" in text
    assert "... and" not in text


def test_lengths_against_max_length(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, f"data:\n  val_jsonl: {tmp_path / 'val.jsonl'}\ntraining:\n  max_length: 100\n"
    )
    Image.new("RGB", (64, 32)).save(tmp_path / "a.jpg")
    (tmp_path / "val.jsonl").write_text("\n".join([_good("a.jpg"), _good("a.jpg", n=2)]) + "\n", encoding="utf-8")

    def lengths(records: RecordSet, images: Sequence[Path]) -> list[int]:
        assert list(images) == [tmp_path / "a.jpg"] * 2  # resolved as training resolves them
        return [50 * (1 + len(r.objects)) for r in records]  # 100, 150

    result = vd.validate_dataset(
        load_config(cfg).config, artifacts=FileArtifactStore(), images=PillowImageStore(), sample_lengths=lengths
    )
    (split,) = result.splits
    assert [str(p) for p in split.problems] == [f"{tmp_path / 'val.jsonl'}:2: sample length 150 exceeds training.max_length = 100"]
    assert split.lengths is not None and (split.lengths.p50, split.lengths.maximum) == (100, 150)


def test_entry_point_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _setup(tmp_path, bad_lines=1)
    assert vd.main(["--config", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAILED with 5 problems" in out  # line 3: image size; line 4: width, height, coord_space, objects
    clean = _config(tmp_path, f"data:\n  train_jsonl: {tmp_path / 'val.jsonl'}\n", "clean.yaml")
    assert vd.main(["--config", str(clean)]) == 0
    assert "validate_dataset: OK" in capsys.readouterr().out
    missing = _config(tmp_path, f"data:\n  train_jsonl: {tmp_path / 'nope.jsonl'}\n", "missing.yaml")
    assert vd.main(["--config", str(missing)]) == 1
    assert "artifact not found" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        vd.main(["--config", str(clean), "--extra"])
    assert usage.value.code == 2


def test_prepare_data_entry_point_on_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from application import prepare_data

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64)).save(src / "x.jpg")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "width": 64, "height": 64, "file_name": "x.jpg"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}],
    }))
    cfg = _config(tmp_path, (
        f"data:\n  convert:\n    source: coco\n    annotations: {tmp_path / 'ann.json'}\n"
        f"    image_root: {src}\n    output_dir: {tmp_path / 'out'}\n    split: val\n    workers: 2\n"
    ))
    assert prepare_data.main(["--config", str(cfg)]) == 0
    assert "self-check passed" in capsys.readouterr().out
    assert (tmp_path / "out" / "val.jsonl").is_file()
    check = _config(tmp_path, f"data:\n  val_jsonl: {tmp_path / 'out' / 'val.jsonl'}\n", "check.yaml")
    assert vd.main(["--config", str(check)]) == 0
    (src / "x.jpg").unlink()
    assert prepare_data.main(["--config", str(cfg)]) == 1
    assert "missing_image" in capsys.readouterr().err
