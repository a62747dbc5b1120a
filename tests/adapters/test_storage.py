"""adapters.storage: atomic artifacts (D16), the strict JSONL reader (data.md test 23), Pillow images."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from adapters.storage.atomic import write_atomically
from adapters.storage.images import PillowImageStore
from adapters.storage.jsonl import FileArtifactStore
from domain.errors import ArtifactError, ImageFileError
from domain.resize import ImageSize
from ports.storage import ArtifactStore, ImageFormat, ImageStore, OrientationPolicy

ORIENTATION = 0x0112


def _store() -> ArtifactStore:
    return FileArtifactStore()  # typed through the port: the adapter satisfies the protocol


def _images() -> ImageStore:
    return PillowImageStore()


# ----------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = _store()
    target = tmp_path / "sub" / "a.json"
    store.write_json(target, {"b": 1, "a": "é"})
    assert target.read_text(encoding="utf-8") == '{\n  "a": "é",\n  "b": 1\n}\n'
    store.write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def produce(handle: object) -> None:
        handle.write(b"partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, produce)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    _store().write_text(tmp_path / "x", "y")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_lines_append_lines_and_numbered_reads(tmp_path: Path) -> None:
    store = _store()
    path = tmp_path / "l.jsonl"
    store.write_lines(path, ["a", "", "c"])
    store.append_lines(path, ["d"])
    assert path.read_bytes() == b"a\n\nc\nd\n"
    assert [(n.number, n.text) for n in store.read_lines(path)] == [(1, "a"), (2, ""), (3, "c"), (4, "d")]


def test_replace_and_sha256(tmp_path: Path) -> None:
    store = _store()
    store.write_bytes(tmp_path / "a", b"abc")
    store.replace(tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a").exists()
    assert store.sha256(tmp_path / "b") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ----------------------------------------------------------------------------------------------
# Strict JSONL reader (test 23)


def test_malformed_line_names_path_line_and_a_200_char_snippet(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    bad = '{"x": ' + "y" * 500
    path.write_text('{"a": 1}\n\n' + bad + "\n", encoding="utf-8")
    store = _store()
    with pytest.raises(ArtifactError) as info:
        list(store.read_jsonl(path))
    message = str(info.value)
    assert message.startswith(f"Malformed JSONL at {path}:3: ")
    snippet = message.split(f"{path}:3: ", 1)[1]
    assert snippet == bad[:200] + "…"
    assert len(snippet) <= 201


def test_non_object_line_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n   \n{"b": 2}\n[1]\n', encoding="utf-8")
    store = _store()
    it = store.read_jsonl(path)
    first, second = next(it), next(it)
    assert (first.line, first.record) == (1, {"a": 1})
    assert (second.line, second.record) == (3, {"b": 2})
    with pytest.raises(ArtifactError, match=rf"Non-object JSONL record at {path}:4$"):
        next(it)


def test_nan_and_bad_utf8_are_malformed(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": NaN}\n', encoding="utf-8")
    with pytest.raises(ArtifactError, match=":1: "):
        list(_store().read_jsonl(path))
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(ArtifactError, match=":1: not UTF-8"):
        list(_store().read_jsonl(path))


def test_read_json_exact_numbers(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"v": [100.5, 2, 0.1]}', encoding="utf-8")
    value = _store().read_json(path, exact_numbers=True)
    assert value == {"v": [Decimal("100.5"), 2, Decimal("0.1")]}
    assert isinstance(value["v"][1], int)
    with pytest.raises(ArtifactError, match="Malformed JSON"):
        path.write_text("{", encoding="utf-8")
        _store().read_json(path)


# ----------------------------------------------------------------------------------------------
# Images


def _jpeg_with_orientation(path: Path, size: tuple[int, int], orientation: int | None) -> None:
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((20, 20, 220), (0, 0, size[0] // 4, size[1] // 4))  # a blue top-left corner
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    image.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def test_header_reads_size_format_and_orientation(tmp_path: Path) -> None:
    _jpeg_with_orientation(tmp_path / "a.jpg", (128, 64), 6)
    Image.new("P", (32, 64)).save(tmp_path / "b.png")
    store = _images()
    a = store.read_header(tmp_path / "a.jpg")
    assert (a.size, a.format, a.orientation) == (ImageSize(128, 64), "JPEG", 6)
    assert a.has_orientation_change
    assert a.size_under(OrientationPolicy.APPLY) == ImageSize(64, 128)
    assert a.size_under(OrientationPolicy.IGNORE) == ImageSize(128, 64)
    b = store.read_header(tmp_path / "b.png")
    assert (b.size, b.format, b.orientation, b.has_orientation_change) == (ImageSize(32, 64), "PNG", None, False)


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    store = _images()
    with pytest.raises(ImageFileError) as missing:
        store.read_header(tmp_path / "nope.jpg")
    assert missing.value.kind == "missing" and str(tmp_path / "nope.jpg") in str(missing.value)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageFileError) as junk:
        store.read_header(tmp_path / "junk.jpg")
    assert junk.value.kind == "unreadable"
    good = tmp_path / "t.jpg"
    _jpeg_with_orientation(good, (256, 256), None)
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageFileError) as trunc:
        store.read_rgb(tmp_path / "trunc.jpg")
    assert trunc.value.kind == "unreadable"


def test_read_rgb_never_applies_exif(tmp_path: Path) -> None:
    _jpeg_with_orientation(tmp_path / "a.jpg", (128, 64), 6)
    image = _images().read_rgb(tmp_path / "a.jpg")
    assert image.size == (128, 64)
    assert image.mode == "RGB"


def test_write_converted_resizes_drops_orientation_and_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "a.jpg"
    _jpeg_with_orientation(src, (128, 64), 6)
    store = _images()
    out = tmp_path / "out" / "a.jpg"
    written = store.write_converted(
        src, out, size=ImageSize(64, 128), orientation=OrientationPolicy.APPLY, image_format=ImageFormat.JPEG,
        jpeg_quality=90,
    )
    assert written == ImageSize(64, 128)
    with Image.open(out) as image:
        assert image.size == (64, 128) and image.format == "JPEG"
        assert image.getexif().get(ORIENTATION) is None
        # orientation 6 = rotate 90 degrees clockwise for display: the blue top-left corner goes top-right
        r, _g, b = image.convert("RGB").getpixel((60, 3))  # type: ignore[misc]
        assert b > 150 and r < 100
    again = tmp_path / "again.jpg"
    store.write_converted(
        src, again, size=ImageSize(64, 128), orientation=OrientationPolicy.APPLY, image_format=ImageFormat.JPEG,
        jpeg_quality=90,
    )
    assert again.read_bytes() == out.read_bytes()


def test_write_converted_png_from_palette_and_lanczos_size(tmp_path: Path) -> None:
    src = tmp_path / "p.png"
    Image.new("P", (50, 40), 3).save(src)
    out = tmp_path / "p_out.png"
    written = _images().write_converted(
        src, out, size=ImageSize(96, 64), orientation=OrientationPolicy.IGNORE, image_format=ImageFormat.PNG,
        jpeg_quality=95,
    )
    assert written == ImageSize(96, 64)
    with Image.open(out) as image:
        assert (image.size, image.format, image.mode) == ((96, 64), "PNG", "RGB")


def test_copy_bytes_is_exact(tmp_path: Path) -> None:
    src = tmp_path / "a.jpg"
    _jpeg_with_orientation(src, (64, 64), None)
    _images().copy_bytes(src, tmp_path / "c" / "a.jpg")
    assert (tmp_path / "c" / "a.jpg").read_bytes() == src.read_bytes()
    with pytest.raises(ImageFileError, match="not found"):
        _images().copy_bytes(tmp_path / "none.jpg", tmp_path / "c" / "b.jpg")


def test_library_versions_name_pillow() -> None:
    import PIL

    assert _images().library_versions() == {"Pillow": PIL.__version__}


def test_json_dump_of_report_is_sorted(tmp_path: Path) -> None:
    _store().write_json(tmp_path / "r.json", {"z": 1, "a": {"y": 2, "b": 3}})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": {"b": 3, "y": 2}, "z": 1}
    assert (tmp_path / "r.json").read_text().index('"a"') < (tmp_path / "r.json").read_text().index('"z"')
