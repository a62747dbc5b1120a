"""The offline converter end to end on files (data.md §9; tests 49-55; the shapes3 acceptance)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from PIL import Image

from adapters.storage.images import PillowImageStore
from adapters.storage.jsonl import FileArtifactStore
from application.prepare_data import ConvertResult, ConvertSettings, convert_dataset
from domain.codec import bins_to_pixels
from domain.conversion import GeometryMode, GeometrySettings, SourceFormat
from domain.errors import ConversionError, DataContractError
from domain.resize import ImageSize
from ports.storage import ImageFormat, OrientationPolicy

SHAPES3 = Path(__file__).resolve().parents[2] / "data" / "shapes3"
ORIENTATION = 0x0112


def _image(path: Path, size: tuple[int, int], fmt: str = "JPEG", orientation: int | None = None) -> None:
    """A deterministic test picture: a gradient with a marked top-left corner."""
    w, h = size
    image = Image.new("RGB", size)
    image.putdata([((x * 255) // max(1, w - 1), (y * 255) // max(1, h - 1), 90) for y in range(h) for x in range(w)])
    image.paste((250, 250, 250), (0, 0, max(1, w // 4), max(1, h // 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, format=fmt, **kwargs)


def _run(
    tmp_path: Path,
    document: dict[str, Any],
    *,
    source: SourceFormat = SourceFormat.COCO,
    split: str = "train",
    images: Any = None,
    out: str = "out",
    **changes: Any,
) -> ConvertResult:
    ann_path = tmp_path / f"instances_{split}.json"
    ann_path.write_text(json.dumps(document), encoding="utf-8")
    geometry_keys = {f.name for f in attrs.fields(GeometrySettings)}
    geometry = GeometrySettings(**{k: v for k, v in changes.items() if k in geometry_keys})
    rest = {k: v for k, v in changes.items() if k not in geometry_keys}
    settings = ConvertSettings(
        source=source, annotations=ann_path, image_root=tmp_path / "src", output_dir=tmp_path / out, split=split,
        geometry=geometry, **rest,
    )
    return convert_dataset(
        settings, artifacts=FileArtifactStore(), images=images or PillowImageStore(), progress=False, echo=None
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Test 49: COCO fixture against a hand-derived golden JSONL


def _coco_fixture(tmp_path: Path) -> dict[str, Any]:
    _image(tmp_path / "src" / "a.jpg", (640, 427))
    _image(tmp_path / "src" / "b.png", (64, 64), fmt="PNG")
    _image(tmp_path / "src" / "sub" / "c.jpg", (96, 64))
    return {
        "images": [  # deliberately not in id order
            {"id": 3, "width": 96, "height": 64, "file_name": "sub/c.jpg"},
            {"id": 1, "width": 640, "height": 427, "file_name": "a.jpg"},
            {"id": 2, "width": 64, "height": 64, "file_name": "b.png"},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "traffic light"}],
        "annotations": [
            # the §9.5 worked example (box; no segmentation) and polygon, on the 640x427 image
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100.5, 200.25, 50.0, 80.0], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 10, 290, 390], "iscrowd": 0,
             "segmentation": [[10, 10, 300, 20, 200, 400]]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1,
             "segmentation": {"counts": [0, 10, 100], "size": [427, 640]}},
            # a multi-part polygon (default poly_multipart: bbox -> the annotation bbox) and a zero-width box
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [4, 4, 56, 56], "iscrowd": 0,
             "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20], [30, 30, 60, 30, 60, 60, 30, 60]]},
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0},
            # the whole 96x64 image and a triangle on it
            {"id": 6, "image_id": 3, "category_id": 1, "bbox": [0, 0, 96, 64], "iscrowd": 0},
            {"id": 7, "image_id": 3, "category_id": 2, "bbox": [5, 10, 85, 50], "iscrowd": 0,
             "segmentation": [[48, 10, 90, 60, 5, 60]]},
        ],
    }


# Derived by hand from data.md:
# image 1 (640x427 -> 640x416, §3.1): the worked example of §9.5 -> bbox [157, 469, 236, 658] and
#   poly [16, 23, 469, 47, 313, 938]; the poly anchor (23, 16) sorts before the bbox anchor (469, 157).
# image 2 (64x64, unchanged; d = 63): multi-part -> annotation bbox xyxy [4, 4, 60, 60]:
#   floor(4*999/63) = floor(63.43) = 63, ceil(60*999/63) = ceil(951.43) = 952; the zero-width box is dropped.
# image 3 (96x64; dx = 95, dy = 63): the whole image -> [0, 0, 999, 999] (clipped to 96, clamped to 95/63);
#   triangle (48,10),(90,60),(5,60) -> round(504.8)=505, round(158.6)=159, round(946.4)=946,
#   round(951.4)=951, round(52.6)=53 -> (505,159),(946,951),(53,951), A2 = 707256 > 0, starts at min (y, x).
GOLDEN = (
    '{"coord_space": "norm1000", "height": 416, "images": ["images/train/a.jpg"], '
    '"metadata": {"source": "coco", "image_id": 1, "file_name": "a.jpg", "orig_width": 640, "orig_height": 427}, '
    '"objects": [{"desc": "traffic light", "poly": [16, 23, 469, 47, 313, 938], "category_id": 2, "ann_id": 2}, '
    '{"desc": "dog", "bbox_2d": [157, 469, 236, 658], "category_id": 1, "ann_id": 1}], "width": 640}\n'
    '{"coord_space": "norm1000", "height": 64, "images": ["images/train/b.png"], '
    '"metadata": {"source": "coco", "image_id": 2, "file_name": "b.png", "orig_width": 64, "orig_height": 64}, '
    '"objects": [{"desc": "traffic light", "bbox_2d": [63, 63, 952, 952], "category_id": 2, "ann_id": 4}], '
    '"width": 64}\n'
    '{"coord_space": "norm1000", "height": 64, "images": ["images/train/c.jpg"], '
    '"metadata": {"source": "coco", "image_id": 3, "file_name": "sub/c.jpg", "orig_width": 96, "orig_height": 64}, '
    '"objects": [{"desc": "dog", "bbox_2d": [0, 0, 999, 999], "category_id": 1, "ann_id": 6}, '
    '{"desc": "traffic light", "poly": [505, 159, 946, 951, 53, 951], "category_id": 2, "ann_id": 7}], '
    '"width": 96}\n'
)


def test_coco_fixture_matches_the_golden_jsonl(tmp_path: Path) -> None:
    result = _run(tmp_path, _coco_fixture(tmp_path), geometry=GeometryMode.POLY_PREFERRED, workers=2)
    assert result.jsonl_path.read_text(encoding="utf-8") == GOLDEN
    report = json.loads(result.report_path.read_text())["splits"]["train"]
    assert report["objects"]["dropped"]["crowd"] == 1
    assert report["objects"]["dropped"]["nonpositive_size"] == 1
    assert sum(report["objects"]["dropped"].values()) == 2
    assert report["fallbacks"] == {
        "bbox_nudged": 0, "poly_to_bbox_multipart": 1, "poly_to_bbox_degenerate": 0, "poly_to_bbox_max_points": 0,
    }
    assert report["images"]["written"] == 3 and report["images"]["resized"] == 1 and report["images"]["copied"] == 2
    assert report["objects"] == {**report["objects"], "written": 5, "bbox_2d": 3, "poly": 2}
    assert report["settings"]["geometry"] == "poly_preferred" and report["settings"]["max_pixels"] == 786432
    assert report["library_versions"].keys() == {"Pillow"}
    assert len(report["annotations_sha256"]) == 64
    assert json.loads(result.categories_path.read_text()) == [
        {"id": 1, "name": "dog", "desc": "dog"}, {"id": 2, "name": "traffic light", "desc": "traffic light"},
    ]
    # no temporary or unchecked files are left behind
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if p.name.startswith(".") or "unchecked" in p.name]
    assert leftovers == []


# ----------------------------------------------------------------------------------------------
# Test 50: LVIS


def test_lvis_fixture(tmp_path: Path) -> None:
    _image(tmp_path / "src" / "train2017" / "000000000009.jpg", (64, 64))
    document = {
        "images": [{"id": 9, "width": 64, "height": 64, "neg_category_ids": [3, 1], "not_exhaustive_category_ids": [2],
                    "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg"}],
        "categories": [{"id": 1, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)", "longbow"], "frequency": "r"},
                       {"id": 2, "name": "aerosol_can", "synonyms": ["aerosol_can"], "frequency": "c"}],
        "annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 10, 10],
                         "segmentation": [[0, 0, 10, 0, 10, 10]]}],
    }
    result = _run(tmp_path, document, source=SourceFormat.LVIS, split="val")
    record = json.loads(result.jsonl_path.read_text())
    assert record["images"] == ["images/val/000000000009.jpg"]
    assert record["objects"][0]["desc"] == "bow (weapon)"
    assert record["metadata"]["neg_category_ids"] == [3, 1]
    assert record["metadata"]["not_exhaustive_category_ids"] == [2]
    assert record["metadata"]["file_name"] == "train2017/000000000009.jpg"
    cats = json.loads(result.categories_path.read_text())
    assert cats[0] == {"id": 1, "name": "bow_(weapon)", "desc": "bow (weapon)", "synonyms": ["bow_(weapon)", "longbow"],
                       "frequency": "r"}
    assert (tmp_path / "out" / "images" / "val" / "000000000009.jpg").is_file()


# ----------------------------------------------------------------------------------------------
# Test 51: resize table on real files; unchanged sizes are byte copies

SIZES = [((640, 480), (640, 480)), ((640, 427), (640, 416)), ((500, 375), (512, 384)), ((50, 40), (96, 64))]


def test_written_images_have_the_recorded_size_and_unchanged_ones_are_copies(tmp_path: Path) -> None:
    images = []
    for i, (size, _) in enumerate(SIZES, start=1):
        fmt = "PNG" if i == 4 else "JPEG"
        name = f"i{i}.{'png' if fmt == 'PNG' else 'jpg'}"
        _image(tmp_path / "src" / name, size, fmt=fmt)
        images.append({"id": i, "width": size[0], "height": size[1], "file_name": name})
    result = _run(tmp_path, {"images": images, "categories": [], "annotations": []})
    lines = [json.loads(line) for line in result.jsonl_path.read_text().splitlines()]
    for record, (source, target) in zip(lines, SIZES):
        assert (record["width"], record["height"]) == target
        written = tmp_path / "out" / record["images"][0]
        with Image.open(written) as image:
            assert image.size == target
        original = tmp_path / "src" / record["metadata"]["file_name"]
        assert (written.read_bytes() == original.read_bytes()) == (source == target)
    assert lines[3]["images"] == ["images/train/i4.png"]


# ----------------------------------------------------------------------------------------------
# Test 52: any number of workers gives the same bytes


def test_workers_do_not_change_the_output(tmp_path: Path) -> None:
    document = _coco_fixture(tmp_path)
    for i in range(4, 30):  # enough images to cross several scan windows
        _image(tmp_path / "src" / f"x{i}.jpg", (64 + 8 * (i % 5), 48 + 8 * (i % 3)))
        document["images"].append({"id": i, "width": 64 + 8 * (i % 5), "height": 48 + 8 * (i % 3), "file_name": f"x{i}.jpg"})
        document["annotations"].append({"id": 100 + i, "image_id": i, "category_id": 1 + i % 2, "bbox": [i % 7, 3, 20, 9.5]})
    one = _run(tmp_path, document, out="w1", workers=1, geometry=GeometryMode.POLY_PREFERRED)
    many = _run(tmp_path, document, out="w5", workers=5, geometry=GeometryMode.POLY_PREFERRED)
    assert one.jsonl_path.read_bytes() == many.jsonl_path.read_bytes()
    assert _files(tmp_path / "w1" / "images") == _files(tmp_path / "w5" / "images")
    assert len(_files(tmp_path / "w1" / "images")) == 29
    # a rerun into the same directory is byte-identical too
    before = _files(tmp_path / "w1")
    _run(tmp_path, document, out="w1", workers=1, geometry=GeometryMode.POLY_PREFERRED)
    assert _files(tmp_path / "w1") == before


# ----------------------------------------------------------------------------------------------
# Test 53: EXIF orientation policy


def _exif_document(json_size: tuple[int, int]) -> dict[str, Any]:
    return {
        "images": [{"id": 1, "width": json_size[0], "height": json_size[1], "file_name": "rot.jpg"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 16, 16]}],
    }


@pytest.mark.parametrize(
    ("json_size", "policy", "ok"),
    [
        ((128, 64), OrientationPolicy.IGNORE, True),  # JSON records the stored size
        ((128, 64), OrientationPolicy.APPLY, False),
        ((64, 128), OrientationPolicy.APPLY, True),  # JSON records the rotated size
        ((64, 128), OrientationPolicy.IGNORE, False),
    ],
)
def test_exif_orientation_policy(tmp_path: Path, json_size: tuple[int, int], policy: OrientationPolicy, ok: bool) -> None:
    _image(tmp_path / "src" / "rot.jpg", (128, 64), orientation=6)
    document = _exif_document(json_size)
    if not ok:
        with pytest.raises(ConversionError, match=r"image id 1 \(rot.jpg\): image_size_mismatch"):
            _run(tmp_path, document, exif_orientation=policy)
        result = _run(tmp_path, document, exif_orientation=policy, skip_bad_images=True)
        assert result.report["images"]["dropped"]["image_size_mismatch"] == 1
        assert result.jsonl_path.read_text() == ""
        return
    result = _run(tmp_path, document, exif_orientation=policy)
    record = json.loads(result.jsonl_path.read_text())
    assert (record["width"], record["height"]) == json_size
    written = tmp_path / "out" / record["images"][0]
    with Image.open(written) as image:
        assert image.size == json_size
        assert image.getexif().get(ORIENTATION) is None  # the written image carries no orientation tag
    assert result.report["images"]["copied"] == 0  # the tag forces a re-encode even at the same size


# ----------------------------------------------------------------------------------------------
# Test 54: max_objects and keep_empty


def test_max_objects_and_keep_empty(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        _image(tmp_path / "src" / f"{i}.jpg", (64, 64))
    document = {
        "images": [{"id": i, "width": 64, "height": 64, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 10 + k, "image_id": 1, "category_id": 1, "bbox": [k * 10, 0, 5, 5]} for k in range(3)]
        + [{"id": 20 + k, "image_id": 2, "category_id": 1, "bbox": [k * 10, 0, 5, 5]} for k in range(2)],
    }
    result = _run(tmp_path, document, max_objects=2, keep_empty=False)
    kept = [json.loads(line)["metadata"]["image_id"] for line in result.jsonl_path.read_text().splitlines()]
    assert kept == [2]
    dropped = result.report["images"]["dropped"]
    assert (dropped["too_many_objects"], dropped["empty"]) == (1, 1)
    assert not (tmp_path / "out" / "images" / "train" / "1.jpg").exists()
    kept_all = _run(tmp_path, document, out="o2")
    assert len(kept_all.records) == 3 and kept_all.records[2].objects == ()


def test_limit_keeps_the_first_n_kept_images(tmp_path: Path) -> None:
    for i in range(1, 6):
        _image(tmp_path / "src" / f"{i}.jpg", (64, 64))
    document = {
        "images": [{"id": i, "width": 64, "height": 64, "file_name": f"{i}.jpg"} for i in range(1, 6)],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in (2, 3, 4, 5)],
    }
    result = _run(tmp_path, document, keep_empty=False, limit=2, workers=3)
    assert [r.metadata["image_id"] for r in result.records if r.metadata] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "train").iterdir()) == ["2.jpg", "3.jpg"]
    assert result.report["images"]["considered"] == 3 and result.report["images"]["dropped"]["empty"] == 1


def test_missing_images_raise_or_are_counted(tmp_path: Path) -> None:
    _image(tmp_path / "src" / "1.jpg", (64, 64))
    document = {
        "images": [{"id": 1, "width": 64, "height": 64, "file_name": "1.jpg"},
                   {"id": 2, "width": 64, "height": 64, "file_name": "2.jpg"}],
        "categories": [], "annotations": [],
    }
    with pytest.raises(ConversionError, match=r"image id 2 \(2.jpg\): missing_image: .*skip_bad_images"):
        _run(tmp_path, document)
    result = _run(tmp_path, document, skip_bad_images=True)
    assert result.report["images"]["dropped"]["missing_image"] == 1 and len(result.records) == 1


def test_truncated_images_are_unreadable_even_when_copied(tmp_path: Path) -> None:
    _image(tmp_path / "src" / "full.jpg", (64, 64))
    data = (tmp_path / "src" / "full.jpg").read_bytes()
    (tmp_path / "src" / "cut.jpg").write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    document = {
        "images": [{"id": 1, "width": 64, "height": 64, "file_name": "cut.jpg"},
                   {"id": 2, "width": 64, "height": 64, "file_name": "full.jpg"}],
        "categories": [], "annotations": [],
    }
    with pytest.raises(ConversionError, match=r"image id 1 \(cut.jpg\): unreadable_image"):
        _run(tmp_path, document)
    result = _run(tmp_path, document, skip_bad_images=True)
    assert result.report["images"]["dropped"]["unreadable_image"] == 1
    assert [r.image for r in result.records] == ["images/train/full.jpg"]


# ----------------------------------------------------------------------------------------------
# Test 55: the self-check catches an image tampered with mid-run


class _TamperingImages(PillowImageStore):
    """Writes as usual, then replaces one output with an image of another size."""

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def _tamper(self, destination: Path) -> None:
        if destination.name == self.victim:
            Image.new("RGB", (32, 32)).save(destination, format="JPEG")

    def copy_bytes(self, source: Path, destination: Path) -> None:
        super().copy_bytes(source, destination)
        self._tamper(destination)

    def write_converted(self, source: Path, destination: Path, **kwargs: Any) -> ImageSize:
        written = super().write_converted(source, destination, **kwargs)
        self._tamper(destination)
        return written


def test_self_check_fails_the_run_on_a_tampered_image(tmp_path: Path) -> None:
    document = _coco_fixture(tmp_path)
    with pytest.raises(DataContractError) as info:
        _run(tmp_path, document, images=_TamperingImages("c.jpg"))
    message = str(info.value)
    resolved = (tmp_path / "out" / "images" / "train" / "c.jpg").absolute()
    assert "train.jsonl.unchecked:3: images[0]: file is 32x32, record says 96x64" in message
    assert str(resolved) in message
    assert not (tmp_path / "out" / "train.jsonl").exists()
    assert not (tmp_path / "out" / "convert_report.json").exists()


# ----------------------------------------------------------------------------------------------
# Report of several splits in one directory


def test_report_keeps_one_entry_per_split(tmp_path: Path) -> None:
    document = _coco_fixture(tmp_path)
    _run(tmp_path, document, split="train")
    result = _run(tmp_path, document, split="val", limit=1)
    report = json.loads(result.report_path.read_text())
    assert sorted(report["splits"]) == ["train", "val"]
    assert report["splits"]["val"]["images"]["written"] == 1
    assert report["splits"]["train"]["images"]["written"] == 3


# ----------------------------------------------------------------------------------------------
# Acceptance: shapes3 (real JPEGs)


@pytest.mark.parametrize("geometry", [GeometryMode.BBOX, GeometryMode.POLY_PREFERRED])
def test_shapes3_converts_to_valid_jsonl_within_one_pixel(tmp_path: Path, geometry: GeometryMode) -> None:
    src = tmp_path / "src"
    shutil.copytree(SHAPES3, src)
    settings = ConvertSettings(
        source=SourceFormat.COCO, annotations=src / "gt_dataset.json", image_root=src, output_dir=tmp_path / "out",
        split="train", geometry=GeometrySettings(geometry=geometry), workers=2,
    )
    result = convert_dataset(settings, artifacts=FileArtifactStore(), images=PillowImageStore(), progress=False, echo=None)
    gt = json.loads((src / "gt_dataset.json").read_text())
    boxes = {a["id"]: a["bbox"] for a in gt["annotations"]}
    assert len(result.records) == 3
    assert result.report["images"]["copied"] == 3  # 256x256 JPEGs: already multiples of 32
    n = 0
    for record in result.records:
        assert (record.width, record.height) == (256, 256)
        for obj, ann_id in zip(record.objects, record.ann_ids):
            assert ann_id is not None
            x, y, w, h = boxes[ann_id]
            if obj.kind.value == "bbox_2d":
                decoded = bins_to_pixels(list(obj.bins), 256, 256)
                for got, want in zip(decoded, [x, y, x + w, y + h]):
                    assert abs(got - want) <= 1
            else:
                xs = bins_to_pixels(list(obj.bins), 256, 256)
                assert min(xs[0::2]) >= x - 1 and max(xs[0::2]) <= x + w + 1
            n += 1
    assert n == 9
    if geometry is GeometryMode.POLY_PREFERRED:
        assert result.report["objects"]["poly"] == 9


def test_summary_is_printed(tmp_path: Path) -> None:
    lines: list[str] = []
    document = _coco_fixture(tmp_path)
    ann_path = tmp_path / "a.json"
    ann_path.write_text(json.dumps(document))
    settings = ConvertSettings(
        source=SourceFormat.COCO, annotations=ann_path, image_root=tmp_path / "src", output_dir=tmp_path / "out",
        split="train",
    )
    echo: Callable[[str], None] = lines.append
    convert_dataset(settings, artifacts=FileArtifactStore(), images=PillowImageStore(), progress=False, echo=echo)
    text = "\n".join(lines)
    assert "3 written (1 resized, 2 copied)" in text
    assert "crowd 1, nonpositive_size 1" in text
    assert "poly_to_bbox_multipart" not in text  # bbox geometry: no polygon fallbacks


def test_settings_reject_bad_values() -> None:
    from domain.errors import ConfigError

    with pytest.raises(ConfigError, match="split"):
        ConvertSettings(source=SourceFormat.COCO, annotations=Path("a"), image_root=Path("b"), output_dir=Path("c"),
                        split="a/b")


def test_image_format_enum_values() -> None:
    assert ImageFormat.JPEG.value == "JPEG" and ImageFormat.PNG.value == "PNG"
