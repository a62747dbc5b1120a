"""Resolved config: canonical hash (test 11), redaction (test 12), resolved_config.json (test 34, §7.1)."""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from application import wiring
from application.config import (
    canonical_json,
    load_config,
    load_resolved_config,
    redact,
    resolved_dict,
    resolved_sha256,
    structure_config,
    write_resolved_config,
)
from domain.errors import ArtifactError

from .conftest import WriteConfig

STORE = wiring.make_artifact_store()

# One valid value per leaf, and a second valid value for the "changed leaf" property.
LEAVES: dict[str, tuple[Any, Any]] = {
    "run.seed": (3, 4),
    "run.name": ("r", "s"),
    "run.output_dir": ("out", "out2"),
    "training.learning_rate": (1e-3, 2e-3),
    "training.max_length": (4096, 4097),
    "eval.f1ish_iou_thrs": ([0.5], [0.5, 0.7]),
    "eval.semantic.threshold": (0.7, 0.71),
    "infer.generation.batch_size": (4, 5),
    "vis.limit": (None, 7),
    "data.coord_mode": ("numeric", "tokens"),
    "data.train_jsonl": ("a/b.jsonl", "a/c.jsonl"),
    "matching.fp_cost": (1, 1.5),
    "prompt.user": ("Find objects.", "Find all objects."),
    "objective.token_type_metrics.enabled": (True, False),
    "model.dtype": ("float32", "float16"),
}


def _nest(items: list[tuple[str, Any]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for dotted, value in items:
        node = root
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root


@settings(max_examples=40, deadline=None)
@given(
    chosen=st.lists(st.sampled_from(sorted(LEAVES)), min_size=1, unique=True),
    split=st.lists(st.integers(0, 2), min_size=len(LEAVES), max_size=len(LEAVES)),
    data=st.data(),
)
def test_hash_ignores_key_order_and_the_extends_split(chosen: list[str], split: list[int], data: Any) -> None:
    items = [(key, LEAVES[key][0]) for key in chosen]
    shuffled = data.draw(st.permutations(items))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "single.yaml").write_text(yaml.safe_dump(_nest(items), sort_keys=False))
        parts: list[list[tuple[str, Any]]] = [[], [], []]
        for index, item in enumerate(shuffled):
            parts[split[index]].append(item)
        (root / "b0.yaml").write_text(yaml.safe_dump(_nest(parts[0]), sort_keys=False) if parts[0] else "")
        (root / "b1.yaml").write_text(yaml.safe_dump(_nest(parts[1]), sort_keys=False) if parts[1] else "")
        child = "# a comment\nextends: [b0.yaml, b1.yaml]\n"
        child += yaml.safe_dump(_nest(parts[2]), sort_keys=False) if parts[2] else ""
        (root / "child.yaml").write_text(child)
        single = load_config(root / "single.yaml").config
        split_cfg = load_config(root / "child.yaml").config
    assert split_cfg == single
    assert resolved_sha256(split_cfg) == resolved_sha256(single)
    # the hash is the SHA-256 of the canonical JSON of the resolved dict
    assert resolved_sha256(single) == hashlib.sha256(canonical_json(resolved_dict(single))).hexdigest()


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(sorted(LEAVES)))
def test_changing_one_leaf_changes_the_hash(key: str) -> None:
    first, second = LEAVES[key]
    a = structure_config(_nest([(key, first)]))
    b = structure_config(_nest([(key, second)]))
    assert resolved_sha256(a) != resolved_sha256(b)


def test_comments_and_layout_do_not_change_the_hash(write: WriteConfig) -> None:
    a = write("a.yaml", "eval: {metrics: coco, num_workers: 2}\nvis: {limit: 3}\n")
    b = write("b.yaml", """
        # the same settings, block style, other order
        vis:
          limit: 3      # three images
        eval:
          num_workers: 2
          metrics: coco
        """)
    assert resolved_sha256(load_config(a).config) == resolved_sha256(load_config(b).config)


def test_canonical_json_form() -> None:
    assert canonical_json({"b": [1, None], "a": "é"}) == '{"a":"é","b":[1,null]}'.encode()


def test_resolved_dict_is_json_with_paths_as_strings_and_nulls_kept() -> None:
    cfg = structure_config({"data": {"train_jsonl": "x/y.jsonl", "coord_mode": "numeric"}, "model": {"tiny": {}}})
    data = resolved_dict(cfg)
    assert json.loads(json.dumps(data)) == data
    assert data["data"]["train_jsonl"] == "x/y.jsonl" and data["data"]["coord_mode"] == "numeric"
    assert data["data"]["val_jsonl"] is None and data["run"] is None
    assert data["model"]["tiny"]["text"]["mrope_section"] == [6, 5, 5]
    assert data["stage2_ab"] is None
    assert structure_config(data) == cfg  # the resolved form loads back to the same config


def test_resolved_dict_uses_yaml_keys() -> None:
    cfg = structure_config({"stage2_ab": {"schedule": {"b_ratio": 0.5}}})
    channel_b = resolved_dict(cfg)["stage2_ab"]["channel_b"]
    assert "async" in channel_b and "async_" not in channel_b


# --------------------------------------------------------------------------------------------
# Redaction (test 12)
# --------------------------------------------------------------------------------------------


def test_redaction_spec_example() -> None:
    given_doc = {"a": {"hf_token": "x", "items": [{"db_password": "y"}], "tokens_total": 3}}
    assert redact(given_doc) == {"a": {"hf_token": "<REDACTED>", "items": [{"db_password": "<REDACTED>"}],
                                       "tokens_total": 3}}
    assert given_doc["a"]["hf_token"] == "x"  # not mutated


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("access_token", True), ("HF_TOKEN", True), ("huggingface_token", True), ("Token", True),
        ("password", True), ("secret", True), ("api_key", True), ("wandb_api_key", True), ("my_secret", True),
        ("db_password", True), ("refresh_token", True),
        ("tokens_total", False), ("max_new_tokens", False), ("secretary", False), ("api_keys", False),
        ("password_hint", False), ("tokenizer", False), ("token_count", False), ("pad_token_id", False),
    ],
)
def test_redaction_key_rule(key: str, secret: bool) -> None:
    assert redact({key: {"v": 1}}) == ({key: "<REDACTED>"} if secret else {key: {"v": 1}})


_KEYS = st.sampled_from(["a", "token", "hf_token", "x_password", "tokens", "secret_sauce", "API_KEY", "n", "my_secret"])
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=20,
)


def _check_redacted(before: Any, after: Any) -> None:
    if isinstance(before, dict):
        assert isinstance(after, dict) and list(after) == list(before)
        for key, value in before.items():
            lowered = key.lower()
            secret = lowered in {"token", "hf_token", "api_key"} or lowered.endswith(("_password", "_secret"))
            if secret:
                assert after[key] == "<REDACTED>"
            else:
                _check_redacted(value, after[key])
    elif isinstance(before, list):
        assert isinstance(after, list) and len(after) == len(before)
        for b, a in zip(before, after):
            _check_redacted(b, a)
    else:
        assert after == before


@settings(max_examples=150, deadline=None)
@given(_JSON)
def test_redaction_property(doc: Any) -> None:
    original = copy.deepcopy(doc)
    out = redact(doc)
    assert doc == original
    _check_redacted(doc, out)
    assert redact(out) == out


# --------------------------------------------------------------------------------------------
# resolved_config.json
# --------------------------------------------------------------------------------------------


def test_write_resolved_config_train(write: WriteConfig, tmp_path: Path) -> None:
    base = write("base.yaml", "run: {output_dir: out, seed: 5}")
    child = write("child.yaml", "extends: base.yaml\nrun: {name: r}\ntraining: {learning_rate: 1e-3}")
    loaded = load_config(child)
    run_dir = tmp_path / "out" / "r"
    path = write_resolved_config(loaded, run_dir, "train", extra={"note": {"hf_token": "abc"}}, store=STORE)
    assert path == run_dir / "resolved_config.json"
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.startswith('{\n  "schema_version": 1,')
    doc = json.loads(text)
    assert doc["schema_version"] == 1 and type(doc["schema_version"]) is int and doc["kind"] == "train"
    assert doc["config_path"] == str(child) and doc["config_path_abs"] == str(child.resolve())
    assert doc["extends_chain"] == [str(base.resolve()), str(child.resolve())]
    assert doc["resolved_config_sha256"] == resolved_sha256(loaded.config)
    assert doc["resolved"] == resolved_dict(loaded.config)
    assert doc["note"] == {"hf_token": "<REDACTED>"}
    assert sorted(p.name for p in run_dir.iterdir()) == ["resolved_config.json"]  # no temp file left


def test_write_resolved_config_rejects_unknown_kind_and_reserved_extra(tmp_path: Path) -> None:
    cfg = structure_config({})
    with pytest.raises(ValueError, match="unknown resolved_config kind"):
        write_resolved_config(cfg, tmp_path, "training", store=STORE)
    with pytest.raises(ValueError, match="would overwrite"):
        write_resolved_config(cfg, tmp_path, "train", extra={"kind": "x"}, store=STORE)
    assert list(tmp_path.iterdir()) == []


def _infer_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1, "kind": "infer_pipeline", "config_path": "c.yaml", "config_path_abs": "/c.yaml",
        "resolved_config_sha256": "0" * 64, "infer_fingerprint": None, "image_root": "/img",
        "image_root_source": "config", "stages": {"infer": True, "eval": True, "vis": False},
        "artifacts": {"run_dir": "/out/r", "gt_vs_pred_jsonl": "/out/r/gt_vs_pred.jsonl"},
        "prompt": {"variant": "default", "field_order": "desc_first"}, "resolved": {"anything": 1},
    }
    doc.update(changes)
    return doc


def test_written_infer_document_loads_back(tmp_path: Path) -> None:
    cfg = structure_config({"stages": {"infer": True, "eval": True, "vis": False}})
    extra = {k: v for k, v in _infer_doc().items()
             if k not in ("schema_version", "kind", "resolved_config_sha256", "resolved")}
    path = write_resolved_config(cfg, tmp_path, "infer_pipeline", extra=extra, store=STORE)
    doc = load_resolved_config(path)
    assert doc["stages"] == {"infer": True, "eval": True, "vis": False}
    assert doc["resolved"] == resolved_dict(cfg)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ([1, 2], "must be a JSON object"),
        (_infer_doc(schema_version="1"), "schema_version must be an int"),
        (_infer_doc(schema_version=True), "schema_version must be an int"),
        (_infer_doc(schema_version=2), "Unsupported resolved_config schema_version: 2"),
        (_infer_doc(kind="train"), "kind must be 'infer_pipeline'"),
        (_infer_doc(stages={"infer": True, "eval": True}), "stages must have the keys infer, eval and vis"),
        (_infer_doc(artifacts={"gt_vs_pred_jsonl": "x"}), "artifacts.run_dir is missing"),
        (_infer_doc(image_root_source="env"), "unknown image_root_source 'env'"),
        # order of the checks: the version is judged before the kind
        (_infer_doc(schema_version="1", kind="train"), "schema_version must be an int"),
        (_infer_doc(schema_version=2, kind="train"), "Unsupported resolved_config schema_version: 2"),
    ],
)
def test_load_resolved_config_rejections(tmp_path: Path, doc: Any, expected: str) -> None:
    path = tmp_path / "resolved_config.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_resolved_config(path)


def test_load_resolved_config_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "resolved_config.json"
    path.write_text(textwrap.dedent('{"schema_version": 1,'))
    with pytest.raises(ArtifactError, match="cannot read"):
        load_resolved_config(path)


def test_valid_document_is_returned_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "resolved_config.json"
    path.write_text(json.dumps(_infer_doc()))
    assert load_resolved_config(path) == _infer_doc()
