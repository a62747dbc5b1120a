"""The Stage-1 token/type metric family and the coord monitors (stage1.md §3.2 token/type block).

Both read one micro-batch's kernel result (:class:`adapters.torch.coord_loss.CoordLossResult`: the
supervised pairs in pair order, their targets, full-vocab argmax and id-based coord flag) and the
same logits rows through ``result.rows`` (read from the logits, or recomputed from the hidden
states on the hidden-state path), without gradient. "Coord" and "text" classes are id-based (text = supervised target
that is not a coord id; numeric mode: every supervised pair), so they never depend on the token
types; the DESC / FORMAT / COORD type classes come from ``token_types`` shifted like the labels
(``[:, 1:]``) and are used only when the step context says the types are valid (§2.6).

Full-vocabulary work (top-5 membership, coord-vocabulary mass) runs over chunks of rows in fp32 on
sanitised rows, so no second full-size copy of the logits exists (and none at all on the
hidden-state path).
"""

from __future__ import annotations

import attrs
import torch

from adapters.torch.coord_loss import DEFAULT_CHUNK_BYTES, CoordLossResult
from domain.losses import LOGIT_BOUND
from domain.metrics_registry import MetricUpdate, stride_subsample
from domain.token_types import COORD, DESC, FORMAT

#: Token-type class value per metric-key class name (stage1.md §2.1).
TYPE_CLASSES: tuple[tuple[str, int], ...] = (("desc", DESC), ("format", FORMAT), ("coord", COORD))


@attrs.frozen
class TokenTypeMetricSettings:
    """``objective.token_type_metrics`` (what the metric code needs) plus τ and the coord mode.

    ``temperature`` is ``objective.coord_soft_ce_w1.temperature`` in both modes (mass monitors).
    """

    log_top5: bool = True
    coord_monitor_mass: bool = True
    coord_monitor_mass_max_tokens: int = 0
    temperature: float = 1.0
    tokens_mode: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


def _rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    return max(1, int(chunk_bytes) // (4 * vocab))


def _sanitised_rows(result: CoordLossResult, b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The rows at (b, i) as a fresh fp32 (fp64 for fp64 inputs) copy, sanitised in place (§1.2 step 2).

    Read through the result, so it works for the logits path and the hidden-state path alike.
    """
    x = result.rows(b, i)
    torch.nan_to_num_(x, nan=0.0, posinf=LOGIT_BOUND, neginf=-LOGIT_BOUND)
    return x.clamp_(-LOGIT_BOUND, LOGIT_BOUND)


def pair_types(result: CoordLossResult, token_types: torch.Tensor | None) -> torch.Tensor | None:
    """The token type of every supervised pair (pair order): ``token_types[:, 1:][b, i]``, or None."""
    if token_types is None:
        return None
    b, i = result.pair_index
    shifted = token_types[:, 1:].to(b.device)
    return shifted[b, i].to(torch.int64)


@torch.no_grad()
def top5_hits(result: CoordLossResult, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``1[y ∈ full-vocab top-5]`` per supervised pair: fewer than 5 entries strictly above z[y] (sanitised)."""
    b, i = result.pair_index
    y = result.targets
    n = int(y.numel())
    out = torch.zeros(n, dtype=torch.bool, device=result.device)
    step = _rows_per_chunk(result.vocab, chunk_bytes)
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        x = _sanitised_rows(result, b[sl], i[sl])
        z_y = x.gather(1, y[sl].unsqueeze(1))
        out[sl] = (x > z_y).sum(dim=-1) < 5
        del x
    return out


@torch.no_grad()
def coord_vocab_mass(
    result: CoordLossResult,
    pairs: torch.Tensor,
    coord_columns: torch.Tensor,
    temperature: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """``Σ_k softmax(z̃/τ)[c_k]`` for the supervised pairs at positions ``pairs`` (pair order indices)."""
    b, i = result.pair_index
    n = int(pairs.numel())
    out = torch.zeros(n, dtype=result.compute_dtype, device=result.device)
    cols = coord_columns.to(result.device)
    step = _rows_per_chunk(result.vocab, chunk_bytes)
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        rows = pairs[sl]
        x = _sanitised_rows(result, b[rows], i[rows]).div_(temperature)
        lse_all = torch.logsumexp(x, dim=-1)
        lse_coord = torch.logsumexp(x[:, cols], dim=-1)
        out[sl] = torch.exp(lse_coord - lse_all).clamp_(0.0, 1.0)
        del x
    return out


def _fraction(mask: torch.Tensor, within: torch.Tensor) -> tuple[float, float] | None:
    """(mean of ``mask`` over ``within``, count of ``within``), or None when ``within`` is empty."""
    n = int(within.sum())
    if n == 0:
        return None
    return float((mask & within).sum()) / n, float(n)


def text_pairs(result: CoordLossResult, tokens_mode: bool) -> torch.Tensor:
    """The id-based text class: supervised targets that are not coord ids (numeric mode: all of T)."""
    return ~result.is_coord if tokens_mode else torch.ones_like(result.is_coord)


def token_type_metric_updates(
    result: CoordLossResult, token_types: torch.Tensor | None, settings: TokenTypeMetricSettings
) -> list[MetricUpdate]:
    """``token_acc_top5``, ``text_token_acc`` and the per-type keys of one micro-batch.

    ``token_types`` is the step context's validated value (None when absent or invalid, §2.6): then
    only the id-based keys are emitted.
    """
    n_sup = result.num_supervised
    if n_sup == 0:
        return []
    out: list[MetricUpdate] = []
    correct = result.argmax == result.targets
    hits = top5_hits(result, settings.chunk_bytes) if settings.log_top5 else None
    if hits is not None:
        out.append(MetricUpdate("token_acc_top5", float(hits.sum()) / n_sup, float(n_sup)))
    text = _fraction(correct, text_pairs(result, settings.tokens_mode))
    if text is not None:
        out.append(MetricUpdate("text_token_acc", *text))
    types = pair_types(result, token_types)
    if types is None:
        return out
    for name, cls in TYPE_CLASSES:
        within = types == cls
        count = int(within.sum())
        if count == 0:
            continue
        out.append(MetricUpdate(f"{name}_token_frac", count / n_sup, float(n_sup)))
        acc = _fraction(correct, within)
        assert acc is not None
        out.append(MetricUpdate(f"{name}_token_acc", *acc))
        if hits is not None:
            top5 = _fraction(hits, within)
            assert top5 is not None
            out.append(MetricUpdate(f"{name}_token_acc_top5", *top5))
    return out


def coord_monitor_updates(
    result: CoordLossResult,
    token_types: torch.Tensor | None,
    coord_mask: torch.Tensor,
    coord_columns: torch.Tensor,
    settings: TokenTypeMetricSettings,
) -> list[MetricUpdate]:
    """``coord_monitor/*`` of one micro-batch (tokens mode only; numeric mode emits nothing).

    ``coord_mask``: bool [V], True at the 1000 coord ids. Each key appears only when its class is
    non-empty; masses use the stride cap ``coord_monitor_mass_max_tokens`` per class.
    """
    if not settings.tokens_mode or result.num_supervised == 0:
        return []
    mask = coord_mask.to(result.argmax.device)
    pred_coord = mask[result.argmax]
    gt_coord = result.is_coord
    classes: list[tuple[str, torch.Tensor]] = [("coord", gt_coord), ("text", ~gt_coord)]
    types = pair_types(result, token_types)
    if types is not None:
        classes += [("format", types == FORMAT), ("desc", types == DESC)]
    out: list[MetricUpdate] = []
    for name, within in classes:
        if name == "coord":
            flip = _fraction(~pred_coord, within)
            key = "coord_monitor/flip_coord_to_noncoord"
        else:
            flip = _fraction(pred_coord, within)
            key = f"coord_monitor/flip_{name}_to_coord"
        if flip is not None:
            out.append(MetricUpdate(key, *flip))
    if not settings.coord_monitor_mass:
        return out
    # One chunked pass over the union of the capped classes (text and format/desc overlap).
    chosen: dict[str, torch.Tensor] = {}
    for name, within in classes:
        idx = torch.nonzero(within, as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        keep = stride_subsample(int(idx.numel()), int(settings.coord_monitor_mass_max_tokens))
        chosen[name] = idx[torch.as_tensor(keep, dtype=torch.int64, device=idx.device)]
    if not chosen:
        return out
    union, inverse = torch.unique(torch.cat(list(chosen.values())), return_inverse=True)
    masses = coord_vocab_mass(result, union, coord_columns, settings.temperature, settings.chunk_bytes)
    offset = 0
    for name, idx in chosen.items():
        part = masses[inverse[offset: offset + idx.numel()]]
        offset += idx.numel()
        out.append(
            MetricUpdate(f"coord_monitor/coord_vocab_mass_at_gt_{name}", float(part.double().mean()), float(idx.numel()))
        )
    return out
