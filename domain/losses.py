"""Stage-1 objective, float64 reference (stage1.md §1, D8).

Every formula of the Stage-1 loss lives here once, in plain numpy, so that it can be read,
property-tested and used as the oracle for the torch kernel (``adapters.torch.coord_loss``):

* the per-pair coord terms (§1.2): Gaussian target, sanitising, softCE, W1 (/999), gate, mass,
  hard CE, and the distribution monitors of §3.2 (expected bin, margin, top-5, ...);
* what a micro-batch contributes to the step (:class:`domain.normalisation.MicroBatchSums`; the
  normalisation rules R1-R7 themselves live in :mod:`domain.normalisation`);
* the micro-batch metric updates of the objective families (§3.2: ``base_ce/*``, ``coord_diag/*``,
  ``stage1/total_loss_per_sample_est``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

from domain.coord_tokens import MAX_BIN, NUM_BINS, CoordIdTable
from domain.errors import ConfigError, InvariantViolation
from domain.metrics_registry import MetricUpdate, quantile_linear
from domain.normalisation import MicroBatchSums

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

IGNORE_INDEX = -100
# Sanitising bound for logits and per-pair results (§1.2 steps 2 and 9).
LOGIT_BOUND = 1.0e4
# W1 is divided by the largest bin distance so a one-hot shift of d bins costs d/999 (§1.2 step 6).
W1_SCALE = float(MAX_BIN)
COORD_LOSS_CONFIG_PATH = "objective.coord_soft_ce_w1"


# ----------------------------------------------------------------------------- settings


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@attrs.frozen
class CoordLossSettings:
    """``objective.coord_soft_ce_w1`` with the typed defaults of §8.1.

    Construction validates the single-block rules of §6.1 and raises :class:`ConfigError` naming
    the dotted path. ``data.coord_mode: numeric`` with ``enabled`` is a cross-block rule the
    config loader checks (it needs the data block).
    """

    enabled: bool = False
    ce_weight: float = 0.0
    soft_ce_weight: float = 1.0
    w1_weight: float = 1.0
    gate_weight: float = 1.0
    temperature: float = 1.0
    target_sigma: float = 2.0
    target_truncate: int | None = None

    def __attrs_post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every violated rule of §6.1 for this block, each message naming its dotted key."""
        p = COORD_LOSS_CONFIG_PATH
        out: list[str] = []
        if not isinstance(self.enabled, bool):
            out.append(f"{p}.enabled: must be true or false, got {self.enabled!r}")
        for name in ("ce_weight", "soft_ce_weight", "w1_weight", "gate_weight"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v < 0:
                out.append(f"{p}.{name}: must be a finite real >= 0, got {v!r}")
        if self.enabled and not out and all(w == 0 for w in self.weights):
            out.append(
                f"{p}: enabled with all four weights 0 (ce_weight, soft_ce_weight, w1_weight, gate_weight); "
                "set at least one weight > 0 or set enabled: false"
            )
        for name in ("temperature", "target_sigma"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v <= 0:
                out.append(f"{p}.{name}: must be a finite real > 0, got {v!r}")
        r = self.target_truncate
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            out.append(f"{p}.target_truncate: must be null or an int >= 0, got {r!r}")
        return out

    @property
    def weights(self) -> tuple[float, float, float, float]:
        """(ce, soft_ce, w1, gate) weights in the order of ``ℓ_coord`` (§1.2 step 10)."""
        return (self.ce_weight, self.soft_ce_weight, self.w1_weight, self.gate_weight)


#: Named settings of §8.1 (the typed defaults are ``CoordLossSettings()``).
BASE_STAGE1_SETTINGS = CoordLossSettings(enabled=True, target_truncate=16)
PRODUCTION_SETTINGS = CoordLossSettings(
    enabled=True, soft_ce_weight=3.0, temperature=0.9, target_sigma=1.0, target_truncate=8
)


# ----------------------------------------------------------------------------- elementary formulas


def sanitize_logits(x: npt.ArrayLike) -> FloatArray:
    """NaN -> 0, +inf -> 1e4, -inf -> -1e4, then clamp to [-1e4, 1e4] (§1.2 step 2), in float64."""
    a = np.asarray(x, dtype=np.float64)
    return np.clip(np.nan_to_num(a, nan=0.0, posinf=LOGIT_BOUND, neginf=-LOGIT_BOUND), -LOGIT_BOUND, LOGIT_BOUND)


def sanitize_result(x: float) -> float:
    """Per-pair results: NaN -> 0, +inf -> 1e4 (§1.2 step 9); -inf is mapped to -1e4 for symmetry."""
    if math.isnan(x):
        return 0.0
    if math.isinf(x):
        return LOGIT_BOUND if x > 0 else -LOGIT_BOUND
    return float(x)


def logsumexp(x: FloatArray, axis: int = -1) -> FloatArray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out: FloatArray = np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis=axis)
    return out


def log_softmax(x: FloatArray, axis: int = -1) -> FloatArray:
    out: FloatArray = x - np.expand_dims(logsumexp(x, axis=axis), axis)
    return out


def clamp_bin(t: int) -> int:
    return min(max(int(t), 0), MAX_BIN)


def gaussian_target(t: int, sigma: float, truncate: int | None) -> FloatArray:
    """Target q over the 1000 bins (§1.2 step 4): a Gaussian at t, cut at radius R, renormalised.

    ``truncate`` = R: ``None`` keeps the whole range, 0 gives a one-hot. Near bins 0 and 999 the
    kernel is cut by the range (no mirroring), so the mean moves inwards.
    """
    if not sigma > 0:
        raise ValueError(f"target_sigma must be > 0, got {sigma!r}")
    tc = clamp_bin(t)
    d = np.arange(NUM_BINS, dtype=np.float64) - tc
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        w = np.exp(-(d * d) / (2.0 * sigma * sigma))
    w[tc] = 1.0  # exp(0), also when 2σ² underflows to 0 (0/0 would be NaN)
    if truncate is not None:
        w[np.abs(d) > truncate] = 0.0
    q: FloatArray = w / np.sum(w)
    return q


def soft_ce(log_p: FloatArray, q: FloatArray) -> float:
    """``−Σ_k q(k) log p(k)`` (§1.2 step 5); terms with q(k) = 0 add nothing."""
    mask = q > 0
    return float(-np.sum(q[mask] * log_p[mask]))


def w1_distance(p: FloatArray, q: FloatArray) -> float:
    """``(1/999) Σ_k |F_p(k) − F_q(k)|`` with F the cumulative sums (§1.2 step 6)."""
    return float(np.sum(np.abs(np.cumsum(p) - np.cumsum(q))) / W1_SCALE)


def gate_term(full_row: npt.ArrayLike, coord_ids: Sequence[int], temperature: float) -> float:
    """``max(0, LSE(z̃/τ) − LSE(ũ/τ))``: −log of the probability mass inside the coord vocabulary."""
    z = sanitize_logits(full_row) / temperature
    u = z[np.asarray(coord_ids, dtype=np.int64)]
    return max(0.0, float(logsumexp(z) - logsumexp(u)))


# ----------------------------------------------------------------------------- one coord pair


@attrs.frozen
class CoordPairTerms:
    """Everything §1.2 and §3.2 compute for one coord pair; loss parts are UNweighted except ``loss``."""

    bin: int
    soft_ce: float
    w1: float
    gate: float
    mass: float
    ce: float
    loss: float
    expected_bin: float
    abs_err: float
    w1_to_delta: float
    margin: float
    p_gt: float
    top5_hit: bool

    def weighted(self, settings: CoordLossSettings) -> tuple[float, float, float, float]:
        """(ce, soft_ce, w1, gate) multiplied by their weights (the ``coord_diag/*`` loss parts)."""
        return (
            settings.ce_weight * self.ce,
            settings.soft_ce_weight * self.soft_ce,
            settings.w1_weight * self.w1,
            settings.gate_weight * self.gate,
        )


def coord_loss(ce: float, soft: float, w1: float, gate: float, settings: CoordLossSettings) -> float:
    """``ℓ_coord = w_ce·ce + w_sce·softCE + w_w1·W1 + w_gate·gate`` (§1.2 step 10)."""
    return (
        settings.ce_weight * ce
        + settings.soft_ce_weight * soft
        + settings.w1_weight * w1
        + settings.gate_weight * gate
    )


def coord_pair_terms(
    z_row: npt.ArrayLike, coord_ids: Sequence[int] | CoordIdTable, t: int, settings: CoordLossSettings
) -> CoordPairTerms:
    """Coord terms of one pair from its full-vocabulary logit row ``z_row`` and target bin ``t``."""
    ids = np.asarray(coord_ids.ids if isinstance(coord_ids, CoordIdTable) else coord_ids, dtype=np.int64)
    if ids.shape != (NUM_BINS,):
        raise InvariantViolation(f"expected {NUM_BINS} coord ids in bin order, got shape {ids.shape}")
    tau = settings.temperature
    tc = clamp_bin(t)
    z = sanitize_logits(z_row)
    u = z[ids]
    s = u / tau
    log_p = log_softmax(s)
    p = np.exp(log_p)
    p = p / np.sum(p)
    q = gaussian_target(tc, settings.target_sigma, settings.target_truncate)
    k = np.arange(NUM_BINS, dtype=np.float64)

    soft = sanitize_result(soft_ce(log_p, q))
    w1 = sanitize_result(w1_distance(p, q))
    gate = sanitize_result(max(0.0, float(logsumexp(z / tau) - logsumexp(s))))
    mass = sanitize_result(math.exp(-gate))
    ce = sanitize_result(float(-log_softmax(u)[tc]))
    expected = float(np.sum(k * p))
    return CoordPairTerms(
        bin=tc,
        soft_ce=soft,
        w1=w1,
        gate=gate,
        mass=mass,
        ce=ce,
        loss=coord_loss(ce, soft, w1, gate, settings),
        expected_bin=expected,
        abs_err=abs(expected - tc),
        w1_to_delta=float(np.sum(p * np.abs(k - tc))),
        margin=float(np.max(s) - s[tc]),
        p_gt=float(p[tc]),
        # Tie-robust top-5: fewer than five bins strictly above the target's logit.
        top5_hit=bool(int(np.sum(u > u[tc])) < 5),
    )


def cross_entropy(z_row: npt.ArrayLike, y: int) -> float:
    """Full-vocabulary ``−log softmax(z)[y]`` (no sanitising: a non-finite row must surface)."""
    z = np.asarray(z_row, dtype=np.float64)
    return float(logsumexp(z) - z[int(y)])


# ----------------------------------------------------------------------------- pairs of a micro-batch


@attrs.frozen
class PairSets:
    """Supervised pairs of a micro-batch (§0.2): ``(b, i)`` predicts ``labels[b, i+1]``.

    All arrays are parallel, in row-major pair order; ``is_coord`` marks C, the rest of T is N.
    """

    batch_index: IntArray
    position: IntArray
    target: IntArray
    is_coord: npt.NDArray[np.bool_]
    bin: IntArray  # -1 for non-coord targets

    @property
    def num_supervised(self) -> int:
        return int(self.target.shape[0])

    @property
    def num_coord(self) -> int:
        return int(np.sum(self.is_coord))

    @property
    def num_noncoord(self) -> int:
        return self.num_supervised - self.num_coord


def supervised_pairs(labels: npt.ArrayLike, table: CoordIdTable, vocab_size: int) -> PairSets:
    """T, C and N of one micro-batch from its labels (never from predictions, §1.1 invariant 2)."""
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 2:
        raise InvariantViolation(f"labels must be [B, L], got shape {y.shape}")
    shifted = y[:, 1:]
    b, i = np.nonzero(shifted != IGNORE_INDEX)
    target = shifted[b, i]
    bad = (target < 0) | (target >= vocab_size)
    if np.any(bad):
        j = int(np.argmax(bad))
        raise InvariantViolation(
            f"label {int(target[j])} at labels[{int(b[j])}, {int(i[j]) + 1}] is outside the vocabulary [0, {vocab_size})"
        )
    bins = table.bin_table(vocab_size)[target]
    return PairSets(
        batch_index=b.astype(np.int64),
        position=i.astype(np.int64),
        target=target,
        is_coord=bins >= 0,
        bin=bins,
    )


@attrs.frozen
class CoordBlockSums:
    """Sums over the coord pairs C of one micro-batch; loss parts UNweighted (``loss`` is weighted ℓ)."""

    count: int = 0
    loss: float = 0.0
    soft_ce: float = 0.0
    w1: float = 0.0
    ce: float = 0.0
    gate: float = 0.0
    mass: float = 0.0
    top5_hits: float = 0.0
    p_gt: float = 0.0
    margin: float = 0.0
    abs_err: float = 0.0
    w1_to_delta: float = 0.0
    abs_err_p90: float | None = None


def abs_err_quantile(errors: npt.ArrayLike, q: float = 0.9) -> float | None:
    """Quantile with linear interpolation (``coord_diag/expected_bin_abs_err_p90``); None when empty."""
    return quantile_linear([float(e) for e in np.asarray(errors, dtype=np.float64).ravel()], q)


def coord_block_sums(terms: Sequence[CoordPairTerms]) -> CoordBlockSums:
    if not terms:
        return CoordBlockSums()
    return CoordBlockSums(
        count=len(terms),
        loss=math.fsum(x.loss for x in terms),
        soft_ce=math.fsum(x.soft_ce for x in terms),
        w1=math.fsum(x.w1 for x in terms),
        ce=math.fsum(x.ce for x in terms),
        gate=math.fsum(x.gate for x in terms),
        mass=math.fsum(x.mass for x in terms),
        top5_hits=float(sum(1 for x in terms if x.top5_hit)),
        p_gt=math.fsum(x.p_gt for x in terms),
        margin=math.fsum(x.margin for x in terms),
        abs_err=math.fsum(x.abs_err for x in terms),
        w1_to_delta=math.fsum(x.w1_to_delta for x in terms),
        abs_err_p90=abs_err_quantile([x.abs_err for x in terms]),
    )


def micro_batch_reference(
    logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    table: CoordIdTable,
    settings: CoordLossSettings,
) -> tuple[MicroBatchSums, CoordBlockSums, PairSets]:
    """Reference of the whole micro-batch computation (pair by pair, float64)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3:
        raise InvariantViolation(f"logits must be [B, L, V], got shape {z.shape}")
    pairs = supervised_pairs(labels, table, z.shape[-1])
    ce_terms: list[float] = []
    coord_terms: list[CoordPairTerms] = []
    correct = 0
    for j in range(pairs.num_supervised):
        row = z[pairs.batch_index[j], pairs.position[j]]
        y = int(pairs.target[j])
        correct += int(int(np.argmax(row)) == y)
        if pairs.is_coord[j]:
            coord_terms.append(coord_pair_terms(row, table, int(pairs.bin[j]), settings))
            if not settings.enabled:
                ce_terms.append(cross_entropy(row, y))
        else:
            ce_terms.append(cross_entropy(row, y))
    block = coord_block_sums(coord_terms)
    sums = MicroBatchSums(
        sum_ce=math.fsum(ce_terms),
        sum_coord=block.loss if settings.enabled else 0.0,
        num_noncoord=pairs.num_noncoord,
        num_coord=pairs.num_coord,
        distributional=settings.enabled,
        num_correct=correct,
    )
    return sums, block, pairs


# ----------------------------------------------------------------------------- metric updates (§3.2)


def objective_metric_updates(
    mb: MicroBatchSums,
    coord: CoordBlockSums | None,
    settings: CoordLossSettings,
    num_samples: int,
) -> list[MetricUpdate]:
    """Updates of the core, ``base_ce/*``, ``coord_diag/*`` and ``stage1/*`` families of one micro-batch.

    ``coord`` is None when the coord block does not run (pure-CE without token-type diagnostics,
    or numeric mode). ``num_samples`` is S_n (clamped ≥ 1). Loss parts are weighted contributions
    and never multiplied by W. The token/type and health families are produced elsewhere.
    """
    s_n = max(1, int(num_samples))
    out: list[MetricUpdate] = [MetricUpdate("pack/num_samples", float(s_n), 1.0)]
    if mb.num_supervised > 0:
        out.append(MetricUpdate("token_acc", mb.num_correct / mb.num_supervised, float(mb.num_supervised)))
    if settings.enabled:
        n = mb.num_noncoord
        if n > 0:
            out.append(MetricUpdate("base_ce/loss", mb.sum_ce / n, float(n)))
        out.append(MetricUpdate("base_ce/noncoord_tokens", float(n), 1.0))
        out.append(MetricUpdate("base_ce/noncoord_tokens_per_sample", n / s_n, float(s_n)))
        out.append(MetricUpdate("base_ce/loss_per_sample", mb.sum_ce / s_n, float(s_n)))
    if coord is None:
        return out
    out.append(MetricUpdate("coord_diag/enabled", 1.0 if settings.enabled else 0.0, 1.0))
    c = coord.count
    if c == 0:
        return out
    wc = float(c)
    out += [
        MetricUpdate("coord_diag/loss", coord.loss / c, wc),
        MetricUpdate("coord_diag/soft_ce", settings.soft_ce_weight * coord.soft_ce / c, wc),
        MetricUpdate("coord_diag/w1", settings.w1_weight * coord.w1 / c, wc),
        MetricUpdate("coord_diag/ce", settings.ce_weight * coord.ce / c, wc),
        MetricUpdate("coord_diag/gate", settings.gate_weight * coord.gate / c, wc),
        MetricUpdate("coord_diag/coord_vocab_mass", coord.mass / c, wc),
        MetricUpdate("coord_diag/coord_tokens", wc, 1.0),
        MetricUpdate("coord_diag/acc_top5", coord.top5_hits / c, wc),
        MetricUpdate("coord_diag/p_gt_mean", coord.p_gt / c, wc),
        MetricUpdate("coord_diag/margin_mean", coord.margin / c, wc),
        MetricUpdate("coord_diag/expected_bin_mae", coord.abs_err / c, wc),
        MetricUpdate("coord_diag/w1_to_delta", coord.w1_to_delta / c, wc),
        MetricUpdate("coord_diag/coord_tokens_per_sample", c / s_n, float(s_n)),
        MetricUpdate("coord_diag/loss_per_sample", coord.loss / s_n, float(s_n)),
    ]
    if coord.abs_err_p90 is not None:
        out.append(MetricUpdate("coord_diag/expected_bin_abs_err_p90", coord.abs_err_p90, 1.0))
    if settings.enabled:
        out.append(
            MetricUpdate("stage1/total_loss_per_sample_est", (mb.sum_ce + coord.loss) / s_n, float(s_n))
        )
    return out
