"""Stage-1 training end to end on the embedded tiny Qwen3-VL and real shapes3 images (issue: Stage-1 training).

These run the real ms-swift trainer on CPU; each run takes seconds, so the file is marked slow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from adapters.swift.stage1 import SwiftStage1Engine
from application.config import load_config
from train_runner import run_train
from domain.errors import ConfigError, StepError
from domain.metrics_registry import REGISTRY


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines() if line.strip()]

pytestmark = pytest.mark.slow

BOOKKEEPING = {"global_step", "max_steps", "epoch", "time", "elapsed_s"}


class GradientSpy(TrainerCallback):  # type: ignore[misc]
    """Copies every trainable parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


def _run(config: Path, engine: SwiftStage1Engine | None = None) -> Any:
    return run_train(load_config(config, entry_point="train"), engine)


def test_smoke_run_writes_artifacts_and_registered_keys_only(
    shapes3_bbox: Path, make_config: Callable[..., Path]
) -> None:
    cfg = make_config(shapes3_bbox, training={"max_steps": 3, "save_strategy": "steps", "save_steps": 3,
                                              "report_to": ["tensorboard"]})
    outcome = _run(cfg)
    run_dir = Path(load_config(cfg).config.run.output_dir) / "t"
    assert outcome.global_step == 3 and len(outcome.step_losses) == 3
    for name in ("resolved_config.json", "run_metadata.json", "metric_registry.json", "logging.jsonl"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["kind"] == "train" and meta["finished_at"] is not None
    assert meta["argv"] == ["--config", str(cfg)]
    events = read_log(run_dir)
    assert [e["global_step"] for e in events] == [1, 2, 3]
    for event in events:
        unknown = [k for k in event if k not in BOOKKEEPING and not REGISTRY.is_registered(k)]
        assert unknown == [], unknown
        assert "coord_diag/loss" in event and "base_ce/loss" in event and "token_acc" in event
    ckpt = run_dir / "checkpoint-3"
    marker = json.loads((ckpt / "checkpoint_complete.json").read_text())
    assert marker["global_step"] == 3
    names = {f["name"] for f in marker["files"]}
    assert {"model.safetensors", "coord_tokens.json", "resolved_config.json", "tokenizer.json"} <= names
    coord = json.loads((ckpt / "coord_tokens.json").read_text())
    assert len({v for k, v in coord.items() if k != "<|coord_*|>"}) == 1000
    assert list((run_dir / "runs").rglob("events.out.tfevents.*"))  # transformers' TensorBoardCallback


def test_logged_step_loss_is_the_sum_of_what_reached_backward(
    four_records: Path, make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """R3/R4 (stage1.md §9.22 spy): with G = 2 each micro-batch sends λ to backward unscaled, and the logged
    ``loss`` of the step is their sum."""
    from accelerate import Accelerator

    seen: list[float] = []
    original = Accelerator.backward

    def spy(self: Any, loss: torch.Tensor, **kwargs: Any) -> Any:
        seen.append(float(loss.detach()))
        return original(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", spy)
    cfg = make_config(four_records, training={"max_steps": 2, "packing": False, "per_device_train_batch_size": 1,
                                              "gradient_accumulation_steps": 2})
    outcome = _run(cfg)
    assert len(seen) == 4
    assert list(outcome.step_losses) == pytest.approx([seen[0] + seen[1], seen[2] + seen[3]], rel=1e-6)


def test_rerun_into_an_existing_run_dir_without_resume_is_refused(
    shapes3_bbox: Path, make_config: Callable[..., Path]
) -> None:
    cfg = make_config(shapes3_bbox, training={"max_steps": 1})
    _run(cfg)
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        _run(cfg)


def test_resume_from_a_middle_checkpoint_reproduces_the_per_step_losses(
    four_records: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Four samples per epoch, checkpoint at step 3 (mid-epoch): run 6 vs run to 4, then resume from 3 to 6.

    The resumed run must replay the data position and RNG exactly, and logging.jsonl must drop the stale
    step-4 line of the interrupted run before appending (infer-eval-config.md §7.2)."""
    full = make_config(four_records, run={"name": "full", "output_dir": str(tmp_path / "a")},
                       training={"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "packing": False})
    reference = _run(full).step_losses
    assert len(reference) == 6

    half = make_config(four_records, run={"name": "half", "output_dir": str(tmp_path / "b")},
                       training={"max_steps": 4, "save_strategy": "steps", "save_steps": 3, "packing": False})
    first = _run(half).step_losses
    run_dir = tmp_path / "b" / "half"
    assert [e["global_step"] for e in read_log(run_dir)] == [1, 2, 3, 4]
    resumed_cfg = make_config(
        four_records, run={"name": "half", "output_dir": str(tmp_path / "b")},
        training={"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "packing": False,
                  "resume_from_checkpoint": str(run_dir / "checkpoint-3")},
    )
    second = _run(resumed_cfg).step_losses
    assert len(first) == 4 and len(second) == 3
    assert list(first[:3]) + list(second) == pytest.approx(list(reference), abs=1e-6)
    events = read_log(run_dir)
    assert [e["global_step"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in events] == pytest.approx(list(reference), abs=1e-6)


def test_non_finite_loss_stops_with_step_and_sample_ids(
    shapes3_bbox: Path, make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.torch import coord_loss

    original = coord_loss.CoordLossKernel.__call__
    calls = {"n": 0}

    def poisoned(self: Any, logits: torch.Tensor, labels: torch.Tensor, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            logits = logits * float("nan")
        result = original(self, logits, labels, **kw)
        if calls["n"] == 2:
            object.__setattr__(result, "sum_ce", result.sum_ce * float("nan"))
        return result

    monkeypatch.setattr(coord_loss.CoordLossKernel, "__call__", poisoned)
    # the logits path's kernel is poisoned; the probe would take kernel call 1
    cfg = make_config(shapes3_bbox, training={"max_steps": 3, "loss_from_hidden": False, "probe_largest_pack": False})
    with pytest.raises(StepError) as info:
        _run(cfg)
    message = str(info.value)
    assert "global_step=2" in message
    assert "train.jsonl:" in message  # the sample ids of the window (source:line)


def _grads_for(
    four: Path, make_config: Callable[..., Path], tmp: Path, name: str, training: dict[str, Any]
) -> dict[str, torch.Tensor]:
    spy = GradientSpy()
    cfg = make_config(
        four, run={"name": name, "output_dir": str(tmp / name)},
        training={"max_steps": 1, "max_grad_norm": 1.0e9, **training},
    )
    outcome = _run(cfg, SwiftStage1Engine(callbacks=[spy]))
    assert outcome.global_step == 1 and len(spy.grads) == 1
    return spy.grads[0] | {"__loss__": torch.tensor(outcome.step_losses[0], dtype=torch.float64)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert float(a["__loss__"]) == pytest.approx(float(b["__loss__"]), rel=1e-5)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_accumulation_splits_give_the_same_step_loss_and_gradients(
    four_records: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """stage1.md §9.14: (per-device 4, G 1), (2, 2), (1, 4) over the same 4 samples (padded)."""
    common = {"packing": False}
    g1 = _grads_for(four_records, make_config, tmp_path, "b4g1", {**common, "per_device_train_batch_size": 4,
                                                                 "gradient_accumulation_steps": 1})
    g2 = _grads_for(four_records, make_config, tmp_path, "b2g2", {**common, "per_device_train_batch_size": 2,
                                                                 "gradient_accumulation_steps": 2})
    g4 = _grads_for(four_records, make_config, tmp_path, "b1g4", {**common, "per_device_train_batch_size": 1,
                                                                 "gradient_accumulation_steps": 4})
    _assert_same(g1, g2)
    _assert_same(g1, g4)


def test_packed_and_padded_give_the_same_step_loss_and_gradients(
    four_records: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """stage1.md §9.15: the same 4 samples padded (B = 4) and packed (one row)."""
    padded = _grads_for(four_records, make_config, tmp_path, "padded",
                        {"packing": False, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1})
    packed = _grads_for(four_records, make_config, tmp_path, "packed",
                        {"packing": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                         "max_length": 8192, "packing_min_fill_ratio": 0.1})
    _assert_same(padded, packed)


def test_full_fine_tune_keeps_the_frozen_vision_tower_bit_identical(
    shapes3_bbox: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """``training.freeze_vit`` / ``freeze_aligner`` (defaults): the vision tower is bit-identical after training
    while the language model's head moves at the coord rows. (Coord-only training is
    ``test_coord_offsets_alone_move_only_the_coord_rows``.)"""
    from safetensors.torch import load_file

    from application import wiring

    cfg = make_config(shapes3_bbox, training={"max_steps": 2, "save_strategy": "steps", "save_steps": 2},
                      objective={"trainer_variant": "stage1",
                                 "coord_soft_ce_w1": {"enabled": True, "soft_ce_weight": 1.0, "w1_weight": 1.0,
                                                      "gate_weight": 1.0, "target_truncate": 16}})
    loaded = load_config(cfg, entry_point="train")
    base_dir = wiring.resolve_model_checkpoint(loaded.config.model)
    before = load_file(str(base_dir / "model.safetensors"))
    run_train(loaded)
    after = load_file(str(Path(loaded.config.run.output_dir) / "t" / "checkpoint-2" / "model.safetensors"))
    visual = [k for k in before if ".visual." in f".{k}"]
    assert visual, "expected vision-tower weights in the checkpoint"
    for key in visual:
        assert torch.equal(before[key], after[key]), key
    head_key = next(k for k in before if k.endswith("lm_head.weight"))
    from adapters.hf.checkpoint import load_processor
    from adapters.hf.tokenizer import HFTokenizer

    ids = list(HFTokenizer(load_processor(base_dir).tokenizer).coord_ids.ids)
    delta = (after[head_key] - before[head_key]).abs().sum(dim=1)
    assert float(delta[ids].sum()) > 0.0


def test_lora_run_saves_an_adapter_and_leaves_base_weights_frozen(
    shapes3_bbox: Path, make_config: Callable[..., Path]
) -> None:
    cfg = make_config(shapes3_bbox, training={"max_steps": 2, "save_strategy": "steps", "save_steps": 2,
                                              "lora": {"enabled": True, "rank": 4, "alpha": 8}})
    outcome = _run(cfg)
    assert outcome.global_step == 2
    ckpt = Path(load_config(cfg).config.run.output_dir) / "t" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert (ckpt / "checkpoint_complete.json").is_file()


def test_random_ordering_reaches_the_dataset_with_the_epoch(
    shapes3_bbox: Path, make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.md §2.5 / test 22: over 2 epochs the trainer's indices carry the epoch, so objects are reshuffled."""
    from adapters.torch import stage1_data as stage1

    seen: list[int] = []
    targets: dict[int, str] = {}
    original = stage1.Stage1Dataset.__getitem__

    def spy(self: Any, index: int) -> Any:
        seen.append(int(index))
        item = original(self, index)
        targets[int(index)] = str(item.sample.input_ids.tolist())
        return item

    monkeypatch.setattr(stage1.Stage1Dataset, "__getitem__", spy)
    cfg = make_config(shapes3_bbox, data={"train_jsonl": str(shapes3_bbox), "ordering": "random"},
                      training={"max_steps": 6, "packing": False, "probe_largest_pack": False})
    _run(cfg)
    assert sorted(i for i in seen if i < 3) == [0, 1, 2] and sorted(i for i in seen if i >= 3) == [3, 4, 5]
    assert any(targets[i] != targets[i + 3] for i in range(3))  # the same record, another epoch, another order


def test_non_finite_gradient_norm_stops_before_the_optimizer_step(
    shapes3_bbox: Path, make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator

    class StepCounter(TrainerCallback):  # type: ignore[misc]
        steps = 0

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            StepCounter.steps += 1

    original = Accelerator.backward
    calls = {"n": 0}

    def poisoning_backward(self: Any, loss: torch.Tensor, **kwargs: Any) -> Any:
        out = original(self, loss, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            param = next(p for p in self._models[0].parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(Accelerator, "backward", poisoning_backward)
    cfg = make_config(shapes3_bbox, training={"max_steps": 3})
    with pytest.raises(StepError, match=r"non-finite gradient norm at global_step=2 .*train.jsonl:"):
        _run(cfg, SwiftStage1Engine(callbacks=[StepCounter()]))
    assert StepCounter.steps == 1  # step 1 applied, step 2 refused before the optimizer touched the weights
