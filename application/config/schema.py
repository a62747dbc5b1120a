"""The typed configuration schema (D13, D13a): frozen attrs classes, one per block.

Every default of the project lives here and nowhere else (infer-eval-config.md §1.4.2). Ranges
live beside the defaults as field metadata (:class:`Bound`) and are checked by
``application.config.validation`` with the full dotted path. Key names and defaults follow the
spec files: data.md §8.1, §9.2, §10; stage1.md §5, §8; stage2.md §2.2, §16, §20;
infer-eval-config.md §2.1, §4.6, §5.

Paths are :class:`pathlib.Path` built from strings; relative paths resolve against the current
working directory (the repository root) when they are used, never against the config file.
"""

# No `from __future__ import annotations`: cattrs reads these annotations at run time.
import math
import re
from pathlib import Path
from typing import Any, Literal

import attrs

from domain.instability import InstabilitySettings
from domain.losses import CoordLossSettings
from domain.objects import CoordMode, FieldOrder, Ordering

# --------------------------------------------------------------------------------------------
# Field metadata: numeric bounds and string patterns, checked after structuring.
# --------------------------------------------------------------------------------------------

BOUND_KEY = "coordexp_bound"
ITEM_BOUND_KEY = "coordexp_item_bound"
PATTERN_KEY = "coordexp_pattern"
NONEMPTY_KEY = "coordexp_nonempty"
YAML_KEY = "coordexp_yaml_key"  # the YAML key of an attribute whose name differs (Python keywords)


@attrs.frozen
class Bound:
    """An interval rule for a number: any of ``ge``/``gt``/``le``/``lt`` may be set."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        lower = f"[{self.ge:g}" if self.ge is not None else (f"({self.gt:g}" if self.gt is not None else None)
        upper = f"{self.le:g}]" if self.le is not None else (f"{self.lt:g})" if self.lt is not None else None)
        if lower and upper:
            return f"in {lower}, {upper}"
        if lower:
            return f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        if upper:
            return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"
        return "any number"

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.ge is not None and not value >= self.ge:
            return False
        if self.gt is not None and not value > self.gt:
            return False
        if self.le is not None and not value <= self.le:
            return False
        return not (self.lt is not None and not value < self.lt)


def setting(
    default: Any = attrs.NOTHING,
    *,
    factory: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    items: Bound | None = None,
    pattern: str | None = None,
    nonempty: bool = False,
) -> Any:
    """An attrs field with its default and its range / pattern rules as metadata."""
    metadata: dict[str, Any] = {}
    if any(b is not None for b in (ge, gt, le, lt)):
        metadata[BOUND_KEY] = Bound(ge=ge, gt=gt, le=le, lt=lt)
    if items is not None:
        metadata[ITEM_BOUND_KEY] = items
    if pattern is not None:
        metadata[PATTERN_KEY] = re.compile(pattern)
    if nonempty:
        metadata[NONEMPTY_KEY] = True
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]+)$"
# Hosts never carry user info (``user:password@``): stage2.md §16.3.2 refuses credentials in a URL.
BASE_URL_PATTERN = r"^https?://[^/:@\s]+:[0-9]{1,5}(/v1)?/?$"
SERVER_URL_PATTERN = r"^https?://[^/:@\s]+:[0-9]{1,5}/?$"
URL_PATTERNS = frozenset({BASE_URL_PATTERN, SERVER_URL_PATTERN})

Dtype = Literal["bfloat16", "float16", "float32"]
AttnImplementation = Literal["auto", "flash_attention_2", "sdpa", "eager"]

# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


@attrs.frozen
class RunConfig:
    """``run``: where a run writes (``run_dir = output_dir / name``) and its one seed."""

    name: str | None = setting(None, nonempty=True)
    output_dir: Path | None = None
    seed: int = setting(17, ge=0)

    @property
    def run_dir(self) -> Path:
        if self.name is None or self.output_dir is None:
            raise ValueError("run.name and run.output_dir must both be set to derive run_dir")
        return self.output_dir / self.name


# --------------------------------------------------------------------------------------------
# model (ENVIRONMENT.md "The tiny Qwen3-VL that works")
# --------------------------------------------------------------------------------------------


@attrs.frozen
class TinyTextConfig:
    vocab_size: int = setting(1472, ge=1)
    hidden_size: int = setting(128, ge=1)
    intermediate_size: int = setting(256, ge=1)
    num_hidden_layers: int = setting(2, ge=1)
    num_attention_heads: int = setting(4, ge=1)
    num_key_value_heads: int = setting(2, ge=1)
    head_dim: int = setting(32, ge=2)
    mrope_section: tuple[int, ...] = setting((6, 5, 5), items=Bound(ge=0))
    mrope_interleaved: bool = True
    rope_theta: float = setting(5_000_000.0, gt=0)
    tie_word_embeddings: bool = False


@attrs.frozen
class TinyVisionConfig:
    depth: int = setting(2, ge=1)
    hidden_size: int = setting(64, ge=1)
    intermediate_size: int = setting(128, ge=1)
    num_heads: int = setting(4, ge=1)
    patch_size: int = setting(16, ge=1)
    spatial_merge_size: int = setting(2, ge=1)
    temporal_patch_size: int = setting(2, ge=1)
    num_position_embeddings: int = setting(256, ge=1)
    deepstack_visual_indexes: tuple[int, ...] = setting((0, 1), items=Bound(ge=0))


@attrs.frozen
class TinyModelConfig:
    """``model.tiny``: the embedded tiny Qwen3-VL built in code (CPU tests and smoke runs)."""

    seed: int = setting(0, ge=0)
    cache_dir: Path | None = None
    text: TinyTextConfig = attrs.field(factory=TinyTextConfig)
    vision: TinyVisionConfig = attrs.field(factory=TinyVisionConfig)


@attrs.frozen
class ModelConfig:
    """``model``: a local HF checkpoint (``path``) xor the embedded tiny model (``tiny``)."""

    path: Path | None = None
    tiny: TinyModelConfig | None = None
    dtype: Dtype = "bfloat16"
    attn_implementation: AttnImplementation = "auto"


# --------------------------------------------------------------------------------------------
# data (data.md §9.2, §10)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class DataConvertConfig:
    """``data.convert``: the offline COCO / LVIS converter (data.md §9.2); required keys have no default."""

    source: Literal["coco", "lvis"]
    annotations: Path
    image_root: Path
    output_dir: Path
    split: str = setting(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    geometry: Literal["bbox", "poly", "poly_preferred"] = "bbox"
    poly_multipart: Literal["bbox", "largest", "split"] = "bbox"
    poly_max_points: int | None = setting(None, ge=3)
    drop_crowd: bool = True
    keep_empty: bool = True
    max_objects: int | None = setting(None, ge=0)
    min_pixels: int = setting(4096, ge=1024)
    exif_orientation: Literal["ignore", "apply"] = "ignore"
    skip_bad_images: bool = False
    jpeg_quality: int = setting(95, ge=1, le=100)
    workers: int = setting(8, ge=1)
    limit: int | None = setting(None, ge=1)


@attrs.frozen
class DataConfig:
    """``data``: the JSONL inputs and the coordinate / ordering conventions (data.md §10)."""

    train_jsonl: Path | None = None
    val_jsonl: Path | None = None
    image_root: Path | None = None
    max_pixels: int = setting(786432, ge=1024)
    ordering: Ordering = Ordering.SORTED
    field_order: FieldOrder = FieldOrder.DESC_FIRST
    coord_mode: CoordMode = CoordMode.TOKENS
    train_limit: int | None = setting(None, ge=1)
    val_limit: int | None = setting(None, ge=1)
    check_image_sizes: Literal["eager", "on_load"] = "eager"
    convert: DataConvertConfig | None = None


# --------------------------------------------------------------------------------------------
# prompt (data.md §6.1)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class PromptConfig:
    variant: str = setting("default", nonempty=True)
    system: str | None = setting(None, nonempty=True)
    user: str | None = setting(None, nonempty=True)


# --------------------------------------------------------------------------------------------
# training (data.md §8.1, stage1.md §7-§8, stage2.md §12, infer-eval-config.md §7)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class LoraConfig:
    """``training.lora``: LoRA / DoRA adapters (stage1.md §7.2: production DoRA r16/a32, all linear)."""

    enabled: bool = False
    use_dora: bool = False
    rank: int = setting(16, ge=1)
    alpha: int = setting(32, ge=1)
    dropout: float = setting(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = setting(("all-linear",), nonempty=True)
    modules_to_save: tuple[str, ...] = ()


CoordOffsetDtype = Literal["auto", "bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "single"]


@attrs.frozen
class CoordOffsetConfig:
    """``training.coord_offset``: trainable coord-row offsets of embedding and head (stage1.md §7)."""

    enabled: bool = False
    tie_head: bool = True
    embed_lr: float | None = setting(None, gt=0)
    head_lr: float | None = setting(None, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    dtype: CoordOffsetDtype | None = None


@attrs.frozen
class TrainingConfig:
    """``training``: the typed subset of trainer arguments the project supports."""

    max_steps: int | None = setting(None, ge=1)
    num_train_epochs: float = setting(1.0, gt=0)
    per_device_train_batch_size: int = setting(1, ge=1)
    per_device_eval_batch_size: int = setting(1, ge=1)
    gradient_accumulation_steps: int | None = setting(None, ge=1)
    effective_batch_size: int | None = setting(None, ge=1)
    learning_rate: float = setting(2e-4, gt=0)
    vit_lr: float | None = setting(None, gt=0)
    aligner_lr: float | None = setting(None, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = setting(0.0, ge=0, le=1)
    max_grad_norm: float = setting(1.0, gt=0)
    gradient_checkpointing: bool = False
    freeze_vit: bool = True
    freeze_aligner: bool = True
    freeze_llm: bool = False
    max_length: int = setting(12000, ge=1)
    packing: bool = False
    packing_buffer: int = setting(512, ge=1)
    packing_min_fill_ratio: float = setting(0.65, gt=0, le=1)
    packing_drop_last: bool = False
    eval_packing: bool = False
    post_rollout_pack_scope: Literal["micro", "window"] = "micro"
    dataloader_drop_last: bool = False
    dataloader_num_workers: int = setting(0, ge=0)
    logging_steps: int = setting(10, ge=1)
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = setting(None, ge=1)
    save_strategy: Literal["no", "steps", "epoch", "best"] = "steps"
    save_steps: int = setting(500, ge=1)
    save_total_limit: int | None = setting(None, ge=1)
    save_only_model: bool = False
    metric_for_best_model: str | None = setting(None, nonempty=True)
    greater_is_better: bool | None = None
    resume_from_checkpoint: str | None = setting(None, nonempty=True)
    report_to: tuple[str, ...] = ()
    deepspeed: Path | None = None
    # null: the loss reads the final hidden states and the output embedding (never building full-vocabulary
    # logits) when the model exposes both, else logits; true requires it, false always uses logits (issue 14).
    loss_from_hidden: bool | None = None
    # One forward + backward on the longest pack of the plan before step 1 (peak memory, time); fails with
    # the pack's samples when it does not fit. ``probe_memory_limit_gb``: the budget (null: the device's).
    probe_largest_pack: bool = True
    probe_memory_limit_gb: float | None = setting(None, gt=0)
    lora: LoraConfig = attrs.field(factory=LoraConfig)
    coord_offset: CoordOffsetConfig = attrs.field(factory=CoordOffsetConfig)


# --------------------------------------------------------------------------------------------
# objective (stage1.md §5, §8)
# --------------------------------------------------------------------------------------------

TrainerVariant = Literal["stage1", "stage2_ab", "rollout_matching_sft"]
# One default per knob (issue 10): the loss and monitor defaults are the spec's typed settings in the domain
# (stage1.md §8.1, §5), which validate them; these blocks read them, never restate them.
_LOSS = CoordLossSettings()
_MONITOR = InstabilitySettings()
InstabilityReason = Literal[
    "nonfinite_loss", "nonfinite_logits", "logit_overflow_like", "loss_spike", "zero_token_acc", "low_token_acc"
]


@attrs.frozen
class CoordSoftCEW1Config:
    """``objective.coord_soft_ce_w1``: the distributional coord loss (typed defaults of stage1.md §8.1)."""

    enabled: bool = _LOSS.enabled
    ce_weight: float = setting(_LOSS.ce_weight, ge=0)
    soft_ce_weight: float = setting(_LOSS.soft_ce_weight, ge=0)
    w1_weight: float = setting(_LOSS.w1_weight, ge=0)
    gate_weight: float = setting(_LOSS.gate_weight, ge=0)
    temperature: float = setting(_LOSS.temperature, gt=0)
    target_sigma: float = setting(_LOSS.target_sigma, gt=0)
    target_truncate: int | None = setting(_LOSS.target_truncate, ge=0)


@attrs.frozen
class TokenTypeMetricsConfig:
    enabled: bool = False
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    log_top5: bool = True
    coord_monitor_mass: bool = True
    coord_monitor_mass_max_tokens: int = setting(0, ge=0)


@attrs.frozen
class EarlyStopConfig:
    enabled: bool = _MONITOR.early_stop.enabled
    on_reasons: tuple[InstabilityReason, ...] = _MONITOR.early_stop.on_reasons  # type: ignore[assignment]


@attrs.frozen
class GuardConfig:
    enabled: bool = _MONITOR.guard.enabled
    in_eval: bool = _MONITOR.guard.in_eval


@attrs.frozen
class InstabilityMonitorConfig:
    """``objective.instability_monitor`` (stage1.md §5 table)."""

    enabled: bool = _MONITOR.enabled
    max_meta_samples: int = setting(_MONITOR.max_meta_samples, ge=0)
    ema_decay: float = setting(_MONITOR.ema_decay, ge=0, le=0.9999)
    spike_factor: float = setting(_MONITOR.spike_factor, gt=0)
    abs_loss_threshold: float = setting(_MONITOR.abs_loss_threshold, ge=0)
    min_supervised_tokens: int = setting(_MONITOR.min_supervised_tokens, ge=0)
    min_token_acc: float = setting(_MONITOR.min_token_acc, ge=0, le=1)
    max_abs_logit: float = setting(_MONITOR.max_abs_logit, gt=0)
    detect_nonfinite: bool = _MONITOR.detect_nonfinite
    detect_loss_spike: bool = _MONITOR.detect_loss_spike
    detect_low_acc: bool = _MONITOR.detect_low_acc
    dump_samples: bool = _MONITOR.dump_samples
    dump_dir: Path | None = None
    early_stop: EarlyStopConfig = attrs.field(factory=EarlyStopConfig)
    guard: GuardConfig = attrs.field(factory=GuardConfig)


@attrs.frozen
class ObjectiveConfig:
    trainer_variant: TrainerVariant = "stage1"
    coord_soft_ce_w1: CoordSoftCEW1Config = attrs.field(factory=CoordSoftCEW1Config)
    token_type_metrics: TokenTypeMetricsConfig = attrs.field(factory=TokenTypeMetricsConfig)
    instability_monitor: InstabilityMonitorConfig = attrs.field(factory=InstabilityMonitorConfig)


# --------------------------------------------------------------------------------------------
# stage2_ab (stage2.md §7.5, §10, §13-§15, §20)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ScheduleConfig:
    """``stage2_ab.schedule``: ``b_ratio`` has no default; it MUST be written (stage2.md §14)."""

    b_ratio: float = setting(ge=0, le=1)


@attrs.frozen
class ChannelAConfig:
    n_softctx_iter: int = setting(1, ge=1)  # one teacher-forced forward (stage2.md §13, §20)
    softctx_grad_mode: Literal["unroll", "em_detach"] = "unroll"


@attrs.frozen
class SemanticDescGateConfig:
    enabled: bool = False
    threshold: float = setting(0.5, ge=0, le=1)
    model_path: Path | None = None


@attrs.frozen
class ChannelBAsyncConfig:
    queue_limit: int = setting(8, ge=1)
    version_window: int = setting(2, ge=0)
    sync_every_steps: int = setting(1, ge=1)
    prefetch_target_packs: int = setting(2, ge=1)


@attrs.frozen
class ChannelBConfig:
    mode: Literal["micro", "step", "async"] = "micro"
    desc_ce_weight_matched: float | None = setting(None, ge=0)
    drop_invalid_struct_ce_multiplier: float = setting(1.0, ge=1, le=4)
    reordered_gt_sft: bool = False
    semantic_desc_gate: SemanticDescGateConfig = attrs.field(factory=SemanticDescGateConfig)
    rollouts_per_step: int | None = setting(None, ge=1)
    enable_pipeline: bool = False
    decode_batch_size: int = setting(2, ge=1)
    # `async` is a Python keyword: the attribute is `async_` and the YAML key stays `async`.
    async_: ChannelBAsyncConfig = attrs.field(factory=ChannelBAsyncConfig, metadata={YAML_KEY: "async"})


@attrs.frozen
class Stage2LossesConfig:
    softctx_temperature: float = setting(1.0, gt=0)
    desc_ce_weight: float = setting(1.0, ge=0)
    bbox_smoothl1_weight: float = setting(1.0, ge=0)
    bbox_ciou_weight: float = setting(1.0, ge=0)
    coord_ce_weight: float = setting(0.0, ge=0)
    coord_el1_weight: float = setting(0.0, ge=0)
    coord_ehuber_weight: float = setting(0.0, ge=0)
    coord_entropy_weight: float = 0.0  # signed: + spreads, - sharpens
    coord_huber_delta: float = setting(0.001, ge=1e-6)


@attrs.frozen
class Stage2ABConfig:
    """``stage2_ab``: only with ``objective.trainer_variant: stage2_ab``; ``schedule`` is required."""

    schedule: ScheduleConfig
    channel_a: ChannelAConfig = attrs.field(factory=ChannelAConfig)
    channel_b: ChannelBConfig = attrs.field(factory=ChannelBConfig)
    losses: Stage2LossesConfig = attrs.field(factory=Stage2LossesConfig)
    debug_asserts: bool = False


# --------------------------------------------------------------------------------------------
# matching (stage2.md §6, §11.2, §20)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class MatchingConfig:
    maskiou_gate: float = setting(0.3, ge=0, le=1)
    candidate_top_k: int = setting(5, ge=1)
    maskiou_resolution: int = setting(256, ge=16)
    fp_cost: float = setting(0.5, ge=0)
    fn_cost: float = setting(2.0, ge=0)
    ot_cost: Literal["l1", "l2"] = "l2"
    ot_epsilon: float = setting(10.0, gt=0)
    ot_iters: int = setting(30, ge=1)


# --------------------------------------------------------------------------------------------
# rollout (stage2.md §2.2, §16, §20)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class DecodingConfig:
    temperature: float = setting(0.0, ge=0)
    top_p: float = setting(1.0, gt=0, le=1)
    top_k: int = -1  # -1 = disabled, else >= 1 (checked in validation)


@attrs.frozen
class RepeatTerminateConfig:
    enabled: bool = False
    min_new_tokens: int = setting(256, ge=0)
    max_consecutive_token_repeats: int = setting(64, ge=1)
    ngram_size: int = setting(64, ge=1)
    ngram_repeats: int = setting(2, ge=2)
    max_objects: int | None = setting(None, ge=1)


@attrs.frozen
class LimitMmPerPrompt:
    image: int | None = setting(None, ge=0)
    video: int | None = setting(None, ge=0)


@attrs.frozen
class VllmEngineKwargs:
    """``rollout.vllm.engine_kwargs``: the whitelist of stage2.md §16.2 (any other key is an error)."""

    max_num_batched_tokens: int | None = setting(None, ge=1)
    enable_chunked_prefill: bool | None = None
    disable_chunked_mm_input: bool | None = None
    kv_cache_dtype: str | None = setting(None, nonempty=True)
    cpu_offload_gb: float | None = setting(None, ge=0)
    swap_space: float | None = setting(None, ge=0)
    limit_mm_per_prompt: LimitMmPerPrompt | None = None
    mm_encoder_tp_mode: Literal["weights", "data"] | None = None
    skip_mm_profiling: bool | None = None


@attrs.frozen
class RolloutServerEntry:
    """One ``swift rollout`` server (its data parallelism is internal to it)."""

    base_url: str = setting(pattern=SERVER_URL_PATTERN)
    group_port: int = setting(ge=1, le=65535)


@attrs.frozen
class ServerDebugDumpConfig:
    enabled: bool = False
    every_steps: int = setting(1, ge=1)
    dump_first_step: bool = True
    only_world_process_zero: bool = True
    max_events: int = setting(3, ge=1)
    max_samples: int = setting(1, ge=1)
    max_chars: int = setting(4000, ge=1)


@attrs.frozen
class ServerLaunchConfig:
    """``rollout.vllm.server.launch``: settings of ``application.stage2_server_launch`` (stage2.md §16.4)."""

    server_gpus: tuple[int, ...] = setting((), items=Bound(ge=0))
    train_gpus: tuple[int, ...] = setting((), items=Bound(ge=0))
    server_tp: int = setting(1, ge=1)
    server_dp: int | None = setting(None, ge=1)
    host: str | None = setting(None, nonempty=True)  # null: from servers[0].base_url
    port: int | None = setting(None, ge=1, le=65535)  # null: from servers[0].base_url
    gpu_memory_utilization: float = setting(0.75, gt=0, le=1)
    enforce_eager: bool = True


@attrs.frozen
class VllmServerConfig:
    servers: tuple[RolloutServerEntry, ...] = ()
    timeout_s: float = setting(240.0, gt=0)
    infer_timeout_s: float | None = None  # null or <= 0: no HTTP timeout on /infer/
    api_key_env: str | None = setting(None, nonempty=True)  # the variable holding the bearer key (§16.3.2)
    debug_dump: ServerDebugDumpConfig = attrs.field(factory=ServerDebugDumpConfig)
    launch: ServerLaunchConfig = attrs.field(factory=ServerLaunchConfig)


@attrs.frozen
class WeightSyncConfig:
    mode: Literal["full", "adapter", "auto"] = "full"
    fallback_to_full: bool = True
    bucket_size_mib: int = setting(512, ge=1)


@attrs.frozen
class VllmRolloutConfig:
    mode: Literal["colocate", "server"] = "colocate"
    tensor_parallel_size: int = setting(1, ge=1)
    gpu_memory_utilization: float = setting(0.45, gt=0, le=1)
    max_model_len: int | None = setting(None, ge=1)
    max_num_seqs: int = setting(256, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    enable_lora: bool = False
    load_format: Literal["auto", "dummy"] | None = None  # null: dummy when weights are pushed, auto with LoRA
    sleep_level: int | None = setting(None, ge=0, le=2)
    engine_kwargs: VllmEngineKwargs = attrs.field(factory=VllmEngineKwargs)
    server: VllmServerConfig = attrs.field(factory=VllmServerConfig)
    sync: WeightSyncConfig = attrs.field(factory=WeightSyncConfig)


@attrs.frozen
class OffloadConfig:
    enabled: bool = False
    offload_model: bool = False
    offload_optimizer: bool = False


@attrs.frozen
class DescMonitorConfig:
    enabled: bool = False
    mode: Literal["semantic", "exact", "both"] = "exact"
    every_steps: int | None = setting(None, ge=1)  # null: training.logging_steps
    model_path: Path | None = None
    threshold: float = setting(0.6, ge=0, le=1)
    device: str = setting("cpu", pattern=DEVICE_PATTERN)
    batch_size: int = setting(64, ge=1)
    max_length: int = setting(64, ge=1)
    max_pairs: int = setting(64, ge=1)


@attrs.frozen
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    decode_mode: Literal["greedy", "beam"] = "greedy"
    max_new_tokens: int = setting(512, ge=1)
    num_beams: int = setting(1, ge=1)
    num_return_sequences: int | None = setting(None, ge=1)  # null: num_beams
    decoding: DecodingConfig = attrs.field(factory=DecodingConfig)
    repetition_penalty: float = setting(1.0, gt=0)
    repeat_terminate: RepeatTerminateConfig = attrs.field(factory=RepeatTerminateConfig)
    generate_batch_size: int = setting(1, ge=1)
    hf_batch_size: int | None = setting(None, ge=1)  # null: generate_batch_size
    infer_batch_size: int | None = None  # null: generate_batch_size; <= 0: all at once
    vllm: VllmRolloutConfig = attrs.field(factory=VllmRolloutConfig)
    offload: OffloadConfig = attrs.field(factory=OffloadConfig)
    desc_monitor: DescMonitorConfig = attrs.field(factory=DescMonitorConfig)


# --------------------------------------------------------------------------------------------
# stages / infer / eval / vis (infer-eval-config.md §2.1, §4.6, §5)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class StagesConfig:
    """``stages``: all three keys are required (infer-eval-config.md §2.1)."""

    infer: bool
    eval: bool
    vis: bool


@attrs.frozen
class GenerationConfig:
    temperature: float = setting(0.01, ge=0)
    top_p: float = setting(0.95, gt=0, le=1)
    max_new_tokens: int = setting(1024, ge=1)
    repetition_penalty: float = setting(1.05, gt=0)
    batch_size: int = setting(1, ge=1)


@attrs.frozen
class InferVllmLaunchConfig:
    tensor_parallel_size: int = setting(1, ge=1)
    data_parallel_size: int = setting(1, ge=1)
    gpu_memory_utilization: float = setting(0.9, gt=0, le=1)
    max_model_len: int | None = setting(None, ge=1)
    max_num_batched_tokens: int | None = setting(None, ge=1)
    max_num_seqs: int | None = setting(None, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    startup_timeout_s: float = setting(120.0, gt=0)


@attrs.frozen
class InferVllmConfig:
    mode: Literal["local", "server"] = "server"
    base_url: str | None = setting(None, pattern=BASE_URL_PATTERN)
    served_model_name: str | None = setting(None, nonempty=True)  # null: model.path
    request_timeout_s: float = setting(180.0, gt=0)
    preflight_timeout_s: float = setting(3.0, gt=0)
    client_concurrency: int | None = setting(None, ge=1)  # null: generation.batch_size
    auto_launch: bool = True
    # Run Python shipped inside model.path (vLLM's trust_remote_code / --trust-remote-code); off unless asked.
    trust_remote_code: bool = False
    launch: InferVllmLaunchConfig = attrs.field(factory=InferVllmLaunchConfig)


@attrs.frozen
class InferConfig:
    backend: Literal["hf", "vllm"] = "hf"
    device: str = setting("auto", pattern=DEVICE_PATTERN)
    gt_vs_pred_jsonl: Path | None = None  # null: <run_dir>/gt_vs_pred.jsonl
    summary_json: Path | None = None  # null: <run_dir>/summary.json
    on_generation_error: Literal["raise", "record"] = "raise"
    generation: GenerationConfig = attrs.field(factory=GenerationConfig)
    vllm: InferVllmConfig = attrs.field(factory=InferVllmConfig)


@attrs.frozen
class SemanticConfig:
    enabled: bool = True
    model_path: Path | None = None  # null: semantic step off
    threshold: float = setting(0.6, ge=0, le=1)
    device: str = setting("auto", pattern=DEVICE_PATTERN)
    batch_size: int = setting(64, ge=1)


@attrs.frozen
class EvalConfig:
    metrics: Literal["coco", "f1ish", "both"] = "both"
    output_dir: Path | None = None  # null: <run_dir>/eval
    coco_backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval"
    # lvis: federated AP (APr/APc/APf, AR@300) against an LVIS-format eval.coco_gt_json (docs/evaluation.md)
    dataset_style: Literal["coco", "lvis"] = "coco"
    lvis_backend: Literal["faster_coco_eval", "lvis"] = "faster_coco_eval"
    coco_gt_json: Path | None = None
    coco_results_json: Path | None = None
    use_segm: bool = True
    iou_thrs: tuple[float, ...] | None = setting(None, items=Bound(gt=0, le=1))  # null: 0.50:0.05:0.95
    score_mode: Literal["token_prob", "constant"] = "token_prob"
    f1ish_iou_thrs: tuple[float, ...] = setting((0.3, 0.5), items=Bound(gt=0, le=1), nonempty=True)
    f1ish_pred_scope: Literal["annotated", "all"] = "annotated"
    semantic: SemanticConfig = attrs.field(factory=SemanticConfig)
    num_workers: int = setting(0, ge=0)
    overlay: bool = False
    overlay_k: int = setting(12, ge=1)


@attrs.frozen
class VisConfig:
    output_dir: Path | None = None  # null: <run_dir>/vis
    limit: int | None = setting(20, ge=1)  # null: all records


# --------------------------------------------------------------------------------------------
# root
# --------------------------------------------------------------------------------------------


@attrs.frozen
class CoordExpConfig:
    """The root: the D13a blocks. Blocks without defaults (or with required keys) are None when absent."""

    run: RunConfig | None = None
    model: ModelConfig | None = None
    data: DataConfig = attrs.field(factory=DataConfig)
    prompt: PromptConfig = attrs.field(factory=PromptConfig)
    training: TrainingConfig = attrs.field(factory=TrainingConfig)
    objective: ObjectiveConfig = attrs.field(factory=ObjectiveConfig)
    stage2_ab: Stage2ABConfig | None = None
    matching: MatchingConfig = attrs.field(factory=MatchingConfig)
    rollout: RolloutConfig | None = None
    stages: StagesConfig | None = None
    infer: InferConfig = attrs.field(factory=InferConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    vis: VisConfig = attrs.field(factory=VisConfig)


TOP_LEVEL_BLOCKS: tuple[str, ...] = (
    "extends",
    "run",
    "model",
    "data",
    "prompt",
    "training",
    "objective",
    "stage2_ab",
    "matching",
    "rollout",
    "stages",
    "infer",
    "eval",
    "vis",
)



def yaml_key(field: "attrs.Attribute[Any]") -> str:
    """The key a YAML file uses for this attribute."""
    return str(field.metadata.get(YAML_KEY, field.name))
