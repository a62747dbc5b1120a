"""``training.loss_from_hidden`` (issue 14): the trainer's loss from the final hidden states and the output head,
never building ``[B, L, V]`` logits, gives the run the logits path gives (losses within 1e-5, weights close), on
the tiny model with packing, accumulation, evaluation and every diagnostic on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from train_runner import run_train

from application.config import load_config

pytestmark = pytest.mark.slow

BOOKKEEPING = {"global_step", "max_steps", "epoch", "time", "elapsed_s"}


def _run(tmp_path: Path, shapes3_bbox: Path, make_config: Callable[..., Path], name: str, hidden: bool | None) -> Path:
    cfg = make_config(
        shapes3_bbox,
        run={"name": name},
        data={"val_jsonl": str(shapes3_bbox)},
        objective={"coord_soft_ce_w1": {"enabled": True, "ce_weight": 1.0, "target_sigma": 2.0, "target_truncate": 16},
                   "token_type_metrics": {"enabled": True}, "instability_monitor": {"enabled": True}},
        training={"max_steps": 4, "packing": True, "gradient_accumulation_steps": 2, "eval_strategy": "steps",
                  "eval_steps": 2, "save_strategy": "steps", "save_steps": 4, "loss_from_hidden": hidden,
                  "probe_largest_pack": False},
    )  # fmt: skip
    run_train(load_config(cfg, entry_point="train"))
    return tmp_path / "out" / name


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines() if line.strip()]


def _forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    from adapters.torch.coord_loss import CoordLossKernel

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError(f"CoordLossKernel.{name} was called: the other loss path ran")

    monkeypatch.setattr(CoordLossKernel, name, refuse)


def test_the_hidden_path_trains_the_run_the_logits_path_trains(
    tmp_path: Path, shapes3_bbox: Path, make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    with monkeypatch.context() as patch:
        _forbid(patch, "from_hidden")  # false: the logits path only
        logits_run = _run(tmp_path, shapes3_bbox, make_config, "logits", False)
    with monkeypatch.context() as patch:
        _forbid(patch, "__call__")  # true: no full-length logits reach the kernel, in training and in evaluation
        hidden_run = _run(tmp_path, shapes3_bbox, make_config, "hidden", True)
    a, b = _events(logits_run), _events(hidden_run)
    assert [e["global_step"] for e in a] == [e["global_step"] for e in b] and len(a) >= 6
    compared = 0
    for ea, eb in zip(a, b):
        assert set(ea) == set(eb)  # the same metric keys, diagnostics included
        for key, value in ea.items():
            if key in BOOKKEEPING or key.endswith(("_runtime", "_per_second")) or key == "grad_norm":
                continue
            assert eb[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (ea["global_step"], key)
            compared += 1
    assert compared > 50
    wa = load_file(str(logits_run / "checkpoint-4" / "model.safetensors"))
    wb = load_file(str(hidden_run / "checkpoint-4" / "model.safetensors"))
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_takes_the_hidden_path_on_qwen3_vl_and_true_refuses_a_model_without_one(
    tmp_path: Path, shapes3_bbox: Path, make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from adapters.hf import hidden_capture
    from domain.errors import SetupError

    with monkeypatch.context() as patch:
        _forbid(patch, "__call__")
        cfg = make_config(shapes3_bbox, run={"name": "auto"}, training={"max_steps": 1})
        run_train(load_config(cfg, entry_point="train"))
    assert "loss: from the final hidden states" in capsys.readouterr().out
    monkeypatch.setattr(hidden_capture.FinalHiddenStates, "find", classmethod(lambda cls, model: None))
    cfg = make_config(shapes3_bbox, run={"name": "required"}, training={"max_steps": 1, "loss_from_hidden": True})
    with pytest.raises(SetupError, match="loss_from_hidden: true"):
        run_train(load_config(cfg, entry_point="train"))
    cfg = make_config(shapes3_bbox, run={"name": "fallback"}, training={"max_steps": 1})
    run_train(load_config(cfg, entry_point="train"))
    assert "loss: from logits (the model exposes no final hidden states" in capsys.readouterr().out


@pytest.mark.parametrize("tie_head", [True, False])
def test_coord_offsets_reach_the_hidden_path(
    tmp_path: Path, shapes3_bbox: Path, make_config: Callable[..., Path], tie_head: bool
) -> None:
    """With ``training.coord_offset`` (offsets trained from step 1 on) both paths log the same losses: the
    head's coord-row offsets enter the hidden path's logits and receive its gradient."""
    runs = {}
    for hidden in (False, True):
        name = f"offsets_{hidden}_{tie_head}"
        cfg = make_config(shapes3_bbox, run={"name": name}, training={
            "max_steps": 3, "loss_from_hidden": hidden, "probe_largest_pack": False, "learning_rate": 5e-2,
            "freeze_llm": True, "coord_offset": {"enabled": True, "tie_head": tie_head}})  # fmt: skip
        runs[hidden] = run_train(load_config(cfg, entry_point="train")).step_losses
    assert len(runs[True]) == 3 and runs[True][2] != runs[True][0]  # the offsets moved the loss
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
