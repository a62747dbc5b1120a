"""Loader: extends, merge, strict structuring, unknown / renamed keys, error collection.

Acceptance tests of infer-eval-config.md §9 (2-10, 13, 14), stage1.md §9 (51, 52), stage2.md §22 (61)
and data.md §11 (48) for the config part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from application.config import load_config, read_merged, structure_config
from application.config.loader import SCHEMA_PATHS, parse_yaml_text
from application.config.schema import TOP_LEVEL_BLOCKS
from domain.errors import ConfigError
from domain.objects import CoordMode, FieldOrder

from .conftest import WriteConfig


def problems(path: Path, **kwargs: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    return info.value.messages


def one_problem(path: Path, **kwargs: Any) -> str:
    messages = problems(path, **kwargs)
    assert len(messages) == 1, messages
    return messages[0]


# --------------------------------------------------------------------------------------------
# extends and merge (tests 2, 3, 4 and the chain / diamond / relative-path cases)
# --------------------------------------------------------------------------------------------


def test_extends_list_later_base_wins_and_child_wins_over_bases(write: WriteConfig) -> None:
    write("a.yaml", "training: {learning_rate: 1e-4}")
    write("b.yaml", "training: {learning_rate: 2e-4}")
    silent = write("child.yaml", "extends: [a.yaml, b.yaml]")
    loud = write("child2.yaml", "extends: [a.yaml, b.yaml]\ntraining: {learning_rate: 3e-4}")
    assert load_config(silent).config.training.learning_rate == 2e-4
    assert load_config(loud).config.training.learning_rate == 3e-4


def test_lists_are_replaced_wholesale(write: WriteConfig) -> None:
    write("base.yaml", "eval: {f1ish_iou_thrs: [0.3, 0.5]}")
    child = write("child.yaml", "extends: base.yaml\neval: {f1ish_iou_thrs: [0.5]}")
    assert load_config(child).config.eval.f1ish_iou_thrs == (0.5,)


def test_null_over_a_non_optional_key_is_a_type_error(write: WriteConfig) -> None:
    write("base.yaml", "training: {learning_rate: 1e-4}")
    child = write("child.yaml", "extends: base.yaml\ntraining: {learning_rate: null}")
    message = one_problem(child)
    assert message.startswith("'training.learning_rate' must be a number, got null")
    assert str(child.resolve()) in message


def test_null_over_an_optional_key_clears_it(write: WriteConfig) -> None:
    write("base.yaml", "vis: {limit: 5}")
    child = write("child.yaml", "extends: base.yaml\nvis: {limit: null}")
    assert load_config(child).config.vis.limit is None


def test_cycle_names_the_chain(write: WriteConfig) -> None:
    a = write("a.yaml", "extends: b.yaml")
    write("b.yaml", "extends: a.yaml")
    message = one_problem(a)
    assert message.startswith(f"Cyclic config inheritance detected at: {a.resolve()}")
    assert "(chain: a.yaml -> b.yaml -> a.yaml)" in message


def test_self_extension_is_a_cycle(write: WriteConfig) -> None:
    a = write("a.yaml", "extends: a.yaml")
    assert "Cyclic config inheritance detected at:" in one_problem(a)


def test_diamond_loads_and_lists_each_file_once(write: WriteConfig) -> None:
    root = write("root.yaml", "run: {seed: 1}\ntraining: {learning_rate: 1e-4}")
    left = write("left.yaml", "extends: root.yaml\nrun: {seed: 2}")
    right = write("right.yaml", "extends: root.yaml\ntraining: {max_length: 4096}")
    child = write("child.yaml", "extends: [left.yaml, right.yaml]")
    loaded = load_config(child)
    # right.yaml re-applies root.yaml's run.seed (1) after left.yaml set 2: bases merge in order.
    assert loaded.config.run is not None and loaded.config.run.seed == 1
    assert loaded.config.training.max_length == 4096
    assert loaded.extends_chain == tuple(p.resolve() for p in (root, left, right, child))


def test_sibling_bases_later_list_wins(write: WriteConfig) -> None:
    write("a.yaml", "training: {report_to: [tensorboard]}")
    write("b.yaml", "training: {report_to: [wandb, swanlab]}")
    child = write("child.yaml", "extends: [a.yaml, b.yaml]")
    assert load_config(child).config.training.report_to == ("wandb", "swanlab")


def test_chain_of_three_with_overrides_and_sources(write: WriteConfig) -> None:
    grand = write("grand.yaml", "run: {output_dir: out, seed: 3}\ninfer: {generation: {top_p: 0.5, batch_size: 4}}")
    parent = write("parent.yaml", "extends: grand.yaml\ninfer: {generation: {top_p: 0.7}}")
    child = write("child.yaml", "extends: parent.yaml\nrun: {name: r}\ninfer: {generation: {batch_size: 8}}")
    loaded = load_config(child)
    cfg = loaded.config
    assert cfg.run is not None and (cfg.run.name, cfg.run.output_dir, cfg.run.seed) == ("r", Path("out"), 3)
    assert (cfg.infer.generation.top_p, cfg.infer.generation.batch_size) == (0.7, 8)
    assert loaded.sources["infer.generation.top_p"] == parent.resolve()
    assert loaded.sources["infer.generation.batch_size"] == child.resolve()
    assert loaded.sources["run.seed"] == grand.resolve()
    assert loaded.sources["run.name"] == child.resolve()
    assert loaded.extends_chain == (grand.resolve(), parent.resolve(), child.resolve())


def test_extends_resolves_relative_to_the_including_file(write: WriteConfig, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    write("configs/base/common.yaml", "run: {seed: 5}")
    write("configs/base/stage.yaml", "extends: common.yaml\ntraining: {max_length: 100}")
    child = write("configs/exp/x.yaml", "extends: ../base/stage.yaml")
    monkeypatch.chdir(tmp_path / "configs" / "base")  # the working directory plays no part
    cfg = load_config(child).config
    assert cfg.run is not None and cfg.run.seed == 5 and cfg.training.max_length == 100


def test_missing_base_names_target_and_referrer(write: WriteConfig) -> None:
    child = write("sub/child.yaml", "extends: ../nope.yaml")
    target = (child.parent / "../nope.yaml").resolve()
    assert one_problem(child) == f"extends target not found: {target} (referenced from {child.resolve()})"


def test_missing_config_file(tmp_path: Path) -> None:
    assert one_problem(tmp_path / "absent.yaml").startswith("config file not found:")


@pytest.mark.parametrize("value", ["3", "{a: b}", "[a.yaml, 3]", '""'])
def test_extends_must_be_a_path_or_a_list_of_paths(write: WriteConfig, value: str) -> None:
    assert "'extends' must be a path string or a list of path strings" in one_problem(
        write("c.yaml", f"extends: {value}")
    )


def test_nested_extends_is_an_unknown_key(write: WriteConfig) -> None:
    message = one_problem(write("c.yaml", "training: {extends: x.yaml}"))
    assert message.startswith("Unknown config key 'training.extends'")


def test_inherit_is_not_an_alias(write: WriteConfig) -> None:
    assert "write 'extends' instead" in one_problem(write("c.yaml", "inherit: base.yaml"))


def test_empty_mapping_override_keeps_base_values(write: WriteConfig) -> None:
    write("base.yaml", "training: {max_length: 77}")
    child = write("child.yaml", "extends: base.yaml\ntraining: {}")
    assert load_config(child).config.training.max_length == 77


@settings(max_examples=60, deadline=None)
@given(
    base=st.dictionaries(st.sampled_from("abcd"), st.one_of(st.integers(), st.dictionaries(st.sampled_from("xyz"),
                                                                                            st.integers()))),
    over=st.dictionaries(st.sampled_from("abcd"), st.one_of(st.integers(), st.dictionaries(st.sampled_from("xyz"),
                                                                                            st.integers()))),
)
def test_deep_merge_semantics(base: dict[str, Any], over: dict[str, Any]) -> None:
    from application.config.loader import _leaf_sources, _merge

    base_file, over_file = Path("/base.yaml"), Path("/over.yaml")
    merged, sources = _merge(base, _leaf_sources(base, "", base_file) if base else {},
                             over, _leaf_sources(over, "", over_file) if over else {})
    assert set(merged) == set(base) | set(over)
    for key, value in merged.items():
        if key not in over:
            assert value == base[key]
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            assert value == {**base[key], **over[key]}
        else:
            assert value == over[key]
    # every leaf of the result has exactly one source, the file whose value survived
    leaves = _leaf_sources(merged, "", Path("/x")) if merged else {}
    assert set(sources) == set(leaves)
    for leaf, file in sources.items():
        top, _, sub = leaf.partition(".")
        from_over = top in over and (not sub or (isinstance(over[top], dict) and sub in over[top]))
        if over.get(top) == {} and isinstance(base.get(top), dict) and base[top]:
            from_over = False
        assert file == (over_file if from_over else base_file), (leaf, base, over)


# --------------------------------------------------------------------------------------------
# YAML reading
# --------------------------------------------------------------------------------------------


def test_empty_file_is_an_empty_mapping(write: WriteConfig) -> None:
    cfg = load_config(write("empty.yaml", "")).config
    assert cfg.run is None and cfg.data.coord_mode is CoordMode.TOKENS


def test_top_level_must_be_a_mapping(write: WriteConfig) -> None:
    assert "must be a mapping of blocks, got a list" in one_problem(write("l.yaml", "- a\n- b\n"))


def test_invalid_yaml_names_file_and_line(write: WriteConfig) -> None:
    path = write("bad.yaml", "run:\n  name: [unclosed\n")
    assert one_problem(path).startswith(f"{path.resolve()}:")


def test_duplicate_key_is_an_error(write: WriteConfig) -> None:
    path = write("dup.yaml", "vis: {limit: 3}\nvis: {limit: 4}\n")
    assert "duplicate key 'vis'" in one_problem(path)


def test_non_string_key_is_an_error(write: WriteConfig) -> None:
    assert "is not a string" in one_problem(write("k.yaml", "vis: {1: 3}\n"))


def test_yaml_12_scalars() -> None:
    data = parse_yaml_text("a: 1e-4\nb: yes\nc: on\nd: 2024-01-01\ne: 010\nf: true\ng: 1:30\nh: .5\n", Path("x"))
    assert data == {"a": 1e-4, "b": "yes", "c": "on", "d": "2024-01-01", "e": 10, "f": True, "g": "1:30", "h": 0.5}


def test_yaml_merge_keys_still_work(write: WriteConfig) -> None:
    path = write("m.yaml", "x: &g {top_p: 0.5, batch_size: 2}\n")
    assert parse_yaml_text("g: &g {a: 1, b: 2}\nh: {<<: *g, b: 3}\n", path) == {"g": {"a": 1, "b": 2},
                                                                            "h": {"a": 1, "b": 3}}


def test_yes_is_not_a_bool(write: WriteConfig) -> None:
    message = one_problem(write("c.yaml", "eval: {use_segm: yes}"))
    assert message.startswith("'eval.use_segm' must be a bool (true or false), got str 'yes'")


# --------------------------------------------------------------------------------------------
# Unknown keys (tests 5, 6, 8, 10) and suggestions
# --------------------------------------------------------------------------------------------


def test_typo_suggests_the_sibling(write: WriteConfig) -> None:
    path = write("c.yaml", "infer: {generation: {max_new_token: 10}}")
    assert one_problem(path) == (
        f"Unknown config key 'infer.generation.max_new_token' (from {path.resolve()}); "
        "did you mean 'infer.generation.max_new_tokens'?"
    )


def test_unknown_key_inside_a_list_item_has_the_index(write: WriteConfig) -> None:
    path = write(
        "c.yaml",
        """
        rollout:
          vllm:
            server:
              servers:
                - {base_url: "http://127.0.0.1:8000", group_port: 51216}
                - {base_url: "http://127.0.0.1:8001", grp_port: 51217}
        """,
    )
    messages = problems(path)
    assert (
        f"Unknown config key 'rollout.vllm.server.servers[1].grp_port' (from {path.resolve()}); "
        "did you mean 'rollout.vllm.server.servers[1].group_port'?"
    ) in messages


def test_same_leaf_name_in_another_block_is_suggested(write: WriteConfig) -> None:
    message = one_problem(write("c.yaml", "infer: {seed: 3}"))
    assert "did you mean 'run.seed'" in message


def test_unknown_top_level_block_lists_the_allowed_blocks(write: WriteConfig) -> None:
    path = write("c.yaml", "artifacts: {x: 1}")
    message = one_problem(path)
    assert message.startswith(f"Unknown top-level config block 'artifacts' (from {path.resolve()})")
    assert message.endswith(f"allowed blocks: {list(TOP_LEVEL_BLOCKS)}")


@pytest.mark.parametrize("where", ["extra: {a: 1}", "training: {extra: {a: 1}}", "eval: {semantic: {extra: 1}}"])
def test_no_extra_escape_hatch(write: WriteConfig, where: str) -> None:
    message = one_problem(write("c.yaml", where))
    assert "'extra'" in message or ".extra'" in message


BLOCKS_WITH_BODY = {
    "run": "{name: r, output_dir: o}",
    "model": "{path: m}",
    "data": "{}",
    "prompt": "{}",
    "training": "{}",
    "objective": "{}",
    "stage2_ab": "{schedule: {b_ratio: 0.5}}",
    "matching": "{}",
    "rollout": "{}",
    "stages": "{infer: true, eval: true, vis: true}",
    "infer": "{}",
    "eval": "{}",
    "vis": "{}",
}


@pytest.mark.parametrize("block", sorted(BLOCKS_WITH_BODY))
def test_unknown_key_in_every_block(write: WriteConfig, block: str) -> None:
    body = BLOCKS_WITH_BODY[block]
    inner = body[1:-1]
    text = f"{block}: {{{inner + ', ' if inner else ''}zzz_unknown: 1}}"
    if block == "stage2_ab":
        text += "\nobjective: {trainer_variant: stage2_ab}\nrollout: {}"
    messages = problems(write("c.yaml", text))
    assert any(m.startswith(f"Unknown config key '{block}.zzz_unknown'") for m in messages), messages


NESTED_UNKNOWN = [
    "model: {tiny: {text: {hidden: 3}}}",
    "data: {convert: {source: coco, annotations: a, image_root: i, output_dir: o, split: s, worker: 2}}",
    "training: {lora: {rnak: 4}}",
    "objective: {instability_monitor: {early_stop: {enable: true}}}",
    "matching: {gate: 0.3}",
    "rollout: {vllm: {engine_kwargs: {max_num_seq: 3}}}",
    "infer: {vllm: {launch: {tp: 2}}}",
    "eval: {semantic: {modelpath: x}}",
]


@pytest.mark.parametrize("text", NESTED_UNKNOWN)
def test_unknown_nested_keys(write: WriteConfig, text: str) -> None:
    messages = problems(write("c.yaml", text))
    assert len(messages) == 1 and messages[0].startswith("Unknown config key '"), messages


def test_engine_kwargs_whitelist(write: WriteConfig) -> None:
    ok = write("ok.yaml", "rollout: {backend: vllm, vllm: {max_model_len: 4096, engine_kwargs: "
                          "{max_num_batched_tokens: 8192, mm_encoder_tp_mode: data}}}")
    assert load_config(ok).config.rollout.vllm.engine_kwargs.mm_encoder_tp_mode == "data"  # type: ignore[union-attr]
    assert one_problem(write("bad.yaml", "rollout: {vllm: {engine_kwargs: {trust_remote_code: true}}}")).startswith(
        "Unknown config key 'rollout.vllm.engine_kwargs.trust_remote_code'"
    )


@pytest.mark.filterwarnings("ignore:Config keys set but inert")
def test_async_block_uses_the_yaml_key(write: WriteConfig) -> None:
    base = "objective: {trainer_variant: stage2_ab}\nrollout: {}\n"
    ok = write("ok.yaml", base + "stage2_ab: {schedule: {b_ratio: 1}, channel_b: {async: {queue_limit: 4}}}")
    stage2 = load_config(ok).config.stage2_ab
    assert stage2 is not None and stage2.channel_b.async_.queue_limit == 4
    bad = write("bad.yaml", base + "stage2_ab: {schedule: {b_ratio: 1}, channel_b: {async_: {}}}")
    assert "did you mean 'stage2_ab.channel_b.async'" in one_problem(bad)


def test_all_structural_errors_are_reported_together_sorted_by_path(write: WriteConfig) -> None:
    path = write(
        "c.yaml",
        """
        vis: {limt: 3}
        infer: {generation: {max_new_token: 10, batch_size: "2"}}
        data: {coord_mode: Tokens}
        """,
    )
    messages = problems(path)
    assert [m.split("'")[1] for m in messages] == [
        "data.coord_mode",
        "infer.generation.batch_size",
        "infer.generation.max_new_token",
        "vis.limt",
    ]


def test_list_index_paths_sort_numerically(write: WriteConfig) -> None:
    servers = ", ".join(f'{{base_url: "http://h:{8000 + i}", group_port: {i + 1}, x: 1}}' for i in range(11))
    messages = problems(write("c.yaml", f"rollout: {{vllm: {{server: {{servers: [{servers}]}}}}}}"))
    indices = [int(m.split("servers[")[1].split("]")[0]) for m in messages]
    assert indices == list(range(11))


def test_structural_errors_come_before_cross_field_rules(write: WriteConfig) -> None:
    path = write("c.yaml", "vis: {limit: 0, extra_key: 1}")
    assert problems(path) == (
        f"Unknown config key 'vis.extra_key' (from {path.resolve()}); valid keys here: ['limit', 'output_dir']",
    )


# --------------------------------------------------------------------------------------------
# Renamed and removed keys (tests 7, 52, 61)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stage2_ab: {schedule: {pattern: [A, B]}}", "write 'stage2_ab.schedule.b_ratio' instead"),
        ("infer: {gt_jsonl: x.jsonl}", "write 'data.val_jsonl' instead"),
        ("infer: {model_checkpoint: ckpt}", "write 'model.path' instead"),
        ("infer: {prompt_variant: default}", "write 'prompt.variant' instead"),
        ("infer: {object_field_order: desc_first}", "write 'data.field_order' instead"),
        ("infer: {limit: 3}", "write 'data.val_limit' instead"),
        ("eval: {semantic_model: m}", "write 'eval.semantic.model_path' instead"),
        ("eval: {unknown_policy: drop}", "unmapped descriptions are always dropped and counted"),
        ("eval: {semantic_fallback: exact}", "unmapped descriptions are always dropped and counted"),
        ("stage2_ab: {losses: {bbox_l1_weight: 1.0}}", "write 'stage2_ab.losses.bbox_smoothl1_weight' instead"),
        ("stage2_ab: {losses: {bbox_giou_weight: 1.0}}", "write 'stage2_ab.losses.bbox_ciou_weight' instead"),
        ("training: {packing_length: 4096}", "the pack capacity is 'training.max_length'"),
        ("custom: {coord_loss: {enabled: true}}", "write 'objective.coord_soft_ce_w1' instead"),
        ("custom: {coord_soft_ce_w1: {enabled: true}}", "write 'objective.coord_soft_ce_w1' instead"),
        ("custom: {extra: {instability_monitor: {enabled: true}}}", "write 'objective.instability_monitor' instead"),
        ("custom: {coord_tokens: {enabled: true}}", "write 'data.coord_mode' instead"),
        ("custom: {trainer_variant: stage1}", "write 'objective.trainer_variant' instead"),
        ("training: {optimizer: multimodal_coord_offset}", "training.coord_offset"),
        ("training: {coord_offset: {ids: [1]}}", "offsets always cover the 1000 coord ids"),
        ("objective: {instability_monitor: {guard_on_spike: true}}",
         "write 'objective.instability_monitor.detect_loss_spike' instead"),
        ("objective: {instability_monitor: {early_stop_on_zero_acc: true}}", "on_reasons: [zero_token_acc]"),
        ("stage2_ab: {channel_b: {stop_neutral: true}}", "closure tokens are always supervised"),
        ("rollout: {temperature: 0.5}", "write 'rollout.decoding.temperature' instead"),
        ("rollout: {top_k: 5}", "write 'rollout.decoding.top_k' instead"),
        ("rollout: {rollout_buffer: 3}", "was removed"),
        ("rollout: {vllm: {server: {base_url: 'http://h:1'}}}", "rollout.vllm.server.servers"),
        ("rollout: {repeat_terminate: {max_object_keys: 3}}", "write 'rollout.repeat_terminate.max_objects' instead"),
        ("training: {average_tokens_across_devices: true}", "not configurable"),
    ],
)
def test_renamed_and_removed_keys(write: WriteConfig, text: str, expected: str) -> None:
    messages = problems(write("c.yaml", text))
    assert any(expected in m and m.startswith("Config key '") for m in messages), messages
    assert not any("did you mean" in m for m in messages)


def test_removed_key_message_has_the_spec_wording(write: WriteConfig) -> None:
    path = write("c.yaml", "stage2_ab: {schedule: {pattern: AB, b_ratio: 0.5}}\nobjective: {trainer_variant: stage2_ab}"
                           "\nrollout: {}")
    assert one_problem(path) == (
        "Config key 'stage2_ab.schedule.pattern' was removed: write 'stage2_ab.schedule.b_ratio' instead"
        f" (from {path.resolve()})"
    )


# --------------------------------------------------------------------------------------------
# Types (test 9) — strict hooks, no coercion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('infer: {generation: {max_new_tokens: "2048"}}',
         "'infer.generation.max_new_tokens' must be an int, got str '2048'"),
        ("infer: {generation: {batch_size: true}}", "'infer.generation.batch_size' must be an int, got bool true"),
        ("infer: {generation: {max_new_tokens: 5.7}}", "'infer.generation.max_new_tokens' must be an int, got float 5.7"),
        ("infer: {generation: {max_new_tokens: 5.0}}", "'infer.generation.max_new_tokens' must be an int, got float 5.0"),
        ('infer: {generation: {temperature: "0.1"}}', "'infer.generation.temperature' must be a number, got str '0.1'"),
        ("infer: {generation: {temperature: false}}", "'infer.generation.temperature' must be a number, got bool false"),
        ("infer: {generation: {temperature: .nan}}", "'infer.generation.temperature' must be a finite number"),
        ("eval: {use_segm: 1}", "'eval.use_segm' must be a bool (true or false), got int 1"),
        ("eval: {f1ish_pred_scope: annotate}", "'eval.f1ish_pred_scope' must be one of ['annotated', 'all'], got 'annotate'"),
        ("data: {field_order: Desc_First}",
         "'data.field_order' must be one of ['desc_first', 'geometry_first'], got 'Desc_First'"),
        ("run: {name: 5}", "'run.name' must be a string or null, got int 5"),
        ("data: {train_jsonl: 3}", "'data.train_jsonl' must be a path string or null, got int 3"),
        ('data: {train_jsonl: ""}', "'data.train_jsonl' must be a non-empty path string or null, got str ''"),
        ("eval: {semantic: 3}", "'eval.semantic' must be a mapping, got int 3"),
        ("eval: {f1ish_iou_thrs: 0.5}", "'eval.f1ish_iou_thrs' must be a list, got float 0.5"),
        ("eval: {f1ish_iou_thrs: [0.5, '0.3']}", "'eval.f1ish_iou_thrs[1]' must be a number, got str '0.3'"),
        ("rollout: {vllm: {server: {servers: {base_url: x}}}}", "'rollout.vllm.server.servers' must be a list"),
        ("training: {report_to: tensorboard}", "'training.report_to' must be a list, got str 'tensorboard'"),
    ],
)
def test_strict_types(write: WriteConfig, text: str, expected: str) -> None:
    assert one_problem(write("c.yaml", text)).startswith(expected)


def test_int_accepted_for_float_and_kept_exactly(write: WriteConfig) -> None:
    cfg = load_config(write("c.yaml", "infer: {generation: {temperature: 0}}\ntraining: {weight_decay: 0}")).config
    assert cfg.infer.generation.temperature == 0.0 and isinstance(cfg.infer.generation.temperature, float)
    assert cfg.training.weight_decay == 0.0


def test_explicit_falsy_values_are_kept(write: WriteConfig) -> None:
    cfg = load_config(write("c.yaml", "eval: {use_segm: false, num_workers: 0}\nvis: {limit: null}")).config
    assert cfg.eval.use_segm is False and cfg.eval.num_workers == 0 and cfg.vis.limit is None


def test_enums_are_domain_enums(write: WriteConfig) -> None:
    cfg = load_config(write("c.yaml", "data: {coord_mode: numeric, field_order: geometry_first}")).config
    assert cfg.data.coord_mode is CoordMode.NUMERIC and cfg.data.field_order is FieldOrder.GEOMETRY_FIRST


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.booleans(), st.floats(allow_nan=False), st.text(max_size=5), st.lists(st.integers(), max_size=2)))
def test_int_keys_reject_every_non_int(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        structure_config({"vis": {"limit": value}})
    assert info.value.messages[0].startswith("'vis.limit' must be an int or null, got ")


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False)))
def test_float_keys_accept_every_int_and_finite_float(value: float) -> None:
    cfg = structure_config({"matching": {"fp_cost": value}})
    assert cfg.matching.fp_cost == value and type(cfg.matching.fp_cost) is float


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.integers(), st.floats(), st.text(max_size=6), st.none()))
def test_bool_keys_accept_only_bools(value: Any) -> None:
    with pytest.raises(ConfigError):
        structure_config({"eval": {"use_segm": value}})


# --------------------------------------------------------------------------------------------
# Cross-field rules (tests 13, 14, 40, data 48, stage1 51, stage2 61)
# --------------------------------------------------------------------------------------------


def test_stages_need_all_three_keys(write: WriteConfig) -> None:
    path = write("c.yaml", "stages: {infer: true}")
    assert problems(path) == (
        f"Missing required config key 'stages.eval' in the 'stages' block (from {path.resolve()})",
        f"Missing required config key 'stages.vis' in the 'stages' block (from {path.resolve()})",
    )


def test_all_stages_false_is_an_error(write: WriteConfig) -> None:
    assert "enable at least one stage" in one_problem(write("c.yaml", "stages: {infer: false, eval: false, vis: false}"))


def test_unknown_prompt_variant_lists_registered_variants(write: WriteConfig) -> None:
    message = one_problem(write("c.yaml", "prompt: {variant: nope}"))
    assert "'prompt.variant'" in message and "['bbox_only', 'default']" in message and "'nope'" in message


def test_vis_limit_zero_is_a_range_error(write: WriteConfig) -> None:
    assert one_problem(write("c.yaml", "vis: {limit: 0}")).startswith("'vis.limit' must be >= 1, got 0")


@pytest.mark.parametrize("thrs", ["[0.6, 0.7]", "[0.5, 0.6]"])
def test_eval_iou_thrs_need_05_and_075(write: WriteConfig, thrs: str) -> None:
    assert "must contain 0.5 and 0.75" in one_problem(write("c.yaml", f"eval: {{iou_thrs: {thrs}}}"))


def test_eval_iou_thrs_strictly_increasing_and_in_range(write: WriteConfig) -> None:
    messages = problems(write("c.yaml", "eval: {iou_thrs: [0.75, 0.5, 1.5]}"))
    assert any("strictly increasing" in m for m in messages)
    assert any(m.startswith("'eval.iou_thrs[2]' must be in (0, 1]") for m in messages)


def test_packing_with_batch_two_is_an_error(write: WriteConfig) -> None:
    message = one_problem(write("c.yaml", "training: {packing: true, per_device_train_batch_size: 2}"))
    assert message.startswith("'training.per_device_train_batch_size' must be 1 with 'training.packing: true'")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("objective: {coord_soft_ce_w1: {ce_weight: -0.1}}", "objective.coord_soft_ce_w1.ce_weight"),
        ("objective: {coord_soft_ce_w1: {soft_ce_weight: -1}}", "objective.coord_soft_ce_w1.soft_ce_weight"),
        ("objective: {coord_soft_ce_w1: {w1_weight: -1}}", "objective.coord_soft_ce_w1.w1_weight"),
        ("objective: {coord_soft_ce_w1: {gate_weight: -1}}", "objective.coord_soft_ce_w1.gate_weight"),
        ("objective: {coord_soft_ce_w1: {enabled: true, ce_weight: 0, soft_ce_weight: 0, w1_weight: 0, gate_weight: 0}}",
         "objective.coord_soft_ce_w1.enabled"),
        ("objective: {coord_soft_ce_w1: {temperature: 0}}", "objective.coord_soft_ce_w1.temperature"),
        ("objective: {coord_soft_ce_w1: {target_sigma: -1}}", "objective.coord_soft_ce_w1.target_sigma"),
        ("objective: {coord_soft_ce_w1: {target_truncate: -1}}", "objective.coord_soft_ce_w1.target_truncate"),
        ("objective: {coord_soft_ce_w1: {target_truncate: 1.5}}", "objective.coord_soft_ce_w1.target_truncate"),
        ("objective: {coord_soft_ce_w1: {enabled: true}}\ndata: {coord_mode: numeric}",
         "objective.coord_soft_ce_w1.enabled"),
        ("objective: {token_type_metrics: {include: coco}}", "objective.token_type_metrics.include"),
        ("objective: {token_type_metrics: {exclude: null}}", "objective.token_type_metrics.exclude"),
        ("objective: {token_type_metrics: {coord_monitor_mass_max_tokens: -1}}",
         "objective.token_type_metrics.coord_monitor_mass_max_tokens"),
        ("objective: {instability_monitor: {ema_decay: 1.0}}", "objective.instability_monitor.ema_decay"),
        ("objective: {instability_monitor: {spike_factor: 0}}", "objective.instability_monitor.spike_factor"),
        ("objective: {instability_monitor: {min_token_acc: 2}}", "objective.instability_monitor.min_token_acc"),
        ("objective: {instability_monitor: {max_abs_logit: .inf}}", "objective.instability_monitor.max_abs_logit"),
        ("objective: {instability_monitor: {early_stop: {on_reasons: [bad]}}}",
         "objective.instability_monitor.early_stop.on_reasons[0]"),
        ("training: {coord_offset: {tie_head: 1}}", "training.coord_offset.tie_head"),
        ("training: {coord_offset: {embed_lr: 0}}", "training.coord_offset.embed_lr"),
        ("training: {coord_offset: {head_lr: -1e-4}}", "training.coord_offset.head_lr"),
        ("training: {coord_offset: {weight_decay: -0.1}}", "training.coord_offset.weight_decay"),
        ("training: {coord_offset: {dtype: fp8}}", "training.coord_offset.dtype"),
    ],
)
def test_stage1_config_rules_name_the_dotted_path(write: WriteConfig, text: str, path: str) -> None:
    messages = problems(write("c.yaml", text))
    assert any(m.startswith(f"'{path}'") for m in messages), messages


def test_coord_offset_dtype_spellings(write: WriteConfig) -> None:
    for dtype in ("auto", "bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "single"):
        cfg = load_config(write("c.yaml", f"training: {{coord_offset: {{enabled: true, dtype: {dtype}}}}}")).config
        assert cfg.training.coord_offset.dtype == dtype


STAGE2 = "objective: {trainer_variant: stage2_ab}\nstage2_ab: {schedule: {b_ratio: 0.5}}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rollout: {vllm: {server: {timeout_s: 0}}}", "'rollout.vllm.server.timeout_s' must be > 0"),
        ("rollout: {decoding: {temperature: -0.1}}", "'rollout.decoding.temperature' must be >= 0"),
        ("rollout: {decoding: {top_p: 0}}", "'rollout.decoding.top_p' must be in (0, 1]"),
        ("rollout: {decoding: {top_k: 0}}", "'rollout.decoding.top_k' must be -1 (disabled) or >= 1"),
        ("rollout: {backend: vllm, decode_mode: beam, vllm: {max_model_len: 4096}}", "'rollout.decode_mode'"),
        ("rollout: {backend: vllm}", "'rollout.vllm.max_model_len' is required"),
        ("rollout: {backend: vllm, vllm: {mode: server}}", "'rollout.vllm.server.servers' must list"),
        ("rollout: {backend: vllm, vllm: {mode: server, server: {servers: [{base_url: 'h:1', group_port: 1}]}}}",
         "'rollout.vllm.server.servers[0].base_url' must be of the form http(s)://host:port"),
        ("rollout: {backend: vllm, vllm: {mode: server, server: {servers: [{base_url: 'http://h:1', group_port: 0}]}}}",
         "'rollout.vllm.server.servers[0].group_port' must be in [1, 65535]"),
        (("rollout: {backend: vllm, vllm: {mode: server, server: {servers: [{base_url: 'http://h:1', group_port: 1},"
          " {base_url: 'http://h:1/', group_port: 2}]}}}"), "'rollout.vllm.server.servers[1].base_url' repeats"),
        ("rollout: {offload: {enabled: true}}", "'rollout.offload.enabled' requires"),
        ("rollout: {backend: vllm, vllm: {max_model_len: 10}, offload: {enabled: true}}\ntraining: {deepspeed: z.json}",
         "'rollout.offload.enabled' cannot be combined with 'training.deepspeed'"),
        ("rollout: {backend: vllm, vllm: {max_model_len: 10}, repeat_terminate: {enabled: true}}",
         "'rollout.repeat_terminate.enabled' is not available"),
        ("rollout: {}\ndata: {coord_mode: numeric}", "'data.coord_mode' must be 'tokens'"),
        ("rollout: {}\ntraining: {packing: true}", "'training.packing_drop_last' must be true"),
        ("rollout: {}\nstage2_ab: {schedule: {b_ratio: 1.5}}", "'stage2_ab.schedule.b_ratio' must be in [0, 1]"),
        ("rollout: {}\nstage2_ab: {schedule: {b_ratio: '0.5'}}", "'stage2_ab.schedule.b_ratio' must be a number"),
        ("rollout: {}\nstage2_ab: {schedule: {b_ratio: 0.5}, channel_b: {mode: step}}",
         "'stage2_ab.channel_b.mode' 'step' requires 'training.packing: true'"),
        ("rollout: {}\nstage2_ab: {schedule: {b_ratio: 0.5}, channel_b: {mode: async}}",
         "'stage2_ab.channel_b.mode' 'async' requires"),
        ("rollout: {}\nstage2_ab: {schedule: {b_ratio: 0.5}, channel_b: {semantic_desc_gate: {enabled: true}}}",
         "'stage2_ab.channel_b.semantic_desc_gate.enabled' requires"),
        ("rollout: {}\nstage2_ab: {schedule: {b_ratio: 0.5}, channel_b: {drop_invalid_struct_ce_multiplier: 5}}",
         "'stage2_ab.channel_b.drop_invalid_struct_ce_multiplier' must be in [1, 4]"),
        ("rollout: {}\nstage2_ab: {schedule: {b_ratio: 0.5}, losses: {coord_huber_delta: 0}}",
         "'stage2_ab.losses.coord_huber_delta' must be >= 1e-06"),
        ("rollout: {}\nmatching: {maskiou_resolution: 8}", "'matching.maskiou_resolution' must be >= 16"),
        ("rollout: {}\nmatching: {ot_cost: l3}", "'matching.ot_cost' must be one of ['l1', 'l2']"),
    ],
)
def test_stage2_config_rules(write: WriteConfig, text: str, expected: str) -> None:
    prefix = "objective: {trainer_variant: stage2_ab}\n" if "stage2_ab:" in text else STAGE2
    messages = problems(write("c.yaml", prefix + text))
    assert any(m.startswith(expected) for m in messages), messages


def test_stage2_ab_needs_its_block_and_a_rollout_block(write: WriteConfig) -> None:
    messages = problems(write("c.yaml", "objective: {trainer_variant: stage2_ab}"))
    assert any("there is no 'stage2_ab' block" in m for m in messages)
    assert any("there is no 'rollout' block" in m for m in messages)


def test_stage2_ab_block_with_another_variant(write: WriteConfig) -> None:
    path = write("c.yaml", "stage2_ab: {schedule: {b_ratio: 0.5}}\nrollout: {}")
    assert one_problem(path).startswith("'stage2_ab' block is only valid with 'objective.trainer_variant: stage2_ab'")


def test_stage2_ab_requires_b_ratio(write: WriteConfig) -> None:
    path = write("c.yaml", STAGE2.replace("{b_ratio: 0.5}", "{}") + "rollout: {}")
    assert one_problem(path).startswith("Missing required config key 'stage2_ab.schedule.b_ratio'")


def test_infer_cross_field_rules(write: WriteConfig) -> None:
    assert one_problem(
        write("a.yaml", "infer: {generation: {batch_size: 2}, vllm: {client_concurrency: 3}}")
    ).startswith("'infer.vllm.client_concurrency' must be in [1, infer.generation.batch_size = 2], got 3")
    assert one_problem(write("b.yaml", "infer: {backend: vllm, vllm: {auto_launch: false}}")).startswith(
        "'infer.vllm.base_url' is required in server mode"
    )
    assert one_problem(write("c.yaml", "infer: {vllm: {base_url: 'localhost:8000'}}")).startswith(
        "'infer.vllm.base_url' must be of the form http(s)://host:port"
    )
    for url in ("http://127.0.0.1:8000", "https://h:1/v1", "http://h:9/"):
        load_config(write("d.yaml", f"infer: {{backend: vllm, vllm: {{base_url: '{url}'}}}}"))
    assert one_problem(write("e.yaml", "infer: {device: gpu}")).startswith(
        "'infer.device' must be one of auto, cpu, cuda, cuda:N, got 'gpu'"
    )


def test_model_path_and_tiny_are_exclusive(write: WriteConfig) -> None:
    assert "mutually exclusive" in one_problem(write("c.yaml", "model: {path: m, tiny: {}}"))


def test_tiny_model_geometry_rules(write: WriteConfig) -> None:
    messages = problems(write("c.yaml", "model: {tiny: {text: {mrope_section: [8, 8, 8]}, vision: "
                                         "{num_position_embeddings: 200, deepstack_visual_indexes: [0, 2], "
                                         "patch_size: 14}}}"))
    assert [m.split("'")[1] for m in messages] == [
        "model.tiny.text.mrope_section",
        "model.tiny.vision.deepstack_visual_indexes",
        "model.tiny.vision.num_position_embeddings",
        "model.tiny.vision.patch_size",
    ]


def test_effective_batch_size_and_accumulation_are_exclusive(write: WriteConfig) -> None:
    path = write("c.yaml", "training: {effective_batch_size: 32, gradient_accumulation_steps: 2}")
    assert one_problem(path).startswith("'training.effective_batch_size' and 'training.gradient_accumulation_steps'")


# --------------------------------------------------------------------------------------------
# Entry-point requirements
# --------------------------------------------------------------------------------------------


def test_infer_entry_point_needs_run_stages_model_and_input(write: WriteConfig) -> None:
    messages = problems(write("a.yaml", "{}"), entry_point="infer")
    assert [m.split("'")[1] for m in messages] == ["run.name", "run.output_dir", "stages"]
    messages = problems(write("b.yaml", "run: {name: r, output_dir: o}\nstages: {infer: true, eval: false, vis: false}"),
                        entry_point="infer")
    assert [m.split("'")[1] for m in messages] == ["data.val_jsonl", "model"]
    eval_only = write("c.yaml", "run: {name: r, output_dir: o}\nstages: {infer: false, eval: true, vis: false}")
    assert load_config(eval_only, entry_point="infer").config.stages is not None


def test_train_entry_point_needs_data_and_model(write: WriteConfig) -> None:
    messages = problems(write("a.yaml", "run: {name: r, output_dir: o}\ntraining: {eval_strategy: steps}"),
                        entry_point="train")
    assert [m.split("'")[1] for m in messages] == ["data.train_jsonl", "data.val_jsonl", "model"]


def test_server_launch_entry_point_rules(write: WriteConfig) -> None:
    base = (
        "run: {name: r, output_dir: o}\nmodel: {path: m}\ndata: {train_jsonl: t.jsonl}\n"
        "objective: {trainer_variant: stage2_ab}\nstage2_ab: {schedule: {b_ratio: 0.5}}\n"
    )
    server = "rollout: {backend: vllm, vllm: {mode: server, server: {servers: [{base_url: 'http://h:8000', " \
             "group_port: 5}], launch: {server_gpus: %s, train_gpus: %s, server_tp: 2}}}}"
    assert load_config(write("ok.yaml", base + server % ("[0, 1, 2, 3]", "[4]")), entry_point="stage2_server_launch")
    messages = problems(write("bad.yaml", base + server % ("[0, 1, 2]", "[2]")), entry_point="stage2_server_launch")
    assert [m.split("'")[1] for m in messages] == [
        "rollout.vllm.server.launch.server_tp",
        "rollout.vllm.server.launch.train_gpus",
    ]
    colocate = write("co.yaml", base + "rollout: {backend: vllm, vllm: {max_model_len: 4096}}")
    assert "'rollout.vllm.mode' must be 'server'" in one_problem(colocate, entry_point="stage2_server_launch")


def test_prepare_data_needs_convert_with_required_keys(write: WriteConfig) -> None:
    assert "'data.convert' block is required" in one_problem(write("a.yaml", "{}"), entry_point="prepare_data")
    messages = problems(write("b.yaml", "data: {convert: {source: coco}}"), entry_point="prepare_data")
    assert [m.split("'")[1] for m in messages] == [
        "data.convert.annotations", "data.convert.image_root", "data.convert.output_dir", "data.convert.split",
    ]


def test_loading_touches_no_output_directory(write: WriteConfig, tmp_path: Path) -> None:
    path = write("c.yaml", f"run: {{name: r, output_dir: {tmp_path / 'out'}}}\neval: {{output_dir: {tmp_path / 'ev'}}}")
    load_config(path, entry_point="evaluate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_inert_keys_give_one_warning(write: WriteConfig) -> None:
    path = write("c.yaml", "infer: {backend: hf, vllm: {mode: local, request_timeout_s: 5}}")
    with pytest.warns(UserWarning) as record:
        loaded = load_config(path)
    assert len(record) == 1 and len(loaded.warnings) == 1
    assert "infer.vllm.mode" in loaded.warnings[0] and "infer.vllm.request_timeout_s" in loaded.warnings[0]
    assert "infer.vllm.base_url" not in loaded.warnings[0]


def test_read_merged_returns_raw_merged_data(write: WriteConfig) -> None:
    write("base.yaml", "vis: {limit: 3}")
    data, sources, chain = read_merged(write("c.yaml", "extends: base.yaml\neval: {num_workers: 1}"))
    assert data == {"vis": {"limit": 3}, "eval": {"num_workers": 1}}
    assert len(chain) == 2 and set(sources) == {"vis.limit", "eval.num_workers"}


def test_schema_paths_cover_nested_lists() -> None:
    assert "rollout.vllm.server.servers[].group_port" in SCHEMA_PATHS
    assert "stage2_ab.channel_b.async.queue_limit" in SCHEMA_PATHS


def test_yaml_safe_loader_rejects_python_tags(write: WriteConfig) -> None:
    path = write("c.yaml", "run: !!python/object/apply:os.system ['echo hi']")
    with pytest.raises(ConfigError):
        load_config(path)
    assert yaml is not None
