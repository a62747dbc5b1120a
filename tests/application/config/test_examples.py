"""Every file under configs/ loads and validates with its entry point; the docs list every example."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from application.config import (
    ENTRY_POINTS,
    check_local_paths,
    load_config,
    resolved_dict,
    resolved_sha256,
    structure_config,
)
from application.config.loader import SCHEMA_PATHS
from domain.errors import ConfigError

from .conftest import WriteConfig

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
ENTRY_BY_DIR = {
    "base": None,
    "stage1": "train",
    "stage2": "train",
    "infer": "infer",
    "evaluate": "evaluate",
    "visualize": "visualize",
    "prepare_data": "prepare_data",
    "expand_vocab": "expand_vocab",
    "merge_adapter": "merge_adapter",
    "validate_dataset": None,  # validate_dataset loads any config (no entry-point block requirements)
}


def entry_point_of(path: Path) -> str | None:
    if path.name == "server_launch.yaml":
        return "stage2_server_launch"
    return ENTRY_BY_DIR[path.parent.name]


def test_there_is_an_example_per_entry_point() -> None:
    covered = {entry_point_of(p) for p in CONFIGS}
    assert set(ENTRY_POINTS) <= covered


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_loads_validates_and_round_trips(path: Path) -> None:
    entry = entry_point_of(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example sets no inert key
        loaded = load_config(path, entry_point=entry)  # type: ignore[arg-type]
    assert structure_config(resolved_dict(loaded.config)) == loaded.config
    assert len(resolved_sha256(loaded)) == 64
    if entry == "stage2_server_launch":
        load_config(path, entry_point="train")


@pytest.mark.parametrize("name", ["prepare_data/shapes3.yaml", "evaluate/coco_val2014_100.yaml"])
def test_fixture_paths_resolve_from_the_repository_root(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    path = REPO / "configs" / name
    entry = entry_point_of(path)
    check_local_paths(load_config(path).config, entry)  # type: ignore[arg-type]


def test_check_local_paths_names_missing_inputs(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "stage1" / "coco80_production.yaml").config
    with pytest.raises(ConfigError) as info:
        check_local_paths(cfg, "train", root=tmp_path)
    keys = [m.split("'")[1] for m in info.value.messages]
    assert keys == ["model.path", "data.train_jsonl", "data.val_jsonl"]
    assert f"{tmp_path / 'checkpoints/Qwen3-VL-2B-Instruct-coord'} not found" in info.value.messages[0]


def test_smoke_chain_paths_agree() -> None:
    """The smoke configs hand files to each other: converter output -> training -> inference -> vis."""
    def cfg(name: str):  # type: ignore[no-untyped-def]
        return load_config(REPO / "configs" / name).config

    bbox_split = cfg("prepare_data/shapes3_bbox.yaml").data.convert
    stage1 = cfg("stage1/smoke.yaml")
    # the main job memorises the three images: train and validation are the same boxes
    assert stage1.data.train_jsonl == bbox_split.output_dir / f"{bbox_split.split}.jsonl"
    assert stage1.data.val_jsonl == stage1.data.train_jsonl
    assert cfg("stage2/ab_smoke.yaml").data.train_jsonl == bbox_split.output_dir / f"{bbox_split.split}.jsonl"
    assert bbox_split.geometry == "bbox"
    infer = cfg("infer/smoke.yaml")
    assert stage1.run is not None and stage1.training.max_steps is not None
    assert infer.model is not None and infer.model.path == stage1.run.run_dir / f"checkpoint-{stage1.training.max_steps}"
    assert infer.data.val_jsonl == stage1.data.val_jsonl
    assert infer.data.field_order == stage1.data.field_order and infer.prompt == stage1.prompt
    assert infer.run is not None
    vis = cfg("visualize/smoke.yaml")
    assert vis.infer.gt_vs_pred_jsonl == infer.run.run_dir / "gt_vs_pred.jsonl"
    assert vis.eval.output_dir == infer.run.run_dir / "eval"  # so the report is written


def test_production_settings_stage1_md() -> None:
    cfg = load_config(REPO / "configs" / "stage1" / "coco80_production.yaml").config
    coord = cfg.objective.coord_soft_ce_w1
    assert (coord.enabled, coord.ce_weight, coord.soft_ce_weight, coord.w1_weight, coord.gate_weight,
            coord.temperature, coord.target_sigma, coord.target_truncate) == (True, 0.0, 3, 1.0, 1.0, 0.9, 1.0, 8)
    t = cfg.training
    assert (t.learning_rate, t.vit_lr, t.aligner_lr, t.weight_decay) == (2e-4, 1e-4, 4e-4, 0.1)
    assert (t.lora.enabled, t.lora.use_dora, t.lora.rank, t.lora.alpha) == (True, True, 16, 32)
    assert (t.coord_offset.enabled, t.coord_offset.embed_lr, t.coord_offset.weight_decay) == (True, 1e-4, 0.0)
    base = load_config(REPO / "configs" / "base" / "stage1.yaml").config
    coord = base.objective.coord_soft_ce_w1
    assert (coord.enabled, coord.ce_weight, coord.soft_ce_weight, coord.w1_weight, coord.gate_weight,
            coord.temperature, coord.target_sigma, coord.target_truncate) == (True, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 16)
    assert (base.training.packing, base.training.eval_packing, base.training.max_length, base.training.logging_steps,
            base.training.metric_for_best_model) == (True, False, 12000, 10, "eval_token_acc")


def test_spec_minimal_infer_example_loads(write: WriteConfig) -> None:
    write("base/infer_defaults.yaml", "infer: {backend: hf}")
    path = write(
        "infer/example.yaml",
        """
        extends: ../base/infer_defaults.yaml
        run: {name: lvis_val_ckpt2000, output_dir: output/infer, seed: 17}
        model: {path: checkpoints/stage1-merged}
        data: {val_jsonl: data/lvis/val.coord.jsonl, coord_mode: tokens, field_order: desc_first}
        prompt: {variant: default}
        stages: {infer: true, eval: true, vis: false}
        infer: {backend: hf, generation: {temperature: 0.0, max_new_tokens: 2048, batch_size: 8}}
        eval: {metrics: both, semantic: {model_path: models/all-MiniLM-L6-v2}}
        """,
    )
    cfg = load_config(path, entry_point="infer").config
    assert cfg.infer.generation.batch_size == 8 and cfg.stages is not None and cfg.stages.vis is False


def test_docs_list_every_example_and_only_schema_keys() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for path in CONFIGS:
        rel = str(path.relative_to(REPO))
        stem_listed = rel in doc or rel.replace("_val.yaml", ".yaml").replace("_bbox.yaml", ".yaml") in doc
        assert stem_listed, f"{rel} is not described in docs/configuration.md"
    blocks = {"run", "model", "data", "prompt", "training", "objective", "stage2_ab", "matching", "rollout",
              "stages", "infer", "eval", "vis"}
    alternatives = "|".join(sorted(blocks))
    dotted = set(re.findall(rf"`((?:{alternatives})\.[a-z0-9_.\[\]]+)", doc))
    normalized = {re.sub(r"\[\d+\]", "[]", key).rstrip(".") for key in dotted}
    assert normalized and normalized <= set(SCHEMA_PATHS), normalized - set(SCHEMA_PATHS)
