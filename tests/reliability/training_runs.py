"""Helpers of the reliability tests that train the embedded tiny Qwen3-VL: the shapes3 fixture converted by
the project's converter, and the Stage-1 config writer of ``tests/application/training/conftest.py``
(loaded by path: one config writer for every training test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[2]
SHAPES3 = PROJECT / "data" / "shapes3"
_TRAINING_CONFTEST = PROJECT / "tests" / "application" / "training" / "conftest.py"


def _training_conftest() -> Any:
    spec = importlib.util.spec_from_file_location("reliability_training_conftest", _TRAINING_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_train_config(directory: Path, train_jsonl: Path, **sections: dict[str, Any]) -> Path:
    """``tests/application/training/conftest.py::write_config`` (tiny model, fp32, eager attention)."""
    directory.mkdir(parents=True, exist_ok=True)
    written: Path = _training_conftest().write_config(directory, train_jsonl, **sections)
    return written


def convert_shapes3(directory: Path, records: int) -> Path:
    """shapes3 converted with ``geometry: bbox``, its lines repeated in order and cut at ``records``."""
    from application import wiring
    from application.config import load_config
    from application.prepare_data import ConvertSettings, convert_dataset

    config = directory / "convert.yaml"
    config.write_text(yaml.safe_dump({"data": {"convert": {
        "source": "coco", "annotations": str(SHAPES3 / "gt_dataset.json"), "image_root": str(SHAPES3),
        "output_dir": str(directory / "data"), "split": "train", "geometry": "bbox", "workers": 1,
    }}}))  # fmt: skip
    loaded = load_config(config, entry_point="prepare_data")
    convert_dataset(ConvertSettings.from_config(loaded.config.data), artifacts=wiring.make_artifact_store(),
                    images=wiring.make_image_store(), progress=False, echo=lambda _message: None)  # fmt: skip
    lines = [line for line in (directory / "data" / "train.jsonl").read_text().splitlines() if line.strip()]
    target = directory / "data" / f"train{records}.jsonl"
    target.write_text("\n".join((lines * records)[:records]) + "\n")
    return target


def logged_losses(run_dir: Path) -> dict[int, float]:
    """``global_step -> loss`` of the training lines of ``logging.jsonl``."""
    out: dict[int, float] = {}
    for line in (run_dir / "logging.jsonl").read_text().splitlines():
        event = json.loads(line)
        if "loss" in event:
            out[int(event["global_step"])] = float(event["loss"])
    return out
