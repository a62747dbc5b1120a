"""Finding 5 (issue 11): a checkpoint whose marker exists but whose files were truncated or changed is
recognised before any model loads; ``latest`` falls back to the previous complete checkpoint with a warning,
an explicit path is refused naming the damage and the checkpoint to use instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.storage.checkpoints import write_completion_marker
from application import wiring
from application.config.schema import ModelConfig
from application.train import resume_checkpoint
from domain.checkpoints import COMPLETE_MARKER
from domain.errors import ConfigError


def save(run_dir: Path, step: int) -> Path:
    folder = run_dir / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * (step + 3))
    (folder / "config.json").write_text('{"model_type": "qwen3_vl"}')
    (folder / "sub" / "rng_state.pth").write_bytes(b"rng" * step)
    write_completion_marker(folder, global_step=step, epoch=0.5)
    return folder


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for step in (2, 4, 6):
        save(run, step)
    return run


def test_the_marker_records_size_and_hash_of_every_file(run_dir: Path) -> None:
    marker = json.loads((run_dir / "checkpoint-4" / COMPLETE_MARKER).read_text())
    files = {f["name"]: f for f in marker["files"]}
    assert set(files) == {"model.safetensors", "config.json", "sub/rng_state.pth"}
    assert files["model.safetensors"]["bytes"] == 256 * 7 and len(files["model.safetensors"]["sha256"]) == 64
    assert marker["global_step"] == 4


def test_latest_skips_a_truncated_checkpoint_with_a_warning(run_dir: Path) -> None:
    weights = run_dir / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=r"skipped .*checkpoint-6 \(model\.safetensors: 100 bytes, the marker says 2304"):
        chosen = resume_checkpoint(run_dir, "latest", wiring.make_checkpoint_store(), check_fresh=False)
    assert chosen == run_dir / "checkpoint-4"


def test_a_same_size_change_is_caught_by_the_hash(run_dir: Path) -> None:
    weights = run_dir / "checkpoint-6" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[7] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="content differs from the SHA-256"):
        assert resume_checkpoint(run_dir, "latest", wiring.make_checkpoint_store(), check_fresh=False) == run_dir / "checkpoint-4"


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_an_explicit_damaged_checkpoint_is_refused_naming_the_one_to_use(run_dir: Path, damage: str) -> None:
    target = run_dir / "checkpoint-6" / "sub" / "rng_state.pth"
    if damage == "truncate":
        target.write_bytes(b"")
    else:
        target.unlink()
    # checkpoint-4 is damaged too: the message names the newest earlier checkpoint that is intact
    (run_dir / "checkpoint-4" / "config.json").write_text("{}")
    expected = r"sub/rng_state\.pth: (0 bytes|missing).*use the previous complete checkpoint .*checkpoint-2"
    with pytest.raises(ConfigError, match=r"'model\.path' = .*checkpoint-6.* is damaged: " + expected):
        wiring.resolve_model_checkpoint(ModelConfig(path=run_dir / "checkpoint-6"))
    with pytest.raises(ConfigError, match=r"'training\.resume_from_checkpoint' = .*damaged: " + expected):
        resume_checkpoint(run_dir, str(run_dir / "checkpoint-6"), wiring.make_checkpoint_store(), check_fresh=False)
    assert wiring.resolve_model_checkpoint(ModelConfig(path=run_dir / "checkpoint-2")) == run_dir / "checkpoint-2"


def test_latest_with_every_checkpoint_damaged_is_refused(run_dir: Path) -> None:
    for step in (2, 4, 6):
        (run_dir / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"every complete checkpoint of .* is damaged"):
        resume_checkpoint(run_dir, "latest", wiring.make_checkpoint_store(), check_fresh=False)
