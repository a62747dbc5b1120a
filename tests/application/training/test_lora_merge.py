"""LoRA / DoRA checkpoints end to end on the tiny Qwen3-VL (issue 11, findings 12 and 13).

Train a few LoRA steps -> ``application.merge_adapter`` -> the merged checkpoint:
- reproduces the adapter model's logits (base + peft adapter + coord offsets, loaded with peft) to 1e-5 on a
  real shapes3 image with coord tokens in the input;
- changes exactly the parts the freeze settings leave trainable (finding 13): with the defaults
  (``freeze_vit`` / ``freeze_aligner`` true) no vision or aligner weight changes, with both false they do;
- runs through ``application.infer``; the adapter checkpoint itself is refused there with a pointer to
  ``application.merge_adapter``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import write_config
from safetensors.torch import load_file

from adapters.hf.model_parts import model_part
from application.config import load_config
from application.merge_adapter import default_dependencies, merge_adapter
from train_runner import run_train

pytestmark = pytest.mark.slow

FROZEN_DEFAULTS = "frozen"  # freeze_vit / freeze_aligner at their defaults (true), DoRA + coord offsets
UNFROZEN = "unfrozen"  # freeze_vit / freeze_aligner false, plain LoRA


def _train_and_merge(root: Path, train_jsonl: Path, name: str, training: dict[str, Any]) -> dict[str, Path]:
    directory = root / name
    directory.mkdir()
    settings = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2, "learning_rate": 2.0e-2, **training}
    loaded = load_config(write_config(directory, train_jsonl, training=settings), entry_point="train")
    outcome = run_train(loaded)
    assert outcome.last_checkpoint is not None
    merge_config = directory / "merge.yaml"
    merge_config.write_text(yaml.safe_dump({
        "run": {"name": "merged", "output_dir": str(directory / "merged_out")},
        "model": {"path": str(outcome.last_checkpoint), "dtype": "float32"},
    }))  # fmt: skip
    merged = merge_adapter(load_config(merge_config, entry_point="merge_adapter"), default_dependencies())
    return {"adapter": outcome.last_checkpoint, "merged": merged.run_dir, "base": merged.report.base_dir}


@pytest.fixture(scope="module")
def runs(shapes3_bbox: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lora_runs")
    return {
        FROZEN_DEFAULTS: _train_and_merge(root, shapes3_bbox, FROZEN_DEFAULTS, {
            "lora": {"enabled": True, "use_dora": True, "rank": 4, "alpha": 8},
            "coord_offset": {"enabled": True, "tie_head": True},
        }),
        UNFROZEN: _train_and_merge(root, shapes3_bbox, UNFROZEN, {
            "freeze_vit": False, "freeze_aligner": False,
            "lora": {"enabled": True, "rank": 4, "alpha": 8},
        }),
    }  # fmt: skip


def _changed_parts(run: dict[str, Path]) -> dict[str, set[str]]:
    """Weight names of the merged checkpoint that differ from the base, grouped by model part."""
    base = load_file(str(run["base"] / "model.safetensors"))
    merged = load_file(str(run["merged"] / "model.safetensors"))
    assert set(base) == set(merged)
    parts: dict[str, set[str]] = {"vit": set(), "aligner": set(), "llm": set()}
    for name, tensor in base.items():
        if not torch.equal(tensor, merged[name]):
            parts[model_part(name)].add(name)
    return parts


def test_frozen_vision_and_aligner_stay_bit_identical_after_a_merge(runs: dict[str, dict[str, Path]]) -> None:
    adapter = json.loads((runs[FROZEN_DEFAULTS]["adapter"] / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True and adapter["exclude_modules"]
    changed = _changed_parts(runs[FROZEN_DEFAULTS])
    assert changed["vit"] == set() and changed["aligner"] == set()
    assert any(".layers." in n for n in changed["llm"])  # the LoRA-adapted language model moved
    assert any(n.endswith("embed_tokens.weight") for n in changed["llm"])  # coord offsets baked in
    assert any(n.endswith("lm_head.weight") for n in changed["llm"])


def test_unfrozen_vision_and_aligner_are_adapted(runs: dict[str, dict[str, Path]]) -> None:
    changed = _changed_parts(runs[UNFROZEN])
    assert any(".blocks." in n for n in changed["vit"])
    assert any(".visual.merger." in n for n in changed["aligner"])
    assert any(".deepstack_merger_list." in n for n in changed["aligner"])
    assert changed["llm"]


def _batch(processor: Any, shapes3_bbox: Path) -> dict[str, Any]:
    """A shapes3 image prompt followed by an answer prefix with coord tokens (embed offsets take part)."""
    from domain.prompts import build_prompt, chat_messages

    record = json.loads(shapes3_bbox.read_text().splitlines()[0])
    texts = build_prompt("default", "tokens", "sorted", "desc_first")
    messages = chat_messages(texts, str(shapes3_bbox.parent / record["images"][0]))
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt", do_resize=False)  # fmt: skip
    answer = '{"objects": [{"desc": "star", "bbox_2d": [<|coord_3|>, <|coord_517|>, <|coord_998|>'
    extra = torch.tensor([processor.tokenizer.encode(answer, add_special_tokens=False)])
    for key in ("mm_token_type_ids", "token_type_ids"):  # per-token side rows: the answer is text (0)
        if key in batch:
            batch[key] = torch.cat([batch[key], torch.zeros_like(extra)], dim=1)
    batch["input_ids"] = torch.cat([batch["input_ids"], extra], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return dict(batch)


def _adapter_logits(run: dict[str, Path], batch: dict[str, Any], *, coord_offsets: bool) -> torch.Tensor:
    """The adapter model as peft loads it: base, then the offset module, then the adapter on top."""
    from peft import PeftModel

    from adapters.hf.checkpoint import load_model_and_processor
    from adapters.hf.coord_offsets import attach_coord_offset_hooks, install_coord_offsets

    base = load_model_and_processor(run["base"], dtype="float32", attn_implementation="eager")
    if coord_offsets:
        install_coord_offsets(base.model, base.coord_ids, tie_head=True, dtype="float32")
    model = PeftModel.from_pretrained(base.model, str(run["adapter"]))
    if coord_offsets:
        attach_coord_offset_hooks(model)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", [FROZEN_DEFAULTS, UNFROZEN])
def test_merged_logits_equal_the_adapter_models(
    runs: dict[str, dict[str, Path]], shapes3_bbox: Path, name: str
) -> None:
    from adapters.hf.checkpoint import load_model_and_processor

    run = runs[name]
    merged = load_model_and_processor(run["merged"], dtype="float32", attn_implementation="eager")
    batch = _batch(merged.processor, shapes3_bbox)
    with torch.no_grad():
        merged_logits = merged.model(**batch).logits
    base = load_model_and_processor(run["base"], dtype="float32", attn_implementation="eager")
    with torch.no_grad():
        base_logits = base.model(**batch).logits
    adapter_logits = _adapter_logits(run, batch, coord_offsets=name == FROZEN_DEFAULTS)
    assert float((adapter_logits - base_logits).abs().max()) > 1e-3  # training moved the model
    assert float((merged_logits - adapter_logits).abs().max()) <= 1e-5
    resolved = json.loads((run["merged"] / "resolved_config.json").read_text())
    assert resolved["kind"] == "merge_adapter" and resolved["merge"]["probe_max_abs_diff"] <= 1e-5
    coord_tokens = json.loads((run["merged"] / "coord_tokens.json").read_text())
    assert coord_tokens == json.loads((run["adapter"] / "coord_tokens.json").read_text())


def _infer_config(folder: Path, model_path: Path, val: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": name, "output_dir": str(folder / "infer"), "seed": 17},
        "model": {"path": str(model_path), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"val_jsonl": str(val)},
        "stages": {"infer": True, "eval": False, "vis": False},
        "infer": {"device": "cpu", "generation": {"temperature": 0.0, "max_new_tokens": 6, "batch_size": 2}},
    }))  # fmt: skip
    return path


def test_infer_runs_on_the_merged_checkpoint_and_points_the_adapter_to_the_merge(
    runs: dict[str, dict[str, Path]], shapes3_bbox: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from application.infer import main as infer_main

    run = runs[FROZEN_DEFAULTS]
    assert infer_main(["--config", str(_infer_config(tmp_path, run["merged"], shapes3_bbox, "merged"))]) == 0
    rows = [json.loads(line) for line in (tmp_path / "infer" / "merged" / "gt_vs_pred.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(0 < r["num_generated_tokens"] <= 6 for r in rows)
    capsys.readouterr()

    assert infer_main(["--config", str(_infer_config(tmp_path, run["adapter"], shapes3_bbox, "adapter"))]) == 1
    err = capsys.readouterr().err
    assert "adapter checkpoint" in err and "application.merge_adapter" in err, err
