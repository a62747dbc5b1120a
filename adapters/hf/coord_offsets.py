"""The coord-offset adapter (``training.coord_offset``, stage1.md §7): train only the coord rows.

A ``coord_offset_adapter`` sub-module at the model root holds ``coord_ids`` (the 1000 coord ids,
sorted; never the wildcard), ``embed_offset`` [1000, hidden] and, when ``tie_head`` is false,
``head_offset`` [1000, head hidden]; both start at zero. Forward hooks on the model's input embedding
and output head add them OUT OF PLACE:

- embedding output at a coord id ``c`` gets ``+ embed_offset[row(c)]`` (``row`` = position in the
  sorted ids, found by binary search); every other position is returned bit-identical, and the
  offset still enters the graph (``torch.where``), so its gradient is zeros, never None, and DDP
  without unused-parameter search never trips;
- head output gets ``logits[..., c] += h · offset[row(c)]`` at the 1000 coord columns only
  (``index_add``), with ``offset = embed_offset`` when tied, else ``head_offset``.

The base embedding and head weights are frozen (their gradient stays None). The hooks do not hold
the offsets: they call the module found at ``<root>.coord_offset_adapter`` at forward time, so after
PEFT wraps it in ``modules_to_save`` the ACTIVE copy is used. :func:`attach_coord_offset_hooks`
removes every hook this module registered and re-attaches to the active embedding / head modules;
call it after any wrapping (stage1.md §10 pitfall 15).

Persistence: the adapter is an ordinary sub-module, so ``save_pretrained`` / the trainer's checkpoint
state carry ``coord_offset_adapter.*`` (PEFT: list ``coord_offset_adapter`` in ``modules_to_save``);
:func:`restore_coord_offsets` reloads them into an installed adapter. :func:`merge_coord_offsets`
bakes them into the base tables (export).

Engine integration (adapters/swift/stage1.py), two lines:
    after ``freeze(model, training)``:   ``setup_coord_offsets(model, coord_table, training)``
    optimizer:  ``groups = coord_offset_param_groups(model, training, optimizer_groups(model, training))``
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from adapters.hf.vocab import shares_storage
from domain.coord_tokens import NUM_BINS, CoordIdTable
from domain.errors import ArtifactError, SetupError
from ports.training import TrainerSettings

COORD_OFFSET_MODULE = "coord_offset_adapter"
_OFFSET_NAMES = ("embed_offset", "head_offset")

OFFSET_DTYPES: Mapping[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "single": torch.float32,
}


class CoordOffsetAdapter(nn.Module):
    """Zero-initialised offsets for the coord rows of the input embedding and (untied) the head."""

    coord_ids: torch.Tensor

    def __init__(
        self,
        coord_ids: Sequence[int],
        hidden_size: int,
        *,
        tie_head: bool,
        head_hidden_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        ids = sorted(int(i) for i in coord_ids)
        if len(ids) != NUM_BINS or len(set(ids)) != NUM_BINS:
            raise SetupError(f"coord offsets need {NUM_BINS} distinct coord ids, got {len(set(ids))}")
        self.tie_head = bool(tie_head)
        self.register_buffer("coord_ids", torch.tensor(ids, dtype=torch.long, device=device))
        self.embed_offset = nn.Parameter(torch.zeros(NUM_BINS, hidden_size, dtype=dtype, device=device))
        self.head_offset: nn.Parameter | None
        if self.tie_head:
            self.head_offset = None
        else:
            width = hidden_size if head_hidden_size is None else head_hidden_size
            self.head_offset = nn.Parameter(torch.zeros(NUM_BINS, width, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"coord_ids={NUM_BINS}, tie_head={self.tie_head}, dtype={self.embed_offset.dtype}"

    @property
    def head_table(self) -> torch.Tensor:
        """The offset added to the head: ``embed_offset`` when tied, else ``head_offset``."""
        if self.tie_head or self.head_offset is None:
            return self.embed_offset
        return self.head_offset

    def forward(self, kind: str, primary: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``kind`` ``"embed"``: ``primary`` = input ids; ``"head"``: ``primary`` = hidden states."""
        if kind == "embed":
            return self.embed(primary, output)
        if kind == "head":
            return self.head(primary, output)
        raise ValueError(f"unknown coord offset hook kind {kind!r}")

    def embed(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        ids = self.coord_ids
        query = input_ids.to(ids.device).contiguous()
        row = torch.searchsorted(ids, query).clamp(max=NUM_BINS - 1)
        hit = (ids[row] == query).to(embeddings.device)
        shifted = embeddings + self.embed_offset.to(embeddings.dtype)[row.to(embeddings.device)]
        # The offset takes part even where nothing is hit: its gradient is zeros, not None.
        return torch.where(hit.unsqueeze(-1), shifted, embeddings)

    def head(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        offset = self.head_table.to(device=logits.device, dtype=logits.dtype)
        delta = hidden.to(logits.dtype) @ offset.T
        return logits.index_add(logits.dim() - 1, self.coord_ids.to(logits.device), delta)


class _OffsetHook:
    """A forward hook that routes the module's output through the live ``coord_offset_adapter``."""

    def __init__(self, kind: str, holder: nn.Module) -> None:
        self.kind = kind
        self.holder = holder

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        primary = args[0] if args else kwargs.get("input")
        if not isinstance(primary, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise SetupError(
                f"coord offset {self.kind} hook on {type(module).__name__}: expected tensor input and output, "
                f"got {type(primary).__name__} -> {type(output).__name__}"
            )
        adapter = getattr(self.holder, COORD_OFFSET_MODULE)
        result = adapter(self.kind, primary, output)
        assert isinstance(result, torch.Tensor)
        return result


# --------------------------------------------------------------------------------------------------
# Locating things


def _tables(model: Any) -> tuple[nn.Module, nn.Module]:
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError) as exc:
        raise SetupError(f"coord offsets: the input-embedding module was not found: {exc}") from exc
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError) as exc:
        raise SetupError(f"coord offsets: the LM-head module was not found: {exc}") from exc
    if not isinstance(embedding, nn.Module) or getattr(embedding, "weight", None) is None:
        raise SetupError("coord offsets: the input-embedding module was not found (get_input_embeddings)")
    if not isinstance(head, nn.Module) or getattr(head, "weight", None) is None:
        raise SetupError("coord offsets: the LM-head module was not found (get_output_embeddings)")
    return embedding, head


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The base weight of an embedding / head, also behind a PEFT wrapper (``original_module``/``base_layer``)."""
    for name in ("original_module", "base_layer"):
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module) and isinstance(getattr(inner, "weight", None), torch.Tensor):
            return _base_weight(inner)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise SetupError(f"coord offsets: {type(module).__name__} has no weight tensor")
    return weight


def _holders(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if COORD_OFFSET_MODULE in m._modules]


def _holder(model: nn.Module) -> nn.Module:
    found = _holders(model)
    if not found:
        raise SetupError(f"coord offsets: no '{COORD_OFFSET_MODULE}' module found in the model")
    if len(found) > 1:
        raise SetupError(f"coord offsets: {len(found)} '{COORD_OFFSET_MODULE}' modules found; expected one")
    return found[0]


def active_adapter(model: nn.Module) -> CoordOffsetAdapter:
    """The adapter copy the forward uses: the module itself, or PEFT's active ``modules_to_save`` copy."""
    module = getattr(_holder(model), COORD_OFFSET_MODULE)
    if isinstance(module, CoordOffsetAdapter):
        return module
    copies = getattr(module, "modules_to_save", None)
    disabled = bool(getattr(module, "disable_adapters", False))
    names = list(getattr(module, "active_adapters", []) or [])
    if isinstance(copies, (Mapping, nn.ModuleDict)):
        if disabled or not names:
            original = getattr(module, "original_module", None)
            if isinstance(original, CoordOffsetAdapter):
                return original
        elif names[0] in copies and isinstance(copies[names[0]], CoordOffsetAdapter):
            active = copies[names[0]]
            assert isinstance(active, CoordOffsetAdapter)
            return active
    raise SetupError(
        f"coord offsets: '{COORD_OFFSET_MODULE}' is a {type(module).__name__} whose active copy could not be found"
    )


# --------------------------------------------------------------------------------------------------
# Install, hooks


def offset_dtype(setting: str | None, embedding_dtype: torch.dtype) -> torch.dtype:
    """``training.coord_offset.dtype``: null / auto -> the embedding dtype."""
    if setting is None or setting == "auto":
        return embedding_dtype
    if setting not in OFFSET_DTYPES:
        raise SetupError(
            f"training.coord_offset.dtype: expected one of {sorted(OFFSET_DTYPES)}, got {setting!r}"
        )
    return OFFSET_DTYPES[setting]


def install_coord_offsets(
    model: nn.Module,
    coord_ids: CoordIdTable | Sequence[int],
    *,
    tie_head: bool = True,
    dtype: str | None = None,
) -> CoordOffsetAdapter:
    """Freeze the base embedding and head, add ``coord_offset_adapter`` at the root, attach the hooks.

    Call BEFORE PEFT wrapping. Setup errors: either module missing; ``tie_head`` with an embedding
    width different from the head's input width; a coord id outside either table; installed twice.
    """
    if _holders(model):
        raise SetupError(f"coord offsets: '{COORD_OFFSET_MODULE}' is already installed")
    ids = list(coord_ids.ids) if isinstance(coord_ids, CoordIdTable) else [int(i) for i in coord_ids]
    embedding, head = _tables(model)
    embed_weight, head_weight = _base_weight(embedding), _base_weight(head)
    hidden, head_hidden = int(embed_weight.shape[1]), int(head_weight.shape[1])
    if tie_head and hidden != head_hidden:
        raise SetupError(
            f"training.coord_offset.tie_head: true needs the embedding width ({hidden}) to equal the head's "
            f"input width ({head_hidden}); set tie_head: false"
        )
    limit = min(int(embed_weight.shape[0]), int(head_weight.shape[0]))
    if ids and max(ids) >= limit:
        raise SetupError(
            f"coord offsets: coord id {max(ids)} is outside the embedding ({embed_weight.shape[0]} rows) or "
            f"head ({head_weight.shape[0]} rows)"
        )
    for module in (embedding, head):
        for param in module.parameters():
            param.requires_grad_(False)
    adapter = CoordOffsetAdapter(
        ids,
        hidden,
        tie_head=tie_head,
        head_hidden_size=head_hidden,
        dtype=offset_dtype(dtype, embed_weight.dtype),
        device=embed_weight.device,
    )
    model.add_module(COORD_OFFSET_MODULE, adapter)
    attach_coord_offset_hooks(model)
    return adapter


def remove_coord_offset_hooks(model: nn.Module) -> int:
    """Remove every forward hook this module registered anywhere in ``model``; returns how many."""
    removed = 0
    for module in model.modules():
        keys = [key for key, hook in module._forward_hooks.items() if isinstance(hook, _OffsetHook)]
        for key in keys:
            module._forward_hooks.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
        removed += len(keys)
    return removed


def attach_coord_offset_hooks(model: nn.Module) -> None:
    """(Re-)attach the two hooks to the ACTIVE input embedding and LM head of ``model``.

    Removes the previous hooks first. Call after every wrapping (PEFT, ...). Setup error when the
    adapter, its active copy, or either module cannot be found.
    """
    holder = _holder(model)
    active_adapter(model)  # the active copy must resolve now, not at the first forward
    remove_coord_offset_hooks(model)
    embedding, head = _tables(model)
    embedding.register_forward_hook(_OffsetHook("embed", holder), with_kwargs=True)
    head.register_forward_hook(_OffsetHook("head", holder), with_kwargs=True)


def coord_offset_hook_count(model: nn.Module) -> int:
    """How many coord-offset hooks are attached (2 after a successful attach)."""
    return sum(isinstance(h, _OffsetHook) for m in model.modules() for h in m._forward_hooks.values())


def setup_coord_offsets(
    model: nn.Module, coord_ids: CoordIdTable, training: TrainerSettings
) -> CoordOffsetAdapter | None:
    """The engine's one call: install per ``training.coord_offset`` when enabled, else nothing."""
    settings = training.coord_offset
    if not settings.enabled:
        return None
    return install_coord_offsets(model, coord_ids, tie_head=bool(settings.tie_head), dtype=settings.dtype)


# --------------------------------------------------------------------------------------------------
# Optimizer groups (stage1.md §7.2)


def trainable_offsets(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable offset parameters by name (``requires_grad`` selects PEFT's trainable copy)."""
    found: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or COORD_OFFSET_MODULE not in name.split("."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in _OFFSET_NAMES:
            continue
        if leaf in found:
            raise SetupError(f"coord offsets: two trainable '{leaf}' parameters (e.g. {name})")
        found[leaf] = param
    return found


def coord_offset_param_groups(
    model: nn.Module, training: TrainerSettings, base_groups: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """stage1.md §7.2: offset groups first (embed; head when untied), then ``base_groups`` minus offsets.

    ``base_groups`` are the engine's vision / aligner / LLM groups (3). Every trainable parameter must
    appear exactly once across the result (identity), else :class:`SetupError` at setup.
    """
    settings = training.coord_offset
    groups: list[dict[str, Any]] = []
    if settings.enabled:
        offsets = trainable_offsets(model)
        adapter = active_adapter(model)
        if "embed_offset" not in offsets:
            raise SetupError(
                f"coord offsets: no trainable embed_offset (under PEFT list '{COORD_OFFSET_MODULE}' in modules_to_save)"
            )
        lr = float(training.learning_rate)
        wd = float(settings.weight_decay)
        embed_lr = float(settings.embed_lr) if settings.embed_lr is not None else lr
        groups.append(
            {
                "params": [offsets["embed_offset"]],
                "lr": embed_lr,
                "weight_decay": wd,
                "name": "coord_offset_embed",
            }
        )
        if not adapter.tie_head:
            if "head_offset" not in offsets:
                raise SetupError("coord offsets: tie_head is false but no trainable head_offset was found")
            head_lr = float(settings.head_lr) if settings.head_lr is not None else lr
            groups.append(
                {
                    "params": [offsets["head_offset"]],
                    "lr": head_lr,
                    "weight_decay": wd,
                    "name": "coord_offset_head",
                }
            )
    taken = {id(p) for g in groups for p in g["params"]}
    for group in base_groups:
        params = [p for p in group["params"] if id(p) not in taken]
        if params:
            groups.append({**dict(group), "params": params})
    check_optimizer_coverage(model, groups)
    return groups


def check_optimizer_coverage(model: nn.Module, groups: Sequence[Mapping[str, Any]]) -> None:
    """Every trainable parameter appears in exactly one group, once (stage1.md §6.2)."""
    counts: dict[int, int] = {}
    for group in groups:
        for param in group["params"]:
            counts[id(param)] = counts.get(id(param), 0) + 1
    missing: list[str] = []
    twice: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        seen = counts.get(id(param), 0)
        if seen == 0:
            missing.append(name)
        elif seen > 1:
            twice.append(name)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} trainable parameters missing from the optimizer groups (e.g. {missing[:3]})"
        )
    if twice:
        problems.append(f"{len(twice)} parameters present more than once (e.g. {twice[:3]})")
    if problems:
        raise SetupError("optimizer groups: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# Persistence and export


def coord_offset_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's tensors: ``coord_ids``, ``embed_offset`` and (untied) ``head_offset``."""
    adapter = active_adapter(model)
    state = {
        "coord_ids": adapter.coord_ids.detach().cpu(),
        "embed_offset": adapter.embed_offset.detach().cpu(),
    }
    if adapter.head_offset is not None:
        state["head_offset"] = adapter.head_offset.detach().cpu()
    return state


def _stored_offsets(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                parts = key.split(".")
                if COORD_OFFSET_MODULE in parts and parts[-1] in ("coord_ids", *_OFFSET_NAMES):
                    if parts[-1] in found:
                        raise ArtifactError(
                            f"{directory}: '{parts[-1]}' of the coord offsets is stored twice"
                        )
                    found[parts[-1]] = handle.get_tensor(key)
    return found


def stored_coord_offsets(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The offset tensors a checkpoint directory stores, by leaf name (``coord_ids``, ``embed_offset`` and,
    untied, ``head_offset``); empty when it stores none. Installing before a load needs their layout."""
    return _stored_offsets(Path(directory))


def restore_coord_offsets(model: nn.Module, directory: str | os.PathLike[str]) -> CoordOffsetAdapter:
    """Load the offsets of a checkpoint directory (``*.safetensors`` keys under ``coord_offset_adapter``)
    into the installed, active adapter; the stored coord ids must equal the adapter's."""
    where = Path(directory)
    adapter = active_adapter(model)
    stored = _stored_offsets(where)
    if "embed_offset" not in stored:
        raise ArtifactError(f"{where}: no '{COORD_OFFSET_MODULE}.embed_offset' tensor in the checkpoint")
    if "coord_ids" in stored and not torch.equal(stored["coord_ids"].cpu(), adapter.coord_ids.cpu()):
        raise ArtifactError(f"{where}: the stored coord ids differ from this tokenizer's coord ids")
    if (adapter.head_offset is None) != ("head_offset" not in stored):
        raise ArtifactError(
            f"{where}: tie_head mismatch: checkpoint {'has' if 'head_offset' in stored else 'lacks'} a head_offset, "
            f"the configured adapter has tie_head={adapter.tie_head}"
        )
    with torch.no_grad():
        adapter.embed_offset.copy_(stored["embed_offset"])
        if adapter.head_offset is not None:
            adapter.head_offset.copy_(stored["head_offset"])
    return adapter


@attrs.frozen
class MergeReport:
    tie_head: bool
    tied_before: bool
    tied_after: bool


def merge_coord_offsets(model: nn.Module) -> MergeReport:
    """Bake the active offsets into the base tables, remove hooks and adapter (stage1.md §7.1 export).

    Merged embedding row = base + embed_offset; merged head row = base head row + (embed_offset when
    ``tie_head`` else head_offset). A shared (tied) table with ``tie_head`` gets the offset once and
    stays tied; with ``tie_head: false`` the head becomes its own tensor and both
    ``tie_word_embeddings`` flags turn false. Call on an unwrapped model (PEFT merged and unloaded).
    """
    adapter = active_adapter(model)
    embedding, head = _tables(model)
    embed_weight, head_weight = embedding.weight, head.weight
    assert isinstance(embed_weight, torch.Tensor) and isinstance(head_weight, torch.Tensor)
    tied_before = shares_storage(embed_weight, head_weight)
    rows = adapter.coord_ids.to(embed_weight.device)
    with torch.no_grad():
        embed_delta = adapter.embed_offset.detach().to(device=embed_weight.device, dtype=embed_weight.dtype)
        head_delta = adapter.head_table.detach().to(device=head_weight.device, dtype=head_weight.dtype)
        if tied_before and not adapter.tie_head:
            separate = head_weight.detach().clone()
            separate.index_add_(0, rows.to(separate.device), head_delta)
            head.weight = nn.Parameter(separate, requires_grad=head_weight.requires_grad)
            embed_weight.index_add_(0, rows, embed_delta)
            _set_tied(model, False)
        else:
            embed_weight.index_add_(0, rows, embed_delta)
            if not tied_before:
                head_weight.index_add_(0, rows.to(head_weight.device), head_delta)
    remove_coord_offset_hooks(model)
    delattr(_holder(model), COORD_OFFSET_MODULE)
    after_embedding, after_head = _tables(model)
    tied_after = shares_storage(after_embedding.weight, after_head.weight)
    return MergeReport(tie_head=adapter.tie_head, tied_before=tied_before, tied_after=tied_after)


def _set_tied(model: Any, tied: bool) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    config.tie_word_embeddings = tied
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        text.tie_word_embeddings = tied
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def describe_offsets(model: nn.Module) -> str:
    """One line for logs: sizes, dtype, tying and the norm of the offsets."""
    adapter = active_adapter(model)
    parts = {
        "tie_head": adapter.tie_head,
        "dtype": str(adapter.embed_offset.dtype).replace("torch.", ""),
        "embed_norm": float(adapter.embed_offset.detach().float().norm()),
    }
    if adapter.head_offset is not None:
        parts["head_norm"] = float(adapter.head_offset.detach().float().norm())
    return json.dumps(parts, sort_keys=True)
