"""Helpers of the bad-input reliability tests (issue 11, items 1, 3, 6, 7): small JSONL splits with real
image files, broken on purpose, a Stage-1 config for the recording training engine, and an image store
that counts full decodes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from adapters.hf.tiny import default_tiny_cache_dir
from adapters.storage.images import PillowImageStore

SIZE = 64  # a multiple of 32 (D5)


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    """A noisy 64x64 image, so that its compressed data is long enough to cut in half."""
    pixels = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed))
    return path


def write_truncated_image(path: Path, seed: int = 0) -> Path:
    """A PNG whose header is intact (size readable) but whose pixel data stops half-way, as after an
    interrupted copy."""
    data = image_bytes(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def record_line(image: str, width: int = SIZE, height: int = SIZE) -> str:
    record = {"images": [image], "width": width, "height": height, "coord_space": "norm1000",
              "objects": [{"desc": "cat", "bbox_2d": [100, 100, 500, 600]}]}  # fmt: skip
    return json.dumps(record)


def write_jsonl(path: Path, lines: list[str | bytes]) -> Path:
    """Lines as given: ``bytes`` are written raw (e.g. not UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines))
    return path


def good_split(folder: Path, n: int = 3) -> Path:
    """``n`` valid records with their images under ``folder/img``; returns the JSONL."""
    lines: list[str | bytes] = []
    for i in range(n):
        write_image(folder / "img" / f"{i}.png", seed=i)
        lines.append(record_line(f"img/{i}.png"))
    return write_jsonl(folder / "train.jsonl", lines)


def train_config(folder: Path, train_jsonl: Path, name: str = "t", **blocks: dict[str, Any]) -> Path:
    """A Stage-1 config whose model is a local directory (the recording engine never loads it)."""
    (folder / "model").mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(folder / "out"), "seed": 17},
        "model": {"path": str(folder / "model"), "dtype": "float32"},
        "data": {"train_jsonl": str(train_jsonl)},
        "objective": {"trainer_variant": "stage1"},
        "training": {"max_steps": 2, "max_length": 4096, "logging_steps": 1, "save_strategy": "no"},
    }
    for block, values in blocks.items():
        config.setdefault(block, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# The tiny model's cache as the session starts (the tests point COORDEXP_CACHE_DIR at a fresh folder each).
_TINY_CACHE = default_tiny_cache_dir()


def validate_config(folder: Path, train_jsonl: Path, **blocks: dict[str, Any]) -> Path:
    """A config for ``application.validate_dataset`` (the tiny model measures lengths; its cache is shared)."""
    path = folder / "validate.yaml"
    config = {"data": {"train_jsonl": str(train_jsonl)}, "model": {"tiny": {"cache_dir": str(_TINY_CACHE)}}, **blocks}
    path.write_text(yaml.safe_dump(config))
    return path


class CountingImageStore(PillowImageStore):
    """Pillow, counting full decodes per file name (the cache must spare the second run)."""

    def __init__(self) -> None:
        self.decoded: list[str] = []

    def read_rgb(self, path: Path) -> Image.Image:
        self.decoded.append(Path(path).name)
        return super().read_rgb(path)
