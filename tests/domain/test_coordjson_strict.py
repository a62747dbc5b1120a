"""Strict transpile (data.md §5.3, §11.28–29): exact grammar, errors with record index and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from coordjson_toy import OBJECT_LISTS, box, c
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.coordjson import DropReason, parse_strict, render, transpile_strict
from domain.errors import CoordJSONError
from domain.objects import CoordMode, DetObject, FieldOrder, GeometryKind

COCO = Path(__file__).resolve().parents[2] / "data" / "coco_val2014_100" / "instances_val2014_100.json"
BOX = f"[{c(1)}, {c(2)}, {c(3)}, {c(4)}]"


def rec(desc: str = "a", geom: str = BOX, key: str = "bbox_2d") -> str:
    return f'{{"desc": "{desc}", "{key}": {geom}}}'


def doc(*records: str) -> str:
    return '{"objects": [' + ", ".join(records) + "]}"


def strict_error(text: str, **kw: object) -> CoordJSONError:
    with pytest.raises(CoordJSONError) as info:
        parse_strict(text, **kw)  # type: ignore[arg-type]
    return info.value


def test_transpile_example() -> None:
    text = '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_12|>, <|coord_40|>, <|coord_300|>, <|coord_410|>]}]}'
    assert transpile_strict(text) == '{"objects": [{"desc": "cat", "bbox_2d": [12, 40, 300, 410]}]}'
    assert json.loads(transpile_strict(text)) == {"objects": [{"desc": "cat", "bbox_2d": [12, 40, 300, 410]}]}


def test_transpile_geometry_first_and_numeric() -> None:
    text = (
        '{"objects": [{"bbox_2d": [1, 2, 3, 4], "desc": "cat"}, {"poly": [1, 2, 3, 4, 5, 6], "desc": "dog"}]}'
    )
    out = transpile_strict(text, FieldOrder.GEOMETRY_FIRST, CoordMode.NUMERIC)
    assert out == text
    assert parse_strict(text, FieldOrder.GEOMETRY_FIRST, CoordMode.NUMERIC) == [
        box("cat", 1, 2, 3, 4),
        DetObject("dog", GeometryKind.POLY, (1, 2, 3, 4, 5, 6)),
    ]


def test_json_whitespace_is_allowed_and_normalised() -> None:
    text = '\n { "objects" :\t[ {"desc" : "cat" ,"bbox_2d":[<|coord_1|>,<|coord_2|> ,<|coord_3|>,\n<|coord_4|>] } ] }\n'
    assert transpile_strict(text) == '{"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4]}]}'
    assert transpile_strict('{"objects": [ ]}') == '{"objects": []}'


@settings(deadline=None)
@given(OBJECT_LISTS, st.sampled_from(list(FieldOrder)), st.sampled_from(list(CoordMode)))
def test_round_trip_preserves_every_coordinate_in_order(
    objects: list[DetObject], order: FieldOrder, mode: CoordMode
) -> None:
    text = render(objects, order, mode)
    parsed = parse_strict(text, order, mode)
    assert parsed == objects
    assert [k for o in parsed for k in o.bins] == [k for o in objects for k in o.bins]
    assert render(parsed, order, mode) == text
    assert json.loads(transpile_strict(text, order, mode)) == {
        "objects": [
            {"desc": o.desc, o.kind.value: list(o.bins)}
            if order is FieldOrder.DESC_FIRST
            else {o.kind.value: list(o.bins), "desc": o.desc}
            for o in objects
        ]
    }


def _naive_bin(v: float, size: int) -> int:
    return min(999, max(0, round(v / max(1, size - 1) * 999)))


def test_round_trip_of_every_target_of_a_fixture_jsonl(tmp_path: Path) -> None:
    """data.md §11.28 on records built from the COCO fixture (first polygon ring or the box, in bins)."""
    coco = json.loads(COCO.read_text())
    names = {cat["id"]: cat["name"] for cat in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    by_image: dict[int, list[dict[str, object]]] = {}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        w, h = im["width"], im["height"]
        seg = ann["segmentation"]
        if isinstance(seg, list) and seg and len(seg[0]) >= 6:
            ring = seg[0]
            geom = {"poly": [_naive_bin(v, w if i % 2 == 0 else h) for i, v in enumerate(ring)]}
        else:
            x, y, bw, bh = ann["bbox"]
            x1, y1 = _naive_bin(x, w), _naive_bin(y, h)
            geom = {"bbox_2d": [x1, y1, max(x1, _naive_bin(x + bw, w)), max(y1, _naive_bin(y + bh, h))]}
        by_image.setdefault(ann["image_id"], []).append({"desc": names[ann["category_id"]], **geom})
    path = tmp_path / "fixture.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for image_id, objs in sorted(by_image.items()):
            f.write(json.dumps({"image_id": image_id, "objects": objs}, ensure_ascii=False) + "\n")
    n_targets = n_objects = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        objs = json.loads(line)["objects"]
        objects = [
            DetObject(
                o["desc"],
                GeometryKind.BBOX if "bbox_2d" in o else GeometryKind.POLY,
                o.get("bbox_2d") or o["poly"],
            )
            for o in objs
        ]
        for order in FieldOrder:
            for mode in CoordMode:
                target = render(objects, order, mode)
                assert render(parse_strict(target, order, mode), order, mode) == target
                n_targets += 1
        n_objects += len(objects)
    assert n_objects > 800 and n_targets > 300


# ---- errors (data.md §5.3, §11.29) --------------------------------------------------------------------


def test_order_violation_names_record_and_reason() -> None:
    text = doc(rec("a"), rec("b"), rec("c"), f'{{"bbox_2d": {BOX}, "desc": "d"}}')
    err = strict_error(text)
    assert str(err) == "objects[3] invalid (order_violation): expected keys desc, bbox_2d"
    assert (err.record_index, err.reason) == (3, "order_violation")


def test_extra_key() -> None:
    err = strict_error(doc(rec("a"), f'{{"desc": "b", "bbox_2d": {BOX}, "score": 0.9}}'))
    assert str(err).startswith("objects[1] invalid (unexpected_keys):")
    assert (err.record_index, err.reason) == (1, "unexpected_keys")


def test_truncated_array() -> None:
    assert str(strict_error('{"objects": [' + rec("a") + ", ")).startswith(
        "top-level objects array is truncated"
    )
    err = strict_error('{"objects": [' + rec("a") + ", " + '{"desc": "b", "bbox_2d": [<|coord_1|>')
    assert str(err).startswith("top-level objects array is truncated")
    assert err.record_index == 1
    assert str(strict_error('{"objects": []')).startswith("top-level objects array is truncated")


def test_second_top_level_key() -> None:
    for text in ['{"objects": [], "extra": 1}', '{"extra": 1, "objects": []}', '{"object_1": {"desc": "a"}}']:
        err = strict_error(text)
        assert str(err).startswith('document must contain exactly one key: "objects"')
        assert err.record_index is None


def test_trailing_text_names_the_char() -> None:
    text = doc(rec("a")) + " <|im_end|>"
    err = strict_error(text)
    assert str(err) == f"unexpected text after the document at char {len(doc(rec('a'))) + 1}"


def test_text_before_the_document() -> None:
    assert "before the document at char 0" in str(strict_error("Here: " + doc(rec("a"))))
    assert "empty" in str(strict_error("  "))


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ('{"desc": "a" "bbox_2d": []}', DropReason.OTHER),
        (f'{{"desc": "a", "bbox_2d": {BOX}, "desc": "b"}}', DropReason.UNEXPECTED_KEYS),
        (f'{{"bbox_2d": {BOX}}}', DropReason.MISSING_DESC),
        ('{"desc": "a"}', DropReason.MISSING_GEOM),
        (f'{{"desc": "a", "bbox_2d": {BOX}, "poly": {BOX}}}', DropReason.UNEXPECTED_KEYS),
        (f'{{"bbox_2d": {BOX}, "desc": "a"}}', DropReason.ORDER_VIOLATION),
        (f'{{"desc": " ", "bbox_2d": {BOX}}}', DropReason.MISSING_DESC),
        ('{"desc": "a", "bbox_2d": [1, 2, 3, 4]}', DropReason.NON_COORD_TOKEN),
        (f'{{"desc": "a", "bbox_2d": [{c(1)}, {c(2)}, {c(3)}]}}', DropReason.WRONG_ARITY),
        (f'{{"desc": "a", "bbox_2d": [{c(5)}, {c(2)}, {c(3)}, {c(4)}]}}', DropReason.BBOX_INVALID),
    ],
)
def test_every_drop_reason_is_an_error(record: str, reason: DropReason) -> None:
    err = strict_error(doc(rec("ok"), record))
    assert (err.record_index, err.reason) == (1, reason.value)
    assert str(err).startswith(f"objects[1] invalid ({reason.value}): ")


@pytest.mark.parametrize(
    "text",
    [
        '{"objects": [' + rec("a") + " " + rec("b") + "]}",  # missing comma
        '{"objects": [' + rec("a") + ", , " + rec("b") + "]}",  # extra comma
        '{"objects": [, ' + rec("a") + "]}",  # leading comma
        '{"objects": [' + rec("a") + ", ]}",  # trailing comma
        '{"objects": [' + rec("a") + ", junk]}",  # array-level junk
        '{"objects": [' + rec("a") + "] junk",  # not closed by }
    ],
)
def test_array_structure_is_exact(text: str) -> None:
    with pytest.raises(CoordJSONError):
        parse_strict(text)


def test_mode_mismatch_is_an_error() -> None:
    err = strict_error(doc(rec("a")), coord_mode=CoordMode.NUMERIC)
    assert err.reason == "non_coord_token"
