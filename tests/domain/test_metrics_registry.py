"""Metric registry, aggregation and payload contract (stage1.md §3, stage2.md §18-19, D14; tests 33-36)."""

from __future__ import annotations

import enum
import itertools
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.metrics_registry import (
    DIAGNOSTIC_NAMES,
    REGISTRY,
    REQUIRED_STAGE2_KEYS,
    STRICT_DROP_REASONS,
    MetricAccumulator,
    MetricKey,
    MetricLayout,
    MetricReporter,
    MetricUpdate,
    Mode,
    Reduction,
    Stage1Emission,
    check_keys,
    is_registered,
    payload_problem,
    quantile_linear,
    reduce_rank_vectors,
    render_markdown,
    stage1_keys,
    strict_drop_reasons,
    stride_subsample,
)

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- catalogue


def test_required_d14_keys_are_registered() -> None:
    assert REQUIRED_STAGE2_KEYS == (
        "stage2_ab/b_ratio_realized",
        "stage2_ab/channel_b/invalid_rollout",
        "stage2_ab/channel_b/strict_drop/N_valid_pred",
        "stage2_ab/channel_b/strict_drop/N_drop_invalid",
    )
    for key in REQUIRED_STAGE2_KEYS:
        assert is_registered(key), key
    assert REGISTRY.lookup("stage2_ab/b_ratio_realized").reduction is Reduction.GAUGE  # type: ignore[union-attr]
    assert REGISTRY.lookup("stage2_ab/channel_b/invalid_rollout").reduction is Reduction.SUM  # type: ignore[union-attr]


def test_eval_prefix_is_derived_and_train_only_keys_have_no_eval_name() -> None:
    assert is_registered("coord_diag/loss") and is_registered("eval_coord_diag/loss")
    assert is_registered("loss") and is_registered("eval_loss")
    assert is_registered("token_acc") and is_registered("eval_token_acc")
    for train_only in ("grad_norm", "learning_rate", "accum/grad_steps", "stage2_ab/b_ratio_realized"):
        assert is_registered(train_only)
        assert not is_registered("eval_" + train_only), train_only
    # Eval-only keys exist only with the prefix.
    assert is_registered("eval_rollout_f1") and not is_registered("rollout_f1")
    assert is_registered("eval_runtime") and not is_registered("runtime")
    assert is_registered("eval_det_bbox_AP") and not is_registered("det_bbox_AP")


def test_parameterised_evaluator_keys() -> None:
    assert is_registered("eval_det_f1ish@0.50_tp_loc")
    assert is_registered("eval_det_f1ish@0.30_f1_full_macro")
    assert is_registered("eval_det_f1ish@1.00_precision_loc_micro")
    assert not is_registered("eval_det_f1ish@0.5_tp_loc")  # written {thr:.2f}
    assert not is_registered("eval_det_f1ish@0.50_bogus")


def test_unregistered_and_forbidden_keys() -> None:
    forbidden = [
        "stage2/anything", "rollout/match_rate", "rollout/max_new_tokens", "rollout/num_beams",
        "rollout/decode_greedy", "rollout/parse_dropped_ambiguous", "coord_diag/lvis/loss",
        "token_acc_coco", "eval_grad_norm", "", "eval_",
    ]
    assert check_keys(["loss", *forbidden, "loss"]) == tuple(forbidden)
    assert check_keys(["loss", "eval_loss", "token_acc"]) == ()


def test_drop_reasons_derive_from_the_parser_enum() -> None:
    """One owner (issue 10): the registry's reasons are the DropReason members plus Stage 2's buckets."""
    from domain.coordjson import INCOMPLETE_TAIL, POLY_UNSUPPORTED, DropReason
    from domain.metrics_registry import _stage2_keys

    assert STRICT_DROP_REASONS == strict_drop_reasons(DropReason)
    assert set(STRICT_DROP_REASONS) == {r.value for r in DropReason} | {INCOMPLETE_TAIL, POLY_UNSUPPORTED}
    members = [(m.name, m.value) for m in DropReason] + [("NEW_REASON", "new_reason")]
    extended = enum.Enum("Extended", members, type=str)  # type: ignore[misc]
    reasons = strict_drop_reasons(extended)
    assert reasons == (*STRICT_DROP_REASONS[:-2], "new_reason", POLY_UNSUPPORTED, "other")
    names = {k.name for k in _stage2_keys(reasons)}
    assert "stage2_ab/channel_b/strict_drop/reason/new_reason" in names


def test_enumerated_families_are_complete() -> None:
    for name in DIAGNOSTIC_NAMES:
        assert is_registered(f"health/diagnostic_disabled/{name}")
        assert is_registered(f"eval_health/diagnostic_disabled/{name}")
    for reason in STRICT_DROP_REASONS:
        assert is_registered(f"stage2_ab/channel_b/strict_drop/reason/{reason}")
    assert len(STRICT_DROP_REASONS) == 10
    for cls in ("desc", "format", "coord"):
        for suffix in ("token_frac", "token_acc", "token_acc_top5"):
            assert is_registered(f"{cls}_{suffix}")
    for cls in ("coord", "text", "format", "desc"):
        assert is_registered(f"coord_monitor/coord_vocab_mass_at_gt_{cls}")


def test_no_key_is_declared_twice_and_no_key_names_a_dataset() -> None:
    names = [k.name for k in REGISTRY.keys]
    assert len(names) == len(set(names))
    for name in names:
        for dataset in ("coco", "lvis", "objects365", "refcoco"):
            assert dataset not in name.lower()


def test_duplicate_declaration_is_rejected() -> None:
    from domain.metrics_registry import MetricRegistry

    with pytest.raises(ValueError, match="twice"):
        MetricRegistry([MetricKey("a", "x", "m"), MetricKey("a", "x", "m")])


# ----------------------------------------------------------------------------- emission matrix (test 33, unit level)


EMISSIONS = [
    Stage1Emission(coord_loss=cl, token_types=tt, tokens_mode=tm, valid_types=vt, with_coord_pairs=wc)
    for cl, tt, tm, vt, wc in itertools.product([True, False], repeat=5)
    if not (cl and not tm)  # numeric mode with the coord loss is a config error
]


@pytest.mark.parametrize("setup", EMISSIONS)
def test_emission_matrix_keys_are_registered_and_eval_mirrors_train(setup: Stage1Emission) -> None:
    train = stage1_keys(setup, Mode.TRAIN)
    ev = stage1_keys(setup, Mode.EVAL)
    assert check_keys(train) == ()
    assert check_keys(ev) == ()
    objective_families = {"core", "base_ce", "coord_diag", "token_type", "coord_monitor", "health"}

    def family(name: str) -> str:
        hit = REGISTRY.resolve(name)
        assert hit is not None
        return hit[0].family

    train_obj = {k for k in train if family(k) in objective_families}
    eval_obj = {k[len("eval_"):] for k in ev if family(k) in objective_families}
    assert train_obj == eval_obj


def test_emission_matrix_rows() -> None:
    dist = stage1_keys(Stage1Emission(coord_loss=True, token_types=False), Mode.TRAIN)
    assert {"base_ce/loss", "coord_diag/enabled", "coord_diag/loss", "stage1/total_loss_per_sample_est"} <= dist
    assert "token_acc_top5" not in dist
    pure = stage1_keys(Stage1Emission(coord_loss=False, token_types=True), Mode.TRAIN)
    assert "coord_diag/enabled" in pure and "coord_diag/loss" in pure
    assert not any(k.startswith("base_ce/") for k in pure) and "stage1/total_loss_per_sample_est" not in pure
    no_c = stage1_keys(Stage1Emission(coord_loss=True, token_types=False, with_coord_pairs=False), Mode.TRAIN)
    assert {k for k in no_c if k.startswith("coord_diag/")} == {"coord_diag/enabled"}
    numeric = stage1_keys(Stage1Emission(coord_loss=False, token_types=True, tokens_mode=False), Mode.TRAIN)
    assert not any(k.startswith(("coord_monitor/", "coord_diag/")) for k in numeric)
    plain = stage1_keys(Stage1Emission(coord_loss=False, token_types=False), Mode.TRAIN)
    assert plain == {"loss", "grad_norm", "learning_rate", "epoch", "accum/grad_steps", "accum/current_grad_steps",
                     "token_acc", "pack/num_samples"}
    health = stage1_keys(Stage1Emission(coord_loss=True, token_types=False, disabled_diagnostics=("coord_monitor",)),
                         Mode.EVAL)
    assert "eval_health/diagnostic_disabled/coord_monitor" in health


# ----------------------------------------------------------------------------- aggregation (test 34)


def _train_acc() -> MetricAccumulator:
    return MetricAccumulator(MetricLayout.for_mode(Mode.TRAIN, "stage1"), Mode.TRAIN)


def test_weighted_mean_of_updates() -> None:
    acc = _train_acc()
    acc.update("token_acc", 0.5, 10)
    acc.update("token_acc", 1.0, 30)
    values = acc.layout.finalize(*acc.vectors())
    assert values == {"token_acc": pytest.approx(0.875)}


def test_zero_weight_only_means_omitted_never_nan_or_zero() -> None:
    acc = _train_acc()
    acc.update("base_ce/loss", 3.0, 0.0)
    assert acc.layout.finalize(*acc.vectors()) == {}


def test_two_ranks_vectors_add() -> None:
    r0, r1 = _train_acc(), _train_acc()
    r0.update("token_acc", 0.5, 10)
    r1.update("token_acc", 1.0, 30)
    r1.update("coord_diag/loss", 2.0, 4)
    reduced = reduce_rank_vectors([r0.vectors(), r1.vectors()])
    values = r0.layout.finalize(*reduced, prefix="")
    assert values == {"token_acc": pytest.approx(0.875), "coord_diag/loss": pytest.approx(2.0)}
    s0, _ = r0.vectors()
    s1, _ = r1.vectors()
    assert np.array_equal(reduced[0], s0 + s1)


def test_eval_flush_adds_the_prefix() -> None:
    layout = MetricLayout.for_mode(Mode.EVAL, "stage1")
    acc = MetricAccumulator(layout, Mode.EVAL)
    acc.update("coord_diag/loss", 2.0, 3)
    assert layout.finalize(*acc.vectors(), prefix="eval_") == {"eval_coord_diag/loss": 2.0}


@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(0, 1e6)), min_size=1, max_size=30), st.integers(1, 4))
@settings(max_examples=100, deadline=None)
def test_weighted_mean_matches_the_formula_across_ranks(updates: list[tuple[float, float]], ranks: int) -> None:
    accs = [_train_acc() for _ in range(ranks)]
    for j, (v, w) in enumerate(updates):
        accs[j % ranks].update("coord_diag/margin_mean", v, w)
    values = accs[0].layout.finalize(*reduce_rank_vectors([a.vectors() for a in accs]))
    total_w = math.fsum(w for _, w in updates)
    if total_w == 0:
        assert values == {}
    else:
        expected = math.fsum(v * w for v, w in updates) / total_w
        assert values["coord_diag/margin_mean"] == pytest.approx(expected, rel=1e-9, abs=1e-9 * max(1.0, abs(expected)))


def test_unregistered_key_is_dropped_with_one_warning_per_key() -> None:
    acc = _train_acc()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert acc.update("token_acc_coco", 1.0) is False
        assert acc.update("token_acc_coco", 1.0) is False
        assert acc.update("grad_norm_x", 1.0) is False
    assert len(caught) == 2
    assert set(acc.dropped) == {"token_acc_coco", "grad_norm_x"}
    assert acc.layout.finalize(*acc.vectors()) == {}


def test_train_only_key_in_the_eval_buffer_is_dropped() -> None:
    acc = MetricAccumulator(MetricLayout.for_mode(Mode.EVAL, "stage1"), Mode.EVAL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert acc.update("grad_norm", 1.0) is False
    assert "eval" in str(caught[0].message)


def test_non_finite_value_or_negative_weight_is_dropped() -> None:
    acc = _train_acc()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert acc.update("token_acc", math.nan, 1.0) is False
        assert acc.update("base_ce/loss", 1.0, -1.0) is False
        assert acc.update("pack/num_samples", True, 1.0) is False  # type: ignore[arg-type]
    assert acc.layout.finalize(*acc.vectors()) == {}


def test_stage1_layout_has_no_max_vector_and_keeps_registry_order() -> None:
    layout = MetricLayout.for_mode(Mode.TRAIN, "stage1")
    assert layout.max_size == 0
    names = [n for n, _ in layout.entries]
    order = [k.name for k in REGISTRY.keys if k.name in set(names)]
    assert names == order
    assert names.index("loss") < names.index("token_acc") < names.index("coord_diag/loss")


def test_stage2_reductions() -> None:
    layout = MetricLayout.for_mode(Mode.TRAIN, "stage2_ab")
    r0, r1 = MetricAccumulator(layout), MetricAccumulator(layout)
    r0.update("stage2_ab/channel_b/invalid_rollout", 2)
    r0.update("stage2_ab/channel_b/invalid_rollout", 1)
    r1.update("stage2_ab/channel_b/invalid_rollout", 4)
    r0.update("stage2_ab/is_channel_b", 0)
    r1.update("stage2_ab/is_channel_b", 1)
    # gauge: mean over micro-steps per rank, then over ranks: ((1 + 3) / 2 + 10) / 2 = 6
    r0.update("stage2_ab/b_ratio_realized", 1.0)
    r0.update("stage2_ab/b_ratio_realized", 3.0)
    r1.update("stage2_ab/b_ratio_realized", 10.0)
    # ratio from global sums: precision = M / P with weight P
    r0.update("rollout/precision", 2 / 4, 4)
    r1.update("rollout/precision", 1 / 6, 6)
    r0.update("rollout/recall", 0.0, 0.0)  # undefined everywhere -> 0 by rule
    # pctl: max over ranks
    r0.update("rollout/gen_new_tokens_p90", 100)
    r1.update("rollout/gen_new_tokens_p90", 150)
    # sum over micro-steps, max over ranks
    r0.update("time/forward_s", 1.0)
    r0.update("time/forward_s", 2.0)
    r1.update("time/forward_s", 2.5)
    # cumulative rank-local counter: last value per rank, summed over ranks
    r0.update("stage2_ab/async/drop_stale_total", 3)
    r0.update("stage2_ab/async/drop_stale_total", 5)
    r1.update("stage2_ab/async/drop_stale_total", 7)
    values = layout.finalize(*reduce_rank_vectors([r0.vectors(), r1.vectors()]))
    assert values == {
        "stage2_ab/channel_b/invalid_rollout": 7.0,
        "stage2_ab/is_channel_b": 1.0,
        "stage2_ab/b_ratio_realized": 6.0,
        "rollout/precision": pytest.approx(3 / 10),
        "rollout/recall": 0.0,
        "rollout/gen_new_tokens_p90": 150.0,
        "time/forward_s": 3.0,
        "stage2_ab/async/drop_stale_total": 12.0,
    }


def test_min_reduction_and_parameterised_layout() -> None:
    layout = MetricLayout.for_mode(Mode.EVAL, "stage2_ab", parameters={"thr": ["0.30", "0.50"]})
    names = {n for n, _ in layout.entries}
    assert "det_f1ish@0.30_tp_loc" in names and "det_f1ish@0.50_tp_loc" in names
    r0, r1 = MetricAccumulator(layout, Mode.EVAL), MetricAccumulator(layout, Mode.EVAL)
    r0.update("rollout_desc_sem_enabled", 1.0)
    r1.update("rollout_desc_sem_enabled", 0.0)
    r1.update("det_f1ish@0.50_tp_loc", 3.0)
    values = layout.finalize(*reduce_rank_vectors([r0.vectors(), r1.vectors()]), prefix="eval_")
    assert values == {"eval_rollout_desc_sem_enabled": 0.0, "eval_det_f1ish@0.50_tp_loc": 3.0}


# ----------------------------------------------------------------------------- helpers of test 35


def test_stride_subsample_and_quantile() -> None:
    assert stride_subsample(10, 4) == [0, 2, 4, 6]
    assert stride_subsample(10, 0) == list(range(10))
    assert stride_subsample(3, 4) == [0, 1, 2]
    assert quantile_linear(list(range(10)), 0.9) == pytest.approx(8.1)
    assert quantile_linear([], 0.9) is None


@given(st.integers(0, 500), st.integers(0, 100))
@settings(max_examples=200, deadline=None)
def test_stride_subsample_properties(n: int, m: int) -> None:
    idx = stride_subsample(n, m)
    assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
    assert len(idx) == (n if m == 0 or n <= m else m)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_quantile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert quantile_linear(values, q) == pytest.approx(float(np.quantile(values, q, method="linear")), abs=1e-6)


# ----------------------------------------------------------------------------- payload contract (test 36)


def _payload(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"schema_version": 1, "mode": "train", "global_step": 3, "metrics": {"token_acc": 0.5}}
    base.update(over)
    return base


@pytest.mark.parametrize(
    "bad",
    [
        {k: v for k, v in _payload().items() if k != "schema_version"},
        _payload(schema_version="1"),
        _payload(schema_version=True),
        _payload(schema_version=999),
        _payload(mode="predict"),
        _payload(global_step=True),
        _payload(metrics={}),
        _payload(metrics={"": 1.0}),
        _payload(metrics={"token_acc": True}),
        _payload(metrics={"token_acc": math.nan}),
        _payload(metrics={"token_acc": "0.5"}),
        _payload(weights={"token_acc": -1.0}),
        _payload(weights={"other": 1.0}),
        "not a mapping",
    ],
)
def test_invalid_payloads_are_dropped_with_one_warning(bad: object) -> None:
    assert payload_problem(bad) is not None
    train, ev = _train_acc(), MetricAccumulator(MetricLayout.for_mode(Mode.EVAL, "stage1"), Mode.EVAL)
    reporter = MetricReporter(train, ev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert reporter.submit(bad) is False
    assert len(caught) == 1 and "metric_payload_invalid" in str(caught[0].message)
    assert train.layout.finalize(*train.vectors()) == {}


def test_valid_payloads_are_routed_by_mode_and_stored_verbatim() -> None:
    train, ev = _train_acc(), MetricAccumulator(MetricLayout.for_mode(Mode.EVAL, "stage1"), Mode.EVAL)
    reporter = MetricReporter(train, ev)
    assert reporter.submit(_payload(metrics={"token_acc": 0.5}, weights={"token_acc": 10}))
    assert reporter.submit(_payload(metrics={"token_acc": 1.0}, weights={"token_acc": 30}))
    assert reporter.submit(_payload(mode="eval", metrics={"coord_diag/loss": 2.0}))
    assert train.layout.finalize(*train.vectors()) == {"token_acc": pytest.approx(0.875)}
    assert ev.layout.finalize(*ev.vectors(), prefix="eval_") == {"eval_coord_diag/loss": 2.0}


def test_metric_update_value_object() -> None:
    u = MetricUpdate("token_acc", 0.5, 2.0)
    assert (u.key, u.value, u.weight) == ("token_acc", 0.5, 2.0)


# ----------------------------------------------------------------------------- docs/metrics.md


def test_committed_docs_equal_the_generated_markdown() -> None:
    committed = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), "regenerate: python -m domain.metrics_registry --markdown > docs/metrics.md"


def test_markdown_cli_prints_the_same_text() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "domain.metrics_registry", "--markdown"],
        cwd=REPO, capture_output=True, text=True, check=True, encoding="utf-8",
    ).stdout
    assert out == render_markdown()
    for key in REQUIRED_STAGE2_KEYS:
        assert f"`{key}`" in out
