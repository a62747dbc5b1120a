"""Renamed and removed config keys: old dotted path -> what to write instead.

One table for every spec file (infer-eval-config.md §1.4.5, stage1.md §8.2, stage2.md §20). A match
wins over the generic "unknown key" suggestion. A pattern ending in ``.*`` matches that key and
everything below it; list indices in a path are written ``[]``.
"""

from __future__ import annotations

import re

import attrs


@attrs.frozen
class KeyMigration:
    """One retired key: ``replacement`` is what to write (None: removed without a replacement)."""

    old: str
    replacement: str | None
    note: str = ""

    def matches(self, normalized_path: str) -> bool:
        if self.old.endswith(".*"):
            stem = self.old[:-2]
            return normalized_path == stem or normalized_path.startswith(stem + ".")
        return normalized_path == self.old

    def message(self, path: str) -> str:
        if self.replacement is not None:
            text = f"Config key '{path}' was removed: write '{self.replacement}' instead"
            return f"{text} ({self.note})" if self.note else text
        return f"Config key '{path}' was removed: {self.note}"


_NO_FALLBACK = "unmapped descriptions are always dropped and counted"

KEY_MIGRATIONS: tuple[KeyMigration, ...] = (
    # files
    KeyMigration("inherit", "extends", "there is no 'inherit' alias"),
    # infer-eval-config.md §1.4.5
    KeyMigration("infer.gt_jsonl", "data.val_jsonl"),
    KeyMigration("infer.model_checkpoint", "model.path"),
    KeyMigration("infer.prompt_variant", "prompt.variant"),
    KeyMigration("infer.object_field_order", "data.field_order"),
    KeyMigration("infer.limit", "data.val_limit"),
    KeyMigration("eval.semantic_model", "eval.semantic.model_path"),
    KeyMigration("eval.unknown_policy", None, _NO_FALLBACK),
    KeyMigration("eval.semantic_fallback", None, _NO_FALLBACK),
    # stage1.md §8.2
    KeyMigration("custom.coord_soft_ce_w1.*", "objective.coord_soft_ce_w1"),
    KeyMigration("custom.coord_loss.*", "objective.coord_soft_ce_w1"),
    KeyMigration("custom.token_type_metrics.*", "objective.token_type_metrics"),
    KeyMigration("custom.instability_monitor.*", "objective.instability_monitor"),
    KeyMigration("custom.extra.instability_monitor.*", "objective.instability_monitor"),
    KeyMigration("custom.coord_offset.*", "training.coord_offset", "offset optimizer groups are automatic"),
    KeyMigration(
        "training.optimizer",
        "training.coord_offset.enabled: true",
        "there is no optimizer switch; the coord-offset optimizer groups are automatic",
    ),
    KeyMigration("custom.trainer_variant", "objective.trainer_variant"),
    KeyMigration("custom.coord_tokens.*", "data.coord_mode", "tokens | numeric"),
    KeyMigration(
        "objective.instability_monitor.early_stop_on_zero_acc",
        "objective.instability_monitor.early_stop: {enabled: true, on_reasons: [zero_token_acc]}",
    ),
    KeyMigration("objective.instability_monitor.guard_on_nonfinite", "objective.instability_monitor.detect_nonfinite"),
    KeyMigration("objective.instability_monitor.guard_on_spike", "objective.instability_monitor.detect_loss_spike"),
    KeyMigration("objective.instability_monitor.guard_on_zero_acc", "objective.instability_monitor.detect_low_acc"),
    KeyMigration("training.coord_offset.ids", None, "offsets always cover the 1000 coord ids"),
    KeyMigration("custom.coord_expectation_metrics.*", None, "no replacement"),
    KeyMigration("custom.hard_sample_mining.*", None, "no replacement"),
    KeyMigration(
        "training.average_tokens_across_devices",
        None,
        "not configurable; the trainer adapter always sets it (stage1.md §1.6)",
    ),
    # stage2.md §20 (and infer-eval-config.md §1.4.5)
    KeyMigration("stage2_ab.schedule.pattern", "stage2_ab.schedule.b_ratio"),
    KeyMigration("stage2_ab.losses.bbox_l1_weight", "stage2_ab.losses.bbox_smoothl1_weight"),
    KeyMigration(
        "stage2_ab.losses.bbox_giou_weight", "stage2_ab.losses.bbox_ciou_weight", "Stage-2 AB has no GIoU term"
    ),
    KeyMigration("stage2_ab.channel_b.stop_neutral", None, "closure tokens are always supervised"),
    KeyMigration("rollout.temperature", "rollout.decoding.temperature"),
    KeyMigration("rollout.top_p", "rollout.decoding.top_p"),
    KeyMigration("rollout.top_k", "rollout.decoding.top_k"),
    KeyMigration("rollout.rollout_buffer", None, "no replacement"),
    KeyMigration("rollout.vllm.server.base_url", "rollout.vllm.server.servers: [{base_url, group_port}]"),
    KeyMigration("rollout.vllm.server.group_port", "rollout.vllm.server.servers: [{base_url, group_port}]"),
    KeyMigration("rollout.repeat_terminate.max_object_keys", "rollout.repeat_terminate.max_objects"),
    KeyMigration("training.packing_length", None, "the pack capacity is 'training.max_length'"),
)

_INDEX = re.compile(r"\[\d+\]")


def normalize_path(path: str) -> str:
    """``a.b[3].c`` -> ``a.b[].c``: migration patterns do not name list positions."""
    return _INDEX.sub("[]", path)


def find_migration(path: str) -> KeyMigration | None:
    """The table entry for a dotted path, or None."""
    normalized = normalize_path(path)
    for migration in KEY_MIGRATIONS:
        if migration.matches(normalized):
            return migration
    return None
