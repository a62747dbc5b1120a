"""Issue 11, item 6: an image path is confined to the image root after symlinks are resolved. A link to a
file outside the root, or to ``/etc``, is a located error before anything opens it, in validation, in the
eager check and in the on-load check; links that stay inside the root, and a root that is itself a link,
keep working."""

from __future__ import annotations

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
)

from adapters.fakes.training import RecordingTrainingEngine
from application.config import load_config
from application.dataset_images import CheckedImageLoader, image_problems, image_root_for
from train_runner import run_train
from application.validate_dataset import main as validate_main
from domain.errors import DataContractError
from domain.objects import Ordering
from domain.records import RecordSet, parse_jsonl_records


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDEXP_CACHE_DIR", str(tmp_path / "cache"))


def _escaping_split(tmp_path: Path) -> Path:
    """Line 2 links to a real image outside the root, line 3 links to /etc; line 1 is a plain file."""
    data = tmp_path / "data"
    write_image(data / "img" / "0.png")
    outside = write_image(tmp_path / "elsewhere" / "secret.png", seed=5)
    (data / "img" / "out.png").symlink_to(outside)
    (data / "img" / "etc").symlink_to("/etc")
    return write_jsonl(data / "train.jsonl", [record_line("img/0.png"), record_line("img/out.png"),
                                              record_line("img/etc")])  # fmt: skip


def _records(jsonl: Path) -> RecordSet:
    lines = list(enumerate(jsonl.read_text().splitlines(), start=1))
    return parse_jsonl_records(lines, str(jsonl), max_pixels=786432, bbox_only=False, ordering=Ordering.SORTED)


def test_links_out_of_the_root_are_located_errors_and_never_opened(tmp_path: Path) -> None:
    jsonl = _escaping_split(tmp_path)
    store = CountingImageStore()
    found = image_problems(_records(jsonl), image_root_for(jsonl, None), store, workers=1)
    assert [(p.line, p.field) for p in found] == [(2, "images[0]"), (3, "images[0]")]
    assert found[0].reason.startswith(f"resolves outside the image root: {jsonl.parent / 'img' / 'out.png'} -> "
                                      f"{(tmp_path / 'elsewhere' / 'secret.png').resolve()}")  # fmt: skip
    assert found[1].reason.startswith(f"resolves outside the image root: {jsonl.parent / 'img' / 'etc'} -> /etc ")
    assert all("not a decodable image" not in p.reason for p in found)
    assert store.decoded == ["0.png"]  # neither link was opened


def test_validate_dataset_and_training_refuse_the_links_before_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl = _escaping_split(tmp_path)
    assert validate_main(["--config", str(validate_config(tmp_path, jsonl))]) == 1
    out = capsys.readouterr().out
    assert f"{jsonl}:2: images[0]: resolves outside the image root" in out
    assert f"{jsonl}:3: images[0]: resolves outside the image root" in out
    engine = RecordingTrainingEngine()
    with pytest.raises(DataContractError) as info:
        run_train(load_config(train_config(tmp_path, jsonl), entry_point="train"), engine)
    assert [(p.line, p.reason.split(":")[0]) for p in info.value.problems] == [
        (2, "resolves outside the image root"), (3, "resolves outside the image root")]  # fmt: skip
    assert engine.jobs == [] and not (tmp_path / "out").exists()


def test_the_on_load_check_refuses_the_link_too(tmp_path: Path) -> None:
    jsonl = _escaping_split(tmp_path)
    loader = CheckedImageLoader(_records(jsonl), jsonl.parent, CountingImageStore())
    assert loader.load(0).size == (64, 64)
    with pytest.raises(DataContractError, match=r"train\.jsonl:2: images\[0\]: resolves outside the image root"):
        loader.load(1)


def test_links_inside_the_root_and_a_linked_root_are_accepted(tmp_path: Path) -> None:
    real = tmp_path / "real"
    jsonl = good_split(real, 2)
    (real / "img" / "alias.png").symlink_to(real / "img" / "0.png")  # inside the root
    (real / "img" / "sub").mkdir()
    (real / "img" / "sub" / "up.png").symlink_to("../1.png")  # inside, through a relative link
    write_jsonl(jsonl, [record_line("img/0.png"), record_line("img/alias.png"), record_line("img/sub/up.png")])
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(real)  # the root itself may be a link (e.g. to shared storage)
    records = _records(jsonl)
    assert image_problems(records, real, CountingImageStore(), workers=1) == ()
    assert image_problems(records, linked_root, CountingImageStore(), workers=1) == ()
