"""Stage-1 loss kernel in torch (stage1.md §1.2-§1.4; float64 reference: ``domain.losses``).

Given one micro-batch's full-vocabulary logits ``[B, L, V]`` and labels ``[B, L]`` it returns the
sums and counts the step objective needs (Σ_N ce or Σ_T ce, Σ_C ℓ_coord, |N|, |C|, |T|), the
``token_acc`` numerator and the coord-block diagnostics. ``lambda_for_backward`` turns the sums and
the step's global counts into the value a micro-batch returns for backward (R3, R7).

Memory: the full-vocabulary work (log-sum-exp for CE and gate, argmax, their gradients) runs in
fp32 over chunks of supervised rows inside one autograd function that saves only the logits it
was given and per-row scalars; backward recomputes each chunk's softmax and writes one gradient
buffer. No second full-vocabulary copy of the logits exists beyond one chunk. The coord terms
work on the ``[|C|, 1000]`` coord columns only. Labels are read, never modified.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch
from torch.autograd.function import once_differentiable

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


class _SupervisedRows(torch.autograd.Function):
    """Full-vocabulary statistics of the supervised rows, chunk by chunk, in fp32.

    Inputs: logits [B, L, V]; per supervised pair its (b, i) position, target id y, and whether it
    is a coord pair; ``coord_cols`` the 1000 coord ids in bin order; τ; rows per chunk.
    Outputs (pair order): ``lse`` = LSE(z) and ``z_y`` = z[y] (raw fp32), ``lse_gate`` =
    LSE(z̃/τ) (coord pairs, 0 elsewhere), ``u`` = z[coord cols] of the coord pairs [|C|, 1000],
    and, not differentiable, ``argmax`` (int64) and, when ``logit_stats``, per row ``finite`` (all
    entries finite) and ``max_abs`` (max |z̃| after sanitising) for the instability monitor.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        b: torch.Tensor,
        i: torch.Tensor,
        y: torch.Tensor,
        is_coord: torch.Tensor,
        coord_cols: torch.Tensor,
        tau: float,
        rows_per_chunk: int,
        logit_stats: bool,
    ) -> tuple[torch.Tensor, ...]:
        n = b.shape[0]
        dev = logits.device
        cd = compute_dtype(logits)
        lse = torch.empty(n, dtype=cd, device=dev)
        z_y = torch.empty(n, dtype=cd, device=dev)
        lse_gate = torch.zeros(n, dtype=cd, device=dev)
        argmax = torch.empty(n, dtype=torch.int64, device=dev)
        m = n if logit_stats else 0
        row_finite = torch.ones(m, dtype=torch.bool, device=dev)
        row_max_abs = torch.zeros(m, dtype=cd, device=dev)
        coord_pos = torch.nonzero(is_coord, as_tuple=True)[0]
        u = logits[b[coord_pos].unsqueeze(1), i[coord_pos].unsqueeze(1), coord_cols.unsqueeze(0)].to(cd)
        for start in range(0, n, rows_per_chunk):
            sl = slice(start, min(n, start + rows_per_chunk))
            # Advanced indexing copies the rows, so the chunk may be modified in place below.
            x = logits[b[sl], i[sl]].to(cd)
            z_y[sl] = x.gather(1, y[sl].unsqueeze(1)).squeeze(1)
            if logit_stats:
                row_finite[sl] = torch.isfinite(x).all(dim=-1)
                row_max_abs[sl] = sanitize(x).abs_().amax(dim=-1)
            cm = is_coord[sl]
            if bool(cm.any()):
                xc = sanitize(x[cm]).div_(tau)
                lse_gate[start + torch.nonzero(cm, as_tuple=True)[0]] = torch.logsumexp(xc, dim=-1)
                del xc
            top, top_idx = torch.max(x, dim=-1)  # first maximal index, like argmax
            argmax[sl] = top_idx
            shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            lse[sl] = x.sub_(shift.unsqueeze(1)).exp_().sum(dim=-1).log_().add_(shift)
            del x
        ctx.save_for_backward(logits, b, i, y, is_coord, coord_cols, lse, lse_gate)
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
        logits, b, i, y, is_coord, coord_cols, lse, lse_gate = ctx.saved_tensors
        none8: tuple[None, ...] = (None,) * 8
        if not ctx.needs_input_grad[0] or all(g is None for g in (g_lse, g_zy, g_gate, g_u)):
            return (None, *none8)
        tau: float = ctx.tau
        cd = compute_dtype(logits)
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        n = b.shape[0]
        # Row of each pair inside the [|C|, 1000] u tensor (-1 for non-coord pairs).
        coord_row = torch.cumsum(is_coord.to(torch.int64), 0) - 1
        for start in range(0, n, ctx.rows_per_chunk):
            sl = slice(start, min(n, start + ctx.rows_per_chunk))
            rows_b, rows_i = b[sl], i[sl]
            if g_lse is not None:
                # softmax(z) · g, computed in place on the chunk's copy of the rows.
                gx = logits[rows_b, rows_i].to(cd)
                gx.sub_(lse[sl].unsqueeze(1)).exp_().mul_(g_lse[sl].unsqueeze(1))
            else:
                gx = torch.zeros((sl.stop - sl.start, logits.shape[-1]), dtype=cd, device=logits.device)
            if g_zy is not None:
                gx.scatter_add_(1, y[sl].unsqueeze(1), g_zy[sl].unsqueeze(1))
            cm = is_coord[sl]
            if bool(cm.any()):
                local = torch.nonzero(cm, as_tuple=True)[0]
                if g_gate is not None:
                    xr = logits[rows_b[local], rows_i[local]].to(cd)
                    inside = torch.isfinite(xr) & (xr.abs() <= LOGIT_BOUND)  # d sanitize / dz
                    soft = sanitize(xr).div_(tau).sub_(lse_gate[sl][local].unsqueeze(1)).exp_()
                    soft.mul_(g_gate[sl][local].unsqueeze(1) / tau).mul_(inside)
                    gx.index_add_(0, local, soft)
                    del xr, inside, soft
                if g_u is not None:
                    gx[local.unsqueeze(1), coord_cols.unsqueeze(0)] += g_u[coord_row[sl][local]]
            grad[rows_b, rows_i] = gx.to(grad.dtype)
            del gx
        return (grad, *none8)


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
    logits: torch.Tensor = attrs.field(repr=False)
    row_finite: torch.Tensor | None = None  # [|T|] bool, with logit_stats
    row_max_abs: torch.Tensor | None = None  # [|T|] max |z̃| per row, with logit_stats

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
        """``0 · Σ logits`` connected to the graph (R7); value and gradient are exactly 0 even for inf/NaN logits."""
        return guarded_zero(self.logits)

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
        self, table: CoordIdTable, settings: CoordLossSettings, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.table = table
        self.settings = settings
        self.chunk_bytes = chunk_bytes
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
        s = self.settings
        _check_labels(labels)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise StepError(
                f"logits must be [B, L, V] matching labels [B, L] = {list(labels.shape)}; got {shape} "
                "(logits trimming and fused CE kernels are not allowed on Stage-1)"
            )
        vocab = int(logits.shape[-1])
        if vocab < self.table.max_id + 1:
            raise StepError(
                f"logits vocab size {vocab} < 1 + max coord id {self.table.max_id} "
                f"(logits {list(logits.shape)}, labels {list(labels.shape)})"
            )
        dev = logits.device
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
            logits, b, i, y, is_coord if run_block else torch.zeros_like(is_coord), self.coord_columns(dev),
            float(s.temperature), _rows_per_chunk(vocab, self.chunk_bytes), bool(logit_stats),
        )
        ce = lse - z_y
        ce_rows = ~is_coord if s.enabled else torch.ones_like(is_coord)
        cd = compute_dtype(logits)
        sum_ce = ce[ce_rows].sum() if bool(ce_rows.any()) else torch.zeros((), dtype=cd, device=dev)
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
            logits=logits,
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

