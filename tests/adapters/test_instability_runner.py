"""The instability monitor's trainer-side runner (stage1.md §5; tests 42-45).

Decisions (EMA, reasons) are pure and tested in tests/domain/test_instability.py; here: statistics from
real kernel results, the event file, the sample dump, the guard's gradients, early stop and the
cross-rank stop flag over a real gloo process group (W = 2).
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import adapters.torch.instability as runner_module
from adapters.torch.coord_loss import coord_loss_sums, micro_step_stats
from adapters.torch.instability import (
    NO_DECISION,
    InstabilityRunner,
    learning_rate_of,
    read_records,
)
from domain.coord_tokens import NUM_BINS, CoordIdTable
from domain.errors import BestEffortDiagnostics
from domain.instability import (
    EarlyStopSettings,
    GuardSettings,
    InstabilitySettings,
    MicroStepStats,
    MonitorState,
)
from domain.losses import CoordLossSettings

V = 1100
COORD_IDS = list(range(100, 100 + NUM_BINS))
TABLE = CoordIdTable(COORD_IDS)
LOSS = CoordLossSettings(enabled=True, soft_ce_weight=1.0, w1_weight=1.0, gate_weight=1.0, target_sigma=1.0,
                         target_truncate=8)
EVENT_FIELDS = {"mode", "reasons", "global_step", "epoch", "rank", "loss", "ema_loss", "learning_rate",
                "supervised_tokens", "token_acc", "max_abs_logit", "finite_loss", "finite_logits", "meta_json"}


def batch(seed: int, *, correct: bool | None = None, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels (text ids 0..99 and coord ids); ``correct`` forces every argmax right / wrong."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0.0, 1.0, (1, length, V))).float()
    labels = torch.full((1, length), -100, dtype=torch.int64)
    for j in range(1, length):
        labels[0, j] = int(rng.choice(COORD_IDS)) if j % 3 == 0 else int(rng.integers(0, 100))
    if correct is not None:
        for j in range(1, length):
            y = int(labels[0, j])
            logits[0, j - 1, y] = 50.0 if correct else -50.0
    return logits, labels


def make_runner(tmp_path: Path, **kw: Any) -> InstabilityRunner:
    base: dict[str, Any] = {"enabled": True, "min_supervised_tokens": 0}
    runner_kw = {k: kw.pop(k) for k in ("rank", "world_size", "all_reduce_max") if k in kw}
    base.update(kw)
    return InstabilityRunner(InstabilitySettings(**base), dump_dir=tmp_path / "dumps", **runner_kw)


def observe(runner: InstabilityRunner, logits: torch.Tensor, labels: torch.Tensor, *, training: bool = True,
            global_step: int = 1, meta: str | None = None) -> Any:
    result = coord_loss_sums(logits, labels, TABLE, LOSS, logit_stats=True)
    return runner.observe(result, meta, training=training, global_step=global_step, epoch=0.5, learning_rate=1e-4)


def events(tmp_path: Path, rank: int = 0) -> list[dict[str, Any]]:
    path = tmp_path / "dumps" / f"events.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------- §9.42 statistics and EMA


def test_nan_micro_step_leaves_the_ema_finite_and_writes_one_event(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, detect_loss_spike=False, detect_low_acc=False, ema_decay=0.9)
    first, labels = batch(1)
    third, _ = batch(3)
    poisoned = first.clone()
    poisoned[0, 4, 7] = math.nan
    l1 = micro_step_stats(coord_loss_sums(first, labels, TABLE, LOSS, logit_stats=True)).loss
    l3 = micro_step_stats(coord_loss_sums(third, labels, TABLE, LOSS, logit_stats=True)).loss
    observe(runner, first, labels)
    assert runner.state.ema == pytest.approx(l1)
    decision = observe(runner, poisoned, labels, global_step=2)
    assert [r.value for r in decision.reasons] == ["nonfinite_loss", "nonfinite_logits"]
    assert runner.state.ema == pytest.approx(l1)
    observe(runner, third, labels, global_step=3)
    assert runner.state.ema == pytest.approx(0.9 * l1 + 0.1 * l3)
    (event,) = events(tmp_path)
    assert set(event) == EVENT_FIELDS
    assert event["global_step"] == 2 and event["finite_loss"] is False and event["loss"] is None
    assert event["supervised_tokens"] == 11 and event["learning_rate"] == 1e-4 and event["epoch"] == 0.5


@pytest.mark.parametrize(("ema", "loss", "spike"), [(0.05, 0.5, True), (0.04, 0.25, True), (0.1, 0.5, False)])
def test_spike_examples_through_the_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ema: float, loss: float, spike: bool
) -> None:
    """§5 examples (threshold 0.2, factor 8); the EMA is updated with L before the check."""
    stats = MicroStepStats(loss=loss, supervised_tokens=100, finite_logits=True, max_abs_logit=1.0, token_acc=0.5)
    monkeypatch.setattr(runner_module, "micro_step_stats", lambda result: stats)
    runner = make_runner(tmp_path)
    runner.state = MonitorState(ema=ema)
    logits, labels = batch(0)
    decision = observe(runner, logits, labels)
    assert [r.value for r in decision.reasons] == (["loss_spike"] if spike else [])
    assert len(events(tmp_path)) == (1 if spike else 0)


def test_statistics_come_from_the_supervised_rows_only(tmp_path: Path) -> None:
    """An overflowing logit in an UNSUPERVISED row (its next label is -100) triggers nothing."""
    runner = make_runner(tmp_path, max_abs_logit=100.0, detect_loss_spike=False, detect_low_acc=False)
    logits, labels = batch(2)
    labels[0, 6] = -100
    logits[0, 5, 3] = 1e6
    assert observe(runner, logits, labels).reasons == ()
    labels[0, 6] = 5
    assert [r.value for r in observe(runner, logits, labels).reasons] == ["logit_overflow_like"]
    assert events(tmp_path)[0]["max_abs_logit"] == 1e4  # after sanitising


def test_meta_json_is_truncated_to_20000_characters(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, detect_loss_spike=False)
    logits, labels = batch(4, correct=False)
    observe(runner, logits, labels, meta="x" * 25_000)
    assert events(tmp_path)[0]["meta_json"] == "x" * 20_000
    assert events(tmp_path)[0]["reasons"] == ["zero_token_acc"]


def test_learning_rate_resolution() -> None:
    class Opt:
        def __init__(self) -> None:
            self.param_groups = [{"lr": 0.3}]

    class Sched:
        def get_last_lr(self) -> list[float]:
            return [0.2]

    assert learning_rate_of(Opt(), Sched(), 1.0) == 0.3
    assert learning_rate_of(None, Sched(), 1.0) == 0.2
    assert learning_rate_of(None, None, 1.0) == 1.0


# ----------------------------------------------------------------------------- §9.43 guard


@pytest.mark.parametrize("poison", [False, True])
def test_guard_returns_a_connected_zero_and_zero_gradients(tmp_path: Path, poison: bool) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V)
    hidden = torch.randn(1, 6, 8)
    if poison:  # non-finite logits from the parameters themselves (upstream non-finite activations are
        # out of reach of any loss: 0 * inf = nan in the chain rule)
        with torch.no_grad():
            head.weight[5, 0] = math.nan
            head.bias[7] = math.inf
    logits = head(hidden)
    labels = torch.tensor([[-100, 3, COORD_IDS[5], 4, COORD_IDS[9], 7]])
    runner = make_runner(tmp_path, max_abs_logit=1e-3, guard=GuardSettings(enabled=True))
    result = coord_loss_sums(logits, labels, TABLE, LOSS, logit_stats=True)
    decision = runner.observe(result, None, training=True, global_step=1, epoch=0.0, learning_rate=0.1)
    assert decision.guard
    loss = runner.guarded_loss(result)
    assert loss.grad_fn is not None and float(loss.detach()) == 0.0
    loss.backward()
    for p in head.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_guard_in_eval_only_with_in_eval(tmp_path: Path) -> None:
    logits, labels = batch(5)
    plain = make_runner(tmp_path, max_abs_logit=1e-3, guard=GuardSettings(enabled=True))
    assert not observe(plain, logits, labels, training=False).guard
    in_eval = make_runner(tmp_path, max_abs_logit=1e-3, guard=GuardSettings(enabled=True, in_eval=True))
    assert observe(in_eval, logits, labels, training=False).guard


# ----------------------------------------------------------------------------- §9.45 dump_samples


def test_dump_samples_writes_exactly_the_named_records_of_a_packed_row(tmp_path: Path) -> None:
    records = [{"image": f"img{k}.png", "width": 32, "height": 32, "objects": [], "k": k} for k in range(6)]
    source_a = tmp_path / "alpha.jsonl"
    source_a.write_text("".join(json.dumps(r) + "\n" for r in records))
    source_b = tmp_path / "beta.jsonl"
    source_b.write_text(json.dumps({"k": "b1"}) + "\n" + json.dumps({"k": "b2"}) + "\n")
    members = [(source_a, 2), (source_b, 2), (source_a, 5)]
    meta = json.dumps(
        [{"num_samples": 3, "total_length": 30,
          "samples": [{"dataset": p.stem, "source": str(p), "line": line, "sample_id": line - 1, "length": 10}
                      for p, line in members]}],
        sort_keys=True,
    )
    runner = make_runner(tmp_path, dump_samples=True, rank=1, detect_loss_spike=False)
    logits, labels = batch(6, correct=False)
    observe(runner, logits, labels, global_step=7, meta=meta)
    dump = json.loads((tmp_path / "dumps" / "samples_step7_train_rank1.json").read_text())
    expected = [json.loads(p.read_text().splitlines()[line - 1]) for p, line in members]
    assert [s["record"] for s in dump["samples"]] == expected
    assert [(s["source"], s["line"]) for s in dump["samples"]] == [(str(p), line) for p, line in members]
    assert dump["reasons"] == ["zero_token_acc"] and dump["mode"] == "train" and dump["rank"] == 1
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == ["events.rank1.jsonl",
                                                                      "samples_step7_train_rank1.json"]
    # a second triggered micro-batch of the same step adds its records once
    meta2 = json.dumps([{"num_samples": 2, "total_length": 20, "samples": [
        {"dataset": "alpha", "source": str(source_a), "line": 2, "sample_id": 1, "length": 10},
        {"dataset": "alpha", "source": str(source_a), "line": 1, "sample_id": 0, "length": 10}]}])
    observe(runner, logits, labels, global_step=7, meta=meta2)
    dump = json.loads((tmp_path / "dumps" / "samples_step7_train_rank1.json").read_text())
    assert [s["record"]["k"] for s in dump["samples"]] == [1, "b2", 4, 0]


def test_a_corrupt_earlier_dump_warns_once_and_is_kept_aside(tmp_path: Path) -> None:
    """A sample dump that cannot be merged into is not dropped silently: one warning per run, its bytes kept
    as ``<name>.corrupt``, and the new dump written in its place (issue 11, surviving mutant)."""
    source = tmp_path / "alpha.jsonl"
    source.write_text(json.dumps({"k": 0}) + "\n")
    meta = json.dumps([{"num_samples": 1, "total_length": 10, "samples": [
        {"dataset": "alpha", "source": str(source), "line": 1, "sample_id": 0, "length": 10}]}])
    runner = make_runner(tmp_path, dump_samples=True, detect_loss_spike=False)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    corrupt = {7: "{not json", 8: json.dumps({"reasons": "nan", "samples": [1]})}
    for step, text in corrupt.items():
        (dumps / f"samples_step{step}_train_rank0.json").write_text(text)
    logits, labels = batch(6, correct=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in corrupt:
            observe(runner, logits, labels, global_step=step, meta=meta)
    messages = [str(w.message) for w in caught if "earlier sample dump" in str(w.message)]
    assert len(messages) == 1 and "samples_step7_train_rank0.json" in messages[0], messages
    assert not runner.disabled  # the monitor keeps running
    for step, text in corrupt.items():
        assert (dumps / f"samples_step{step}_train_rank0.json.corrupt").read_text() == text
        dump = json.loads((dumps / f"samples_step{step}_train_rank0.json").read_text())
        assert [s["record"] for s in dump["samples"]] == [{"k": 0}] and dump["reasons"] == ["zero_token_acc"]


def test_unreadable_record_is_reported_in_place(tmp_path: Path) -> None:
    out = read_records([{"source": str(tmp_path / "missing.jsonl"), "line": 3}])
    assert out[0]["record"] is None and "missing.jsonl" in out[0]["error"]


# ----------------------------------------------------------------------------- early stop, failure


class Control:
    should_training_stop = False
    should_epoch_stop = False


def test_early_stop_is_requested_in_train_and_applied_once(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, early_stop=EarlyStopSettings(enabled=True), detect_loss_spike=False)
    logits, labels = batch(8, correct=False)
    assert not observe(runner, logits, labels, training=False).stop_requested
    decision = observe(runner, logits, labels)
    assert decision.stop_requested and decision.guard  # a stop forces the guard for this step
    assert runner.exchange_stop(decision.stop_requested)
    control = Control()
    assert runner.apply_stop(control) and control.should_training_stop and control.should_epoch_stop
    assert not runner.apply_stop(control)


def test_internal_failure_warns_once_and_disables_the_monitor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(result: Any) -> Any:
        raise RuntimeError("stats exploded")

    monkeypatch.setattr(runner_module, "micro_step_stats", boom)
    diagnostics = BestEffortDiagnostics()
    runner = InstabilityRunner(InstabilitySettings(enabled=True), dump_dir=tmp_path, diagnostics=diagnostics)
    logits, labels = batch(9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert observe(runner, logits, labels) is NO_DECISION
        assert observe(runner, logits, labels) is NO_DECISION
    assert len([w for w in caught if "instability_monitor" in str(w.message)]) == 1
    assert runner.disabled and diagnostics.is_disabled("instability_monitor")
    assert runner.exchange_stop(True) is False  # a disabled monitor sends 0


# ----------------------------------------------------------------------------- §9.44 cross-rank stop (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, port: int, out_dir: str, disabled_rank: int) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        calls = {"n": 0}

        def counted_max(t: torch.Tensor) -> None:
            calls["n"] += 1
            runner_module.torch_all_reduce_max(t)

        runner = InstabilityRunner(
            InstabilitySettings(enabled=True, min_supervised_tokens=0, detect_loss_spike=False,
                                early_stop=EarlyStopSettings(enabled=True)),
            dump_dir=Path(out_dir) / "dumps",
            rank=rank,
            world_size=2,
            all_reduce_max=counted_max,
        )
        if rank == disabled_rank:
            runner.state = MonitorState(disabled=True)
        control = Control()
        agreed, applied = [], []
        for step in range(5):
            # only rank 1 sees a zero-accuracy micro-batch, at micro-step 2
            logits, labels = batch(step, correct=not (rank == 1 and step == 2))
            decision = observe(runner, logits, labels, global_step=step)
            flag = runner.exchange_stop(decision.stop_requested)
            agreed.append(flag)
            applied.append(runner.apply_stop(control) if flag else False)
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"agreed": agreed, "applied": applied, "collectives": calls["n"],
                        "stop": [control.should_training_stop, control.should_epoch_stop]})
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("disabled_rank", [-1, 0])
def test_stop_requested_on_rank_one_stops_both_ranks_at_the_same_step(tmp_path: Path, disabled_rank: int) -> None:
    """Gloo, W = 2: every rank enters the MAX all-reduce at every micro-step (also a rank whose monitor is
    disabled); the stop decided on rank 1 alone is seen by both ranks at micro-step 2 and applied once."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path), disabled_rank), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        assert res["agreed"] == [False, False, True, False, False]
        assert res["applied"] == [False, False, True, False, False]
        assert res["collectives"] == 5 and res["stop"] == [True, True]
    assert events(tmp_path, 0) == [] and len(events(tmp_path, 1)) == 1
