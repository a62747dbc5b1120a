"""Stage-1 loss kernel in torch (stage1.md §1.2-§1.4; float64 reference: ``domain.losses``).

Given one micro-batch's full-vocabulary logits ``[B, L, V]`` (``kernel(logits, labels)``) or its
final hidden states ``[B, L, H]`` and the output-embedding weight ``[V, H]``
(``kernel.from_hidden(hidden, weight, labels)``) and labels ``[B, L]`` it returns the sums and
counts the step objective needs (Σ_N ce or Σ_T ce, Σ_C ℓ_coord, |N|, |C|, |T|), the ``token_acc``
numerator and the coord-block diagnostics. ``lambda_for_backward`` turns the sums and the step's
global counts into the value a micro-batch returns for backward (R3, R7).

Memory: the full-vocabulary work (log-sum-exp for CE and gate, argmax, their gradients) runs in
fp32 over chunks of supervised rows inside one autograd function. A row source
(:class:`LogitsRows` / :class:`HiddenRows`) gives a chunk's rows: read from the logits, or
recomputed as ``h · Wᵀ`` (+ coord-offset head offsets); the per-row formulas are the same for both.
The function saves only its inputs and per-row scalars; backward recomputes each chunk's rows and
hands the chunk's row gradient to the source (one logits-sized gradient buffer, or grad_hidden /
grad_weight / grad_offsets accumulated chunk by chunk). No full-vocabulary copy exists beyond one
chunk; the hidden path never materialises ``[B, L, V]``. The coord terms work on the ``[|C|, 1000]``
coord columns only. Labels are read, never modified.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from adapters.torch.liger_text_ce import liger_applicable, liger_text_ce_sum
from domain.coord_tokens import NUM_BINS, CoordIdTable
from domain.errors import InvariantViolation, StepError
from domain.instability import MicroStepStats
from domain.losses import (
    IGNORE_INDEX,
    LOGIT_BOUND,
    W1_SCALE,
    CoordBlockSums,
    CoordLossSettings,
    gaussian_target,
)
from domain.metrics_registry import quantile_linear
from domain.normalisation import MicroBatchSums, StepCounts, micro_batch_lambda, micro_batch_objective

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """NaN -> 0, ±inf -> ±1e4, clamp to [-1e4, 1e4] (§1.2 step 2); differentiable (grad 1 inside)."""
    return torch.nan_to_num(x, nan=0.0, posinf=LOGIT_BOUND, neginf=-LOGIT_BOUND).clamp(-LOGIT_BOUND, LOGIT_BOUND)


def _sanitize_result(x: torch.Tensor) -> torch.Tensor:
    """Per-pair results: NaN -> 0, +inf -> 1e4 (§1.2 step 9)."""
    return torch.nan_to_num(x, nan=0.0, posinf=LOGIT_BOUND, neginf=-LOGIT_BOUND)


def _rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    return max(1, int(chunk_bytes) // (4 * vocab))


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 logits (the upcast of §1.2); fp64 logits stay fp64 (reference checks)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class RowSource:
    """Where the full-vocabulary rows ``z = logits[b, i]`` of the supervised pairs come from.

    A source is stateless apart from index tensors: the differentiable tensors (``params``) are
    passed to every method, so the autograd function can hand it the tensors it saved. Two sources:
    :class:`LogitsRows` (``params = (logits,)``) and :class:`HiddenRows` (``params = (hidden,
    weight[, head_offsets])``, rows recomputed as ``h @ Wᵀ`` (+ offsets at the coord columns)).
    """

    def vocab(self, params: tuple[torch.Tensor, ...]) -> int:
        raise NotImplementedError

    def dtype(self, params: tuple[torch.Tensor, ...]) -> torch.dtype:
        """The compute dtype of the rows (fp32; fp64 for fp64 inputs)."""
        raise NotImplementedError

    def rows(self, params: tuple[torch.Tensor, ...], b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """A fresh ``[n, V]`` copy of the rows at (b, i) in the compute dtype (callers may modify it in place)."""
        raise NotImplementedError

    def grad_buffers(self, params: tuple[torch.Tensor, ...], needs: tuple[bool, ...]) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def add_row_grads(
        self, params: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None], b: torch.Tensor, i: torch.Tensor,
        gx: torch.Tensor,
    ) -> None:
        """Accumulate the gradient ``gx`` [n, V] (compute dtype) w.r.t. the rows at (b, i) into ``grads``."""
        raise NotImplementedError

    def finish(self, params: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        return tuple(None if g is None else g.to(p.dtype) for g, p in zip(grads, params))

    def zero_anchor(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """An exact 0 connected to every input (R7 / instability guard); gradients are zeros."""
        raise NotImplementedError


class LogitsRows(RowSource):
    """Rows read from materialised logits ``[B, L, V]``."""

    def vocab(self, params: tuple[torch.Tensor, ...]) -> int:
        return int(params[0].shape[-1])

    def dtype(self, params: tuple[torch.Tensor, ...]) -> torch.dtype:
        return compute_dtype(params[0])

    def rows(self, params: tuple[torch.Tensor, ...], b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        # Advanced indexing copies the rows, so the result may be modified in place.
        return params[0][b, i].to(compute_dtype(params[0]))

    def grad_buffers(self, params: tuple[torch.Tensor, ...], needs: tuple[bool, ...]) -> list[torch.Tensor | None]:
        return [torch.zeros_like(params[0], memory_format=torch.contiguous_format) if needs[0] else None]

    def add_row_grads(
        self, params: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None], b: torch.Tensor, i: torch.Tensor,
        gx: torch.Tensor,
    ) -> None:
        g = grads[0]
        if g is not None:
            g[b, i] = gx.to(g.dtype)

    def finish(self, params: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        return tuple(grads)  # already in the logits' dtype

    def zero_anchor(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return guarded_zero(params[0])


class HiddenRows(RowSource):
    """Rows recomputed from the final hidden states: ``z = h · Wᵀ`` and, with head offsets,
    ``z[c] += h · offset[row(c)]`` at the coord columns ``offset_cols`` (ascending coord ids: the
    coord-offset adapter's row order, as its head hook adds them).

    The matmul runs in the weight's dtype (fp32 weights: fp32, exactly the logits the head would
    produce; bf16 / fp16 weights: the head's own low-precision logits, upcast per chunk, so no
    fp32 copy of the weight exists). Gradients: ``grad_h = gx · W (+ gx[:, cols] · offset)``
    (gx cast to the weight's dtype, like the logits path's gradient buffer), ``grad_W += gxᵀ h`` and
    ``grad_offset += gx[:, cols]ᵀ h`` accumulated in the compute dtype (in place, chunk by chunk).
    """

    def __init__(self, offset_cols: torch.Tensor | None) -> None:
        self.offset_cols = offset_cols

    def vocab(self, params: tuple[torch.Tensor, ...]) -> int:
        return int(params[1].shape[0])

    def dtype(self, params: tuple[torch.Tensor, ...]) -> torch.dtype:
        return torch.float64 if params[0].dtype == torch.float64 and params[1].dtype == torch.float64 else torch.float32

    def rows(self, params: tuple[torch.Tensor, ...], b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        hidden, weight = params[0], params[1]
        h = hidden[b, i].to(weight.dtype)
        x = (h @ weight.T).to(self.dtype(params))
        if len(params) > 2:
            assert self.offset_cols is not None
            off = params[2]
            x[:, self.offset_cols] += (h @ off.to(weight.dtype).T).to(x.dtype)
        return x

    def grad_buffers(self, params: tuple[torch.Tensor, ...], needs: tuple[bool, ...]) -> list[torch.Tensor | None]:
        cd = self.dtype(params)
        return [torch.zeros(p.shape, dtype=cd, device=p.device) if need else None for p, need in zip(params, needs)]

    def add_row_grads(
        self, params: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None], b: torch.Tensor, i: torch.Tensor,
        gx: torch.Tensor,
    ) -> None:
        hidden, weight = params[0], params[1]
        g_h = grads[0]
        if g_h is not None:
            gm = gx.to(weight.dtype)
            rows = (gm @ weight).to(g_h.dtype)
            if len(params) > 2:
                assert self.offset_cols is not None
                rows += (gm[:, self.offset_cols] @ params[2].to(weight.dtype)).to(g_h.dtype)
            g_h[b, i] += rows
        if grads[1] is not None or (len(params) > 2 and grads[2] is not None):
            h = hidden[b, i].to(gx.dtype)
            if grads[1] is not None:
                grads[1].addmm_(gx.T, h)
            if len(params) > 2 and grads[2] is not None:
                assert self.offset_cols is not None
                grads[2].addmm_(gx[:, self.offset_cols].T, h)

    def zero_anchor(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        z = guarded_zero(params[0])
        for p in params[1:]:
            z = z + guarded_zero(p)
        return z


class _SupervisedRows(torch.autograd.Function):
    """Full-vocabulary statistics of the supervised rows, chunk by chunk, in fp32.

    Inputs: the row ``source`` and its ``params`` (the differentiable tensors, last); per
    supervised pair its (b, i) position, target id y, and whether it is a coord pair;
    ``coord_cols`` the 1000 coord ids in bin order; τ; rows per chunk.
    Outputs (pair order): ``lse`` = LSE(z) and ``z_y`` = z[y] (raw fp32), ``lse_gate`` =
    LSE(z̃/τ) (coord pairs, 0 elsewhere), ``u`` = z[coord cols] of the coord pairs [|C|, 1000],
    and, not differentiable, ``argmax`` (int64) and, when ``logit_stats``, per row ``finite`` (all
    entries finite) and ``max_abs`` (max |z̃| after sanitising) for the instability monitor.
    Backward recomputes each chunk's rows from the source and hands their gradient to it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        source: RowSource,
        b: torch.Tensor,
        i: torch.Tensor,
        y: torch.Tensor,
        is_coord: torch.Tensor,
        coord_cols: torch.Tensor,
        tau: float,
        rows_per_chunk: int,
        logit_stats: bool,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n = b.shape[0]
        dev = b.device
        cd = source.dtype(params)
        lse = torch.empty(n, dtype=cd, device=dev)
        z_y = torch.empty(n, dtype=cd, device=dev)
        lse_gate = torch.zeros(n, dtype=cd, device=dev)
        argmax = torch.empty(n, dtype=torch.int64, device=dev)
        m = n if logit_stats else 0
        row_finite = torch.ones(m, dtype=torch.bool, device=dev)
        row_max_abs = torch.zeros(m, dtype=cd, device=dev)
        coord_row = torch.cumsum(is_coord.to(torch.int64), 0) - 1
        u = torch.empty((int(is_coord.sum()), int(coord_cols.numel())), dtype=cd, device=dev)
        with torch.no_grad():
            for start in range(0, n, rows_per_chunk):
                sl = slice(start, min(n, start + rows_per_chunk))
                x = source.rows(params, b[sl], i[sl])  # a fresh copy: modified in place below
                z_y[sl] = x.gather(1, y[sl].unsqueeze(1)).squeeze(1)
                if logit_stats:
                    row_finite[sl] = torch.isfinite(x).all(dim=-1)
                    row_max_abs[sl] = sanitize(x).abs_().amax(dim=-1)
                cm = is_coord[sl]
                if bool(cm.any()):
                    local = torch.nonzero(cm, as_tuple=True)[0]
                    xc = x[local]
                    u[coord_row[sl][local]] = xc[:, coord_cols]
                    lse_gate[start + local] = torch.logsumexp(sanitize(xc).div_(tau), dim=-1)
                    del xc
                top, top_idx = torch.max(x, dim=-1)  # first maximal index, like argmax
                argmax[sl] = top_idx
                shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
                lse[sl] = x.sub_(shift.unsqueeze(1)).exp_().sum(dim=-1).log_().add_(shift)
                del x
        ctx.save_for_backward(b, i, y, is_coord, coord_cols, lse, lse_gate, *params)
        ctx.source = source
        ctx.tau = tau
        ctx.rows_per_chunk = rows_per_chunk
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(argmax, row_finite, row_max_abs)
        return lse, z_y, lse_gate, u, argmax, row_finite, row_max_abs

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any,
        g_lse: torch.Tensor | None,
        g_zy: torch.Tensor | None,
        g_gate: torch.Tensor | None,
        g_u: torch.Tensor | None,
        *_non_differentiable: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        b, i, y, is_coord, coord_cols, lse, lse_gate, *plist = ctx.saved_tensors
        params = tuple(plist)
        source: RowSource = ctx.source
        head: tuple[None, ...] = (None,) * 9
        needs = tuple(bool(x) for x in ctx.needs_input_grad[9:])
        if not any(needs) or all(g is None for g in (g_lse, g_zy, g_gate, g_u)):
            return (*head, *((None,) * len(params)))
        tau: float = ctx.tau
        cd = source.dtype(params)
        vocab = source.vocab(params)
        grads = source.grad_buffers(params, needs)
        n = b.shape[0]
        # Row of each pair inside the [|C|, 1000] u tensor (-1 for non-coord pairs).
        coord_row = torch.cumsum(is_coord.to(torch.int64), 0) - 1
        for start in range(0, n, ctx.rows_per_chunk):
            sl = slice(start, min(n, start + ctx.rows_per_chunk))
            rows_b, rows_i = b[sl], i[sl]
            cm = is_coord[sl]
            local = torch.nonzero(cm, as_tuple=True)[0]
            has_coord = local.numel() > 0
            if g_lse is None and g_zy is None and not (has_coord and (g_gate is not None or g_u is not None)):
                continue  # this chunk's rows get no gradient
            x = source.rows(params, rows_b, rows_i) if g_lse is not None or (has_coord and g_gate is not None) else None
            soft: torch.Tensor | None = None
            if has_coord and g_gate is not None:
                assert x is not None
                xr = x[local]  # a copy, taken before x is modified in place
                inside = torch.isfinite(xr) & (xr.abs() <= LOGIT_BOUND)  # d sanitize / dz
                soft = sanitize(xr).div_(tau).sub_(lse_gate[sl][local].unsqueeze(1)).exp_()
                soft.mul_(g_gate[sl][local].unsqueeze(1) / tau).mul_(inside)
                del xr, inside
            if g_lse is not None:
                assert x is not None
                # softmax(z) · g, computed in place on the chunk's copy of the rows.
                gx = x.sub_(lse[sl].unsqueeze(1)).exp_().mul_(g_lse[sl].unsqueeze(1))
            else:
                gx = torch.zeros((sl.stop - sl.start, vocab), dtype=cd, device=b.device)
            del x
            if g_zy is not None:
                gx.scatter_add_(1, y[sl].unsqueeze(1), g_zy[sl].unsqueeze(1))
            if soft is not None:
                gx.index_add_(0, local, soft)
                del soft
            if has_coord and g_u is not None:
                gx[local.unsqueeze(1), coord_cols.unsqueeze(0)] += g_u[coord_row[sl][local]]
            source.add_row_grads(params, grads, rows_b, rows_i, gx)
            del gx
        return (*head, *source.finish(params, grads))


@attrs.frozen
class CoordLossResult:
    """One micro-batch's contribution (all tensors on the logits' device).

    ``sum_ce``: Σ over N (distributional) or T (pure-CE) of the full-vocab CE, fp32 scalar with graph.
    ``sum_coord``: Σ_C ℓ_coord with graph (0 in pure-CE mode). ``coord_terms``: per-pair UNweighted
    terms of the coord pairs (no grad), or None when the coord block did not run.
    """

    distributional: bool
    sum_ce: torch.Tensor
    sum_coord: torch.Tensor
    num_noncoord: int
    num_coord: int
    num_correct: int
    argmax: torch.Tensor  # [|T|] full-vocab argmax per supervised pair, pair order
    targets: torch.Tensor  # [|T|] target ids, pair order
    is_coord: torch.Tensor  # [|T|] bool
    pair_index: tuple[torch.Tensor, torch.Tensor]  # (b, i): logits row of each pair; its label is labels[b, i + 1]
    coord_terms: dict[str, torch.Tensor] | None
    settings: CoordLossSettings
    source: RowSource = attrs.field(repr=False)
    params: tuple[torch.Tensor, ...] = attrs.field(repr=False)  # (logits,) or (hidden, weight[, head_offsets])
    row_finite: torch.Tensor | None = None  # [|T|] bool, with logit_stats
    row_max_abs: torch.Tensor | None = None  # [|T|] max |z̃| per row, with logit_stats

    @property
    def logits(self) -> torch.Tensor | None:
        """The logits ``[B, L, V]`` of the logits path; None for :meth:`CoordLossKernel.from_hidden`.

        Readers should use :meth:`rows`, :attr:`vocab`, :attr:`device` and :meth:`zero_anchor`,
        which work for both paths.
        """
        return self.params[0] if isinstance(self.source, LogitsRows) else None

    @property
    def vocab(self) -> int:
        return self.source.vocab(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp32 (fp64 for fp64 inputs): the dtype of :meth:`rows`."""
        return self.source.dtype(self.params)

    def rows(self, b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Raw full-vocabulary logits rows at positions (b, i) as a fresh ``[n, V]`` copy in the
        compute dtype, without graph (callers may modify it in place). Read in chunks."""
        with torch.no_grad():
            return self.source.rows(tuple(p.detach() for p in self.params), b, i)

    @property
    def num_supervised(self) -> int:
        return self.num_noncoord + self.num_coord

    @property
    def ce_count(self) -> int:
        return self.num_noncoord if self.distributional else self.num_supervised

    @property
    def has_counted_pairs(self) -> bool:
        return self.ce_count > 0 or (self.distributional and self.num_coord > 0)

    def zero_anchor(self) -> torch.Tensor:
        """``0 · Σ inputs`` connected to the graph (R7): the logits, or hidden, weight and offsets;
        value and gradients are exactly 0 even for inf/NaN inputs."""
        return self.source.zero_anchor(self.params)

    def micro_batch_sums(self) -> MicroBatchSums:
        return MicroBatchSums(
            sum_ce=float(self.sum_ce.detach()),
            sum_coord=float(self.sum_coord.detach()),
            num_noncoord=self.num_noncoord,
            num_coord=self.num_coord,
            distributional=self.distributional,
            num_correct=self.num_correct,
        )

    def coord_block_sums(self) -> CoordBlockSums | None:
        """Sums over C of the coord terms (UNweighted; ``loss`` is Σ ℓ_coord), None if the block did not run."""
        if self.coord_terms is None:
            return None
        if self.num_coord == 0:
            return CoordBlockSums()
        t = self.coord_terms
        names = ("loss", "soft_ce", "w1", "ce", "gate", "mass", "top5_hit", "p_gt", "margin", "abs_err", "w1_to_delta")
        totals = torch.stack([t[n].double().sum() for n in names]).tolist()
        s = dict(zip(names, totals))
        return CoordBlockSums(
            count=self.num_coord,
            loss=s["loss"],
            soft_ce=s["soft_ce"],
            w1=s["w1"],
            ce=s["ce"],
            gate=s["gate"],
            mass=s["mass"],
            top5_hits=s["top5_hit"],
            p_gt=s["p_gt"],
            margin=s["margin"],
            abs_err=s["abs_err"],
            w1_to_delta=s["w1_to_delta"],
            abs_err_p90=quantile_linear(t["abs_err"].double().tolist(), 0.9),
        )


def _coord_terms(
    u: torch.Tensor, lse_gate: torch.Tensor, bins: torch.Tensor, q: torch.Tensor, settings: CoordLossSettings,
    which: frozenset[str] | None,
) -> dict[str, torch.Tensor]:
    """Per-pair coord terms from raw coord-column logits ``u`` [C, 1000] (fp32)."""
    tau = settings.temperature
    out: dict[str, torch.Tensor] = {}

    def want(name: str) -> bool:
        return which is None or name in which

    us = sanitize(u)
    s = us / tau
    log_p = torch.log_softmax(s, dim=-1)
    t = bins.unsqueeze(1)
    if want("soft_ce"):
        out["soft_ce"] = _sanitize_result(-(q * log_p).sum(-1))
    p = torch.exp(log_p)
    p = p / p.sum(-1, keepdim=True)
    if want("w1"):
        out["w1"] = _sanitize_result((torch.cumsum(p, -1) - torch.cumsum(q, -1)).abs().sum(-1) / W1_SCALE)
    if want("gate") or want("mass"):
        gate = _sanitize_result((lse_gate - torch.logsumexp(s, dim=-1)).clamp_min(0.0))
        out["gate"] = gate
        if which is None:
            out["mass"] = _sanitize_result(torch.exp(-gate))
    if want("ce"):
        out["ce"] = _sanitize_result(-torch.log_softmax(us, dim=-1).gather(1, t).squeeze(1))
    if which is None:
        k = torch.arange(NUM_BINS, dtype=u.dtype, device=u.device)
        expected = (p * k).sum(-1)
        tf = bins.to(u.dtype)
        out["expected_bin"] = expected
        out["abs_err"] = (expected - tf).abs()
        out["w1_to_delta"] = (p * (k.unsqueeze(0) - tf.unsqueeze(1)).abs()).sum(-1)
        out["margin"] = s.max(-1).values - s.gather(1, t).squeeze(1)
        out["p_gt"] = p.gather(1, t).squeeze(1)
        out["top5_hit"] = ((us > us.gather(1, t)).sum(-1) < 5).to(u.dtype)
    return out


class CoordLossKernel:
    """The Stage-1 loss for one tokenizer and one ``objective.coord_soft_ce_w1`` block.

    Caches the id->bin table and coord-column ids per (device, V) and the Gaussian target table
    per device (built from ``domain.losses.gaussian_target``, the one owner of that rule).
    """

    def __init__(
        self,
        table: CoordIdTable,
        settings: CoordLossSettings,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        liger: bool | None = None,
    ) -> None:
        self.table = table
        self.settings = settings
        self.chunk_bytes = chunk_bytes
        #: :meth:`from_hidden` text CE through liger-kernel: None = when applicable, False = never,
        #: True = when applicable (the same; liger is never forced where it would compute something else).
        self.liger = liger
        self._bin_tables: dict[tuple[str, int], torch.Tensor] = {}
        self._cols: dict[str, torch.Tensor] = {}
        self._targets: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    # --- caches
    def bin_table(self, device: torch.device, vocab: int) -> torch.Tensor:
        key = (str(device), vocab)
        if key not in self._bin_tables:
            self._bin_tables[key] = torch.as_tensor(self.table.bin_table(vocab), device=device)
        return self._bin_tables[key]

    def coord_columns(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._cols:
            self._cols[key] = torch.as_tensor(np.asarray(self.table.ids, dtype=np.int64), device=device)
        return self._cols[key]

    def target_table(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._targets:
            s = self.settings
            rows = np.stack([gaussian_target(t, s.target_sigma, s.target_truncate) for t in range(NUM_BINS)])
            self._targets[key] = torch.as_tensor(rows, dtype=dtype, device=device)
        return self._targets[key]

    # --- the pre-pass (R6)
    def count_pairs(self, labels: torch.Tensor, vocab: int) -> StepCounts:
        """|N| and |C| of one micro-batch from its labels only (the window pre-pass before any forward)."""
        _check_labels(labels)
        y = labels[:, 1:]
        sup = y != IGNORE_INDEX
        ids = torch.where(sup, y, torch.zeros_like(y)).clamp(0, vocab - 1)
        is_coord = (self.bin_table(labels.device, vocab)[ids] >= 0) & sup
        c = int(is_coord.sum())
        return StepCounts(noncoord=int(sup.sum()) - c, coord=c)

    # --- the kernel
    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        coord_metrics: bool | None = None,
        logit_stats: bool = False,
    ) -> CoordLossResult:
        """Sums and counts of one micro-batch.

        ``coord_metrics`` (pure-CE only): run the coord block as metrics (token-type metrics on,
        tokens mode). In distributional mode the block always runs. ``logit_stats``: also measure
        per supervised row finiteness and max |z̃| (instability monitor, §5 step 1).
        """
        _check_labels(labels)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise StepError(
                f"logits must be [B, L, V] matching labels [B, L] = {list(labels.shape)}; got {shape} "
                "(logits trimming and fused CE kernels are not allowed on Stage-1)"
            )
        self._check_vocab(int(logits.shape[-1]), f"logits {list(logits.shape)}, labels {list(labels.shape)}")
        return self._run(LogitsRows(), (logits,), labels, coord_metrics, logit_stats)

    def offset_columns(self, device: torch.device) -> torch.Tensor:
        """The coord ids in ascending order: the row order of the coord-offset adapter's head offsets."""
        key = "offsets:" + str(device)
        if key not in self._cols:
            self._cols[key] = torch.as_tensor(np.asarray(sorted(self.table.ids), dtype=np.int64), device=device)
        return self._cols[key]

    def from_hidden(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        head_offsets: torch.Tensor | None = None,
        coord_metrics: bool | None = None,
        logit_stats: bool = False,
    ) -> CoordLossResult:
        """The same sums and counts as ``self(hidden @ weight.T (+ offsets), labels)`` without the logits.

        ``hidden`` [B, L, H]: the final hidden states (position i gives the logits row i, whose pair
        predicts ``labels[b, i + 1]``); ``weight`` [V, H]: the output-embedding (LM-head) weight, no
        bias; ``head_offsets`` [1000, H]: the coord-offset adapter's head table
        (``CoordOffsetAdapter.head_table``), rows in ASCENDING coord-id order, added at the coord
        columns as its head hook does. Rows are computed chunk by chunk (forward and again in
        backward); neither ``[B, L, V]`` nor ``[|T|, V]`` is ever materialised. With the kernel's
        ``liger`` switch on (auto: CUDA + liger-kernel installed + no head offsets), the text CE
        (non-coord rows; every row in pure-CE mode) and its gradient come from liger-kernel's fused
        linear cross-entropy instead.
        """
        _check_labels(labels)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise StepError(f"hidden must be [B, L, H] matching labels [B, L] = {list(labels.shape)}; got {shape}")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or int(weight.shape[1]) != int(hidden.shape[2]):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise StepError(f"weight must be [V, H] with H = {int(hidden.shape[2])} (hidden {list(hidden.shape)}); got {shape}")
        params: tuple[torch.Tensor, ...] = (hidden, weight)
        offset_cols = None
        if head_offsets is not None:
            if not isinstance(head_offsets, torch.Tensor) or tuple(head_offsets.shape) != (NUM_BINS, int(hidden.shape[2])):
                shape = tuple(head_offsets.shape) if isinstance(head_offsets, torch.Tensor) else type(head_offsets).__name__
                raise StepError(f"head_offsets must be [{NUM_BINS}, {int(hidden.shape[2])}]; got {shape}")
            params = (hidden, weight, head_offsets)
            offset_cols = self.offset_columns(hidden.device)
        self._check_vocab(int(weight.shape[0]), f"weight {list(weight.shape)}, labels {list(labels.shape)}")
        return self._run(HiddenRows(offset_cols), params, labels, coord_metrics, logit_stats)

    def _use_liger(self, source: RowSource, params: tuple[torch.Tensor, ...]) -> bool:
        if self.liger is False or not isinstance(source, HiddenRows):
            return False
        return liger_applicable(params[0], params[1], params[2] if len(params) > 2 else None)

    def _check_vocab(self, vocab: int, shapes: str) -> None:
        if vocab < self.table.max_id + 1:
            raise StepError(f"logits vocab size {vocab} < 1 + max coord id {self.table.max_id} ({shapes})")

    def _run(
        self,
        source: RowSource,
        params: tuple[torch.Tensor, ...],
        labels: torch.Tensor,
        coord_metrics: bool | None,
        logit_stats: bool,
    ) -> CoordLossResult:
        s = self.settings
        vocab = source.vocab(params)
        dev = params[0].device
        y_all = labels[:, 1:].to(dev)
        b, i = torch.nonzero(y_all != IGNORE_INDEX, as_tuple=True)
        y = y_all[b, i].long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= vocab):
            j = int(torch.nonzero((y < 0) | (y >= vocab))[0])
            raise StepError(
                f"label {int(y[j])} at labels[{int(b[j])}, {int(i[j]) + 1}] is outside the logits vocabulary [0, {vocab})"
            )
        bins_all = self.bin_table(dev, vocab)[y]
        is_coord = bins_all >= 0
        bins = bins_all[is_coord]
        n_sup = int(y.numel())
        n_coord = int(is_coord.sum())
        run_block = s.enabled or bool(coord_metrics)

        lse, z_y, lse_gate, u, argmax, row_finite, row_max_abs = _SupervisedRows.apply(
            source, b, i, y, is_coord if run_block else torch.zeros_like(is_coord), self.coord_columns(dev),
            float(s.temperature), _rows_per_chunk(vocab, self.chunk_bytes), bool(logit_stats), *params,
        )
        ce_rows = ~is_coord if s.enabled else torch.ones_like(is_coord)
        cd = source.dtype(params)
        if not bool(ce_rows.any()):
            sum_ce = torch.zeros((), dtype=cd, device=dev)
        elif self._use_liger(source, params):
            # The same Σ ce over the CE rows, value and gradient from liger's fused linear CE.
            hidden, weight = params[0], params[1]
            sum_ce = liger_text_ce_sum(hidden[b[ce_rows], i[ce_rows]], weight, y[ce_rows]).to(cd)
        else:
            sum_ce = (lse - z_y)[ce_rows].sum()
        num_correct = int((argmax == y).sum())

        sum_coord = torch.zeros((), dtype=cd, device=dev)
        terms: dict[str, torch.Tensor] | None = None
        if run_block:
            q = self.target_table(dev, cd)[bins]
            gate_c = lse_gate[is_coord]
            weights = {"ce": s.ce_weight, "soft_ce": s.soft_ce_weight, "w1": s.w1_weight, "gate": s.gate_weight}
            if s.enabled and n_coord > 0:
                # Only weighted terms carry gradient; zero-weight terms are computed below without it.
                graded = frozenset(k for k, w in weights.items() if w > 0)
                g = _coord_terms(u, gate_c, bins, q, s, graded)
                sum_coord = sum((weights[k] * g[k] for k in graded), start=torch.zeros((), dtype=cd, device=dev)).sum()
            with torch.no_grad():
                terms = _coord_terms(u.detach(), gate_c.detach(), bins, q, s, None)
                terms["loss"] = sum(weights[k] * terms[k] for k in weights)  # type: ignore[assignment]
                terms["bin"] = bins
        return CoordLossResult(
            distributional=s.enabled,
            sum_ce=sum_ce,
            sum_coord=sum_coord,
            num_noncoord=n_sup - n_coord,
            num_coord=n_coord,
            num_correct=num_correct,
            argmax=argmax,
            targets=y,
            is_coord=is_coord,
            pair_index=(b, i),
            coord_terms=terms,
            settings=s,
            source=source,
            params=params,
            row_finite=row_finite if logit_stats else None,
            row_max_abs=row_max_abs if logit_stats else None,
        )


def _check_labels(labels: object) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise StepError(f"labels must be an int64 tensor [B, L], got {shape}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise StepError(f"labels must be an integer tensor [B, L], got dtype {labels.dtype}")


def coord_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    table: CoordIdTable,
    settings: CoordLossSettings,
    *,
    coord_metrics: bool | None = None,
    logit_stats: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CoordLossResult:
    """One-shot form of :class:`CoordLossKernel` (no caching across calls)."""
    return CoordLossKernel(table, settings, chunk_bytes)(
        logits, labels, coord_metrics=coord_metrics, logit_stats=logit_stats
    )


def lambda_for_backward(result: CoordLossResult, n_step: int, c_step: int, world_size: int) -> torch.Tensor:
    """The value micro-batch m on rank r returns for backward (R3), or the R7 zero when nothing counts.

    ``n_step`` / ``c_step`` are the window's global counts from the pre-pass (R6). Pure-CE: pass
    ``n_step = T_step`` (``c_step`` is ignored). No /G and no second ×W may be applied afterwards.
    """
    if not result.has_counted_pairs:
        return result.zero_anchor()
    sum_coord = result.sum_coord if result.distributional else torch.zeros_like(result.sum_ce)
    try:
        return micro_batch_lambda(result.sum_ce, sum_coord, n_step, c_step if result.distributional else 0, world_size)
    except InvariantViolation as exc:
        raise StepError(str(exc)) from exc


def guarded_zero(logits: torch.Tensor) -> torch.Tensor:
    """``0 · Σ sanitised logits`` (instability guard, §5 step 7): a graph-connected exact zero.

    Sanitising the sum instead of every logit gives the same value and zero gradients without a
    full-size copy.
    """
    z = logits.sum(dtype=compute_dtype(logits)) * 0.0
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)


def micro_step_stats(result: CoordLossResult) -> MicroStepStats:
    """The instability monitor's inputs (§5 step 1) from a kernel call made with ``logit_stats=True``."""
    if result.row_finite is None or result.row_max_abs is None:
        raise StepError("micro_step_stats needs a kernel result computed with logit_stats=True")
    n = result.num_supervised
    return MicroStepStats(
        loss=micro_batch_objective(result.micro_batch_sums()),
        supervised_tokens=n,
        finite_logits=bool(result.row_finite.all()) if n else True,
        max_abs_logit=float(result.row_max_abs.max()) if n else 0.0,
        token_acc=result.num_correct / n if n else None,
    )

