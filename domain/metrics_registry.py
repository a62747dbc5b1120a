"""The metric-key registry (D14, stage1.md §3, stage2.md §18-19, infer-eval-config.md §4.5).

Every key a run may log is declared here once, under its TRAIN name, with its meaning, family,
reduction, weight rule, modes and emission rule. Eval names are derived: the logging layer adds
``eval_`` when it flushes the eval buffer (``coord_diag/loss`` -> ``eval_coord_diag/loss``).

Aggregation (§3.1): an update is ``(key, value, weight >= 0)``. Each rank accumulates its updates
since the last log event into a fixed-layout float64 vector (registry order), every rank all-reduces
it (SUM; plus one MAX vector when the layout has max-type keys), and the logged value is derived
from the reduced sums. A key with no observation (or Σ weight = 0) is omitted, never NaN or 0.

Run ``python -m domain.metrics_registry --markdown`` to print docs/metrics.md.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from domain.coordjson import INCOMPLETE_TAIL, POLY_UNSUPPORTED, DropReason

EVAL_PREFIX = "eval_"
PAYLOAD_SCHEMA_MAJOR = 1
#: Bookkeeping fields of a ``logging.jsonl`` line (infer-eval-config.md §7.2); not metric keys.
BOOKKEEPING_KEYS: frozenset[str] = frozenset({"global_step", "max_steps", "epoch", "time", "elapsed_s"})
#: Names of best-effort diagnostics (stage1.md §6.4); each has a ``health/diagnostic_disabled/<name>`` key.
DIAGNOSTIC_NAMES: tuple[str, ...] = (
    "runtime_metrics",
    "base_ce_metrics",
    "coord_diag_metrics",
    "token_type_metrics",
    "coord_monitor",
    "coord_diag_pure_ce",
    "instability_monitor",
    "token_type_enricher",
    "instability_meta_enricher",
)


def strict_drop_reasons(parser_reasons: Iterable[DropReason] = DropReason) -> tuple[str, ...]:
    """Drop reasons of the Stage-2 scanner (stage2.md §3.5 / §18.2), derived from the parser's enum.

    ``incomplete_tail``, every parser reason in enum order except ``other``, Stage 2's ``poly_unsupported``,
    then ``other`` last. :class:`domain.coordjson.DropReason` is the one owner of the parser reasons.
    """
    other = DropReason.OTHER.value
    parser = [str(r.value) for r in parser_reasons if r.value != other]
    return (INCOMPLETE_TAIL, *parser, POLY_UNSUPPORTED, other)


#: The Stage-2 drop reasons, all emitted, zeros included (see :func:`strict_drop_reasons`).
STRICT_DROP_REASONS: tuple[str, ...] = strict_drop_reasons()
TOKEN_TYPE_CLASSES: tuple[str, ...] = ("desc", "format", "coord")
COCO_STATS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
F1ISH_FIELDS: tuple[str, ...] = (
    "tp_loc",
    "fp_loc",
    "fn_loc",
    "pred_total",
    "pred_eval",
    "pred_ignored",
    *(f"{m}_loc_{a}" for m in ("precision", "recall", "f1") for a in ("micro", "macro")),
    "matched_sem_ok",
    "matched_sem_bad",
    "sem_acc_on_matched",
    "tp_full",
    "fp_full",
    "fn_full",
    *(f"{m}_full_{a}" for m in ("precision", "recall", "f1") for a in ("micro", "macro")),
)
#: The four keys D14 requires of every Stage-2 AB run.
REQUIRED_STAGE2_KEYS: tuple[str, ...] = (
    "stage2_ab/b_ratio_realized",
    "stage2_ab/channel_b/invalid_rollout",
    "stage2_ab/channel_b/strict_drop/N_valid_pred",
    "stage2_ab/channel_b/strict_drop/N_drop_invalid",
)
#: Placeholder values of parameterised keys: ``{thr}`` is an IoU threshold written ``{thr:.2f}``.
PARAMETER_PATTERNS: Mapping[str, str] = {"thr": r"(?:0\.\d\d|1\.00)"}


class Reduction(str, enum.Enum):
    """How updates combine within a rank and across ranks."""

    MEAN = "mean"  # Σ v·w / Σ w over every update on every rank (stage1.md §3.1)
    RATIO = "ratio"  # MEAN with w = denominator: a ratio of global sums; `empty_value` when Σ w = 0
    GAUGE = "gauge"  # stage2 "mean": mean over the micro-steps where present, then over the ranks where present
    SUM = "sum"  # counter: Σ v·w (w defaults to 1) over micro-steps and ranks
    MAX = "max"  # flag / peak: max over micro-steps and ranks
    MIN = "min"  # min over micro-steps and ranks
    PCTL = "pctl"  # rank-local percentile; max over ranks
    LAST = "last"  # last value on each rank; mean over ranks
    TOTAL = "total"  # cumulative rank-local counter: last value on each rank, summed over ranks
    SUM_MAX = "sum_max"  # time: summed over micro-steps on a rank, max over ranks


_MAX_VECTOR_REDUCTIONS = frozenset({Reduction.MAX, Reduction.MIN, Reduction.PCTL, Reduction.SUM_MAX})


class Mode(str, enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


TRAIN_ONLY = frozenset({Mode.TRAIN})
EVAL_ONLY = frozenset({Mode.EVAL})
BOTH_MODES = frozenset({Mode.TRAIN, Mode.EVAL})

STAGE1 = "stage1"
STAGE2_AB = "stage2_ab"
ROLLOUT_MATCHING_SFT = "rollout_matching_sft"
TRAINER_VARIANTS: tuple[str, ...] = (STAGE1, STAGE2_AB, ROLLOUT_MATCHING_SFT)
ALL_VARIANTS = frozenset(TRAINER_VARIANTS)
STAGE2_VARIANTS = frozenset({STAGE2_AB, ROLLOUT_MATCHING_SFT})


@attrs.frozen
class MetricKey:
    """One registry entry. ``name`` is the train name; a ``{param}`` placeholder makes it a pattern."""

    name: str
    family: str
    meaning: str
    reduction: Reduction = Reduction.MEAN
    weight: str = "1"
    modes: frozenset[Mode] = BOTH_MODES
    variants: frozenset[str] = ALL_VARIANTS
    emitted: str = "every micro-batch"
    empty_value: float | None = None

    @property
    def is_pattern(self) -> bool:
        return "{" in self.name

    @property
    def eval_name(self) -> str | None:
        return EVAL_PREFIX + self.name if Mode.EVAL in self.modes else None

    @property
    def train_only(self) -> bool:
        return self.modes == TRAIN_ONLY

    def regex(self) -> re.Pattern[str]:
        parts = re.split(r"\{(\w+)\}", self.name)
        out = []
        for j, part in enumerate(parts):
            out.append(PARAMETER_PATTERNS[part] if j % 2 else re.escape(part))
        return re.compile("^" + "".join(out) + r"\Z")

    def instantiate(self, **params: str) -> str:
        return self.name.format(**params)


# ----------------------------------------------------------------------------- the catalogue


def _stage1_keys() -> list[MetricKey]:
    s1 = frozenset({STAGE1})
    k: list[MetricKey] = []

    def add(name: str, family: str, meaning: str, weight: str = "1", **kw: object) -> None:
        kw.setdefault("variants", s1)
        k.append(MetricKey(name, family, meaning, weight=weight, **kw))  # type: ignore[arg-type]

    # Engine and runtime (stage1.md §3.2); trainer-common for every variant.
    add("loss", "engine", "train: L_step of R4, mean of the per-step values over the logging window; "
        "eval (eval_loss): the R5 sums/counts objective over the whole eval set (Stage-1 only)",
        weight="1 per optimizer step", variants=ALL_VARIANTS, emitted="every log event (train); every evaluation (eval, Stage-1)")
    add("grad_norm", "engine", "gradient norm at the optimizer step (engine)", modes=TRAIN_ONLY,
        variants=ALL_VARIANTS, emitted="every train log event")
    add("learning_rate", "engine", "learning rate of optimizer group 0 (engine)", modes=TRAIN_ONLY,
        variants=ALL_VARIANTS, emitted="every train log event")
    add("epoch", "engine", "fractional epoch (also a logging.jsonl bookkeeping field)", modes=TRAIN_ONLY,
        variants=ALL_VARIANTS, emitted="every train log event")
    add("accum/grad_steps", "runtime", "configured gradient-accumulation steps G", modes=TRAIN_ONLY,
        variants=ALL_VARIANTS, emitted="every train micro-batch")
    add("accum/current_grad_steps", "runtime", "micro-batches in the current window (short last window of an epoch)",
        modes=TRAIN_ONLY, variants=ALL_VARIANTS, emitted="every train micro-batch")
    # End-of-training summary the trainer logs once (transformers Trainer.train); registered so it is not dropped.
    for name, meaning in (
        ("train_runtime", "wall time of the whole training run, s"),
        ("train_samples_per_second", "training throughput over the run"),
        ("train_steps_per_second", "optimizer steps per second over the run"),
        ("train_loss", "mean of the train loss over the whole run (engine summary)"),
        ("total_flos", "floating point operations of the run, as counted by the engine"),
    ):
        add(name, "engine_summary", meaning, modes=TRAIN_ONLY, variants=ALL_VARIANTS, emitted="once, at the end of training")
    # Evaluation loop runtime (eval_runtime is MAX over ranks, stage2.md §19).
    add("runtime", "engine", "wall time of one evaluation, s (MAX over ranks)", reduction=Reduction.MAX,
        modes=EVAL_ONLY, variants=ALL_VARIANTS, emitted="every evaluation")
    add("samples_per_second", "engine", "evaluation throughput", modes=EVAL_ONLY, variants=ALL_VARIANTS,
        emitted="every evaluation")
    add("steps_per_second", "engine", "evaluation batches per second", modes=EVAL_ONLY, variants=ALL_VARIANTS,
        emitted="every evaluation")

    # Core.
    add("token_acc", "core", "full-vocab argmax == target over T, coord pairs included (§1.5)", weight="|T|",
        emitted="every micro-batch with |T| > 0")
    add("pack/num_samples", "core", "S_n: samples in the micro-batch (packed: pack members), clamped >= 1")

    # Base-CE block.
    on = "coord loss on, every micro-batch"
    add("base_ce/loss", "base_ce", "Σ_N ce / |N| (window value: token-weighted mean)", weight="|N|",
        emitted="coord loss on, |N| > 0")
    add("base_ce/noncoord_tokens", "base_ce", "|N|", emitted=on)
    add("base_ce/noncoord_tokens_per_sample", "base_ce", "|N| / S_n", weight="S_n", emitted=on)
    add("base_ce/loss_per_sample", "base_ce", "Σ_N ce / S_n", weight="S_n", emitted=on)

    # Coord block.
    cb = "coord block runs (coord loss on, or pure-CE diagnostics) and |C| > 0"
    add("coord_diag/enabled", "coord_diag", "1.0 in distributional mode, 0.0 for pure-CE coord diagnostics",
        emitted="every micro-batch on which the coord block runs")
    add("coord_diag/loss", "coord_diag", "Σ_C ℓ_coord / |C| (never × W)", weight="|C|", emitted=cb)
    for term, what in (("soft_ce", "softCE"), ("w1", "W1 (already /999)"), ("ce", "hard CE on raw u"), ("gate", "gate")):
        add(f"coord_diag/{term}", "coord_diag", f"weight × mean over C of {what}; 0.0 when the weight is 0",
            weight="|C|", emitted=cb)
    add("coord_diag/coord_vocab_mass", "coord_diag", "mean over C of exp(−gate) (τ applied)", weight="|C|", emitted=cb)
    add("coord_diag/coord_tokens", "coord_diag", "|C|", emitted=cb)
    add("coord_diag/acc_top5", "coord_diag", "mean 1[t in top-5 of u] (coord vocabulary only)", weight="|C|", emitted=cb)
    add("coord_diag/p_gt_mean", "coord_diag", "mean p(t)", weight="|C|", emitted=cb)
    add("coord_diag/margin_mean", "coord_diag", "mean (max_k s_k − s_t); lower is better", weight="|C|", emitted=cb)
    add("coord_diag/expected_bin_mae", "coord_diag", "mean |E_p[k] − t| in bins", weight="|C|", emitted=cb)
    add("coord_diag/expected_bin_abs_err_p90", "coord_diag",
        "0.9-quantile (linear interpolation) of |E_p[k] − t| over C of the micro-batch; logged value is a "
        "mean of per-micro-batch quantiles", emitted=cb)
    add("coord_diag/w1_to_delta", "coord_diag", "mean Σ_k p(k)·|k − t| (unnormalised bins)", weight="|C|", emitted=cb)
    add("coord_diag/coord_tokens_per_sample", "coord_diag", "|C| / S_n", weight="S_n", emitted=cb)
    add("coord_diag/loss_per_sample", "coord_diag", "Σ_C ℓ_coord / S_n", weight="S_n", emitted=cb)
    add("stage1/total_loss_per_sample_est", "coord_diag", "(Σ_N ce + Σ_C ℓ_coord) / S_n of the same call",
        weight="S_n", emitted="coord loss on and |C| > 0")

    # Token/type block.
    tt = "token-type metrics on"
    add("token_acc_top5", "token_type", "mean 1[y in full-vocab top-5] over T", weight="|T|", emitted=f"{tt}, log_top5")
    add("text_token_acc", "token_type", "argmax accuracy over text pairs (target not a coord id; numeric mode: T)",
        weight="|text|", emitted=f"{tt}, |text| > 0")
    for cls in TOKEN_TYPE_CLASSES:
        cond = f"{tt}, valid token types, >= 1 {cls.upper()} pair"
        add(f"{cls}_token_frac", "token_type", f"{cls.upper()} pairs / |T| (IGNORE stays in the denominator)",
            weight="|T|", emitted=cond)
        add(f"{cls}_token_acc", "token_type", f"argmax accuracy within {cls.upper()} pairs", weight=f"|{cls}|",
            emitted=cond)
        add(f"{cls}_token_acc_top5", "token_type", f"top-5 accuracy within {cls.upper()} pairs", weight=f"|{cls}|",
            emitted=f"{cond}, log_top5")
    tm = f"{tt}, coord_mode tokens"
    add("coord_monitor/flip_coord_to_noncoord", "coord_monitor",
        "over GT coord pairs: fraction whose full-vocab argmax is not a coord id", weight="|C|", emitted=f"{tm}, |C| > 0")
    add("coord_monitor/flip_text_to_coord", "coord_monitor", "over text pairs: fraction whose argmax is a coord id",
        weight="|text|", emitted=f"{tm}, |text| > 0")
    for cls in ("format", "desc"):
        add(f"coord_monitor/flip_{cls}_to_coord", "coord_monitor",
            f"over {cls.upper()} pairs: fraction whose argmax is a coord id", weight=f"|{cls}|",
            emitted=f"{tm}, valid token types, |{cls}| > 0")
    for cls in ("coord", "text", "format", "desc"):
        cond = f"{tm}, coord_monitor_mass, |{cls}| > 0" + (", valid token types" if cls in ("format", "desc") else "")
        add(f"coord_monitor/coord_vocab_mass_at_gt_{cls}", "coord_monitor",
            f"mean over {cls} pairs (stride-subsampled if capped) of Σ_k softmax(z̃/τ)[c_k]",
            weight=f"|{cls}| used", emitted=cond)

    # Health.
    for name in DIAGNOSTIC_NAMES:
        add(f"health/diagnostic_disabled/{name}", "health",
            f"1.0 once the best-effort diagnostic '{name}' has been disabled (§6.4)",
            emitted="every micro-batch after the diagnostic failed", variants=ALL_VARIANTS)
    return k


def _stage2_keys(drop_reasons: Sequence[str] = STRICT_DROP_REASONS) -> list[MetricKey]:
    k: list[MetricKey] = []
    ab = frozenset({STAGE2_AB})

    def add(name: str, family: str, reduction: Reduction, emitted: str, meaning: str, **kw: object) -> None:
        kw.setdefault("variants", STAGE2_VARIANTS)
        kw.setdefault("modes", TRAIN_ONLY)
        k.append(MetricKey(name, family, meaning, reduction=reduction, emitted=emitted, **kw))  # type: ignore[arg-type]

    R = Reduction
    # §18.1 required keys (D14).
    add("stage2_ab/b_ratio_realized", "stage2_ab", R.GAUGE, "all", "rolling mean of executed-B over the last 200 optimizer steps", variants=ab)
    add("stage2_ab/channel_b/invalid_rollout", "stage2_ab", R.SUM, "B", "samples with invalid_rollout = 1 (§3.7)", variants=ab)
    add("stage2_ab/channel_b/strict_drop/N_valid_pred", "stage2_ab", R.SUM, "B", "valid bbox predictions after scan + bbox-only filter", variants=ab)
    add("stage2_ab/channel_b/strict_drop/N_drop_invalid", "stage2_ab", R.SUM, "B", "all dropped records (every reason of §3.5)", variants=ab)
    # §18.2.
    for r in drop_reasons:
        add(f"stage2_ab/channel_b/strict_drop/reason/{r}", "stage2_ab", R.SUM, f"B (all {len(drop_reasons)} reasons, zeros included)",
            f"records dropped for reason {r}; Σ over reasons = N_drop_invalid", variants=ab)
    add("stage2_ab/channel_b/cut_fallback", "stage2_ab", R.SUM, "B", "samples with cut_fallback", variants=ab)
    add("stage2_ab/channel_b/semantic_desc_gate/is_active", "stage2_ab", R.MAX, "B (reordered only)", "encoder loaded and probed", variants=ab)
    add("stage2_ab/is_channel_a", "stage2_ab", R.MAX, "all", "1 on Channel-A steps", variants=ab)
    add("stage2_ab/is_channel_b", "stage2_ab", R.MAX, "all", "1 on Channel-B steps", variants=ab)
    add("stage2_ab/raw_rollouts", "stage2_ab", R.SUM, "B (step mode)", "raw rollouts in the step", variants=ab)
    # §18.3 loss keys (unweighted term values).
    for name, meaning in (
        ("loss/ce", "CE term"),
        ("loss/bbox_smoothl1", "bbox smooth-L1 term"),
        ("loss/bbox_ciou", "bbox CIoU term"),
        ("loss/coord_ce", "coord CE regulariser"),
        ("loss/coord_el1", "expected-L1 regulariser"),
        ("loss/coord_ehuber", "expected-Huber regulariser"),
        ("loss/coord_entropy", "entropy regulariser"),
        ("loss/coord_reg", "weighted sum of the four regularisers"),
        ("loss/coord", "AB: weighted geometry + regularisers; rollout_matching_sft: coord loss"),
        ("loss/coord_prefix", "loss/coord restricted to matched prefix slots"),
        ("loss/coord_tail", "loss/coord restricted to FN slots"),
    ):
        add(name, "loss", R.GAUGE, "every step of the variants that compute it", f"{meaning} (unweighted value)")
    # §18.4 rollout keys (B only).
    B = "B"
    for name, red, meaning, extra in (
        ("rollout/gt_objects", R.SUM, "G: Σ GT objects", {}),
        ("rollout/valid_pred_objects", R.SUM, "P: Σ valid predictions", {}),
        ("rollout/parse_dropped_invalid", R.SUM, "D: Σ dropped records", {}),
        ("rollout/parse_failed", R.SUM, "samples with no container", {}),
        ("rollout/parse_truncated", R.SUM, "truncated samples", {}),
        ("rollout/parse_truncated_rate", R.RATIO, "truncated samples / n", {"weight": "n"}),
        ("rollout/parse_obj_total", R.SUM, "P + D", {}),
        ("rollout/parse_obj_valid_frac", R.RATIO, "P / (P + D)", {"weight": "P + D"}),
        ("rollout/parse_obj_drop_frac", R.RATIO, "D / (P + D)", {"weight": "P + D"}),
        ("rollout/sample_valid_pred_rate", R.RATIO, "samples with >= 1 valid prediction / n", {"weight": "n"}),
        ("rollout/sample_any_match_rate", R.RATIO, "samples with >= 1 match / n", {"weight": "n"}),
        ("rollout/matched_for_supervision", R.SUM, "M", {}),
        ("rollout/excluded_from_supervision", R.SUM, "X", {}),
        ("rollout/excluded_rate", R.RATIO, "X / (M + X)", {"weight": "M + X"}),
        ("rollout/fn_appended", R.SUM, "Σ FN records appended (G − M per sample)", {}),
        ("rollout/gating_rejections", R.SUM, "Σ gating rejections", {}),
        ("rollout/gating_rejection_rate", R.RATIO, "gating rejections / Σ candidate_pairs", {"weight": "Σ candidate_pairs"}),
        ("rollout/precision", R.RATIO, "M / P; 0 when undefined", {"weight": "P", "empty_value": 0.0}),
        ("rollout/recall", R.RATIO, "M / G; 0 when undefined", {"weight": "G", "empty_value": 0.0}),
        ("rollout/f1", R.RATIO, "harmonic mean of precision and recall = 2M / (P + G); 0 when undefined",
         {"weight": "P + G", "empty_value": 0.0}),
        ("rollout/gt_per_sample", R.RATIO, "G / n", {"weight": "n"}),
        ("rollout/pred_per_sample", R.RATIO, "P / n", {"weight": "n"}),
        ("rollout/fp_per_sample", R.RATIO, "(P − M) / n", {"weight": "n"}),
        ("rollout/fn_per_sample", R.RATIO, "(G − M) / n", {"weight": "n"}),
        ("rollout/matched_maskiou_mean", R.RATIO, "Σ IoU / Σ count over matched pairs", {"weight": "count"}),
        ("rollout/matched_maskiou_count", R.SUM, "Σ count of matched pairs with an IoU", {}),
        ("rollout/prefix_coord_targets_total", R.SUM, "supervised prefix coord slots", {}),
        ("rollout/prefix_coord_targets_per_matched", R.RATIO, "prefix coord slots / M", {"weight": "M"}),
        ("rollout/tail_ignore_frac", R.RATIO, "Σ |tail_ignore_pos| / Σ (train_len − prefix_len)",
         {"weight": "Σ (train_len − prefix_len)"}),
        ("rollout/decode_non_beam_count", R.SUM, "samples decoded without beams", {}),
        ("rollout/decode_beam_count", R.SUM, "samples decoded with beam search", {}),
        ("rollout/do_sample", R.MAX, "effective decoding setting", {}),
        ("rollout/temperature", R.MAX, "effective decoding setting", {}),
        ("rollout/top_p", R.MAX, "effective decoding setting", {}),
        ("rollout/top_k", R.MAX, "effective decoding setting", {}),
        ("rollout/seed_base", R.MAX, "effective decoding setting", {}),
        ("rollout/gen_new_tokens_total", R.SUM, "generated tokens after stripping", {}),
        ("rollout/gen_new_tokens_mean", R.RATIO, "generated tokens / n", {"weight": "n"}),
        ("rollout/gen_new_tokens_p90", R.PCTL, "90th percentile of generated tokens", {}),
        ("rollout/gen_new_tokens_p99", R.PCTL, "99th percentile of generated tokens", {}),
        ("rollout/gen_tokens_per_s", R.RATIO, "generated tokens / time/rollout_generate_s (only when > 0)",
         {"weight": "time/rollout_generate_s"}),
        ("rollout/repeat_terminate_active", R.MAX, "repeat-terminate guard actually applied this step", {}),
        ("rollout/repeat_terminate_triggered_sequences", R.SUM, "sequences where the guard fired", {}),
        ("rollout/desc_pairs_total", R.SUM, "matched pairs seen by the optional desc monitor", {}),
        ("rollout/desc_exact_acc_on_matched", R.RATIO, "exact desc accuracy on matched pairs; 1.0 with no pairs",
         {"weight": "pairs", "empty_value": 1.0}),
        ("rollout/desc_sem_enabled", R.MAX, "semantic desc monitor active", {}),
        ("rollout/desc_sem_acc_on_matched", R.RATIO, "semantic desc accuracy on matched pairs", {"weight": "pairs"}),
        ("rollout/desc_sem_sim_mean", R.RATIO, "mean semantic similarity on matched pairs", {"weight": "count"}),
        ("rollout/desc_sem_sim_count", R.SUM, "pairs with a semantic similarity", {}),
    ):
        add(name, "rollout", red, B, meaning, **extra)
    for what in ("prompt", "rollout", "prefix", "train", "append", "encoded"):
        add(f"rollout/{what}_len_mean", "rollout", R.RATIO, B, f"mean {what} length (append = train_len − prefix_len)",
            weight="n")
    for what in ("rollout", "train", "append", "encoded"):
        add(f"rollout/{what}_len_p90", "rollout", R.PCTL, B, f"90th percentile of the {what} length")
    # §18.7 duplicate monitor (domain.duplicates; B steps and eval rollouts, supervision unchanged).
    dup = "B steps and eval rollouts"
    add("dup/raw/pairs", "dup", R.MEAN, dup, "duplicate-like pairs per sample (same normalised desc, box IoU >= "
        "duplicate_monitor.iou_threshold), mean over samples", weight="1 per sample", modes=BOTH_MODES)
    add("dup/raw/max_cluster_size", "dup", R.MEAN, dup, "largest duplicate cluster per sample (1 when there is none), "
        "mean over samples", weight="1 per sample", modes=BOTH_MODES)
    add("dup/raw/excess_object_frac", "dup", R.RATIO, dup, "Σ excess objects (cluster size − 1) / Σ valid bbox objects; "
        "0 when there is no valid object", weight="valid bbox objects", empty_value=0.0, modes=BOTH_MODES)
    # §18.5 time, packing, train.
    add("time/rollout_generate_s", "time", R.MAX, B, "rollout generation wall time, s")
    for name in ("rollout_parse_match_s", "rollout_teacher_encode_s", "post_rollout_pack_s", "forward_s", "mask_build_s"):
        add(f"time/{name}", "time", R.SUM_MAX, "every step that runs it", f"{name[:-2]} wall time, s (sum over micro-steps, max over ranks)")
    add("packing/post_rollout_fill", "packing", R.GAUGE, B, "selected length / packing_length")
    add("packing/post_rollout_selected_total_len", "packing", R.GAUGE, B, "selected total length of a pack")
    add("packing/post_rollout_segments", "packing", R.GAUGE, B, "segments per pack (mean over packs)")
    add("packing/post_rollout_buffer", "packing", R.LAST, B, "segments left in the post-rollout buffer")
    add("packing/window_fallback", "packing", R.SUM, B, "windows that fell back")
    add("train/samples_total", "train", R.SUM, "all", "segments in the step")
    add("train/samples_seen", "train", R.MAX, "all", "cumulative samples seen")
    add("train/micro_steps", "train", R.MAX, "all", "micro-steps in the step")
    add("train/samples_per_micro", "train", R.RATIO, "all", "samples per micro-step", weight="micro-steps")
    # §18.6 async keys.
    for name in (
        "policy_wants_b", "step_kind_b", "b_step_skipped_due_to_queue", "queue_depth", "queue_limit",
        "prefetch_target_packs", "version_window", "ver_current", "ver_step", "ver_lag", "drop_stale_total",
        "drop_oldest_total", "prefetch_success_total", "prefetch_fail_total", "prefetch_iter_total",
        "prefetch_state", "prefetch_last_progress_s_ago", "sync_in_progress", "infer_inflight",
        "is_prefetch_in_prepare_b", "is_prefetch_queue_full", "is_prefetch_no_segments", "is_prefetch_error", "gas",
    ):
        total = name.endswith("_total")
        when = "B micro-steps" if name == "ver_lag" else "async mode, every step"
        meaning = ("cumulative rank-local counter, summed over ranks" if total else "async actor/learner gauge")
        if name == "ver_lag":
            meaning = "ver_current − pack.ver"
        add(f"stage2_ab/async/{name}", "stage2_ab_async", R.TOTAL if total else R.GAUGE, when, meaning, variants=ab)

    # §19 eval-time rollout metrics (eval only; stored as rollout_*, logged eval_rollout_*).
    ev = "every evaluation"
    for name, red, meaning, extra in (
        ("rollout_precision", R.RATIO, "matched / pred (global sums)", {"weight": "pred", "empty_value": 0.0}),
        ("rollout_recall", R.RATIO, "matched / gt (global sums)", {"weight": "gt", "empty_value": 0.0}),
        ("rollout_f1", R.RATIO, "2·matched / (pred + gt); best-model metric (greater is better)",
         {"weight": "pred + gt", "empty_value": 0.0}),
        ("rollout_pred_objects", R.SUM, "valid predictions", {}),
        ("rollout_gt_objects", R.SUM, "GT objects", {}),
        ("rollout_matched", R.SUM, "matches passing matching.maskiou_gate", {}),
        ("rollout_fp", R.SUM, "pred − matched", {}),
        ("rollout_fn", R.SUM, "gt − matched", {}),
        ("rollout_gating_rejections", R.SUM, "gating rejections", {}),
        ("rollout_parse_dropped_invalid", R.SUM, "dropped records", {}),
        ("rollout_parse_truncated_rate", R.RATIO, "truncated samples / samples", {"weight": "samples"}),
        ("rollout_sample_valid_pred_rate", R.RATIO, "samples with >= 1 valid prediction / samples", {"weight": "samples"}),
        ("rollout_sample_any_match_rate", R.RATIO, "samples with >= 1 match / samples", {"weight": "samples"}),
        ("rollout_matched_maskiou_mean", R.RATIO, "Σ IoU / Σ matched", {"weight": "matched"}),
        ("rollout_desc_pairs_total", R.SUM, "desc monitor: matched pairs", {}),
        ("rollout_desc_exact_acc_on_matched", R.RATIO, "desc monitor: exact accuracy; 1.0 with no pairs",
         {"weight": "pairs", "empty_value": 1.0}),
        ("rollout_desc_sem_enabled", R.MIN, "desc monitor: semantic step enabled (MIN over ranks)", {}),
        ("rollout_desc_sem_acc_on_matched", R.RATIO, "desc monitor: semantic accuracy", {"weight": "pairs"}),
        ("rollout_desc_sem_sim_mean", R.RATIO, "desc monitor: mean similarity", {"weight": "count"}),
        ("rollout_desc_sem_sim_count", R.SUM, "desc monitor: pairs with a similarity", {}),
    ):
        add(name, "eval_rollout", red, ev, meaning, modes=EVAL_ONLY, **extra)
    return k


def _detection_eval_keys() -> list[MetricKey]:
    """Evaluator metrics when a trainer logs them: ``eval_det_<key>`` (infer-eval-config.md §4.5)."""
    k: list[MetricKey] = []
    for iou in ("bbox", "segm"):
        for stat in COCO_STATS:
            k.append(MetricKey(
                f"det_{iou}_{stat}", "det", f"COCO {iou} {stat} from the library (−1.0 = undefined)",
                modes=EVAL_ONLY, emitted=f"detection evaluation ({iou}{', when segm runs' if iou == 'segm' else ''})",
            ))
    for field in F1ISH_FIELDS:
        k.append(MetricKey(
            f"det_f1ish@{{thr}}_{field}", "det", f"F1-ish {field} at IoU threshold thr (written {{thr:.2f}})",
            modes=EVAL_ONLY, emitted="detection evaluation with f1ish metrics, each configured threshold",
        ))
    return k


# ----------------------------------------------------------------------------- registry


class MetricRegistry:
    """The immutable catalogue: lookup by train or eval name, emission checks, vector layouts."""

    def __init__(self, keys: Sequence[MetricKey]) -> None:
        self.keys: tuple[MetricKey, ...] = tuple(keys)
        self._by_name: dict[str, MetricKey] = {}
        self._patterns: list[tuple[re.Pattern[str], MetricKey]] = []
        for key in self.keys:
            if key.name in self._by_name or key.name.startswith(EVAL_PREFIX):
                raise ValueError(f"metric key {key.name!r} declared twice or with the eval prefix")
            self._by_name[key.name] = key
            if key.is_pattern:
                self._patterns.append((key.regex(), key))

    def lookup(self, name: str, mode: Mode = Mode.TRAIN) -> MetricKey | None:
        """The entry of a stored (unprefixed) key emitted in ``mode``, or None."""
        key = self._by_name.get(name)
        if key is None:
            for rx, entry in self._patterns:
                if rx.match(name):
                    key = entry
                    break
        if key is None or mode not in key.modes:
            return None
        return key

    def resolve(self, logged: str) -> tuple[MetricKey, Mode] | None:
        """Entry and mode of a LOGGED key (``eval_`` prefix = eval mode)."""
        if logged.startswith(EVAL_PREFIX):
            hit = self.lookup(logged[len(EVAL_PREFIX):], Mode.EVAL)
            if hit is not None:
                return hit, Mode.EVAL
        hit = self.lookup(logged, Mode.TRAIN)
        return (hit, Mode.TRAIN) if hit is not None else None

    def is_registered(self, logged: str) -> bool:
        return self.resolve(logged) is not None

    def check_keys(self, logged: Iterable[str]) -> tuple[str, ...]:
        """The logged keys that are NOT registered, in first-seen order (empty tuple = all fine)."""
        out: dict[str, None] = {}
        for k in logged:
            if not self.is_registered(k):
                out[k] = None
        return tuple(out)

    def for_variant(self, variant: str) -> tuple[MetricKey, ...]:
        if variant not in ALL_VARIANTS:
            raise ValueError(f"unknown trainer variant {variant!r}; expected one of {list(TRAINER_VARIANTS)}")
        return tuple(k for k in self.keys if variant in k.variants)

    def required_keys(self) -> tuple[str, ...]:
        return REQUIRED_STAGE2_KEYS


def _all_keys() -> list[MetricKey]:
    return [*_stage1_keys(), *_stage2_keys(), *_detection_eval_keys()]


REGISTRY = MetricRegistry(_all_keys())



def is_registered(logged: str) -> bool:
    """True iff ``logged`` (train name, or ``eval_`` + name of an eval-capable key) is in the registry."""
    return REGISTRY.is_registered(logged)


def check_keys(logged: Iterable[str]) -> tuple[str, ...]:
    """The unregistered keys among ``logged`` (empty when every key is registered)."""
    return REGISTRY.check_keys(logged)


# ----------------------------------------------------------------------------- Stage-1 emission matrix (§3.3)


@attrs.frozen
class Stage1Emission:
    """The configuration switches of §3.3 and the batch facts that decide which keys appear."""

    coord_loss: bool
    token_types: bool
    tokens_mode: bool = True
    log_top5: bool = True
    coord_monitor_mass: bool = True
    with_coord_pairs: bool = True
    with_text_pairs: bool = True
    valid_types: bool = True
    disabled_diagnostics: tuple[str, ...] = ()


def stage1_keys(setup: Stage1Emission, mode: Mode) -> frozenset[str]:
    """Every key (logged name, ``eval_``-prefixed in eval) a Stage-1 run with ``setup`` emits in ``mode``.

    Assumes micro-batches with supervised pairs and |N| > 0; ``with_coord_pairs`` /
    ``with_text_pairs`` / ``valid_types`` say whether C, the text class and valid token types occur.
    """
    keys: set[str] = {"token_acc", "pack/num_samples"}
    if mode is Mode.TRAIN:
        keys |= {"loss", "grad_norm", "learning_rate", "epoch", "accum/grad_steps", "accum/current_grad_steps"}
    else:
        keys |= {"loss", "runtime", "samples_per_second", "steps_per_second"}
    coord_block = setup.coord_loss or (setup.token_types and setup.tokens_mode)
    if setup.coord_loss:
        keys |= {"base_ce/loss", "base_ce/noncoord_tokens", "base_ce/noncoord_tokens_per_sample", "base_ce/loss_per_sample"}
    if coord_block:
        keys.add("coord_diag/enabled")
        if setup.with_coord_pairs:
            keys |= {k.name for k in REGISTRY.keys if k.family == "coord_diag" and k.name != "coord_diag/enabled"}
            if not setup.coord_loss:
                keys.discard("stage1/total_loss_per_sample_est")
    if setup.token_types:
        if setup.log_top5:
            keys.add("token_acc_top5")
        if setup.with_text_pairs:
            keys.add("text_token_acc")
        if setup.valid_types:
            for cls in TOKEN_TYPE_CLASSES:
                if cls == "coord" and not setup.with_coord_pairs:
                    continue
                keys |= {f"{cls}_token_frac", f"{cls}_token_acc"}
                if setup.log_top5:
                    keys.add(f"{cls}_token_acc_top5")
        if setup.tokens_mode:
            classes = []
            if setup.with_coord_pairs:
                keys.add("coord_monitor/flip_coord_to_noncoord")
                classes.append("coord")
            if setup.with_text_pairs:
                keys.add("coord_monitor/flip_text_to_coord")
                classes.append("text")
            if setup.valid_types:
                keys |= {"coord_monitor/flip_format_to_coord", "coord_monitor/flip_desc_to_coord"}
                classes += ["format", "desc"]
            if setup.coord_monitor_mass:
                keys |= {f"coord_monitor/coord_vocab_mass_at_gt_{c}" for c in classes}
    for name in setup.disabled_diagnostics:
        if name not in DIAGNOSTIC_NAMES:
            raise ValueError(f"unknown diagnostic name {name!r}; expected one of {list(DIAGNOSTIC_NAMES)}")
        keys.add(f"health/diagnostic_disabled/{name}")
    if mode is Mode.EVAL:
        return frozenset(EVAL_PREFIX + k for k in keys)
    return frozenset(keys)


# ----------------------------------------------------------------------------- updates and aggregation


@attrs.frozen
class MetricUpdate:
    """One observation: ``(key, value, weight >= 0)`` with the stored (unprefixed) key."""

    key: str
    value: float
    weight: float = 1.0


class MetricLayout:
    """The fixed slot order of the flush vectors: registry order of ``keys`` (concrete names).

    Every key has 3 slots in the SUM vector (for MEAN-like keys ``[Σ v·w, Σ w, updates]``; the third
    slot is the presence count that tells an absent key from an empty ratio). Keys reduced by MAX
    (max, min stored negated, pctl, sum_max) have 1 slot in the MAX vector (``-inf`` = absent).
    """

    def __init__(self, keys: Sequence[tuple[str, MetricKey]]) -> None:
        self.entries: tuple[tuple[str, MetricKey], ...] = tuple(keys)
        self.sum_index: dict[str, int] = {}
        self.max_index: dict[str, int] = {}
        for name, entry in self.entries:
            if name in self.sum_index:
                raise ValueError(f"metric key {name!r} appears twice in the layout")
            self.sum_index[name] = len(self.sum_index)
            if entry.reduction in _MAX_VECTOR_REDUCTIONS:
                self.max_index[name] = len(self.max_index)
        self._entry = dict(self.entries)

    @classmethod
    def for_mode(
        cls,
        mode: Mode,
        variant: str | None = None,
        parameters: Mapping[str, Sequence[str]] | None = None,
        registry: MetricRegistry = REGISTRY,
    ) -> MetricLayout:
        """Layout of the keys usable in ``mode`` (and ``variant``); pattern keys are instantiated with
        ``parameters`` (e.g. ``{"thr": ["0.30", "0.50"]}``) or left out."""
        params = dict(parameters or {})
        out: list[tuple[str, MetricKey]] = []
        source = registry.keys if variant is None else registry.for_variant(variant)
        for entry in source:
            if mode not in entry.modes:
                continue
            if entry.is_pattern:
                names = re.findall(r"\{(\w+)\}", entry.name)
                if any(n not in params for n in names):
                    continue
                if len(names) != 1:
                    raise ValueError(f"pattern key {entry.name!r}: only one parameter is supported")
                out.extend((entry.instantiate(**{names[0]: v}), entry) for v in params[names[0]])
            else:
                out.append((entry.name, entry))
        return cls(out)

    def entry(self, name: str) -> MetricKey | None:
        return self._entry.get(name)

    @property
    def sum_size(self) -> int:
        return 3 * len(self.sum_index)

    @property
    def max_size(self) -> int:
        return len(self.max_index)

    def empty_vectors(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return np.zeros(self.sum_size, dtype=np.float64), np.full(self.max_size, -np.inf, dtype=np.float64)

    def finalize(
        self, sum_vector: npt.ArrayLike, max_vector: npt.ArrayLike, prefix: str = ""
    ) -> dict[str, float]:
        """Logged values from the all-reduced vectors (SUM, MAX); absent keys are omitted."""
        sv = np.asarray(sum_vector, dtype=np.float64)
        mv = np.asarray(max_vector, dtype=np.float64)
        if sv.shape != (self.sum_size,) or mv.shape != (self.max_size,):
            raise ValueError(
                f"flush vectors have shapes {sv.shape}, {mv.shape}; the layout needs ({self.sum_size},), ({self.max_size},)"
            )
        out: dict[str, float] = {}
        for name, entry in self.entries:
            value = _final_value(entry, sv[3 * self.sum_index[name]: 3 * self.sum_index[name] + 3],
                                 mv[self.max_index[name]] if name in self.max_index else None)
            if value is not None:
                out[prefix + name] = value
        return out


def _final_value(entry: MetricKey, s: npt.NDArray[np.float64], m: float | None) -> float | None:
    vw, w, n = float(s[0]), float(s[1]), float(s[2])
    red = entry.reduction
    if red in _MAX_VECTOR_REDUCTIONS:
        if m is None or not math.isfinite(m):
            return None
        return -m if red is Reduction.MIN else m
    if n <= 0:
        return None
    if red in (Reduction.MEAN, Reduction.RATIO, Reduction.GAUGE, Reduction.LAST):
        if w > 0:
            return vw / w
        return entry.empty_value
    # SUM, TOTAL
    return vw


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


class MetricAccumulator:
    """One rank's buffer for one mode (train or eval) between two log events.

    ``update`` drops, with one warning per key, anything the layout does not hold (unregistered,
    or not usable in this mode); a non-finite value or a bad weight is dropped with one warning
    per key as well. ``vectors()`` gives the rank-local flush vectors in layout order.
    """

    def __init__(self, layout: MetricLayout, mode: Mode = Mode.TRAIN) -> None:
        self.layout = layout
        self.mode = mode
        self.dropped: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        self._sum, self._max = self.layout.empty_vectors()
        # Rank-local state of GAUGE (Σ v, n), LAST / TOTAL (last v) and SUM_MAX (Σ v) keys.
        self._local: dict[str, list[float]] = {}

    def _drop(self, key: str, why: str) -> bool:
        if key not in self.dropped:
            self.dropped[key] = why
            warnings.warn(f"metric {key!r} dropped: {why}", RuntimeWarning, stacklevel=3)
        return False

    def update(self, key: str, value: float, weight: float = 1.0) -> bool:
        entry = self.layout.entry(key)
        if entry is None:
            registered = REGISTRY.lookup(key, Mode.TRAIN) or REGISTRY.lookup(key, Mode.EVAL)
            why = (f"not emitted in {self.mode.value} mode by this run" if registered is not None
                   else "unregistered metric key (add it to domain/metrics_registry.py)")
            return self._drop(key, why)
        if not _is_real(value) or not math.isfinite(float(value)):
            return self._drop(key, f"non-finite or non-real value {value!r}")
        if not _is_real(weight) or not math.isfinite(float(weight)) or float(weight) < 0:
            return self._drop(key, f"weight must be a finite real >= 0, got {weight!r}")
        v, w = float(value), float(weight)
        red = entry.reduction
        if red in (Reduction.MEAN, Reduction.RATIO, Reduction.SUM):
            j = 3 * self.layout.sum_index[key]
            self._sum[j] += v * w
            self._sum[j + 1] += w
            self._sum[j + 2] += 1.0
        elif red in (Reduction.MAX, Reduction.PCTL):
            j = self.layout.max_index[key]
            self._max[j] = max(self._max[j], v)
        elif red is Reduction.MIN:
            j = self.layout.max_index[key]
            self._max[j] = max(self._max[j], -v)
        elif red in (Reduction.GAUGE, Reduction.SUM_MAX):
            acc = self._local.setdefault(key, [0.0, 0.0])
            acc[0] += v
            acc[1] += 1.0
        else:  # LAST, TOTAL
            self._local[key] = [v, 1.0]
        return True

    def extend(self, updates: Iterable[MetricUpdate]) -> None:
        for u in updates:
            self.update(u.key, u.value, u.weight)

    def vectors(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Rank-local (SUM vector, MAX vector), ready for the two all-reduces."""
        sv, mv = self._sum.copy(), self._max.copy()
        for key, (a, n) in self._local.items():
            entry = self.layout.entry(key)
            assert entry is not None
            red = entry.reduction
            if red is Reduction.SUM_MAX:
                mv[self.layout.max_index[key]] = a
                continue
            j = 3 * self.layout.sum_index[key]
            if red is Reduction.GAUGE:
                sv[j: j + 3] = (a / n, 1.0, 1.0)  # the rank's mean counts once across ranks
            elif red is Reduction.LAST:
                sv[j: j + 3] = (a, 1.0, 1.0)
            else:  # TOTAL
                sv[j: j + 3] = (a, 1.0, 1.0)
        return sv, mv


def reduce_rank_vectors(
    per_rank: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """What the two collectives compute: element-wise SUM of the SUM vectors, MAX of the MAX vectors."""
    if not per_rank:
        raise ValueError("need at least one rank's vectors")
    sums = np.sum([np.asarray(s, dtype=np.float64) for s, _ in per_rank], axis=0)
    maxes = np.max([np.asarray(m, dtype=np.float64) for _, m in per_rank], axis=0)
    return np.asarray(sums, dtype=np.float64), np.asarray(maxes, dtype=np.float64)


def stride_subsample(n: int, max_tokens: int) -> list[int]:
    """Deterministic cap of a class of n pairs (§3.2): all if M = 0 or n <= M, else every ⌊n/M⌋-th, first M."""
    if max_tokens <= 0 or n <= max_tokens:
        return list(range(n))
    stride = n // max_tokens
    return list(range(0, n, stride))[:max_tokens]


def quantile_linear(values: Sequence[float], q: float) -> float | None:
    """q-quantile with linear interpolation between order statistics; None for no values."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    a = sorted(float(v) for v in values)
    if not a:
        return None
    pos = q * (len(a) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(a) - 1)
    return a[lo] + (a[hi] - a[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- reporter payload (§3.1.5)


@attrs.frozen
class MetricPayload:
    """A validated reporter payload; ``weights`` (optional, default 1.0 per key) carries §3.1.2 weights."""

    schema_version: int
    mode: Mode
    global_step: int
    metrics: Mapping[str, float]
    weights: Mapping[str, float] = attrs.field(factory=dict)


def payload_problem(obj: object) -> str | None:
    """Why ``obj`` violates the reporter payload contract, or None when it is valid."""
    if not isinstance(obj, Mapping):
        return f"payload must be a mapping, got {type(obj).__name__}"
    if "schema_version" not in obj:
        return "schema_version missing"
    sv = obj["schema_version"]
    if isinstance(sv, bool) or not isinstance(sv, int):
        return f"schema_version must be an int, got {sv!r}"
    if sv != PAYLOAD_SCHEMA_MAJOR:
        return f"schema_version major must be {PAYLOAD_SCHEMA_MAJOR}, got {sv}"
    mode = obj.get("mode")
    if mode not in ("train", "eval"):
        return f"mode must be 'train' or 'eval', got {mode!r}"
    gs = obj.get("global_step", 0)
    if isinstance(gs, bool) or not isinstance(gs, int) or gs < 0:
        return f"global_step must be an int >= 0, got {gs!r}"
    metrics = obj.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        return "metrics must be a non-empty mapping"
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            return f"metric key must be a non-empty string, got {key!r}"
        if not _is_real(value) or not math.isfinite(float(value)):
            return f"metrics[{key!r}] must be a finite real (bool rejected), got {value!r}"
    weights = obj.get("weights", {})
    if not isinstance(weights, Mapping):
        return "weights must be a mapping"
    for key, value in weights.items():
        if key not in metrics:
            return f"weights[{key!r}] has no metric"
        if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0:
            return f"weights[{key!r}] must be a finite real >= 0, got {value!r}"
    unknown = set(obj) - {"schema_version", "mode", "global_step", "metrics", "weights"}
    if unknown:
        return f"unknown payload fields {sorted(unknown)}"
    return None


def parse_payload(obj: object) -> MetricPayload:
    why = payload_problem(obj)
    if why is not None:
        raise ValueError(f"metric_payload_invalid: {why}")
    assert isinstance(obj, Mapping)
    return MetricPayload(
        schema_version=int(obj["schema_version"]),
        mode=Mode(obj["mode"]),
        global_step=int(obj.get("global_step", 0)),
        metrics={str(k): float(v) for k, v in obj["metrics"].items()},
        weights={str(k): float(v) for k, v in obj.get("weights", {}).items()},
    )


class MetricReporter:
    """Receives payloads, validates them and routes the updates to the train or eval buffer.

    The producer sets ``mode`` from ``model.training``; keys are stored verbatim (no prefix).
    An invalid payload is dropped with one ``metric_payload_invalid`` warning.
    """

    def __init__(self, train: MetricAccumulator, eval_: MetricAccumulator) -> None:
        self.buffers = {Mode.TRAIN: train, Mode.EVAL: eval_}
        self.invalid_payloads = 0

    def submit(self, obj: object) -> bool:
        why = payload_problem(obj)
        if why is not None:
            self.invalid_payloads += 1
            warnings.warn(f"metric_payload_invalid: {why}", RuntimeWarning, stacklevel=2)
            return False
        payload = parse_payload(obj)
        buf = self.buffers[payload.mode]
        for key, value in payload.metrics.items():
            buf.update(key, value, payload.weights.get(key, 1.0))
        return True


# ----------------------------------------------------------------------------- documentation


def registry_snapshot(keys: Iterable[MetricKey] = REGISTRY.keys) -> dict[str, str]:
    """``metric_registry.json`` content: logged key -> meaning (train and eval names)."""
    out: dict[str, str] = {}
    for k in keys:
        if Mode.TRAIN in k.modes:
            out[k.name] = k.meaning
        if k.eval_name is not None:
            out[k.eval_name] = k.meaning
    return out


_FAMILY_TITLES: Mapping[str, str] = {
    "engine": "Engine (trainer-common)",
    "engine_summary": "Engine end-of-training summary",
    "runtime": "Runtime",
    "core": "Stage-1 core",
    "base_ce": "Stage-1 base-CE block",
    "coord_diag": "Stage-1 coord block",
    "token_type": "Stage-1 token/type block",
    "coord_monitor": "Stage-1 coord monitors",
    "health": "Health",
    "stage2_ab": "Stage-2 AB (the first four are required by D14)",
    "loss": "Stage-2 loss terms",
    "rollout": "Stage-2 rollout (Channel B)",
    "time": "Stage-2 time",
    "packing": "Stage-2 post-rollout packing",
    "train": "Stage-2 train counters",
    "stage2_ab_async": "Stage-2 AB async actor/learner",
    "eval_rollout": "Stage-2 eval-time rollout metrics",
    "det": "Detection evaluator (logged by a trainer)",
}


def render_markdown(registry: MetricRegistry = REGISTRY) -> str:
    lines = [
        "# Metric keys",
        "",
        "Generated by `python -m domain.metrics_registry --markdown` from `domain/metrics_registry.py`;",
        "do not edit by hand (a test compares this file with the generated text).",
        "",
        "Keys are stored under their train name; the eval name adds `eval_` (D14). A run emits no other key.",
        "Reductions: `mean` Σv·w/Σw over updates and ranks; `ratio` the same with w = denominator (a ratio of",
        "global sums); `gauge` mean over micro-steps then over ranks; `sum` counter; `max` / `min` over",
        "micro-steps and ranks; `pctl` max over ranks of rank-local percentiles; `last` last value per rank,",
        "mean over ranks; `total` last value per rank (cumulative counter), summed over ranks; `sum_max` summed",
        "over micro-steps, max over ranks. A key with no observation (or Σw = 0) is omitted, never NaN.",
        "`{thr}` is an IoU threshold written with two decimals.",
        "",
    ]
    families: dict[str, list[MetricKey]] = {}
    for k in registry.keys:
        families.setdefault(k.family, []).append(k)
    for family, keys in families.items():
        lines += [f"## {_FAMILY_TITLES.get(family, family)}", ""]
        lines.append("| key | eval name | reduction | weight | variants | emitted | meaning |")
        lines.append("|---|---|---|---|---|---|---|")
        for k in keys:
            variants = "all" if k.variants == ALL_VARIANTS else ", ".join(v for v in TRAINER_VARIANTS if v in k.variants)
            train = f"`{k.name}`" if Mode.TRAIN in k.modes else f"`{k.name}` (eval only)"
            ev = f"`{k.eval_name}`" if k.eval_name else "(train only)"
            red = k.reduction.value + (f", {k.empty_value:g} if empty" if k.empty_value is not None else "")
            meaning = k.meaning.replace("|", "\\|")
            weight = k.weight.replace("|", "\\|")
            emitted = k.emitted.replace("|", "\\|")
            lines.append(f"| {train} | {ev} | {red} | {weight} | {variants} | {emitted} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m domain.metrics_registry", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print docs/metrics.md")
    group.add_argument("--json", action="store_true", help="print the key -> meaning snapshot")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(render_markdown())
    else:
        sys.stdout.write(json.dumps(registry_snapshot(), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
