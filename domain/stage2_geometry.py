"""Stage-2 AB losses, float64 reference (stage2.md §10): the oracle the torch loss kernel is tested against.

Both channels share one loss. Inputs are the coord-column logits ``z_g[p−1, coord_ids]`` of every supervised
coord slot (``[4N, 1000]``, boxes in ``x1, y1, x2, y2`` order) and the GT bins of those slots:

- expectation decode ``P = softmax(z/τ)``, ``ĉ = Σ_k P(k)·k/999`` (equal mass at bins 0 and 999 -> 0.5);
- SmoothL1 (β = 1) between raw ``ĉ`` and ``c = bin/999``, mean over the 4N coordinates;
- CIoU exactly as §10 (canonicalise per axis, clip to [0, 1], clamps 1e−7, α held constant), mean of
  ``1 − CIoU`` over boxes, a non-finite per-box value -> 0;
- the optional regularisers ``coord_ce``, ``coord_el1``, ``coord_ehuber`` (δ), ``coord_entropy``, means over
  slots; and the weighted total ``L = L_CE + w_sl1·SmoothL1 + w_ciou·CIoU + Σ w·reg``.

Matched-prefix and FN boxes of a forward form one mean (D9): pass them together. No boxes -> geometry 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

from domain.coord_tokens import MAX_BIN, NUM_BINS
from domain.errors import ConfigError, InvariantViolation
from domain.losses import log_softmax

FloatArray = npt.NDArray[np.float64]

EPS = 1e-7
SMOOTHL1_BETA = 1.0
LOSSES_KEY = "stage2_ab.losses"
_BIN_VALUES = np.arange(NUM_BINS, dtype=np.float64) / MAX_BIN


# ----------------------------------------------------------------------------- settings


def _number(key: str, value: object, lo: float, hi: float, *, open_lo: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{LOSSES_KEY}.{key}: expected a finite number, got {value!r}")
    if value < lo or (open_lo and value == lo) or value > hi:
        bound = f"> {lo}" if open_lo else f">= {lo}"
        raise ConfigError(f"{LOSSES_KEY}.{key}: must be {bound}, got {value}")


def _nonneg(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    _number(attribute.name, value, 0.0, math.inf)


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    _number(attribute.name, value, 0.0, math.inf, open_lo=True)


def _signed(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    _number(attribute.name, value, -math.inf, math.inf)


def _delta(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    _number(attribute.name, value, 1e-6, math.inf)


@attrs.frozen
class Stage2LossSettings:
    """``stage2_ab.losses`` geometry keys (§20) with the schema's defaults; a bad value names its dotted key."""

    softctx_temperature: float = attrs.field(default=1.0, validator=_positive)
    bbox_smoothl1_weight: float = attrs.field(default=1.0, validator=_nonneg)
    bbox_ciou_weight: float = attrs.field(default=1.0, validator=_nonneg)
    coord_ce_weight: float = attrs.field(default=0.0, validator=_nonneg)
    coord_el1_weight: float = attrs.field(default=0.0, validator=_nonneg)
    coord_ehuber_weight: float = attrs.field(default=0.0, validator=_nonneg)
    coord_entropy_weight: float = attrs.field(default=0.0, validator=_signed)  # + spreads, − sharpens
    coord_huber_delta: float = attrs.field(default=0.001, validator=_delta)


# ----------------------------------------------------------------------------- elementary formulas


def _slots(coord_logits: npt.ArrayLike) -> FloatArray:
    z = np.asarray(coord_logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != NUM_BINS:
        raise InvariantViolation(f"coord logits must have shape [S, {NUM_BINS}]; got {z.shape}")
    return z


def _targets(gt_bins: npt.ArrayLike, n_slots: int) -> npt.NDArray[np.int64]:
    b = np.asarray(gt_bins, dtype=np.int64).reshape(-1)
    if b.size != n_slots:
        raise InvariantViolation(f"{b.size} GT bins for {n_slots} coord slots")
    if b.size and (int(b.min()) < 0 or int(b.max()) > MAX_BIN):
        raise InvariantViolation(f"GT bins must lie in 0..{MAX_BIN}")
    return b


def coord_log_probs(coord_logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """``log softmax(z / τ)`` over the 1000 coord columns of each slot."""
    if not temperature > 0:
        raise InvariantViolation(f"softctx_temperature must be > 0; got {temperature}")
    return log_softmax(_slots(coord_logits) / temperature, axis=-1)


def expectation_decode(coord_logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """``ĉ = Σ_k P(k)·k/999`` per slot, in [0, 1]."""
    p = np.exp(coord_log_probs(coord_logits, temperature))
    out: FloatArray = p @ _BIN_VALUES
    return out


def smooth_l1(pred: npt.ArrayLike, target: npt.ArrayLike, beta: float = SMOOTHL1_BETA) -> float:
    """Huber with β: ``0.5·d²/β`` if ``|d| < β`` else ``|d| − 0.5β``, mean over elements; 0 when empty."""
    d = np.abs(
        np.asarray(pred, dtype=np.float64).reshape(-1) - np.asarray(target, dtype=np.float64).reshape(-1)
    )
    if d.size == 0:
        return 0.0
    return float(np.mean(np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)))


def _boxes(x: npt.ArrayLike) -> FloatArray:
    b = np.asarray(x, dtype=np.float64)
    if b.ndim == 1:
        b = b.reshape(-1, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise InvariantViolation(f"boxes must have shape [N, 4]; got {b.shape}")
    return b


def canonical_boxes(boxes: npt.ArrayLike) -> FloatArray:
    """Per axis ``(min, max)``, then clipped to [0, 1]: ``[x1, y1, x2, y2]`` rows."""
    b = _boxes(boxes)
    x1, x2 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
    y1, y2 = np.minimum(b[:, 1], b[:, 3]), np.maximum(b[:, 1], b[:, 3])
    out: FloatArray = np.clip(np.stack([x1, y1, x2, y2], axis=1), 0.0, 1.0)
    return out


def ciou_per_box(pred: npt.ArrayLike, gt: npt.ArrayLike) -> FloatArray:
    """``CIoU = IoU − ρ²/c² − α·v`` per box pair (§10); non-finite entries are returned as they are."""
    p, g = canonical_boxes(pred), canonical_boxes(gt)
    if p.shape != g.shape:
        raise InvariantViolation(f"{p.shape[0]} predicted boxes for {g.shape[0]} GT boxes")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        wp = np.maximum(p[:, 2] - p[:, 0], EPS)
        hp = np.maximum(p[:, 3] - p[:, 1], EPS)
        wg = np.maximum(g[:, 2] - g[:, 0], EPS)
        hg = np.maximum(g[:, 3] - g[:, 1], EPS)
        iw = np.maximum(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0.0)
        ih = np.maximum(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0.0)
        inter = iw * ih
        union = np.maximum(wp * hp + wg * hg - inter, EPS)
        iou = inter / union
        rho2 = ((p[:, 0] + p[:, 2]) / 2 - (g[:, 0] + g[:, 2]) / 2) ** 2 + (
            (p[:, 1] + p[:, 3]) / 2 - (g[:, 1] + g[:, 3]) / 2
        ) ** 2
        cw = np.maximum(p[:, 2], g[:, 2]) - np.minimum(p[:, 0], g[:, 0])
        ch = np.maximum(p[:, 3], g[:, 3]) - np.minimum(p[:, 1], g[:, 1])
        c2 = np.maximum(cw * cw + ch * ch, EPS)
        v = (4 / math.pi**2) * (np.arctan(wg / hg) - np.arctan(wp / hp)) ** 2
        alpha = v / (1 - iou + v + EPS)  # a constant in the torch kernel (no gradient), as torchvision
        out: FloatArray = iou - rho2 / c2 - alpha * v
    return out


def ciou_loss(pred: npt.ArrayLike, gt: npt.ArrayLike) -> float:
    """Mean of ``1 − CIoU`` over boxes; a non-finite per-box loss counts as 0; 0 with no boxes."""
    per_box = 1.0 - ciou_per_box(pred, gt)
    if per_box.size == 0:
        return 0.0
    return float(np.mean(np.where(np.isfinite(per_box), per_box, 0.0)))


def huber_delta(d: FloatArray, delta: float) -> FloatArray:
    """``0.5·d²/δ`` if ``|d| < δ`` else ``|d| − 0.5δ`` (the ``coord_ehuber`` branch of §10)."""
    a = np.abs(d)
    out: FloatArray = np.where(a < delta, 0.5 * a * a / delta, a - 0.5 * delta)
    return out


# ----------------------------------------------------------------------------- the loss of one forward


@attrs.frozen
class Stage2GeometryTerms:
    """The unweighted geometry terms of one forward (the values behind the §18.3 ``loss/*`` keys)."""

    n_boxes: int
    bbox_smoothl1: float
    bbox_ciou: float
    coord_ce: float
    coord_el1: float
    coord_ehuber: float
    coord_entropy: float

    def coord_reg(self, s: Stage2LossSettings) -> float:
        """``loss/coord_reg``: the weighted sum of the four regularisers."""
        return (
            s.coord_ce_weight * self.coord_ce
            + s.coord_el1_weight * self.coord_el1
            + s.coord_ehuber_weight * self.coord_ehuber
            + s.coord_entropy_weight * self.coord_entropy
        )

    def coord(self, s: Stage2LossSettings) -> float:
        """``loss/coord``: weighted geometry plus regularisers."""
        return (
            s.bbox_smoothl1_weight * self.bbox_smoothl1
            + s.bbox_ciou_weight * self.bbox_ciou
            + self.coord_reg(s)
        )

    def loss_metrics(self, s: Stage2LossSettings) -> dict[str, float]:
        return {
            "loss/bbox_smoothl1": self.bbox_smoothl1,
            "loss/bbox_ciou": self.bbox_ciou,
            "loss/coord_ce": self.coord_ce,
            "loss/coord_el1": self.coord_el1,
            "loss/coord_ehuber": self.coord_ehuber,
            "loss/coord_entropy": self.coord_entropy,
            "loss/coord_reg": self.coord_reg(s),
            "loss/coord": self.coord(s),
        }


def geometry_terms(
    coord_logits: npt.ArrayLike, gt_bins: npt.ArrayLike, settings: Stage2LossSettings
) -> Stage2GeometryTerms:
    """§10 geometry and regularisers over all boxes of one forward (slots grouped by 4, ``x1, y1, x2, y2``)."""
    z = _slots(coord_logits)
    if z.shape[0] % 4:
        raise InvariantViolation(f"{z.shape[0]} coord slots is not a whole number of boxes (4 per box)")
    bins = _targets(gt_bins, z.shape[0])
    n = z.shape[0] // 4
    if n == 0:
        return Stage2GeometryTerms(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    log_p = coord_log_probs(z, settings.softctx_temperature)
    p = np.exp(log_p)
    c_hat = p @ _BIN_VALUES
    c = bins.astype(np.float64) / MAX_BIN
    d = _BIN_VALUES[None, :] - c[:, None]  # k/999 − c per slot and bin
    return Stage2GeometryTerms(
        n_boxes=n,
        bbox_smoothl1=smooth_l1(c_hat, c),
        bbox_ciou=ciou_loss(c_hat.reshape(n, 4), c.reshape(n, 4)),
        coord_ce=float(np.mean(-log_p[np.arange(bins.size), bins])),
        coord_el1=float(np.mean(np.sum(p * np.abs(d), axis=1))),
        coord_ehuber=float(np.mean(np.sum(p * huber_delta(d, settings.coord_huber_delta), axis=1))),
        coord_entropy=float(np.mean(-np.sum(np.where(p > 0, p * log_p, 0.0), axis=1))),
    )


def weighted_ce(token_ce: Sequence[float] | FloatArray, weights: Sequence[float] | FloatArray) -> float:
    """``L_CE = Σ w_t·ce_t / Σ w_t`` over the forward's supervised positions; 0 when ``Σ w = 0`` (no clamp)."""
    ce = np.asarray(token_ce, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if ce.shape != w.shape:
        raise InvariantViolation(f"{ce.size} CE values for {w.size} weights")
    total_w = float(np.sum(w))
    if total_w == 0.0:
        return 0.0
    return float(np.sum(w * ce) / total_w)


def total_loss(l_ce: float, terms: Stage2GeometryTerms, settings: Stage2LossSettings) -> float:
    """``L = L_CE + w_sl1·SmoothL1 + w_ciou·CIoU + w_cce·coord_ce + w_el1·coord_el1 + w_eh·coord_ehuber
    + w_ent·coord_entropy``."""
    return float(l_ce) + terms.coord(settings)
