"""The embedded tiny Qwen3-VL and its checkpoint loader (data.md §4, §11 tests 25-26; ENVIRONMENT.md)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from adapters.hf.checkpoint import LoadedCheckpoint, check_vocabulary, load_model_and_processor
from adapters.hf.tiny import (
    BPE_VOCAB_SIZE,
    QWEN_ADDED_TOKENS,
    QWEN_SPECIAL_TOKENS,
    TinyModelSettings,
    build_tiny_checkpoint,
    settings_fingerprint,
    tiny_settings_from,
)
from adapters.hf.tokenizer import HFTokenizer
from domain.coord_tokens import WILDCARD_TOKEN, CoordIdTable, all_coord_tokens, bin_to_token
from domain.errors import ConfigError, CoordVocabularyError, SetupError
from ports.tokenizer import TokenizerPort


def weights_hash(directory: Path) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (independent of file metadata)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        for name in sorted(handle.keys()):
            tensor = handle.get_tensor(name)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the build --------------------------------------------------------------------------------------


def test_checkpoint_has_the_files_of_a_real_checkpoint(tiny_checkpoint: Path) -> None:
    names = set(os.listdir(tiny_checkpoint))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "processor_config.json", "preprocessor_config.json",
            "video_preprocessor_config.json"} <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert not any(name.startswith(".") for name in os.listdir(tiny_checkpoint.parent))  # no staging left


def test_second_call_reuses_the_cache(tiny_checkpoint: Path) -> None:
    before = (tiny_checkpoint / "model.safetensors").stat().st_mtime_ns
    again = build_tiny_checkpoint({"seed": 0}, tiny_checkpoint.parent)
    assert again == tiny_checkpoint
    assert (again / "model.safetensors").stat().st_mtime_ns == before


def test_build_is_deterministic_and_seeded(tiny_checkpoint: Path, tmp_path: Path) -> None:
    same = build_tiny_checkpoint(TinyModelSettings(seed=0), tmp_path / "a")
    other = build_tiny_checkpoint({"seed": 1}, tmp_path / "b")
    assert same != tiny_checkpoint  # a fresh build in another cache, not the cached directory
    assert weights_hash(same) == weights_hash(tiny_checkpoint)
    assert (same / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    assert weights_hash(other) != weights_hash(tiny_checkpoint)
    assert other.name != tiny_checkpoint.name  # one directory per settings fingerprint


def test_settings_from_mapping_and_attrs_objects() -> None:
    nested = {"seed": 3, "cache_dir": "/ignored", "text": {"hidden_size": 64, "mrope_section": [6, 5, 5]},
              "vision": {"depth": 3, "deepstack_visual_indexes": [0, 2]}}
    settings = tiny_settings_from(nested)
    assert settings.seed == 3 and settings.text.hidden_size == 64 and settings.vision.depth == 3
    assert settings.text.mrope_section == (6, 5, 5)
    assert tiny_settings_from(SimpleNamespace()) == TinyModelSettings()  # non-attrs object: defaults
    assert settings_fingerprint(settings) != settings_fingerprint(TinyModelSettings())
    schema = pytest.importorskip("application.config.schema")
    config = schema.TinyModelConfig()
    assert tiny_settings_from(config) == TinyModelSettings(seed=config.seed)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"txt": {}}, "model.tiny: unknown key"),
        ({"text": {"hiden_size": 3}}, "model.tiny.text: unknown key"),
        ({"text": {"mrope_section": [8, 5, 5]}}, "model.tiny.text.mrope_section"),
        ({"vision": {"num_position_embeddings": 250}}, "perfect square"),
        ({"vision": {"deepstack_visual_indexes": [0, 2]}}, "deepstack_visual_indexes"),
        ({"vision": {"patch_size": 14}}, "must be 32"),
    ],
)
def test_invalid_settings_are_config_errors(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_settings_from(block)


# --- tokenizer facts ---------------------------------------------------------------------------------


def test_tokenizer_layout(tiny_loaded: LoadedCheckpoint) -> None:
    hf = tiny_loaded.tokenizer.hf
    decoder = hf.added_tokens_decoder
    assert [hf.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS] == list(range(14))
    assert all(decoder[i].special for i in range(14))
    added = [hf.convert_tokens_to_ids(t) for t in QWEN_ADDED_TOKENS]
    assert added == list(range(BPE_VOCAB_SIZE, BPE_VOCAB_SIZE + 12))
    assert not any(decoder[i].special for i in added)
    wildcard = hf.convert_tokens_to_ids(WILDCARD_TOKEN)
    assert wildcard == BPE_VOCAB_SIZE + 12 and decoder[wildcard].special
    assert len(hf) == BPE_VOCAB_SIZE + len(QWEN_ADDED_TOKENS) + 1001
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None


def test_coord_ids_are_validated_special_tokens(tiny_loaded: LoadedCheckpoint) -> None:
    table = tiny_loaded.coord_ids
    hf = tiny_loaded.tokenizer.hf
    assert table.ids == tuple(hf.convert_tokens_to_ids(all_coord_tokens()))
    decoder = hf.added_tokens_decoder
    assert all(decoder[i].special for i in table.ids)
    assert table.wildcard_id == hf.convert_tokens_to_ids(WILDCARD_TOKEN)
    assert table.wildcard_id not in table.ids


def test_every_coord_token_is_one_id_in_context(tiny_loaded: LoadedCheckpoint) -> None:
    """data.md §11 test 25: inside ``[<|coord_1|>, <|coord_2|>`` context, for all 1000 bins."""
    tok = tiny_loaded.tokenizer
    table = tok.coord_ids
    texts = [f"[<|coord_1|>, {bin_to_token(k)}, <|coord_2|>" for k in range(1000)]
    batch = tok.hf(texts, add_special_tokens=False)["input_ids"]
    for k, ids in enumerate(batch):
        coords = [i for i in ids if table.is_coord_id(i)]
        assert coords == [table.ids[1], table.ids[k], table.ids[2]]
        assert tok.decode(ids) == texts[k]
    # glued to ordinary text on both sides, too
    ids = tok.encode("box<|coord_12|>x<|coord_999|>]}")
    assert [table.bin_of(i) for i in ids if table.is_coord_id(i)] == [12, 999]


def test_tokenizer_port_decodes_with_special_tokens_kept(tiny_loaded: LoadedCheckpoint) -> None:
    tok = tiny_loaded.tokenizer
    assert isinstance(tok, TokenizerPort)
    text = '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_0|>, <|coord_5|>, <|coord_10|>, <|coord_999|>]}]}'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "".join(tok.piece(i) for i in ids) == text
    assert tok.decode(ids + [tok.im_end_id]) == text + "<|im_end|>"
    assert tok.id_of("<|im_end|>") == tok.im_end_id == 2
    assert tok.pad_id == tok.id_of("<|endoftext|>")
    assert tok.vocab_size == len(tok.hf) > tok.hf.vocab_size  # added tokens counted
    with pytest.raises(SetupError, match="not in the tokenizer"):
        tok.id_of("<|coord_1000|>")


# --- the model ---------------------------------------------------------------------------------------


def test_model_sizes(tiny_loaded: LoadedCheckpoint) -> None:
    model = tiny_loaded.model
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.head_dim) == (128, 2, 4, 32)
    assert model.config.image_token_id == tiny_loaded.tokenizer.id_of("<|image_pad|>")
    assert tiny_loaded.logits_vocab_size == 1472 > len(tiny_loaded.tokenizer.hf)
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert tiny_loaded.attn_implementation_selected == "sdpa"


def test_auto_attention_selects_an_implementation(tiny_checkpoint: Path) -> None:
    loaded = load_model_and_processor(tiny_checkpoint, dtype="bfloat16", attn_implementation="auto", device="cpu")
    assert loaded.attn_implementation_selected in ("sdpa", "eager")
    assert str(next(loaded.model.parameters()).dtype) == "torch.bfloat16"


def test_loader_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="not a directory"):
        load_model_and_processor(tmp_path / "missing", dtype="float32")
    with pytest.raises(SetupError, match="no config.json"):
        load_model_and_processor(tmp_path, dtype="float32")
    with pytest.raises(SetupError, match="model.dtype"):
        load_model_and_processor(tmp_path, dtype="fp8")


class _LongerTokenizer:
    """Reports more tokens than the model has rows (tokens added after the coord tokens, model not resized)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _with_head_rows(loaded: LoadedCheckpoint, rows: int, tokenizer: HFTokenizer | None = None) -> LoadedCheckpoint:
    weight = SimpleNamespace(shape=(rows, 8))
    model = SimpleNamespace(
        get_output_embeddings=lambda: SimpleNamespace(weight=weight),
        get_input_embeddings=lambda: SimpleNamespace(weight=weight),
    )
    return LoadedCheckpoint(
        model=model, processor=loaded.processor, tokenizer=tokenizer or loaded.tokenizer, coord_ids=loaded.coord_ids,
        path=loaded.path, dtype="float32", attn_implementation_requested="sdpa", attn_implementation_selected="sdpa",
    )


def test_vocabulary_check_against_the_output_head(tiny_loaded: LoadedCheckpoint) -> None:
    max_coord = tiny_loaded.coord_ids.max_id
    with pytest.raises(CoordVocabularyError, match="expand_vocab"):
        check_vocabulary(_with_head_rows(tiny_loaded, max_coord))  # coord id == rows: out of range
    check_vocabulary(_with_head_rows(tiny_loaded, max_coord + 1))  # every id fits
    longer = HFTokenizer(_LongerTokenizer(max_coord + 5))
    with pytest.raises(CoordVocabularyError, match="tokenizer has"):
        check_vocabulary(_with_head_rows(tiny_loaded, max_coord + 1, longer))  # coords fit, later tokens don't


class _NoCoordTokenizer:
    """A tokenizer stand-in that lost its coord tokens (a checkpoint that was never expanded)."""

    unk_token_id = None
    unk_token = None
    added_tokens_decoder: ClassVar[dict[int, Any]] = {}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return 5 if token == "<|coord_0|>" else None


def test_missing_coord_tokens_are_reported() -> None:
    with pytest.raises(CoordVocabularyError, match=r"expected 1000 distinct coord token ids, got 1"):
        _ = HFTokenizer(_NoCoordTokenizer()).coord_ids


def test_coord_mask_matches_the_logits_dimension(tiny_loaded: LoadedCheckpoint) -> None:
    """data.md §11 test 26: mask over the logits' last dimension, exactly 1000 true entries."""
    import torch

    ids = tiny_loaded.tokenizer.encode("[<|coord_1|>, <|coord_2|>]")
    with torch.no_grad():
        logits = tiny_loaded.model(input_ids=torch.tensor([ids])).logits
    mask = tiny_loaded.coord_ids.mask(logits.shape[-1])
    assert isinstance(tiny_loaded.coord_ids, CoordIdTable)
    assert mask.shape == (logits.shape[-1],) and int(mask.sum()) == 1000
    assert logits.shape[-1] != tiny_loaded.tokenizer.hf.vocab_size  # sizing by vocab_size would be wrong
