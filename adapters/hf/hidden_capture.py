"""The final hidden states a causal-LM head reads, captured during the model's own forward (issue 14).

The loss-from-hidden path (``training.loss_from_hidden``) calls the (possibly DDP- or PEFT-wrapped) model as
usual, with ``logits_to_keep=1`` so the head builds one position of logits instead of ``[B, L, V]``, and reads
the decoder's final normed hidden states ``[B, L, H]`` through a forward hook on the decoder's final norm: the
exact tensor the head would have multiplied, still in the graph. The head's weight (and, with
``training.coord_offset``, its coord-row offsets) come from the same model, so the kernel
computes ``hidden @ weight.T (+ offsets at the coord columns)`` chunk by chunk, exactly the logits the model
would have produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import nn


def _unwrapped(model: Any) -> Any:
    """The transformers model under DDP (``module``) and PEFT (``get_base_model``) wrappers."""
    inner = getattr(model, "module", model)
    base = getattr(inner, "get_base_model", None)
    return base() if callable(base) else inner


@attrs.define
class Captured:
    """What one forward left: the final normed hidden states (None until the hook fired)."""

    hidden: torch.Tensor | None = None


@attrs.define
class FinalHiddenStates:
    """The decoder's final norm (hooked) and the output head of one model."""

    norm: nn.Module
    head: nn.Module

    @classmethod
    def find(cls, model: Any) -> FinalHiddenStates | None:
        """The model's final norm and output embedding, or None when it does not expose both (then the loss
        reads logits)."""
        inner = _unwrapped(model)
        try:
            decoder = inner.get_decoder()
            head = inner.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        norm = getattr(decoder, "norm", None)
        weight = getattr(head, "weight", None)
        if not isinstance(norm, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        if getattr(head, "bias", None) is not None:
            return None  # the kernel computes hidden @ weight.T only
        return cls(norm=norm, head=head)

    @property
    def weight(self) -> torch.Tensor:
        weight = self.head.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @contextmanager
    def capture(self) -> Iterator[Captured]:
        """Within the block, every forward of the model stores the final norm's output in the yielded holder."""
        holder = Captured()

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            holder.hidden = output if isinstance(output, torch.Tensor) else output[0]

        handle = self.norm.register_forward_hook(hook)
        try:
            yield holder
        finally:
            handle.remove()


def head_offsets(model: Any) -> torch.Tensor | None:
    """With ``training.coord_offset`` installed: the head's coord-row offsets ``[1000, H]`` of the active adapter,
    rows in ascending coord-id order (the adapter's own order, which the kernel's ``from_hidden`` expects);
    None without the adapter."""
    from adapters.hf.coord_offsets import COORD_OFFSET_MODULE, active_adapter

    inner = _unwrapped(model)
    if not any(COORD_OFFSET_MODULE in m._modules for m in inner.modules()):
        return None
    return active_adapter(inner).head_table
