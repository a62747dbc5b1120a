"""Load a local Qwen3-VL checkpoint (the tiny one or a real one expanded with coord tokens).

One code path for both: ``AutoProcessor`` + ``AutoModelForImageTextToText`` with
``local_files_only=True`` (never the network), then the setup checks of stage1.md §0.3 and data.md
§3.1 / §4: 1000 distinct special coord ids, every coord id (and the whole tokenizer) inside the model's
output embedding, and an image processor whose ``patch_size * merge_size`` is 32.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path
from typing import Any

import attrs

from adapters.hf.tokenizer import HFTokenizer
from domain.coord_tokens import CoordIdTable
from domain.errors import CoordVocabularyError, SetupError

IMAGE_FACTOR = 32
DTYPES = ("bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")


@attrs.frozen(eq=False)
class LoadedCheckpoint:
    """A loaded model with its processor, the tokenizer port and the validated coord ids."""

    model: Any
    processor: Any
    tokenizer: HFTokenizer
    coord_ids: CoordIdTable
    path: Path
    dtype: str
    attn_implementation_requested: str
    attn_implementation_selected: str

    @property
    def logits_vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


def load_processor(path: str | os.PathLike[str], *, full_checkpoint: bool = True) -> Any:
    """The checkpoint's processor (tokenizer, chat template, image processor), offline.

    ``full_checkpoint=False`` also reads the processor saved in a LoRA / DoRA adapter checkpoint (no config.json).
    """
    from transformers import AutoProcessor

    directory = _checked_dir(path, full_checkpoint=full_checkpoint)
    auto: Any = AutoProcessor
    processor = auto.from_pretrained(str(directory), local_files_only=True)
    check_processor(processor, directory)
    return processor


def check_processor(processor: Any, where: Path | str) -> None:
    image_processor = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if image_processor is None or tokenizer is None:
        raise SetupError(f"{where}: not a vision-language processor (needs a tokenizer and an image processor)")
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    if factor != IMAGE_FACTOR:
        raise SetupError(
            f"{where}: image processor patch_size * merge_size = {factor}; the data contract needs "
            f"{IMAGE_FACTOR} (Qwen3-VL: patch 16, merge 2; data.md §3.1)"
        )
    if not getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
        raise SetupError(f"{where}: the checkpoint has no chat template")


def load_model_and_processor(
    path: str | os.PathLike[str],
    dtype: str = "bfloat16",
    attn_implementation: str = "auto",
    device: str = "cpu",
) -> LoadedCheckpoint:
    """Load model and processor from a local directory and validate the coord vocabulary against the model.

    ``attn_implementation``: an explicit value is used as is (a failure is fatal); ``auto`` tries
    ``flash_attention_2`` (CUDA device and package importable), then ``sdpa``, then ``eager``
    (infer-eval-config.md §2.6).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise SetupError(f"model.dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise SetupError(
            f"model.attn_implementation: expected one of {list(ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r}"
        )
    directory = _checked_dir(path)
    processor = load_processor(directory)
    tokenizer = HFTokenizer(processor.tokenizer)
    try:
        coord_ids = tokenizer.coord_ids
    except CoordVocabularyError as exc:
        raise CoordVocabularyError(f"{directory}: {exc}") from exc

    if attn_implementation == "auto":
        candidates = ["sdpa", "eager"]
        if str(device).startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
            candidates.insert(0, "flash_attention_2")
    else:
        candidates = [attn_implementation]
    errors: list[str] = []
    model: Any = None
    selected = ""
    for candidate in candidates:
        try:
            auto_model: Any = AutoModelForImageTextToText
            model = auto_model.from_pretrained(
                str(directory),
                dtype=getattr(torch, dtype),
                attn_implementation=candidate,
                local_files_only=True,
            )
            selected = candidate
            break
        except Exception as exc:  # each failure is reported if none succeeds
            if attn_implementation != "auto":
                raise SetupError(
                    f"{directory}: loading with model.attn_implementation={candidate!r} failed: {exc}"
                ) from exc
            errors.append(f"{candidate}: {type(exc).__name__}: {exc}")
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if model is None:
        raise SetupError(f"{directory}: no attention implementation could load the model: {errors[:3]}")
    model.to(device)
    model.eval()

    loaded = LoadedCheckpoint(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        coord_ids=coord_ids,
        path=directory,
        dtype=dtype,
        attn_implementation_requested=attn_implementation,
        attn_implementation_selected=selected,
    )
    check_vocabulary(loaded)
    return loaded


def check_vocabulary(loaded: LoadedCheckpoint) -> None:
    """Every coord id and every tokenizer id must index the model's output embedding (stage1.md §0.3.2)."""
    size = loaded.logits_vocab_size
    input_rows = int(loaded.model.get_input_embeddings().weight.shape[0])
    where = str(loaded.path)
    try:
        loaded.coord_ids.check_vocab_size(size)
    except CoordVocabularyError as exc:
        raise CoordVocabularyError(
            f"{where}: {exc}; the model was not resized after adding coord tokens "
            "(run `python -m application.expand_vocab --config ...`)"
        ) from exc
    if len(loaded.tokenizer.hf) > min(size, input_rows):
        raise CoordVocabularyError(
            f"{where}: the tokenizer has {len(loaded.tokenizer.hf)} tokens but the model's input embedding has "
            f"{input_rows} rows and its output head {size}; resize the embeddings "
            "(`python -m application.expand_vocab --config ...`)"
        )


def _checked_dir(path: str | os.PathLike[str], *, full_checkpoint: bool = True) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise SetupError(f"model.path: {directory} is not a directory (a local HF checkpoint is required)")
    if full_checkpoint and not (directory / "config.json").is_file():
        if (directory / "adapter_config.json").is_file():
            raise SetupError(
                f"model.path: {directory} is a LoRA/DoRA adapter checkpoint (adapter_config.json, no config.json); "
                "merge it into full weights with `python -m application.merge_adapter --config FILE` "
                "(configs/merge_adapter/example.yaml) and use the merged directory as model.path"
            )
        raise SetupError(f"model.path: {directory} has no config.json (not a HF checkpoint directory)")
    return directory
