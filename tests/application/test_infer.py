"""The inference pipeline use case (infer-eval-config.md §2-§3, §6; spec tests 15, 17-18, 25-30, 32-34).

Most tests run the pipeline with a scripted generation backend and the fake tokenizer (no model); the
end-to-end tests at the bottom use the embedded tiny Qwen3-VL on CPU, the converted shapes3 images, the
real evaluator and the real vis stage.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from PIL import Image

from adapters.fakes.generation import SampleFailure, ScriptedGenerationBackend
from adapters.fakes.provenance import FakeProvenanceCollector
from adapters.fakes.tokenizer import FakeTokenizer
from application import wiring
from application.config import load_config, load_resolved_config
from application.infer import (
    InferDependencies,
    VisRequest,
    default_dependencies,
    engine_request,
    main,
    run_pipeline,
)
from domain.errors import ArtifactError, DataContractError, GenerationError
from ports.generation import EngineRequest, GenerationEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")

SHAPES3 = Path(__file__).resolve().parents[2] / "data" / "shapes3"
LOOPBACK_FILE = Path(__file__).resolve().parents[1] / "support" / "loopback_vllm.py"
TOK = FakeTokenizer()


def c(k: int) -> str:
    return f"<|coord_{k}|>"


def answer(index: int) -> str:
    """The scripted model: one box whose x1 depends on the index, then <|im_end|>."""
    return f'{{"objects": [{{"desc": "cat", "bbox_2d": [{c(10 + index)}, {c(100)}, {c(500)}, {c(600)}]}}]}}<|im_end|>'


# --- fixtures -------------------------------------------------------------------------------------------


def write_dataset(folder: Path, n: int, *, bad_line: str | None = None, width: int = 64) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i % 255, 90, 160)).save(folder / "img" / f"{i}.png")
        record = {
            "images": [f"img/{i}.png"], "width": width if i == 1 else 64, "height": 64, "coord_space": "norm1000",
            "objects": [{"desc": "cat", "bbox_2d": [100, 100, 500, 600]}], "metadata": {"image_id": 100 + i},
        }  # fmt: skip
        lines.append(json.dumps(record))
    if bad_line is not None:
        lines.insert(1, bad_line)
    path = folder / "val.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(folder: Path, val_jsonl: Path | None, name: str = "run", **blocks: dict[str, Any]) -> Path:
    config: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(folder / "out"), "seed": 17},
        "model": {"path": str(folder / "ckpt"), "dtype": "float32"},
        "data": {"val_jsonl": str(val_jsonl)} if val_jsonl is not None else {},
        "stages": {"infer": True, "eval": False, "vis": False},
        "infer": {"generation": {"temperature": 0.0, "max_new_tokens": 64, "batch_size": 2}},
    }
    for block, values in blocks.items():
        merged = config.setdefault(block, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    (folder / "ckpt").mkdir(exist_ok=True)
    (folder / "ckpt" / "config.json").write_text('{"model_type": "fake"}')
    (folder / "ckpt" / "model.safetensors").write_bytes(b"weights")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Recorder:
    """Fake dependencies: a scripted backend per engine opening, recorded evaluate / visualize calls."""

    def __init__(self, script: Any = None, describe: dict[str, Any] | None = None) -> None:
        self.script = script if script is not None else (lambda r: answer(r.index))
        self.describe = describe or {"device": "cpu", "attn_implementation_selected": "sdpa"}
        self.backends: list[ScriptedGenerationBackend] = []
        self.engine_requests: list[EngineRequest] = []
        self.checkpoints_resolved = 0
        self.evaluated: list[tuple[Path, Path]] = []
        self.visualized: list[VisRequest] = []
        self.messages: list[str] = []

    def open_engine(self, request: EngineRequest) -> GenerationEngine:
        self.engine_requests.append(request)
        backend = ScriptedGenerationBackend(self.script, tokenizer=TOK, describe=self.describe)
        self.backends.append(backend)
        return GenerationEngine(backend, TOK, backend.stop_ids)

    def resolve_checkpoint(self, model: Any) -> Path:
        self.checkpoints_resolved += 1
        return Path(model.path)

    def deps(self, after_batch: Callable[[int, Path], None] | None = None) -> InferDependencies:
        return InferDependencies(
            artifacts=wiring.make_artifact_store(),
            images=wiring.make_image_store(),
            provenance=FakeProvenanceCollector(),
            resolve_checkpoint=self.resolve_checkpoint,
            open_engine=self.open_engine,
            evaluate=lambda settings, artifact, out: self.evaluated.append((artifact, out)),
            visualize=self.visualized.append,
            after_batch=after_batch,
            progress=False,
            echo=self.messages.append,
        )

    @property
    def calls(self) -> list[list[int]]:
        return [call for b in self.backends for call in b.calls]


def run(config: Path, recorder: Recorder, after_batch: Callable[[int, Path], None] | None = None) -> Any:
    return run_pipeline(load_config(config, entry_point="infer"), recorder.deps(after_batch))


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the pipeline with a scripted backend -------------------------------------------------------------------


def test_15_micro_batches_and_artifact_order(tmp_path: Path) -> None:
    config = write_config(tmp_path, write_dataset(tmp_path, 3))
    recorder = Recorder()
    outcome = run(config, recorder)
    assert recorder.calls == [[0, 1], [2]]
    assert recorder.backends[0].seeds == [[17, 18], [19]]
    artifact = outcome.paths.artifact
    assert artifact == tmp_path / "out" / "run" / "gt_vs_pred.jsonl"
    records = lines_of(artifact)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["image_id"] for r in records] == [100, 101, 102]
    first = records[0]
    assert first["gt"] == [{"type": "bbox_2d", "points": [6, 6, 32, 38], "desc": "cat"}]
    assert first["pred"] == [{"type": "bbox_2d", "points": [1, 6, 32, 38], "desc": "cat", "score": 0.5}]
    assert first["raw_output"].endswith("<|im_end|>") and first["raw_ends_with_im_end"] is True
    assert first["errors"] == []
    assert not (artifact.parent / "gt_vs_pred.jsonl.partial").exists()
    assert recorder.messages[-1] == f"Pipeline complete. run_dir={tmp_path / 'out' / 'run'}"
    assert recorder.backends[0].closed


def test_summary_counts_spammed_duplicate_boxes(tmp_path: Path) -> None:
    # stage2.md §18.7 in the inference summary: image 0 repeats one cat box three times (plus a dog on
    # the same box, which is no duplicate: another desc); image 1 answers one box.
    def script(r: Any) -> str:
        if r.index != 0:
            return answer(r.index)
        box = f"[{c(100)}, {c(100)}, {c(500)}, {c(600)}]"
        records = [f'{{"desc": "{d}", "bbox_2d": {box}}}' for d in ("cat", "Cat", "cat", "dog")]
        return '{"objects": [' + ", ".join(records) + "]}<|im_end|>"

    config = write_config(tmp_path, write_dataset(tmp_path, 2))
    outcome = run(config, Recorder(script))
    dup = json.loads(outcome.paths.summary.read_text())["duplicates"]
    assert dup == {
        "iou_threshold": 0.7, "samples": 2, "samples_with_duplicates": 1, "valid_objects": 5, "pairs": 3,
        "excess_objects": 2, "max_cluster_size": 3, "pairs_mean": 1.5, "max_cluster_size_mean": 2.0,
        "excess_object_frac": 0.4,
    }  # fmt: skip


def test_summary_is_recomputed_from_the_artifact(tmp_path: Path) -> None:
    def script(r: Any) -> str:
        return "no json" if r.index == 1 else answer(r.index)

    config = write_config(tmp_path, write_dataset(tmp_path, 3))
    recorder = Recorder(script, describe={"device": "cpu", "attn_implementation_selected": "sdpa"})
    outcome = run(config, recorder)
    summary = json.loads(outcome.paths.summary.read_text())
    assert list(summary) == [
        "schema_version", "kind", "records_total", "records_written", "determinism", "counters", "error_codes",
        "duplicates", "backend", "generation", "prompt", "data", "score_mode", "resumed_from_index",
        "infer_fingerprint",
    ]  # fmt: skip
    assert (summary["records_total"], summary["records_written"], summary["determinism"]) == (3, 3, "strict")
    assert summary["counters"]["parse_failed"] == summary["counters"]["empty_pred"] == 1
    assert summary["counters"]["pred_objects_valid"] == 2
    assert summary["error_codes"] == ["empty_pred", "parse_failed"]
    # 31 (summary side): requested and selected attention implementations are both recorded.
    assert summary["backend"] == {
        "type": "hf", "model_path": str(tmp_path / "ckpt"), "device": "cpu", "dtype": "float32",
        "attn_implementation_requested": "auto", "attn_implementation_selected": "sdpa",
    }  # fmt: skip
    assert summary["generation"] == {"temperature": 0.0, "top_p": 0.95, "max_new_tokens": 64,
                                     "repetition_penalty": 1.05, "batch_size": 2, "seed": 17}  # fmt: skip
    assert summary["prompt"] == {"variant": "default", "field_order": "desc_first", "coord_mode": "tokens"}
    assert summary["resumed_from_index"] is None
    assert outcome.paths.summary.read_text().endswith("}\n")


def test_17_image_size_problems_fail_before_any_model_loads(tmp_path: Path) -> None:
    config = write_config(tmp_path, write_dataset(tmp_path, 3, width=641))
    recorder = Recorder()
    with pytest.raises(DataContractError, match=r"val\.jsonl:2: width: must be a positive multiple of 32"):
        run(config, recorder)
    assert recorder.engine_requests == [] and recorder.checkpoints_resolved == 0
    assert not (tmp_path / "out").exists()

    other = tmp_path / "other"
    val = write_dataset(other, 2)
    Image.new("RGB", (672, 64)).save(other / "img" / "1.png")  # the file no longer matches the record
    recorder = Recorder()
    with pytest.raises(
        DataContractError, match=r"val\.jsonl:2: images\[0\]: file is 672x64, record says 64x64"
    ):
        run(write_config(other, val), recorder)
    assert recorder.engine_requests == []


def test_18_non_json_line_names_file_and_line_and_writes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, write_dataset(tmp_path, 2, bad_line="{not json"))
    recorder = Recorder()
    with pytest.raises(DataContractError, match=r"val\.jsonl:2: invalid JSON"):
        run(config, recorder)
    assert not (tmp_path / "out").exists() and recorder.engine_requests == []


def interrupt_after(records: int, keep_lines: int) -> Callable[[int, Path], None]:
    """Fault hook: once ``records`` are written, leave ``keep_lines`` complete lines plus half a line."""

    class Killed(RuntimeError):
        pass

    def hook(written: int, partial: Path) -> None:
        if written >= records:
            lines = partial.read_bytes().split(b"\n")
            partial.write_bytes(
                b"\n".join(lines[:keep_lines]) + b"\n" + lines[keep_lines][: len(lines[keep_lines]) // 2]
            )
            raise Killed(f"killed after {written} records")

    return hook


def test_25_resume_truncates_to_a_batch_boundary_and_ends_byte_identical(tmp_path: Path) -> None:
    val = write_dataset(tmp_path, 8)
    reference = Recorder()
    run(write_config(tmp_path, val, name="uninterrupted"), reference)

    config = write_config(tmp_path, val, name="resumed")
    first = Recorder()
    with pytest.raises(RuntimeError, match="killed after 6 records"):
        run(config, first, after_batch=interrupt_after(6, keep_lines=5))
    partial = tmp_path / "out" / "resumed" / "gt_vs_pred.jsonl.partial"
    assert partial.exists() and not partial.with_suffix("").exists()
    assert partial.read_bytes().count(b"\n") == 5  # 5 complete lines + half a line

    second = Recorder()
    outcome = run(config, second)
    assert second.calls == [[4, 5], [6, 7]]  # truncated back to 4 lines, resumed at index 4
    final = outcome.paths.artifact.read_bytes()
    assert final == (tmp_path / "out" / "uninterrupted" / "gt_vs_pred.jsonl").read_bytes()
    summary = json.loads(outcome.paths.summary.read_text())
    assert summary["resumed_from_index"] == 4
    assert summary["records_written"] == 8


def test_26_resume_with_changed_inputs_names_the_key(tmp_path: Path) -> None:
    val = write_dataset(tmp_path, 4)
    with pytest.raises(RuntimeError):
        run(write_config(tmp_path, val), Recorder(), after_batch=interrupt_after(2, keep_lines=1))
    changed = write_config(tmp_path, val, infer={"generation": {"temperature": 0.5}})
    recorder = Recorder()
    with pytest.raises(ArtifactError, match=r"cannot resume .*gt_vs_pred\.jsonl\.partial: inputs changed "
                                            r"\(infer\.generation\.temperature\); choose a new run\.name"):  # fmt: skip
        run(changed, recorder)
    assert recorder.engine_requests == []


def test_26_finished_artifact_without_a_fingerprint_is_not_resumed(tmp_path: Path) -> None:
    config = write_config(tmp_path, write_dataset(tmp_path, 2))
    artifact = tmp_path / "out" / "run" / "gt_vs_pred.jsonl"
    artifact.parent.mkdir(parents=True)
    artifact.write_text("")
    with pytest.raises(ArtifactError, match=r"inputs changed \(no previous fingerprint\)"):
        run(config, Recorder())


def test_27_finished_artifact_is_skipped_without_loading_the_model(tmp_path: Path) -> None:
    config = write_config(tmp_path, write_dataset(tmp_path, 3))
    first = run(config, Recorder())
    before = first.paths.artifact.read_bytes()
    summary = json.loads(first.paths.summary.read_text())

    again = Recorder()
    run(config, again)
    assert again.engine_requests == [] and again.backends == []
    assert any("skipped (model not loaded)" in m for m in again.messages)
    assert first.paths.artifact.read_bytes() == before

    first.paths.summary.unlink()  # a missing summary is rebuilt from the artifact, still without a model
    third = Recorder()
    run(config, third)
    assert third.engine_requests == []
    rebuilt = json.loads(first.paths.summary.read_text())
    assert (
        rebuilt["counters"] == summary["counters"]
        and rebuilt["infer_fingerprint"] == summary["infer_fingerprint"]
    )


def test_28_generation_errors_raise_by_default(tmp_path: Path) -> None:
    def script(r: Any) -> Any:
        return SampleFailure("HTTP 500") if r.index == 1 else answer(r.index)

    with pytest.raises(GenerationError, match=r"val\.jsonl:2 \(index 1\): generation failed: HTTP 500"):
        run(write_config(tmp_path, write_dataset(tmp_path, 3)), Recorder(script))

    def crashing(r: Any) -> Any:
        return ConnectionError("server went away") if r.index == 2 else answer(r.index)

    with pytest.raises(ConnectionError):
        run(write_config(tmp_path, write_dataset(tmp_path, 3), name="b"), Recorder(crashing))


def test_28_record_mode_writes_generation_failed_rows(tmp_path: Path) -> None:
    def script(r: Any) -> Any:
        if r.index == 1:
            return ConnectionError("transport failure")  # fails the batched call, then its own retry
        if r.index == 3:
            return SampleFailure("HTTP 500")
        return answer(r.index)

    config = write_config(tmp_path, write_dataset(tmp_path, 4), infer={"on_generation_error": "record"})
    recorder = Recorder(script)
    with pytest.warns(RuntimeWarning, match="generation failed"):
        outcome = run(config, recorder)
    assert recorder.calls == [[0, 1], [0], [1], [2, 3]]  # the failed batch is retried one sample at a time
    rows = lines_of(outcome.paths.artifact)
    for i in (1, 3):
        assert (rows[i]["errors"], rows[i]["raw_output"], rows[i]["pred"]) == (
            ["generation_failed"],
            None,
            [],
        )
        assert rows[i]["num_generated_tokens"] == 0 and rows[i]["gt"] == rows[0]["gt"]
    assert rows[0]["errors"] == rows[2]["errors"] == []
    summary = json.loads(outcome.paths.summary.read_text())
    assert summary["counters"]["generation_failed"] == 2


def test_engine_request_carries_the_settings_with_their_fallbacks(tmp_path: Path) -> None:
    """The config -> port mapping: served name falls back to the model path, concurrency to the batch size."""
    val = write_dataset(tmp_path / "data", 1)
    plain = load_config(write_config(tmp_path, val, infer={"backend": "vllm"}), entry_point="infer").config
    request = engine_request(plain, tmp_path / "ckpt", tmp_path / "img", tmp_path / "run")
    assert (request.backend, request.model_path, request.dtype, request.seed) == (
        "vllm", str(tmp_path / "ckpt"), "float32", 17
    )
    assert request.max_pixels == plain.data.max_pixels and request.device == plain.infer.device
    assert request.vllm.served_model_name == str(tmp_path / "ckpt") and request.vllm.client_concurrency == 2
    assert request.vllm.launch.startup_timeout_s == plain.infer.vllm.launch.startup_timeout_s
    named = write_config(
        tmp_path, val, name="named",
        infer={"vllm": {"served_model_name": "served", "client_concurrency": 1, "launch": {"max_num_seqs": 3}}},
    )  # fmt: skip
    explicit = engine_request(load_config(named, entry_point="infer").config, tmp_path / "x", tmp_path, tmp_path)
    assert (explicit.vllm.served_model_name, explicit.vllm.client_concurrency) == ("served", 1)
    assert explicit.vllm.launch.max_num_seqs == 3 and explicit.checkpoint == tmp_path / "x"


def test_32_image_root_defaults_to_the_jsonl_directory_whatever_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("IMAGE_ROOT", "COORDEXP_IMAGE_ROOT", "DATA_ROOT", "ROOT_IMAGE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "elsewhere"))
    val = write_dataset(tmp_path / "data", 2)
    recorder = Recorder()
    outcome = run(write_config(tmp_path, val), recorder)
    assert recorder.engine_requests[0].image_root == val.parent.absolute()
    resolved = load_resolved_config(outcome.run_dir / "resolved_config.json")
    assert (resolved["image_root"], resolved["image_root_source"]) == (
        str(val.parent.absolute()),
        "val_jsonl_dir",
    )
    assert recorder.backends[0].seeds  # images were found under the JSONL directory


def test_33_artifact_outside_run_dir_gets_a_pointer_and_eval_only_runs_find_the_producer(
    tmp_path: Path,
) -> None:
    val = write_dataset(tmp_path / "data", 2)
    shared = tmp_path / "shared" / "preds.jsonl"
    producer = run(
        write_config(tmp_path, val, name="producer", infer={"gt_vs_pred_jsonl": str(shared)}), Recorder()
    )
    pointer = shared.parent / "resolved_config.path"
    assert pointer.read_text() == f"{producer.run_dir / 'resolved_config.json'}\n"
    assert not (producer.run_dir / "gt_vs_pred.jsonl").exists()

    consumer = write_config(
        tmp_path, None, name="consumer", stages={"infer": False, "eval": True, "vis": True},
        infer={"gt_vs_pred_jsonl": str(shared)},
    )  # fmt: skip
    recorder = Recorder()
    outcome = run(consumer, recorder)
    assert recorder.engine_requests == [] and recorder.checkpoints_resolved == 0
    resolved = load_resolved_config(outcome.run_dir / "resolved_config.json")
    assert (resolved["image_root"], resolved["image_root_source"]) == (str(val.parent.absolute()), "producer")
    assert (
        resolved["infer_fingerprint"]
        == load_resolved_config(producer.run_dir / "resolved_config.json")["infer_fingerprint"]
    )  # carried over: the consumer did not change the artifact
    assert pointer.read_text() == f"{producer.run_dir / 'resolved_config.json'}\n"  # untouched
    assert recorder.evaluated == [(shared, outcome.run_dir / "eval")]
    (vis,) = recorder.visualized
    assert (vis.artifact, vis.output_dir, vis.limit, vis.eval_dir) == (shared, outcome.run_dir / "vis", 20,
                                                                        outcome.run_dir / "eval")  # fmt: skip


def test_infer_off_without_an_artifact_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, None, stages={"infer": False, "eval": True, "vis": False})
    with pytest.raises(ArtifactError, match=r"gt_vs_pred\.jsonl not found at .*; enable stages\.infer or point "
                                            r"infer\.gt_vs_pred_jsonl at an existing artifact"):  # fmt: skip
        run(config, Recorder())
    assert not (tmp_path / "out").exists()


def test_34_resolved_config_and_run_metadata(tmp_path: Path) -> None:
    outcome = run(write_config(tmp_path, write_dataset(tmp_path, 2)), Recorder())
    path = outcome.run_dir / "resolved_config.json"
    document = load_resolved_config(path)
    summary = json.loads(outcome.paths.summary.read_text())
    assert document["infer_fingerprint"] == summary["infer_fingerprint"]
    assert document["stages"] == {"infer": True, "eval": False, "vis": False}
    assert document["prompt"] == {"variant": "default", "field_order": "desc_first"}
    assert document["artifacts"]["gt_vs_pred_jsonl"] == str(outcome.paths.artifact)
    for change, message in (({"schema_version": "1"}, "must be an int"), ({"schema_version": 2}, "Unsupported"),
                            ({"kind": "train"}, "kind must be 'infer_pipeline'")):  # fmt: skip
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**document, **change}))
        with pytest.raises(ArtifactError, match=message):
            load_resolved_config(bad)
    metadata = json.loads((outcome.run_dir / "run_metadata.json").read_text())
    assert metadata["kind"] == "infer_pipeline" and metadata["finished_at"] is not None
    assert metadata["inference"] == {"backend": "hf", "attn_implementation_selected": "sdpa",
                                     "vllm_launch_argv": None, "trust_remote_code": False,
                                     "infer_fingerprint": summary["infer_fingerprint"]}  # fmt: skip
    assert metadata["artifacts"]["gt_vs_pred"] == "gt_vs_pred.jsonl"


def test_fingerprint_changes_with_the_checkpoint_and_the_data(tmp_path: Path) -> None:
    val = write_dataset(tmp_path, 2)
    config = write_config(tmp_path, val)
    first = json.loads(run(config, Recorder()).paths.summary.read_text())["infer_fingerprint"]
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ArtifactError, match=r"model\.checkpoint\.weights\.model\.safetensors"):
        run(config, Recorder())
    assert len(first) == 64


def test_1_cli_accepts_only_config(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--config", "x.yaml", "--out", "y"])
    assert info.value.code == 2


# --- vLLM server through the pipeline (spec test 29) ---------------------------------------------------------


def _loopback() -> Any:
    spec = importlib.util.spec_from_file_location("loopback_vllm", LOOPBACK_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["loopback_vllm"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def vllm_server() -> Iterator[Any]:
    loopback = _loopback()

    def script(body: dict[str, Any]) -> Any:
        index = body["seed"] - 17
        ids = TOK.encode(answer(index))
        content = TOK.decode(ids[:-1])  # like vLLM: the stop token's text is not in the content
        return loopback.Reply(
            content=content, token_ids=tuple(ids), logprobs=tuple([math.log(0.8)] * len(ids))
        )

    with loopback.LoopbackVllm(script, model="served-ckpt", lifetime_s=60) as server:
        yield server


def test_29_vllm_server_backend_in_the_pipeline(tmp_path: Path, vllm_server: Any) -> None:
    from adapters.vllm.server_client import ServerSettings, connect

    def open_engine(request: EngineRequest) -> GenerationEngine:
        vllm = request.vllm
        settings = ServerSettings(vllm.base_url, vllm.served_model_name, vllm.request_timeout_s,
                                  vllm.preflight_timeout_s, vllm.client_concurrency)  # fmt: skip
        backend = connect(settings, end_of_turn={TOK.im_end_id: "<|im_end|>"})
        return GenerationEngine(backend, TOK, frozenset({TOK.im_end_id}))

    config = write_config(
        tmp_path, write_dataset(tmp_path, 3),
        infer={"backend": "vllm", "vllm": {"mode": "server", "base_url": vllm_server.base_url + "/v1",
                                           "served_model_name": "served-ckpt", "auto_launch": False,
                                           "client_concurrency": 2}},
    )  # fmt: skip
    deps = attrs.evolve(Recorder().deps(), open_engine=open_engine)
    outcome = run_pipeline(load_config(config, entry_point="infer"), deps)
    bodies = sorted(vllm_server.bodies, key=lambda b: b["seed"])
    assert [b["seed"] for b in bodies] == [17, 18, 19]
    assert all(b["skip_special_tokens"] is False and b["spaces_between_special_tokens"] is False
               and b["logprobs"] is True and b["model"] == "served-ckpt" for b in bodies)  # fmt: skip
    rows = lines_of(outcome.paths.artifact)
    for i, row in enumerate(rows):
        assert row["raw_output"] == answer(i)  # coord tokens and <|im_end|> survive
        assert row["pred"][0]["score"] == 0.8
    summary = json.loads(outcome.paths.summary.read_text())
    assert summary["determinism"] == "best_effort"
    assert summary["backend"]["vllm"]["logprobs_mode"] == "unverified"
    assert summary["backend"]["vllm"]["base_url"] == vllm_server.base_url


# --- end to end on the tiny model (CPU) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapters.hf.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint({}, tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(scope="module")
def shapes3_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes3 converted by the project's converter (bbox geometry); the val JSONL."""
    from application.prepare_data import ConvertSettings, convert_dataset

    out = tmp_path_factory.mktemp("shapes3")
    cfg = out / "convert.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"convert": {
        "source": "coco", "annotations": str(SHAPES3 / "gt_dataset.json"), "image_root": str(SHAPES3),
        "output_dir": str(out / "data"), "split": "val", "geometry": "bbox", "workers": 1}}}))  # fmt: skip
    loaded = load_config(cfg, entry_point="prepare_data")
    convert_dataset(ConvertSettings.from_config(loaded.config.data), artifacts=wiring.make_artifact_store(),
                    images=wiring.make_image_store(), progress=False, echo=lambda _m: None)  # fmt: skip
    return out / "data" / "val.jsonl"


def tiny_config(folder: Path, val: Path, checkpoint: Path, name: str, **infer: Any) -> Path:
    generation = {"temperature": 0.0, "max_new_tokens": 12, "batch_size": 2, **infer.pop("generation", {})}
    config = {
        "run": {"name": name, "output_dir": str(folder / "out"), "seed": 17},
        "model": {"path": str(checkpoint), "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"val_jsonl": str(val)},
        "stages": infer.pop("stages", {"infer": True, "eval": False, "vis": False}),
        "infer": {
            **({"device": "cpu"} if infer.get("backend", "hf") == "hf" else {}),
            "generation": generation,
            **infer,
        },
        "vis": {"limit": 2},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def real_deps(
    after_batch: Callable[[int, Path], None] | None = None, spy: list[int] | None = None
) -> InferDependencies:
    deps = default_dependencies()

    def open_engine(request: EngineRequest) -> GenerationEngine:
        engine = wiring.make_generation_engine(request)
        if spy is not None:
            model = engine.backend._checkpoint.model  # type: ignore[attr-defined]
            real_generate = model.generate

            def counting(*args: Any, **kwargs: Any) -> Any:
                spy.append(int(kwargs["input_ids"].shape[0]))
                return real_generate(*args, **kwargs)

            model.generate = counting
        return engine

    return attrs.evolve(
        deps, open_engine=open_engine, after_batch=after_batch, progress=False, echo=lambda _m: None
    )


def test_15_end_to_end_infer_eval_vis_on_the_tiny_model(
    tmp_path: Path, tiny_checkpoint: Path, shapes3_val: Path
) -> None:
    spy: list[int] = []
    config = tiny_config(tmp_path, shapes3_val, tiny_checkpoint, "e2e",
                         stages={"infer": True, "eval": True, "vis": True})  # fmt: skip
    printed: list[str] = []
    outcome = run_pipeline(load_config(config, entry_point="infer"), attrs.evolve(real_deps(spy=spy),
                                                                                  echo=printed.append))
    assert spy == [2, 1]  # one padded generate per micro-batch
    rows = lines_of(outcome.paths.artifact)
    assert [r["index"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert 0 < row["num_generated_tokens"] <= 12 and isinstance(row["raw_output"], str)
        assert row["errors"]  # random weights: junk, salvaged without raising
        assert all(0.0 <= p["score"] <= 1.0 for p in row["pred"])
    summary = json.loads(outcome.paths.summary.read_text())
    assert summary["backend"]["attn_implementation_selected"] == "sdpa"
    assert summary["records_written"] == 3
    # a generation cut at max_new_tokens without <|im_end|> counts as truncated
    cut = sum(1 for r in rows if r["num_generated_tokens"] == 12 and not r["raw_ends_with_im_end"])
    assert cut > 0 and summary["counters"]["truncated"] == cut
    assert all(("truncated" in r["errors"]) == (r["num_generated_tokens"] == 12 and not r["raw_ends_with_im_end"])
               for r in rows)  # fmt: skip
    # the headline numbers and the report's path are printed at the end
    headline = [m for m in printed if m.startswith("Headline: bbox AP ")]
    assert len(headline) == 1 and "| AP50 " in headline[0] and "| F1@0.50 " in headline[0]
    assert any(m.startswith("Parse drops: ") and f"{cut} truncated" in m for m in printed)
    assert f"Report: {outcome.run_dir / 'vis' / 'report.html'}" in printed
    metrics = json.loads((outcome.run_dir / "eval" / "metrics.json").read_text())
    assert "bbox_AP" in metrics["metrics"]
    vis = json.loads((outcome.run_dir / "vis" / "vis_summary.json").read_text())
    assert vis["rendered"] == 2 and vis["image_root_source"] == "producer"
    assert (outcome.run_dir / "vis" / "vis_000000.png").is_file()


def test_25_hf_resume_is_byte_identical_with_sampling(
    tmp_path: Path, tiny_checkpoint: Path, shapes3_val: Path
) -> None:
    lines = [ln for ln in shapes3_val.read_text().splitlines() if ln.strip()]
    val = shapes3_val.parent / "eight.jsonl"
    val.write_text("\n".join((lines * 3)[:8]) + "\n")
    sampling = {"generation": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8}}
    reference = run_pipeline(load_config(tiny_config(tmp_path, val, tiny_checkpoint, "full", **dict(sampling)),
                                         entry_point="infer"), real_deps())  # fmt: skip
    config = tiny_config(tmp_path, val, tiny_checkpoint, "resumed", **dict(sampling))
    with pytest.raises(RuntimeError, match="killed after 6 records"):
        run_pipeline(load_config(config, entry_point="infer"), real_deps(after_batch=interrupt_after(6, 5)))
    spy: list[int] = []
    outcome = run_pipeline(load_config(config, entry_point="infer"), real_deps(spy=spy))
    assert spy == [2, 2]  # indices 4-5 and 6-7
    assert outcome.paths.artifact.read_bytes() == reference.paths.artifact.read_bytes()
    assert json.loads(outcome.paths.summary.read_text())["resumed_from_index"] == 4
    texts = [r["raw_output"] for r in lines_of(reference.paths.artifact)]
    assert texts[0] != texts[3]  # same image, different per-batch seeds: sampling really ran


def test_29_wired_vllm_server_engine_with_the_checkpoint_tokenizer(
    tmp_path: Path, tiny_checkpoint: Path, shapes3_val: Path
) -> None:
    """The composition root's server path: the checkpoint's tokenizer for ids and end-of-turn text, and the
    first answer's prompt token count checked against the chat template's own rendering."""
    from adapters.hf.checkpoint import load_processor
    from domain.errors import SetupError
    from domain.prompts import build_prompt, chat_messages

    processor = load_processor(tiny_checkpoint)
    first = json.loads(shapes3_val.read_text().splitlines()[0])
    texts = build_prompt("default", "tokens", "sorted", "desc_first")
    messages = chat_messages(texts, str(shapes3_val.parent / first["images"][0]))
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             do_resize=False)  # fmt: skip
    prompt_tokens = len(rendered["input_ids"][0])
    tokenizer = processor.tokenizer
    text = '{"objects": [{"desc": "star", "bbox_2d": [<|coord_10|>, <|coord_20|>, <|coord_300|>, <|coord_400|>]}]}'
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    loopback = _loopback()

    for reported, name in ((prompt_tokens, "wired"), (prompt_tokens + 1, "drift")):
        reply = loopback.Reply(content=text, token_ids=tuple(ids), logprobs=tuple([math.log(0.9)] * len(ids)),
                               prompt_tokens=reported)  # fmt: skip
        with loopback.LoopbackVllm(lambda _body, reply=reply: reply, model="tiny") as server:
            config = tiny_config(
                tmp_path, shapes3_val, tiny_checkpoint, name, backend="vllm",
                vllm={"mode": "server", "base_url": server.base_url, "served_model_name": "tiny", "auto_launch": False},
            )  # fmt: skip
            loaded = load_config(config, entry_point="infer")
            if reported != prompt_tokens:
                with pytest.raises(SetupError, match=f"reports {reported} prompt tokens"):
                    run_pipeline(loaded, real_deps())
                continue
            outcome = run_pipeline(loaded, real_deps())
        rows = lines_of(outcome.paths.artifact)
        assert [r["raw_output"] for r in rows] == [text + "<|im_end|>"] * 3
        assert all(r["raw_ends_with_im_end"] and r["pred"][0]["score"] == 0.9 for r in rows)
        assert rows[0]["pred"][0]["points"] == [3, 5, 77, 102]
