"""Every use case runs end to end on fakes alone (issue 10: use cases receive their ports as arguments).

Each scenario below builds its ports from ``adapters.fakes`` only, runs one use case and returns what it
observed (files written through the fake store, counts, errors). The test runs the scenario in a fresh
interpreter and asserts on those facts AND on the modules that interpreter loaded: a use case that reaches
for ``application.wiring`` (or any real adapter, ms-swift, torch, Pillow) fails here even when the
adapter would have worked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.fakes.adapter_merge import FakeAdapterMerger
from adapters.fakes.generation import ScriptedGenerationBackend
from adapters.fakes.provenance import FakeProvenanceCollector
from adapters.fakes.rendering import FakeImageRenderer, FakeReportRenderer, read_fake_png
from adapters.fakes.storage import (
    FakeCheckpointStore,
    FakeImageStore,
    RecordingArtifactStore,
    RecordingRunLock,
    write_fake_image,
)
from adapters.fakes.tokenizer import FakeTokenizer
from adapters.fakes.vocabulary import FakeVocabularyExpander
from domain.checkpoints import COMPLETE_MARKER
from domain.errors import ArtifactError, ConfigError
from ports.generation import EngineRequest, GenerationEngine, GenerationRequest

REPO = Path(__file__).resolve().parents[2]
MARKER = "FACTS:"
# Loaded by none of the scenarios: the composition root, real adapters (only adapters.fakes is allowed)
# and the frameworks behind them.
FORBIDDEN_ROOTS = ("swift", "torch", "transformers", "vllm", "peft", "PIL", "matplotlib", "pycocotools",
                   "faster_coco_eval", "sentence_transformers")  # fmt: skip

Facts = dict[str, Any]


def forbidden_modules(names: list[str]) -> list[str]:
    def forbidden(name: str) -> bool:
        real_adapter = name.startswith("adapters.") and name.split(".")[1] != "fakes"
        return name == "application.wiring" or name.split(".")[0] in FORBIDDEN_ROOTS or real_adapter

    return sorted(n for n in names if forbidden(n))


# ------------------------------------------------------------------------------------------------
# Scenarios (run in a fresh interpreter by the tests below)


def _write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def _record(image: str, w: int = 64, h: int = 64, n: int = 1) -> dict[str, Any]:
    objects = [{"desc": "cat", "bbox_2d": [100 + i, 100, 500, 600]} for i in range(n)]
    return {"images": [image], "width": w, "height": h, "coord_space": "norm1000", "objects": objects}


def _write_split(folder: Path, records: list[dict[str, Any]], name: str = "val.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _answer(request: GenerationRequest) -> str:
    """The scripted model: one box per image, its x1 the record index, then the end of turn."""
    x1 = 10 + request.index
    return (f'{{"objects": [{{"desc": "cat", "bbox_2d": [<|coord_{x1}|>, <|coord_100|>, <|coord_500|>, '
            f'<|coord_600|>]}}]}}<|im_end|>')  # fmt: skip


def scenario_infer(tmp: Path) -> Facts:
    from application.config import load_config
    from application.infer import InferDependencies, VisRequest, run_pipeline
    from application.run_lock import lock_target
    from application.visualize import run_vis_stage

    for i in range(3):
        write_fake_image(tmp / "img" / f"{i}.png", 64, 64)
    val = _write_split(tmp, [_record(f"img/{i}.png") for i in range(3)])
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "config.json").write_text('{"model_type": "fake"}')
    (tmp / "ckpt" / "model.safetensors").write_bytes(b"weights")
    config = _write_yaml(tmp / "infer.yaml", {
        "run": {"name": "run", "output_dir": str(tmp / "out"), "seed": 17},
        "model": {"path": str(tmp / "ckpt"), "dtype": "float32"},
        "data": {"val_jsonl": str(val)},
        "stages": {"infer": True, "eval": False, "vis": True},
        "infer": {"generation": {"temperature": 0.0, "max_new_tokens": 64, "batch_size": 2}},
    })  # fmt: skip
    tokenizer = FakeTokenizer()
    artifacts, images = RecordingArtifactStore(), FakeImageStore()
    renderer, report_renderer = FakeImageRenderer(), FakeReportRenderer()
    backends: list[ScriptedGenerationBackend] = []
    messages: list[str] = []

    def open_engine(request: EngineRequest) -> GenerationEngine:
        backend = ScriptedGenerationBackend(_answer, tokenizer=tokenizer, describe={"device": "cpu"})
        backends.append(backend)
        return GenerationEngine(backend, tokenizer, backend.stop_ids)

    def visualize(request: VisRequest) -> Any:
        return run_vis_stage(request.artifact, request.output_dir, limit=request.limit, image_root=request.image_root,
                             eval_dir=request.eval_dir, renderer=renderer, report_renderer=report_renderer,
                             images=images, store=artifacts, warn=messages.append)  # fmt: skip

    deps = InferDependencies(
        artifacts=artifacts, images=images, provenance=FakeProvenanceCollector(),
        resolve_checkpoint=lambda model: Path(model.path), open_engine=open_engine,
        evaluate=lambda settings, artifact, out: pytest.fail("stages.eval is off"), visualize=visualize,
        progress=False, echo=messages.append,
    )  # fmt: skip
    loaded = load_config(config, entry_point="infer")
    lock = RecordingRunLock()
    with lock.hold(lock_target(loaded.config), "application.infer"):
        outcome = run_pipeline(loaded, deps)
        try:
            with lock.hold(lock_target(loaded.config), "application.visualize"):
                second_holder = "allowed"
        except ArtifactError as exc:
            second_holder = str(exc)
    run_dir = outcome.run_dir
    lines = [json.loads(line) for line in (run_dir / "gt_vs_pred.jsonl").read_text().splitlines()]
    overlay = read_fake_png((run_dir / "vis" / "vis_000001.png").read_bytes())
    return {
        "run_dir": str(run_dir),
        "written": artifacts.written_under(run_dir),
        "records": len(lines),
        "indices": [line["index"] for line in lines],
        "preds_per_record": [len(line["pred"]) for line in lines],
        "batches": backends[0].calls if backends else None,
        "engines": len(backends),
        "summary_counters": artifacts.read_json(run_dir / "summary.json").get("counters"),
        "vis_rendered": outcome.vis_summary.rendered,
        "overlay_roles": sorted(o["role"] for o in overlay["content"]["objects"]),  # type: ignore[index]
        "images_decoded": len(images.decoded),
        "lock_holds": [[str(t), e] for t, e in lock.holds],
        "second_holder": second_holder,
    }


def scenario_visualize(tmp: Path) -> Facts:
    from application.visualize import run_vis_stage

    write_fake_image(tmp / "images" / "a.png", 64, 48)
    box = {"type": "bbox_2d", "points": [4, 4, 30, 30], "desc": "cat"}
    rows = [
        {"index": i, "image": image, "width": 64, "height": 48, "coord_mode": "pixel", "gt": [box],
         "pred": [dict(box, score=0.9)] if i == 0 else [], "raw_output": "{}", "raw_ends_with_im_end": True,
         "num_generated_tokens": 3, "errors": [] if i == 0 else ["empty_pred"]}
        for i, image in enumerate(["a.png", "missing.png"])
    ]  # fmt: skip
    artifact = tmp / "run" / "gt_vs_pred.jsonl"
    artifact.parent.mkdir()
    artifact.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store, images = RecordingArtifactStore(), FakeImageStore()
    renderer, report_renderer = FakeImageRenderer(), FakeReportRenderer()
    warnings: list[str] = []
    summary = run_vis_stage(artifact, tmp / "run" / "vis", limit=None, image_root=tmp / "images", eval_dir=None,
                            renderer=renderer, report_renderer=report_renderer, images=images, store=store,
                            warn=warnings.append)  # fmt: skip
    overlay = read_fake_png((tmp / "run" / "vis" / "vis_000000.png").read_bytes())
    return {
        "written": store.written_under(tmp / "run" / "vis"),
        "rendered": summary.rendered,
        "skipped": summary.skipped_missing_image,
        "overlay": overlay["content"],
        "renderer_calls": renderer.calls,
        "warnings": warnings,
        "vis_summary": store.read_json(tmp / "run" / "vis" / "vis_summary.json"),
    }


def scenario_prepare_data(tmp: Path) -> Facts:
    from application.prepare_data import ConvertSettings, convert_dataset
    from domain.conversion import SourceFormat

    write_fake_image(tmp / "src" / "a.jpg", 640, 480, image_format="JPEG")
    write_fake_image(tmp / "src" / "b.png", 32, 32)
    document = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 20, 100, 50], "iscrowd": 0},
                        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [200, 100, 50, 80], "iscrowd": 0},
                        {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }  # fmt: skip
    annotations = tmp / "instances_train.json"
    annotations.write_text(json.dumps(document))
    settings = ConvertSettings(source=SourceFormat.COCO, annotations=annotations, image_root=tmp / "src",
                               output_dir=tmp / "out", split="train")  # fmt: skip
    artifacts, images = RecordingArtifactStore(), FakeImageStore()
    result = convert_dataset(settings, artifacts=artifacts, images=images, progress=False, echo=None)
    lines = [json.loads(line) for line in result.jsonl_path.read_text().splitlines()]
    return {
        "written": artifacts.written_under(tmp / "out"),
        "records": len(result.records),
        "objects_per_record": [len(line["objects"]) for line in lines],
        "sizes": [[line["width"], line["height"]] for line in lines],
        "converted": len(images.converted) + len(images.copied),
        "image_files": sorted(str(c[1].relative_to(tmp / "out")) for c in [*images.converted, *images.copied]),
        "report": dict(result.report),
    }


def scenario_validate_dataset(tmp: Path) -> Facts:
    from application.config import load_config
    from application.validate_dataset import report_text, validate_dataset

    write_fake_image(tmp / "a.png", 64, 32)
    write_fake_image(tmp / "b.png", 64, 64)
    (tmp / "broken.png").write_bytes(b"\x89PNG not an image")
    records = [_record("a.png", 64, 32), _record("a.png", 64, 32, n=3), _record("b.png", 64, 32),
               _record("broken.png", 64, 32), {"images": ["a.png"], "width": 427}]  # fmt: skip
    train = _write_split(tmp, records, "train.jsonl")
    config = _write_yaml(tmp / "cfg.yaml", {"data": {"train_jsonl": str(train)}, "training": {"max_length": 100}})

    def sample_lengths(record_set: Any, image_paths: Any) -> list[int]:
        return [40 * (1 + len(r.objects)) for r in record_set]  # 80, 160, 80, 80

    artifacts = RecordingArtifactStore()
    result = validate_dataset(load_config(config).config, artifacts=artifacts, images=FakeImageStore(),
                              sample_lengths=sample_lengths)  # fmt: skip
    (split,) = result.splits
    return {
        "ok": result.ok,
        "records": split.records,
        "bbox_objects": split.bbox_objects,
        "problem_lines": sorted({p.line for p in split.problems if not isinstance(p, str)}),
        "report": report_text(result),
        "cache_written": [p.parent.name for p in artifacts.written],
    }


def scenario_expand_vocab(tmp: Path) -> Facts:
    from application.config import load_config
    from application.expand_vocab import ExpandVocabDependencies, expand_vocab

    (tmp / "src").mkdir()
    config = _write_yaml(tmp / "expand.yaml", {"run": {"name": "expanded", "output_dir": str(tmp / "out")},
                                               "model": {"path": str(tmp / "src"), "dtype": "float32"}})  # fmt: skip
    expander, store = FakeVocabularyExpander(), RecordingArtifactStore()
    loaded = load_config(config, entry_point="expand_vocab")
    outcome = expand_vocab(loaded, ExpandVocabDependencies(expander=expander, store=store))
    try:
        expand_vocab(loaded, ExpandVocabDependencies(expander=expander, store=store))
        again = "no error"
    except ConfigError as exc:
        again = str(exc)
    resolved = json.loads((outcome.run_dir / "resolved_config.json").read_text())
    return {
        "run_dir": str(outcome.run_dir),
        "entries": sorted(p.name for p in outcome.run_dir.iterdir()),
        "out_entries": sorted(p.name for p in (tmp / "out").iterdir()),
        "expander_calls": [[str(s), d] for s, _, d in expander.calls],
        "staged_into": [p.parent.name for p in store.written],
        "staging_dirs": len(store.staging),
        "resolved_kind": resolved["kind"],
        "resolved_expansion": resolved["expansion"],
        "again": again,
        "tokens_after": outcome.summary.tokens_after,
    }


def scenario_merge_adapter(tmp: Path) -> Facts:
    from application.config import load_config
    from application.merge_adapter import MergeDependencies, merge_adapter

    base = tmp / "tiny-cache" / "qwen3vl-tiny-abc123"
    adapter = tmp / "train" / "checkpoint-4"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(tmp / "elsewhere" / base.name),
        "target_modules": ["q_proj", "k_proj", "v_proj"], "use_dora": False, "modules_to_save": None,
    }))  # fmt: skip
    (adapter / COMPLETE_MARKER).write_text("{}")  # its content is the (real) checkpoint store's business
    (adapter / "resolved_config.json").write_text(json.dumps({
        "kind": "train", "config_path": "train.yaml", "resolved_config_sha256": "ab" * 32,
        "resolved": {"model": {"tiny": {}, "path": None}},
    }))  # fmt: skip
    config = _write_yaml(tmp / "merge.yaml", {"run": {"name": "merged", "output_dir": str(tmp / "out")},
                                              "model": {"path": str(adapter), "dtype": "float32"}})  # fmt: skip
    resolved_models: list[Any] = []

    def resolve_checkpoint(model: Any) -> Path:
        resolved_models.append(model)
        return base

    merger, store = FakeAdapterMerger(), RecordingArtifactStore()
    deps = MergeDependencies(merger=merger, store=store, checkpoints=FakeCheckpointStore(),
                             resolve_checkpoint=resolve_checkpoint)  # fmt: skip
    outcome = merge_adapter(load_config(config, entry_point="merge_adapter"), deps)
    resolved = json.loads((outcome.run_dir / "resolved_config.json").read_text())

    # A checkpoint the store reports damaged is refused before the merger runs.
    damaged = FakeCheckpointStore(damaged={adapter: ["adapter_model.safetensors: missing"]})
    other = _write_yaml(tmp / "other.yaml", {"run": {"name": "other", "output_dir": str(tmp / "out")},
                                             "model": {"path": str(adapter)}})  # fmt: skip
    try:
        merge_adapter(load_config(other, entry_point="merge_adapter"),
                      MergeDependencies(merger=merger, store=store, checkpoints=damaged,
                                        resolve_checkpoint=resolve_checkpoint))  # fmt: skip
        refused = "no error"
    except ConfigError as exc:
        refused = str(exc)
    return {
        "entries": sorted(p.name for p in outcome.run_dir.iterdir()),
        "out_entries": sorted(p.name for p in (tmp / "out").iterdir()),
        "merges": len(merger.requests),
        "base_dir": str(merger.requests[0].base_dir),
        "tiny_resolved": [m.tiny is not None for m in resolved_models],
        "resolved_kind": resolved["kind"],
        "merged_modules": resolved["merge"]["merged_modules"],
        "training_sha": resolved["training"]["resolved_config_sha256"],
        "refused": refused,
    }


def scenario_train(tmp: Path) -> Facts:
    from adapters.fakes.training import FakeSampleEncoder, RecordingMetricSink, RecordingTrainingEngine
    from application.config import load_config
    from application.train import TrainDependencies, train
    from domain.errors import DataContractError

    for name in ("a.png", "b.png", "c.png"):
        write_fake_image(tmp / name, 64, 64)
    records = [_record("a.png", n=1), _record("b.png", n=3), _record("c.png", n=2)]
    jsonl = _write_split(tmp, records, "train.jsonl")
    model_dir = tmp / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")

    def config(name: str, **training: Any) -> Any:
        document = {
            "run": {"name": name, "output_dir": str(tmp / "out"), "seed": 5},
            "model": {"tiny": {"seed": 0}},
            "data": {"train_jsonl": str(jsonl), "ordering": "random"},
            "objective": {"coord_soft_ce_w1": {"enabled": True, "target_sigma": 1.5}},
            "training": {"packing": True, "max_length": 100, "packing_min_fill_ratio": 0.1, **training},
        }
        return load_config(_write_yaml(tmp / f"{name}.yaml", document), entry_point="train")

    encoder = FakeSampleEncoder(base_length=20, chars_per_token=8)
    sinks: list[RecordingMetricSink] = []

    def deps(engine: RecordingTrainingEngine, store: RecordingArtifactStore) -> TrainDependencies:
        def sink(path: Path, step: int) -> RecordingMetricSink:
            sinks.append(RecordingMetricSink(path, step))
            return sinks[-1]

        return TrainDependencies(
            artifacts=store, images=FakeImageStore(), checkpoints=FakeCheckpointStore(),
            provenance=FakeProvenanceCollector(), resolve_checkpoint=lambda model: model_dir,
            open_encoder=lambda path: encoder, engine=engine, metric_sink=sink, null_sink=RecordingMetricSink,
        )  # fmt: skip

    engine, store = RecordingTrainingEngine(losses=(3.0, 2.0, 1.0)), RecordingArtifactStore()
    outcome = train(config("run"), deps(engine, store))
    (job,) = engine.jobs
    plan = job.train.plan
    # An over-long sample fails before anything is written or run.
    short_engine, short_store = RecordingTrainingEngine(), RecordingArtifactStore()
    try:
        train(config("short", max_length=30), deps(short_engine, short_store))
        refused = "no error"
    except DataContractError as exc:
        refused = str(exc)
    return {
        "global_step": outcome.global_step,
        "engine_calls": engine.calls,
        "written": sorted(p.name for p in store.written),
        "measured_targets": [s.target for s in encoder.measured[:3]],
        "lengths": list(plan.lengths),
        "packs": [list(u) for u in plan.units or ()],
        "fingerprinted": plan.fingerprint is not None,
        "records": [r.line for r in job.train.records],
        "images": [p.name for p in job.train.images],
        "sigma": job.objective.coord_loss.target_sigma,
        "seed": [job.seed, job.samples.seed],
        "ordering": job.samples.ordering.value,
        "max_length": job.trainer.max_length,
        "sink": [sinks[0].resume_step, sinks[0].closed, [e["loss"] for e in sinks[0].events]],
        "refused": refused,
        "short_calls": short_engine.calls,
        "short_written": [p.name for p in short_store.written],
    }


SCENARIOS: dict[str, Callable[[Path], Facts]] = {
    "train": scenario_train,
    "infer": scenario_infer,
    "visualize": scenario_visualize,
    "prepare_data": scenario_prepare_data,
    "validate_dataset": scenario_validate_dataset,
    "expand_vocab": scenario_expand_vocab,
    "merge_adapter": scenario_merge_adapter,
}

_CHILD = """
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("use_cases_on_fakes", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["use_cases_on_fakes"] = module
spec.loader.exec_module(module)
facts = module.SCENARIOS[sys.argv[2]](Path(sys.argv[3]))
print(module.MARKER + json.dumps({"facts": facts, "loaded": module.forbidden_modules(list(sys.modules))}))
"""


def run_isolated(name: str, tmp_path: Path) -> Facts:
    """Run scenario ``name`` in a fresh interpreter; fail on an error or on a forbidden module it loaded."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "COORDEXP_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _CHILD, __file__, name, str(work)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, f"scenario {name} failed:\n{done.stdout}\n{done.stderr}"
    (line,) = [x for x in done.stdout.splitlines() if x.startswith(MARKER)]
    result = json.loads(line[len(MARKER):])
    assert result["loaded"] == [], f"{name} loaded modules a use case on fakes must not: {result['loaded']}"
    facts: Facts = result["facts"]
    facts["tmp"] = str(work)
    return facts


# ------------------------------------------------------------------------------------------------
# Tests


def test_infer_runs_on_fakes_alone(tmp_path: Path) -> None:
    facts = run_isolated("infer", tmp_path)
    run_dir = Path(facts["tmp"]) / "out" / "run"
    assert facts["run_dir"] == str(run_dir)
    assert facts["records"] == 3 and facts["engines"] == 1
    assert facts["batches"] == [[0, 1], [2]]  # infer.generation.batch_size = 2
    assert facts["indices"] == [0, 1, 2] and facts["preds_per_record"] == [1, 1, 1]
    for name in ("gt_vs_pred.jsonl", "summary.json", "resolved_config.json", "run_metadata.json",
                 "vis/vis_000000.png", "vis/vis_000002.png", "vis/vis_summary.json"):  # fmt: skip
        assert name in facts["written"], (name, facts["written"])
    counters = facts["summary_counters"]
    assert (counters["pred_objects_valid"], counters["generation_failed"], counters["parse_failed"]) == (3, 0, 0)
    assert facts["vis_rendered"] == 3 and facts["images_decoded"] >= 3
    assert facts["overlay_roles"] == ["gt", "pred"]
    assert facts["lock_holds"] == [[str(run_dir), "application.infer"]]
    assert "locked by application.infer" in facts["second_holder"]


def test_train_runs_on_fakes_alone(tmp_path: Path) -> None:
    """The Stage-1 use case on fakes: lengths measured from the rendered samples, the pack plan made before
    any run file, the typed job handed to the engine, the run files and plan files written through the store."""
    facts = run_isolated("train", tmp_path)
    assert facts["global_step"] == 3 and facts["engine_calls"][0][0] == "run"
    # the engine runs after the run files and the plan files (the fake sink writes no logging.jsonl)
    assert set(facts["engine_calls"][0][1]) == {"metric_registry.json", "pack_plan.json", "pack_plan_cache.json",
                                                "resolved_config.json", "run_metadata.json"}  # fmt: skip
    assert {"resolved_config.json", "run_metadata.json", "metric_registry.json", "pack_plan.json",
            "pack_plan_cache.json"} <= set(facts["written"])  # fmt: skip
    # lengths: 20 + len(target) // 8, target = the CoordJSON line in record order (1, 3 and 2 objects)
    targets = facts["measured_targets"]
    assert [t.count("bbox_2d") for t in targets] == [1, 3, 2]
    assert facts["lengths"] == [20 + len(t) // 8 for t in targets]
    assert sorted(i for pack in facts["packs"] for i in pack) == [0, 1, 2] and facts["fingerprinted"]
    assert facts["records"] == [1, 2, 3] and facts["images"] == ["a.png", "b.png", "c.png"]
    assert facts["sigma"] == 1.5 and facts["seed"] == [5, 5] and facts["ordering"] == "random"
    assert facts["max_length"] == 100
    assert facts["sink"] == [0, True, [3.0, 2.0, 1.0]]
    assert "longer than training.max_length=30" in facts["refused"]
    assert facts["short_calls"] == [] and facts["short_written"] == []


def test_visualize_runs_on_fakes_alone(tmp_path: Path) -> None:
    facts = run_isolated("visualize", tmp_path)
    assert facts["written"] == ["vis_000000.png", "vis_summary.json"]  # the missing image is a gap, not a file
    assert (facts["rendered"], facts["skipped"]) == (1, 1)
    assert facts["overlay"]["size"] == [64, 48]
    assert [(o["role"], o["label"]) for o in facts["overlay"]["objects"]] == [("gt", "cat"), ("pred", "cat 0.90")]
    assert facts["renderer_calls"] == ["overlay_png"]  # no eval directory: no report plots
    assert len(facts["warnings"]) == 1 and "missing.png" in facts["warnings"][0]
    assert facts["vis_summary"]["rendered"] == 1 and facts["vis_summary"]["skipped_missing_image"] == 1


def test_prepare_data_runs_on_fakes_alone(tmp_path: Path) -> None:
    facts = run_isolated("prepare_data", tmp_path)
    assert facts["records"] == 2 and facts["objects_per_record"] == [2, 1]
    assert facts["converted"] == 2
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in facts["sizes"]), facts["sizes"]  # data.md §9 grid
    # the JSONL is written unchecked, self-checked, then renamed into place; images go through the image store
    assert facts["written"] == ["categories.json", "convert_report.json", "train.jsonl", "train.jsonl.unchecked"]
    assert len(facts["image_files"]) == 2 and all(f.startswith("images/") for f in facts["image_files"])
    assert facts["report"]["objects"]["written"] == 3


def test_validate_dataset_runs_on_fakes_alone(tmp_path: Path) -> None:
    facts = run_isolated("validate_dataset", tmp_path)
    assert not facts["ok"]
    assert facts["records"] == 4 and facts["bbox_objects"] == 6
    # line 2: 160 tokens > max_length 100; line 3: b.png is 64x64; line 4: undecodable; line 5: contract
    assert facts["problem_lines"] == [2, 3, 4, 5]
    report = facts["report"]
    assert "sample length 160 exceeds training.max_length = 100" in report
    assert "file is 64x64, record says 64x32" in report
    assert "validate_dataset: FAILED with 7 problems" in report  # line 5 breaks four keys
    assert facts["cache_written"] == ["image_checks"]  # clean verdicts cached through the fake store


def test_expand_vocab_runs_on_fakes_alone(tmp_path: Path) -> None:
    facts = run_isolated("expand_vocab", tmp_path)
    src = Path(facts["tmp"]) / "src"
    assert facts["entries"] == ["config.json", "resolved_config.json"]
    assert facts["out_entries"] == ["expanded"]  # the staging directory was renamed into place
    assert facts["expander_calls"] == [[str(src), "float32"]]
    assert facts["staging_dirs"] == 1 and facts["staged_into"][0].startswith(".expanded.")
    assert facts["resolved_kind"] == "expand_vocab" and facts["resolved_expansion"] == {"tied": True}
    assert "already exists" in facts["again"]
    assert facts["tokens_after"] == 1011


def test_merge_adapter_runs_on_fakes_alone(tmp_path: Path) -> None:
    facts = run_isolated("merge_adapter", tmp_path)
    assert facts["entries"] == ["config.json", "resolved_config.json"]
    assert facts["out_entries"] == ["merged"]
    assert facts["merges"] == 1 and facts["tiny_resolved"] == [True]
    assert facts["base_dir"] == str(Path(facts["tmp"]) / "tiny-cache" / "qwen3vl-tiny-abc123")
    assert facts["resolved_kind"] == "merge_adapter" and facts["merged_modules"] == 3
    assert facts["training_sha"] == "ab" * 32
    assert "adapter_model.safetensors: missing" in facts["refused"]


def test_forbidden_modules_names_wiring_adapters_and_frameworks() -> None:
    assert forbidden_modules(["application.wiring", "swift.llm", "adapters.storage.jsonl", "adapters.fakes.storage",
                              "adapters.fakes", "torch", "domain.codec", "application.infer"]) == [
        "adapters.storage.jsonl", "application.wiring", "swift.llm", "torch"]  # fmt: skip

