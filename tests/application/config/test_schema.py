"""Schema: defaults equal the spec tables; the migration table and the schema agree."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from application.config import KEY_MIGRATIONS, config_problems, is_secret_key, structure_config
from application.config.loader import SCHEMA_PATHS
from application.config.migrations import normalize_path
from application.config.schema import (
    TOP_LEVEL_BLOCKS,
    CoordExpConfig,
    CoordSoftCEW1Config,
    InstabilityMonitorConfig,
    MatchingConfig,
    RolloutConfig,
    RunConfig,
    Stage2ABConfig,
    TinyModelConfig,
)
from domain.objects import CoordMode, FieldOrder, Ordering


def test_top_level_blocks_are_those_of_d13a() -> None:
    expected = ["extends", "run", "model", "data", "prompt", "training", "objective", "stage2_ab", "matching",
                "rollout", "stages", "infer", "eval", "vis"]
    assert list(TOP_LEVEL_BLOCKS) == expected
    assert [f.name for f in attrs.fields(CoordExpConfig)] == expected[1:]


def test_empty_config_is_valid_and_default_filled() -> None:
    cfg = structure_config({})
    assert cfg == CoordExpConfig()
    assert config_problems(cfg) == []
    assert cfg.run is None and cfg.model is None and cfg.stage2_ab is None and cfg.rollout is None
    assert cfg.stages is None


def test_data_defaults_data_md_10() -> None:
    data = CoordExpConfig().data
    assert data.max_pixels == 768 * 32 * 32
    assert (data.ordering, data.field_order, data.coord_mode) == (Ordering.SORTED, FieldOrder.DESC_FIRST,
                                                                   CoordMode.TOKENS)
    assert (data.train_jsonl, data.val_jsonl, data.image_root, data.train_limit, data.val_limit) == (None,) * 5
    assert data.check_image_sizes == "eager" and data.convert is None


def test_convert_defaults_data_md_9_2() -> None:
    cfg = structure_config({"data": {"convert": {"source": "lvis", "annotations": "a.json", "image_root": "i",
                                                 "output_dir": "o", "split": "val"}}})
    convert = cfg.data.convert
    assert convert is not None
    assert (convert.geometry, convert.poly_multipart, convert.poly_max_points) == ("bbox", "bbox", None)
    assert (convert.drop_crowd, convert.keep_empty, convert.max_objects) == (True, True, None)
    assert (convert.min_pixels, convert.exif_orientation, convert.skip_bad_images) == (4 * 32 * 32, "ignore", False)
    assert (convert.jpeg_quality, convert.workers, convert.limit) == (95, 8, None)
    assert convert.annotations == Path("a.json")


def test_packing_defaults_data_md_8_1() -> None:
    training = CoordExpConfig().training
    assert (training.packing, training.max_length, training.packing_buffer) == (False, 12000, 512)
    assert (training.packing_min_fill_ratio, training.packing_drop_last, training.eval_packing) == (0.65, False, False)
    assert training.post_rollout_pack_scope == "micro"
    assert training.effective_batch_size is None


def test_stage1_defaults_stage1_md_8_1() -> None:
    objective = CoordExpConfig().objective
    assert objective.trainer_variant == "stage1"
    assert objective.coord_soft_ce_w1 == CoordSoftCEW1Config(
        enabled=False, ce_weight=0.0, soft_ce_weight=1.0, w1_weight=1.0, gate_weight=1.0, temperature=1.0,
        target_sigma=2.0, target_truncate=None,
    )
    types = objective.token_type_metrics
    assert (types.enabled, types.include, types.exclude, types.log_top5, types.coord_monitor_mass,
            types.coord_monitor_mass_max_tokens) == (False, None, (), True, True, 0)
    offset = CoordExpConfig().training.coord_offset
    assert (offset.enabled, offset.tie_head, offset.embed_lr, offset.head_lr, offset.weight_decay, offset.dtype) == (
        False, True, None, None, 0.0, None)


def test_instability_monitor_defaults_stage1_md_5() -> None:
    monitor = InstabilityMonitorConfig()
    assert (monitor.enabled, monitor.max_meta_samples, monitor.ema_decay, monitor.spike_factor) == (False, 16, 0.98, 8.0)
    assert (monitor.abs_loss_threshold, monitor.min_supervised_tokens, monitor.min_token_acc) == (0.2, 64, 0.01)
    assert monitor.max_abs_logit == 200.0
    assert (monitor.detect_nonfinite, monitor.detect_loss_spike, monitor.detect_low_acc) == (True, True, True)
    assert (monitor.dump_samples, monitor.dump_dir) == (False, None)
    assert (monitor.early_stop.enabled, monitor.early_stop.on_reasons) == (False, ("zero_token_acc",))
    assert (monitor.guard.enabled, monitor.guard.in_eval) == (False, False)


def test_stage2_defaults_stage2_md_20() -> None:
    stage2 = structure_config({"stage2_ab": {"schedule": {"b_ratio": 0.25}}}).stage2_ab
    assert isinstance(stage2, Stage2ABConfig) and stage2.schedule.b_ratio == 0.25
    assert (stage2.channel_a.n_softctx_iter, stage2.channel_a.softctx_grad_mode) == (1, "unroll")
    losses = stage2.losses
    assert (losses.softctx_temperature, losses.desc_ce_weight, losses.bbox_smoothl1_weight,
            losses.bbox_ciou_weight) == (1.0, 1.0, 1.0, 1.0)
    assert (losses.coord_ce_weight, losses.coord_el1_weight, losses.coord_ehuber_weight, losses.coord_entropy_weight,
            losses.coord_huber_delta) == (0.0, 0.0, 0.0, 0.0, 0.001)
    b = stage2.channel_b
    assert (b.mode, b.desc_ce_weight_matched, b.drop_invalid_struct_ce_multiplier, b.reordered_gt_sft) == (
        "micro", None, 1.0, False)
    assert (b.semantic_desc_gate.enabled, b.semantic_desc_gate.threshold, b.semantic_desc_gate.model_path) == (
        False, 0.5, None)
    assert (b.rollouts_per_step, b.enable_pipeline, b.decode_batch_size) == (None, False, 2)
    assert (b.async_.queue_limit, b.async_.version_window, b.async_.sync_every_steps,
            b.async_.prefetch_target_packs) == (8, 2, 1, 2)
    assert stage2.debug_asserts is False


def test_matching_defaults_stage2_md_20() -> None:
    assert MatchingConfig() == MatchingConfig(maskiou_gate=0.3, candidate_top_k=5, maskiou_resolution=256,
                                              fp_cost=0.5, fn_cost=2.0, ot_cost="l2", ot_epsilon=10.0, ot_iters=30)


def test_rollout_defaults_stage2_md_2_2_and_16() -> None:
    rollout = RolloutConfig()
    assert (rollout.backend, rollout.decode_mode, rollout.max_new_tokens, rollout.num_beams) == ("hf", "greedy", 512, 1)
    assert (rollout.decoding.temperature, rollout.decoding.top_p, rollout.decoding.top_k) == (0.0, 1.0, -1)
    assert rollout.repetition_penalty == 1.0
    assert (rollout.generate_batch_size, rollout.hf_batch_size, rollout.infer_batch_size) == (1, None, None)
    rt = rollout.repeat_terminate
    assert (rt.enabled, rt.min_new_tokens, rt.max_consecutive_token_repeats, rt.ngram_size, rt.ngram_repeats,
            rt.max_objects) == (False, 256, 64, 64, 2, None)
    vllm = rollout.vllm
    assert (vllm.mode, vllm.tensor_parallel_size, vllm.gpu_memory_utilization, vllm.max_model_len) == (
        "colocate", 1, 0.45, None)
    assert (vllm.max_num_seqs, vllm.enable_prefix_caching, vllm.enforce_eager) == (256, True, False)
    assert (vllm.server.servers, vllm.server.timeout_s, vllm.server.infer_timeout_s) == ((), 240.0, None)
    dump = vllm.server.debug_dump
    assert (dump.enabled, dump.every_steps, dump.dump_first_step, dump.only_world_process_zero, dump.max_events,
            dump.max_samples, dump.max_chars) == (False, 1, True, True, 3, 1, 4000)
    launch = vllm.server.launch
    assert (launch.server_tp, launch.server_dp, launch.gpu_memory_utilization, launch.enforce_eager) == (
        1, None, 0.75, True)
    assert (vllm.sync.mode, vllm.sync.fallback_to_full, vllm.sync.bucket_size_mib) == ("full", True, 512)
    assert (rollout.offload.enabled, rollout.offload.offload_model, rollout.offload.offload_optimizer) == (False,) * 3
    monitor = rollout.desc_monitor
    assert (monitor.enabled, monitor.mode, monitor.every_steps, monitor.model_path, monitor.threshold, monitor.device,
            monitor.batch_size, monitor.max_length, monitor.max_pairs) == (
        False, "exact", None, None, 0.6, "cpu", 64, 64, 64)


def test_pipeline_defaults_infer_eval_config_2_1_4_6_5() -> None:
    cfg = CoordExpConfig()
    assert RunConfig().seed == 17
    infer = cfg.infer
    assert (infer.backend, infer.device, infer.gt_vs_pred_jsonl, infer.summary_json, infer.on_generation_error) == (
        "hf", "auto", None, None, "raise")
    gen = infer.generation
    assert (gen.temperature, gen.top_p, gen.max_new_tokens, gen.repetition_penalty, gen.batch_size) == (
        0.01, 0.95, 1024, 1.05, 1)
    v = infer.vllm
    assert (v.mode, v.base_url, v.served_model_name, v.request_timeout_s, v.preflight_timeout_s,
            v.client_concurrency, v.auto_launch) == ("server", None, None, 180.0, 3.0, None, True)
    launch = v.launch
    assert (launch.tensor_parallel_size, launch.data_parallel_size, launch.gpu_memory_utilization,
            launch.max_model_len, launch.max_num_batched_tokens, launch.max_num_seqs, launch.enable_prefix_caching,
            launch.enforce_eager, launch.startup_timeout_s) == (1, 1, 0.9, None, None, None, True, False, 120.0)
    ev = cfg.eval
    assert (ev.metrics, ev.output_dir, ev.coco_backend, ev.coco_gt_json, ev.coco_results_json, ev.use_segm) == (
        "both", None, "faster_coco_eval", None, None, True)
    assert (ev.iou_thrs, ev.score_mode, ev.f1ish_iou_thrs, ev.f1ish_pred_scope) == (
        None, "token_prob", (0.3, 0.5), "annotated")
    sem = ev.semantic
    assert (sem.enabled, sem.model_path, sem.threshold, sem.device, sem.batch_size) == (True, None, 0.6, "auto", 64)
    assert (ev.num_workers, ev.overlay, ev.overlay_k) == (0, False, 12)
    assert (cfg.vis.output_dir, cfg.vis.limit) == (None, 20)
    assert (cfg.prompt.variant, cfg.prompt.system, cfg.prompt.user) == ("default", None, None)


def test_model_defaults_and_tiny_sizes_environment_md() -> None:
    cfg = structure_config({"model": {"tiny": {}}})
    assert cfg.model is not None and (cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation) == (
        None, "bfloat16", "auto")
    tiny = cfg.model.tiny
    assert isinstance(tiny, TinyModelConfig) and (tiny.seed, tiny.cache_dir) == (0, None)
    text, vision = tiny.text, tiny.vision
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (1472, 128, 256, 2)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4, 2, 32)
    assert (text.mrope_section, text.mrope_interleaved, text.rope_theta, text.tie_word_embeddings) == (
        (6, 5, 5), True, 5e6, False)
    assert sum(text.mrope_section) == text.head_dim // 2
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (2, 64, 128, 4)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
    assert (vision.num_position_embeddings, vision.deepstack_visual_indexes) == (256, (0, 1))
    assert config_problems(cfg) == []


def test_no_schema_key_looks_like_a_secret() -> None:
    leaves = {p.rsplit(".", 1)[-1].replace("[]", "") for p in SCHEMA_PATHS}
    assert [k for k in leaves if is_secret_key(k)] == []


@pytest.mark.parametrize("migration", KEY_MIGRATIONS, ids=lambda m: m.old)
def test_migration_table_agrees_with_the_schema(migration: object) -> None:
    old = migration.old.removesuffix(".*")  # type: ignore[attr-defined]
    assert normalize_path(old) not in SCHEMA_PATHS, f"{old} is a live key but listed as removed"
    replacement = migration.replacement  # type: ignore[attr-defined]
    if replacement is not None and " " not in replacement and ":" not in replacement:
        assert replacement in SCHEMA_PATHS or replacement in TOP_LEVEL_BLOCKS, replacement


def test_frozen_value_objects() -> None:
    cfg = CoordExpConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.vis.limit = 3  # type: ignore[misc]


def test_run_dir() -> None:
    assert RunConfig(name="r", output_dir=Path("out")).run_dir == Path("out/r")
    with pytest.raises(ValueError, match="run.name"):
        _ = RunConfig().run_dir
