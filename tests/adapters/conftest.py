"""Shared fixtures for adapter tests: the embedded tiny Qwen3-VL, built once per test session.

Copy ``tiny_checkpoint`` into another conftest when tests elsewhere need the tiny model; it builds
into a session temporary directory (about 5 s once), never into the user's cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the default tiny checkpoint (seed 0), loadable like any local HF checkpoint."""
    from adapters.hf.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint({}, tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: Path) -> Any:
    """The tiny checkpoint loaded in float32 on CPU through the real-checkpoint code path."""
    from adapters.hf.checkpoint import load_model_and_processor

    return load_model_and_processor(tiny_checkpoint, dtype="float32", attn_implementation="sdpa", device="cpu")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The tiny model's tokenizer (coord tokens added), built in memory."""
    from adapters.hf import tiny

    return tiny._build_tokenizer(tiny.TinyModelSettings())


@pytest.fixture(scope="session")
def table(tokenizer: Any) -> Any:
    """The coord-id table of :func:`tokenizer`."""
    from adapters.hf.tokenizer import HFTokenizer

    return HFTokenizer(tokenizer).coord_ids
