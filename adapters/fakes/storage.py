"""Stdlib-only stores for use-case tests: artifacts, images, checkpoints and the run lock (no Pillow, no flock).

- :class:`RecordingArtifactStore` writes and reads real files (use cases also rename staging directories
  and check paths themselves) and records every path it wrote, so a test asserts on what went through the
  port; reads are strict like the real store (missing file, malformed JSONL, NaN are ``ArtifactError``).
- :class:`FakeImageStore` reads and writes *fake image files*: a one-line JSON header
  ``{"fake_image": [w, h], "format": "PNG", "orientation": null}`` (see :func:`write_fake_image`), so image
  sizes, formats, EXIF orientation and unreadable files can be staged without an imaging library.
- :class:`FakeCheckpointStore` lists ``checkpoint-<step>`` folders carrying the completion marker and
  reports the problems a test scripts for a folder.
- :class:`RecordingRunLock` is an in-process exclusive lock per target that records who held it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs

from domain.checkpoints import COMPLETE_MARKER, checkpoint_step
from domain.errors import ArtifactError, ImageFileError
from domain.records import parse_artifact_lines
from domain.resize import ImageSize
from ports.storage import ImageFormat, ImageHeader, NumberedLine, NumberedRecord, OrientationPolicy

# ------------------------------------------------------------------------------------------------
# Artifacts


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@attrs.define
class RecordingArtifactStore:
    """:class:`ports.storage.ArtifactStore` on real files (plain writes: no fsync); ``written`` lists every
    path written, appended to or replaced, in call order; ``staging`` every staging directory made."""

    written: list[Path] = attrs.field(factory=list)
    staging: list[Path] = attrs.field(factory=list)

    def _write(self, path: Path, data: bytes) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written.append(path)

    def write_text(self, path: Path, text: str) -> None:
        self._write(path, text.encode("utf-8"))

    def write_bytes(self, path: Path, data: bytes) -> None:
        self._write(path, data)

    def write_json(self, path: Path, value: object) -> None:
        self.write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def write_lines(self, path: Path, lines: Iterable[str]) -> None:
        self.write_text(path, "".join(f"{line}\n" for line in lines))

    def append_lines(self, path: Path, lines: Iterable[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.writelines(f"{line}\n" for line in lines)
        self.written.append(path)

    def _lines(self, path: Path, *, report_encoding: bool) -> Iterator[NumberedLine]:
        if not Path(path).is_file():
            raise ArtifactError(f"artifact not found: {path}")
        raws = Path(path).read_bytes().split(b"\n")
        if raws[-1] == b"":
            raws.pop()  # the final line break ends the last line, it does not start a new one
        for number, raw in enumerate(raws, start=1):
            try:
                yield NumberedLine(number, raw.removesuffix(b"\r").decode("utf-8"))
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8 ({exc.reason} at byte {exc.start})"
                if not report_encoding:
                    raise ArtifactError(f"Malformed JSONL at {path}:{number}: {reason}") from None
                yield NumberedLine(number, "", reason)

    def read_lines(self, path: Path) -> Iterator[NumberedLine]:
        return self._lines(path, report_encoding=False)

    def read_data_lines(self, path: Path) -> Iterator[NumberedLine]:
        return self._lines(path, report_encoding=True)

    def read_jsonl(self, path: Path) -> Iterator[NumberedRecord]:
        lines = ((line.number, line.text) for line in self.read_lines(path))
        for number, value in parse_artifact_lines(lines, str(path)):
            yield NumberedRecord(number, value)

    def read_json(self, path: Path, *, exact_numbers: bool = False) -> Any:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ArtifactError(f"file not found: {path}") from None
        try:
            if exact_numbers:
                return json.loads(text, parse_constant=_reject_constant, parse_float=Decimal)
            return json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise ArtifactError(f"Malformed JSON at {path}: {exc}") from None

    def replace(self, source: Path, destination: Path) -> None:
        Path(source).replace(destination)
        self.written.append(Path(destination))

    def sha256(self, path: Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    def make_staging_directory(self, parent: Path, *, prefix: str, suffix: str = "") -> Path:
        directory = Path(parent) / f"{prefix}{uuid.uuid4().hex[:8]}{suffix}"
        directory.mkdir(parents=True)
        self.staging.append(directory)
        return directory

    def written_under(self, folder: Path) -> list[str]:
        """The distinct files written under ``folder``, relative to it and sorted."""
        folder = Path(folder)
        return sorted({str(p.relative_to(folder)) for p in self.written if folder in p.parents})


# ------------------------------------------------------------------------------------------------
# Images


def write_fake_image(
    path: Path, width: int, height: int, *, image_format: str = "PNG", orientation: int | None = None
) -> Path:
    """A fake image file :class:`FakeImageStore` reads: its size, format and EXIF orientation as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"fake_image": [width, height], "format": image_format, "orientation": orientation}
    path.write_text(json.dumps(header) + "\n", encoding="utf-8")
    return path


@attrs.frozen
class FakeRGBImage:
    """What :meth:`FakeImageStore.read_rgb` decodes: the size and the file it came from."""

    size: tuple[int, int]
    path: Path
    mode: str = "RGB"


@attrs.define
class FakeImageStore:
    """:class:`ports.storage.ImageStore` over :func:`write_fake_image` files; any other file is unreadable.
    ``converted`` records ``(source, destination, size)`` of every converted write, ``copied`` every copy."""

    converted: list[tuple[Path, Path, ImageSize]] = attrs.field(factory=list)
    copied: list[tuple[Path, Path]] = attrs.field(factory=list)
    decoded: list[Path] = attrs.field(factory=list)

    def read_header(self, path: Path) -> ImageHeader:
        path = Path(path)
        if not path.is_file():
            raise ImageFileError(f"image file not found: {path}", path=str(path), kind="missing")
        try:
            header = json.loads(path.read_text(encoding="utf-8"))
            width, height = header["fake_image"]
            return ImageHeader(ImageSize(int(width), int(height)), str(header["format"]), header["orientation"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ImageFileError(f"image file cannot be decoded: {path}: {exc}", path=str(path),
                                 kind="unreadable") from None  # fmt: skip

    def read_rgb(self, path: Path) -> FakeRGBImage:
        header = self.read_header(path)
        self.decoded.append(Path(path))
        return FakeRGBImage((header.size.width, header.size.height), Path(path))

    def write_converted(
        self,
        source: Path,
        destination: Path,
        *,
        size: ImageSize,
        orientation: OrientationPolicy,
        image_format: ImageFormat,
        jpeg_quality: int,
    ) -> ImageSize:
        self.read_header(source)
        write_fake_image(destination, size.width, size.height, image_format=image_format.value)
        self.converted.append((Path(source), Path(destination), size))
        return size

    def copy_bytes(self, source: Path, destination: Path) -> None:
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        self.copied.append((Path(source), Path(destination)))

    def library_versions(self) -> Mapping[str, str]:
        return {"fake-image": "1"}


# ------------------------------------------------------------------------------------------------
# Checkpoints and the run lock


@attrs.define
class FakeCheckpointStore:
    """Complete checkpoints are ``checkpoint-<step>`` folders holding the marker file (its content is not
    checked); ``damaged`` maps a folder to the problems :meth:`problems` reports for it."""

    damaged: Mapping[Path, Sequence[str]] = attrs.field(factory=dict)

    def complete_checkpoints(self, run_dir: Path) -> list[Path]:
        if not Path(run_dir).is_dir():
            return []
        found = [p for p in Path(run_dir).iterdir()
                 if checkpoint_step(p.name) is not None and (p / COMPLETE_MARKER).is_file()]  # fmt: skip
        return sorted(found, key=lambda p: checkpoint_step(p.name) or 0)

    def problems(self, folder: Path) -> list[str]:
        return list(self.damaged.get(Path(folder), ()))


@attrs.define
class RecordingRunLock:
    """:class:`ports.storage.RunLock` within one process: a second holder of a held target raises
    ``ArtifactError`` naming the first; ``holds`` records ``(target, entry_point)`` of every hold."""

    holds: list[tuple[Path, str]] = attrs.field(factory=list)
    _held: dict[Path, str] = attrs.field(factory=dict, init=False)

    @contextmanager
    def _hold(self, target: Path, entry_point: str) -> Iterator[None]:
        holder = self._held.get(target)
        if holder is not None:
            raise ArtifactError(f"run directory {target} is locked by {holder} (this process)")
        self._held[target] = entry_point
        self.holds.append((target, entry_point))
        try:
            yield
        finally:
            del self._held[target]

    def hold(self, target: Path, entry_point: str) -> AbstractContextManager[None]:
        return self._hold(Path(target), entry_point)
