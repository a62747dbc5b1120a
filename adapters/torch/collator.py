"""Collation of encoded samples into torch batches: padded rows and packed rows (data.md §8.3-§8.5).

Attention isolation inside a packed row (why no mask is passed)
---------------------------------------------------------------
A packed row is one sequence of batch dimension 1 with NO ``attention_mask`` and 4-row
``position_ids`` ``[text; t; h; w]`` whose text row restarts at 0 for every member. In transformers
5.19, ``Qwen3VLTextModel.forward`` splits off the text row and hands it to ``create_causal_mask``;
with ``attention_mask=None`` and no cache, ``masking_utils._preprocess_mask_arguments`` calls
``find_packed_sequence_indices`` on it (a new sequence wherever a position is not previous + 1) and
ANDs the causal mask with "same sequence", so the stock ``eager`` and ``sdpa`` paths build a
block-diagonal causal mask from the position ids alone. ``flash_attention_2`` gets the text row as
``position_ids`` in the attention kwargs and derives ``cu_seq_lens`` from it
(``_is_packed_sequence`` / ``prepare_fa_kwargs_from_position_ids``: indices where the row equals
its minimum, 0). So no 4D mask is needed and no upstream file is patched; the packed-vs-alone
logits test (tests/adapters/test_collator.py) proves it for eager and sdpa.

One trap: the packed-sequence detection is skipped whenever ``past_key_values`` is not None, and
``Qwen3VLTextModel.forward`` creates a ``DynamicCache`` by itself when ``use_cache`` is true (the
config default, also in training mode). The members would then silently attend to each other.
Every collated batch therefore carries ``use_cache=False``, and :func:`check_packed_inputs` (for the
trainer to call before the forward) rejects a packed row without it.

``cu_seq_lens`` are computed here (:attr:`StepBatch.cu_seq_lens`) and checked against the text row,
but they are NOT put into the model inputs: ``Qwen3VLModel.forward`` forwards its ``**kwargs`` to
the vision tower as well, whose flash path passes its own ``cu_seq_lens_q`` (a duplicate keyword)
and whose other paths would receive a boundary list that is not theirs.

Padded batches pass an ``attention_mask`` and the same 4-row ``position_ids`` (each row from the
same rope-index function), so a padded row and a packed member see identical positions. With an
``attention_mask`` present transformers never looks for packed sequences.

Side data (the batch extras of stage1.md §4.1) travel beside the model inputs in
:class:`StepBatch`; the flat mapping handed to a trainer carries them under their registered keys,
and :func:`adapters.torch.step_context.pop_step_context` removes them (and ``labels``) before the
forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import numpy as np
import torch

from domain.batch_extras import (
    DATASET_LABELS,
    DATASET_SEGMENTS,
    INSTABILITY_META_JSON,
    LABELS_KEY,
    PACK_NUM_SAMPLES,
    TOKEN_TYPES,
    SampleMeta,
    instability_meta_json,
    packed_row_dataset_label,
)
from domain.coordjson import render_typed
from domain.errors import BestEffortDiagnostics, InvariantViolation, SetupError, StepError
from domain.objects import CoordMode, DetObject, FieldOrder
from domain.packing import boundaries_from_text_row, cu_seq_lens, mrope_position_rows, packed_position_ids
from domain.token_types import (
    DatasetFilter,
    TypedSample,
    TypingStatus,
    dataset_label,
    ignore_row,
    packed_types_row,
    padded_types_row,
    type_sample,
)
from ports.tokenizer import IGNORE_INDEX, EncodedSample

logger = logging.getLogger(__name__)

RopeIndex = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(input_ids int64 ``[l]``, image_grid_thw int64 ``[n, 3]`` or None) -> int64 ``[3, l]`` starting at 0."""


# ---------------------------------------------------------------------------------------------
# mRoPE rows of one sample


def reference_rope_index(vision_token_id: int, spatial_merge_size: int) -> RopeIndex:
    """The rule of data.md §8.4 as written (pure numpy in :mod:`domain.packing`)."""

    def rope(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        grids = np.zeros((0, 3), dtype=np.int64) if image_grid_thw is None else image_grid_thw.cpu().numpy()
        rows = mrope_position_rows(input_ids.cpu().numpy(), vision_token_id, grids, spatial_merge_size)
        return torch.from_numpy(rows)

    return rope


class _RopeIndexHost:
    """Runs the model's own ``get_rope_index`` with only its config (no weights), so the function can
    travel to dataloader workers. ``get_rope_index`` reads ``self.config`` and calls
    ``self.get_vision_position_ids``; nothing else of the module."""

    def __init__(self, owner_cls: Any, config: Any) -> None:
        self._cls = owner_cls
        self.config = config
        self.image_token_id = int(config.image_token_id)
        video = getattr(config, "video_token_id", None)
        self.video_token_id = None if video is None else int(video)

    def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = self._cls.get_vision_position_ids(self, *args, **kwargs)
        return out

    def __call__(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        ids = input_ids.reshape(1, -1).to(torch.int64)
        mm = torch.zeros_like(ids)
        mm[ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            mm[ids == self.video_token_id] = 2
        if image_grid_thw is None or image_grid_thw.numel() == 0:
            n = ids.shape[1]
            return torch.arange(n, dtype=torch.int64).expand(3, n).clone()
        # transformers' get_rope_index returns (position_ids, mrope_position_deltas)
        rope: tuple[torch.Tensor, torch.Tensor] = self._cls.get_rope_index(
            self, ids, mm_token_type_ids=mm, image_grid_thw=image_grid_thw.to(torch.int64)
        )
        return rope[0][:, 0].to(torch.int64)


def model_rope_index(model: torch.nn.Module) -> RopeIndex:
    """The model's own rope-index function (e.g. ``Qwen3VLModel.get_rope_index``) for one sample."""
    owner = next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)
    if owner is None:
        raise SetupError(
            f"{type(model).__name__} has no submodule with get_rope_index; packing with mRoPE needs a "
            "Qwen-VL style model"
        )
    return _RopeIndexHost(type(owner), owner.config)


# ---------------------------------------------------------------------------------------------
# Batch value objects


@attrs.frozen(eq=False)
class TrainItem:
    """An encoded sample plus the objects its target was rendered from (for token types, stage1.md §2)."""

    sample: EncodedSample
    objects: tuple[DetObject, ...] | None = None


Member = EncodedSample | TrainItem


def _unwrap(member: Member) -> TrainItem:
    return member if isinstance(member, TrainItem) else TrainItem(member)


@attrs.frozen(eq=False)
class StepBatch:
    """One collated micro-batch: what the model consumes, the labels, and the side data.

    ``model_inputs`` never holds an extra nor ``labels``. ``cu_seq_lens`` / ``max_length`` describe a
    packed row's members (int32 ``[members + 1]``; None when padded); they equal what the model
    derives from the text row of ``position_ids`` and are not model inputs (see module docstring).
    """

    model_inputs: dict[str, Any]
    labels: torch.Tensor
    extras: dict[str, Any]
    packed: bool
    cu_seq_lens: torch.Tensor | None = None
    max_length: int | None = None

    def as_mapping(self) -> dict[str, Any]:
        """The flat mapping a trainer's collator returns: model inputs, ``labels`` and present extras."""
        out: dict[str, Any] = dict(self.model_inputs)
        out[LABELS_KEY] = self.labels
        out.update({k: v for k, v in self.extras.items() if v is not None})
        return out


def check_packed_position_ids(position_ids: torch.Tensor, seq_len: int) -> None:
    """A packed row needs ``[4, 1, T]`` position ids; a 3-row tensor would let members attend to each other."""
    if position_ids.ndim != 3 or position_ids.shape[0] != 4 or position_ids.shape[1] != 1:
        raise StepError(
            f"packed row: position_ids must have shape [4, 1, {seq_len}] ([text; t; h; w]); got "
            f"{list(position_ids.shape)} (a 3-row tensor cannot mark member boundaries, data.md §8.4)"
        )
    if position_ids.shape[2] != seq_len:
        raise StepError(f"packed row: position_ids length {position_ids.shape[2]} != input length {seq_len}")


def check_packed_inputs(inputs: Mapping[str, Any]) -> None:
    """What the forward of a packed row must receive (data.md §8.3-§8.5); the trainer asserts it.

    4-row position ids ``[4, 1, T]``, no ``attention_mask`` (it would switch off the detection of
    member boundaries from the text row), and ``use_cache=False`` (a cache switches it off too).
    """
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1:
        raise StepError(f"packed row: input_ids must have shape [1, T]; got {getattr(ids, 'shape', None)}")
    position_ids = inputs.get("position_ids")
    if not isinstance(position_ids, torch.Tensor):
        raise StepError("packed row: position_ids are missing; members would attend to each other")
    check_packed_position_ids(position_ids, int(ids.shape[1]))
    if inputs.get("attention_mask") is not None:
        raise StepError("packed row: an attention_mask is passed; packed rows carry none (data.md §8.3)")
    if inputs.get("use_cache") is not False:
        raise StepError(
            "packed row: use_cache must be False; with a cache transformers does not separate the members"
        )


# ---------------------------------------------------------------------------------------------
# Base collation


def _as_long(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.int64).reshape(-1)


def _grid(sample: EncodedSample) -> torch.Tensor | None:
    if sample.image_grid_thw is None:
        return None
    grid = torch.as_tensor(np.asarray(sample.image_grid_thw), dtype=torch.int64).reshape(-1, 3)
    return grid if grid.numel() else None


def _member_rope_rows(sample: EncodedSample, ids: torch.Tensor, rope_index: RopeIndex) -> np.ndarray:
    """The ``[3, l]`` mRoPE rows of one sample alone (they start at 0)."""
    rows = rope_index(ids, _grid(sample))
    if tuple(rows.shape) != (3, ids.shape[0]):
        raise InvariantViolation(
            f"{sample.source}:{sample.line}: rope index returned shape {list(rows.shape)}, "
            f"expected [3, {ids.shape[0]}]"
        )
    return rows.detach().to(torch.int64).cpu().numpy()


def _positions(members: Sequence[tuple[EncodedSample, torch.Tensor]], rope_index: RopeIndex) -> torch.Tensor:
    """``[4, T]`` position rows of members laid end to end; the domain owns the rule (data.md §8.4)."""
    rows = [_member_rope_rows(s, i, rope_index) for s, i in members]
    return torch.from_numpy(packed_position_ids(rows))


def _sample_positions(sample: EncodedSample, ids: torch.Tensor, rope_index: RopeIndex) -> torch.Tensor:
    return _positions([(sample, ids)], rope_index)


def _vision_inputs(samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
    pixels = [torch.as_tensor(np.asarray(s.pixel_values)) for s in samples if s.pixel_values is not None]
    grids = [g for g in (_grid(s) for s in samples) if g is not None]
    out: dict[str, torch.Tensor] = {}
    if pixels:
        out["pixel_values"] = torch.cat(pixels, dim=0)
    if grids:
        out["image_grid_thw"] = torch.cat(grids, dim=0)
    return out


def _check_member(sample: EncodedSample, ids: torch.Tensor, labels: torch.Tensor) -> None:
    if ids.shape != labels.shape:
        raise InvariantViolation(
            f"{sample.source}:{sample.line}: input_ids length {ids.shape[0]} != labels length {labels.shape[0]}"
        )
    if int(sample.length) != ids.shape[0]:
        raise InvariantViolation(
            f"{sample.source}:{sample.line}: recorded length {sample.length} != len(input_ids) {ids.shape[0]}"
        )


def collate_padded(samples: Sequence[EncodedSample], pad_id: int, rope_index: RopeIndex) -> StepBatch:
    """Rows padded on the right with ``pad_id``, labels -100, an ``attention_mask`` and 4-row positions."""
    if not samples:
        raise InvariantViolation("cannot collate an empty batch")
    ids = [_as_long(s.input_ids) for s in samples]
    labels = [_as_long(s.labels) for s in samples]
    for s, i, lab in zip(samples, ids, labels):
        _check_member(s, i, lab)
    width = max(i.shape[0] for i in ids)
    batch = len(samples)
    input_ids = torch.full((batch, width), int(pad_id), dtype=torch.int64)
    label_rows = torch.full((batch, width), IGNORE_INDEX, dtype=torch.int64)
    attention = torch.zeros((batch, width), dtype=torch.int64)
    positions = torch.zeros((4, batch, width), dtype=torch.int64)
    for b, (s, i, lab) in enumerate(zip(samples, ids, labels)):
        n = i.shape[0]
        input_ids[b, :n] = i
        label_rows[b, :n] = lab
        attention[b, :n] = 1
        pos = _sample_positions(s, i, rope_index)
        positions[:, b, :n] = pos
        # padding continues every row past its maximum; masked out, so any value would do
        positions[:, b, n:] = pos.max(dim=1, keepdim=True).values + torch.arange(1, width - n + 1)
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": positions,
        "use_cache": False,
    }
    inputs.update(_vision_inputs(samples))
    return StepBatch(inputs, label_rows, {}, packed=False)


def collate_packed(samples: Sequence[EncodedSample], rope_index: RopeIndex) -> StepBatch:
    """One row (batch dimension 1): members concatenated, no padding, no attention mask (data.md §8.3-§8.5)."""
    if not samples:
        raise InvariantViolation("cannot collate an empty pack")
    ids = [_as_long(s.input_ids) for s in samples]
    labels = [_as_long(s.labels) for s in samples]
    for k, (s, i, lab) in enumerate(zip(samples, ids, labels)):
        _check_member(s, i, lab)
        if int(lab[0]) != IGNORE_INDEX:
            # the shifted target of the previous member's last token would cross the boundary
            raise InvariantViolation(
                f"pack member {k} ({s.source}:{s.line}): its first label is {int(lab[0])}, must be "
                f"{IGNORE_INDEX} (every member starts with unsupervised prompt tokens, data.md §8.5)"
            )
    lengths = [int(i.shape[0]) for i in ids]
    positions = _positions(list(zip(samples, ids)), rope_index)[:, None, :]
    total = sum(lengths)
    check_packed_position_ids(positions, total)
    cu = torch.from_numpy(cu_seq_lens(lengths))
    derived = boundaries_from_text_row(positions[0, 0].numpy())
    if not np.array_equal(derived, cu.numpy()):
        raise InvariantViolation(f"member boundaries {derived.tolist()} from the text row != {cu.tolist()}")
    inputs: dict[str, Any] = {
        "input_ids": torch.cat(ids)[None],
        "position_ids": positions,
        "use_cache": False,
    }
    inputs.update(_vision_inputs(samples))
    check_packed_inputs(inputs)
    return StepBatch(
        inputs, torch.cat(labels)[None], {}, packed=True, cu_seq_lens=cu, max_length=max(lengths)
    )


# ---------------------------------------------------------------------------------------------
# Token types (stage1.md §2)


class TokenTyper(Protocol):
    def __call__(self, sample: EncodedSample, objects: Sequence[DetObject] | None) -> TypedSample: ...


EncodeWithOffsets = Callable[[str], tuple[Sequence[int], Sequence[tuple[int, int]]]]


@attrs.define
class TargetTokenTyper:
    """Types one sample from the objects its target was rendered from (stage1.md §2.2-§2.4)."""

    encode_with_offsets: EncodeWithOffsets
    suffix_ids: tuple[int, ...]
    special_ids: frozenset[int]
    coord_ids: frozenset[int]
    field_order: FieldOrder = FieldOrder.DESC_FIRST
    coord_mode: CoordMode = CoordMode.TOKENS
    dataset_filter: DatasetFilter = attrs.field(factory=DatasetFilter)

    @classmethod
    def from_hf_tokenizer(
        cls,
        tokenizer: Any,
        *,
        coord_ids: Sequence[int],
        field_order: FieldOrder = FieldOrder.DESC_FIRST,
        coord_mode: CoordMode = CoordMode.TOKENS,
        dataset_filter: DatasetFilter | None = None,
        suffix: Sequence[str] = ("<|im_end|>",),
    ) -> TargetTokenTyper:
        """From a fast HF tokenizer: offsets via ``return_offsets_mapping``; specials = added special tokens."""

        def encode(text: str) -> tuple[list[int], list[tuple[int, int]]]:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

        specials = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        specials |= {int(i) for i in tokenizer.all_special_ids}
        suffix_ids = tuple(int(tokenizer.convert_tokens_to_ids(t)) for t in suffix)
        return cls(
            encode,
            suffix_ids,
            frozenset(specials),
            frozenset(int(i) for i in coord_ids),
            FieldOrder(field_order),
            CoordMode(coord_mode),
            dataset_filter or DatasetFilter(),
        )

    def __call__(self, sample: EncodedSample, objects: Sequence[DetObject] | None) -> TypedSample:
        labels = np.asarray(sample.labels, dtype=np.int64).reshape(-1)
        if not self.dataset_filter.admits(dataset_label(sample.source)):
            return TypedSample(ignore_row(labels.shape[0]), TypingStatus.EXCLUDED)
        if objects is None:
            return TypedSample(ignore_row(labels.shape[0]), TypingStatus.NO_OBJECTS)
        text, spans = render_typed(objects, self.field_order, self.coord_mode)
        ids, offsets = self.encode_with_offsets(text)
        return type_sample(
            labels,
            text_ids=ids,
            text_offsets=offsets,
            text_length=len(text),
            spans=spans,
            suffix_ids=self.suffix_ids,
            special_ids=self.special_ids,
            coord_ids=self.coord_ids,
            coord_mode=self.coord_mode,
        )


# ---------------------------------------------------------------------------------------------
# The project collator: base collation, then enrichers (stage1.md §4.2)


def _is_pack(element: object) -> bool:
    return isinstance(element, (list, tuple))


@attrs.define
class ProjectCollator:
    """Collates a raw batch (samples -> padded rows; one pack -> one packed row) and enriches it.

    Enrichers run in the order of stage1.md §4.2 (dataset meta, instability meta, token types) and
    are best-effort: a failing one leaves its keys absent, warns once and is switched off.
    ``max_meta_samples`` None means the instability monitor is off (no ``instability_meta_json``).
    """

    pad_id: int
    rope_index: RopeIndex
    token_typer: TokenTyper | None = None
    max_meta_samples: int | None = None
    diagnostics: BestEffortDiagnostics = attrs.field(factory=BestEffortDiagnostics)
    typing_failures: int = 0

    def __call__(self, raw: Sequence[Any]) -> dict[str, Any]:
        return self.collate(raw).as_mapping()

    def collate(self, raw: Sequence[Any]) -> StepBatch:
        if not raw:
            raise InvariantViolation("cannot collate an empty raw batch")
        if _is_pack(raw[0]):
            if not all(_is_pack(e) for e in raw):
                raise InvariantViolation("a raw batch mixes packs and single samples")
            if len(raw) != 1:
                raise SetupError(
                    f"packing needs one pack per micro-batch (training.per_device_train_batch_size: 1, "
                    f"data.md §8.1); got a raw batch of {len(raw)} packs"
                )
            rows = [[_unwrap(m) for m in raw[0]]]
            batch = collate_packed([m.sample for m in rows[0]], self.rope_index)
        else:
            rows = [[_unwrap(m)] for m in raw]
            batch = collate_padded([r[0].sample for r in rows], self.pad_id, self.rope_index)
        extras = batch.extras
        meta = self.diagnostics.run("dataset_meta", lambda: self._dataset_meta(batch, rows))
        if meta is not None:
            extras.update(meta)
        if self.max_meta_samples is not None:
            limit = self.max_meta_samples
            text = self.diagnostics.run("instability_meta", lambda: self._instability_meta(rows, limit))
            if text is not None:
                extras[INSTABILITY_META_JSON] = text
        if self.token_typer is not None:
            typer = self.token_typer
            types = self.diagnostics.run("token_types", lambda: self._token_types(batch, rows, typer))
            if types is not None:
                extras[TOKEN_TYPES] = types
        return batch

    @staticmethod
    def _dataset_meta(batch: StepBatch, rows: list[list[TrainItem]]) -> dict[str, Any]:
        labels = [packed_row_dataset_label([dataset_label(m.sample.source) for m in row]) for row in rows]
        if batch.packed:
            segments = [int(batch.labels.shape[1])]
        else:
            segments = [int(v) for v in batch.model_inputs["attention_mask"].sum(dim=1).tolist()]
        return {
            DATASET_LABELS: labels,
            DATASET_SEGMENTS: segments,
            PACK_NUM_SAMPLES: torch.tensor(
                [len(r) for r in rows], dtype=torch.int64, device=batch.labels.device
            ),
        }

    @staticmethod
    def _instability_meta(rows: list[list[TrainItem]], limit: int) -> str:
        return instability_meta_json(
            [
                [
                    SampleMeta(
                        dataset=dataset_label(m.sample.source),
                        source=m.sample.source,
                        line=int(m.sample.line),
                        sample_id=int(m.sample.record_index),
                        length=int(m.sample.length)
                        if m.sample.length
                        else len(np.asarray(m.sample.input_ids)),
                    )
                    for m in row
                ]
                for row in rows
            ],
            limit,
        )

    def _token_types(self, batch: StepBatch, rows: list[list[TrainItem]], typer: TokenTyper) -> torch.Tensor:
        width = int(batch.labels.shape[1])

        def member_types(item: TrainItem) -> np.ndarray | None:
            typed = typer(item.sample, item.objects)
            if typed.status is TypingStatus.ALIGNMENT_FAILURE:
                self.typing_failures += 1
                logger.debug(
                    "token types: alignment failure for %s:%s: %s",
                    item.sample.source,
                    item.sample.line,
                    typed.reason,
                )
                return None
            return typed.row

        if batch.packed:
            members = rows[0]
            lengths = [len(np.asarray(m.sample.labels).reshape(-1)) for m in members]
            if sum(lengths) != width:
                logger.debug(
                    "token types: member lengths %s do not add up to the packed row %d", lengths, width
                )
            out = packed_types_row([member_types(m) for m in members], lengths, width)[None]
        else:
            out = np.stack(
                [
                    padded_types_row(
                        member_types(r[0]), len(np.asarray(r[0].sample.labels).reshape(-1)), width
                    )
                    for r in rows
                ]
            )
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.int64)).to(batch.labels.device)
