"""The step context (stage1.md §4.3): a compute-loss call's labels and batch extras, never the forward's.

At the start of every compute-loss call, before any forward, :func:`pop_step_context` removes
``labels`` and EVERY registered extra (stage1.md §4.1, :mod:`domain.batch_extras`) from the input
mapping into a fresh :class:`StepContext` owned by that call. The loss, metric and monitor
components receive the context explicitly; nothing is stashed on a module, trainer or model, so a
later call never sees a previous call's extras.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from types import MappingProxyType
from typing import Any

import attrs
import torch

from domain.batch_extras import (
    DATASET_LABELS,
    DATASET_SEGMENTS,
    EXTRA_KEYS,
    INSTABILITY_META_JSON,
    LABELS_KEY,
    PACK_NUM_SAMPLES,
    TOKEN_TYPES,
)
from domain.token_types import IGNORE


@attrs.frozen(eq=False)
class StepContext:
    """Labels and every registered extra of one micro-batch (missing extras are None)."""

    labels: torch.Tensor | None
    extras: Mapping[str, Any]

    def get(self, key: str) -> Any:
        """The value of a registered extra (None when the batch did not carry it)."""
        if key not in self.extras:
            raise KeyError(f"{key!r} is not a registered batch extra (stage1.md §4.1): {list(EXTRA_KEYS)}")
        return self.extras[key]

    @property
    def pack_num_samples(self) -> torch.Tensor | None:
        value = self.extras[PACK_NUM_SAMPLES]
        return value if isinstance(value, torch.Tensor) else None

    @property
    def dataset_labels(self) -> list[str] | None:
        value = self.extras[DATASET_LABELS]
        return None if value is None else list(value)

    @property
    def dataset_segments(self) -> list[int] | None:
        value = self.extras[DATASET_SEGMENTS]
        return None if value is None else [int(v) for v in value]

    @property
    def instability_meta_json(self) -> str | None:
        value = self.extras[INSTABILITY_META_JSON]
        return value if isinstance(value, str) else None

    def samples_in_batch(self) -> int:
        """S_n = Σ pack_num_samples, clamped >= 1; without the extra, the number of label rows (stage1.md §0.2)."""
        counts = self.pack_num_samples
        if counts is not None:
            return max(1, int(counts.sum().item()))
        rows = 0 if self.labels is None else int(self.labels.shape[0])
        return max(1, rows)

    def token_types(self) -> torch.Tensor | None:
        """``token_types`` when usable (stage1.md §2.6), else None.

        Treated as absent: missing, not a tensor, a shape different from the labels', or all
        IGNORE after the shift (``[:, 1:]``, the positions that are targets).
        """
        value = self.extras[TOKEN_TYPES]
        if not isinstance(value, torch.Tensor) or self.labels is None:
            return None
        if tuple(value.shape) != tuple(self.labels.shape):
            return None
        if not bool((value[:, 1:] != IGNORE).any()):
            return None
        return value


def pop_step_context(inputs: MutableMapping[str, Any]) -> StepContext:
    """Remove ``labels`` and all registered extras from ``inputs`` (in place) into a fresh context.

    What stays in ``inputs`` is exactly what may be passed to ``model(**inputs)``.
    """
    labels = inputs.pop(LABELS_KEY, None)
    extras = {key: inputs.pop(key, None) for key in EXTRA_KEYS}
    return StepContext(labels=labels, extras=MappingProxyType(extras))
