"""Vocabulary expansion of a local Hugging Face checkpoint with the coord tokens (D7, data.md §4.3).

:func:`expand_checkpoint` reads a checkpoint WITHOUT coord tokens and writes a complete checkpoint that
loads as ``model.path``:

1. the tokenizer gets ``<|coord_*|>``, ``<|coord_0|>``..``<|coord_999|>`` as additional special tokens;
   the existing special tokens stay special (``replace_extra_special_tokens=False``);
2. the input embedding and the output head grow to ``len(tokenizer)`` rows (never shrink: a table
   that is already larger keeps its size, its extra rows stay untouched);
3. every row of an added token (and every row that did not exist before) is initialised with the
   mean of the rows of the tokens the checkpoint already had, per table (``[0, len(old tokenizer))``;
   padding rows beyond the old tokenizer are not tokens and are not averaged);
4. tying is kept: a tied checkpoint is re-tied (one shared tensor, ``tie_word_embeddings: true`` in
   the config and its ``text_config``); an untied one keeps two tables and both flags false;
5. model, processor, tokenizer, chat template, generation config and the image/video processor files
   are saved; other non-weight files of the source (README, LICENSE, ...) are copied;
6. ``coord_tokens.json`` maps the 1001 added strings to their ids (wildcard first, then bin order);
7. the output is checked by reloading its processor: the 1000 coord ids validate (distinct, known,
   special), ``coord_tokens.json`` agrees, the chat template is unchanged, the config's vocabulary
   covers the tokenizer.

A tokenizer that already holds any of the 1001 tokens is refused (:class:`CoordVocabularyError`):
a complete set means the checkpoint is already expanded and is used as ``model.path`` directly.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from adapters.hf.checkpoint import load_processor
from adapters.hf.tokenizer import HFTokenizer
from adapters.storage.atomic import give_umask_modes
from domain.coord_tokens import NUM_BINS, WILDCARD_TOKEN, CoordIdTable, all_coord_tokens, vocabulary_additions
from domain.errors import ArtifactError, CoordVocabularyError, SetupError

COORD_TOKENS_FILE = "coord_tokens.json"
DTYPES = ("bfloat16", "float16", "float32")

# Files the expansion writes itself (or that would be stale copies of what it writes): never copied.
_WRITTEN_OR_STALE = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "processor_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "chat_template.json",
        "chat_template.jinja",
        COORD_TOKENS_FILE,
        "resolved_config.json",
    }
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@attrs.frozen
class TableResize:
    """What happened to the input embedding and the output head."""

    embedding_rows_before: int
    head_rows_before: int
    rows_after: int
    initialised_rows: tuple[int, ...]
    mean_source_rows: int
    tied: bool


@attrs.frozen
class ExpansionReport:
    """Summary of one expansion; ``to_json`` is stored in the output's ``resolved_config.json``."""

    source: Path
    output: Path
    dtype: str
    tokens_before: int
    tokens_after: int
    embedding_rows_before: int
    head_rows_before: int
    rows_after: int
    mean_source_rows: int
    tied: bool
    wildcard_id: int
    coord_ids: tuple[int, ...]
    copied_files: tuple[str, ...]

    @property
    def coord_ids_contiguous(self) -> bool:
        return self.coord_ids == tuple(range(self.coord_ids[0], self.coord_ids[0] + NUM_BINS))

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "dtype": self.dtype,
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "embedding_rows_before": self.embedding_rows_before,
            "head_rows_before": self.head_rows_before,
            "rows_after": self.rows_after,
            "mean_source_rows": self.mean_source_rows,
            "tied": self.tied,
            "wildcard_id": self.wildcard_id,
            "coord_id_first": self.coord_ids[0],
            "coord_id_last": self.coord_ids[-1],
            "coord_ids_contiguous": self.coord_ids_contiguous,
            "copied_files": list(self.copied_files),
        }


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _known_id(tokenizer: Any, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (unk is not None and token_id == unk and token != tokenizer.unk_token):
        return None
    return int(token_id)


def present_additions(tokenizer: Any) -> list[str]:
    """Which of the 1001 vocabulary additions the tokenizer already knows."""
    return [tok for tok in vocabulary_additions() if _known_id(tokenizer, tok) is not None]


def refuse_existing_coord_vocabulary(tokenizer: Any, where: str = "tokenizer") -> None:
    """Raise :class:`CoordVocabularyError` when the tokenizer already knows any of the 1001 additions.

    All of them: the checkpoint is already expanded (use it as ``model.path``). Some: a partially
    expanded tokenizer, which this use case does not repair.
    """
    present = present_additions(tokenizer)
    if len(present) == len(vocabulary_additions()):
        ids = [
            _known_id(tokenizer, t) for t in (WILDCARD_TOKEN, all_coord_tokens()[0], all_coord_tokens()[-1])
        ]
        raise CoordVocabularyError(
            f"{where}: the tokenizer already holds the coord vocabulary ({WILDCARD_TOKEN} = {ids[0]}, "
            f"<|coord_0|> = {ids[1]} .. <|coord_999|> = {ids[2]}); this checkpoint is already expanded: "
            "use it as 'model.path' directly. Nothing was written."
        )
    if present:
        raise CoordVocabularyError(
            f"{where}: the tokenizer already holds {len(present)} of the {len(vocabulary_additions())} coord "
            f"vocabulary tokens (e.g. {present[:3]}); refusing to expand a partially expanded tokenizer. "
            "Start from the original checkpoint."
        )


def add_coord_tokens(tokenizer: Any, where: str = "tokenizer") -> tuple[int, ...]:
    """Add the wildcard and the 1000 coord tokens as special tokens; return their ids in that order.

    Existing special tokens stay special. Refuses a tokenizer that already knows any of them.
    """
    from tokenizers import AddedToken

    refuse_existing_coord_vocabulary(tokenizer, where)
    specials_before = list(tokenizer.all_special_tokens)
    added = [
        AddedToken(tok, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for tok in vocabulary_additions()
    ]
    count = tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    if count != len(added):
        raise SetupError(f"{where}: adding the coord vocabulary added {count} tokens, expected {len(added)}")
    lost = [tok for tok in specials_before if tok not in set(tokenizer.all_special_tokens)]
    if lost:
        raise SetupError(f"{where}: adding the coord tokens dropped existing special tokens {lost[:5]}")
    ids = tuple(_known_id(tokenizer, tok) for tok in vocabulary_additions())
    if any(i is None for i in ids):
        raise SetupError(f"{where}: coord tokens were added but do not resolve to ids")
    return tuple(int(i) for i in ids if i is not None)


def coord_tokens_document(tokenizer: Any) -> dict[str, int]:
    """``coord_tokens.json``: token -> id for the wildcard and the 1000 coord tokens (validated first)."""
    table = HFTokenizer(tokenizer).coord_ids
    document: dict[str, int] = {}
    wildcard = _known_id(tokenizer, WILDCARD_TOKEN)
    if wildcard is None:
        raise CoordVocabularyError(f"the tokenizer has no {WILDCARD_TOKEN} token")
    document[WILDCARD_TOKEN] = wildcard
    document.update({tok: int(i) for tok, i in zip(all_coord_tokens(), table.ids)})
    return document


def check_coord_tokens_file(directory: str | os.PathLike[str], tokenizer: Any) -> CoordIdTable:
    """Validate ``<directory>/coord_tokens.json`` against the tokenizer (infer-eval-config.md §7.3).

    The file must map each of the 1000 coord tokens to a distinct id that the tokenizer gives the same
    token; a listed wildcard must agree as well. Returns the validated id table.
    """
    path = Path(directory) / COORD_TOKENS_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"{path}: missing; expand the checkpoint with `python -m application.expand_vocab`"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(document, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in document.values()
    ):
        raise ArtifactError(f"{path}: must be a JSON object mapping token strings to integer ids")
    try:
        listed = CoordIdTable.from_vocab(document)
    except CoordVocabularyError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
    actual = HFTokenizer(tokenizer).coord_ids
    mismatched = [
        f"{tok}: file {a}, tokenizer {b}"
        for tok, a, b in zip(all_coord_tokens(), listed.ids, actual.ids)
        if a != b
    ]
    if WILDCARD_TOKEN in document and document[WILDCARD_TOKEN] != _known_id(tokenizer, WILDCARD_TOKEN):
        mismatched.insert(
            0, f"{WILDCARD_TOKEN}: file {document[WILDCARD_TOKEN]}, tokenizer {actual.wildcard_id}"
        )
    if mismatched:
        raise ArtifactError(
            f"{path}: {len(mismatched)} ids disagree with the tokenizer, e.g. {mismatched[:3]}"
        )
    return actual


# --------------------------------------------------------------------------------------------------
# Model tables


def shares_storage(a: Any, b: Any) -> bool:
    """True when two tensors are views of one storage (a tied embedding and head)."""
    return bool(a is b or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def stored_tensor_names(directory: Path) -> set[str] | None:
    """Tensor names stored in a checkpoint's safetensors files (None when there are none)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return set(weight_map)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def config_tie_flags(raw_config: Mapping[str, Any]) -> tuple[bool | None, bool | None]:
    """``tie_word_embeddings`` at the top level and inside ``text_config`` (None when absent)."""
    top = raw_config.get("tie_word_embeddings")
    text = raw_config.get("text_config")
    inner = text.get("tie_word_embeddings") if isinstance(text, Mapping) else None
    return (bool(top) if top is not None else None, bool(inner) if inner is not None else None)


def checkpoint_is_tied(model: Any, raw_config: Mapping[str, Any], stored: set[str] | None) -> bool:
    """Whether the checkpoint ties its input embedding and output head.

    Tied when the loaded model shares one tensor; also when either config flag (top level or
    ``text_config``) says tied and the checkpoint stores no head weight (a loader that read only one
    of the two flags would otherwise have left a freshly initialised head). A stored head that
    differs from the embedding means untied, whatever the flags say.
    """
    embedding, head = _tables(model)
    if shares_storage(embedding.weight, head.weight):
        return True
    top, inner = config_tie_flags(raw_config)
    if not (top or inner):
        return False
    if stored is None:
        return False
    return not any(name.endswith("lm_head.weight") for name in stored)


def _tables(model: Any) -> tuple[Any, Any]:
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embedding is None or getattr(embedding, "weight", None) is None:
        raise SetupError("the model has no input embedding module with a weight")
    if head is None or getattr(head, "weight", None) is None:
        raise SetupError("the model has no output head (get_output_embeddings) with a weight")
    return embedding, head


def _grown(old: Any, rows: int, init_rows: Sequence[int], mean_rows: int) -> Any:
    """``old`` grown to ``rows`` rows; ``init_rows`` set to the mean of ``old[:mean_rows]`` (float32 mean)."""
    import torch

    new = torch.empty((rows, *old.shape[1:]), dtype=old.dtype, device=old.device)
    new[: old.shape[0]] = old
    if init_rows:
        mean = old[:mean_rows].to(torch.float32).mean(dim=0).to(old.dtype)
        index = torch.as_tensor(list(init_rows), dtype=torch.long, device=old.device)
        new[index] = mean
    return new


def resize_to_tokenizer(
    model: Any, tokens_after: int, tokens_before: int, added_ids: Iterable[int], *, tied: bool
) -> TableResize:
    """Grow both tables to ``tokens_after`` rows with mean initialisation and keep the tying as given.

    ``tokens_before`` rows (the old tokenizer's tokens, capped by the table) are averaged; the rows of
    ``added_ids`` and every row that did not exist are set to that mean, per table. Tied: the head
    is the embedding's tensor afterwards. Untied: two tensors, each with its own mean.
    The config's ``text_config.vocab_size`` and both ``tie_word_embeddings`` flags are updated.
    """
    import torch

    embedding, head = _tables(model)
    old_embedding = embedding.weight.detach()
    old_head = head.weight.detach()
    if old_embedding.shape[1] != old_head.shape[1] and tied:
        raise SetupError(
            f"tied embedding and head disagree in width: {tuple(old_embedding.shape)} vs {tuple(old_head.shape)}"
        )
    rows_embedding, rows_head = int(old_embedding.shape[0]), int(old_head.shape[0])
    rows = max(rows_embedding, rows_head, int(tokens_after))
    added = sorted({int(i) for i in added_ids})
    if added and added[-1] >= rows:
        raise SetupError(f"added token id {added[-1]} does not fit {rows} rows")
    mean_rows = min(int(tokens_before), rows_embedding, rows_head)
    if mean_rows < 1:
        raise SetupError("the checkpoint has no existing token rows to average")
    if any(i < mean_rows for i in added):
        raise SetupError(f"an added token id is below the old tokenizer's size {mean_rows}: {added[:3]}")
    init_embedding = sorted(set(added) | set(range(rows_embedding, rows)))
    init_head = sorted(set(added) | set(range(rows_head, rows)))

    new_embedding = _grown(old_embedding, rows, init_embedding, mean_rows)
    embedding.weight = torch.nn.Parameter(new_embedding, requires_grad=embedding.weight.requires_grad)
    embedding.num_embeddings = rows
    if tied:
        head.weight = embedding.weight
    else:
        new_head = _grown(old_head, rows, init_head, mean_rows)
        head.weight = torch.nn.Parameter(new_head, requires_grad=head.weight.requires_grad)
    bias = getattr(head, "bias", None)
    if bias is not None:
        head.bias = torch.nn.Parameter(
            _grown(bias.detach(), rows, init_head, mean_rows), requires_grad=bias.requires_grad
        )
    if hasattr(head, "out_features"):
        head.out_features = rows
    _set_config_vocabulary(model, rows, tied)
    return TableResize(
        embedding_rows_before=rows_embedding,
        head_rows_before=rows_head,
        rows_after=rows,
        initialised_rows=tuple(init_embedding),
        mean_source_rows=mean_rows,
        tied=tied,
    )


def _set_config_vocabulary(model: Any, rows: int, tied: bool) -> None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.vocab_size = rows
    config.tie_word_embeddings = tied
    if text is not config:
        text.tie_word_embeddings = tied
    # Recompute the tie mapping from the updated config (save/load use it to name the kept tensor).
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


# --------------------------------------------------------------------------------------------------
# The whole expansion


def _copy_other_files(source: Path, output: Path) -> tuple[str, ...]:
    copied: list[str] = []
    for item in sorted(source.iterdir()):
        name = item.name
        if not item.is_file() or name.startswith(".") or name in _WRITTEN_OR_STALE:
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json") or (output / name).exists():
            continue
        shutil.copy2(item, output / name)
        copied.append(name)
    return tuple(copied)


def _verify_output(output: Path, ids: Sequence[int], rows: int, tied: bool, chat_template: Any) -> None:
    processor = load_processor(output)
    tokenizer = processor.tokenizer
    table = HFTokenizer(tokenizer).coord_ids
    if table.ids != tuple(ids[1:]) or table.wildcard_id != ids[0]:
        raise SetupError(
            f"{output}: the saved tokenizer resolves the coord tokens to other ids than were added"
        )
    check_coord_tokens_file(output, tokenizer)
    table.check_vocab_size(rows)
    raw = json.loads((output / "config.json").read_text(encoding="utf-8"))
    text = raw.get("text_config", raw)
    if int(text.get("vocab_size", -1)) != rows or len(tokenizer) > rows:
        raise SetupError(
            f"{output}/config.json: vocab_size {text.get('vocab_size')} does not cover {len(tokenizer)} tokens "
            f"({rows} rows written)"
        )
    if config_tie_flags(raw) not in ((tied, tied), (tied, None)):
        raise SetupError(
            f"{output}/config.json: tie_word_embeddings flags {config_tie_flags(raw)} but tied={tied}"
        )
    saved_template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if saved_template != chat_template:
        raise SetupError(f"{output}: the saved chat template differs from the source checkpoint's")


def expand_checkpoint(
    source: str | os.PathLike[str], output: str | os.PathLike[str], *, dtype: str = "bfloat16"
) -> ExpansionReport:
    """Expand ``source`` (a local HF vision-language checkpoint without coord tokens) into ``output``.

    ``output`` must be an empty or missing directory; the caller owns atomic placement (write into a
    staging directory, then rename). Weights are loaded and saved in ``dtype``.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    src, out = Path(source), Path(output)
    if dtype not in DTYPES:
        raise SetupError(f"model.dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if out.exists() and any(out.iterdir()):
        raise SetupError(f"{out}: the output directory is not empty")
    processor = load_processor(src)
    tokenizer = processor.tokenizer
    chat_template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    where = f"model.path {src}"
    refuse_existing_coord_vocabulary(tokenizer, where)

    auto: Any = AutoModelForImageTextToText
    model = auto.from_pretrained(str(src), dtype=getattr(torch, dtype), local_files_only=True)
    raw_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    tied = checkpoint_is_tied(model, raw_config, stored_tensor_names(src))

    tokens_before = len(tokenizer)
    ids = add_coord_tokens(tokenizer, where)
    tokens_after = len(tokenizer)
    with torch.no_grad():
        resize = resize_to_tokenizer(model, tokens_after, tokens_before, ids, tied=tied)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    for part in ("image_processor", "video_processor"):
        sub = getattr(processor, part, None)
        if sub is not None and hasattr(sub, "save_pretrained"):
            sub.save_pretrained(str(out))
    document = coord_tokens_document(tokenizer)
    (out / COORD_TOKENS_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    copied = _copy_other_files(src, out)
    give_umask_modes(out)  # safetensors writes 0600
    _verify_output(out, ids, resize.rows_after, tied, chat_template)
    return ExpansionReport(
        source=src,
        output=out,
        dtype=dtype,
        tokens_before=tokens_before,
        tokens_after=tokens_after,
        embedding_rows_before=resize.embedding_rows_before,
        head_rows_before=resize.head_rows_before,
        rows_after=resize.rows_after,
        mean_source_rows=resize.mean_source_rows,
        tied=tied,
        wildcard_id=ids[0],
        coord_ids=tuple(ids[1:]),
        copied_files=copied,
    )
