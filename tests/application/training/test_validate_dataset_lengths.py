"""validate_dataset's token lengths (issue 10 item 5, data.md §6.5, §9.9) on the embedded tiny model.

The lengths are the training pre-pass's own: they equal the length of the sample training encodes
(image decoded, template rendered), an over-long record is reported by file and line, and the entry
point exits 1. Uses the default tiny model (no ``model`` block) like the shipped validate config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from application import validate_dataset as vd
from application import wiring
from application.config import load_config


def _validate_config(directory: Path, jsonl: Path, **sections: dict[str, object]) -> Path:
    path = directory / "validate.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_jsonl": str(jsonl)}, **sections}), encoding="utf-8")
    return path


def test_shapes3_lengths_equal_the_encoded_training_samples(shapes3_bbox: Path, tmp_path: Path) -> None:
    """The lengths validate_dataset reports are len(input_ids) of the samples training encodes."""
    from adapters.hf.checkpoint import load_processor
    from adapters.hf.encoding import HFSampleEncoder
    from application.training_plan import sample_lengths_of, split_sources, training_samples
    from application.training_settings import sample_settings
    from application.config.schema import ModelConfig, TinyModelConfig
    from application.datasets import load_split

    config = load_config(_validate_config(tmp_path, shapes3_bbox)).config
    assert config.model is None  # the tiny model by default
    artifacts, images = wiring.make_artifact_store(), wiring.make_image_store()
    result = vd.validate_dataset(
        config, artifacts=artifacts, images=images, sample_lengths=sample_lengths_of(
            wiring.make_sample_encoders()(wiring.resolve_model_checkpoint(ModelConfig(tiny=TinyModelConfig()))),
            sample_settings(config),
        )
    )
    (split,) = result.splits
    assert result.ok and split.records == 3 and split.lengths is not None

    # Training's path: the loaded split, the conversations, the encoder with the image decoded.
    loaded = load_split(shapes3_bbox, config.data, config.prompt.variant, limit=None, artifacts=artifacts, images=images)
    samples = training_samples(split_sources(tuple(loaded.records), loaded.images), sample_settings(config))
    encoder = HFSampleEncoder(load_processor(wiring.resolve_model_checkpoint(ModelConfig(tiny=TinyModelConfig()))))
    encoded = sorted(encoder.encode_sample(s).length for s in samples)
    assert (split.lengths.count, split.lengths.minimum, split.lengths.p50, split.lengths.maximum) == (3, *encoded)
    report = vd.report_text(result)
    assert f"  sample lengths: min {encoded[0]}, " in report and f"max {encoded[-1]}" in report


def test_an_over_long_record_is_reported_with_its_line(
    shapes3_bbox: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [ln for ln in shapes3_bbox.read_text(encoding="utf-8").splitlines() if ln.strip()]
    long = json.loads(lines[1])
    long["objects"][0]["desc"] = " ".join(["red circle"] * 300)  # ~1600 tokens of description
    lines[1] = json.dumps(long)
    jsonl = shapes3_bbox.parent / "over_long.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = _validate_config(tmp_path, jsonl, training={"max_length": 1024})

    assert vd.main(["--config", str(config)]) == 1
    out = capsys.readouterr().out
    problems = [ln.strip() for ln in out.splitlines() if "exceeds training.max_length" in ln]
    assert len(problems) == 1, out
    assert problems[0].startswith(f"{jsonl}:2: sample length ")
    assert problems[0].endswith(" exceeds training.max_length = 1024")
    assert 1024 < int(problems[0].split("sample length ")[1].split()[0]) < 10 * 1024, problems
    assert "sample lengths: min " in out and "FAILED with 1 problems" in out
