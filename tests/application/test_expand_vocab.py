"""``python -m application.expand_vocab --config FILE`` (data.md §4.3, §11 test 24; infer-eval-config.md §7.3).

End to end on tiny Qwen3-VL checkpoints saved WITHOUT coord tokens (tied and untied), then loaded through
``adapters.hf.checkpoint.load_model_and_processor``; the use-case rules with a fake expander.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from adapters.fakes.storage import RecordingArtifactStore
from adapters.fakes.vocabulary import FakeVocabularyExpander
from application.config import load_config
from application.expand_vocab import ExpandVocabDependencies, expand_vocab, main
from domain.coord_tokens import vocabulary_additions
from domain.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")

PLAIN_TOKENS = 432


def _plain_checkpoint(directory: Path, *, tied: bool, vocab_size: int) -> Path:
    """The tiny checkpoint with the builder's coord additions switched off: a checkpoint to expand."""
    from adapters.hf import tiny

    settings = tiny.TinyModelSettings(
        text=tiny.TinyTextSettings(vocab_size=vocab_size, tie_word_embeddings=tied)
    )
    directory.mkdir(parents=True)
    with mock.patch.object(tiny, "vocabulary_additions", list):
        tiny._write_checkpoint(settings, directory)
    (directory / "README.md").write_text("tiny test checkpoint\n")
    return directory


@pytest.fixture(scope="module")
def plain_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plain_checkpoints")
    return {
        "tied": _plain_checkpoint(root / "tied", tied=True, vocab_size=448),
        "untied": _plain_checkpoint(root / "untied", tied=False, vocab_size=1472),
    }


def _config(
    tmp_path: Path, model: dict[str, Any], name: str = "expanded", output_dir: Path | None = None
) -> Path:
    path = tmp_path / f"{name}.yaml"
    run = {"name": name, "output_dir": str(output_dir or tmp_path / "out")}
    path.write_text(yaml.safe_dump({"run": run, "model": model}))
    return path


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --------------------------------------------------------------------------------------------------
# End to end (real expander)


@pytest.mark.parametrize(("kind", "rows"), [("tied", 1433), ("untied", 1472)])
def test_expands_a_checkpoint_that_then_loads_as_model_path(
    plain_checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    rows: int,
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from adapters.hf.checkpoint import load_model_and_processor
    from adapters.hf.vocab import check_coord_tokens_file, shares_storage

    source = plain_checkpoints[kind]
    source_files = {p.name: p.read_bytes() for p in source.iterdir()}
    config = _config(tmp_path, {"path": str(source), "dtype": "float32"})

    assert main(["--config", str(config)]) == 0

    run_dir = tmp_path / "out" / "expanded"
    assert _entries(tmp_path / "out") == ["expanded"]  # no staging directory left behind
    printed = capsys.readouterr().out
    assert f"written to {run_dir}" in printed and "<|coord_0|> = 433" in printed
    assert {p.name: p.read_bytes() for p in source.iterdir()} == source_files  # input untouched
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "coord_tokens.json",
        "resolved_config.json",
        "README.md",
    } <= set(_entries(run_dir))

    loaded = load_model_and_processor(run_dir, dtype="float32", attn_implementation="sdpa")
    tokenizer = loaded.tokenizer.hf
    assert len(tokenizer) == PLAIN_TOKENS + 1001
    assert [
        tokenizer.convert_ids_to_tokens(i) for i in range(PLAIN_TOKENS, PLAIN_TOKENS + 1001)
    ] == vocabulary_additions()
    assert loaded.coord_ids.ids == tuple(range(433, 1433)) and loaded.coord_ids.wildcard_id == 432
    assert check_coord_tokens_file(run_dir, tokenizer).ids == loaded.coord_ids.ids
    coord_json = json.loads((run_dir / "coord_tokens.json").read_text())
    assert list(coord_json) == vocabulary_additions() and list(coord_json.values()) == list(range(432, 1433))

    model = loaded.model
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embedding.shape == head.shape == (rows, 128)
    assert shares_storage(embedding, head) is (kind == "tied")
    raw = json.loads((run_dir / "config.json").read_text())
    assert raw["tie_word_embeddings"] is raw["text_config"]["tie_word_embeddings"] is (kind == "tied")
    assert raw["text_config"]["vocab_size"] == rows

    source_processor = AutoProcessor.from_pretrained(str(source), local_files_only=True)
    assert loaded.processor.chat_template == source_processor.chat_template
    assert loaded.processor.image_processor.to_dict() == source_processor.image_processor.to_dict()
    # The expanded model computes the same logits for the old vocabulary, and mean rows for the new tokens.
    original = AutoModelForImageTextToText.from_pretrained(str(source), dtype=torch.float32).eval()
    probe = torch.tensor([[1, 20, 77, 300, 2]])
    with torch.no_grad():
        before = original(input_ids=probe).logits
        after = model(input_ids=probe).logits
    assert torch.allclose(after[..., :PLAIN_TOKENS], before[..., :PLAIN_TOKENS], atol=1e-5)
    old_rows = original.get_input_embeddings().weight[:PLAIN_TOKENS].double().mean(dim=0).float()
    assert torch.allclose(embedding[433:1433], old_rows.expand(1000, -1), atol=1e-6)

    resolved = json.loads((run_dir / "resolved_config.json").read_text())
    assert resolved["kind"] == "expand_vocab"
    assert resolved["expansion"]["tied"] is (kind == "tied")
    assert resolved["expansion"]["tokens_before"] == PLAIN_TOKENS
    assert resolved["expansion"]["rows_after"] == rows
    assert resolved["resolved"]["model"]["path"] == str(source)


def test_an_expanded_checkpoint_is_refused_and_nothing_is_written(
    tiny_checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, {"path": str(tiny_checkpoint_dir), "dtype": "float32"})
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already expanded" in err and "model.path" in err and "Traceback" not in err
    assert _entries(tmp_path / "out") == []


@pytest.fixture(scope="module")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapters.hf.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint({}, tmp_path_factory.mktemp("tiny_cache"))


# --------------------------------------------------------------------------------------------------
# Use-case rules (fake expander)


def _deps(expander: FakeVocabularyExpander) -> ExpandVocabDependencies:
    return ExpandVocabDependencies(expander=expander, store=RecordingArtifactStore())


def test_writes_into_staging_then_renames(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    expander = FakeVocabularyExpander()
    calls = expander.calls
    loaded = load_config(_config(tmp_path, {"path": str(source)}), entry_point="expand_vocab")
    outcome = expand_vocab(loaded, _deps(expander))
    assert outcome.run_dir == tmp_path / "out" / "expanded"
    [(called_source, staging, dtype)] = calls
    assert called_source == source and dtype == "bfloat16"  # model.dtype's schema default
    assert (
        staging.parent == tmp_path / "out" and staging.name.startswith(".expanded.") and not staging.exists()
    )
    assert _entries(outcome.run_dir) == ["config.json", "resolved_config.json"]
    document = json.loads((outcome.run_dir / "resolved_config.json").read_text())
    assert document["kind"] == "expand_vocab" and document["expansion"] == {"tied": True}
    assert document["run_dir"] == str(outcome.run_dir)

    # A second run into the same run_dir is refused before the expander runs.
    with pytest.raises(ConfigError, match="already exists"):
        expand_vocab(loaded, _deps(expander))
    assert len(calls) == 1


def test_a_failed_expansion_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    loaded = load_config(_config(tmp_path, {"path": str(source)}), entry_point="expand_vocab")
    with pytest.raises(ConfigError, match="simulated failure"):
        expand_vocab(loaded, _deps(FakeVocabularyExpander(fail=True)))
    assert _entries(tmp_path / "out") == []


def test_config_errors_come_before_anything_is_written(tmp_path: Path) -> None:
    expander = FakeVocabularyExpander()
    calls = expander.calls
    missing = load_config(_config(tmp_path, {"path": str(tmp_path / "nope")}), entry_point="expand_vocab")
    with pytest.raises(ConfigError, match=r"'model.path' must be an existing local directory"):
        expand_vocab(missing, _deps(expander))

    tiny = load_config(_config(tmp_path, {"tiny": {}}), entry_point="expand_vocab")
    with pytest.raises(ConfigError, match=r"'model.path' is required .*model.tiny"):
        expand_vocab(tiny, _deps(expander))

    source = tmp_path / "out" / "same"
    source.mkdir(parents=True)
    same = load_config(_config(tmp_path, {"path": str(source)}, name="same"), entry_point="expand_vocab")
    with pytest.raises(ConfigError, match="is the input 'model.path'"):
        expand_vocab(same, _deps(expander))

    inside = load_config(
        _config(tmp_path, {"path": str(source)}, name="nested", output_dir=source), entry_point="expand_vocab"
    )
    with pytest.raises(ConfigError, match="inside the input 'model.path'"):
        expand_vocab(inside, _deps(expander))
    assert calls == []
    assert _entries(tmp_path / "out") == ["same"]


def test_cli_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "a.yaml", "--model", "x"])
    assert exit_info.value.code == 2
    no_run = tmp_path / "no_run.yaml"
    no_run.write_text(yaml.safe_dump({"model": {"path": str(tmp_path)}}))
    assert main(["--config", str(no_run)]) == 1
    assert "run.name" in capsys.readouterr().err
