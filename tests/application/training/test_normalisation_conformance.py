"""Stage-1 normalisation conformance on the real engine (stage1.md §1.4 R1-R7; §9 tests 14, 16, 17, 18, 20).

Every test trains the embedded tiny Qwen3-VL in fp32 on CPU through ``application.train.train`` and the
ms-swift trainer (``adapters.swift.stage1``): the window pre-pass in ``get_batch_samples``, ``compute_loss``
and the ``evaluate`` override are the code under test. The W = 2 test launches torchrun (gloo). Marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_stage1_train import _grads_for, _run, read_log

import adapters.swift.stage1_trainer as trainer_module
from adapters.torch import coord_loss
from domain.losses import micro_batch_reference
from domain.normalisation import MicroBatchSums, eval_objective

pytestmark = pytest.mark.slow

# fp32 forward/backward over a differently split batch sums the same terms in another order; gradient
# entries near zero then differ in the last bits. The absolute floor (1e-7) is ~1e-7 of the gradient norm
# (~5 on these runs), so it forgives rounding only, never a scaling error (the /G mistake is off by 3-4x).
RTOL = 1e-5
ATOL = 1e-7


def _max_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |a - b|, the smallest rtol with which ``assert_close(atol=ATOL)`` passes) over every tensor."""
    worst_abs = needed_rtol = 0.0
    for key, value in a.items():
        d = (value.double() - b[key].double()).abs()
        worst_abs = max(worst_abs, float(d.max()))
        needed_rtol = max(needed_rtol, float(((d - ATOL).clamp_min(0.0) / b[key].double().abs()).nan_to_num().max()))
    return worst_abs, needed_rtol


def _assert_equal_steps(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], label: str) -> None:
    assert a.keys() == b.keys(), label
    assert float(a["__loss__"]) == pytest.approx(float(b["__loss__"]), rel=RTOL), label
    worst_abs, needed_rtol = _max_differences({k: v for k, v in a.items() if k != "__loss__"}, b)
    print(f"{label}: loss {float(a['__loss__']):.8f} vs {float(b['__loss__']):.8f}; "
          f"max |dg| {worst_abs:.3e}, rtol needed at atol {ATOL:g}: {needed_rtol:.3e}")
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{label} {k}: {m}")


def _coord_pairs_in(jsonl: Path) -> int:
    """|C| of a bbox JSONL from the records themselves: four coord targets per object."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    return sum(4 * len(r["objects"]) for r in records)


class WindowSpy:
    """Records every window the engine's pre-pass sees: rows per micro-batch and the counts it returns."""

    def __init__(self) -> None:
        self.windows: list[list[int]] = []
        self.counts: list[list[int]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = trainer_module.window_counts

        def spy(batches: Sequence[Any], coord_mask: torch.Tensor) -> torch.Tensor:
            counts = original(batches, coord_mask)
            self.windows.append([int(b["labels"].shape[0]) for b in batches])
            self.counts.append([int(v) for v in counts.tolist()])
            return counts

        monkeypatch.setattr(trainer_module, "window_counts", spy)


# -------------------------------------------------------------------------------------------------
# §9.14: the same 8 samples, the last micro-batch (and the last window) short


def test_short_last_micro_batch_and_short_window_give_the_same_step(
    eight_records: Path, make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(per-device 8, G 1) vs (3, G 3: micro-batches 3, 3, 2) vs (3, G 4: a window of 3 micro-batches where 4
    were configured, the short last window of the epoch) vs (2, G 4): equal L_step and gradients (R2).

    The spy checks that each run's single window really holds all eight samples in the expected split and
    that the pre-pass counts equal those of the one-batch window; |C| is also counted from the JSONL."""
    spy = WindowSpy()
    spy.install(monkeypatch)
    padded = {"packing": False}
    runs = {
        "b8g1": ({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}, [8]),
        "b3g3": ({"per_device_train_batch_size": 3, "gradient_accumulation_steps": 3}, [3, 3, 2]),
        "b3g4": ({"per_device_train_batch_size": 3, "gradient_accumulation_steps": 4}, [3, 3, 2]),
        "b2g4": ({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}, [2, 2, 2, 2]),
    }
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, (training, split) in runs.items():
        before = len(spy.windows)
        grads[name] = _grads_for(eight_records, make_config, tmp_path, name, {**padded, **training})
        assert spy.windows[before:] == [split], (name, spy.windows[before:])
        events = read_log(tmp_path / name / name)
        assert events[0]["accum/current_grad_steps"] == float(len(split)), name
    n_step, c_step, t_step = spy.counts[0]
    assert all(c == spy.counts[0] for c in spy.counts), spy.counts
    assert c_step == _coord_pairs_in(eight_records) and n_step > 0 and t_step == n_step + c_step
    for name in ("b3g3", "b3g4", "b2g4"):
        _assert_equal_steps(grads[name], grads["b8g1"], f"{name} vs b8g1")


# -------------------------------------------------------------------------------------------------
# §9.17 / §9.18: eval_loss (R5)


class EvalLogitsSpy:
    """Every kernel call made without autograd (the eval loop) with its supervised rows kept in float64.

    Only the rows that predict a supervised label are stored ([n, V] plus their n targets): the reference
    needs nothing else, and the full logits of a padded batch are mostly prompt and padding."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray, int]] = []  # rows, targets, batch rows
        self.kernel: Any = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = coord_loss.CoordLossKernel.__call__

        def spy(kernel: Any, logits: torch.Tensor, labels: torch.Tensor, **kw: Any) -> Any:
            if not torch.is_grad_enabled():
                self.kernel = kernel
                targets = labels[:, 1:]
                keep = targets != -100
                rows = logits[:, :-1][keep.to(logits.device)].detach().double().cpu().numpy()
                self.calls.append((rows, targets[keep].cpu().numpy(), int(labels.shape[0])))
            return original(kernel, logits, labels, **kw)

        monkeypatch.setattr(coord_loss.CoordLossKernel, "__call__", spy)

    def reference_sums(self) -> list[MicroBatchSums]:
        """``micro_batch_reference`` (numpy, float64, pair by pair) on each captured eval micro-batch.

        The rows are laid out as one sequence whose pair i predicts target i (a leading ignored label)."""
        out = []
        for rows, targets, _ in self.calls:
            logits = np.concatenate([rows, np.zeros((1, rows.shape[1]))])[None]
            labels = np.concatenate([[-100], targets])[None]
            sums, _, _ = micro_batch_reference(logits, labels, self.kernel.table, self.kernel.settings)
            out.append(sums)
        return out


@pytest.fixture(scope="module")
def uneven_records(shapes3_bbox: Path) -> Path:
    """Four shapes3 records with 3, 1, 0 and 3 objects: per-sample counts differ, so a mean of per-batch
    objectives would not equal R5 (one record has no coord pair at all)."""
    records = [json.loads(line) for line in shapes3_bbox.read_text().splitlines() if line.strip()]
    assert len(records) == 3 and all(len(r["objects"]) >= 2 for r in records)
    cut = [records[0], {**records[1], "objects": records[1]["objects"][:1]}, {**records[2], "objects": []}, records[0]]
    target = shapes3_bbox.parent / "uneven.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in cut))
    return target


def _eval_run(
    make_config: Callable[..., Path], tmp_path: Path, name: str, train_jsonl: Path, val_jsonl: Path,
    training: dict[str, Any], **sections: dict[str, Any],
) -> tuple[Any, list[dict[str, Any]]]:
    cfg = make_config(
        train_jsonl,
        **sections,
        run={"name": name, "output_dir": str(tmp_path / name)},
        data={"train_jsonl": str(train_jsonl), "val_jsonl": str(val_jsonl)},
        training={"max_steps": 1, "packing": False, "per_device_train_batch_size": 3,
                  "gradient_accumulation_steps": 1, "max_grad_norm": 1.0e9, "eval_strategy": "steps",
                  "eval_steps": 1, "loss_from_hidden": False, **training},  # the eval spy reads logits
    )
    outcome = _run(cfg)
    return outcome, read_log(tmp_path / name / name)


def _eval_losses(events: list[dict[str, Any]]) -> list[float]:
    return [e["eval_loss"] for e in events if "eval_loss" in e]


def test_eval_loss_is_independent_of_eval_batch_and_packing_and_equals_the_sums_formula(
    shapes3_bbox: Path, uneven_records: Path, make_config: Callable[..., Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§9.17 (R5): the same trained weights (one identical step on shapes3) evaluated on four samples of 3, 1, 0 and 3
    objects with eval batch 1 (4 micro-batches), eval batch 3 (3 + 1) and packed eval (fewer rows than samples) give one
    eval_loss, equal to Σ_N ce / N_eval + Σ_C ℓ / C_eval computed by the numpy reference on the eval logits."""
    losses: dict[str, float] = {}
    calls: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = {}
    reference: list[MicroBatchSums] = []
    variants = {
        "eb1": {"per_device_eval_batch_size": 1},
        "eb3": {"per_device_eval_batch_size": 3},
        "packed": {"eval_packing": True, "max_length": 8192, "packing_min_fill_ratio": 0.1},
    }
    for name, training in variants.items():
        with monkeypatch.context() as patch:
            spy = EvalLogitsSpy()
            spy.install(patch)
            outcome, events = _eval_run(make_config, tmp_path, name, shapes3_bbox, uneven_records, training)
        (losses[name],) = _eval_losses(events)
        calls[name] = spy.calls
        if name == "eb1":
            reference = spy.reference_sums()
        assert outcome.global_step == 1
    assert [c[2] for c in calls["eb1"]] == [1, 1, 1, 1]
    assert [c[2] for c in calls["eb3"]] == [3, 1]
    assert all(c[2] == 1 for c in calls["packed"]) and len(calls["packed"]) < 4, [c[2] for c in calls["packed"]]
    # every eval variant supervised the same pairs (four samples, each once)
    totals = {name: sum(len(c[1]) for c in got) for name, got in calls.items()}
    assert len(set(totals.values())) == 1, totals
    assert [mb.num_coord for mb in reference] == [12, 4, 0, 12]  # 4 per box of 3, 1, 0, 3 objects
    assert sum(mb.num_coord for mb in reference) == _coord_pairs_in(uneven_records)
    expected = eval_objective(reference)
    # the common mistake (mean of per-batch objectives) would differ from R5 on these batches
    per_batch = [eval_objective([mb]) for mb in reference]
    assert abs(sum(per_batch) / len(per_batch) - expected) > 1e-3 * expected
    print(f"eval_loss eb1 {losses['eb1']:.8f} eb3 {losses['eb3']:.8f} packed {losses['packed']:.8f} "
          f"reference {expected:.8f}; mean of batch means {sum(per_batch) / len(per_batch):.8f}")
    for name, value in losses.items():
        assert value == pytest.approx(expected, rel=RTOL), name


@pytest.mark.parametrize("coord_loss", [True, False], ids=["soft_ce", "pure_ce"])
def test_train_step_loss_equals_eval_loss_on_the_same_samples_and_weights(
    four_records: Path, make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    coord_loss: bool,
) -> None:
    """§9.18: G = 4 (per-device 1) over four samples; evaluation of the same four samples is run inside the
    trainer just before the first window is fetched (initial weights, no dropout in the tiny model). The
    logged train ``loss`` of step 1 equals that eval_loss; the evaluation after the step (moved weights)
    does not, which shows the first one really saw the pre-step weights. Pure-CE (coord loss off) divides
    the train CE by T_step, as eval divides by T_eval (the engine's ``n_step = t_step`` switch)."""
    pre_step: list[dict[str, float]] = []
    dropout: list[float] = []
    base: Any = trainer_module.CoordExpStage1Trainer

    class EvaluateBeforeFirstWindow(base):  # type: ignore[misc, valid-type]
        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
            if self.state.global_step == 0 and not pre_step:
                dropout.extend(float(m.p) for m in self.model.modules() if isinstance(m, torch.nn.Dropout))
                dropout.extend(float(getattr(c, "attention_dropout", 0.0))
                               for c in (self.model.config, getattr(self.model.config, "text_config", None))
                               if c is not None)
                pre_step.append(self.evaluate())
            return super().get_batch_samples(epoch_iterator, num_batches, device)

    monkeypatch.setattr(trainer_module, "CoordExpStage1Trainer", EvaluateBeforeFirstWindow)
    outcome, events = _eval_run(
        make_config, tmp_path, "g4", four_records, four_records,
        {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "per_device_eval_batch_size": 1},
        objective={"coord_soft_ce_w1": {"enabled": coord_loss, "target_sigma": 2.0, "target_truncate": 16}},
    )
    assert all(p == 0.0 for p in dropout), dropout
    before, after = _eval_losses(events)
    assert before == pytest.approx(pre_step[0]["eval_loss"], rel=1e-12)
    (train_loss,) = outcome.step_losses
    print(f"train loss {train_loss:.8f}; eval_loss before the step {before:.8f}, after {after:.8f}")
    assert train_loss == pytest.approx(before, rel=RTOL)
    assert abs(after - before) > 1e-3 * before


# -------------------------------------------------------------------------------------------------
# §9.16 / §9.20: W = 2 (torchrun, gloo, CPU) against W = 1 on the same global samples

_RANK_DRIVER = r'''
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, sys.argv[3])
sys.path.insert(0, str(Path(sys.argv[3]).parents[1] / "support"))
from conftest import write_config

import adapters.swift.stage1_trainer as trainer_module
from adapters.swift.stage1 import SwiftStage1Engine
from application.config import load_config
from train_runner import run_train

rank = int(os.environ["RANK"])
work = Path(sys.argv[1]) / f"r{rank}"  # each rank its own config file; one shared run directory
work.mkdir(parents=True, exist_ok=True)
windows = []  # per get_batch_samples call: micro-batches, local counts, reduced counts, all_reduce calls
inside = {"on": False, "all_reduce": 0}
real_all_reduce = dist.all_reduce


def counting_all_reduce(*args, **kwargs):
    if inside["on"]:
        inside["all_reduce"] += 1
    return real_all_reduce(*args, **kwargs)


dist.all_reduce = counting_all_reduce
local_counts = []
real_window_counts = trainer_module.window_counts


def spy_window_counts(batches, coord_mask):
    counts = real_window_counts(batches, coord_mask)
    local_counts.append([int(v) for v in counts.tolist()])
    return counts


trainer_module.window_counts = spy_window_counts
base = trainer_module.CoordExpStage1Trainer


class CountingTrainer(base):
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        inside["on"], inside["all_reduce"] = True, 0
        try:
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        finally:
            inside["on"] = False
        windows.append({"world_size": dist.get_world_size(),
                        "micro_batches": [int(b["labels"].shape[0]) for b in batches],
                        "local": local_counts[-1], "reduced": [int(v) for v in self._window.tolist()],
                        "all_reduce_calls": inside["all_reduce"]})
        return batches, num_items


trainer_module.CoordExpStage1Trainer = CountingTrainer


class FirstStepGradients(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # DDP has all-reduced (averaged) the gradients by now
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save(grads, work / "grads_step1.pt")


cfg = write_config(
    work, Path(sys.argv[2]),
    run={"name": "run", "output_dir": str(Path(sys.argv[1]) / "out"), "seed": 17},
    training={"max_steps": 2, "packing": False, "per_device_train_batch_size": 1,
              "gradient_accumulation_steps": 2, "max_grad_norm": 1.0e9},
)
outcome = run_train(load_config(cfg, entry_point="train"), SwiftStage1Engine(callbacks=[FirstStepGradients()]))
(work / "outcome.json").write_text(json.dumps({"global_step": outcome.global_step, "losses": list(outcome.step_losses),
                                               "group_released": not dist.is_initialized(), "windows": windows}))
'''


def test_two_ranks_reduce_to_the_single_rank_gradients_and_loss(
    four_records: Path, make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§9.16 (R2, R3, R4): W = 2 with (per-device 1, G 2) against W = 1 with (per-device 4, G 1) on the same
    four samples: the DDP-reduced gradients before the first optimizer step and the logged ``loss`` are
    equal. §9.20 / R6: on every rank, every optimizer step's window issues exactly one count all-reduce,
    and the reduced counts are the global ones (those of the W = 1 window)."""
    spy = WindowSpy()
    spy.install(monkeypatch)
    single = _grads_for(four_records, make_config, tmp_path, "w1",
                        {"packing": False, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1})
    (global_counts,) = spy.counts

    script = tmp_path / "rank_driver.py"
    script.write_text(_RANK_DRIVER)
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HF": "1",
           "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path / "w2"), str(four_records), str(Path(__file__).resolve().parent)],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcomes = [json.loads((tmp_path / "w2" / f"r{r}" / "outcome.json").read_text()) for r in (0, 1)]
    # the engine destroys the process group it created once the run finished (no SIGABRT at exit)
    assert [o["group_released"] for o in outcomes] == [True, True]
    assert [o["global_step"] for o in outcomes] == [2, 2]
    for o in outcomes:
        assert [w["world_size"] for w in o["windows"]] == [2, 2]
        assert [w["micro_batches"] for w in o["windows"]] == [[1, 1], [1, 1]]
        assert [w["all_reduce_calls"] for w in o["windows"]] == [1, 1]  # once per optimizer step
    first = [o["windows"][0] for o in outcomes]
    assert first[0]["reduced"] == first[1]["reduced"] == global_counts
    assert [a + b for a, b in zip(first[0]["local"], first[1]["local"])] == global_counts
    assert all(w["local"][1] < global_counts[1] for w in first)  # each rank holds part of the samples

    # R4: the logged loss is the mean over ranks of Σ_m λ(m, r) = L_step (both ranks log the same value)
    assert outcomes[0]["losses"] == outcomes[1]["losses"]
    assert outcomes[0]["losses"][0] == pytest.approx(float(single["__loss__"]), rel=RTOL)
    logged = read_log(tmp_path / "w2" / "out" / "run")
    assert [e["global_step"] for e in logged] == [1, 2] and logged[0]["loss"] == outcomes[0]["losses"][0]
    for r in (0, 1):
        reduced = torch.load(tmp_path / "w2" / f"r{r}" / "grads_step1.pt")
        _assert_equal_steps(reduced | {"__loss__": torch.tensor(outcomes[r]["losses"][0], dtype=torch.float64)},
                            single, f"W=2 rank {r} vs W=1")
