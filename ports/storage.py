"""Ports for files: run artifacts (atomic writes, strict JSONL reads) and image files.

Use cases depend on these protocols; ``adapters.storage`` implements them (the file system and
Pillow), tests may pass in-memory fakes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import attrs

from domain.resize import ImageSize
from ports.json_types import JsonObject, JsonValue

# ------------------------------------------------------------------------------------------------
# Artifacts


@attrs.frozen
class NumberedLine:
    """One physical line of a text file: 1-based ``number`` and its text without the line break.

    ``problem`` is set (and ``text`` empty) only by :meth:`ArtifactStore.read_data_lines` for a line
    that is not UTF-8.
    """

    number: int
    text: str
    problem: str | None = None


@attrs.frozen
class NumberedRecord:
    """One JSON object of a JSONL file with the 1-based physical line it came from."""

    line: int
    record: JsonObject


class ArtifactStore(Protocol):
    """Writes run artifacts atomically (temporary file in the same directory, fsync, rename; D16)
    and reads them strictly (no lenient mode; data.md §1.1.4)."""

    def write_text(self, path: Path, text: str) -> None:
        """Replace ``path`` with ``text`` (UTF-8) atomically; parent directories are created."""
        ...

    def write_bytes(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data`` atomically."""
        ...

    def write_json(self, path: Path, value: object) -> None:
        """Replace ``path`` with ``value`` as indented, key-sorted UTF-8 JSON plus a newline, atomically."""
        ...

    def write_lines(self, path: Path, lines: Iterable[str]) -> None:
        """Replace ``path`` with one line per item (each terminated by ``\\n``) atomically."""
        ...

    def append_lines(self, path: Path, lines: Iterable[str]) -> None:
        """Append one line per item to ``path`` (created if absent), flushed and fsynced."""
        ...

    def read_lines(self, path: Path) -> Iterator[NumberedLine]:
        """Every physical line of a UTF-8 file, numbered from 1 (blank lines included)."""
        ...

    def read_data_lines(self, path: Path) -> Iterator[NumberedLine]:
        """Like :meth:`read_lines` for a dataset JSONL that is validated as a whole: a line that is not
        UTF-8 does not stop the read, it comes back with ``text = ""`` and ``problem`` saying why, so every
        problem of the file is reported at once (data.md §1.1). A missing file raises ArtifactError."""
        ...

    def read_jsonl(self, path: Path) -> Iterator[NumberedRecord]:
        """The JSON objects of a JSONL file; blank lines are skipped but counted. A malformed line
        raises ArtifactError ``Malformed JSONL at <path>:<line>: <first 200 chars>``; a non-object
        line raises ``Non-object JSONL record at <path>:<line>``."""
        ...

    def read_json(self, path: Path, *, exact_numbers: bool = False) -> JsonValue:
        """A whole JSON document (strict: no NaN/Infinity); with ``exact_numbers`` every non-integer
        number is a ``decimal.Decimal`` at its exact written value. Errors raise ArtifactError."""
        ...

    def replace(self, source: Path, destination: Path) -> None:
        """Rename ``source`` over ``destination`` atomically (same file system)."""
        ...

    def sha256(self, path: Path) -> str:
        """SHA-256 hex digest of a file's bytes."""
        ...

    def make_staging_directory(self, parent: Path, *, prefix: str, suffix: str = "") -> Path:
        """A fresh uniquely named directory in ``parent`` (created), with the umask's usual mode, to be
        renamed into place as a whole once complete."""
        ...


class RunLock(Protocol):
    """One run at a time per run directory: train, infer, evaluate and visualize hold it while they write."""

    def hold(self, target: Path, entry_point: str) -> AbstractContextManager[None]:
        """Hold the exclusive lock of ``target`` (a run directory, which need not exist yet) for the ``with``
        block. Another live holder raises ``domain.errors.ArtifactError`` naming it (entry point, pid, host);
        a lock whose holder died is taken over with a warning."""
        ...


class CheckpointStore(Protocol):
    """Training checkpoints on disk; the completion rule is :mod:`domain.checkpoints`."""

    def complete_checkpoints(self, run_dir: Path) -> list[Path]:
        """``checkpoint-<step>`` directories of ``run_dir`` carrying the completion marker, oldest first."""
        ...

    def problems(self, folder: Path) -> list[str]:
        """What in ``folder`` contradicts its marker (missing, truncated or changed files); empty if none."""
        ...


# ------------------------------------------------------------------------------------------------
# Images


class ImageFormat(str, enum.Enum):
    """Formats the converter writes: JPEG for JPEG sources, PNG for everything else (data.md §9.3)."""

    JPEG = "JPEG"
    PNG = "PNG"


class OrientationPolicy(str, enum.Enum):
    """``data.convert.exif_orientation`` (data.md §9.4)."""

    IGNORE = "ignore"
    APPLY = "apply"


NO_ROTATION_TAG_VALUES = (None, 1)  # EXIF orientation values meaning "pixels are upright as stored"
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that transpose width and height


@attrs.frozen
class ImageHeader:
    """What an image file's header says, without decoding pixels.

    ``size`` is the stored pixel grid (EXIF ignored); ``format`` the decoder's name (``JPEG``,
    ``PNG``, ...); ``orientation`` the EXIF orientation tag (1..8) or None.
    """

    size: ImageSize
    format: str
    orientation: int | None

    @property
    def has_orientation_change(self) -> bool:
        return self.orientation not in NO_ROTATION_TAG_VALUES

    def size_under(self, policy: OrientationPolicy) -> ImageSize:
        """The pixel grid the annotations see under ``policy``: transposed for tags 5..8 under ``apply``."""
        if policy is OrientationPolicy.APPLY and self.orientation in SWAPPING_ORIENTATIONS:
            return ImageSize(self.size.height, self.size.width)
        return self.size


class RGBImage(Protocol):
    """A decoded image in RGB (e.g. a ``PIL.Image.Image``)."""

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``."""
        ...

    @property
    def mode(self) -> str:
        """``"RGB"``."""
        ...


class ImageStore(Protocol):
    """Reads and writes image files. A missing or undecodable file raises
    ``domain.errors.ImageFileError`` (``kind`` ``missing`` / ``unreadable``, naming the path)."""

    def read_header(self, path: Path) -> ImageHeader:
        """Size, format and EXIF orientation from the header (pixels are not decoded)."""
        ...

    def read_rgb(self, path: Path) -> RGBImage:
        """Decode the whole image and convert to RGB, as stored (no EXIF transpose, no resize; §3.2)."""
        ...

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
        """Decode ``source``, apply ``orientation``, convert to RGB, resize to ``size`` with Lanczos when
        it differs, and write ``image_format`` atomically without any orientation tag. Returns the
        size written. Output bytes depend only on the inputs (reruns are byte-identical)."""
        ...

    def copy_bytes(self, source: Path, destination: Path) -> None:
        """Copy the file's bytes unchanged to ``destination`` atomically."""
        ...

    def library_versions(self) -> Mapping[str, str]:
        """Name -> version of the imaging libraries whose output this store's files depend on."""
        ...
