"""The largest-pack-first probe (issue 14 item 4; docs/training.md "Largest-pack-first probe").

Unit tests (no model): which unit is the longest, the error text, and the generic ``probe_step`` on a toy
module (RNG, gradients and modes restored; an over-budget peak and an out-of-memory become a located
``SetupError``). Slow tests (the embedded tiny Qwen3-VL through the real engine): an over-budget probe stops
the run before step 1 naming the longest pack's samples; the probe off trains as today; on vs off give the
same ``logging.jsonl`` and bit-identical checkpoint tensors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch

from adapters.swift.probe import PROBE_FILENAME, stage1_suggestions
from adapters.torch.memory_probe import (
    GIB,
    CpuRssMeter,
    ProbeUnit,
    adam_state_bytes,
    longest_unit,
    probe_failure_message,
    probe_step,
)
from domain.errors import SetupError, StepError

IDS = [f"/data/train.jsonl:{k}" for k in range(1, 8)]


# -------------------------------------------------------------------------------------------------
# Unit: selection and error text


def test_longest_pack_is_the_pack_with_the_most_tokens() -> None:
    lengths = [10, 50, 30, 40, 20, 5, 45]
    units = [(0, 4), (1, 5), (2, 3), (6,)]  # totals 30, 55, 70, 45
    unit = longest_unit(units, lengths, IDS)
    assert unit.kind == "pack" and unit.unit_index == 2
    assert unit.indices == (2, 3) and unit.tokens == 70
    assert unit.sample_ids == ("/data/train.jsonl:3", "/data/train.jsonl:4")


def test_longest_pack_ties_go_to_the_first_pack() -> None:
    unit = longest_unit([(0,), (1,), (2,)], [7, 9, 9], IDS[:3])
    assert unit.unit_index == 1 and unit.sample_ids == ("/data/train.jsonl:2",)


def test_unpacked_batch_one_is_the_longest_sample() -> None:
    unit = longest_unit(None, [10, 50, 30, 55, 20], IDS[:5], batch_size=1)
    assert unit.kind == "batch" and unit.unit_index is None
    assert unit.indices == (3,) and unit.tokens == 55 and unit.sample_ids == ("/data/train.jsonl:4",)


def test_unpacked_batch_is_the_longest_samples_padded_to_the_longest() -> None:
    unit = longest_unit(None, [10, 50, 30, 55, 50], IDS[:5], batch_size=3)
    assert unit.indices == (3, 1, 4)  # longest first, equal lengths in record order
    assert unit.tokens == 3 * 55
    # a batch larger than the split takes every sample
    assert longest_unit(None, [4, 6], IDS[:2], batch_size=8).indices == (1, 0)


def test_an_empty_plan_is_a_setup_error() -> None:
    with pytest.raises(SetupError, match="pack plan is empty"):
        longest_unit([], [1], IDS[:1])
    with pytest.raises(SetupError, match="no samples"):
        longest_unit(None, [], [])


def test_failure_message_names_samples_tokens_peak_budget_and_suggestions() -> None:
    unit = ProbeUnit("pack", (2, 3), ("a.jsonl:3", "a.jsonl:4"), 7000, 5)
    text = probe_failure_message(
        unit, peak_bytes=3 * GIB, extra_bytes=GIB, budget_bytes=2 * GIB,
        suggestions=["lower training.max_length (now 8192)", "training.loss_from_hidden: true"],
    )
    assert "longest pack of the plan does not fit (pack 5)" in text
    assert "7000 tokens in 2 samples: a.jsonl:3, a.jsonl:4" in text
    assert "peak 4.00 GiB incl. 1.00 GiB optimizer state > budget 2.00 GiB" in text
    assert "try: lower training.max_length (now 8192); training.loss_from_hidden: true" in text
    oom = probe_failure_message(unit, peak_bytes=None, budget_bytes=2 * GIB, cause="OutOfMemoryError: boom")
    assert "out of memory during its forward + backward (OutOfMemoryError: boom)" in oom and "a.jsonl:4" in oom


def _settings(**changes: Any) -> Any:
    from ports.training import CoordOffsetSettings, LoraSettings, TrainerSettings

    base: dict[str, Any] = {
        "max_steps": 2, "num_train_epochs": 1.0, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
        "gradient_accumulation_steps": None, "effective_batch_size": None, "learning_rate": 1e-3, "vit_lr": None,
        "aligner_lr": None, "weight_decay": 0.0, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0,
        "gradient_checkpointing": False, "freeze_vit": True, "freeze_aligner": False, "freeze_llm": False, "max_length": 8192,
        "packing": True, "eval_packing": False, "dataloader_drop_last": False, "dataloader_num_workers": 0, "logging_steps": 1,
        "eval_strategy": "no", "eval_steps": None, "save_strategy": "no", "save_steps": 1, "save_total_limit": None,
        "save_only_model": False, "metric_for_best_model": None, "greater_is_better": None, "report_to": (), "deepspeed": None,
        "loss_from_hidden": None, "probe_largest_pack": True, "probe_memory_limit_gb": None,
        "lora": LoraSettings(False, False, 8, 16, 0.05, ("all-linear",), ()),
        "coord_offset": CoordOffsetSettings(False, False, None, None, 0.0, None),
    }
    base.update(changes)
    return TrainerSettings(**base)


def test_stage1_suggestions_follow_the_configuration() -> None:
    unit = ProbeUnit("pack", (0,), ("a:1",), 10, 0)
    packed = stage1_suggestions(_settings(), unit)
    assert packed[0] == "lower training.max_length (now 8192; it bounds every sample and every pack)"
    assert any(s.startswith("training.packing: false") for s in packed)
    assert any(s.startswith("training.loss_from_hidden: true") for s in packed)
    assert any(s == "training.gradient_checkpointing: true" for s in packed)
    padded = stage1_suggestions(
        _settings(packing=False, per_device_train_batch_size=4, loss_from_hidden=True, gradient_checkpointing=True),
        unit,
    )
    assert any("per_device_train_batch_size (now 4)" in s for s in padded)
    assert not any("loss_from_hidden" in s or "gradient_checkpointing" in s or "packing: false" in s for s in padded)


def test_adam_state_counts_two_buffers_per_trainable_parameter_without_state() -> None:
    a, b = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.zeros(100), requires_grad=False)
    groups: list[dict[str, Any]] = [{"params": [a, frozen]}, {"params": [b], "amsgrad": True}]
    opt = torch.optim.AdamW(groups)
    assert adam_state_bytes(opt) == 2 * 10 * 4 + 3 * 3 * 8
    assert adam_state_bytes(None) == 0


def test_cpu_meter_reports_peak_minus_baseline() -> None:
    readings: Iterator[int] = iter([1000, 5000, 3000] + [2000] * 10_000)
    meter = CpuRssMeter(limit_bytes=4096, interval_s=0.0005, read_rss=lambda: next(readings))
    assert meter.budget_bytes() == 4096
    meter.start()
    while True:  # wait until the sampler thread saw the spike
        if meter._peak >= 5000:
            break
    assert meter.stop() == 4000 and meter.stop() == 4000  # idempotent


# -------------------------------------------------------------------------------------------------
# Unit: the generic probe on a toy module


@attrs.define
class FakeMeter:
    """Reports ``peak`` against ``budget``; counts its starts."""

    peak: int
    budget: int
    description: str = "fake"
    starts: int = 0

    def budget_bytes(self) -> int:
        return self.budget

    def start(self) -> None:
        self.starts += 1

    def stop(self) -> int:
        return self.peak


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.drop(self.lin(x)))
        return out


def _toy_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    random.random()
    np.random.rand()
    out: torch.Tensor = model(inputs["x"]).sum()
    return out


UNIT = ProbeUnit("pack", (1, 4), ("t.jsonl:2", "t.jsonl:5"), 12, 3)


def _rng_draws() -> tuple[torch.Tensor, float, float]:
    return torch.rand(3), float(np.random.rand()), random.random()


def _input() -> torch.Tensor:
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(1))  # not from the global RNG


def _assert_same_draws(got: tuple[torch.Tensor, float, float], expected: tuple[torch.Tensor, float, float]) -> None:
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def test_probe_step_restores_rng_gradients_and_modes() -> None:
    _seed()
    model = Toy()
    model.eval()
    model.drop.train()  # a mixed state must come back as it was
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    _seed()
    expected = _rng_draws()
    _seed()
    report = probe_step(model, {"x": _input()}, _toy_loss,
                        unit=UNIT, meter=FakeMeter(peak=GIB, budget=2 * GIB), extra_bytes=GIB // 2)
    _assert_same_draws(_rng_draws(), expected)
    assert torch.equal(model.lin.weight.grad, torch.ones_like(model.lin.weight))
    assert model.lin.bias.grad is None and model.head.weight.grad is None
    assert [m.training for m in model.modules()] == [False, False, True, False]
    assert report.line().startswith("probe: longest pack 12 tokens (2 samples): peak 1.50 GiB "
                                     "(incl. 0.50 GiB optimizer state) of 2.00 GiB budget, ")
    assert re.search(r"budget, \d+\.\d\d s forward\+backward \[fake\]$", report.line())


def test_probe_step_over_budget_is_a_located_setup_error_and_still_restores() -> None:
    model = Toy()
    _seed()
    expected = _rng_draws()
    _seed()
    meter = FakeMeter(peak=3 * GIB, budget=2 * GIB)
    with pytest.raises(SetupError) as caught:
        probe_step(model, {"x": _input()}, _toy_loss, unit=UNIT, meter=meter, suggestions=["lower training.max_length"])
    text = str(caught.value)
    assert "t.jsonl:2, t.jsonl:5" in text and "12 tokens" in text
    assert "peak 3.00 GiB > budget 2.00 GiB" in text and "try: lower training.max_length" in text
    assert meter.starts == 1
    _assert_same_draws(_rng_draws(), expected)
    assert all(p.grad is None for p in model.parameters()) and model.training


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 9 bytes"),
        MemoryError(),
    ],
)
def test_out_of_memory_during_the_probe_is_the_same_located_error(error: BaseException) -> None:
    model = Toy()

    def loss(m: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        m(inputs["x"])
        raise error

    with pytest.raises(SetupError, match=r"(?s)t\.jsonl:2, t\.jsonl:5.*out of memory during its forward") as caught:
        probe_step(model, {"x": torch.randn(2, 4)}, loss, unit=UNIT, meter=FakeMeter(peak=0, budget=GIB))
    assert caught.value.__cause__ is error


def test_an_out_of_memory_wrapped_by_the_loss_is_recognised_other_errors_propagate() -> None:
    model = Toy()

    def wrapped(m: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as exc:
            raise StepError(f"Stage-1 loss failed at global_step=0: {exc}") from exc

    with pytest.raises(SetupError, match="out of memory"):
        probe_step(model, {"x": torch.randn(1, 4)}, wrapped, unit=UNIT, meter=FakeMeter(peak=0, budget=GIB))

    def broken(m: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        raise StepError("non-finite loss")

    with pytest.raises(StepError, match="non-finite loss") as caught:
        probe_step(model, {"x": torch.randn(1, 4)}, broken, unit=UNIT, meter=FakeMeter(peak=0, budget=GIB))
    assert any("largest-pack probe" in note and "t.jsonl:5" in note for note in caught.value.__notes__)


# -------------------------------------------------------------------------------------------------
# Slow: the tiny model through the real engine


def _records_with_a_long_one(source: Path, target: Path) -> Path:
    """shapes3's three records plus, on line 3, record 2 with its objects four times (the longest sample)."""
    lines = [json.loads(ln) for ln in source.read_text().splitlines() if ln.strip()]
    big = json.loads(json.dumps(lines[1]))
    objects = [dict(o, ann_id=100 + 3 * k + j) for k in range(4) for j, o in enumerate(lines[1]["objects"])]
    big["objects"] = sorted(objects, key=lambda o: (o["bbox_2d"][1], o["bbox_2d"][0]))
    rows = [lines[0], lines[1], big, lines[2], lines[0]]
    target.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return target


@pytest.fixture(scope="session")
def five_records(shapes3_bbox: Path) -> Path:
    return _records_with_a_long_one(shapes3_bbox, shapes3_bbox.parent / "five_long.jsonl")


@attrs.define
class JobSpy:
    """Delegates to the real engine and keeps the job (to read its plan)."""

    engine: Any
    jobs: list[Any] = attrs.field(factory=list)

    def run(self, job: Any, sink: Any) -> Any:
        self.jobs.append(job)
        return self.engine.run(job, sink)


def _train(config: Path, engine: Any) -> Any:
    from train_runner import run_train

    from application.config import load_config

    return run_train(load_config(config, entry_point="train"), engine)


def _logged(run_dir: Path) -> list[dict[str, Any]]:
    log = run_dir / "logging.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


@pytest.mark.slow
def test_over_budget_probe_stops_before_step_one_naming_the_longest_pack(
    five_records: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    from adapters.swift.stage1 import SwiftStage1Engine

    meter = FakeMeter(peak=40 * GIB, budget=24 * GIB)
    spy = JobSpy(SwiftStage1Engine(probe_meter=lambda device, limit: meter))
    # lengths ~589, 588, 828 (line 3), 588, 589: at 1500 tokens line 3 shares a pack with one ~589 sample
    cfg = make_config(five_records, training={"max_steps": 2, "packing": True, "max_length": 1500,
                                              "save_strategy": "steps", "save_steps": 1})
    with pytest.raises(SetupError) as caught:
        _train(cfg, spy)
    plan = spy.jobs[0].train.plan
    totals = {tuple(u): sum(plan.lengths[i] for i in u) for u in plan.units}
    longest = max(totals, key=lambda u: totals[u])
    assert 2 in longest and len(longest) > 1 and sorted(totals.values())[-2] < totals[longest]
    text = str(caught.value)
    ids = ", ".join(f"{five_records}:{i + 1}" for i in longest)
    assert f"{totals[longest]} tokens in {len(longest)} samples: {ids}" in text
    assert re.search(r"peak 40\.\d\d GiB incl\. \d+\.\d\d GiB optimizer state > budget 24\.00 GiB", text), text
    assert "training.max_length (now 1500" in text and "training.loss_from_hidden: true" in text
    assert meter.starts == 1
    run_dir = tmp_path / "out" / "t"
    assert not list(run_dir.glob("checkpoint-*"))
    assert not any("loss" in e for e in _logged(run_dir))
    assert not (run_dir / PROBE_FILENAME).exists()


def _compare_runs() -> Any:
    path = Path(__file__).resolve().parents[3] / "scripts" / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("compare_runs", module)
    spec.loader.exec_module(module)
    return module


SEED = 18


@pytest.fixture(scope="module")
def probe_on_and_off(five_records: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same short LoRA run (its dropout draws from the global RNG) with the probe on and off.

    Seed 18 orders the three packs [1, 2, 0]: the longest (pack 0) is trained by neither step, so a probe
    whose metrics leaked into the step-1 buffers would change step 1's logged metrics."""
    from conftest import write_config

    from adapters.swift.stage1 import SwiftStage1Engine

    runs: dict[str, Any] = {}
    for name, on in (("on", True), ("off", False)):
        directory = tmp_path_factory.mktemp(f"probe_{name}")
        cfg = write_config(
            directory, five_records, run={"seed": SEED},
            training={"max_steps": 2, "packing": True, "max_length": 1500, "save_strategy": "steps",
                      "save_steps": 2, "probe_largest_pack": on, "lora": {"enabled": True}},
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            outcome = _train(cfg, SwiftStage1Engine())
        print(out.getvalue())
        printed = [ln for ln in out.getvalue().splitlines() if ln.startswith("probe:")]
        runs[name] = {"outcome": outcome, "run_dir": directory / "out" / "t", "printed": printed}
    return runs


@pytest.mark.slow
def test_probe_off_trains_as_today(probe_on_and_off: dict[str, Any]) -> None:
    off = probe_on_and_off["off"]
    assert off["outcome"].global_step == 2 and len(off["outcome"].step_losses) == 2
    assert [e["global_step"] for e in _logged(off["run_dir"]) if "loss" in e] == [1, 2]
    assert (off["run_dir"] / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert off["printed"] == [] and not (off["run_dir"] / PROBE_FILENAME).exists()


@pytest.mark.slow
def test_probe_on_changes_nothing_in_losses_or_weights(probe_on_and_off: dict[str, Any]) -> None:
    on, off = probe_on_and_off["on"], probe_on_and_off["off"]
    assert len(on["printed"]) == 1
    assert re.fullmatch(
        r"probe: longest pack \d+ tokens \(2 samples\): peak \d+\.\d\d GiB \(incl\. \d+\.\d\d GiB optimizer state\) "
        r"of \d+\.\d\d GiB budget, \d+\.\d\d s forward\+backward \[CPU RSS increase, approximate\]",
        on["printed"][0],
    ), on["printed"][0]
    report = json.loads((on["run_dir"] / PROBE_FILENAME).read_text())
    assert report["fits"] is True and report["kind"] == "pack" and len(report["samples"]) == 2
    from adapters.torch.stage1_data import EpochIndexBatchSampler

    order = [b[0] for b in EpochIndexBatchSampler(3, batch_size=1, drop_last=False, seed=SEED, rank=0, world_size=1)]
    assert report["unit_index"] not in order[:2]  # the probe's pack is not one the two steps train
    assert list(on["outcome"].step_losses) == list(off["outcome"].step_losses)
    assert _compare_runs().compare(on["run_dir"], off["run_dir"]) == []
    tensors = _compare_runs().checkpoint_tensors(on["run_dir"] / "checkpoint-2")
    assert tensors  # the comparison covered the adapter's tensors
