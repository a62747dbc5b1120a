"""Collation on the tiny Qwen3-VL (data.md §8.3-§8.6 tests 45-47, stage1.md §2.5 / §4 tests 26-30, 40-41).

The "alone" reference of the equivalence tests is the model's stock path (input ids, attention
mask, ``mm_token_type_ids``, no position ids: the model computes its own mRoPE index), so the
packed row is checked against something the collator did not produce.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hf.checkpoint import LoadedCheckpoint, load_model_and_processor
from adapters.hf.encoding import HFSampleEncoder
from adapters.torch.collator import (
    ProjectCollator,
    StepBatch,
    TargetTokenTyper,
    TrainItem,
    check_packed_inputs,
    check_packed_position_ids,
    collate_packed,
    collate_padded,
    model_rope_index,
    reference_rope_index,
)
from adapters.torch.step_context import pop_step_context
from domain.batch_extras import (
    DATASET_LABELS,
    DATASET_SEGMENTS,
    EXTRA_KEYS,
    INSTABILITY_META_JSON,
    PACK_NUM_SAMPLES,
    TOKEN_TYPES,
)
from domain.coordjson import render
from domain.errors import InvariantViolation, SetupError, StepError
from domain.objects import DetObject, GeometryKind
from domain.prompts import PromptTexts
from domain.token_types import COORD, DESC, FORMAT, IGNORE, DatasetFilter, TypedSample, TypingStatus
from ports.tokenizer import ChatSample, EncodedPrompt, EncodedSample, SampleOrigin

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPT = PromptTexts(system="You are an object detector.", user="Detect every object in this image.")
# (width, height): merged grids 2x2, 3x2, 2x4, 4x3, 1x2, 5x3 (gh != gw exercises the h/w rows)
IMAGE_SIZES = [(64, 64), (96, 64), (64, 128), (128, 96), (32, 64), (160, 96)]
WORDS = ["cat", "dog", "black cat", "person", "café", 'a "b"', "red car", "x\\y"]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def _load(path: Path, attn: str) -> LoadedCheckpoint:
    loaded = load_model_and_processor(path, dtype="float32", attn_implementation=attn)
    loaded.model.eval()
    return loaded


@pytest.fixture(scope="module")
def eager(checkpoint_dir: Path) -> LoadedCheckpoint:
    return _load(checkpoint_dir, "eager")


@pytest.fixture(scope="module")
def sdpa(checkpoint_dir: Path) -> LoadedCheckpoint:
    return _load(checkpoint_dir, "sdpa")


@pytest.fixture(scope="module")
def encoder(eager: LoadedCheckpoint) -> HFSampleEncoder:
    return HFSampleEncoder(eager.processor, eager.tokenizer)


def _objects(rng: np.random.Generator, n: int) -> tuple[DetObject, ...]:
    out = []
    for _ in range(n):
        x1, y1 = sorted(rng.integers(0, 500, size=2).tolist())
        out.append(
            DetObject(
                str(rng.choice(WORDS)), GeometryKind.BBOX, (x1, y1, x1 + int(rng.integers(1, 400)), y1 + 300)
            )
        )
    return tuple(out)


@pytest.fixture(scope="module")
def pool(encoder: HFSampleEncoder, tmp_path_factory: pytest.TempPathFactory) -> list[TrainItem]:
    """Six encoded samples with images of different grids and 0-3 objects each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    items = []
    for k, (w, h) in enumerate(IMAGE_SIZES):
        path = root / f"img_{k}.png"
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path)
        objects = _objects(rng, k % 4)
        source = "/data/coco.jsonl" if k % 2 == 0 else "/data/LVIS.jsonl"
        chat = ChatSample(
            prompt=PROMPT,
            image_path=str(path),
            width=w,
            height=h,
            target=render(objects),
            origin=SampleOrigin(source=source, line=k + 1, record_index=k),
        )
        items.append(TrainItem(encoder.encode_sample(chat), objects))
    return items


@pytest.fixture(scope="module")
def typer(eager: LoadedCheckpoint) -> TargetTokenTyper:
    return TargetTokenTyper.from_hf_tokenizer(eager.processor.tokenizer, coord_ids=eager.coord_ids.ids)


def _collator(loaded: LoadedCheckpoint, **kwargs: Any) -> ProjectCollator:
    return ProjectCollator(
        pad_id=loaded.tokenizer.pad_id, rope_index=model_rope_index(loaded.model), **kwargs
    )


def _ids(sample: EncodedSample) -> list[int]:
    return np.asarray(sample.input_ids).tolist()


def _labels(sample: EncodedSample) -> list[int]:
    return np.asarray(sample.labels).tolist()


def _alone_logits(loaded: LoadedCheckpoint, sample: EncodedSample) -> torch.Tensor:
    """The model's stock path: it computes its own mRoPE positions from ``mm_token_type_ids``."""
    ids = torch.as_tensor(np.asarray(sample.input_ids))[None]
    with torch.no_grad():
        out = loaded.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=torch.as_tensor(np.asarray(sample.mm_token_type_ids))[None],
            pixel_values=torch.as_tensor(np.asarray(sample.pixel_values)),
            image_grid_thw=torch.as_tensor(np.asarray(sample.image_grid_thw)),
        )
    return out.logits[0]


def _forward(loaded: LoadedCheckpoint, batch: StepBatch) -> torch.Tensor:
    mapping = batch.as_mapping()
    pop_step_context(mapping)
    return loaded.model(**mapping).logits


# --- test 45: a pack of two ---------------------------------------------------------------------------


def test_pack_of_two_layout(eager: LoadedCheckpoint, pool: list[TrainItem]) -> None:
    a, b = pool[1].sample, pool[3].sample
    l1, l2 = a.length, b.length
    batch = collate_packed([a, b], model_rope_index(eager.model))
    inputs = batch.model_inputs
    assert "attention_mask" not in inputs and batch.packed
    pos = inputs["position_ids"]
    assert tuple(pos.shape) == (4, 1, l1 + l2) and pos.dtype == torch.int64
    assert pos[0, 0].tolist() == list(range(l1)) + list(range(l2))
    assert (pos[1:, 0, l1] == 0).all() and (pos[1:, 0, 0] == 0).all()
    assert batch.cu_seq_lens is not None and batch.cu_seq_lens.tolist() == [0, l1, l1 + l2]
    assert batch.max_length == max(l1, l2)
    assert inputs["input_ids"][0].tolist() == _ids(a) + _ids(b)
    assert batch.labels[0].tolist() == _labels(a) + _labels(b)
    assert batch.labels[0, 0] == -100 and batch.labels[0, l1] == -100
    assert inputs["image_grid_thw"].tolist() == np.concatenate([a.image_grid_thw, b.image_grid_thw]).tolist()
    pixels = np.concatenate([a.pixel_values, b.pixel_values])
    assert torch.equal(inputs["pixel_values"], torch.as_tensor(pixels))
    # each member's mRoPE rows are the model's own rope index of that sample alone
    for member, start, n in ((a, 0, l1), (b, l1, l2)):
        own, _ = eager.model.model.get_rope_index(
            torch.as_tensor(np.asarray(member.input_ids))[None],
            mm_token_type_ids=torch.as_tensor(np.asarray(member.mm_token_type_ids))[None],
            image_grid_thw=torch.as_tensor(np.asarray(member.image_grid_thw)),
        )
        assert torch.equal(pos[1:, 0, start : start + n], own[:, 0])


def test_member_with_a_supervised_first_label_is_rejected(
    pool: list[TrainItem], eager: LoadedCheckpoint
) -> None:
    s = pool[0].sample
    labels = np.asarray(s.labels).copy()
    labels[0] = int(np.asarray(s.input_ids)[0])
    bad = EncodedSample(
        s.input_ids,
        labels,
        s.length,
        s.pixel_values,
        s.image_grid_thw,
        s.mm_token_type_ids,
        s.prompt_length,
        s.record_index,
        s.line,
        s.source,
    )
    with pytest.raises(InvariantViolation, match=r"pack member 1 \(/data/coco.jsonl:1\).*first label"):
        collate_packed([pool[1].sample, bad], model_rope_index(eager.model))


def test_three_row_positions_under_packing_are_an_error() -> None:
    with pytest.raises(StepError, match=r"\[4, 1, 10\]"):
        check_packed_position_ids(torch.zeros(3, 1, 10, dtype=torch.int64), 10)
    check_packed_position_ids(torch.zeros(4, 1, 10, dtype=torch.int64), 10)


def test_packed_input_check(eager: LoadedCheckpoint, pool: list[TrainItem]) -> None:
    inputs = collate_packed([pool[0].sample, pool[1].sample], model_rope_index(eager.model)).model_inputs
    check_packed_inputs(inputs)
    with pytest.raises(StepError, match="3, 1"):
        check_packed_inputs({**inputs, "position_ids": inputs["position_ids"][1:]})
    with pytest.raises(StepError, match="attention_mask"):
        check_packed_inputs({**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])})
    with pytest.raises(StepError, match="use_cache"):
        check_packed_inputs({k: v for k, v in inputs.items() if k != "use_cache"})


def test_more_than_one_pack_per_micro_batch_is_refused(
    eager: LoadedCheckpoint, pool: list[TrainItem]
) -> None:
    with pytest.raises(SetupError, match="per_device_train_batch_size"):
        _collator(eager).collate([[pool[0]], [pool[1]]])


# --- test 46: mRoPE rows ------------------------------------------------------------------------------


def test_worked_example_of_8_4_equals_the_models_rope_index(eager: LoadedCheckpoint) -> None:
    image = eager.model.config.image_token_id
    ids = torch.tensor([20, 21, 22, 23, 24] + [image] * 6 + [25])
    grid = torch.tensor([[1, 4, 6]])
    expected = [
        [0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 8],
        [0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 6, 8],
        [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8],
    ]
    own, _ = eager.model.model.get_rope_index(
        ids[None], mm_token_type_ids=(ids == image).long()[None], image_grid_thw=grid
    )
    assert own[:, 0].tolist() == expected
    assert model_rope_index(eager.model)(ids, grid).tolist() == expected
    assert reference_rope_index(image, 2)(ids, grid).tolist() == expected


def test_reference_rope_index_equals_the_models_on_real_samples(
    eager: LoadedCheckpoint, pool: list[TrainItem]
) -> None:
    model_rope = model_rope_index(eager.model)
    ref = reference_rope_index(eager.model.config.image_token_id, 2)
    for item in pool:
        ids = torch.as_tensor(np.asarray(item.sample.input_ids))
        grid = torch.as_tensor(np.asarray(item.sample.image_grid_thw))
        assert torch.equal(model_rope(ids, grid), ref(ids, grid))


# --- test 47 / §8.6: packed == alone, packed gradients == padded gradients ---------------------------

PACKS = [(0, 1), (2, 3, 4), (5, 0, 3, 1)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("members", PACKS, ids=lambda m: f"{len(m)}-members")
def test_packed_logits_equal_each_sample_alone(
    attn: str, members: tuple[int, ...], request: pytest.FixtureRequest, pool: list[TrainItem]
) -> None:
    loaded: LoadedCheckpoint = request.getfixturevalue(attn)
    assert loaded.attn_implementation_selected == attn
    samples = [pool[i].sample for i in members]
    batch = _collator(loaded).collate([[pool[i] for i in members]])
    with torch.no_grad():
        packed = _forward(loaded, batch)[0]
    start = 0
    for s in samples:
        alone = _alone_logits(loaded, s)
        torch.testing.assert_close(packed[start : start + s.length], alone, atol=1e-5, rtol=0)
        start += s.length
    assert start == packed.shape[0]


def test_packing_without_position_restart_would_leak(eager: LoadedCheckpoint, pool: list[TrainItem]) -> None:
    """Control: the same row with a continuous text row (no restart) differs, so the test above can fail."""
    batch = _collator(eager).collate([[pool[0], pool[1]]])
    mapping = batch.as_mapping()
    pop_step_context(mapping)
    pos = mapping["position_ids"].clone()
    pos[0, 0] = torch.arange(pos.shape[-1])
    mapping["position_ids"] = pos
    with torch.no_grad():
        leaked = eager.model(**mapping).logits[0]
    second = _alone_logits(eager, pool[1].sample)
    assert not torch.allclose(leaked[pool[0].sample.length :], second, atol=1e-4)


def test_packing_with_a_cache_would_leak(eager: LoadedCheckpoint, pool: list[TrainItem]) -> None:
    """Control: with use_cache=True transformers skips the boundary detection; hence use_cache=False."""
    batch = _collator(eager).collate([[pool[0], pool[1]]])
    mapping = batch.as_mapping()
    pop_step_context(mapping)
    mapping["use_cache"] = True
    with torch.no_grad():
        leaked = eager.model(**mapping).logits[0]
    second = _alone_logits(eager, pool[1].sample)
    assert not torch.allclose(leaked[pool[0].sample.length :], second, atol=1e-4)


def _summed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_and_padded_gradients_match(
    attn: str, request: pytest.FixtureRequest, pool: list[TrainItem]
) -> None:
    loaded: LoadedCheckpoint = request.getfixturevalue(attn)
    members = [pool[i] for i in (5, 2, 1, 3)]
    collator = _collator(loaded)
    grads = []
    losses = []
    for raw in ([members], members):
        batch = collator.collate(raw)
        loaded.model.zero_grad(set_to_none=True)
        loss = _summed_ce(_forward(loaded, batch), batch.labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(
            {n: p.grad.detach().clone() for n, p in loaded.model.named_parameters() if p.grad is not None}
        )
    loaded.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# --- test 41/47: pack_num_samples and the other dataset-meta extras ----------------------------------


def test_dataset_meta_extras(eager: LoadedCheckpoint, pool: list[TrainItem]) -> None:
    collator = _collator(eager)
    padded = collator.collate([pool[0], pool[1]]).extras
    assert padded[PACK_NUM_SAMPLES].dtype == torch.int64 and padded[PACK_NUM_SAMPLES].tolist() == [1, 1]
    assert padded[DATASET_LABELS] == ["coco", "lvis"]
    assert padded[DATASET_SEGMENTS] == [pool[0].sample.length, pool[1].sample.length]
    three = collator.collate([[pool[0], pool[2], pool[4]]]).extras
    one = collator.collate([[pool[1]]]).extras
    assert [*three[PACK_NUM_SAMPLES].tolist(), *one[PACK_NUM_SAMPLES].tolist()] == [3, 1]
    assert three[DATASET_LABELS] == ["coco"] and one[DATASET_LABELS] == ["lvis"]
    assert collator.collate([[pool[0], pool[1]]]).extras[DATASET_LABELS] == ["mixed"]
    assert three[DATASET_SEGMENTS] == [sum(pool[i].sample.length for i in (0, 2, 4))]
    assert INSTABILITY_META_JSON not in three and TOKEN_TYPES not in three


def test_instability_meta_json(eager: LoadedCheckpoint, pool: list[TrainItem]) -> None:
    extras = _collator(eager, max_meta_samples=2).collate([[pool[0], pool[1], pool[2]]]).extras
    text = extras[INSTABILITY_META_JSON]
    assert text.isascii()
    (row,) = json.loads(text)
    assert row["num_samples"] == 3 and row["total_length"] == sum(pool[i].sample.length for i in range(3))
    assert [(m["source"], m["line"], m["sample_id"]) for m in row["samples"]] == [
        ("/data/coco.jsonl", 1, 0),
        ("/data/LVIS.jsonl", 2, 1),
    ]
    assert text == json.dumps(json.loads(text), sort_keys=True, ensure_ascii=True)


# --- test 40: spy model: extras and labels never reach forward ---------------------------------------


class SpyModel(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[set[str]] = []

    def forward(self, **kwargs: Any) -> Any:
        self.seen.append(set(kwargs))
        return self.inner(**kwargs)


def _compute_loss_like(model: SpyModel, inputs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    """The order of stage1.md §4.3: pop extras -> forward -> loss from the context."""
    ctx = pop_step_context(inputs)
    logits = model(**inputs).logits
    assert ctx.labels is not None
    return ctx, _summed_ce(logits, ctx.labels)


def test_spy_model_never_sees_extras_or_labels(
    eager: LoadedCheckpoint, pool: list[TrainItem], typer: TargetTokenTyper
) -> None:
    spy = SpyModel(eager.model)
    collator = _collator(eager, token_typer=typer, max_meta_samples=0)
    mapping = collator([[pool[0], pool[1], pool[2]]])
    original = {k: mapping[k] for k in (*EXTRA_KEYS, "labels")}
    extra_names = [k for k in EXTRA_KEYS if k in mapping]
    assert sorted(extra_names) == sorted(EXTRA_KEYS)  # all five present in this batch
    ctx, loss = _compute_loss_like(spy, mapping)
    assert torch.isfinite(loss)
    assert spy.seen[-1].isdisjoint({*EXTRA_KEYS, "labels"})
    assert spy.seen[-1] == {"input_ids", "position_ids", "pixel_values", "image_grid_thw", "use_cache"}
    for key, value in original.items():
        got = ctx.labels if key == "labels" else ctx.get(key)
        assert got is value and type(got) is type(value)
    assert ctx.samples_in_batch() == 3
    assert ctx.token_types() is original[TOKEN_TYPES]
    # a second call without extras sees None, never the previous call's values
    plain = _collator(eager).collate([pool[3], pool[4]]).as_mapping()
    for key in EXTRA_KEYS:
        plain.pop(key, None)
    ctx2, _ = _compute_loss_like(spy, plain)
    assert all(ctx2.get(k) is None for k in EXTRA_KEYS)
    assert ctx2.samples_in_batch() == 2 and ctx2.token_types() is None
    with pytest.raises(KeyError):
        ctx2.get("cu_seq_lens")


# --- token types on real tokenization (stage1.md tests 26, 29, 30) -----------------------------------


def test_token_types_padded_and_packed(
    eager: LoadedCheckpoint, pool: list[TrainItem], typer: TargetTokenTyper
) -> None:
    collator = _collator(eager, token_typer=typer)
    padded = collator.collate([pool[1], pool[3], pool[0]])
    types = padded.extras[TOKEN_TYPES]
    assert types.shape == padded.labels.shape and types.dtype == torch.int64
    coord_ids = torch.tensor(eager.coord_ids.ids)
    for b, item in enumerate([pool[1], pool[3], pool[0]]):
        row, lab = types[b], padded.labels[b]
        assert ((row == IGNORE) == (lab == -100)).all()
        assert ((row == COORD) == torch.isin(lab, coord_ids)).all()
        im_end = (lab == eager.tokenizer.im_end_id).nonzero()
        assert row[im_end[-1]].item() == FORMAT
        if item.objects:
            assert (row == DESC).any() and (row == COORD).sum() == 4 * len(item.objects)
    packed = collator.collate([[pool[0], pool[1], pool[2]]])
    ptypes = packed.extras[TOKEN_TYPES]
    assert tuple(ptypes.shape) == (1, sum(pool[i].sample.length for i in range(3)))
    assert ((ptypes == IGNORE) == (packed.labels == -100)).all()


def test_excluded_member_and_missing_objects_are_ignore_runs(
    eager: LoadedCheckpoint, pool: list[TrainItem], typer: TargetTokenTyper
) -> None:
    only_coco = TargetTokenTyper(
        typer.encode_with_offsets,
        typer.suffix_ids,
        typer.special_ids,
        typer.coord_ids,
        dataset_filter=DatasetFilter(include=["coco"]),
    )
    members = [pool[0], pool[1], TrainItem(pool[2].sample, None)]
    batch = _collator(eager, token_typer=only_coco).collate([members])
    row = batch.extras[TOKEN_TYPES][0]
    l0, l1 = pool[0].sample.length, pool[1].sample.length
    assert (row[l0 : l0 + l1] == IGNORE).all()  # LVIS member excluded
    assert (row[l0 + l1 :] == IGNORE).all()  # no objects
    assert (row[:l0] != IGNORE).any()


def test_failing_token_typer_warns_once_and_leaves_the_key_absent(
    eager: LoadedCheckpoint, pool: list[TrainItem]
) -> None:
    def broken(sample: EncodedSample, objects: Any) -> TypedSample:
        raise RuntimeError("tokenizer exploded")

    collator = _collator(eager, token_typer=broken)
    with pytest.warns(RuntimeWarning, match="token_types"):
        first = collator.collate([pool[0], pool[1]])
    assert TOKEN_TYPES not in first.extras and PACK_NUM_SAMPLES in first.extras
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = collator.collate([[pool[0], pool[1]]])
    assert TOKEN_TYPES not in second.extras
    assert collator.diagnostics.is_disabled("token_types")


def test_wrong_length_member_types_make_the_packed_row_ignore(
    eager: LoadedCheckpoint, pool: list[TrainItem]
) -> None:
    def short(sample: EncodedSample, objects: Any) -> TypedSample:
        n = len(np.asarray(sample.labels)) - (1 if sample.line == 2 else 0)
        return TypedSample(np.full(n, FORMAT, dtype=np.int64), TypingStatus.TYPED)

    batch = _collator(eager, token_typer=short).collate([[pool[0], pool[1]]])
    assert batch.extras[TOKEN_TYPES].shape == batch.labels.shape
    assert (batch.extras[TOKEN_TYPES] == IGNORE).all()
    padded = _collator(eager, token_typer=short).collate([pool[0], pool[1]]).extras[TOKEN_TYPES]
    assert (padded[0, : pool[0].sample.length] == FORMAT).all() and (padded[1] == IGNORE).all()


def test_alignment_failure_gives_an_ignore_member(eager: LoadedCheckpoint, pool: list[TrainItem]) -> None:
    def failing(sample: EncodedSample, objects: Any) -> TypedSample:
        n = len(np.asarray(sample.labels))
        return TypedSample(np.full(n, IGNORE, dtype=np.int64), TypingStatus.ALIGNMENT_FAILURE, "x")

    collator = _collator(eager, token_typer=failing)
    batch = collator.collate([[pool[0], pool[1]]])
    assert (batch.extras[TOKEN_TYPES] == IGNORE).all() and collator.typing_failures == 2


# --- properties on real encodings ------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(st.integers(0, len(IMAGE_SIZES) - 1), min_size=1, max_size=4), packed=st.booleans())
def test_rows_stay_aligned_under_packing_and_padding(
    members: list[int], packed: bool, eager: LoadedCheckpoint, pool: list[TrainItem], typer: TargetTokenTyper
) -> None:
    items = [pool[i] for i in members]
    collator = _collator(eager, token_typer=typer)
    batch = collator.collate([items] if packed else items)
    types = batch.extras[TOKEN_TYPES]
    pos = batch.model_inputs["position_ids"]
    assert types.shape == batch.labels.shape == batch.model_inputs["input_ids"].shape
    assert pos.shape[0] == 4 and pos.shape[1:] == batch.labels.shape
    alone = [collate_padded([it.sample], eager.tokenizer.pad_id, collator.rope_index) for it in items]
    alone_types = [collator.collate([it]).extras[TOKEN_TYPES][0] for it in items]
    if packed:
        starts = np.cumsum([0] + [it.sample.length for it in items]).tolist()
        for k, (it, one, t) in enumerate(zip(items, alone, alone_types)):
            sl = slice(starts[k], starts[k + 1])
            assert batch.labels[0, sl].tolist() == _labels(it.sample)
            assert torch.equal(pos[:, 0, sl], one.model_inputs["position_ids"][:, 0])
            assert torch.equal(types[0, sl], t)
        assert "attention_mask" not in batch.model_inputs
    else:
        mask = batch.model_inputs["attention_mask"]
        for b, (it, one, t) in enumerate(zip(items, alone, alone_types)):
            n = it.sample.length
            assert mask[b].sum().item() == n and mask[b, :n].all()
            assert batch.labels[b, :n].tolist() == _labels(it.sample) and (batch.labels[b, n:] == -100).all()
            assert torch.equal(pos[:, b, :n], one.model_inputs["position_ids"][:, 0])
            assert torch.equal(types[b, :n], t) and (types[b, n:] == IGNORE).all()
    assert ((types == IGNORE) == (batch.labels == -100)).all()


_DESC_ALPHABET = st.sampled_from(list('abcdefghij klmnop"\\é,:{}[]_0123456789<>|'))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    objects=st.lists(
        st.tuples(
            st.text(_DESC_ALPHABET, min_size=1, max_size=10).filter(
                lambda s: s == s.strip() and "<|" not in s
            ),
            st.sampled_from([GeometryKind.BBOX, GeometryKind.POLY]),
            st.lists(st.integers(0, 999), min_size=6, max_size=6),
        ),
        max_size=4,
    )
)
def test_every_coord_token_is_typed_coord_and_only_those(
    objects: list[tuple[str, GeometryKind, list[int]]],
    encoder: HFSampleEncoder,
    pool: list[TrainItem],
    typer: TargetTokenTyper,
    eager: LoadedCheckpoint,
) -> None:
    dets = tuple(DetObject(d, k, bins[:4] if k is GeometryKind.BBOX else bins) for d, k, bins in objects)
    text = render(dets)
    base = pool[0].sample  # its prompt is reused: no image I/O per example
    head = EncodedPrompt(
        input_ids=np.asarray(base.input_ids)[: base.prompt_length],
        pixel_values=base.pixel_values,
        image_grid_thw=base.image_grid_thw,
        mm_token_type_ids=np.asarray(base.mm_token_type_ids)[: base.prompt_length],
        origin=base.origin,
    )
    sample = encoder.teacher_forced(head, encoder.tokenizer.encode(text))
    typed = typer(sample, dets)
    assert typed.ok, typed.reason
    labels = torch.as_tensor(np.asarray(sample.labels))
    row = torch.as_tensor(typed.row)
    coord_ids = torch.tensor(eager.coord_ids.ids)
    assert ((row == COORD) == torch.isin(labels, coord_ids)).all()
    assert (row == COORD).sum().item() == sum(len(d.bins) for d in dets)
    assert ((row == IGNORE) == (labels == -100)).all()
