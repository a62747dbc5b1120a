"""The headline the main job ends with: the numbers, the parse drops, why a result is empty, the report."""

from __future__ import annotations

from pathlib import Path

from application.headline import empty_result_reason, f1_key, headline_lines


def counters(**values: int) -> dict[str, int]:
    base = dict.fromkeys(["parse_failed", "truncated", "empty_pred", "generation_failed", "pred_objects_dropped",
                          "pred_objects_valid"], 0)  # fmt: skip
    return {**base, **values}


def test_headline_names_each_number_and_the_report() -> None:
    metrics = {"bbox_AP": 0.7512, "bbox_AP50": 0.9, f1_key(): 0.875, "f1ish@0.30_f1_full_micro": 0.1}
    lines = headline_lines(metrics, counters(pred_objects_valid=9, pred_objects_dropped=1, truncated=1), 3,
                           Path("run/vis/report.html"))  # fmt: skip
    assert lines == [
        "Headline: bbox AP 0.751 | AP50 0.900 | F1@0.50 0.875",
        "Parse drops: 1 objects dropped, 9 kept; records: 0 parse_failed, 1 truncated, 0 empty_pred, "
        "0 generation_failed",
        "Report: run/vis/report.html",
    ]


def test_f1_is_the_full_micro_f1_at_iou_one_half() -> None:
    assert f1_key() == "f1ish@0.50_f1_full_micro"


def test_undefined_and_missing_metrics_are_said_so() -> None:
    line = headline_lines({"bbox_AP": -1.0}, None, None, None)
    assert line == ["Headline: bbox AP undefined | AP50 n/a | F1@0.50 n/a"]


def test_an_empty_result_says_why() -> None:
    assert empty_result_reason(counters(parse_failed=3, truncated=3, empty_pred=3), 3) == (
        "0 predictions on 3 images: 3 parse_failed, 3 truncated"
    )
    assert empty_result_reason(counters(pred_objects_dropped=2, empty_pred=1), 1) == (
        "0 predictions on 1 images: 2 objects dropped by the parser"
    )
    assert empty_result_reason(counters(empty_pred=2), 2) == "0 predictions on 2 images: the model wrote no objects"
    assert empty_result_reason(counters(pred_objects_valid=1, parse_failed=2), 3) is None
    lines = headline_lines({}, counters(parse_failed=3, truncated=3, empty_pred=3), 3, None)
    assert lines[-1] == "0 predictions on 3 images: 3 parse_failed, 3 truncated"
