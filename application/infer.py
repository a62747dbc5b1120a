"""``python -m application.infer --config FILE``: the inference pipeline (infer-eval-config.md §2-§3, §6; D16, D18).

Run order (§2.2):

1. config loaded, merged and validated; ``run_dir`` and artifact paths resolved (§2.3); prompt texts
   built (an unknown variant is a config error); eval settings checked;
2. with ``stages.infer``: every input record and image validated before any model loads;
   without it: the artifact must already exist;
3. resume check against the ``infer_fingerprint`` of the producing run (§2.7): fresh start, resume at a
   micro-batch boundary of the ``.partial`` file, or skip a finished artifact (rebuilding a missing
   ``summary.json`` from it); changed inputs raise;
4. ``resolved_config.json`` (+ the pointer file next to an artifact outside ``run_dir``) and
   ``run_metadata.json``, atomically;
5. infer stage: micro-batches aligned to ``batch_size`` from index 0, one backend call each, lines
   appended to ``<artifact>.partial`` (flushed and fsynced per batch), then ``summary.json`` recomputed
   from the artifact and the ``.partial`` renamed;
6. eval stage, then vis stage (neither loads the generation model);
7. ``Pipeline complete. run_dir=<abs path>``.

Adapters arrive through :class:`InferDependencies` (defaults from :mod:`application.wiring`), so the
use case runs with fakes in tests. ``InferDependencies.after_batch`` is the fault-injection point of the
resume test: it is called after each micro-batch has been appended and synced.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from application.cli import run_entry_point
from application.config import (
    LoadedConfig,
    check_local_paths,
    load_config,
    load_resolved_config,
    resolved_sha256,
    write_json_atomic,
    write_resolved_config,
)
from application.config.resolved import RESOLVED_CONFIG_FILENAME
from application.config.schema import CoordExpConfig, EvalConfig
from application.datasets import LoadedSplit, load_split
from application.json_reading import int_counts, json_object
from application.provenance import build_run_metadata, mark_finished
from application.visualize import POINTER_FILENAME, discover_image_root, producer_config_path
from domain.duplicates import artifact_line_objects, summarize_duplicates
from domain.errors import (
    ArtifactError,
    ConfigError,
    GenerationError,
    InvariantViolation,
    SetupError,
)
from domain.inference import (
    GeneratedText,
    InferenceRecord,
    artifact_line,
    changed_keys,
    complete_line_ends,
    error_codes_present,
    failed_line,
    fingerprint_of,
    micro_batches,
    process_generation,
    resume_count,
    serialize_line,
    summary_counters,
    token_scanner,
)
from domain.prompts import PromptTexts, build_prompt
from domain.records import Record
from ports.generation import (
    DecodingSettings,
    EngineRequest,
    Generation,
    GenerationBackend,
    GenerationEngine,
    GenerationRequest,
    VllmEngineSettings,
    VllmLaunchSettings,
)
from ports.provenance import ProvenanceCollector
from ports.storage import ArtifactStore, ImageStore

ENTRY_POINT = "application.infer"
PROJECT_DIR = Path(__file__).resolve().parents[1]
SUMMARY_SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
MISSING_ARTIFACT = "gt_vs_pred.jsonl not found at {path}; enable stages.infer or point infer.gt_vs_pred_jsonl at an existing artifact"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin", "*.index.json")
# Errors that are never "a sample failed": they stop the run under any on_generation_error.
FATAL = (InvariantViolation, SetupError, ConfigError)

Echo = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Paths (§2.3)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class PipelinePaths:
    """Absolute paths of one pipeline run."""

    run_dir: Path
    artifact: Path
    summary: Path
    eval_dir: Path
    vis_dir: Path

    @property
    def partial(self) -> Path:
        return self.artifact.with_name(self.artifact.name + PARTIAL_SUFFIX)

    @property
    def resolved_config(self) -> Path:
        return self.run_dir / RESOLVED_CONFIG_FILENAME

    @property
    def run_metadata(self) -> Path:
        return self.run_dir / "run_metadata.json"

    @property
    def pointer(self) -> Path:
        return self.artifact.parent / POINTER_FILENAME

    @property
    def artifact_outside_run_dir(self) -> bool:
        return self.artifact.parent.resolve() != self.run_dir.resolve()


def pipeline_paths(config: CoordExpConfig) -> PipelinePaths:
    """``run_dir = run.output_dir / run.name``; artifact paths from ``infer.*``, ``eval.*``, ``vis.*`` or derived."""
    assert config.run is not None and config.run.output_dir is not None and config.run.name is not None
    run_dir = (Path(config.run.output_dir) / config.run.name).absolute()

    def pick(value: Path | None, default: str) -> Path:
        return Path(value).absolute() if value is not None else run_dir / default

    return PipelinePaths(
        run_dir=run_dir,
        artifact=pick(config.infer.gt_vs_pred_jsonl, "gt_vs_pred.jsonl"),
        summary=pick(config.infer.summary_json, "summary.json"),
        eval_dir=pick(config.eval.output_dir, "eval"),
        vis_dir=pick(config.vis.output_dir, "vis"),
    )


@attrs.frozen
class ImageRootChoice:
    path: Path
    source: str  # config | val_jsonl_dir | producer | artifact_dir


def infer_image_root(config: CoordExpConfig) -> ImageRootChoice:
    """Infer side: ``data.image_root`` if set, else the directory of ``data.val_jsonl``; absolute, once."""
    data = config.data
    if data.image_root is not None:
        return ImageRootChoice(Path(data.image_root).absolute(), "config")
    assert data.val_jsonl is not None
    return ImageRootChoice(Path(data.val_jsonl).absolute().parent, "val_jsonl_dir")


# --------------------------------------------------------------------------------------------
# Engines and dependencies
# --------------------------------------------------------------------------------------------


def engine_request(config: CoordExpConfig, checkpoint: Path, image_root: Path, run_dir: Path) -> EngineRequest:
    """``model`` / ``infer`` / ``data.max_pixels`` / ``run.seed`` -> what opening a backend needs (§2.6).

    The fallbacks live here: ``infer.vllm.served_model_name`` (the vLLM model path), ``client_concurrency``
    (``infer.generation.batch_size``), the vLLM model path (``model.path``, else the checkpoint).
    """
    model, infer, run = config.model, config.infer, config.run
    assert model is not None and run is not None  # load_config(entry_point="infer") requires them
    vllm, launch = infer.vllm, infer.vllm.launch
    model_path = str(model.path) if model.path is not None else str(checkpoint)
    return EngineRequest(
        backend=infer.backend,
        checkpoint=checkpoint,
        image_root=image_root,
        run_dir=run_dir,
        model_path=model_path,
        dtype=model.dtype,
        attn_implementation=model.attn_implementation,
        device=infer.device,
        seed=run.seed,
        max_pixels=config.data.max_pixels,
        vllm=VllmEngineSettings(
            mode=vllm.mode,
            base_url=vllm.base_url,
            served_model_name=vllm.served_model_name if vllm.served_model_name is not None else model_path,
            request_timeout_s=vllm.request_timeout_s,
            preflight_timeout_s=vllm.preflight_timeout_s,
            client_concurrency=(
                vllm.client_concurrency if vllm.client_concurrency is not None else infer.generation.batch_size
            ),
            auto_launch=vllm.auto_launch,
            trust_remote_code=vllm.trust_remote_code,
            launch=VllmLaunchSettings(
                tensor_parallel_size=launch.tensor_parallel_size,
                data_parallel_size=launch.data_parallel_size,
                gpu_memory_utilization=launch.gpu_memory_utilization,
                max_model_len=launch.max_model_len,
                max_num_batched_tokens=launch.max_num_batched_tokens,
                max_num_seqs=launch.max_num_seqs,
                enable_prefix_caching=launch.enable_prefix_caching,
                enforce_eager=launch.enforce_eager,
                startup_timeout_s=launch.startup_timeout_s,
            ),
        ),
    )


@attrs.frozen(eq=False)
class VisRequest:
    artifact: Path
    output_dir: Path
    limit: int | None
    image_root: Path | None
    eval_dir: Path | None


@attrs.frozen(eq=False)
class InferDependencies:
    """The adapters of one pipeline run (defaults: :func:`default_dependencies`)."""

    artifacts: ArtifactStore
    images: ImageStore
    provenance: ProvenanceCollector
    resolve_checkpoint: Callable[[Any], Path]
    open_engine: Callable[[EngineRequest], GenerationEngine]
    evaluate: Callable[[EvalConfig, Path, Path], Any]
    visualize: Callable[[VisRequest], Any]
    after_batch: Callable[[int, Path], None] | None = None
    progress: bool = True
    echo: Echo = print


def default_dependencies() -> InferDependencies:
    from application import wiring

    artifacts = wiring.make_artifact_store()
    images = wiring.make_image_store()

    def evaluate(settings: EvalConfig, artifact: Path, output_dir: Path) -> Any:
        from application.evaluate import run_evaluation

        return run_evaluation(
            settings,
            artifact,
            output_dir,
            coco=wiring.make_coco_evaluator(settings.coco_backend),
            semantic=wiring.make_semantic_step(settings.semantic),
            artifacts=artifacts,
            lvis=(
                wiring.make_lvis_evaluator(settings.lvis_backend) if settings.dataset_style == "lvis" else None
            ),
        )

    def visualize(request: VisRequest) -> Any:
        from application.visualize import run_vis_stage

        return run_vis_stage(
            request.artifact,
            request.output_dir,
            limit=request.limit,
            image_root=request.image_root,
            eval_dir=request.eval_dir,
            renderer=wiring.make_image_renderer(),
            report_renderer=wiring.make_report_renderer(),
            images=images,
            store=artifacts,
        )

    return InferDependencies(
        artifacts=artifacts,
        images=images,
        provenance=wiring.make_provenance_collector(),
        resolve_checkpoint=wiring.resolve_model_checkpoint,
        open_engine=wiring.make_generation_engine,
        evaluate=evaluate,
        visualize=visualize,
    )


# --------------------------------------------------------------------------------------------
# Fingerprint and resume (§2.7)
# --------------------------------------------------------------------------------------------


def checkpoint_fingerprint(directory: Path, artifacts: ArtifactStore) -> dict[str, Any]:
    """Names and sizes of the weight files and the SHA-256 of ``config.json``."""
    weights: dict[str, int] = {}
    for pattern in WEIGHT_PATTERNS:
        for path in directory.glob(pattern):
            if path.is_file():
                weights[path.name] = path.stat().st_size
    config_json = directory / "config.json"
    return {
        "weights": dict(sorted(weights.items())),
        "config_json_sha256": artifacts.sha256(config_json) if config_json.is_file() else None,
    }


def fingerprint_inputs(
    config: CoordExpConfig, checkpoint: Path, image_root: Path, prompt: PromptTexts, artifacts: ArtifactStore
) -> dict[str, Any]:
    """Every input that can change an artifact line (§2.7), as JSON values."""
    model, data, infer = config.model, config.data, config.infer
    assert model is not None and data.val_jsonl is not None and config.run is not None
    val = Path(data.val_jsonl)
    generation = infer.generation
    inputs: dict[str, Any] = {
        "model": {
            "path": str(model.path) if model.path is not None else str(checkpoint),
            "checkpoint": checkpoint_fingerprint(checkpoint, artifacts),
            "dtype": model.dtype,
            "attn_implementation": model.attn_implementation,
        },
        "data": {
            "val_jsonl": str(data.val_jsonl),
            "val_jsonl_size": val.stat().st_size,
            "val_jsonl_sha256": artifacts.sha256(val),
            "image_root": str(image_root),
            "coord_mode": data.coord_mode.value,
            "field_order": data.field_order.value,
            "val_limit": data.val_limit,
        },
        "prompt": {"system": prompt.system, "user": prompt.user},
        "infer": {
            "backend": infer.backend,
            "generation": {
                "temperature": generation.temperature,
                "top_p": generation.top_p,
                "max_new_tokens": generation.max_new_tokens,
                "repetition_penalty": generation.repetition_penalty,
                "batch_size": generation.batch_size,
            },
        },
        "run": {"seed": config.run.seed},
    }
    if infer.backend == "vllm":
        inputs["infer"]["vllm"] = {"mode": infer.vllm.mode}
    return inputs


@attrs.frozen
class ProducerRecord:
    """What the artifact's producing run recorded: its fingerprint and the inputs behind it."""

    fingerprint: str | None
    inputs: Mapping[str, Any] | None
    moved: str | None = None  # why the record is unusable when its run directory was moved or copied


def producer_record(artifact: Path) -> ProducerRecord:
    """The ``infer_fingerprint`` of the run that wrote ``artifact`` (via the pointer file, else the
    artifact's directory); none when there is no acceptable ``resolved_config.json``."""
    try:
        candidate = producer_config_path(artifact)
        if candidate is None or not candidate.is_file():
            return ProducerRecord(None, None)
        document = load_resolved_config(candidate)
    except ArtifactError:
        return ProducerRecord(None, None)
    recorded = document["artifacts"].get("gt_vs_pred_jsonl")
    if isinstance(recorded, str) and Path(recorded).name == artifact.name and Path(recorded).resolve() != artifact.resolve():
        return ProducerRecord(
            None, None,
            f"{candidate} records the artifact at {recorded}: the run directory was moved or copied since; "
            "move it back to resume it there, or choose a new run.name",
        )  # fmt: skip
    if not isinstance(recorded, str) or Path(recorded).resolve() != artifact.resolve():
        return ProducerRecord(None, None)
    fingerprint = document.get("infer_fingerprint")
    inputs = document.get("infer_fingerprint_inputs")
    return ProducerRecord(
        fingerprint if isinstance(fingerprint, str) else None, inputs if isinstance(inputs, dict) else None
    )


@attrs.frozen
class ResumeState:
    status: Literal["fresh", "resume", "done"]
    start: int
    resumed_from_index: int | None


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)
        handle.flush()
        os.fsync(handle.fileno())


def resume_state(
    paths: PipelinePaths, fingerprint: str, inputs: Mapping[str, Any], batch_size: int
) -> ResumeState:
    """Start-up cases 1-4 of §2.7. A resumable ``.partial`` is truncated to a batch boundary here."""
    final, partial = paths.artifact, paths.partial
    if not final.exists() and not partial.exists():
        return ResumeState("fresh", 0, None)
    previous = producer_record(final)
    if previous.fingerprint != fingerprint:
        existing = final if final.exists() else partial
        if previous.moved is not None:  # not "inputs changed": the inputs may be the same
            raise ArtifactError(f"cannot resume {existing}: {previous.moved}")
        if previous.fingerprint is None:
            what = "no previous fingerprint"
        else:
            what = ", ".join(changed_keys(previous.inputs or {}, inputs) or ["infer_fingerprint"])
        raise ArtifactError(
            f"cannot resume {existing}: inputs changed ({what}); choose a new run.name or delete the artifact"
        )
    if final.exists():
        return ResumeState("done", 0, None)
    ends = complete_line_ends(partial.read_bytes())
    keep = resume_count(len(ends), batch_size)
    _truncate(partial, ends[keep - 1] if keep else 0)
    return ResumeState("resume", keep, keep)


# --------------------------------------------------------------------------------------------
# Generation with the failure semantics of §2.9
# --------------------------------------------------------------------------------------------


def _checked(generations: Sequence[Generation], requests: Sequence[GenerationRequest]) -> list[Generation]:
    if [g.index for g in generations] != [r.index for r in requests]:
        raise InvariantViolation(
            f"backend answered indices {[g.index for g in generations]} for requests {[r.index for r in requests]}"
        )
    return list(generations)


def generate_batch(
    backend: GenerationBackend,
    requests: Sequence[GenerationRequest],
    decoding: DecodingSettings,
    on_error: str,
) -> list[Generation]:
    """One backend call; under ``record`` a failed batched call is retried one sample at a time and a sample
    that still fails becomes ``Generation.error``; under ``raise`` every failure propagates."""
    try:
        generations = _checked(backend.generate(requests, decoding), requests)
    except FATAL:
        raise
    except Exception as exc:  # re-raised, or retried per sample under 'record' (§2.8.1)
        if on_error == "raise":
            raise
        warnings.warn(
            f"generation of indices {requests[0].index}..{requests[-1].index} failed ({type(exc).__name__}: {exc}); "
            "retrying one sample at a time",
            RuntimeWarning,
            stacklevel=2,
        )
        generations = []
        for request in requests:
            try:
                generations += _checked(backend.generate([request], decoding), [request])
            except FATAL:
                raise
            except Exception as single:  # noqa: BLE001 - recorded as generation_failed (on_generation_error: record)
                generations.append(
                    Generation(index=request.index, error=f"{type(single).__name__}: {single}")
                )
    for request, generation in zip(requests, generations):
        if generation.error is None:
            continue
        where = f"{request.source}:{request.line} (index {request.index})"
        if on_error == "raise":
            raise GenerationError(
                f"{where}: generation failed: {generation.error}; set infer.on_generation_error: record to "
                "write a generation_failed record and continue",
                index=request.index,
            )
        warnings.warn(f"{where}: generation failed, recorded as generation_failed: {generation.error}",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    return generations


# --------------------------------------------------------------------------------------------
# Summary (§3.3)
# --------------------------------------------------------------------------------------------


def read_artifact_lines(path: Path, artifacts: ArtifactStore, expected: int | None) -> list[dict[str, Any]]:
    """The artifact's records, checked to carry ``index`` 0..n-1 in order (and ``expected`` of them)."""
    lines = [dict(item.record) for item in artifacts.read_jsonl(path)]
    for ordinal, line in enumerate(lines):
        if line.get("index") != ordinal:
            raise ArtifactError(
                f"{path}: record {ordinal} has index {line.get('index')!r}, expected {ordinal}"
            )
    if expected is not None and len(lines) != expected:
        raise ArtifactError(f"{path}: {len(lines)} records, expected {expected}")
    return lines


def backend_section(config: CoordExpConfig, model_path: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    model, infer = config.model, config.infer
    assert model is not None
    section: dict[str, Any] = {"type": infer.backend, "model_path": model_path}
    if infer.backend == "hf":
        section["device"] = facts.get("device", infer.device)
        section["dtype"] = model.dtype
        section["attn_implementation_requested"] = model.attn_implementation
        section["attn_implementation_selected"] = facts.get("attn_implementation_selected")
        return section
    section["dtype"] = model.dtype
    vllm = infer.vllm
    recorded = facts.get("vllm")
    if isinstance(recorded, Mapping):
        section["vllm"] = dict(recorded)
    else:  # summary rebuilt without a backend: what the config says
        section["vllm"] = {
            "mode": vllm.mode,
            "base_url": vllm.base_url,
            "served_model_name": vllm.served_model_name if vllm.served_model_name is not None else model_path,
            "request_timeout_s": vllm.request_timeout_s,
            "client_concurrency": (
                vllm.client_concurrency
                if vllm.client_concurrency is not None
                else infer.generation.batch_size
            ),
            "auto_launched": None,
            "logprobs_mode": None,
        }
    return section


def build_summary(
    config: CoordExpConfig,
    lines: Sequence[Mapping[str, Any]],
    *,
    records_total: int,
    model_path: str,
    facts: Mapping[str, Any],
    image_root: Path,
    resumed_from_index: int | None,
    fingerprint: str,
) -> dict[str, Any]:
    """``summary.json`` (§3.3): counters recomputed from the artifact's lines."""
    assert config.run is not None
    counters = summary_counters(lines)
    generation = config.infer.generation
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "kind": "infer_summary",
        "records_total": records_total,
        "records_written": len(lines),
        "determinism": "strict" if config.infer.backend == "hf" else "best_effort",
        "counters": counters,
        "error_codes": error_codes_present(counters),
        # stage2.md §18.7: the duplicate monitor Channel B logs, on the artifact's predictions (additive key).
        "duplicates": summarize_duplicates(artifact_line_objects(line) for line in lines).to_json(),
        "backend": backend_section(config, model_path, facts),
        "generation": {
            "temperature": generation.temperature,
            "top_p": generation.top_p,
            "max_new_tokens": generation.max_new_tokens,
            "repetition_penalty": generation.repetition_penalty,
            "batch_size": generation.batch_size,
            "seed": config.run.seed,
        },
        "prompt": {
            "variant": config.prompt.variant,
            "field_order": config.data.field_order.value,
            "coord_mode": config.data.coord_mode.value,
        },
        "data": {
            "val_jsonl": str(config.data.val_jsonl) if config.data.val_jsonl is not None else None,
            "val_limit": config.data.val_limit,
            "image_root": str(image_root),
        },
        "score_mode": "token_prob",
        "resumed_from_index": resumed_from_index,
        "infer_fingerprint": fingerprint,
    }


# --------------------------------------------------------------------------------------------
# The infer stage
# --------------------------------------------------------------------------------------------


def _inference_record(index: int, record: Record) -> InferenceRecord:
    image_id = record.metadata.get("image_id") if record.metadata is not None else None
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        image_id = None  # the evaluator joins official GT by int ids only (§3.1, data.md §9.7)
    return InferenceRecord(index, record.image, record.width, record.height, record.objects, image_id)


@attrs.frozen(eq=False)
class InferInputs:
    """Everything the infer stage needs, resolved before any model loads."""

    split: LoadedSplit
    prompt: PromptTexts
    image_root: ImageRootChoice
    checkpoint: Path
    model_path: str
    fingerprint: str
    fingerprint_inputs: Mapping[str, Any]


@attrs.frozen
class InferOutcome:
    status: str  # ran | resumed | skipped
    records_written: int
    facts: Mapping[str, Any]
    resumed_from_index: int | None


def _progress(deps: InferDependencies, total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc="infer", unit="rec", disable=not deps.progress, file=sys.stderr
    )


def run_infer_stage(
    config: CoordExpConfig,
    paths: PipelinePaths,
    inputs: InferInputs,
    state: ResumeState,
    deps: InferDependencies,
) -> InferOutcome:
    """Generate, process and append the missing micro-batches, then write the summary and finalize."""
    records = inputs.split.records
    total = len(records)
    if state.status == "done":
        deps.echo(
            f"infer stage: {paths.artifact} is complete with the same inputs; skipped (model not loaded)"
        )
        if not paths.summary.exists():
            lines = read_artifact_lines(paths.artifact, deps.artifacts, total)
            summary = build_summary(config, lines, records_total=total, model_path=inputs.model_path, facts={},
                                    image_root=inputs.image_root.path, resumed_from_index=None,
                                    fingerprint=inputs.fingerprint)  # fmt: skip
            write_json_atomic(paths.summary, summary, deps.artifacts)
            deps.echo(f"infer stage: rebuilt {paths.summary} from the artifact")
        return InferOutcome("skipped", total, {}, None)

    assert config.run is not None
    generation = config.infer.generation
    decoding = DecodingSettings(
        max_new_tokens=generation.max_new_tokens,
        temperature=generation.temperature,
        top_p=generation.top_p,
        repetition_penalty=generation.repetition_penalty,
    )
    data = config.data
    facts: Mapping[str, Any] = {}
    paths.partial.parent.mkdir(parents=True, exist_ok=True)
    if state.status == "fresh":
        paths.partial.touch()
    if state.start < total:
        engine = deps.open_engine(
            engine_request(config, inputs.checkpoint, inputs.image_root.path, paths.run_dir)
        )
        try:
            scan = token_scanner(engine.tokenizer, data.field_order, data.coord_mode, engine.stop_ids)
            im_end = engine.tokenizer.im_end_id
            with _progress(deps, total, state.start) as bar:
                for batch in micro_batches(state.start, total, generation.batch_size):
                    requests = [
                        GenerationRequest(
                            index=i,
                            system=inputs.prompt.system,
                            user=inputs.prompt.user,
                            image_path=str(inputs.split.images[i]),
                            seed=config.run.seed + i,
                            width=records[i].width,
                            height=records[i].height,
                            source=records[i].source,
                            line=records[i].line,
                        )
                        for i in batch
                    ]
                    generations = generate_batch(
                        engine.backend, requests, decoding, config.infer.on_generation_error
                    )
                    batch_lines: list[str] = []
                    for i, gen in zip(batch, generations):
                        record = _inference_record(i, records[i])
                        if gen.error is not None:
                            batch_lines.append(serialize_line(failed_line(record)))
                            continue
                        if gen.text is None:
                            raise InvariantViolation(f"index {i}: the backend returned no text and no error")
                        text = GeneratedText(gen.token_ids, gen.text, gen.token_logprobs,
                                             hit_token_limit=gen.finish_reason == "length")
                        outcome = process_generation(
                            text,
                            width=record.width,
                            height=record.height,
                            field_order=data.field_order,
                            coord_mode=data.coord_mode,
                            scan=scan,
                        )
                        batch_lines.append(serialize_line(artifact_line(record, text, outcome, im_end)))
                    deps.artifacts.append_lines(paths.partial, batch_lines)
                    bar.update(len(batch))
                    if deps.after_batch is not None:
                        deps.after_batch(batch.stop, paths.partial)
            facts = dict(engine.backend.describe())
        finally:
            engine.backend.close()

    lines = read_artifact_lines(paths.partial, deps.artifacts, total)
    summary = build_summary(config, lines, records_total=total, model_path=inputs.model_path, facts=facts,
                            image_root=inputs.image_root.path, resumed_from_index=state.resumed_from_index,
                            fingerprint=inputs.fingerprint)  # fmt: skip
    write_json_atomic(paths.summary, summary, deps.artifacts)
    deps.artifacts.replace(paths.partial, paths.artifact)
    return InferOutcome(
        "resumed" if state.status == "resume" else "ran", len(lines), facts, state.resumed_from_index
    )


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


@attrs.frozen
class PipelineOutcome:
    run_dir: Path
    paths: PipelinePaths
    infer: InferOutcome | None
    eval_summary: Any
    vis_summary: Any


def _relative(path: Path, run_dir: Path) -> str:
    return os.path.relpath(path, run_dir)


def _prepare_infer(
    config: CoordExpConfig, paths: PipelinePaths, prompt: PromptTexts, deps: InferDependencies
) -> InferInputs:
    data = config.data
    assert data.val_jsonl is not None and config.model is not None
    split = load_split(
        Path(data.val_jsonl), data, config.prompt.variant, limit=data.val_limit,
        artifacts=deps.artifacts, images=deps.images,
    )  # fmt: skip
    root = infer_image_root(config)
    checkpoint = Path(deps.resolve_checkpoint(config.model)).absolute()
    inputs = fingerprint_inputs(config, checkpoint, root.path, prompt, deps.artifacts)
    model_path = str(config.model.path) if config.model.path is not None else str(checkpoint)
    return InferInputs(split, prompt, root, checkpoint, model_path, fingerprint_of(inputs), inputs)


def _write_pointer(paths: PipelinePaths, artifacts: ArtifactStore) -> None:
    artifacts.write_text(paths.pointer, str(paths.resolved_config) + "\n")


def run_pipeline(loaded: LoadedConfig, deps: InferDependencies) -> PipelineOutcome:
    """Run the stages of ``loaded`` (§2.2); see the module docstring for the order."""
    config = loaded.config
    stages = config.stages
    assert stages is not None and config.run is not None  # required by load_config(entry_point="infer")
    check_local_paths(config, "infer")
    paths = pipeline_paths(config)
    prompt = build_prompt(
        config.prompt.variant, config.data.coord_mode, config.data.ordering, config.data.field_order,
        config.prompt.system, config.prompt.user,
    )  # fmt: skip
    if stages.eval:
        from application.evaluate import check_settings

        check_settings(config.eval)

    # 2-3. inputs validated before any model loads; resume check.
    infer_inputs: InferInputs | None = None
    state: ResumeState | None = None
    fingerprint: str | None
    fingerprint_source: Mapping[str, Any] | None
    if stages.infer:
        infer_inputs = _prepare_infer(config, paths, prompt, deps)
        state = resume_state(
            paths,
            infer_inputs.fingerprint,
            infer_inputs.fingerprint_inputs,
            config.infer.generation.batch_size,
        )
        root = infer_inputs.image_root
        fingerprint, fingerprint_source = infer_inputs.fingerprint, infer_inputs.fingerprint_inputs
    else:
        if not paths.artifact.is_file():
            raise ArtifactError(MISSING_ARTIFACT.format(path=paths.artifact))
        found = discover_image_root(paths.artifact, config.data.image_root)
        root = ImageRootChoice(found.path, found.source)
        producer = producer_record(paths.artifact)  # carried over: this run did not change the artifact
        fingerprint, fingerprint_source = producer.fingerprint, producer.inputs

    # 4. resolved config (+ pointer) and run metadata.
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {
        "infer_fingerprint": fingerprint,
        "infer_fingerprint_inputs": fingerprint_source,
        "image_root": str(root.path),
        "image_root_source": root.source,
        "stages": {"infer": stages.infer, "eval": stages.eval, "vis": stages.vis},
        "artifacts": {
            "run_dir": str(paths.run_dir),
            "gt_vs_pred_jsonl": str(paths.artifact),
            "summary_json": str(paths.summary),
            "eval_dir": str(paths.eval_dir),
            "vis_dir": str(paths.vis_dir),
        },
        "prompt": {"variant": config.prompt.variant, "field_order": config.data.field_order.value},
    }
    write_resolved_config(loaded, paths.run_dir, kind="infer_pipeline", extra=extra, store=deps.artifacts)
    if stages.infer and paths.artifact_outside_run_dir:
        _write_pointer(paths, deps.artifacts)
    written = {"resolved_config": paths.resolved_config, "run_metadata": paths.run_metadata}
    if stages.infer:
        written.update(gt_vs_pred=paths.artifact, summary=paths.summary)
        if config.infer.backend == "vllm" and config.infer.vllm.mode == "server":
            written["vllm_server_log"] = paths.run_dir / "vllm_server.log"
    if stages.eval:
        written["eval"] = paths.eval_dir
    if stages.vis:
        written["vis"] = paths.vis_dir

    def inference_section(facts: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "backend": config.infer.backend,
            "attn_implementation_selected": facts.get("attn_implementation_selected"),
            "vllm_launch_argv": facts.get("launch_argv"),
            # Whether code shipped inside the checkpoint was allowed to run (only the vLLM backends can).
            "trust_remote_code": config.infer.backend == "vllm" and config.infer.vllm.trust_remote_code,
            "infer_fingerprint": fingerprint,
        }

    metadata = build_run_metadata(
        kind="infer_pipeline",
        collector=deps.provenance,
        entry_point=ENTRY_POINT,
        argv=["--config", str(loaded.path)],
        config_path=str(loaded.path),
        extends_chain=[str(p) for p in loaded.extends_chain],
        resolved_config_sha256=resolved_sha256(config),
        run_name=str(config.run.name),
        output_dir=str(config.run.output_dir),
        run_dir=str(paths.run_dir),
        seed=int(config.run.seed),
        project_dir=str(PROJECT_DIR),
        artifacts={name: _relative(path, paths.run_dir) for name, path in written.items()},
        inference=inference_section({}),
    )
    deps.artifacts.write_json(paths.run_metadata, metadata)

    # 5-6. stages.
    infer_outcome: InferOutcome | None = None
    if stages.infer:
        assert infer_inputs is not None and state is not None
        infer_outcome = run_infer_stage(config, paths, infer_inputs, state, deps)
        metadata["inference"] = inference_section(infer_outcome.facts)
    eval_summary = deps.evaluate(config.eval, paths.artifact, paths.eval_dir) if stages.eval else None
    vis_summary = None
    if stages.vis:
        eval_dir = paths.eval_dir if (stages.eval or paths.eval_dir.exists()) else None
        vis_summary = deps.visualize(
            VisRequest(paths.artifact, paths.vis_dir, config.vis.limit, config.data.image_root, eval_dir)
        )
    deps.artifacts.write_json(paths.run_metadata, mark_finished(metadata, deps.provenance))

    # 7.
    deps.echo(f"Pipeline complete. run_dir={paths.run_dir}")
    if eval_summary is not None:
        for line in _headline(paths, eval_summary, vis_summary, deps.artifacts):
            deps.echo(line)
    return PipelineOutcome(paths.run_dir, paths, infer_outcome, eval_summary, vis_summary)


def _headline(paths: PipelinePaths, eval_summary: Any, vis_summary: Any, artifacts: ArtifactStore) -> list[str]:
    """The headline numbers of the eval stage, the artifact's parse drops and the report's path."""
    from application.headline import headline_lines

    counters: dict[str, int] | None = None
    records: int | None = None
    if paths.summary.is_file():
        summary = json_object(artifacts.read_json(paths.summary))
        counters, written = int_counts(summary.get("counters", {})), summary.get("records_written")
        if written is not None and not isinstance(written, int):
            raise TypeError(f"{paths.summary}: records_written is not an integer: {written!r}")
        records = written
    report_name = getattr(vis_summary, "report", None)
    report = paths.vis_dir / report_name.name if report_name is not None else None
    return headline_lines(eval_summary.metrics, counters, records, report)


def main(argv: Sequence[str] | None = None) -> int:
    def body(config_path: Path) -> int:
        from application.run_lock import hold_run_directory

        loaded = load_config(config_path, entry_point="infer")
        with hold_run_directory(loaded.config, ENTRY_POINT):
            run_pipeline(loaded, default_dependencies())
        return 0

    return run_entry_point(argv, ENTRY_POINT, body)


if __name__ == "__main__":
    raise SystemExit(main())
