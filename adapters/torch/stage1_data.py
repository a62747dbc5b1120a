"""Stage-1 datasets and batch samplers on torch (data.md §2.5, §8.2.7; stage1.md R5).

Items are single samples (padded batches) or packs (one list of samples per micro-batch); the sample
conversations come from :func:`ports.training.training_chat_sample`, the same constructor the use case's
length pre-pass measures. Stage 2's Channel-A datasets reuse these pieces.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch

from adapters.torch.collator import TrainItem
from domain.training_samples import SampleSource, sample_objects
from domain.objects import DetObject
from ports.tokenizer import SampleEncoderPort
from ports.training import SampleSettings, training_chat_sample


class Stage1Dataset(torch.utils.data.Dataset[Any]):
    """Items are single samples (padded batches) or packs (lists of samples, one per micro-batch).

    ``ordering: random`` shuffles objects per (run.seed, epoch, record_index); the epoch travels in the
    item index (``index = epoch * len + i``) so it survives dataloader worker processes (data.md §2.5).
    """

    def __init__(
        self,
        sources: Sequence[SampleSource],
        units: Sequence[Sequence[int]] | None,
        encoder: SampleEncoderPort,
        settings: SampleSettings,
    ) -> None:
        self.sources = list(sources)
        self.units = [list(u) for u in units] if units is not None else None
        self.encoder = encoder
        self.settings = settings

    def __len__(self) -> int:
        return len(self.units) if self.units is not None else len(self.sources)

    def objects_for(self, i: int, epoch: int) -> tuple[DetObject, ...]:
        return sample_objects(self.sources[i], self.settings.ordering, self.settings.seed, epoch)

    def item(self, i: int, epoch: int) -> TrainItem:
        objects = self.objects_for(i, epoch)
        chat = training_chat_sample(self.sources[i], self.settings, objects)
        return TrainItem(self.encoder.encode_sample(chat), objects)

    def __getitem__(self, index: int) -> Any:
        epoch, unit = divmod(int(index), len(self))
        if self.units is None:
            return self.item(unit, epoch)
        return [self.item(i, epoch) for i in self.units[unit]]


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochIndexBatchSampler:
    """The train batch sampler: per-epoch seeded shuffle, rank sharding, and indices that carry the epoch.

    - Index ``epoch * num_items + i`` (data.md §2.5): the epoch reaches the dataset inside workers too.
    - Every item is trained every epoch: the shuffled order is padded to a multiple of W by repeating its
      first items (at most W - 1 repeats, data.md §8.2.7), never truncated, then strided over the ranks.
    - A pure function of (seed, epoch, rank, W), so a resumed run replays the same batches; ``epoch`` is what
      ms-swift reads back when it rebuilds the loader to skip already-trained batches.
    """

    def __init__(
        self, num_items: int, *, batch_size: int, drop_last: bool, seed: int,
        rank: int | None = None, world_size: int | None = None,
    ) -> None:
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0
        self._rank, self._world = rank, world_size

    def _rank_world(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return dist_rank_world()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_indices(self) -> list[int]:
        rank, world = self._rank_world()
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        padded = -(-self.num_items // world) * world
        order = [order[k % self.num_items] for k in range(padded)]
        return order[rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        base = self.epoch * self.num_items
        indices = [base + i for i in self.rank_indices()]
        for k in range(0, len(indices), self.batch_size):
            batch = indices[k:k + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch

    def __len__(self) -> int:
        _, world = self._rank_world()
        per_rank = -(-self.num_items // world)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)


def epoch_index_batch_sampler(num_items: int, *, batch_size: int, drop_last: bool, seed: int) -> EpochIndexBatchSampler:
    return EpochIndexBatchSampler(num_items, batch_size=batch_size, drop_last=drop_last, seed=seed)


def eval_index_batches(num_items: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Eval batches of one rank: every item exactly once over all ranks (rank-strided), never dropped; ranks
    with fewer items get placeholder index ``-1`` batches so every rank runs the same number of forwards."""
    per_rank = -(-num_items // world)
    mine = list(range(rank, num_items, world))
    mine += [-1] * (per_rank - len(mine))
    return [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]


class EvalPaddedDataset(torch.utils.data.Dataset[Any]):
    """Index ``-1`` is item 0 with every label ``-100``: it runs a forward but adds nothing to eval sums/counts."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index >= 0:
            return self.dataset[index]
        item = self.dataset[0]
        return [_masked(m) for m in item] if isinstance(item, list) else _masked(item)


def _masked(item: TrainItem) -> TrainItem:
    import numpy as np

    labels = np.full_like(np.asarray(item.sample.labels), -100)
    return TrainItem(attrs.evolve(item.sample, labels=labels), item.objects)


