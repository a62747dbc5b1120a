"""One way every entry point fails: a CoordExpError or an OS error on the output path prints exactly one
``error: ...`` line on stderr (no traceback) and exits 1, in every entry point."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from application.cli import describe_os_error

REPO = Path(__file__).resolve().parents[2]
SHAPES3 = REPO / "data" / "shapes3"
ENTRY_POINTS = (
    "prepare_data", "validate_dataset", "train", "expand_vocab", "merge_adapter", "infer", "evaluate", "visualize",
)  # fmt: skip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")


def run_main(name: str, config: Path) -> int:
    module = importlib.import_module(f"application.{name}")
    return int(module.main(["--config", str(config)]))


def assert_one_error_line(code: int, err: str, *needles: str) -> str:
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return lines[0]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_missing_config_is_one_error_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    line = assert_one_error_line(run_main(name, missing), capsys.readouterr().err, str(missing))
    assert line.startswith("error: ")


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_directory_given_as_config_is_one_error_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_one_error_line(run_main(name, tmp_path), capsys.readouterr().err, str(tmp_path))


# --- an OS error on the output path ---------------------------------------------------------------------


@pytest.fixture()
def readonly_dir(mount_tmpfs: Callable[[str], Path]) -> Path:
    """A real read-only file system (a read-only tmpfs mount); skipped where mounting is not allowed."""
    return mount_tmpfs("ro,size=64k")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes3 converted (boxes) into a temporary directory: returns the JSONL."""
    from application.prepare_data import main

    out = tmp_path_factory.mktemp("shapes3")
    config = out / "convert.yaml"
    config.write_text(yaml.safe_dump({"data": {"convert": {
        "source": "coco", "annotations": str(SHAPES3 / "gt_dataset.json"), "image_root": str(SHAPES3),
        "output_dir": str(out / "data"), "split": "train", "geometry": "bbox", "workers": 1,
    }}}))  # fmt: skip
    assert main(["--config", str(config)]) == 0
    return out / "data" / "train.jsonl"


def artifact_record(index: int = 0) -> dict[str, Any]:
    box = {"type": "bbox_2d", "points": [10, 10, 60, 60], "desc": "star"}
    return {"index": index, "image": "images/train/img_1.jpg", "width": 256, "height": 256, "coord_mode": "pixel",
            "gt": [box], "pred": [{**box, "score": 0.9}], "raw_output": None, "raw_ends_with_im_end": True,
            "num_generated_tokens": 1, "errors": []}  # fmt: skip


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


Maker = Callable[[Path, Path, Path], Path]  # (tmp_path, output root, converted jsonl) -> config


def _prepare_data(tmp: Path, out: Path, jsonl: Path) -> Path:
    return write_yaml(tmp / "c.yaml", {"data": {"convert": {
        "source": "coco", "annotations": str(SHAPES3 / "gt_dataset.json"), "image_root": str(SHAPES3),
        "output_dir": str(out / "data"), "split": "train", "geometry": "bbox", "workers": 1}}})  # fmt: skip


def _train(tmp: Path, out: Path, jsonl: Path) -> Path:
    return write_yaml(tmp / "c.yaml", {
        "run": {"name": "t", "output_dir": str(out)},
        "model": {"tiny": {"seed": 0}, "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train_jsonl": str(jsonl)},
        "training": {"max_steps": 1, "max_length": 4096, "save_strategy": "no"},
    })  # fmt: skip


def _infer(tmp: Path, out: Path, jsonl: Path) -> Path:
    return write_yaml(tmp / "c.yaml", {
        "run": {"name": "i", "output_dir": str(out)},
        "model": {"tiny": {"seed": 0}, "dtype": "float32", "attn_implementation": "eager"},
        "data": {"val_jsonl": str(jsonl)},
        "stages": {"infer": True, "eval": False, "vis": False},
        "infer": {"device": "cpu", "generation": {"max_new_tokens": 4}},
    })  # fmt: skip


def _artifact(tmp: Path) -> Path:
    path = tmp / "gt_vs_pred.jsonl"
    path.write_text(json.dumps(artifact_record()) + "\n")
    return path


def _evaluate(tmp: Path, out: Path, jsonl: Path) -> Path:
    return write_yaml(tmp / "c.yaml", {
        "run": {"name": "e", "output_dir": str(out)},
        "infer": {"gt_vs_pred_jsonl": str(_artifact(tmp))},
        "eval": {"metrics": "f1ish", "overlay": False},
    })  # fmt: skip


def _visualize(tmp: Path, out: Path, jsonl: Path) -> Path:
    return write_yaml(tmp / "c.yaml", {
        "run": {"name": "v", "output_dir": str(out)},
        "infer": {"gt_vs_pred_jsonl": str(_artifact(tmp))},
        "data": {"image_root": str(jsonl.parent)},
    })  # fmt: skip


def _expand_vocab(tmp: Path, out: Path, jsonl: Path) -> Path:
    from adapters.hf import tiny

    checkpoint = tiny.build_tiny_checkpoint(tiny.TinyModelSettings(), tiny.default_tiny_cache_dir())
    return write_yaml(tmp / "c.yaml", {"run": {"name": "x", "output_dir": str(out)},
                                       "model": {"path": str(checkpoint)}})  # fmt: skip


WRITERS: dict[str, Maker] = {
    "prepare_data": _prepare_data,
    "train": _train,
    "expand_vocab": _expand_vocab,
    "infer": _infer,
    "evaluate": _evaluate,
    "visualize": _visualize,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_read_only_output_directory_is_one_error_line(
    name: str, tmp_path: Path, readonly_dir: Path, converted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = WRITERS[name](tmp_path, readonly_dir / "out", converted)
    capsys.readouterr()
    code = run_main(name, config)
    err = capsys.readouterr().err
    if name == "expand_vocab" and code == 1 and "coord" in err and "Read-only" not in err:
        pytest.skip("the tiny checkpoint already has the coord tokens; expand_vocab refuses it before writing")
    assert_one_error_line(code, err, "Read-only file system", str(readonly_dir))
    assert not any(readonly_dir.iterdir())  # nothing half-written


@pytest.mark.parametrize("name", ["evaluate", "visualize"])
def test_a_malformed_artifact_line_is_one_located_error_line(
    name: str, tmp_path: Path, converted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = WRITERS[name](tmp_path, tmp_path / "out", converted)
    artifact = tmp_path / "gt_vs_pred.jsonl"
    artifact.write_text(json.dumps(artifact_record(0)) + "\n" + '{"index": 1, "image": \n')
    assert_one_error_line(run_main(name, config), capsys.readouterr().err, f"{artifact}:2")


def test_os_errors_are_described_with_their_path_and_a_hint() -> None:
    import errno

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/x.json")
    text = describe_os_error(full)
    assert text.startswith("/data/out/x.json: ") and "disk is full" in text
    assert "read-only" in describe_os_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro"))
    assert describe_os_error(OSError("plain")) == "OSError"
