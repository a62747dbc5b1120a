"""Token/type metrics, coord monitors and the runtime's metric families (stage1.md §3.2-§3.3, §6.4; tests 33, 35, 37, 39).

The metric code is checked against a naive float64 reference written pair by pair (argsort for top-5,
an explicit softmax for the coord-vocabulary mass, explicit stride indices), on a synthetic vocabulary
whose 1000 coord ids are scattered and unsorted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.swift.stage1_runtime import Stage1Runtime
from adapters.torch.collator import ProjectCollator
from adapters.torch.coord_loss import CoordLossKernel, coord_loss_sums
from adapters.torch.stage1_metrics import (
    TokenTypeMetricSettings,
    coord_monitor_updates,
    token_type_metric_updates,
)
from adapters.torch.step_context import StepContext, pop_step_context
from domain.coord_tokens import NUM_BINS, CoordIdTable
from domain.losses import CoordLossSettings
from domain.metrics_registry import REGISTRY, Mode, Stage1Emission, stage1_keys
from domain.token_types import COORD, DESC, FORMAT, IGNORE

V = 1100
_rng = np.random.default_rng(99)
COORD_IDS = [int(x) for x in _rng.permutation(np.arange(50, 1100))[:NUM_BINS]]
TABLE = CoordIdTable(COORD_IDS)
COORD_SET = set(COORD_IDS)
NONCOORD = [v for v in range(V) if v not in COORD_SET]
MASK = torch.as_tensor(TABLE.mask(V))
COLS = torch.tensor(COORD_IDS)
LOSS_ON = CoordLossSettings(enabled=True, soft_ce_weight=1.0, w1_weight=1.0, gate_weight=1.0, temperature=0.9,
                            target_sigma=1.0, target_truncate=8)
LOSS_OFF = CoordLossSettings(enabled=False, temperature=0.9, target_sigma=1.0, target_truncate=8)


def as_dict(updates: list[Any]) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for u in updates:
        assert u.key not in out, f"duplicate update {u.key}"
        out[u.key] = (u.value, u.weight)
    return out


def random_batch(seed: int, b: int, length: int, p_sup: float, p_coord: float, scale: float,
                 with_types: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (b, length, V))
    # A per-row shift of the coord columns spreads the coord-vocabulary mass between rows.
    z[:, :, COORD_IDS] += rng.uniform(-4.0, 4.0, (b, length, 1))
    labels = torch.full((b, length), -100, dtype=torch.int64)
    types = torch.full((b, length), IGNORE, dtype=torch.int64)
    for r in range(b):
        for j in range(1, length):
            if rng.random() < p_sup:
                coord = rng.random() < p_coord
                y = int(rng.choice(COORD_IDS)) if coord else int(rng.choice(NONCOORD))
                labels[r, j] = y
                # Types need not agree with the ids (the coord/text classes are id-based, types are not).
                types[r, j] = int(rng.choice([IGNORE, DESC, FORMAT, COORD]))
                if rng.random() < 0.7:
                    # Put the target just below the k-th largest other entry: exactly k entries above it.
                    k = int(rng.integers(0, 9))
                    others = np.sort(np.delete(z[r, j - 1], y))[::-1]
                    z[r, j - 1, y] = others[0] + 1.0 if k == 0 else (others[k - 1] + others[k]) / 2
    return torch.from_numpy(z).float(), labels, types if with_types else None


def stride_indices(n: int, cap: int) -> list[int]:
    if cap <= 0 or n <= cap:
        return list(range(n))
    step = n // cap
    return [k * step for k in range(cap)]


def reference(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor | None,
              s: TokenTypeMetricSettings) -> dict[str, tuple[float, float]]:
    """Pair by pair in float64, straight from the key table of §3.2."""
    z = logits.double().numpy()
    lab = labels.numpy()
    pairs = [(b, i) for b in range(lab.shape[0]) for i in range(lab.shape[1] - 1) if lab[b, i + 1] != -100]
    if not pairs:
        return {}
    rows = [np.nan_to_num(z[b, i], nan=0.0, posinf=1e4, neginf=-1e4).clip(-1e4, 1e4) for b, i in pairs]
    y = [int(lab[b, i + 1]) for b, i in pairs]
    arg = [int(np.argmax(z[b, i])) for b, i in pairs]
    correct = [a == t for a, t in zip(arg, y)]
    top5 = [t in set(np.argsort(-row, kind="stable")[:5].tolist()) for row, t in zip(rows, y)]
    is_coord = [t in COORD_SET for t in y]
    typ = [int(types.numpy()[b, i + 1]) for b, i in pairs] if types is not None else None
    n = len(pairs)
    out: dict[str, tuple[float, float]] = {}

    def mean_over(flags: list[bool], members: list[int]) -> tuple[float, float] | None:
        return (sum(flags[k] for k in members) / len(members), float(len(members))) if members else None

    def put(key: str, value: tuple[float, float] | None) -> None:
        if value is not None:
            out[key] = value

    if s.log_top5:
        out["token_acc_top5"] = (sum(top5) / n, float(n))
    text = [k for k in range(n) if not is_coord[k]] if s.tokens_mode else list(range(n))
    put("text_token_acc", mean_over(correct, text))
    classes: dict[str, list[int]] = {"coord": [k for k in range(n) if is_coord[k]], "text": text}
    if typ is not None:
        for name, cls in (("desc", DESC), ("format", FORMAT), ("coord", COORD)):
            members = [k for k in range(n) if typ[k] == cls]
            if members:
                out[f"{name}_token_frac"] = (len(members) / n, float(n))
                put(f"{name}_token_acc", mean_over(correct, members))
                if s.log_top5:
                    put(f"{name}_token_acc_top5", mean_over(top5, members))
        classes["format"] = [k for k in range(n) if typ[k] == FORMAT]
        classes["desc"] = [k for k in range(n) if typ[k] == DESC]
    if not s.tokens_mode:
        return out
    pred_coord = [a in COORD_SET for a in arg]
    put("coord_monitor/flip_coord_to_noncoord", mean_over([not p for p in pred_coord], classes["coord"]))
    for name in ("text", "format", "desc"):
        if name in classes:
            put(f"coord_monitor/flip_{name}_to_coord", mean_over(pred_coord, classes[name]))
    if s.coord_monitor_mass:
        for name, members in classes.items():
            if not members:
                continue
            chosen = [members[k] for k in stride_indices(len(members), s.coord_monitor_mass_max_tokens)]
            masses = []
            for k in chosen:
                x = rows[k] / s.temperature
                p = np.exp(x - x.max())
                p /= p.sum()
                masses.append(float(p[COORD_IDS].sum()))
            out[f"coord_monitor/coord_vocab_mass_at_gt_{name}"] = (float(np.mean(masses)), float(len(chosen)))
    return out


def ours(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor | None,
         s: TokenTypeMetricSettings) -> dict[str, tuple[float, float]]:
    result = coord_loss_sums(logits, labels, TABLE, LOSS_ON)
    return as_dict(token_type_metric_updates(result, types, s) + coord_monitor_updates(result, types, MASK, COLS, s))


def assert_same(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == pytest.approx(b[key][0], abs=2e-6), key
        assert a[key][1] == b[key][1], key


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.tuples(st.integers(1, 3), st.integers(2, 10)),
    p_sup=st.one_of(st.just(0.0), st.floats(0.3, 1.0)),
    p_coord=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.5, 3.0]),
    with_types=st.booleans(),
    log_top5=st.booleans(),
    mass=st.booleans(),
    cap=st.integers(0, 4),
    tau=st.sampled_from([0.5, 0.9, 1.0]),
    tokens_mode=st.booleans(),
    chunk_rows=st.integers(1, 5),
)
def test_matches_the_pairwise_reference(
    seed: int, shape: tuple[int, int], p_sup: float, p_coord: float, scale: float, with_types: bool,
    log_top5: bool, mass: bool, cap: int, tau: float, tokens_mode: bool, chunk_rows: int,
) -> None:
    logits, labels, types = random_batch(seed, shape[0], shape[1], p_sup, p_coord, scale, with_types)
    s = TokenTypeMetricSettings(log_top5=log_top5, coord_monitor_mass=mass, coord_monitor_mass_max_tokens=cap,
                                temperature=tau, tokens_mode=tokens_mode, chunk_bytes=chunk_rows * 4 * V)
    got = ours(logits, labels, types, s)
    assert_same(got, reference(logits, labels, types, s))
    assert all(REGISTRY.is_registered(k) for k in got)
    for value, weight in got.values():
        assert math.isfinite(value) and weight > 0


def test_flip_and_accuracy_by_hand() -> None:
    """Two coord pairs (one predicted as text), two text pairs (one predicted as a coord id)."""
    logits = torch.zeros(1, 5, V)
    labels = torch.tensor([[-100, COORD_IDS[3], COORD_IDS[7], NONCOORD[5], NONCOORD[6]]])
    types = torch.tensor([[IGNORE, COORD, COORD, DESC, FORMAT]])
    logits[0, 0, COORD_IDS[3]] = 9.0  # correct coord
    logits[0, 1, NONCOORD[1]] = 9.0  # coord target, text predicted: a coord -> non-coord flip
    logits[0, 2, NONCOORD[5]] = 9.0  # correct desc
    logits[0, 3, COORD_IDS[0]] = 9.0  # format target, coord predicted
    s = TokenTypeMetricSettings(coord_monitor_mass=False)
    got = ours(logits, labels, types, s)
    assert got["coord_monitor/flip_coord_to_noncoord"] == (0.5, 2.0)
    assert got["coord_monitor/flip_text_to_coord"] == (0.5, 2.0)
    assert got["coord_monitor/flip_format_to_coord"] == (1.0, 1.0)
    assert got["coord_monitor/flip_desc_to_coord"] == (0.0, 1.0)
    assert got["text_token_acc"] == (0.5, 2.0)
    assert got["coord_token_acc"] == (0.5, 2.0) and got["coord_token_frac"] == (0.5, 4.0)
    assert got["desc_token_acc"] == (1.0, 1.0) and got["format_token_acc"] == (0.0, 1.0)


def test_mass_cap_uses_the_stride_subsample() -> None:
    """n = 10 text pairs, M = 4 -> pairs 0, 2, 4, 6 (stage1.md §3.2), weight 4."""
    logits = torch.zeros(1, 11, V)
    labels = torch.full((1, 11), -100, dtype=torch.int64)
    labels[0, 1:] = torch.tensor(NONCOORD[:10])
    # Pair k puts logit k on every coord column: mass_k = 1000 e^k / (1000 e^k + 100).
    for k in range(10):
        logits[0, k, COLS] = float(k)
    s = TokenTypeMetricSettings(coord_monitor_mass_max_tokens=4, temperature=1.0)
    got = ours(logits, labels, None, s)
    expected = np.mean([1000 * math.exp(k) / (1000 * math.exp(k) + (V - NUM_BINS)) for k in (0, 2, 4, 6)])
    assert got["coord_monitor/coord_vocab_mass_at_gt_text"] == (pytest.approx(expected, rel=1e-6), 4.0)


def test_mass_at_coord_pairs_equals_the_coord_block_mass() -> None:
    """Two independent computations of Σ_k softmax(z̃/τ)[c_k] over C (coord block vs coord monitor)."""
    logits, labels, _ = random_batch(5, 2, 12, 0.9, 0.6, 2.0, False)
    result = coord_loss_sums(logits, labels, TABLE, LOSS_ON)
    block = result.coord_block_sums()
    assert block is not None and block.count > 0
    mon = as_dict(coord_monitor_updates(result, None, MASK, COLS, TokenTypeMetricSettings(temperature=0.9)))
    assert mon["coord_monitor/coord_vocab_mass_at_gt_coord"][0] == pytest.approx(block.mass / block.count, rel=1e-5)


def test_without_types_only_id_based_keys_and_numeric_mode_has_no_coord_monitor() -> None:
    logits, labels, types = random_batch(7, 2, 12, 0.9, 0.4, 1.0, True)
    got = ours(logits, labels, None, TokenTypeMetricSettings())
    assert not any(k.startswith(("desc_", "format_", "coord_token")) for k in got)
    assert "coord_monitor/flip_format_to_coord" not in got and "coord_monitor/coord_vocab_mass_at_gt_desc" not in got
    assert {"token_acc_top5", "text_token_acc", "coord_monitor/flip_text_to_coord"} <= got.keys()
    numeric = ours(logits, labels, types, TokenTypeMetricSettings(tokens_mode=False))
    assert not any(k.startswith("coord_monitor/") for k in numeric)
    n_sup = int((labels[:, 1:] != -100).sum())
    assert numeric["text_token_acc"][1] == n_sup  # numeric mode: text = T


def test_no_supervised_pairs_emit_nothing() -> None:
    logits = torch.randn(1, 4, V)
    labels = torch.full((1, 4), -100, dtype=torch.int64)
    assert ours(logits, labels, None, TokenTypeMetricSettings()) == {}


def test_metrics_add_no_graph_and_leave_gradients_alone() -> None:
    logits, labels, types = random_batch(3, 2, 9, 0.9, 0.5, 1.0, True)
    leaf = logits.clone().requires_grad_(True)
    result = coord_loss_sums(leaf, labels, TABLE, LOSS_ON)
    (result.sum_ce + result.sum_coord).backward()
    before = leaf.grad.clone()  # type: ignore[union-attr]
    token_type_metric_updates(result, types, TokenTypeMetricSettings())
    coord_monitor_updates(result, types, MASK, COLS, TokenTypeMetricSettings())
    assert torch.equal(leaf.grad, before)  # type: ignore[arg-type]
    assert torch.equal(labels, random_batch(3, 2, 9, 0.9, 0.5, 1.0, True)[1])  # labels untouched


# ----------------------------------------------------------------------------- the runtime's families


class _NullSink:
    def log(self, event: Any) -> None:
        pass

    def close(self) -> None:
        pass


def make_runtime(tmp_path: Path, *, coord_loss: bool, types: bool, tokens_mode: bool = True) -> Stage1Runtime:
    settings = LOSS_ON if coord_loss else LOSS_OFF
    collator = ProjectCollator(pad_id=0, rope_index=lambda ids, grid: torch.zeros(3, ids.shape[0]), max_meta_samples=16)
    return Stage1Runtime(
        coord_table=TABLE,
        kernel=CoordLossKernel(TABLE, settings),
        collator=collator,
        coord_mask=MASK,
        run_dir=tmp_path,
        max_steps=1,
        sink=_NullSink(),  # type: ignore[arg-type]
        resolved_config_path=tmp_path / "resolved_config.json",
        processor=None,
        token_types=TokenTypeMetricSettings(temperature=0.9, tokens_mode=tokens_mode) if types else None,
        grad_steps=2,
    )


def batch_context(packed: bool, *, types: bool = True, seed: int = 0) -> tuple[torch.Tensor, StepContext]:
    """A micro-batch whose types agree with its ids: COORD at coord ids, DESC / FORMAT elsewhere."""
    rows, length = (1, 30) if packed else (2, 15)
    logits, labels, _ = random_batch(seed, rows, length, 0.8, 0.4, 1.5, False)
    labels[:, 1] = COORD_IDS[11]  # at least one coord pair and one text pair
    labels[:, 2] = NONCOORD[3]
    tt = torch.full_like(labels, IGNORE)
    sup = labels != -100
    is_coord = MASK[labels.clamp_min(0)] & sup
    tt[sup & ~is_coord] = FORMAT
    tt[:, 2] = DESC
    tt[is_coord] = COORD
    raw: dict[str, Any] = {
        "input_ids": torch.zeros_like(labels),
        "labels": labels,
        "pack_num_samples": torch.tensor([3] if packed else [1, 1]),
        "dataset_labels": ["shapesxyz"] * rows,
        "dataset_segments": [length] * rows,
        "instability_meta_json": "[]",
    }
    if types:
        raw["token_types"] = tt
    return logits, pop_step_context(raw)


def flushed(runtime: Stage1Runtime, train: bool) -> dict[str, float]:
    return runtime.flush_metrics(train=train)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("types", [False, True])
@pytest.mark.parametrize("coord_loss", [False, True])
def test_emission_matrix(tmp_path: Path, packed: bool, types: bool, coord_loss: bool) -> None:
    """§9.33 at the runtime: registered keys only; eval set = train set minus train-only keys;
    the key set is the registry's prediction for this configuration; pure-CE diagnostics have
    ``coord_diag/enabled`` = 0 and no base-CE / total keys."""
    runtime = make_runtime(tmp_path, coord_loss=coord_loss, types=types)
    logits, ctx = batch_context(packed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unregistered or dropped key would warn
        for train in (True, False):
            result = runtime.loss(logits, ctx, 0)
            runtime.record_metrics(result, ctx, train=train, window_len=2)
        train_keys = set(flushed(runtime, True))
        eval_logged = flushed(runtime, False)
    eval_keys = {k.removeprefix("eval_") for k in eval_logged}
    assert all(REGISTRY.is_registered(k) for k in train_keys | set(eval_logged))
    assert eval_keys == train_keys - {"accum/grad_steps", "accum/current_grad_steps"}
    predicted = stage1_keys(Stage1Emission(coord_loss=coord_loss, token_types=types), Mode.TRAIN)
    engine = {"loss", "grad_norm", "learning_rate", "epoch"}
    assert train_keys == set(predicted) - engine
    assert not any("shapesxyz" in k for k in train_keys)
    if not coord_loss and types:
        logged = runtime.metric_updates(result, ctx, train=True, window_len=1)
        values = {u.key: u.value for u in logged}
        assert values["coord_diag/enabled"] == 0.0
        assert not any(k.startswith(("base_ce/", "stage1/")) for k in values)


def test_total_loss_estimate_is_the_sum_of_the_two_per_sample_parts(tmp_path: Path) -> None:
    """§9.39 on one micro-batch."""
    runtime = make_runtime(tmp_path, coord_loss=True, types=False)
    logits, ctx = batch_context(True)
    result = runtime.loss(logits, ctx, 0)
    v = {u.key: u.value for u in runtime.metric_updates(result, ctx, train=True)}
    assert v["stage1/total_loss_per_sample_est"] == pytest.approx(
        v["base_ce/loss_per_sample"] + v["coord_diag/loss_per_sample"], rel=1e-12
    )


@pytest.fixture()
def collective_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Pretends a process group exists and records each collective the runtime enters."""
    calls: list[str] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: calls.append(str(op)))
    yield calls


def test_a_raising_diagnostic_warns_once_is_disabled_and_reports_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collective_spy: list[str]
) -> None:
    """§9.37: one warning, a no-op afterwards, λ unchanged, health key = 1.0 in both modes, same collectives."""
    import adapters.swift.stage1_runtime as engine_module

    healthy = make_runtime(tmp_path, coord_loss=True, types=True)
    broken = make_runtime(tmp_path, coord_loss=True, types=True)
    calls = {"n": 0}

    def boom(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        raise RuntimeError("synthetic failure")

    logits, ctx = batch_context(False)
    reference = healthy.loss(logits, ctx, 0)
    healthy.record_metrics(reference, ctx, train=True, window_len=1)
    healthy.record_metrics(reference, ctx, train=False)
    healthy_train, healthy_eval = flushed(healthy, True), flushed(healthy, False)
    n_healthy = len(collective_spy)
    assert n_healthy == 4  # SUM + MAX vectors per flush
    collective_spy.clear()

    monkeypatch.setattr(engine_module, "token_type_metric_updates", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = broken.loss(logits, ctx, 0)
        for _ in range(3):
            broken.record_metrics(result, ctx, train=True, window_len=1)
        broken.record_metrics(result, ctx, train=False)
    messages = [str(w.message) for w in caught if "token_type_metrics" in str(w.message)]
    assert len(messages) == 1 and "synthetic failure" in messages[0]
    assert calls["n"] == 1  # disabled: never called again
    assert float(result.sum_ce) == float(reference.sum_ce) and float(result.sum_coord) == float(reference.sum_coord)
    train, ev = flushed(broken, True), flushed(broken, False)
    assert len(collective_spy) == n_healthy
    assert train["health/diagnostic_disabled/token_type_metrics"] == 1.0
    assert ev["eval_health/diagnostic_disabled/token_type_metrics"] == 1.0
    family = ("token_acc_top5", "text_token_acc", "desc_", "format_", "coord_token")
    assert {k for k in healthy_train if not k.startswith(family)} | {
        "health/diagnostic_disabled/token_type_metrics"
    } == set(train)
    for key, value in train.items():
        if key in healthy_train:
            assert value == pytest.approx(healthy_train[key], rel=1e-12), key
    assert {k for k in healthy_eval if not k.startswith(tuple("eval_" + f for f in family))} <= set(ev)


def test_a_missing_token_types_extra_reports_the_enricher(tmp_path: Path) -> None:
    """The token-type enricher failed (its extra is absent) -> ``token_type_enricher`` health key, id-based keys stay."""
    runtime = make_runtime(tmp_path, coord_loss=True, types=True)
    logits, ctx = batch_context(False, types=False)
    runtime.record_metrics(runtime.loss(logits, ctx, 0), ctx, train=True, window_len=1)
    logged = flushed(runtime, True)
    assert logged["health/diagnostic_disabled/token_type_enricher"] == 1.0
    assert "text_token_acc" in logged and "desc_token_frac" not in logged


@pytest.mark.parametrize("settings_", [LOSS_ON, LOSS_OFF], ids=["distributional", "pure_ce"])
def test_diagnostic_switches_do_not_change_the_loss_or_its_gradient(settings_: CoordLossSettings) -> None:
    """The kernel's diagnostic switches (pure-CE coord block, monitor statistics) leave λ's inputs and the
    gradient bit-identical."""
    logits, labels, _ = random_batch(11, 2, 10, 0.9, 0.5, 2.0, False)
    outs = []
    for coord_metrics, logit_stats in ((False, False), (True, True)):
        leaf = logits.clone().requires_grad_(True)
        result = coord_loss_sums(leaf, labels, TABLE, settings_, coord_metrics=coord_metrics, logit_stats=logit_stats)
        total = result.sum_ce + result.sum_coord
        total.backward()
        outs.append((float(result.sum_ce.detach()), float(result.sum_coord.detach()), leaf.grad))
    assert outs[0][:2] == outs[1][:2]
    assert torch.equal(outs[0][2], outs[1][2])  # type: ignore[arg-type]
