"""Load-time image checks (data.md §3.3; test 18) and the image-path rules of §1.2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from adapters.storage.images import PillowImageStore
from application.dataset_images import (
    CheckedImageLoader,
    check_images_eager,
    image_problems,
    image_root_for,
    resolve_image_path,
)
from domain.errors import DataContractError
from domain.objects import Ordering
from domain.records import RecordSet, parse_jsonl_records


def _record(image: str, width: int, height: int) -> str:
    return json.dumps(
        {"images": [image], "width": width, "height": height, "coord_space": "norm1000",
         "objects": [{"desc": "thing", "bbox_2d": [1, 2, 30, 40]}]}
    )


def _dataset(tmp_path: Path) -> tuple[Path, RecordSet]:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 32)).save(tmp_path / "images" / "ok.jpg")
    Image.new("RGB", (640, 427)).save(tmp_path / "images" / "stale.png")
    (tmp_path / "images" / "junk.jpg").write_bytes(b"nope")
    lines = [
        _record("images/ok.jpg", 64, 32),
        "",
        _record("images/stale.png", 640, 416),  # line 3: the file was never resized
        _record("images/missing.jpg", 64, 64),  # line 4
        _record("images/junk.jpg", 64, 64),  # line 5
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    numbered = list(enumerate(jsonl.read_text().split("\n")[:-1], start=1))
    records = parse_jsonl_records(numbered, str(jsonl), max_pixels=786432, bbox_only=False, ordering=Ordering.SORTED)
    return jsonl, records


def test_eager_check_names_file_line_and_resolved_path(tmp_path: Path) -> None:
    jsonl, records = _dataset(tmp_path)
    root = image_root_for(jsonl, None)
    with pytest.raises(DataContractError) as info:
        check_images_eager(records, root, PillowImageStore(), workers=3)
    lines = str(info.value).splitlines()
    stale = (tmp_path / "images" / "stale.png").absolute()
    assert lines[0] == f"{jsonl}:3: images[0]: file is 640x427, record says 640x416; resolved path: {stale}"
    assert lines[1] == f"{jsonl}:4: images[0]: file not found: {(tmp_path / 'images' / 'missing.jpg').absolute()}"
    assert lines[2].startswith(f"{jsonl}:5: images[0]: file is not a decodable image: {(tmp_path / 'images' / 'junk.jpg').absolute()}")
    assert len(lines) == 3


def test_workers_do_not_change_the_problems(tmp_path: Path) -> None:
    jsonl, records = _dataset(tmp_path)
    store = PillowImageStore()
    assert image_problems(records, jsonl.parent, store, workers=1) == image_problems(records, jsonl.parent, store, workers=4)


def test_on_load_check_raises_at_the_first_decode(tmp_path: Path) -> None:
    jsonl, records = _dataset(tmp_path)
    loader = CheckedImageLoader(records, jsonl.parent, PillowImageStore())
    assert loader.load(0).size == (64, 32)
    with pytest.raises(DataContractError) as info:
        loader.load(1)
    stale = (tmp_path / "images" / "stale.png").absolute()
    assert str(info.value) == f"{jsonl}:3: images[0]: file is 640x427, record says 640x416; resolved path: {stale}"
    with pytest.raises(DataContractError, match=r":4: images\[0\]: file not found"):
        loader.load(2)
    with pytest.raises(DataContractError, match=r":5: images\[0\]: file is not a decodable image"):
        loader.load(3)
    assert loader.checked_count == 1


def test_image_root_overrides_the_jsonl_directory(tmp_path: Path) -> None:
    assert image_root_for(tmp_path / "a" / "t.jsonl", None) == tmp_path / "a"
    assert image_root_for(tmp_path / "a" / "t.jsonl", tmp_path / "imgs") == tmp_path / "imgs"
    assert resolve_image_path("x/../y/./z.jpg", tmp_path) == tmp_path.absolute() / "y" / "z.jpg"
    with pytest.raises(DataContractError, match="escapes"):
        resolve_image_path("../z.jpg", tmp_path)
    with pytest.raises(DataContractError, match="absolute"):
        resolve_image_path("/etc/z.jpg", tmp_path)
