"""The evaluator's pure core: validation codes, mapping rules, F1-ish matching, COCO documents."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ArtifactError, DataContractError
from domain.evaluation import (
    Category,
    CategoryTable,
    CoordSpace,
    EvalImage,
    EvalObject,
    MappingRule,
    PredScope,
    ScoreMode,
    assign_image_ids,
    box_iou_matrix,
    canonical_coco_gt,
    categories_from_gt,
    check_coco_iou_thrs,
    check_f1ish_iou_thrs,
    coco_metric_keys,
    coco_prediction,
    count_images,
    eval_metric_keys,
    f1ish_image,
    f1ish_metric_keys,
    f1ish_scope_mask,
    f1ish_summary,
    greedy_match,
    is_image_info,
    join_official_images,
    matches_file_name,
    normalize_desc,
    parse_artifact_line,
    per_class_ap,
    precision_curves,
    prepare_record,
    prf,
    primary_f1ish_threshold,
    rebuilt_coco_gt,
    semantic_report,
    validate_gt_object,
    validate_prediction,
)
from domain.objects import GeometryKind

BBOX = GeometryKind.BBOX
POLY = GeometryKind.POLY


def box(points: Sequence[int], desc: str, score: float | None = None) -> EvalObject:
    return EvalObject(BBOX, tuple(points), desc, score)


def image(
    gt: Sequence[EvalObject], preds: Sequence[EvalObject], image_id: int = 0, w: int = 640, h: int = 480
) -> EvalImage:
    return EvalImage(image_id, image_id + 1, f"img{image_id}.jpg", w, h, None, tuple(gt), tuple(preds), ())


def table_similarity(pairs: dict[frozenset[str], float]):
    """A fake cosine: 1.0 for equal strings, the listed value for a pair, else 0.0."""

    def similarity(query: str, candidates: Sequence[str]) -> list[float]:
        return [1.0 if query == c else pairs.get(frozenset((query, c)), 0.0) for c in candidates]

    return similarity


# --- keys -------------------------------------------------------------------------------------


def test_metric_keys_follow_the_spec_spelling() -> None:
    assert coco_metric_keys("bbox")[:3] == ("bbox_AP", "bbox_AP50", "bbox_AP75")
    assert coco_metric_keys("segm")[-1] == "segm_ARl"
    keys = f1ish_metric_keys(0.3)
    assert (
        "f1ish@0.30_tp_loc" in keys
        and "f1ish@0.30_f1_full_macro" in keys
        and "f1ish@0.30_sem_acc_on_matched" in keys
    )
    assert len(keys) == 24
    assert len(eval_metric_keys((0.3, 0.5))) == 24 + 48


def test_primary_threshold_and_match_file_names() -> None:
    assert primary_f1ish_threshold([0.3, 0.5, 0.7]) == 0.5
    assert primary_f1ish_threshold([0.3, 0.7]) == 0.7
    assert matches_file_name(0.5, 0.5) == "matches.jsonl"
    assert matches_file_name(0.3, 0.5) == "matches@0.30.jsonl"


def test_iou_threshold_checks() -> None:
    assert check_coco_iou_thrs(None) == []
    assert check_coco_iou_thrs([0.5, 0.75]) == []
    problems = check_coco_iou_thrs([0.6, 0.7])
    assert any("0.5" in p for p in problems) and any("0.75" in p for p in problems)
    assert check_coco_iou_thrs([0.75, 0.5])  # not increasing
    assert check_f1ish_iou_thrs([0.3, 0.5]) == []
    assert check_f1ish_iou_thrs([])
    assert check_f1ish_iou_thrs([0.5, 0.5])
    assert check_f1ish_iou_thrs([0.0])


# --- artifact lines and ids -------------------------------------------------------------------


def test_malformed_line_names_path_line_and_a_200_char_snippet() -> None:
    text = "{" + "x" * 300
    with pytest.raises(ArtifactError) as err:
        parse_artifact_line(text, "run/gt_vs_pred.jsonl", 7)
    message = str(err.value)
    assert message.startswith("Malformed JSONL at run/gt_vs_pred.jsonl:7: ")
    assert message.endswith("…")
    assert len(message.split(": ", 1)[1]) == 201


def test_non_object_line_and_blank_line() -> None:
    with pytest.raises(ArtifactError, match=r"Non-object JSONL record at a.jsonl:3"):
        parse_artifact_line("[1, 2]", "a.jsonl", 3)
    assert parse_artifact_line("   \n", "a.jsonl", 1) is None
    with pytest.raises(ArtifactError, match="Malformed"):
        parse_artifact_line('{"a": NaN}', "a.jsonl", 1)


def test_image_ids_from_index_or_ordinal() -> None:
    assert assign_image_ids([{}, {}], "f", [1, 2]) == [0, 1]
    assert assign_image_ids([{"index": 5}, {"index": 2}], "f", [1, 2]) == [5, 2]
    with pytest.raises(DataContractError, match="f:2: index"):
        assign_image_ids([{"index": 0}, {}], "f", [1, 2])
    with pytest.raises(DataContractError, match="duplicate"):
        assign_image_ids([{"index": 0}, {"index": 0}], "f", [1, 2])
    with pytest.raises(DataContractError, match="non-negative"):
        assign_image_ids([{"index": -1}], "f", [1])
    with pytest.raises(DataContractError, match="non-negative"):
        assign_image_ids([{"index": True}], "f", [1])


# --- prediction / GT validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ({"type": "line", "points": [0, 0, 1, 1], "desc": "a"}, "geometry_kind"),
        ("not an object", "geometry_kind"),
        ({"type": "bbox_2d", "points": [[0, 0], [5, 5]], "desc": "a"}, "geometry_points"),
        ({"type": "bbox_2d", "points": "0,0,5,5", "desc": "a"}, "geometry_points"),
        ({"type": "bbox_2d", "points": [0, 0, 5], "desc": "a"}, "bbox_points"),
        ({"type": "poly", "points": [0, 0, 5, 5], "desc": "a"}, "poly_points"),
        ({"type": "poly", "points": [0, 0, 5, 5, 9], "desc": "a"}, "poly_points"),
        ({"type": "bbox_2d", "points": [0, 0, 5.5, 5], "desc": "a"}, "coord_parse"),
        ({"type": "bbox_2d", "points": [0, 0, 5.0, 5], "desc": "a"}, "coord_parse"),
        ({"type": "bbox_2d", "points": [0, True, 5, 5], "desc": "a"}, "coord_parse"),
        ({"type": "bbox_2d", "points": [0, 0, 64, 5], "desc": "a"}, "coord_range"),
        ({"type": "bbox_2d", "points": [0, -1, 5, 5], "desc": "a"}, "coord_range"),
        ({"type": "bbox_2d", "points": [3, 0, 3, 5], "desc": "a"}, "degenerate"),
        ({"type": "bbox_2d", "points": [4, 0, 3, 5], "desc": "a"}, "degenerate"),
        ({"type": "poly", "points": [0, 0, 5, 5, 10, 10], "desc": "a"}, "degenerate"),
    ],
)
def test_prediction_codes(obj: object, code: str) -> None:
    assert validate_prediction(obj, 64, 48, CoordSpace.PIXEL, 1.0) == code


def test_valid_prediction_keeps_points_and_strips_desc() -> None:
    got = validate_prediction(
        {"type": "bbox_2d", "points": [0, 0, 63, 47], "desc": " cat "}, 64, 48, CoordSpace.PIXEL, 0.5
    )
    assert got == EvalObject(BBOX, (0, 0, 63, 47), "cat", 0.5)
    no_desc = validate_prediction({"type": "bbox_2d", "points": [0, 0, 6, 4]}, 64, 48, CoordSpace.PIXEL, 0.5)
    assert isinstance(no_desc, EvalObject) and no_desc.desc == ""


def test_norm1000_records_are_denormalised_with_the_codec() -> None:
    # §2.4 worked numbers: bins [12, 40, 300, 410] on 640x480 -> [8, 19, 192, 197]
    got = validate_prediction(
        {"type": "bbox_2d", "points": [12, 40, 300, 410], "desc": "chair"}, 640, 480, CoordSpace.NORM1000, 1.0
    )
    assert isinstance(got, EvalObject) and got.points == (8, 19, 192, 197)
    # bins 10 and 11 on W = 64 both become pixel 1: zero width
    assert (
        validate_prediction(
            {"type": "bbox_2d", "points": [10, 0, 11, 999], "desc": "a"}, 64, 48, CoordSpace.NORM1000, 1.0
        )
        == "degenerate"
    )
    assert (
        validate_prediction(
            {"type": "bbox_2d", "points": [0, 0, 1000, 5], "desc": "a"}, 64, 48, CoordSpace.NORM1000, 1.0
        )
        == "coord_range"
    )


def record(gt: list[object], pred: list[object], **extra: object) -> dict[str, object]:
    return {
        "index": 0,
        "image": "images/a.jpg",
        "width": 64,
        "height": 48,
        "coord_mode": "pixel",
        "gt": gt,
        "pred": pred,
        **extra,
    }


def test_invalid_gt_raises_with_path_line_and_object_index() -> None:
    rec = record(
        [
            {"type": "bbox_2d", "points": [0, 0, 5, 5], "desc": "a"},
            {"type": "bbox_2d", "points": [0, 0, 5], "desc": "b"},
        ],
        [],
    )
    with pytest.raises(DataContractError, match=r"run\.jsonl:4: gt\[1\]: bbox_points"):
        prepare_record(rec, image_id=0, path="run.jsonl", line=4, score_mode=ScoreMode.CONSTANT)
    rec = record([{"type": "bbox_2d", "points": [0, 0, 5, 5], "desc": "  "}], [])
    with pytest.raises(DataContractError, match=r"gt\[0\]\.desc"):
        prepare_record(rec, image_id=0, path="run.jsonl", line=4, score_mode=ScoreMode.CONSTANT)


def test_zero_extent_gt_from_adjacent_bins_stays_valid() -> None:
    rec = record([{"type": "bbox_2d", "points": [10, 0, 11, 999], "desc": "a"}], [], coord_mode="norm1000")
    img = prepare_record(rec, image_id=0, path="p", line=1, score_mode=ScoreMode.CONSTANT)
    assert img.gt[0].points == (1, 0, 1, 47)


def test_scores_token_prob_requires_valid_scores_constant_sets_one() -> None:
    pred = {"type": "bbox_2d", "points": [0, 0, 5, 5], "desc": "a"}
    for bad in (None, "0.5", 1.5, -0.1, float("nan"), True):
        p = dict(pred) if bad is None else {**pred, "score": bad}
        with pytest.raises(ArtifactError) as err:
            prepare_record(
                record([], [p]), image_id=0, path="run.jsonl", line=9, score_mode=ScoreMode.TOKEN_PROB
            )
        assert str(err.value) == (
            "prediction without a valid score at run.jsonl:9; set eval.score_mode: constant to evaluate unscored artifacts"
        )
    img = prepare_record(
        record([], [{**pred, "score": 0.2}, pred]),
        image_id=0,
        path="p",
        line=1,
        score_mode=ScoreMode.CONSTANT,
    )
    assert [p.score for p in img.preds] == [1.0, 1.0]


def test_record_level_errors_are_collected() -> None:
    rec = {"image": 3, "width": 0, "height": True, "coord_mode": "bins", "gt": {}, "pred": None}
    with pytest.raises(DataContractError) as err:
        prepare_record(rec, image_id=0, path="x.jsonl", line=2, score_mode=ScoreMode.CONSTANT)
    text = str(err.value)
    for field in ("image", "width", "height", "coord_mode", "gt", "pred"):
        assert f"x.jsonl:2: {field}:" in text


def test_counters_group_codes() -> None:
    rec = record(
        [],
        [
            {"type": "bbox_2d", "points": [[0, 0], [1, 1]], "desc": "a"},
            {"type": "bbox_2d", "points": [0, 0, 0, 5], "desc": "a"},
            {"type": "bbox_2d", "points": [0, 0, 99, 5], "desc": "a"},
            {"type": "bbox_2d", "points": [0, 0, 9, 5], "desc": "a"},
        ],
    )
    img = prepare_record(rec, image_id=0, path="p", line=1, score_mode=ScoreMode.CONSTANT)
    counters = count_images([img, image([], [], image_id=1)])
    assert (
        counters["invalid_geometry"] == 2 and counters["degenerate"] == 1 and counters["geometry_points"] == 1
    )
    assert counters["invalid_coord"] == 1 and counters["coord_range"] == 1
    assert counters["pred_objects"] == 4 and counters["images"] == 2 and counters["empty_pred"] == 1
    assert [b.index for b in img.invalid_preds] == [0, 1, 2]


# --- descriptions and categories ----------------------------------------------------------------


def test_normalize_examples() -> None:
    assert normalize_desc("Bow_(weapon)") == "bow weapon"
    assert normalize_desc("  traffic_light ") == "traffic light"
    assert normalize_desc("a/b  c") == "a b c"


@given(st.text(max_size=30))
def test_normalize_is_idempotent_and_canonical(text: str) -> None:
    norm = normalize_desc(text)
    assert normalize_desc(norm) == norm
    assert norm == norm.strip() and "  " not in norm
    assert not any(c in norm for c in "_/()")


def test_categories_first_seen_by_image_id_then_object_order() -> None:
    images = [
        image([box([0, 0, 5, 5], "dog"), box([0, 0, 5, 5], "Cat")], [], image_id=3),
        image([box([0, 0, 5, 5], "cat"), box([0, 0, 5, 5], "dog")], [], image_id=1),
    ]
    assert categories_from_gt(images) == (Category(1, "cat"), Category(2, "dog"), Category(3, "Cat"))


def test_mapping_rules_in_order() -> None:
    table = CategoryTable(
        [Category(1, "dog"), Category(2, "traffic light"), Category(3, "unknown"), Category(4, "Dog")]
    )
    sim = table_similarity(
        {
            frozenset(("puppy", "dog")): 0.65,
            frozenset(("kitten", "dog")): 0.55,
            frozenset(("thing", "unknown")): 0.99,
        }
    )
    assert table.map_desc("dog", sim, 0.6).rule is MappingRule.EXACT
    assert table.map_desc("Dog", sim, 0.6).category_id == 4  # exact beats normalized
    got = table.map_desc("DOG", sim, 0.6)
    assert (got.rule, got.category_id) == (MappingRule.NORMALIZED, 1)  # lowest id among normalized hits
    assert table.map_desc("traffic_light", sim, 0.6).category_id == 2
    puppy = table.map_desc("puppy", sim, 0.6)
    assert (puppy.rule, puppy.category_id, puppy.score) == (MappingRule.SEMANTIC, 1, 0.65)
    kitten = table.map_desc("kitten", sim, 0.6)
    assert (kitten.rule, kitten.category_id, kitten.best_category_id, kitten.semantic_ran) == (
        MappingRule.UNMAPPED,
        None,
        1,
        True,
    )
    assert table.map_desc("thing", sim, 0.6).rule is MappingRule.UNMAPPED  # 'unknown' is never a candidate
    assert table.map_desc("", sim, 0.6).rule is MappingRule.UNMAPPED
    assert table.map_desc("puppy", None, 0.6).rule is MappingRule.UNMAPPED  # semantic step off


def test_semantic_ties_go_to_the_lowest_id() -> None:
    table = CategoryTable([Category(7, "b"), Category(2, "a")])
    got = table.map_desc("z", lambda q, cs: [0.8 for _ in cs], 0.6)
    assert got.category_id == 2


def test_semantic_report_rows_sorted_and_capped() -> None:
    table = CategoryTable([Category(1, "dog")])
    sim = table_similarity({})
    mappings = {
        f"d{i}": table.map_desc(f"d{i}", lambda q, cs, i=i: [i / 1000 for _ in cs], 0.6) for i in range(250)
    }
    mappings["dog"] = table.map_desc("dog", sim, 0.6)
    counts = {d: (2 if d == "d3" else 1) for d in mappings}
    report = semantic_report(
        mappings, counts, table, model_path="/m", threshold=0.6, unmapped_total_preds=251
    )
    assert len(report["rows"]) == 200
    assert report["rows"][0]["pred_desc"] == "d3"
    assert report["rows"][1]["pred_desc"] == "d249"  # then by score descending
    assert report["unique_unmapped_desc"] == 250 and report["behavior"] == "map-or-drop"
    assert all(r["pred_desc"] != "dog" for r in report["rows"])  # exact matches never reach rule 3


# --- COCO documents -----------------------------------------------------------------------------


def test_rebuilt_gt_ids_areas_and_quads() -> None:
    square = EvalObject(POLY, (0, 0, 10, 0, 10, 10, 0, 10), "sq")  # unit square scaled to 10x10
    chair = box([8, 19, 192, 197], "chair")
    images = [image([chair], [], image_id=0), image([square, chair], [], image_id=1)]
    table = CategoryTable(categories_from_gt(images))
    doc = rebuilt_coco_gt(images, table, with_segmentation=True)
    anns = doc["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3]
    assert anns[0]["bbox"] == [8, 19, 184, 178] and anns[0]["area"] == 32752
    assert anns[0]["segmentation"] == [[8, 19, 192, 19, 192, 197, 8, 197]]
    assert anns[1]["area"] == 100 and anns[1]["segmentation"] == [[0, 0, 10, 0, 10, 10, 0, 10]]
    assert all(a["iscrowd"] == 0 for a in anns)
    assert doc["categories"] == [{"id": 1, "name": "chair"}, {"id": 2, "name": "sq"}]
    assert "segmentation" not in rebuilt_coco_gt(images, table, with_segmentation=False)["annotations"][0]


def test_prediction_scaling_to_official_size() -> None:
    pred = box([10, 20, 30, 60], "a", 0.5)
    out = coco_prediction(pred, coco_image_id=9, category_id=3, with_segmentation=True, scale=(2.0, 0.5))
    assert out == {"image_id": 9, "category_id": 3, "bbox": [20.0, 10.0, 40.0, 20.0], "score": 0.5}
    poly = EvalObject(POLY, (0, 0, 10, 0, 10, 10), "a", 0.5)
    seg = coco_prediction(poly, coco_image_id=1, category_id=1, with_segmentation=True, scale=(2.0, 0.5))
    assert seg["segmentation"] == [[0.0, 0.0, 20.0, 0.0, 20.0, 5.0]]


def test_image_info_file_is_accepted_only_when_asked() -> None:
    """A test-dev image-info file (no ``annotations`` key) is not a ground truth with no objects."""
    info = {"images": [{"id": "7", "file_name": "x.jpg", "width": 4, "height": 3}], "categories": []}
    assert is_image_info(info)
    assert not is_image_info({**info, "annotations": []})
    assert not is_image_info({"images": []})
    with pytest.raises(ArtifactError, match="'annotations' must be a list"):
        canonical_coco_gt(info, "info.json")
    gt = canonical_coco_gt(info, "info.json", image_info=True)
    assert gt["annotations"] == [] and gt["images"][0]["id"] == 7 and "annotations" not in info
    with pytest.raises(ArtifactError, match="'categories' must be a list"):
        canonical_coco_gt({"images": []}, "info.json", image_info=True)
    with pytest.raises(ArtifactError, match="has no 'annotations'"):
        canonical_coco_gt({**info, "annotations": []}, "info.json", image_info=True)


def test_official_join_by_image_id_then_basename() -> None:
    gt = canonical_coco_gt(
        {
            "images": [{"id": "7", "file_name": "x.jpg"}, {"id": 8, "file_name": "y.jpg"}],
            "annotations": [],
            "categories": [],
        }
    )
    a = EvalImage(0, 1, "images/val/y.jpg", 10, 10, None, (), (), ())
    b = EvalImage(1, 2, "whatever.jpg", 10, 10, 7, (), (), ())
    joined = join_official_images([a, b], gt, artifact="a.jsonl", gt_source="gt.json")
    assert joined[0]["id"] == 8 and joined[1]["id"] == 7
    c = EvalImage(2, 3, "missing.jpg", 10, 10, None, (), (), ())
    with pytest.raises(DataContractError, match=r"a.jsonl:3: image: no image in gt.json"):
        join_official_images([a, c], gt, artifact="a.jsonl", gt_source="gt.json")
    d = EvalImage(3, 4, "other/y.jpg", 10, 10, None, (), (), ())
    with pytest.raises(DataContractError, match="already joined"):
        join_official_images([a, d], gt, artifact="a.jsonl", gt_source="gt.json")


def test_per_class_ap_and_curves_from_a_precision_array() -> None:
    # T=2 (0.5, 0.75), R=3, K=2, A=1, M=3
    precision = -np.ones((2, 3, 2, 1, 3))
    precision[:, :, 0, 0, 2] = [[1.0, 0.5, 0.0], [0.5, 0.5, 0.5]]
    precision[:, :, 0, 0, 0] = 0.0  # another maxDets: ignored
    ap = per_class_ap(precision, [4, 9], max_dets_index=2)
    assert ap[0] == (4, pytest.approx(3.0 / 6.0))
    assert ap[1][0] == 9 and math.isnan(ap[1][1])
    curves = precision_curves(precision, [0.5, 0.75], [0.0, 0.5, 1.0], max_dets_index=2)
    named = dict(curves.curves)
    assert named["0.50"] == (1.0, 0.5, 0.0) and named["0.75"] == (0.5, 0.5, 0.5)
    assert named["mean"] == (0.75, 0.5, 0.25)


# --- F1-ish -------------------------------------------------------------------------------------


def worked_example() -> EvalImage:
    gt = [box([0, 0, 100, 100], "cat"), box([200, 200, 300, 300], "dog")]
    preds = [
        box([0, 0, 100, 90], "cat", 0.9),
        box([200, 200, 300, 300], "cat", 0.8),
        box([400, 400, 450, 450], "car", 0.7),
    ]
    return image(gt, preds)


WORKED_SIM = table_similarity(
    {frozenset(("cat", "dog")): 0.3, frozenset(("car", "cat")): 0.5, frozenset(("car", "dog")): 0.4}
)


def test_worked_example_scope_annotated() -> None:
    img = worked_example()
    iou = box_iou_matrix(img.preds, img.gt)
    assert iou[0, 0] == pytest.approx(0.9) and iou[1, 1] == 1.0 and iou[2].max() == 0.0
    mask = f1ish_scope_mask(img, PredScope.ANNOTATED, WORKED_SIM, 0.6)
    assert mask == [True, True, False]
    res = f1ish_image(img, iou, 0.5, mask, WORKED_SIM, 0.6)
    assert [(m.pred_idx, m.gt_idx) for m in res.matches] == [(1, 1), (0, 0)]  # acceptance order
    assert (res.tp_loc, res.fp_loc, res.fn_loc) == (2, 0, 0)
    assert (res.tp_full, res.fp_full, res.fn_full) == (1, 1, 1)
    summary = f1ish_summary([res], 0.5)
    assert summary["f1ish@0.50_pred_total"] == 3 and summary["f1ish@0.50_pred_eval"] == 2
    assert summary["f1ish@0.50_pred_ignored"] == 1
    for level, value in (("loc", 1.0), ("full", 0.5)):
        for name in ("precision", "recall", "f1"):
            assert summary[f"f1ish@0.50_{name}_{level}_micro"] == pytest.approx(value)
    assert summary["f1ish@0.50_sem_acc_on_matched"] == 0.5


def test_worked_example_scope_all() -> None:
    img = worked_example()
    iou = box_iou_matrix(img.preds, img.gt)
    mask = f1ish_scope_mask(img, PredScope.ALL, WORKED_SIM, 0.6)
    s = f1ish_summary([f1ish_image(img, iou, 0.5, mask, WORKED_SIM, 0.6)], 0.5)
    assert s["f1ish@0.50_pred_eval"] == 3 and s["f1ish@0.50_fp_loc"] == 1
    assert s["f1ish@0.50_precision_loc_micro"] == pytest.approx(2 / 3)
    assert s["f1ish@0.50_recall_loc_micro"] == 1.0
    assert s["f1ish@0.50_f1_loc_micro"] == pytest.approx(0.8)
    assert s["f1ish@0.50_fp_full"] == 2
    assert s["f1ish@0.50_precision_full_micro"] == pytest.approx(1 / 3)
    assert s["f1ish@0.50_recall_full_micro"] == pytest.approx(0.5)
    assert s["f1ish@0.50_f1_full_micro"] == pytest.approx(0.4)


def test_scope_without_semantic_uses_equality_only() -> None:
    img = image(
        [box([0, 0, 10, 10], "Dog_(pet)")],
        [box([0, 0, 10, 10], "dog pet", 1.0), box([0, 0, 10, 10], "puppy", 1.0)],
    )
    assert f1ish_scope_mask(img, PredScope.ANNOTATED, None, 0.6) == [True, False]


def test_alignment_example_with_an_empty_gt_image() -> None:
    a = image([box([0, 0, 10, 10], "a")], [box([0, 0, 10, 10], "a", 1.0)], image_id=0)
    x = image([], [box([0, 0, 10, 10], "x", 1.0)], image_id=1)
    c = image([box([5, 5, 20, 20], "c")], [box([5, 5, 20, 20], "c", 1.0)], image_id=2)
    results = [
        f1ish_image(im, box_iou_matrix(im.preds, im.gt), 0.5, [True] * len(im.preds), None, 0.6)
        for im in (a, x, c)
    ]
    s = f1ish_summary(results, 0.5)
    assert (s["f1ish@0.50_tp_loc"], s["f1ish@0.50_fp_loc"], s["f1ish@0.50_fn_loc"]) == (2, 1, 0)
    # macro: images a and c perfect, x has P = 0 -> F1 0
    assert s["f1ish@0.50_f1_loc_macro"] == pytest.approx(2 / 3)


def test_prf_edge_cases() -> None:
    assert prf(0, 0, 0) == (1.0, 1.0, 1.0)
    assert prf(0, 3, 0) == (0.0, 1.0, 0.0)
    assert prf(0, 2, 2) == (0.0, 0.0, 0.0)
    assert f1ish_summary([], 0.5)["f1ish@0.50_f1_loc_macro"] == -1.0  # no images: undefined (issue 11 item 4)


def _iou_matrices() -> st.SearchStrategy[np.ndarray]:
    values = st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.5, 0.6, 0.75, 0.9, 1.0])
    return st.integers(0, 5).flatmap(
        lambda n: st.integers(0, 5).flatmap(
            lambda m: st.lists(st.lists(values, min_size=m, max_size=m), min_size=n, max_size=n).map(
                lambda rows: np.array(rows, dtype=np.float64).reshape(n, m)
            )
        )
    )


@settings(max_examples=200, deadline=None)
@given(_iou_matrices(), st.sampled_from([0.3, 0.5, 0.75]), st.data())
def test_greedy_match_invariants(iou: np.ndarray, thr: float, data: st.DataObject) -> None:
    n, m = iou.shape
    eligible = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    pairs = greedy_match(iou, thr, eligible)
    preds = [p for p, _, _ in pairs]
    gts = [g for _, g, _ in pairs]
    assert len(set(preds)) == len(preds) and len(set(gts)) == len(gts)  # 1:1
    assert all(eligible[p] and v >= thr and v == iou[p, g] for p, g, v in pairs)
    keys = [(-v, p, g) for p, g, v in pairs]
    assert keys == sorted(keys)  # acceptance order is the sort order
    # maximal: no eligible pair above the threshold has both sides free
    for p, g in itertools.product(range(n), range(m)):
        if eligible[p] and iou[p, g] >= thr:
            assert p in preds or g in gts
    # greedy: each accepted pair beats every pair it blocked that was still open at its turn
    taken_p: set[int] = set()
    taken_g: set[int] = set()
    for p, g, v in pairs:
        for q, h in itertools.product(range(n), range(m)):
            if eligible[q] and iou[q, h] >= thr and q not in taken_p and h not in taken_g:
                assert (-v, p, g) <= (-iou[q, h], q, h)
        taken_p.add(p)
        taken_g.add(g)


@settings(max_examples=100, deadline=None)
@given(_iou_matrices(), st.sampled_from([0.3, 0.5]))
def test_counts_are_consistent(iou: np.ndarray, thr: float) -> None:
    n, m = iou.shape
    img = image(
        [box([0, 0, 1, 1], "a")] * m, [box([0, 0, 1, 1], "a" if i % 2 else "b", 1.0) for i in range(n)]
    )
    res = f1ish_image(img, iou, thr, [True] * n, None, 0.6)
    assert res.tp_loc + res.fp_loc == n and res.tp_loc + res.fn_loc == m
    assert res.tp_full + res.fp_full == n and res.tp_full + res.fn_full == m
    assert res.sem_ok + res.sem_bad == res.tp_loc
    assert sorted([*res.unmatched_pred_indices, *(mm.pred_idx for mm in res.matches)]) == list(range(n))


def test_iou_matrix_shape_is_checked() -> None:
    img = worked_example()
    with pytest.raises(ValueError, match="shape"):
        f1ish_image(img, np.zeros((2, 2)), 0.5, [True, True, True], None, 0.6)


_coords = st.integers(0, 60)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(_coords, _coords, _coords, _coords), max_size=5),
    st.lists(st.tuples(_coords, _coords, _coords, _coords), max_size=5),
)
def test_box_iou_matrix_equals_the_geometry_rule(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> None:
    from domain.geometry import box_iou

    preds = [box([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], "p", 1.0) for x1, y1, x2, y2 in a]
    gts = [box([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], "g") for x1, y1, x2, y2 in b]
    got = box_iou_matrix(preds, gts)
    assert got.shape == (len(preds), len(gts))
    for i, p in enumerate(preds):
        for j, g in enumerate(gts):
            assert got[i, j] == pytest.approx(box_iou(p.points, g.points), abs=1e-15)
            assert 0.0 <= got[i, j] <= 1.0


# --- the semantic threshold is inclusive (infer-eval-config.md: cosine >= threshold) -----------------


@pytest.mark.parametrize(
    ("cosine", "accepted"), [(0.6, True), (math.nextafter(0.6, 0.0), False), (math.nextafter(0.6, 1.0), True)]
)
def test_semantic_threshold_boundary_is_inclusive_everywhere(cosine: float, accepted: bool) -> None:
    """A cosine exactly at the threshold maps (desc -> category), counts as annotated (scope mask) and as a
    semantically correct match (F1-ish full); one ulp below it does none of the three."""
    sim = table_similarity({frozenset(("puppy", "dog")): cosine})
    got = CategoryTable([Category(1, "dog")]).map_desc("puppy", sim, 0.6)
    assert (got.rule, got.category_id, got.score) == (
        (MappingRule.SEMANTIC, 1, cosine) if accepted else (MappingRule.UNMAPPED, None, cosine)
    )
    img = image([box([0, 0, 100, 100], "dog")], [box([0, 0, 100, 100], "puppy", 0.9)])
    assert f1ish_scope_mask(img, PredScope.ANNOTATED, sim, 0.6) == [accepted]
    res = f1ish_image(img, box_iou_matrix(img.preds, img.gt), 0.5, [True], sim, 0.6)
    assert [(m.sem_sim, m.sem_ok) for m in res.matches] == [(cosine, accepted)]
    assert (res.tp_full, res.fp_full, res.fn_full) == ((1, 0, 0) if accepted else (0, 1, 1))


# The one-expression check of plain pixel boxes in prepare_record decides exactly as the full checks.


@st.composite
def _pixel_record(draw: st.DrawFn) -> tuple[int, int, list[object], list[object]]:
    """Small images and objects that sit on every boundary of the plain-box check: coordinates at -1,
    0, the last pixel and one beyond, equal and inverted corners, other types and shapes, bad descs."""
    w, h = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    odd = st.sampled_from([True, 1.0, 2.5, "3", None, [1]])

    def obj() -> object:
        if draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from([None, [], "bbox", 3]))
        xs = [draw(st.integers(-1, w)) for _ in range(2)]
        ys = [draw(st.integers(-1, h)) for _ in range(2)]
        points: list[object] = [xs[0], ys[0], xs[1], ys[1]]
        if draw(st.integers(0, 5)) == 0:
            points[draw(st.integers(0, 3))] = draw(odd)
        if draw(st.integers(0, 7)) == 0:
            points = points[: draw(st.integers(0, 3))] + draw(st.lists(st.integers(0, 3), max_size=4))
        out: dict[str, object] = {
            "type": draw(st.sampled_from(["bbox_2d"] * 6 + ["poly", "box", 1])), "points": points,
            "score": draw(st.sampled_from([0.5, 1.0, 0.0])),
        }  # fmt: skip
        desc = draw(st.sampled_from(["cat", " dog ", "cat", "", "  ", 7, None]))
        if desc is not None:
            out["desc"] = desc
        return out

    n_gt, n_pred = draw(st.integers(0, 2)), draw(st.integers(0, 4))
    return w, h, [obj() for _ in range(n_gt)], [obj() for _ in range(n_pred)]


def _reference_record(rec: dict[str, object], w: int, h: int) -> tuple[object, object]:
    """What prepare_record must give, from the full per-object checks alone."""
    gt: object
    try:
        gt = tuple(validate_gt_object(o, i, w, h, CoordSpace.PIXEL, "p", 1) for i, o in enumerate(rec["gt"]))  # type: ignore[arg-type]
    except DataContractError as exc:
        gt = str(exc)
    preds = []
    for o in rec["pred"]:  # type: ignore[attr-defined]
        score = float(o["score"]) if isinstance(o, dict) and "score" in o else None
        preds.append(
            validate_prediction(o, w, h, CoordSpace.PIXEL, score) if score is not None else "no score"
        )
    return gt, preds


@settings(max_examples=400)
@given(_pixel_record())
def test_prepare_record_fast_path_decides_like_the_full_checks(
    case: tuple[int, int, list[object], list[object]],
) -> None:
    w, h, gt, pred = case
    rec = {"image": "a.jpg", "width": w, "height": h, "coord_mode": "pixel", "gt": gt, "pred": pred}
    ref_gt, ref_preds = _reference_record(rec, w, h)
    if isinstance(ref_gt, str):  # ground truth is checked first
        with pytest.raises(DataContractError) as info:
            prepare_record(rec, image_id=0, path="p", line=1, score_mode=ScoreMode.TOKEN_PROB)
        assert str(info.value) == ref_gt
        return
    if "no score" in ref_preds:
        with pytest.raises(ArtifactError):
            prepare_record(rec, image_id=0, path="p", line=1, score_mode=ScoreMode.TOKEN_PROB)
        return
    img = prepare_record(rec, image_id=0, path="p", line=1, score_mode=ScoreMode.TOKEN_PROB)
    assert img.gt == ref_gt
    assert img.preds == tuple(p for p in ref_preds if isinstance(p, EvalObject))
    assert [b.reason for b in img.invalid_preds] == [p for p in ref_preds if isinstance(p, str)]
