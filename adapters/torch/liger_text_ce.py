"""The text-CE part of the hidden-state Stage-1 loss through liger-kernel's fused linear CE (issue 14 item 3).

``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy(input, weight, target,
bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
reduction="mean", softcap=None, return_z_loss=False)`` computes ``CE(input @ weightᵀ, target)``
chunk-wise on the GPU (Triton) and returns the loss with its gradients w.r.t. ``input`` and
``weight`` already computed in forward. With ``reduction="sum"`` and no bias, label smoothing,
z-loss or softcap it is exactly Σ_rows ``LSE(h·Wᵀ) − (h·Wᵀ)[y]``: the full-vocabulary CE the
kernel sums over its CE rows. It does not know the coord-offset head offsets (which change the
logits at the coord columns), so it is used only without them, and only on CUDA. Everywhere else
the torch path of :mod:`adapters.torch.coord_loss` runs. liger-kernel is an optional dependency,
imported lazily.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from domain.losses import IGNORE_INDEX

#: The keyword arguments this module passes; checked against the installed signature.
_REQUIRED_PARAMETERS = ("input", "weight", "target", "bias", "ignore_index", "reduction")


@lru_cache(maxsize=1)
def liger_fused_linear_ce() -> Callable[..., Any] | None:
    """liger's functional fused linear CE, or None when liger-kernel is absent or its signature differs."""
    try:
        module = importlib.import_module("liger_kernel.transformers.functional")
    except Exception:  # noqa: BLE001 - absent, or present but unusable (no Triton, ...): the torch path runs
        return None
    fn = getattr(module, "liger_fused_linear_cross_entropy", None)
    if fn is None:
        return None
    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if not all(p in names for p in _REQUIRED_PARAMETERS):
        return None
    return fn  # type: ignore[no-any-return]


def liger_applicable(hidden: torch.Tensor, weight: torch.Tensor, head_offsets: torch.Tensor | None) -> bool:
    """True when liger's fused linear CE computes exactly the kernel's text CE for these inputs."""
    return (
        head_offsets is None
        and hidden.device.type == "cuda"
        and weight.device == hidden.device
        and hidden.dtype == weight.dtype
        and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and liger_fused_linear_ce() is not None
    )


def liger_text_ce_sum(hidden_rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over the rows of the full-vocabulary CE of ``hidden_rows @ weightᵀ`` (``[n, H]``, ``[V, H]``, ``[n]``)."""
    fn = liger_fused_linear_ce()
    if fn is None:
        raise RuntimeError("liger-kernel's liger_fused_linear_cross_entropy is not available")
    out = fn(
        input=hidden_rows.contiguous(),
        weight=weight,
        target=targets.to(torch.int64).contiguous(),
        bias=None,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    loss = out[0] if isinstance(out, tuple) else out
    assert isinstance(loss, torch.Tensor)
    return loss
