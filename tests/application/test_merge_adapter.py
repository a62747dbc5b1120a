"""``python -m application.merge_adapter --config FILE`` (infer-eval-config.md §7.3; issue 11 finding 12): the
use-case rules with a fake merger and the adapter-config reading of the peft merger. The merge itself (logits,
frozen parts, inference on the result) runs end to end in tests/application/training/test_lora_merge.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.fakes.adapter_merge import FakeAdapterMerger
from adapters.fakes.storage import RecordingArtifactStore
from adapters.hf.merge import PeftAdapterMerger
from adapters.storage.checkpoints import FileCheckpointStore
from application.config import load_config
from application.merge_adapter import MergeDependencies, main, merge_adapter
from domain.errors import ArtifactError, ConfigError
from ports.adapter_merge import AdapterCheckpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")


def _adapter_dir(directory: Path, base: Path | str, *, training_model: dict[str, Any] | None = None,
                 **overrides: Any) -> Path:  # fmt: skip
    """An adapter checkpoint as training writes it, without real weights (the fake merger never reads them)."""
    directory.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj", "v_proj"], "use_dora": False, "modules_to_save": None,
              "task_type": "CAUSAL_LM", **overrides}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    if training_model is not None:
        record = {"kind": "train", "resolved_config_sha256": "0" * 64, "config_path": "train.yaml",
                  "resolved": {"model": training_model}}  # fmt: skip
        (directory / "resolved_config.json").write_text(json.dumps(record))
    return directory


def _base_dir(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    return directory


def _config(tmp_path: Path, model_path: Path, name: str = "merged", output_dir: Path | None = None) -> Path:
    path = tmp_path / f"{name}.yaml"
    run = {"name": name, "output_dir": str(output_dir or tmp_path / "out")}
    path.write_text(yaml.safe_dump({"run": run, "model": {"path": str(model_path), "dtype": "float32"}}))
    return path


class FakeMerger(FakeAdapterMerger):
    """The fake merge with the real adapter-config reader (its located errors are part of the use case)."""

    def read_adapter(self, directory: Path) -> AdapterCheckpoint:
        return PeftAdapterMerger().read_adapter(directory)


def _deps(merger: FakeAdapterMerger) -> MergeDependencies:
    """Fakes for the stores; the real tiny-model resolver (one test rebuilds a tiny base)."""
    from application import wiring

    return MergeDependencies(merger=merger, store=RecordingArtifactStore(), checkpoints=FileCheckpointStore(),
                             resolve_checkpoint=wiring.resolve_model_checkpoint)  # fmt: skip


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_writes_into_staging_then_renames_and_records_the_merge(tmp_path: Path) -> None:
    base = _base_dir(tmp_path / "base")
    adapter = _adapter_dir(tmp_path / "run" / "exported", base, training_model={"path": str(base), "tiny": None})
    merger = FakeMerger()
    loaded = load_config(_config(tmp_path, adapter), entry_point="merge_adapter")
    outcome = merge_adapter(loaded, _deps(merger))
    [request] = merger.requests
    assert request.base_dir == base and request.dtype == "float32" and request.adapter.path == adapter
    assert request.output_dir.parent == tmp_path / "out" and request.output_dir.name.startswith(".merged.")
    assert not request.output_dir.exists() and outcome.run_dir == tmp_path / "out" / "merged"
    assert _entries(outcome.run_dir) == ["config.json", "resolved_config.json"]
    document = json.loads((outcome.run_dir / "resolved_config.json").read_text())
    assert document["kind"] == "merge_adapter" and document["merge"]["merged_modules"] == 2
    assert document["training"] == {"checkpoint": str(adapter), "config_path": "train.yaml",
                                    "resolved_config_sha256": "0" * 64}  # fmt: skip

    with pytest.raises(ConfigError, match="already exists"):
        merge_adapter(loaded, _deps(merger))
    assert len(merger.requests) == 1


def test_a_failed_merge_leaves_nothing(tmp_path: Path) -> None:
    adapter = _adapter_dir(tmp_path / "adapter", _base_dir(tmp_path / "base"))
    with pytest.raises(ArtifactError, match="simulated failure"):
        merge_adapter(load_config(_config(tmp_path, adapter), entry_point="merge_adapter"), _deps(FakeMerger(fail=True)))
    assert _entries(tmp_path / "out") == []


def test_a_checkpoint_that_is_not_an_adapter_is_refused_before_any_merge(tmp_path: Path) -> None:
    merger = FakeMerger()
    full = _base_dir(tmp_path / "full")
    with pytest.raises(ConfigError, match=r"'model.path' = .*full.* is not a LoRA/DoRA adapter checkpoint .*"
                                          r"full checkpoint, usable as 'model.path' as is"):  # fmt: skip
        merge_adapter(load_config(_config(tmp_path, full), entry_point="merge_adapter"), _deps(merger))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"is not a LoRA/DoRA adapter checkpoint \(no adapter_config.json\)$"):
        merge_adapter(load_config(_config(tmp_path, empty), entry_point="merge_adapter"), _deps(merger))
    unfinished = _adapter_dir(tmp_path / "run" / "checkpoint-8", full)  # no completion marker
    with pytest.raises(ConfigError, match="checkpoint_complete.json"):
        merge_adapter(load_config(_config(tmp_path, unfinished), entry_point="merge_adapter"), _deps(merger))
    with pytest.raises(ConfigError, match=r"'model.path' must be an existing local directory"):
        merge_adapter(load_config(_config(tmp_path, tmp_path / "nope"), entry_point="merge_adapter"), _deps(merger))
    inside = _adapter_dir(tmp_path / "adapter", full)
    with pytest.raises(ConfigError, match="inside the input 'model.path'"):
        merge_adapter(load_config(_config(tmp_path, inside, output_dir=inside), entry_point="merge_adapter"), _deps(merger))
    assert merger.requests == [] and _entries(tmp_path / "out") == []


def test_the_base_must_be_where_the_adapter_config_says(tmp_path: Path) -> None:
    adapter = _adapter_dir(tmp_path / "adapter", tmp_path / "gone")
    with pytest.raises(ArtifactError, match=r"adapter_config.json: 'base_model_name_or_path' = .*gone.* is not a "
                                            r"local checkpoint directory"):  # fmt: skip
        merge_adapter(load_config(_config(tmp_path, adapter), entry_point="merge_adapter"), _deps(FakeMerger()))
    assert _entries(tmp_path / "out") == []


def test_a_tiny_base_is_rebuilt_from_the_recorded_settings(tmp_path: Path) -> None:
    """The training config copy in the checkpoint records model.tiny: the merge rebuilds exactly that model
    (same fingerprint directory name); another fingerprint is refused."""
    from adapters.hf.tiny import build_tiny_checkpoint

    cache = tmp_path / "tiny_cache"
    built = build_tiny_checkpoint({}, cache)
    tiny = {"seed": 0, "cache_dir": str(cache)}
    adapter = _adapter_dir(tmp_path / "a", cache / built.name, training_model={"path": None, "tiny": tiny})
    merger = FakeMerger()
    merge_adapter(load_config(_config(tmp_path, adapter), entry_point="merge_adapter"), _deps(merger))
    assert merger.requests[0].base_dir == built

    other = _adapter_dir(tmp_path / "b", cache / "tiny-qwen3vl-0000000000000000",
                         training_model={"path": None, "tiny": tiny})  # fmt: skip
    with pytest.raises(ArtifactError, match="rebuilt from the recorded 'model.tiny'"):
        merge_adapter(load_config(_config(tmp_path, other, name="other"), entry_point="merge_adapter"), _deps(merger))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}, "only LORA adapters"),
        ({"base_model_name_or_path": None}, "'base_model_name_or_path' is not set"),
    ],
)
def test_the_adapter_config_is_read_with_located_errors(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    adapter = _adapter_dir(tmp_path / "adapter", tmp_path, **override)
    with pytest.raises(ArtifactError, match=message) as info:
        PeftAdapterMerger().read_adapter(adapter)
    assert str(adapter) in str(info.value)


def test_adapter_config_reading(tmp_path: Path) -> None:
    adapter = _adapter_dir(tmp_path / "adapter", tmp_path / "base", use_dora=True,
                           modules_to_save=["coord_offset_adapter"])  # fmt: skip
    read = PeftAdapterMerger().read_adapter(adapter)
    assert (read.base_model, read.peft_type, read.use_dora, read.coord_offsets) == (
        str(tmp_path / "base"), "LORA", True, True)  # fmt: skip
    assert read.target_modules == ("q_proj", "v_proj")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no adapter weights"):
        PeftAdapterMerger().read_adapter(adapter)


def test_cli_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "a.yaml", "--base", "x"])
    assert exit_info.value.code == 2
    no_run = tmp_path / "no_run.yaml"
    no_run.write_text(yaml.safe_dump({"model": {"path": str(tmp_path)}}))
    assert main(["--config", str(no_run)]) == 1
    assert "run.name" in capsys.readouterr().err


def test_model_path_on_an_adapter_checkpoint_points_to_merge_adapter(tmp_path: Path) -> None:
    """What inference and training say when 'model.path' is an unmerged LoRA checkpoint (the loader's check)."""
    from adapters.hf.checkpoint import load_model_and_processor
    from domain.errors import SetupError

    adapter = _adapter_dir(tmp_path / "adapter", tmp_path / "base")
    with pytest.raises(SetupError, match=r"adapter checkpoint .*python -m application.merge_adapter --config"):
        load_model_and_processor(adapter)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(SetupError, match="has no config.json") as info:
        load_model_and_processor(plain)
    assert "merge_adapter" not in str(info.value)
