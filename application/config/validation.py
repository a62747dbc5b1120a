"""Rules over a structured config: ranges and patterns from the schema metadata, cross-field rules,
the keys each entry point needs, inert-key warnings and (on request) local path checks.

Every problem names the full dotted key and, when known, the file that set it. Rules come from
data.md §4.7, §8.1; stage1.md §6.1; stage2.md §15, §16, §20, §21; infer-eval-config.md §2.1, §4.3,
§4.4, §5, §7.4.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from application.config import schema
from application.config.keys import EntryPoint, path_sort_key, source_of
from domain.errors import ConfigError
from domain.objects import CoordMode
from domain.prompts import registered_variants

_PATTERN_MEANINGS = {
    schema.DEVICE_PATTERN: "one of auto, cpu, cuda, cuda:N",
    schema.BASE_URL_PATTERN: "of the form http(s)://host:port or http(s)://host:port/v1",
    schema.SERVER_URL_PATTERN: "of the form http(s)://host:port",
}

_STAGE2_VARIANTS = ("stage2_ab", "rollout_matching_sft")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


class _Problems:
    """Collects ``(dotted path, message)`` pairs; messages get the source file of their key."""

    def __init__(self, sources: Mapping[str, Path]) -> None:
        self.sources = sources
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        src = source_of(self.sources, path)
        suffix = f" (from {src})" if src is not None else ""
        self.items.append((path, f"'{path}' {message}{suffix}"))

    def sorted_messages(self) -> list[str]:
        def key(item: tuple[str, str]) -> Any:
            return (path_sort_key(_split(item[0])), item[1])

        return [message for _, message in sorted(self.items, key=key)]


def _split(path: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    for piece in path.split("."):
        name, _, rest = piece.partition("[")
        if name:
            parts.append(name)
        for index in rest.split("[") if rest else []:
            parts.append(int(index.rstrip("]")))
    return tuple(parts)


# --------------------------------------------------------------------------------------------
# Ranges, patterns, non-empty values (schema metadata)
# --------------------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_user_info(url: str) -> bool:
    """Whether the authority of ``url`` (between ``//`` and the next ``/``, ``?`` or ``#``) holds an ``@``."""
    authority = url.partition("//")[2]
    for stop in "/?#":
        authority = authority.partition(stop)[0]
    return "@" in authority


def _check_metadata(obj: Any, prefix: str, out: _Problems) -> None:
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        path = _join(prefix, schema.yaml_key(field))
        if value is None:
            continue
        bound = field.metadata.get(schema.BOUND_KEY)
        if bound is not None and _number(value) and not bound.holds(value):
            out.add(path, f"must be {bound.describe()}, got {value!r}")
        item_bound = field.metadata.get(schema.ITEM_BOUND_KEY)
        if item_bound is not None and isinstance(value, tuple):
            for index, item in enumerate(value):
                if _number(item) and not item_bound.holds(item):
                    out.add(f"{path}[{index}]", f"must be {item_bound.describe()}, got {item!r}")
        pattern = field.metadata.get(schema.PATTERN_KEY)
        if pattern is not None and isinstance(value, str) and pattern.pattern in schema.URL_PATTERNS and _has_user_info(value):
            # The value is not echoed: it may hold a password, and error text ends up in logs.
            out.add(
                path,
                "carries user info ('user:password@' before the host), which is refused (stage2.md §16.3.2): "
                "write the URL as http(s)://host:port and keep credentials out of the config",
            )
        elif pattern is not None and isinstance(value, str) and not pattern.match(value):
            meaning = _PATTERN_MEANINGS.get(pattern.pattern, f"matching {pattern.pattern}")
            out.add(path, f"must be {meaning}, got {value!r}")
        if field.metadata.get(schema.NONEMPTY_KEY):
            if isinstance(value, str) and not value.strip():
                out.add(path, "must be a non-empty string")
            elif isinstance(value, tuple) and not value:
                out.add(path, "must not be an empty list")
        if attrs.has(type(value)):
            _check_metadata(value, path, out)
        elif isinstance(value, tuple):
            for index, item in enumerate(value):
                if attrs.has(type(item)):
                    _check_metadata(item, f"{path}[{index}]", out)


# --------------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------------


def _model_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    model = cfg.model
    if model is None:
        return
    if model.path is not None and model.tiny is not None:
        out.add("model.tiny", "and 'model.path' are mutually exclusive: set exactly one of them")
    tiny = model.tiny
    if tiny is None:
        return
    text, vision = tiny.text, tiny.vision
    if text.head_dim % 2 or sum(text.mrope_section) != text.head_dim // 2:
        out.add(
            "model.tiny.text.mrope_section",
            f"must sum to model.tiny.text.head_dim / 2 = {text.head_dim / 2:g}, got sum {sum(text.mrope_section)}",
        )
    if text.num_attention_heads % text.num_key_value_heads:
        out.add(
            "model.tiny.text.num_key_value_heads",
            f"must divide model.tiny.text.num_attention_heads ({text.num_attention_heads}), "
            f"got {text.num_key_value_heads}",
        )
    if vision.hidden_size % vision.num_heads:
        out.add("model.tiny.vision.num_heads", f"must divide model.tiny.vision.hidden_size ({vision.hidden_size})")
    if vision.patch_size * vision.spatial_merge_size != 32:
        out.add(
            "model.tiny.vision.patch_size",
            f"times model.tiny.vision.spatial_merge_size must be 32 (images are multiples of 32, D5), "
            f"got {vision.patch_size} * {vision.spatial_merge_size}",
        )
    root = math.isqrt(vision.num_position_embeddings)
    if root * root != vision.num_position_embeddings:
        out.add(
            "model.tiny.vision.num_position_embeddings",
            f"must be a perfect square, got {vision.num_position_embeddings}",
        )
    indexes = vision.deepstack_visual_indexes
    if len(set(indexes)) != len(indexes) or any(i >= vision.depth for i in indexes):
        out.add(
            "model.tiny.vision.deepstack_visual_indexes",
            f"must be distinct layer indices below model.tiny.vision.depth ({vision.depth}), got {list(indexes)}",
        )


def _data_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    convert = cfg.data.convert
    if convert is not None and convert.min_pixels > cfg.data.max_pixels:
        out.add(
            "data.convert.min_pixels",
            f"must not exceed data.max_pixels ({cfg.data.max_pixels}), got {convert.min_pixels}",
        )
    variants = registered_variants()
    if cfg.prompt.variant not in variants:
        out.add("prompt.variant", f"must be a registered prompt variant {list(variants)}, got {cfg.prompt.variant!r}")


def _training_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    training = cfg.training
    if training.packing and training.per_device_train_batch_size != 1:
        out.add(
            "training.per_device_train_batch_size",
            f"must be 1 with 'training.packing: true' (a pack is one batch row), "
            f"got {training.per_device_train_batch_size}",
        )
    if training.effective_batch_size is not None and training.gradient_accumulation_steps is not None:
        out.add(
            "training.effective_batch_size",
            "and 'training.gradient_accumulation_steps' are both set; set only one "
            "(gradient_accumulation_steps is derived from effective_batch_size)",
        )
    if training.save_strategy == "best" and training.metric_for_best_model is None:
        out.add("training.metric_for_best_model", "is required with 'training.save_strategy: best'")
    if training.lora.enabled and training.freeze_vit and training.freeze_aligner and training.freeze_llm:
        out.add(
            "training.lora.enabled",
            "is true but 'training.freeze_vit', 'training.freeze_aligner' and 'training.freeze_llm' are all true: "
            "LoRA never targets a frozen part, so nothing would be adapted; unfreeze a part or disable LoRA",
        )


def _objective_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    objective = cfg.objective
    coord = objective.coord_soft_ce_w1
    weights = (coord.ce_weight, coord.soft_ce_weight, coord.w1_weight, coord.gate_weight)
    if coord.enabled and all(w == 0 for w in weights):
        out.add(
            "objective.coord_soft_ce_w1.enabled",
            "is true but ce_weight, soft_ce_weight, w1_weight and gate_weight are all 0",
        )
    if coord.enabled and cfg.data.coord_mode is CoordMode.NUMERIC:
        out.add(
            "objective.coord_soft_ce_w1.enabled",
            "cannot be true with 'data.coord_mode: numeric' (numeric coordinates have no coord-token slots)",
        )
    variant = objective.trainer_variant
    if cfg.stage2_ab is not None and variant != "stage2_ab":
        out.add(
            "stage2_ab",
            f"block is only valid with 'objective.trainer_variant: stage2_ab', got {variant!r}",
        )
    if variant == "stage2_ab" and cfg.stage2_ab is None:
        out.add(
            "objective.trainer_variant",
            "is 'stage2_ab' but there is no 'stage2_ab' block (it needs at least 'stage2_ab.schedule.b_ratio')",
        )
    if variant in _STAGE2_VARIANTS:
        if cfg.rollout is None:
            out.add("objective.trainer_variant", f"is {variant!r} but there is no 'rollout' block")
        if cfg.data.coord_mode is CoordMode.NUMERIC:
            out.add("data.coord_mode", f"must be 'tokens' with 'objective.trainer_variant: {variant}'")
        if cfg.training.packing and not cfg.training.packing_drop_last:
            out.add(
                "training.packing_drop_last",
                f"must be true with 'training.packing: true' under '{variant}' (post-rollout packing)",
            )


def _stage2_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    stage2 = cfg.stage2_ab
    if stage2 is None:
        return
    channel_b = stage2.channel_b
    rollout = cfg.rollout or schema.RolloutConfig()
    server_mode = rollout.backend == "vllm" and rollout.vllm.mode == "server"
    if channel_b.mode == "step" and not cfg.training.packing:
        out.add("stage2_ab.channel_b.mode", "'step' requires 'training.packing: true'")
    if channel_b.enable_pipeline:
        if channel_b.mode != "step":
            out.add("stage2_ab.channel_b.enable_pipeline", "is only valid with 'stage2_ab.channel_b.mode: step'")
        if not server_mode:
            out.add(
                "stage2_ab.channel_b.enable_pipeline",
                "requires the vLLM server backend ('rollout.backend: vllm', 'rollout.vllm.mode: server')",
            )
    if channel_b.mode == "async":
        need = []
        if not server_mode:
            need.append("rollout.backend: vllm with rollout.vllm.mode: server")
        if rollout.vllm.sync.mode != "full":
            need.append("rollout.vllm.sync.mode: full")
        if not cfg.training.packing:
            need.append("training.packing: true")
        if cfg.training.post_rollout_pack_scope != "window":
            need.append("training.post_rollout_pack_scope: window")
        if need:
            out.add("stage2_ab.channel_b.mode", f"'async' requires {', '.join(need)}")
        queue = channel_b.async_
        if queue.prefetch_target_packs > queue.queue_limit:
            out.add(
                "stage2_ab.channel_b.async.prefetch_target_packs",
                f"must be <= stage2_ab.channel_b.async.queue_limit ({queue.queue_limit}), "
                f"got {queue.prefetch_target_packs}",
            )
        gas = cfg.training.gradient_accumulation_steps
        if gas is not None and gas > queue.prefetch_target_packs:
            out.add(
                "stage2_ab.channel_b.async.prefetch_target_packs",
                f"must be >= training.gradient_accumulation_steps ({gas}), got {queue.prefetch_target_packs}",
            )
    gate = channel_b.semantic_desc_gate
    if gate.enabled:
        if not channel_b.reordered_gt_sft:
            out.add(
                "stage2_ab.channel_b.semantic_desc_gate.enabled",
                "requires 'stage2_ab.channel_b.reordered_gt_sft: true'",
            )
        if gate.model_path is None:
            out.add(
                "stage2_ab.channel_b.semantic_desc_gate.model_path",
                "is required when the semantic desc gate is enabled (a local sentence-transformers directory)",
            )


def _rollout_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    rollout = cfg.rollout
    if rollout is None:
        return
    vllm = rollout.vllm
    if rollout.decoding.top_k != -1 and rollout.decoding.top_k < 1:
        out.add("rollout.decoding.top_k", f"must be -1 (disabled) or >= 1, got {rollout.decoding.top_k}")
    if rollout.num_return_sequences is not None and rollout.num_return_sequences > rollout.num_beams:
        out.add(
            "rollout.num_return_sequences",
            f"must be <= rollout.num_beams ({rollout.num_beams}), got {rollout.num_return_sequences}",
        )
    if rollout.backend == "vllm" and rollout.decode_mode == "beam":
        out.add("rollout.decode_mode", "'beam' is not available with 'rollout.backend: vllm' (use 'greedy')")
    colocate = rollout.backend == "vllm" and vllm.mode == "colocate"
    server = rollout.backend == "vllm" and vllm.mode == "server"
    if colocate and vllm.max_model_len is None:
        out.add("rollout.vllm.max_model_len", "is required with 'rollout.vllm.mode: colocate'")
    if server:
        if not vllm.server.servers:
            out.add(
                "rollout.vllm.server.servers",
                "must list at least one server ({base_url, group_port}) with 'rollout.vllm.mode: server'",
            )
        urls = [s.base_url.rstrip("/") for s in vllm.server.servers]
        for index, url in enumerate(urls):
            if url in urls[:index]:
                out.add(f"rollout.vllm.server.servers[{index}].base_url", f"repeats {url!r}; base URLs must be unique")
    if rollout.offload.enabled:
        if not colocate:
            out.add(
                "rollout.offload.enabled",
                "requires 'rollout.backend: vllm' with 'rollout.vllm.mode: colocate' (not server mode)",
            )
        if cfg.training.deepspeed is not None:
            out.add("rollout.offload.enabled", "cannot be combined with 'training.deepspeed'")
    if rollout.repeat_terminate.enabled and colocate:
        out.add(
            "rollout.repeat_terminate.enabled",
            "is not available with 'rollout.vllm.mode: colocate' (use the HF backend or server mode)",
        )
    monitor = rollout.desc_monitor
    if monitor.enabled and monitor.mode in ("semantic", "both") and monitor.model_path is None:
        out.add("rollout.desc_monitor.model_path", f"is required with 'rollout.desc_monitor.mode: {monitor.mode}'")
    launch = vllm.server.launch
    shared = sorted(set(launch.server_gpus) & set(launch.train_gpus))
    if shared:
        out.add(
            "rollout.vllm.server.launch.train_gpus",
            f"must not share GPUs with rollout.vllm.server.launch.server_gpus; shared: {shared}",
        )


def _pipeline_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    stages = cfg.stages
    if stages is not None and not (stages.infer or stages.eval or stages.vis):
        out.add("stages", "has infer, eval and vis all false; enable at least one stage")
    infer = cfg.infer
    vllm = infer.vllm
    if vllm.client_concurrency is not None and vllm.client_concurrency > infer.generation.batch_size:
        out.add(
            "infer.vllm.client_concurrency",
            f"must be in [1, infer.generation.batch_size = {infer.generation.batch_size}], "
            f"got {vllm.client_concurrency}",
        )
    if infer.backend == "vllm" and vllm.mode == "server" and vllm.base_url is None and not vllm.auto_launch:
        out.add(
            "infer.vllm.base_url",
            "is required in server mode when 'infer.vllm.auto_launch' is false",
        )
    thrs = cfg.eval.iou_thrs
    if thrs is not None:
        if any(b <= a for a, b in itertools.pairwise(thrs)):
            out.add("eval.iou_thrs", f"must be strictly increasing, got {list(thrs)}")
        missing = [t for t in (0.5, 0.75) if t not in thrs]
        if missing:
            out.add("eval.iou_thrs", f"must contain 0.5 and 0.75 (AP50 / AP75), missing {missing}")
    f1 = cfg.eval.f1ish_iou_thrs
    if len(set(f1)) != len(f1):
        out.add("eval.f1ish_iou_thrs", f"must not repeat a threshold, got {list(f1)}")
    if cfg.eval.coco_results_json is not None and cfg.eval.coco_gt_json is None:
        out.add("eval.coco_gt_json", "is required with 'eval.coco_results_json'")


def _run_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    run = cfg.run
    if run is not None and run.name is not None and ("/" in run.name or "\\" in run.name or run.name in (".", "..")):
        out.add("run.name", f"must be a single directory name (run_dir = run.output_dir / run.name), got {run.name!r}")


def _config_rules(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    _check_metadata(cfg, "", out)
    for rule in (
        _run_rules,
        _model_rules,
        _data_rules,
        _training_rules,
        _objective_rules,
        _stage2_rules,
        _rollout_rules,
        _pipeline_rules,
    ):
        rule(cfg, out)


def config_problems(cfg: schema.CoordExpConfig, sources: Mapping[str, Path] | None = None) -> list[str]:
    """Range and cross-field problems of a structured config (independent of the entry point)."""
    out = _Problems(sources or {})
    _config_rules(cfg, out)
    return out.sorted_messages()


def validation_problems(
    cfg: schema.CoordExpConfig, sources: Mapping[str, Path] | None = None, entry_point: EntryPoint | None = None
) -> list[str]:
    """Every range, cross-field and (with ``entry_point``) entry-point problem, sorted by dotted path."""
    out = _Problems(sources or {})
    _config_rules(cfg, out)
    if entry_point is not None:
        _entry_point_rules(cfg, entry_point, out)
    return out.sorted_messages()


# --------------------------------------------------------------------------------------------
# What each entry point needs
# --------------------------------------------------------------------------------------------


def _require_run(cfg: schema.CoordExpConfig, entry: str, out: _Problems) -> None:
    run = cfg.run
    for key in ("name", "output_dir"):
        if run is None or getattr(run, key) is None:
            out.add(f"run.{key}", f"is required by application.{entry}")


def _require_model(cfg: schema.CoordExpConfig, entry: str, out: _Problems, *, allow_tiny: bool = True) -> None:
    model = cfg.model
    if model is None or (model.path is None and model.tiny is None):
        what = "'model.path' or 'model.tiny'" if allow_tiny else "'model.path'"
        out.add("model", f"needs {what} for application.{entry}")
    elif not allow_tiny and model.path is None:
        out.add("model.path", f"is required by application.{entry} (the embedded tiny model cannot be served)")


def entry_point_problems(
    cfg: schema.CoordExpConfig, entry_point: EntryPoint, sources: Mapping[str, Path] | None = None
) -> list[str]:
    """The blocks and keys ``application.<entry_point>`` needs (infer-eval-config.md §1.3, §2.1; stage2.md §16.4)."""
    out = _Problems(sources or {})
    _entry_point_rules(cfg, entry_point, out)
    return out.sorted_messages()


def _entry_point_rules(cfg: schema.CoordExpConfig, entry_point: EntryPoint, out: _Problems) -> None:
    if entry_point in ("train", "stage2_server_launch"):
        _require_run(cfg, entry_point, out)
        _require_model(cfg, entry_point, out, allow_tiny=entry_point == "train")
        if cfg.data.train_jsonl is None:
            out.add("data.train_jsonl", f"is required by application.{entry_point}")
        if cfg.training.eval_strategy != "no" and cfg.data.val_jsonl is None:
            out.add("data.val_jsonl", f"is required with 'training.eval_strategy: {cfg.training.eval_strategy}'")
    if entry_point == "stage2_server_launch":
        _server_launch_needs(cfg, out)
    if entry_point == "infer":
        _require_run(cfg, entry_point, out)
        if cfg.stages is None:
            out.add("stages", "block is required by application.infer ({infer, eval, vis}, all three keys)")
        elif cfg.stages.infer:
            _require_model(cfg, entry_point, out)
            if cfg.data.val_jsonl is None:
                out.add("data.val_jsonl", "is required when 'stages.infer' is true (the inference input)")
    if entry_point == "evaluate":
        has_paths = cfg.eval.output_dir is not None and (
            cfg.infer.gt_vs_pred_jsonl is not None or cfg.eval.coco_results_json is not None
        )
        if not has_paths:
            _require_run(cfg, entry_point, out)
    if entry_point == "visualize" and (cfg.vis.output_dir is None or cfg.infer.gt_vs_pred_jsonl is None):
        _require_run(cfg, entry_point, out)
    if entry_point == "prepare_data" and cfg.data.convert is None:
        out.add("data.convert", "block is required by application.prepare_data (data.md §9.2)")
    if entry_point in ("expand_vocab", "merge_adapter"):
        _require_run(cfg, entry_point, out)
        _require_model(cfg, entry_point, out)


def _server_launch_needs(cfg: schema.CoordExpConfig, out: _Problems) -> None:
    rollout = cfg.rollout
    if rollout is None or rollout.backend != "vllm" or rollout.vllm.mode != "server":
        out.add("rollout.vllm.mode", "must be 'server' with 'rollout.backend: vllm' for application.stage2_server_launch")
        return
    launch = rollout.vllm.server.launch
    if not launch.server_gpus:
        out.add("rollout.vllm.server.launch.server_gpus", "must list the rollout server GPUs")
    if not launch.train_gpus:
        out.add("rollout.vllm.server.launch.train_gpus", "must list the learner GPUs")
    count = len(launch.server_gpus)
    if launch.server_dp is None and count % launch.server_tp:
        out.add(
            "rollout.vllm.server.launch.server_tp",
            f"must divide the number of server GPUs ({count}), got {launch.server_tp}",
        )
    if launch.server_dp is not None and launch.server_dp * launch.server_tp != count:
        out.add(
            "rollout.vllm.server.launch.server_dp",
            f"times server_tp ({launch.server_tp}) must equal the number of server GPUs ({count}), "
            f"got {launch.server_dp}",
        )


# --------------------------------------------------------------------------------------------
# Inert keys (§1.4.8): one warning listing keys that differ from their defaults but do nothing
# --------------------------------------------------------------------------------------------


def _changed(obj: Any, default: Any, prefix: str) -> list[str]:
    if not (attrs.has(type(obj)) and type(obj) is type(default)):
        return [] if obj == default else [prefix]
    out: list[str] = []
    for field in attrs.fields(type(obj)):
        out += _changed(getattr(obj, field.name), getattr(default, field.name), _join(prefix, schema.yaml_key(field)))
    return out


def _changed_except(obj: Any, prefix: str, keep: Iterable[str]) -> list[str]:
    keep_paths = {_join(prefix, k) for k in keep}
    return [p for p in _changed(obj, type(obj)(), prefix) if p not in keep_paths]


def inert_key_warnings(cfg: schema.CoordExpConfig) -> list[str]:
    """At most one warning naming the non-default keys that the selected modes ignore."""
    inert: list[tuple[str, str]] = []

    def note(paths: Iterable[str], reason: str) -> None:
        inert.extend((p, reason) for p in paths)

    infer = cfg.infer
    if infer.backend == "hf":
        note(_changed(infer.vllm, schema.InferVllmConfig(), "infer.vllm"), "infer.backend is 'hf'")
    elif infer.device != "auto":
        note(["infer.device"], "infer.backend is 'vllm'")
    rollout = cfg.rollout
    if rollout is not None:
        if rollout.backend == "hf":
            note(_changed(rollout.vllm, schema.VllmRolloutConfig(), "rollout.vllm"), "rollout.backend is 'hf'")
        elif rollout.vllm.mode == "colocate":
            note(
                _changed(rollout.vllm.server, schema.VllmServerConfig(), "rollout.vllm.server"),
                "rollout.vllm.mode is 'colocate'",
            )
        if not rollout.repeat_terminate.enabled:
            note(
                _changed_except(rollout.repeat_terminate, "rollout.repeat_terminate", ["enabled"]),
                "rollout.repeat_terminate.enabled is false",
            )
        if not rollout.desc_monitor.enabled:
            note(
                _changed_except(rollout.desc_monitor, "rollout.desc_monitor", ["enabled"]),
                "rollout.desc_monitor.enabled is false",
            )
    if cfg.stage2_ab is not None:
        channel_b = cfg.stage2_ab.channel_b
        if channel_b.mode != "async":
            note(
                _changed(channel_b.async_, schema.ChannelBAsyncConfig(), "stage2_ab.channel_b.async"),
                "stage2_ab.channel_b.mode is not 'async'",
            )
        if channel_b.mode != "step":
            stepped = ["rollouts_per_step", "decode_batch_size"]
            default_b = schema.ChannelBConfig()
            note(
                [f"stage2_ab.channel_b.{k}" for k in stepped if getattr(channel_b, k) != getattr(default_b, k)],
                "stage2_ab.channel_b.mode is not 'step'",
            )
        if not channel_b.reordered_gt_sft and channel_b.desc_ce_weight_matched is not None:
            note(["stage2_ab.channel_b.desc_ce_weight_matched"], "stage2_ab.channel_b.reordered_gt_sft is false")
    training = cfg.training
    offset = training.coord_offset
    if not offset.enabled:
        note(_changed_except(offset, "training.coord_offset", ["enabled"]), "training.coord_offset.enabled is false")
    elif offset.tie_head and offset.head_lr is not None:
        note(["training.coord_offset.head_lr"], "training.coord_offset.tie_head is true (one shared offset table)")
    if not training.lora.enabled:
        note(_changed_except(training.lora, "training.lora", ["enabled"]), "training.lora.enabled is false")
    monitor = cfg.objective.instability_monitor
    if not monitor.enabled:
        note(
            _changed_except(monitor, "objective.instability_monitor", ["enabled"]),
            "objective.instability_monitor.enabled is false",
        )
    if cfg.objective.trainer_variant == "stage2_ab":
        note(
            _changed(cfg.objective.coord_soft_ce_w1, schema.CoordSoftCEW1Config(), "objective.coord_soft_ce_w1"),
            "objective.trainer_variant is 'stage2_ab' (its losses are stage2_ab.losses)",
        )
    semantic = cfg.eval.semantic
    if not semantic.enabled:
        note(_changed_except(semantic, "eval.semantic", ["enabled"]), "eval.semantic.enabled is false")
    if not inert:
        return []
    listed = "; ".join(f"{path} ({reason})" for path, reason in inert)
    return [f"Config keys set but inert with the selected settings: {listed}"]


# --------------------------------------------------------------------------------------------
# Local paths (called by entry points after loading, before any model or data is touched)
# --------------------------------------------------------------------------------------------


def check_local_paths(cfg: schema.CoordExpConfig, entry_point: EntryPoint, *, root: Path | None = None) -> None:
    """Raise :class:`ConfigError` for configured local inputs that do not exist.

    Relative paths resolve against ``root`` (default: the current working directory, the repository
    root). Only existence is checked: no file is opened.
    """
    base = Path.cwd() if root is None else root
    problems: list[str] = []

    def need(key: str, path: Path | None, kind: str) -> None:
        if path is None:
            return
        full = path if path.is_absolute() else base / path
        ok = full.is_dir() if kind == "dir" else full.is_file()
        if not ok:
            what = "an existing local directory" if kind == "dir" else "an existing file"
            problems.append(f"'{key}' must be {what}: {full} not found")

    model_path = cfg.model.path if cfg.model is not None else None
    data = cfg.data
    if entry_point in ("train", "stage2_server_launch"):
        need("model.path", model_path, "dir")
        need("data.train_jsonl", data.train_jsonl, "file")
        need("data.val_jsonl", data.val_jsonl, "file")
        need("data.image_root", data.image_root, "dir")
        need("training.deepspeed", cfg.training.deepspeed, "file")
        if cfg.stage2_ab is not None and cfg.stage2_ab.channel_b.semantic_desc_gate.enabled:
            need(
                "stage2_ab.channel_b.semantic_desc_gate.model_path",
                cfg.stage2_ab.channel_b.semantic_desc_gate.model_path,
                "dir",
            )
        if cfg.rollout is not None and cfg.rollout.desc_monitor.enabled:
            need("rollout.desc_monitor.model_path", cfg.rollout.desc_monitor.model_path, "dir")
    if entry_point == "infer" and cfg.stages is not None and cfg.stages.infer:
        need("model.path", model_path, "dir")
        need("data.val_jsonl", data.val_jsonl, "file")
        need("data.image_root", data.image_root, "dir")
    if entry_point == "evaluate" or (entry_point == "infer" and cfg.stages is not None and cfg.stages.eval):
        if cfg.eval.semantic.enabled:
            need("eval.semantic.model_path", cfg.eval.semantic.model_path, "dir")
        need("eval.coco_gt_json", cfg.eval.coco_gt_json, "file")
        need("eval.coco_results_json", cfg.eval.coco_results_json, "file")
    if entry_point == "prepare_data" and data.convert is not None:
        need("data.convert.annotations", data.convert.annotations, "file")
        need("data.convert.image_root", data.convert.image_root, "dir")
    if entry_point in ("expand_vocab", "merge_adapter"):
        need("model.path", model_path, "dir")
    if problems:
        raise ConfigError(problems)
