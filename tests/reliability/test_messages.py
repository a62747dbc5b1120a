"""Findings 14 and 15 (issue 11): messages that misled a user, files a team could not read, and the
``Training complete`` line printed once per torchrun rank."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from fake_pipeline import ScriptedDeps, write_infer_config, write_split

from application import wiring
from application.config import load_config
from application.infer import run_pipeline
from domain.errors import ArtifactError, ConfigError, CoordVocabularyError, DataContractError
from domain.packing import PackingSettings, plan_packs
from ports.training import TrainingOutcome

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")


# --- finding 15 -------------------------------------------------------------------------------------


def test_a_directory_given_as_config_is_called_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert f"config file {tmp_path.resolve()} is a directory, not a YAML file" in message
    assert "not found" not in message


def test_a_directory_given_as_image_is_called_a_directory(tmp_path: Path) -> None:
    val = write_split(tmp_path, 2)
    (tmp_path / "img" / "1.png").unlink()
    (tmp_path / "img" / "1.png").mkdir()
    with pytest.raises(DataContractError) as info:
        run_pipeline(load_config(write_infer_config(tmp_path, val), entry_point="infer"), ScriptedDeps().deps())
    message = str(info.value)
    assert f"{val}:2: images[0]: is a directory, not an image file: {tmp_path / 'img' / '1.png'}" in message, message
    assert "not found" not in message


def test_a_moved_run_directory_is_not_called_changed_inputs(tmp_path: Path) -> None:
    val = write_split(tmp_path, 4)
    deps = ScriptedDeps()
    run_pipeline(load_config(write_infer_config(tmp_path, val, name="before"), entry_point="infer"), deps.deps())
    shutil.move(tmp_path / "out" / "before", tmp_path / "out" / "after")
    moved = load_config(write_infer_config(tmp_path, val, name="after"), entry_point="infer")
    with pytest.raises(ArtifactError) as info:
        run_pipeline(moved, deps.deps())
    message = str(info.value)
    assert "inputs changed" not in message and "no previous fingerprint" not in message
    assert "moved or copied" in message and str(tmp_path / "out" / "before" / "gt_vs_pred.jsonl") in message
    assert deps.engines_opened == 1  # the refused run loaded no model


def test_an_empty_pack_plan_names_the_data_file() -> None:
    settings = PackingSettings(max_length=100, packing_buffer=8, packing_min_fill_ratio=0.9, packing_drop_last=True)
    with pytest.raises(DataContractError, match=r"empty pack plan for data/extra\.jsonl, data/train\.jsonl: N=2"):
        plan_packs([10, 20], settings, seed=0, locations=["data/train.jsonl:1", "data/extra.jsonl:7"])


# --- finding 14 -------------------------------------------------------------------------------------


@pytest.fixture()
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_expanded_models_and_evaluations_get_the_umask_modes(tmp_path: Path, umask_022: None) -> None:
    from application.config.schema import EvalConfig
    from application.evaluate import evaluate_artifact
    from application.expand_vocab import ExpandVocabDependencies, expand_vocab
    from ports.evaluation import SemanticStep

    def expander(source: Any, output: Any, *, dtype: str = "bfloat16") -> Any:
        import numpy as np
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(2, dtype=np.float32)}, str(Path(output) / "model.safetensors"))  # 0600 by itself
        return mock.Mock(to_json=dict)

    source = tmp_path / "src"
    source.mkdir()
    config = tmp_path / "expand.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "expanded", "output_dir": str(tmp_path / "out")},
                                      "model": {"path": str(source)}}))  # fmt: skip
    deps = ExpandVocabDependencies(expander=expander, store=wiring.make_artifact_store())  # the real store's modes
    outcome = expand_vocab(load_config(config, entry_point="expand_vocab"), deps)
    assert mode(outcome.run_dir) == 0o755
    assert mode(outcome.run_dir / "resolved_config.json") == 0o644

    artifact = tmp_path / "gt_vs_pred.jsonl"
    artifact.write_text("")
    evaluate_artifact(artifact, EvalConfig(metrics="f1ish", overlay=False), tmp_path / "eval",
                      coco=wiring.make_coco_evaluator("faster_coco_eval"), semantic=SemanticStep.off("test"),
                      warn=lambda message: None, artifacts=wiring.make_artifact_store())  # fmt: skip
    assert mode(tmp_path / "eval") == 0o755
    assert {mode(p) for p in (tmp_path / "eval").iterdir()} == {0o644}


def test_a_built_checkpoint_is_readable_by_the_team(tmp_path: Path, umask_022: None) -> None:
    from adapters.hf import tiny

    small = tiny.TinyModelSettings(text=tiny.TinyTextSettings(vocab_size=448))
    with mock.patch.object(tiny, "vocabulary_additions", list):  # a small vocabulary keeps the build fast
        built = tiny.build_tiny_checkpoint(small, tmp_path / "cache")
    assert mode(built) == 0o755
    assert {mode(p) for p in built.iterdir()} == {0o644}  # model.safetensors included (safetensors writes 0600)


def test_inference_on_a_checkpoint_without_coord_tokens_points_to_expand_vocab(tmp_path: Path) -> None:
    from adapters.hf import tiny
    from adapters.hf.checkpoint import load_model_and_processor

    plain = tmp_path / "plain"
    plain.mkdir()
    settings = tiny.TinyModelSettings(text=tiny.TinyTextSettings(vocab_size=448))
    with mock.patch.object(tiny, "vocabulary_additions", list):
        tiny._write_checkpoint(settings, plain)
    with pytest.raises(CoordVocabularyError) as info:
        load_model_and_processor(plain, dtype="float32", attn_implementation="eager")
    message = str(info.value)
    assert message.startswith(f"{plain}: ") and "python -m application.expand_vocab" in message, message


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_only_rank_zero_prints_training_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rank: str, printed: bool
) -> None:
    import application.train as train_module

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "run", "output_dir": str(tmp_path / "out")},
                                      "model": {"tiny": {"seed": 0}},
                                      "data": {"train_jsonl": str(tmp_path / "t.jsonl")}}))  # fmt: skip
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(train_module, "train", lambda loaded, deps: TrainingOutcome(2, (1.0, 0.5), None))
    assert train_module.main(["--config", str(config)]) == 0
    assert ("Training complete" in capsys.readouterr().out) is printed
