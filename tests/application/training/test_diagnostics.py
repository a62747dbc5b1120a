"""Stage-1 diagnostics end to end: the token/type family, the coord monitors, health keys and the
instability monitor, through ``application.train.train`` on the tiny model (stage1.md §3, §5, §6.4;
tests 33, 37, 43, 45 on the real trainer). Every run takes seconds on CPU, so the file is marked slow.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from application.config import load_config
from train_runner import run_train
from domain.metrics_registry import REGISTRY, Mode, Stage1Emission, stage1_keys

pytestmark = pytest.mark.slow

BOOKKEEPING = {"global_step", "max_steps", "epoch", "time", "elapsed_s"}
LABEL = "shapesxyz"  # the dataset label (file stem) of the training file; no key may contain it
TRAIN_ONLY = {"loss", "grad_norm", "learning_rate", "epoch", "accum/grad_steps", "accum/current_grad_steps"}
EVAL_ONLY = {"runtime", "samples_per_second", "steps_per_second"}


@pytest.fixture(scope="session")
def labelled(shapes3_bbox: Path) -> Path:
    """The shapes3 records under a distinctive file stem, next to their images."""
    target = shapes3_bbox.parent / f"{LABEL}.jsonl"
    if not target.exists():
        shutil.copyfile(shapes3_bbox, target)
    return target


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines() if line.strip()]


def run(config: Path) -> tuple[Any, Path]:
    loaded = load_config(config, entry_point="train")
    outcome = run_train(loaded)
    run_config = loaded.config.run
    assert run_config is not None
    return outcome, Path(str(run_config.output_dir)) / str(run_config.name)


def objective(coord_loss: bool, **extra: Any) -> dict[str, Any]:
    return {
        "trainer_variant": "stage1",
        "coord_soft_ce_w1": {"enabled": coord_loss, "target_sigma": 2.0, "target_truncate": 16},
        **extra,
    }


def training(packed: bool, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"max_steps": 1, "eval_strategy": "steps", "eval_steps": 1, "packing": packed,
                           "eval_packing": packed}
    if packed:
        out.update(max_length=8192, packing_min_fill_ratio=0.1)
    return {**out, **extra}


@pytest.mark.parametrize("coord_loss", [True, False], ids=["coord_loss_on", "coord_loss_off"])
@pytest.mark.parametrize("types", [True, False], ids=["types_on", "types_off"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_emission_matrix_on_the_real_trainer(
    labelled: Path, make_config: Callable[..., Path], packed: bool, types: bool, coord_loss: bool
) -> None:
    """§9.33: every logged key is registered; eval keys = train keys minus train-only keys (plus the eval
    loop's own); the key set is the registry's prediction for the configuration; no key names a dataset."""
    cfg = make_config(
        labelled,
        data={"train_jsonl": str(labelled), "val_jsonl": str(labelled)},
        training=training(packed),
        objective=objective(coord_loss, token_type_metrics={"enabled": types}),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, run_dir = run(cfg)
    dropped = [str(w.message) for w in caught if "dropped" in str(w.message) or "not in the metric registry" in str(w.message)]
    assert dropped == []
    events = read_log(run_dir)
    train_events = [e for e in events if "loss" in e]
    eval_events = [e for e in events if "eval_loss" in e]
    assert len(train_events) == 1 and len(eval_events) == 1
    train_keys = set(train_events[0]) - BOOKKEEPING
    eval_keys = set(eval_events[0]) - BOOKKEEPING
    assert all(REGISTRY.is_registered(k) for k in train_keys | eval_keys)
    assert not any(LABEL in k for k in train_keys | eval_keys)
    assert {k.removeprefix("eval_") for k in eval_keys} - EVAL_ONLY - {"loss"} == train_keys - TRAIN_ONLY
    setup = Stage1Emission(coord_loss=coord_loss, token_types=types)
    assert train_keys == stage1_keys(setup, Mode.TRAIN) - {"epoch"}
    assert eval_keys == stage1_keys(setup, Mode.EVAL)
    if types:
        # the typer aligned on the real tokenizer: every type class is present
        assert {"desc_token_frac", "format_token_frac", "coord_token_frac"} <= train_keys
    if types and not coord_loss:
        assert train_events[0]["coord_diag/enabled"] == 0.0 and eval_events[0]["eval_coord_diag/enabled"] == 0.0
    if coord_loss:
        assert train_events[0]["coord_diag/enabled"] == 1.0


def test_numeric_mode_types_digits_as_coord_and_emits_no_coord_monitor(
    labelled: Path, make_config: Callable[..., Path]
) -> None:
    """§9.32 on the trainer: numeric targets align with their types (coord_token_frac from the digit
    tokens), and neither ``coord_monitor/*`` nor the coord block is emitted."""
    cfg = make_config(
        labelled,
        data={"train_jsonl": str(labelled), "val_jsonl": str(labelled), "coord_mode": "numeric"},
        training=training(False),
        objective=objective(False, token_type_metrics={"enabled": True}),
    )
    _, run_dir = run(cfg)
    train_event, eval_event = read_log(run_dir)
    setup = Stage1Emission(coord_loss=False, token_types=True, tokens_mode=False)
    assert set(train_event) - BOOKKEEPING == stage1_keys(setup, Mode.TRAIN) - {"epoch"}
    assert set(eval_event) - BOOKKEEPING == stage1_keys(setup, Mode.EVAL)
    assert not any(k.startswith(("coord_monitor/", "coord_diag/")) for k in train_event)
    assert train_event["coord_token_frac"] > 0.0
    # numeric mode: the text class is all of T, so text accuracy equals token_acc
    assert train_event["text_token_acc"] == pytest.approx(train_event["token_acc"])


def test_a_raising_diagnostic_leaves_the_losses_and_reports_health(
    labelled: Path, make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§9.37 on the trainer: one warning, the family disappears, the health key appears in every event
    from then on (train and eval), and the per-step losses are identical to a healthy run."""
    import adapters.swift.stage1_runtime as engine_module

    def config(name: str) -> Path:
        return make_config(
            labelled,
            run={"name": name, "output_dir": str(tmp_path / name), "seed": 17},
            data={"train_jsonl": str(labelled), "val_jsonl": str(labelled)},
            training=training(False, max_steps=3, eval_steps=2, probe_largest_pack=False),
            objective=objective(True, token_type_metrics={"enabled": True}),
        )

    healthy, _ = run(config("healthy"))
    original = engine_module.token_type_metric_updates
    calls = {"n": 0}

    def fails_on_the_second_call(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("synthetic diagnostic failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "token_type_metric_updates", fails_on_the_second_call)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        broken, run_dir = run(config("broken"))
    assert calls["n"] == 2
    assert len([w for w in caught if "synthetic diagnostic failure" in str(w.message)]) == 1
    assert broken.step_losses == healthy.step_losses
    events = read_log(run_dir)
    first, *later = events
    assert "text_token_acc" in first and "health/diagnostic_disabled/token_type_metrics" not in first
    assert later
    for event in later:
        prefix = "eval_" if "eval_loss" in event else ""
        assert event[f"{prefix}health/diagnostic_disabled/token_type_metrics"] == 1.0
        assert f"{prefix}text_token_acc" not in event
        assert f"{prefix}coord_monitor/flip_text_to_coord" in event  # other diagnostics keep running
    assert any("eval_loss" in e for e in later)


def test_monitor_guard_early_stop_and_sample_dump(
    labelled: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A reason on every micro-step (max_abs_logit tiny): the guard zeroes the step's loss and gradient,
    early stop ends training after the first step, the event names the step, and the dump holds the
    raw record of the micro-batch's sample."""
    cfg = make_config(
        labelled,
        data={"train_jsonl": str(labelled)},
        training={"max_steps": 4, "packing": False, "per_device_train_batch_size": 1},
        objective=objective(True, instability_monitor={
            "enabled": True, "max_abs_logit": 1.0e-3, "dump_samples": True,
            "guard": {"enabled": True}, "early_stop": {"enabled": True, "on_reasons": ["logit_overflow_like"]},
        }),
    )
    outcome, run_dir = run(cfg)
    assert outcome.global_step == 1
    (event,) = read_log(run_dir)
    assert event["loss"] == 0.0 and event["grad_norm"] == 0.0
    dumps = run_dir / "instability_dumps"
    (line,) = (dumps / "events.rank0.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["mode"] == "train" and record["global_step"] == 1 and "logit_overflow_like" in record["reasons"]
    meta = json.loads(record["meta_json"])
    named = [(s["source"], s["line"]) for row in meta for s in row["samples"]]
    dump = json.loads((dumps / "samples_step1_train_rank0.json").read_text())
    assert [(s["source"], s["line"]) for s in dump["samples"]] == named
    lines = labelled.read_text().splitlines()
    assert [s["record"] for s in dump["samples"]] == [json.loads(lines[n - 1]) for _, n in named]


def test_guard_replaces_a_non_finite_loss_instead_of_stopping(
    labelled: Path, make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """§6.3: a non-finite λ raises unless the monitor's guard replaced it; here the guard does, the event
    says why, and the step adds zero gradient."""
    from adapters.torch import coord_loss

    original = coord_loss.CoordLossKernel.__call__
    calls = {"n": 0}

    def poisoned(self: Any, logits: torch.Tensor, labels: torch.Tensor, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            logits = torch.where(torch.ones_like(logits, dtype=torch.bool), torch.tensor(float("nan")), logits)
        return original(self, logits, labels, **kw)

    monkeypatch.setattr(coord_loss.CoordLossKernel, "__call__", poisoned)
    cfg = make_config(
        labelled,
        data={"train_jsonl": str(labelled)},
        training={"max_steps": 3, "loss_from_hidden": False, "probe_largest_pack": False},  # poisons logits call 2
        objective=objective(True, instability_monitor={"enabled": True, "guard": {"enabled": True},
                                                       "detect_loss_spike": False, "detect_low_acc": False}),
    )
    outcome, run_dir = run(cfg)
    assert outcome.global_step == 3
    assert outcome.step_losses[1] == 0.0 and outcome.step_losses[0] > 0.0 and outcome.step_losses[2] > 0.0
    (line,) = (run_dir / "instability_dumps" / "events.rank0.jsonl").read_text().splitlines()
    event = json.loads(line)
    assert event["global_step"] == 2 and event["reasons"] == ["nonfinite_loss", "nonfinite_logits"]
    assert read_log(run_dir)[1]["grad_norm"] == 0.0


_RANK_SCRIPT = r'''
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
sys.path.insert(0, str(Path(sys.argv[3]).parents[1] / "support"))
from conftest import write_config
import adapters.torch.instability as runner_module
from application.config import load_config
from train_runner import run_train
from domain.instability import MicroStepStats

rank = int(os.environ["RANK"])
calls = {"n": 0}
measured = runner_module.micro_step_stats


def stats_with_a_fault_on_rank_one(result):
    calls["n"] += 1
    s = measured(result)
    if rank == 1 and calls["n"] == 2:  # rank 1 alone sees non-finite logits, at its second micro-step
        return MicroStepStats(loss=s.loss, supervised_tokens=s.supervised_tokens, finite_logits=False,
                              max_abs_logit=s.max_abs_logit, token_acc=s.token_acc)
    return s


runner_module.micro_step_stats = stats_with_a_fault_on_rank_one
work = Path(sys.argv[1]) / f"r{rank}"  # each rank its own config file; one shared run directory
work.mkdir(parents=True, exist_ok=True)
cfg = write_config(
    work, Path(sys.argv[2]),
    run={"name": "run", "output_dir": str(Path(sys.argv[1]) / "out"), "seed": 17},
    training={"max_steps": 4, "packing": False, "per_device_train_batch_size": 1},
    objective={"trainer_variant": "stage1",
               "coord_soft_ce_w1": {"enabled": True, "target_sigma": 2.0, "target_truncate": 16},
               "instability_monitor": {"enabled": True, "detect_loss_spike": False, "detect_low_acc": False,
                                       "early_stop": {"enabled": True, "on_reasons": ["nonfinite_logits"]}}},
)
outcome = run_train(load_config(cfg, entry_point="train"))
(work / "outcome.json").write_text(json.dumps({"global_step": outcome.global_step,
                                               "losses": list(outcome.step_losses)}))
'''


def test_stop_on_one_rank_stops_both_ranks_at_the_same_step(labelled: Path, tmp_path: Path) -> None:
    """§9.44 on the real trainer: torchrun, gloo, W = 2 on CPU (about 20 s). Only rank 1 requests the stop
    (at optimizer step 2); both ranks end at global_step 2; only rank 1 writes an event."""
    import os
    import subprocess
    import sys

    script = tmp_path / "rank_main.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HF": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path / "runs"), str(labelled), str(Path(__file__).resolve().parent)],
        env=env, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcomes = [json.loads((tmp_path / "runs" / f"r{r}" / "outcome.json").read_text()) for r in (0, 1)]
    assert [o["global_step"] for o in outcomes] == [2, 2]
    assert outcomes[0]["losses"] == outcomes[1]["losses"]  # logged loss: mean over ranks (R4)
    run_dir = tmp_path / "runs" / "out" / "run"
    assert [e["global_step"] for e in read_log(run_dir)] == [1, 2]  # rank 0 is the one writer
    dumps = run_dir / "instability_dumps"
    assert sorted(p.name for p in dumps.iterdir()) == ["events.rank1.jsonl"]
    (line,) = (dumps / "events.rank1.jsonl").read_text().splitlines()
    event = json.loads(line)
    assert event["rank"] == 1 and event["global_step"] == 2 and event["reasons"] == ["nonfinite_logits"]
