"""Fixtures for Stage-1 training tests: shapes3 converted to bbox records, and a config writer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")

# The shapes3 fixture the repository ships (data/README.md).
SHAPES3 = Path(__file__).resolve().parents[3] / "data" / "shapes3"


@pytest.fixture(scope="session")
def shapes3_bbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes3 converted by the project's converter with ``geometry: bbox``; returns the train JSONL."""
    from application import wiring
    from application.config import load_config
    from application.prepare_data import ConvertSettings, convert_dataset

    out = tmp_path_factory.mktemp("shapes3")
    cfg = out / "convert.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "convert": {
                        "source": "coco",
                        "annotations": str(SHAPES3 / "gt_dataset.json"),
                        "image_root": str(SHAPES3),
                        "output_dir": str(out / "data"),
                        "split": "train",
                        "geometry": "bbox",
                        "workers": 1,
                    }
                }
            }
        )
    )
    loaded = load_config(cfg, entry_point="prepare_data")
    convert_dataset(
        ConvertSettings.from_config(loaded.config.data),
        artifacts=wiring.make_artifact_store(),
        images=wiring.make_image_store(),
        progress=False,
        echo=lambda _msg: None,
    )
    return out / "data" / "train.jsonl"


@pytest.fixture(scope="session")
def four_records(shapes3_bbox: Path) -> Path:
    """Four records (the three shapes3 images, the first one twice) for accumulation-split tests."""
    lines = [ln for ln in shapes3_bbox.read_text().splitlines() if ln.strip()]
    target = shapes3_bbox.parent / "four.jsonl"
    target.write_text("\n".join(lines + lines[:1]) + "\n")
    return target


def write_config(directory: Path, train_jsonl: Path, **sections: dict[str, Any]) -> Path:
    """A Stage-1 config on the tiny model in fp32 with the given blocks merged over the defaults."""
    base: dict[str, Any] = {
        "run": {"name": "t", "output_dir": str(directory / "out"), "seed": 17},
        "model": {"tiny": {"seed": 0}, "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train_jsonl": str(train_jsonl)},
        "objective": {
            "trainer_variant": "stage1",
            "coord_soft_ce_w1": {"enabled": True, "target_sigma": 2.0, "target_truncate": 16},
        },
        "training": {
            "max_steps": 2,
            "max_length": 4096,
            "learning_rate": 1.0e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "lr_scheduler_type": "constant",
        },
    }
    for block, values in sections.items():
        base.setdefault(block, {}).update(values)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture()
def make_config(tmp_path: Path) -> Callable[..., Path]:
    def make(train_jsonl: Path, **sections: dict[str, Any]) -> Path:
        return write_config(tmp_path, train_jsonl, **sections)

    return make


@pytest.fixture(scope="session")
def eight_records(shapes3_bbox: Path) -> Path:
    """Eight records (the three shapes3 images repeated in order, cut at eight) for short-window tests."""
    lines = [ln for ln in shapes3_bbox.read_text().splitlines() if ln.strip()]
    target = shapes3_bbox.parent / "eight.jsonl"
    target.write_text("\n".join((lines * 3)[:8]) + "\n")
    return target
