"""Helpers of the reliability tests: a small JSONL split with real PNGs, an inference config, and the
inference pipeline's dependencies with a scripted backend and the fake tokenizer (no model)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from adapters.fakes.generation import ScriptedGenerationBackend
from adapters.fakes.provenance import FakeProvenanceCollector
from adapters.fakes.tokenizer import FakeTokenizer
from application import wiring
from application.infer import InferDependencies
from ports.generation import EngineRequest, GenerationEngine, GenerationRequest

TOKENIZER = FakeTokenizer()


def answer(request: GenerationRequest) -> str:
    """The scripted model: one box whose x1 depends on the index, then <|im_end|>."""
    x1 = 10 + request.index
    return f'{{"objects": [{{"desc": "cat", "bbox_2d": [<|coord_{x1}|>, <|coord_100|>, <|coord_500|>, <|coord_600|>]}}]}}<|im_end|>'


def write_split(folder: Path, n: int) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i % 255, 90, 160)).save(folder / "img" / f"{i}.png")
        record = {
            "images": [f"img/{i}.png"], "width": 64, "height": 64, "coord_space": "norm1000",
            "objects": [{"desc": "cat", "bbox_2d": [100, 100, 500, 600]}], "metadata": {"image_id": 100 + i},
        }  # fmt: skip
        lines.append(json.dumps(record))
    path = folder / "val.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_infer_config(folder: Path, val_jsonl: Path, name: str = "run", **infer: Any) -> Path:
    config: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(folder / "out"), "seed": 17},
        "model": {"path": str(folder / "ckpt"), "dtype": "float32"},
        "data": {"val_jsonl": str(val_jsonl)},
        "stages": {"infer": True, "eval": False, "vis": False},
        "infer": {"generation": {"temperature": 0.0, "max_new_tokens": 64, "batch_size": 2}, **infer},
    }
    (folder / "ckpt").mkdir(exist_ok=True)
    (folder / "ckpt" / "config.json").write_text('{"model_type": "fake"}')
    (folder / "ckpt" / "model.safetensors").write_bytes(b"weights")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class ScriptedDeps:
    """Inference dependencies with a scripted backend; counts how often an engine was opened."""

    def __init__(self) -> None:
        self.engines_opened = 0

    def open_engine(self, request: EngineRequest) -> GenerationEngine:
        self.engines_opened += 1
        backend = ScriptedGenerationBackend(answer, tokenizer=TOKENIZER, describe={"device": "cpu"})
        return GenerationEngine(backend, TOKENIZER, backend.stop_ids)

    def deps(self, after_batch: Callable[[int, Path], None] | None = None, **overrides: Any) -> InferDependencies:
        values: dict[str, Any] = {
            "artifacts": wiring.make_artifact_store(),
            "images": wiring.make_image_store(),
            "provenance": FakeProvenanceCollector(),
            "resolve_checkpoint": lambda model: Path(model.path),
            "open_engine": self.open_engine,
            "evaluate": lambda settings, artifact, out: None,
            "visualize": lambda request: None,
            "after_batch": after_batch,
            "progress": False,
            "echo": lambda message: None,
        }
        values.update(overrides)
        return InferDependencies(**values)
