"""Stage-2 AB geometry loss in torch (stage2.md §10; float64 reference: ``domain.stage2_geometry``).

One forward's coord-column logits ``z_g[p−1, coord_ids]`` at its supervised coord slots (``[4N, 1000]``,
boxes in ``x1, y1, x2, y2`` order, matched-prefix and FN boxes together: one mean, D9) and their GT bins
give every §10 geometry term as a differentiable 0-d tensor:

- expectation decode ``P = softmax(z/τ)``, ``ĉ = Σ_k P(k)·k/999``;
- SmoothL1 (β = ``SMOOTHL1_BETA``) between raw ``ĉ`` and ``c = bin/999``, mean over the 4N coordinates;
- CIoU (canonicalise per axis, clip to [0, 1], clamps ``EPS``, α computed without gradient as in
  torchvision ``complete_box_iou_loss``), mean of ``1 − CIoU`` over boxes, a non-finite per-box value -> 0
  (and no gradient from that box);
- the regularisers ``coord_ce``, ``coord_el1``, ``coord_ehuber`` (δ), ``coord_entropy``, means over slots;
- ``coord`` = the weighted geometry total ``w_sl1·SmoothL1 + w_ciou·CIoU + Σ w·reg`` (``loss/coord``).

Logits of any float dtype are computed in fp32 (fp64 logits stay fp64, for reference checks), like the
Stage-1 kernel. Zero boxes -> every term a graph-connected exact 0 (gradient zeros, never None).
``weighted_ce`` gives ``L_CE = Σ w·ce / Σ w`` (graph-connected 0 when ``Σ w = 0``; no clamp to 1).
Settings and constants come from the domain (``Stage2LossSettings``, ``EPS``, ``SMOOTHL1_BETA``).
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from adapters.torch.coord_loss import compute_dtype, guarded_zero
from domain.coord_tokens import MAX_BIN, NUM_BINS
from domain.errors import InvariantViolation
from domain.stage2_geometry import EPS, SMOOTHL1_BETA, Stage2GeometryTerms, Stage2LossSettings

__all__ = [
    "Stage2GeometryLoss",
    "ciou_loss",
    "ciou_per_box",
    "expectation_decode",
    "geometry_loss",
    "total_loss",
    "weighted_ce",
]


@attrs.frozen
class Stage2GeometryLoss:
    """The §10 geometry terms of one forward, each a 0-d tensor with graph (compute dtype)."""

    n_boxes: int
    bbox_smoothl1: torch.Tensor
    bbox_ciou: torch.Tensor
    coord_ce: torch.Tensor
    coord_el1: torch.Tensor
    coord_ehuber: torch.Tensor
    coord_entropy: torch.Tensor
    coord_reg: torch.Tensor  # w_cce·coord_ce + w_el1·coord_el1 + w_eh·coord_ehuber + w_ent·coord_entropy
    coord: torch.Tensor  # w_sl1·SmoothL1 + w_ciou·CIoU + coord_reg: the weighted geometry total

    def terms(self) -> Stage2GeometryTerms:
        """The unweighted values as the domain's terms (for the ``loss/*`` metrics; host sync)."""
        return Stage2GeometryTerms(
            n_boxes=self.n_boxes,
            bbox_smoothl1=float(self.bbox_smoothl1.detach()),
            bbox_ciou=float(self.bbox_ciou.detach()),
            coord_ce=float(self.coord_ce.detach()),
            coord_el1=float(self.coord_el1.detach()),
            coord_ehuber=float(self.coord_ehuber.detach()),
            coord_entropy=float(self.coord_entropy.detach()),
        )


# ----------------------------------------------------------------------------- elementary formulas


def _check_logits(coord_logits: torch.Tensor) -> None:
    if not isinstance(coord_logits, torch.Tensor) or coord_logits.dim() != 2 or int(coord_logits.shape[1]) != NUM_BINS:
        shape = tuple(coord_logits.shape) if isinstance(coord_logits, torch.Tensor) else type(coord_logits).__name__
        raise InvariantViolation(f"coord logits must have shape [S, {NUM_BINS}]; got {shape}")
    if not coord_logits.is_floating_point():
        raise InvariantViolation(f"coord logits must be floating point; got {coord_logits.dtype}")


def _bin_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(NUM_BINS, dtype=dtype, device=device) / MAX_BIN


def _coord_log_probs(coord_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise InvariantViolation(f"softctx_temperature must be > 0; got {temperature}")
    z = coord_logits.to(compute_dtype(coord_logits))
    return torch.log_softmax(z / temperature, dim=-1)


def expectation_decode(coord_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``ĉ = Σ_k softmax(z/τ)(k)·k/999`` per slot (compute dtype), differentiable."""
    _check_logits(coord_logits)
    p = _coord_log_probs(coord_logits, temperature).exp()
    return p @ _bin_values(p.dtype, p.device)


def _boxes(x: torch.Tensor) -> torch.Tensor:
    b = x.reshape(-1, 4) if x.dim() == 1 else x
    if b.dim() != 2 or int(b.shape[1]) != 4:
        raise InvariantViolation(f"boxes must have shape [N, 4]; got {tuple(x.shape)}")
    return b


def _canonical(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x1, x2 = torch.minimum(b[:, 0], b[:, 2]), torch.maximum(b[:, 0], b[:, 2])
    y1, y2 = torch.minimum(b[:, 1], b[:, 3]), torch.maximum(b[:, 1], b[:, 3])
    return x1.clamp(0.0, 1.0), y1.clamp(0.0, 1.0), x2.clamp(0.0, 1.0), y2.clamp(0.0, 1.0)


def ciou_per_box(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``CIoU = IoU − ρ²/c² − α·v`` per box pair (§10), α without gradient; non-finite entries as they are."""
    p, g = _boxes(pred), _boxes(gt)
    if p.shape != g.shape:
        raise InvariantViolation(f"{p.shape[0]} predicted boxes for {g.shape[0]} GT boxes")
    g = g.to(p.dtype)
    px1, py1, px2, py2 = _canonical(p)
    gx1, gy1, gx2, gy2 = _canonical(g)
    wp = (px2 - px1).clamp_min(EPS)
    hp = (py2 - py1).clamp_min(EPS)
    wg = (gx2 - gx1).clamp_min(EPS)
    hg = (gy2 - gy1).clamp_min(EPS)
    iw = (torch.minimum(px2, gx2) - torch.maximum(px1, gx1)).clamp_min(0.0)
    ih = (torch.minimum(py2, gy2) - torch.maximum(py1, gy1)).clamp_min(0.0)
    inter = iw * ih
    union = (wp * hp + wg * hg - inter).clamp_min(EPS)
    iou = inter / union
    rho2 = ((px1 + px2) / 2 - (gx1 + gx2) / 2) ** 2 + ((py1 + py2) / 2 - (gy1 + gy2) / 2) ** 2
    cw = torch.maximum(px2, gx2) - torch.minimum(px1, gx1)
    ch = torch.maximum(py2, gy2) - torch.minimum(py1, gy1)
    c2 = (cw * cw + ch * ch).clamp_min(EPS)
    v = (4 / math.pi**2) * (torch.atan(wg / hg) - torch.atan(wp / hp)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + EPS)
    return iou - rho2 / c2 - alpha * v


def ciou_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 − CIoU`` over boxes; a non-finite per-box loss counts as 0 and sends no gradient.

    Boxes with a non-finite coordinate are evaluated on a finite stand-in (so their zero contribution
    cannot turn the other boxes' gradients into NaN). No boxes -> a graph-connected 0.
    """
    p, g = _boxes(pred), _boxes(gt)
    if p.shape != g.shape:
        raise InvariantViolation(f"{p.shape[0]} predicted boxes for {g.shape[0]} GT boxes")
    if p.shape[0] == 0:
        return guarded_zero(p)
    g = g.to(p.dtype)
    ok = torch.isfinite(p).all(dim=1) & torch.isfinite(g).all(dim=1)
    safe_p = torch.where(ok.unsqueeze(1), p, torch.zeros_like(p))
    safe_g = torch.where(ok.unsqueeze(1), g, torch.zeros_like(g))
    per_box = 1.0 - ciou_per_box(safe_p, safe_g)
    keep = ok & torch.isfinite(per_box)
    return torch.where(keep, per_box, torch.zeros_like(per_box)).mean()


def _huber_delta(d: torch.Tensor, delta: float) -> torch.Tensor:
    """``0.5·d²/δ`` if ``|d| < δ`` else ``|d| − 0.5δ`` (the ``coord_ehuber`` branch of §10)."""
    a = d.abs()
    return torch.where(a < delta, 0.5 * a * a / delta, a - 0.5 * delta)


# ----------------------------------------------------------------------------- the loss of one forward


def _targets(gt_bins: torch.Tensor, n_slots: int, device: torch.device) -> torch.Tensor:
    if not isinstance(gt_bins, torch.Tensor) or gt_bins.is_floating_point() or gt_bins.is_complex():
        kind = gt_bins.dtype if isinstance(gt_bins, torch.Tensor) else type(gt_bins).__name__
        raise InvariantViolation(f"GT bins must be an integer tensor; got {kind}")
    b = gt_bins.reshape(-1).to(device=device, dtype=torch.int64)
    if b.numel() != n_slots:
        raise InvariantViolation(f"{b.numel()} GT bins for {n_slots} coord slots")
    if b.numel() and (int(b.min()) < 0 or int(b.max()) > MAX_BIN):
        raise InvariantViolation(f"GT bins must lie in 0..{MAX_BIN}")
    return b


def geometry_loss(coord_logits: torch.Tensor, gt_bins: torch.Tensor, settings: Stage2LossSettings) -> Stage2GeometryLoss:
    """§10 geometry and regularisers over all boxes of one forward (slots grouped by 4, ``x1, y1, x2, y2``).

    ``coord_logits`` [4N, 1000]: the coord columns (bin order) of the logits rows that predict the coord
    slots, any float dtype (computed in fp32); ``gt_bins`` [4N] integer GT bins.
    """
    _check_logits(coord_logits)
    n_slots = int(coord_logits.shape[0])
    if n_slots % 4:
        raise InvariantViolation(f"{n_slots} coord slots is not a whole number of boxes (4 per box)")
    bins = _targets(gt_bins, n_slots, coord_logits.device)
    s = settings
    n = n_slots // 4
    if n == 0:
        zero = guarded_zero(coord_logits)
        return Stage2GeometryLoss(0, zero, zero, zero, zero, zero, zero, zero, zero)
    log_p = _coord_log_probs(coord_logits, s.softctx_temperature)
    p = log_p.exp()
    values = _bin_values(p.dtype, p.device)
    c_hat = p @ values
    c = bins.to(p.dtype) / MAX_BIN
    d = values.unsqueeze(0) - c.unsqueeze(1)  # k/999 − c per slot and bin
    sl1 = F.smooth_l1_loss(c_hat, c, reduction="mean", beta=SMOOTHL1_BETA)
    ciou = ciou_loss(c_hat.reshape(n, 4), c.reshape(n, 4))
    cce = -log_p.gather(1, bins.unsqueeze(1)).squeeze(1).mean()
    el1 = (p * d.abs()).sum(dim=1).mean()
    ehuber = (p * _huber_delta(d, s.coord_huber_delta)).sum(dim=1).mean()
    plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))
    entropy = -plogp.sum(dim=1).mean()
    reg = (
        s.coord_ce_weight * cce
        + s.coord_el1_weight * el1
        + s.coord_ehuber_weight * ehuber
        + s.coord_entropy_weight * entropy
    )
    coord = s.bbox_smoothl1_weight * sl1 + s.bbox_ciou_weight * ciou + reg
    return Stage2GeometryLoss(n, sl1, ciou, cce, el1, ehuber, entropy, reg, coord)


def weighted_ce(ce_per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``L_CE = Σ w_t·ce_t / Σ w_t`` over the forward's supervised positions (fp32, fp64 stays fp64).

    ``Σ w = 0`` -> a graph-connected exact 0 (gradient zeros); the denominator is never clamped to 1.
    """
    if not isinstance(ce_per_token, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise InvariantViolation("weighted_ce expects tensors")
    ce = ce_per_token.reshape(-1)
    w = weights.reshape(-1).to(device=ce.device)
    if ce.shape != w.shape:
        raise InvariantViolation(f"{ce.numel()} CE values for {w.numel()} weights")
    cd = compute_dtype(ce) if ce.is_floating_point() else torch.float32
    ce = ce.to(cd)
    w = w.to(cd)
    total_w = w.sum()
    if float(total_w.detach()) == 0.0:
        return guarded_zero(ce) + guarded_zero(w) if w.requires_grad else guarded_zero(ce)
    return (w * ce).sum() / total_w


def total_loss(l_ce: torch.Tensor, geometry: Stage2GeometryLoss) -> torch.Tensor:
    """``L = L_CE + w_sl1·SmoothL1 + w_ciou·CIoU + w_cce·coord_ce + w_el1·coord_el1 + w_eh·coord_ehuber
    + w_ent·coord_entropy`` (the weights were applied by :func:`geometry_loss`)."""
    return l_ce + geometry.coord
