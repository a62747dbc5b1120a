"""Engine pieces without a model: epoch-carrying sampler, object order per epoch, checkpoint rotation, DeepSpeed check."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest

from adapters.swift.stage1 import _checked_deepspeed
from adapters.swift.stage1_runtime import Stage1Runtime
from adapters.torch.stage1_data import Stage1Dataset, epoch_index_batch_sampler
from domain.training_samples import SampleSource
from ports.training import SampleSettings
from domain.checkpoints import COMPLETE_MARKER
from domain.errors import SetupError, StepError
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind, Ordering
from domain.prompts import PromptTexts
from domain.records import Record


def test_batch_sampler_indices_carry_the_epoch_and_shuffle_per_epoch() -> None:
    sampler = epoch_index_batch_sampler(5, batch_size=2, drop_last=False, seed=17)
    sampler.set_epoch(0)
    first = [i for batch in sampler for i in batch]
    sampler.set_epoch(3)
    later = [i for batch in sampler for i in batch]
    assert sorted(first) == [0, 1, 2, 3, 4]
    assert sorted(later) == [15, 16, 17, 18, 19]
    assert [len(b) for b in sampler] == [2, 2, 1]
    sampler.set_epoch(3)
    assert [i for batch in sampler for i in batch] == later  # a pure function of (seed, epoch): resume replays it
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(i - 5 * epoch for batch in sampler for i in batch))
    assert len(orders) > 1  # epochs are shuffled differently (fixed seed: not a flake)


class _EchoEncoder:
    def encode_sample(self, chat: Any) -> Any:
        return chat.target


def _dataset(ordering: Ordering) -> Stage1Dataset:
    objects = tuple(
        DetObject(f"o{k}", GeometryKind.BBOX, (10 * k, 10 * k, 10 * k + 5, 10 * k + 5)) for k in range(6)
    )
    record = Record(images=("a.jpg",), width=64, height=64, objects=objects, category_ids=(None,) * 6,
                    ann_ids=(None,) * 6, line=1, source="x.jsonl")
    settings = SampleSettings(field_order=FieldOrder.DESC_FIRST, coord_mode=CoordMode.TOKENS, ordering=ordering,
                              seed=17, prompt=PromptTexts("s", "u"))
    sources = [SampleSource(record=record, record_index=0, image_path="a.jpg")]
    return Stage1Dataset(sources, None, _EchoEncoder(), settings)  # type: ignore[arg-type]


def test_random_ordering_changes_with_the_epoch_carried_by_the_index() -> None:
    ds = _dataset(Ordering.RANDOM)
    by_epoch = [ds[epoch * len(ds)].sample for epoch in range(4)]
    assert len(set(by_epoch)) > 1
    assert ds[2 * len(ds)].sample == by_epoch[2]  # same (seed, epoch, index) -> same order
    assert _dataset(Ordering.SORTED)[0].sample == _dataset(Ordering.SORTED)[3].sample


def _ckpt(run: Path, step: int, complete: bool) -> Path:
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE_MARKER).write_text(json.dumps({"global_step": step}))
    return path


def test_rotation_counts_and_deletes_only_complete_checkpoints(tmp_path: Path) -> None:
    for step, complete in ((3, True), (5, False), (6, True), (9, True)):
        _ckpt(tmp_path, step, complete)
    runtime = types.SimpleNamespace(save_total_limit=2)
    removed = Stage1Runtime.rotate(runtime, tmp_path, None)  # type: ignore[arg-type]
    assert [p.name for p in removed] == ["checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "checkpoint-6", "checkpoint-9"]


def test_rotation_never_deletes_the_best_checkpoint(tmp_path: Path) -> None:
    best = _ckpt(tmp_path, 2, True)
    for step in (4, 6):
        _ckpt(tmp_path, step, True)
    runtime = types.SimpleNamespace(save_total_limit=1)
    Stage1Runtime.rotate(runtime, tmp_path, str(best))  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6"]


def test_deepspeed_config_must_leave_accumulation_to_the_trainer(tmp_path: Path) -> None:
    good = tmp_path / "ds_auto.json"
    good.write_text(json.dumps({"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}))
    assert _checked_deepspeed(good) == str(good)
    bad = tmp_path / "ds_4.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(SetupError, match="gradient_accumulation_steps = 4"):
        _checked_deepspeed(bad)
    assert _checked_deepspeed(None) is None


# --- startup knobs and step-time shape checks (stage1.md §1.6, §6.2-§6.3, test 23) ------------------------


def _trainer(**arg_overrides: Any) -> Any:
    args = dict(n_gpu=1, average_tokens_across_devices=True, remove_unused_columns=False, use_logits_to_keep=False,
                use_liger_kernel=False)
    args.update(arg_overrides)
    return types.SimpleNamespace(args=types.SimpleNamespace(**args), loss_is_scaled_for_ga=None,
                                 model_accepts_loss_kwargs=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"n_gpu": 2}, "n_gpu > 1"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        ({"use_logits_to_keep": None}, "use_logits_to_keep"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
        ({"average_tokens_across_devices": False}, "average_tokens_across_devices"),
    ],
)
def test_engine_knobs_that_would_change_the_objective_are_setup_errors(override: dict[str, Any], message: str) -> None:
    Stage1Runtime.check_engine(types.SimpleNamespace(), _trainer())  # type: ignore[arg-type]  # the good setup passes
    with pytest.raises(SetupError, match=message):
        Stage1Runtime.check_engine(types.SimpleNamespace(), _trainer(**override))  # type: ignore[arg-type]


def test_a_trainer_that_would_divide_by_the_accumulation_steps_is_refused() -> None:
    trainer = _trainer()
    trainer.loss_is_scaled_for_ga = False
    with pytest.raises(SetupError, match="gradient_accumulation_steps"):
        Stage1Runtime.check_engine(types.SimpleNamespace(), trainer)  # type: ignore[arg-type]


def test_last_position_logits_are_a_step_error_naming_both_shapes() -> None:
    import torch

    from adapters.torch.step_context import StepContext
    from domain.coord_tokens import CoordIdTable, all_coord_tokens

    table = CoordIdTable.from_vocab({t: 10 + k for k, t in enumerate(all_coord_tokens())})
    runtime = types.SimpleNamespace(coord_table=table)
    labels = torch.full((1, 6), -100, dtype=torch.long)
    ctx = StepContext(labels=labels, extras={})
    last_only = torch.zeros(1, 1, 1100)
    with pytest.raises(StepError, match=r"logits \[1, 1, 1100\] do not cover labels \[1, 6\]"):
        Stage1Runtime.loss(runtime, last_only, ctx, 7)  # type: ignore[arg-type]
    narrow_vocab = torch.zeros(1, 6, 500)
    with pytest.raises(StepError, match="global_step=7"):
        Stage1Runtime.loss(runtime, narrow_vocab, ctx, 7)  # type: ignore[arg-type]


# --- W > 1: every train item every epoch, every eval item exactly once --------------------------------------


@pytest.mark.parametrize(("n", "world"), [(5, 2), (7, 3), (2, 4), (8, 2)])
def test_train_sampler_trains_every_item_on_some_rank_every_epoch(n: int, world: int) -> None:
    from adapters.torch.stage1_data import EpochIndexBatchSampler

    for epoch in range(3):
        per_rank = []
        for rank in range(world):
            sampler = EpochIndexBatchSampler(n, batch_size=2, drop_last=False, seed=11, rank=rank, world_size=world)
            sampler.set_epoch(epoch)
            indices = [i for batch in sampler for i in batch]
            assert len(list(sampler)) == len(sampler)
            per_rank.append(indices)
        assert len({len(ix) for ix in per_rank}) == 1  # equal work per rank
        seen = [i - epoch * n for ix in per_rank for i in ix]
        assert set(seen) == set(range(n))  # nothing dropped
        assert len(seen) - n == (-n) % world  # at most W - 1 repeats


@pytest.mark.parametrize(("n", "world", "batch"), [(5, 2, 2), (4, 2, 3), (1, 3, 1), (7, 1, 3)])
def test_eval_batches_cover_every_item_exactly_once(n: int, world: int, batch: int) -> None:
    from adapters.torch.stage1_data import eval_index_batches

    per_rank = [eval_index_batches(n, batch, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
    real = [i for batches in per_rank for b in batches for i in b if i >= 0]
    assert sorted(real) == list(range(n))


def test_eval_placeholder_item_supervises_nothing() -> None:
    import numpy as np

    from adapters.torch.stage1_data import EvalPaddedDataset
    from adapters.torch.collator import TrainItem

    sample = types.SimpleNamespace()
    import attrs as _attrs

    @_attrs.frozen
    class Sample:
        labels: Any
        input_ids: Any

    item = TrainItem(Sample(labels=np.array([-100, 5, 6]), input_ids=np.array([1, 5, 6])))  # type: ignore[arg-type]
    ds = EvalPaddedDataset([item, item])
    assert list(ds[0].sample.labels) == [-100, 5, 6]
    assert list(ds[-1].sample.labels) == [-100, -100, -100]
    assert list(ds[-1].sample.input_ids) == [1, 5, 6]
    packed = EvalPaddedDataset([[item, item]])
    assert all(list(m.sample.labels) == [-100] * 3 for m in packed[-1])
    del sample


def test_a_split_needs_one_image_and_one_length_per_record(tmp_path: Path) -> None:
    """The job's splits pair records, image files and plan lengths one to one; a mismatch cannot be built."""
    from ports.training import SplitData, UnitPlan

    record = _dataset(Ordering.SORTED).sources[0].record
    SplitData((record, record), (tmp_path / "a.jpg",) * 2, UnitPlan(None, (5, 5)))
    for images, lengths in (((tmp_path / "a.jpg",), (5, 5)), ((tmp_path / "a.jpg",) * 2, (5,))):
        with pytest.raises(ValueError, match="one image and one length per record"):
            SplitData((record, record), images, UnitPlan(None, lengths))
