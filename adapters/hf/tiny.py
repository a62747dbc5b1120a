"""The embedded tiny Qwen3-VL: a real ``Qwen3VLForConditionalGeneration`` small enough for CPU tests.

``build_tiny_checkpoint(settings, cache_dir)`` writes a complete local checkpoint (weights, config,
generation config, tokenizer, chat template, image/video processor) that loads through exactly the
same code path as a real Qwen3-VL checkpoint expanded with coord tokens
(:func:`adapters.hf.checkpoint.load_model_and_processor`).

Tokenizer layout (mirrors a real expanded Qwen3-VL tokenizer, only smaller):
- ids 0..13: the 14 Qwen3-VL special tokens of :data:`QWEN_SPECIAL_TOKENS`;
- then the byte-level alphabet and BPE merges learned offline from :data:`TRAINING_LINES`;
- then the 12 ordinary added tokens of :data:`QWEN_ADDED_TOKENS` (tool call, FIM, think tags);
- then the coord vocabulary added as special tokens (D7): ``<|coord_*|>``, ``<|coord_0|>``..``<|coord_999|>``.
The model's vocabulary (``model.tiny.text.vocab_size``, default 1472, a multiple of 64) exceeds
``len(tokenizer)`` (1433), so the logits dimension is larger than the tokenizer like on the real checkpoint.

The build is deterministic (seeded) and cached: one directory per settings fingerprint, built in a
temporary directory and renamed into place, reused by later calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from adapters.storage.atomic import give_umask_modes, make_staging_directory
from domain.coord_tokens import vocabulary_additions
from domain.errors import ConfigError
from domain.special_tokens import QWEN_SPECIAL_TOKENS

# The 14 special tokens of the Qwen3-VL tokenizer, in their id order (151643..151656 on the real one).
# The ordinary (non-special) added tokens that follow them on the real tokenizer (151657..151668).
QWEN_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# The BPE training text: prompt wording, CoordJSON punctuation, numbers and common object names.
TRAINING_LINES: tuple[str, ...] = (
    "You are an object detector. Find every object in the image and answer with one line of JSON and nothing else.",
    'Format: {"objects": [{"desc": "cat", "bbox_2d": [12, 40, 300, 410]}]}',
    'Each record has "desc" first, then exactly one geometry: "bbox_2d" is a box [x1, y1, x2, y2] with x1 < x2.',
    '"poly" is a flat list [x1, y1, x2, y2, ...] of at least 3 vertices, starting at the top-most vertex.',
    "Every coordinate is written without quotes; 0 is the left or top edge and 999 the right or bottom edge.",
    "List objects from top to bottom, then left to right. Objects may be listed in any order.",
    'Use ", " between items and ": " after keys. "desc" is a short English name; use "unknown" if unsure.',
    'If there is no object, answer {"objects": []}. Detect every object in this image.',
    '{"objects": [{"desc": "dog", "bbox_2d": [1, 2, 3, 4]}, {"desc": "person", "poly": [5, 6, 7, 8, 9, 0]}]}',
    '{"objects": [{"bbox_2d": [10, 20, 30, 40], "desc": "car"}, {"poly": [50, 60, 70, 80, 90, 99], "desc": "tree"}]}',
    "cat dog person car bus truck bicycle chair table cup bottle bird horse sheep cow person yellow box tool cabinet",
    "cloud heart arrow star circle square triangle red green blue black white small large left right top bottom",
    "system user assistant image text video the a of and in on with for to is are",
)

# Specials + byte alphabet + merges. With the 12 added tokens and the 1001 coord tokens the tokenizer
# has 1433 entries, below the default logits dimension 1472 (a multiple of 64, like the real checkpoint).
BPE_VOCAB_SIZE = 420
_BUILD_FORMAT = 2
_DONE_FILE = "tiny_build.json"


@attrs.frozen
class TinyTextSettings:
    """The language model: ``vocab_size`` is the logits dimension (>= ``len(tokenizer)``)."""

    vocab_size: int = 1472
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    mrope_section: tuple[int, ...] = attrs.field(default=(6, 5, 5), converter=tuple)
    mrope_interleaved: bool = True
    rope_theta: float = 5_000_000.0
    tie_word_embeddings: bool = False


@attrs.frozen
class TinyVisionSettings:
    depth: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 256
    deepstack_visual_indexes: tuple[int, ...] = attrs.field(default=(0, 1), converter=tuple)


@attrs.frozen
class TinyModelSettings:
    """Sizes of the tiny model; the defaults are the measured working set of ENVIRONMENT.md.

    The shape is the config's ``model.tiny`` block (``seed``, ``text``, ``vision``; its ``cache_dir``
    chooses where the build goes and is not part of the model).
    """

    seed: int = 0
    text: TinyTextSettings = attrs.field(factory=TinyTextSettings)
    vision: TinyVisionSettings = attrs.field(factory=TinyVisionSettings)

    def validate(self) -> None:
        t, v = self.text, self.vision
        problems: list[str] = []
        for block, obj in (("text", t), ("vision", v)):
            for f in attrs.fields(type(obj)):
                value = getattr(obj, f.name)
                if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                    problems.append(f"model.tiny.{block}.{f.name}: must be >= 1; got {value}")
        if t.head_dim % 2 or sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(
                f"model.tiny.text.mrope_section: its sum must equal head_dim / 2 = {t.head_dim / 2}; "
                f"got {list(t.mrope_section)}"
            )
        if t.num_key_value_heads >= 1 and t.num_attention_heads % t.num_key_value_heads:
            problems.append(
                "model.tiny.text.num_attention_heads: must be a multiple of num_key_value_heads; "
                f"got {t.num_attention_heads} and {t.num_key_value_heads}"
            )
        if v.num_heads >= 1 and v.hidden_size % v.num_heads:
            problems.append(
                f"model.tiny.vision.hidden_size: must be a multiple of num_heads; got {v.hidden_size} and {v.num_heads}"
            )
        if v.patch_size * v.spatial_merge_size != 32:
            problems.append(
                "model.tiny.vision: patch_size * spatial_merge_size must be 32 (the data contract's image "
                f"factor, data.md §3.1); got {v.patch_size} * {v.spatial_merge_size}"
            )
        root = round(v.num_position_embeddings**0.5)
        if root * root != v.num_position_embeddings:
            problems.append(
                f"model.tiny.vision.num_position_embeddings: must be a perfect square; got {v.num_position_embeddings}"
            )
        if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
            problems.append(
                f"model.tiny.vision.deepstack_visual_indexes: every index must be below depth {v.depth}; "
                f"got {list(v.deepstack_visual_indexes)}"
            )
        if problems:
            raise ConfigError(problems)


def _plain(source: object) -> Any:
    """A mapping / attrs tree as plain dicts."""
    kind: Any = type(source)
    if attrs.has(kind):
        return {f.name: _plain(getattr(source, f.name)) for f in attrs.fields(kind)}
    if isinstance(source, Mapping):
        return {str(k): _plain(v) for k, v in source.items()}
    if source is not None and not isinstance(source, (str, bytes, int, float, list, tuple, os.PathLike)):
        return {k: _plain(v) for k, v in vars(source).items() if not k.startswith("_")}
    return source


def _structure(kind: type[Any], values: Mapping[str, Any], where: str) -> Any:
    names = [f.name for f in attrs.fields(kind)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys: {names}")
    return kind(**{k: v for k, v in values.items() if v is not None})


def tiny_settings_from(source: object) -> TinyModelSettings:
    """Settings from the config's ``model.tiny`` block: a mapping or attrs object of the same shape.

    Missing fields take the defaults; ``cache_dir`` is ignored here; an unknown field is a config error.
    """
    if isinstance(source, TinyModelSettings):
        source.validate()
        return source
    values = dict(_plain(source) or {})
    values.pop("cache_dir", None)
    text = _structure(TinyTextSettings, values.pop("text", None) or {}, "model.tiny.text")
    vision = _structure(TinyVisionSettings, values.pop("vision", None) or {}, "model.tiny.vision")
    settings: TinyModelSettings = _structure(TinyModelSettings, {**values, "text": text, "vision": vision}, "model.tiny")
    settings.validate()
    return settings


def settings_fingerprint(settings: TinyModelSettings) -> str:
    """SHA-256 over the settings, the build format and the transformers/tokenizers versions."""
    import tokenizers
    import transformers

    payload = {
        "settings": attrs.asdict(settings),
        "build_format": _BUILD_FORMAT,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "training_lines": list(TRAINING_LINES),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def default_tiny_cache_dir() -> Path:
    """``$COORDEXP_CACHE_DIR/tiny`` if set, else ``~/.cache/coordexp/tiny``."""
    root = os.environ.get("COORDEXP_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "coordexp"
    return base / "tiny"


def build_tiny_checkpoint(settings: object, cache_dir: str | os.PathLike[str]) -> Path:
    """The directory of the tiny checkpoint for these settings, built on first use.

    Built in a temporary sibling directory and renamed into place, so a reader never sees a partial
    checkpoint; a concurrent builder that loses the rename race keeps the winner's directory.
    """
    tiny = tiny_settings_from(settings)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    fingerprint = settings_fingerprint(tiny)
    final = cache / f"tiny-qwen3vl-{fingerprint[:16]}"
    if (final / _DONE_FILE).is_file():
        return final
    staging = make_staging_directory(cache, prefix=f".{final.name}.")
    try:
        _write_checkpoint(tiny, staging)
        (staging / _DONE_FILE).write_text(
            json.dumps({"fingerprint": fingerprint, "settings": attrs.asdict(tiny)}, indent=2, sort_keys=True)
            + "\n",
            encoding="utf-8",
        )
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / _DONE_FILE).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


# --- building blocks -----------------------------------------------------------------------------------

# Qwen-style chat template: explicit roles, image/video placeholders, assistant content wrapped in
# {% generation %} (content and its <|im_end|> are what the labels supervise, data.md §6.3).
TINY_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- render_content(message['content']) -}}{{- '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}{{- render_content(message['content']) -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _build_tokenizer(settings: TinyModelSettings) -> Any:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Train with the exact normalizer / pre-tokenizer Qwen2Tokenizer rebuilds on load.
    pipeline = Qwen2Tokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = pipeline.normalizer
    bpe.pre_tokenizer = pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(TRAINING_LINES) * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: Any = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    tokenizer_class: Any = Qwen2Tokenizer
    tokenizer = tokenizer_class(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        model_max_length=131072,
        errors="replace",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
    coord = [AddedToken(t, special=True, normalized=False) for t in vocabulary_additions()]
    tokenizer.add_special_tokens({"additional_special_tokens": coord}, replace_extra_special_tokens=False)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _build_processor(settings: TinyModelSettings, tokenizer: Any) -> Any:
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    v = settings.vision
    common = {
        "patch_size": v.patch_size,
        "merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 64 * 32 * 32, "longest_edge": 16384 * 32 * 32}, **common
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}, **common
    )
    processor_class: Any = Qwen3VLProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def _build_model(settings: TinyModelSettings, tokenizer: Any) -> Any:
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    t, v = settings.text, settings.vision
    if t.vocab_size < len(tokenizer):
        raise ConfigError(
            f"model.tiny.text.vocab_size: {t.vocab_size} is below the tiny tokenizer's {len(tokenizer)} tokens"
        )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    text_config = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "max_position_embeddings": 32768,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "mrope_section": list(t.mrope_section),
            "mrope_interleaved": t.mrope_interleaved,
        },
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    vision_config = {
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "out_hidden_size": t.hidden_size,
        "num_position_embeddings": v.num_position_embeddings,
        "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
    }
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=t.tie_word_embeddings,
    )
    config.bos_token_id = None
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    # Seeded without touching the caller's RNG streams.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model_class: Any = Qwen3VLForConditionalGeneration
        model: Any = model_class(config)
    model.to(torch.float32)
    generation_config: Any = GenerationConfig
    model.generation_config = generation_config(
        bos_token_id=None,
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    return model


def _write_checkpoint(settings: TinyModelSettings, directory: Path) -> None:
    tokenizer = _build_tokenizer(settings)
    processor = _build_processor(settings, tokenizer)
    model = _build_model(settings, tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # The per-part files a real Qwen3-VL checkpoint ships, for readers that do not use processor_config.json.
    processor.image_processor.save_pretrained(directory)
    processor.video_processor.save_pretrained(directory)
    give_umask_modes(directory)  # safetensors writes 0600
