"""Load-time image checks of data.md §3.3 and the image-path rule of §1.2 (D5).

Every error names the JSONL file, the line and the resolved path: file missing, outside the image root
once symlinks are resolved, not decodable (every pixel is decoded: a truncated file fails here, not at the
first batch after the model has loaded), or its size differs from the record's ``width`` / ``height``.
``data.check_image_sizes: eager`` decodes every image while the dataset is built (a thread pool, a progress
bar); a file that decoded cleanly is remembered by real path, byte size and mtime in
:class:`ImageVerdictCache` so the next run does not decode it again. ``on_load`` defers the same check to
the first decode of each sample (:class:`CheckedImageLoader`), where it is still an error.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from application.json_reading import as_int, json_array, json_object
from domain.errors import ArtifactError, DataContractError, DataProblem, ImageFileError
from domain.records import Record, RecordSet, image_path_problem
from domain.resize import ImageSize
from ports.storage import ArtifactStore, ImageStore, RGBImage

IMAGE_FIELD = "images[0]"
DEFAULT_CHECK_WORKERS = 8


def image_root_for(jsonl_path: Path, image_root: Path | None) -> Path:
    """§1.2: ``data.image_root`` when set, else the directory of the JSONL file."""
    return Path(image_root) if image_root is not None else Path(jsonl_path).parent


def resolve_image_path(relative: str, root: Path) -> Path:
    """The file of a record's image entry (already checked by ``domain.records.image_path_problem``:
    relative, ``/``-separated, never climbing above the root), as an absolute normalised path."""
    problem = image_path_problem(relative)
    if problem is not None:
        raise DataContractError(f"images[0]: {problem}")
    parts: list[str] = []
    for segment in relative.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            parts.pop()  # validated: never empties below the root
        else:
            parts.append(segment)
    return Path(root).absolute().joinpath(*parts)


def _problem(record: Record, reason: str) -> DataProblem:
    return DataProblem(record.source, record.line, IMAGE_FIELD, reason)


def _file_problem(record: Record, exc: ImageFileError, path: Path) -> DataProblem:
    if exc.kind == "missing" and Path(path).is_dir():
        return _problem(record, f"is a directory, not an image file: {path}")
    if exc.kind == "missing":
        return _problem(record, f"file not found: {path}")
    return _problem(record, f"file is not a decodable image: {path} ({exc})")


def escape_problem(path: Path, root: Path) -> str | None:
    """§1.2 on the file system: once symlinks are resolved, the file must still lie inside the image root.

    A link to a file elsewhere (or to ``/etc``) is refused before anything opens it. The root itself may
    be a symlink: it is resolved too.
    """
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real_root in real.parents:
        return None
    return (
        f"resolves outside the image root: {path} -> {real} (image root {real_root}); symlinks must stay "
        "inside the image root: copy the file in, or point data.image_root at the directory that holds it"
    )


def size_problem(record: Record, size: ImageSize, path: Path) -> DataProblem | None:
    """``images[0]: file is 640x427, record says 640x416; resolved path: <path>`` or None."""
    if (size.width, size.height) == (record.width, record.height):
        return None
    return _problem(
        record, f"file is {size.width}x{size.height}, record says {record.width}x{record.height}; resolved path: {path}"
    )


# ------------------------------------------------------------------------------------------------
# Verdict cache: a file that decoded cleanly is not decoded again while its size and mtime hold


CACHE_SCHEMA_VERSION = 1
CACHE_DIR_ENV = "COORDEXP_CACHE_DIR"


def image_check_cache_dir() -> Path:
    """``$COORDEXP_CACHE_DIR/image_checks`` if set, else ``~/.cache/coordexp/image_checks`` (the tiny
    model's cache root, docs/models.md)."""
    root = os.environ.get(CACHE_DIR_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "coordexp"
    return base / "image_checks"


class ImageVerdictCache:
    """Decoded sizes of images that decoded completely, keyed by real path, byte size and mtime (ns).

    One JSON file per real image root under ``directory`` (written atomically through the artifact
    store). Only clean verdicts are kept: a bad file is decoded (and reported) again on every run. The
    cache is an optimisation: an unreadable cache file warns once and is treated as empty; a failed save
    warns and changes no verdict.
    """

    def __init__(self, artifacts: ArtifactStore, root: Path, directory: Path | None = None) -> None:
        self._artifacts = artifacts
        self._root = os.path.realpath(root)
        digest = hashlib.sha256(self._root.encode("utf-8")).hexdigest()[:16]
        self.path = (directory if directory is not None else image_check_cache_dir()) / f"{digest}.json"
        self._entries: dict[str, list[int]] = {}
        self._dirty = False
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = json_object(self._artifacts.read_json(self.path))
            if data.get("schema_version") != CACHE_SCHEMA_VERSION or data.get("root") != self._root:
                return
            entries: dict[str, list[int]] = {}
            for real, entry in json_object(data["entries"]).items():
                values = json_array(entry)
                if len(values) == 4:
                    entries[real] = [as_int(x) for x in values]
            self._entries = entries
        except (ArtifactError, AttributeError, KeyError, TypeError, ValueError) as exc:
            warnings.warn(f"image check cache {self.path} ignored ({exc}); images are decoded again",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
            self._entries = {}

    @staticmethod
    def _stamp(real: str) -> tuple[int, int] | None:
        try:
            st = os.stat(real)
        except OSError:
            return None
        return int(st.st_size), int(st.st_mtime_ns)

    def size_of(self, real: str) -> ImageSize | None:
        """The decoded size remembered for ``real`` if its byte size and mtime are unchanged."""
        stamp = self._stamp(real)
        with self._lock:
            entry = self._entries.get(real)
        if stamp is None or entry is None or (entry[0], entry[1]) != stamp:
            return None
        return ImageSize(entry[2], entry[3])

    def remember(self, real: str, size: ImageSize, stamp: tuple[int, int] | None) -> None:
        if stamp is None:
            return
        with self._lock:
            self._entries[real] = [stamp[0], stamp[1], size.width, size.height]
            self._dirty = True

    def stamp(self, real: str) -> tuple[int, int] | None:
        return self._stamp(real)

    def save(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            body = {"schema_version": CACHE_SCHEMA_VERSION, "root": self._root, "entries": dict(self._entries)}
            self._dirty = False
        try:
            self._artifacts.write_json(self.path, body)
        except OSError as exc:
            warnings.warn(f"image check cache {self.path} not saved ({exc})", RuntimeWarning, stacklevel=2)


def decoded_size(path: Path, store: ImageStore, cache: ImageVerdictCache | None = None) -> ImageSize:
    """Decode every pixel of ``path`` (a truncated or corrupt file raises ImageFileError) and return its
    size; with a cache, a file unchanged since it last decoded cleanly is not decoded again."""
    real = os.path.realpath(path)
    if cache is not None:
        known = cache.size_of(real)
        if known is not None:
            return known
    stamp = cache.stamp(real) if cache is not None else None
    width, height = store.read_rgb(path).size
    size = ImageSize(width, height)
    if cache is not None:
        cache.remember(real, size, stamp)
    return size


def record_image_problem(
    record: Record, root: Path, store: ImageStore, cache: ImageVerdictCache | None = None
) -> DataProblem | None:
    """Full check of one record's image: outside the root, missing, not completely decodable, size mismatch."""
    path = resolve_image_path(record.image, root)
    escape = escape_problem(path, root)
    if escape is not None:
        return _problem(record, escape)
    try:
        size = decoded_size(path, store, cache)
    except ImageFileError as exc:
        return _file_problem(record, exc, path)
    return size_problem(record, size, path)


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (shown only on a terminal); None when disabled or tqdm is absent."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic
        return None
    return tqdm(total=total, desc="image check", unit="img", disable=None, file=sys.stderr, dynamic_ncols=True)


def image_problems(
    records: Sequence[Record] | RecordSet,
    root: Path,
    store: ImageStore,
    *,
    workers: int = DEFAULT_CHECK_WORKERS,
    cache: ImageVerdictCache | None = None,
    progress: bool = True,
) -> tuple[DataProblem, ...]:
    """Every image problem of ``records`` (full decodes in a thread pool, a progress bar), in record order."""
    items = list(records)
    bar = _progress_bar(len(items), progress and len(items) > 1)

    def check(record: Record) -> DataProblem | None:
        found = record_image_problem(record, root, store, cache)
        if bar is not None:
            bar.update(1)
        return found

    try:
        if workers <= 1 or len(items) <= 1:
            found = [check(r) for r in items]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-check") as pool:
                found = list(pool.map(check, items))
    finally:
        if bar is not None:
            bar.close()
        if cache is not None:
            cache.save()
    return tuple(p for p in found if p is not None)


def check_images_eager(
    records: Sequence[Record] | RecordSet,
    root: Path,
    store: ImageStore,
    *,
    workers: int = DEFAULT_CHECK_WORKERS,
    cache: ImageVerdictCache | None = None,
) -> None:
    """``check_image_sizes: eager``: raise one DataContractError listing the first 20 image problems."""
    problems = image_problems(records, root, store, workers=workers, cache=cache)
    if problems:
        raise DataContractError(problems)


class CheckedImageLoader:
    """Decodes a record's image (RGB, as stored) and checks it against the record on every decode.

    Under ``on_load`` this is where a bad image is found (the first decode of the sample); under
    ``eager`` every image was already decoded and the comparison is a cheap guard. Symlinks leaving the
    image root are refused before the file is opened. Thread-safe.
    """

    def __init__(self, records: Sequence[Record] | RecordSet, root: Path, store: ImageStore) -> None:
        self._records = list(records)
        self._root = Path(root)
        self._store = store
        self._checked: set[int] = set()
        self._lock = threading.Lock()

    def path(self, index: int) -> Path:
        return resolve_image_path(self._records[index].image, self._root)

    def load(self, index: int) -> RGBImage:
        record = self._records[index]
        path = self.path(index)
        escape = escape_problem(path, self._root)
        if escape is not None:
            raise DataContractError([_problem(record, escape)])
        try:
            image = self._store.read_rgb(path)
        except ImageFileError as exc:
            raise DataContractError([_file_problem(record, exc, path)]) from None
        width, height = image.size
        problem = size_problem(record, ImageSize(width, height), path)
        if problem is not None:
            raise DataContractError([problem])
        with self._lock:
            self._checked.add(index)
        return image

    @property
    def checked_count(self) -> int:
        """How many distinct samples have been decoded and checked so far."""
        with self._lock:
            return len(self._checked)
