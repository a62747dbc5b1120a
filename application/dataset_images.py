"""Load-time image checks of data.md §3.3 and the image-path rule of §1.2 (D5).

Every error names the JSONL file, the line and the resolved path: file missing, not decodable, or
its size differs from the record's ``width`` / ``height``. ``data.check_image_sizes: eager`` reads
every header while the dataset is built (a thread pool); ``on_load`` defers the same check to the
first decode of each sample (:class:`CheckedImageLoader`), where it is still an error.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from domain.errors import DataContractError, DataProblem, ImageFileError
from domain.records import Record, RecordSet, image_path_problem
from domain.resize import ImageSize
from ports.storage import ImageStore, RGBImage

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
    if exc.kind == "missing":
        return _problem(record, f"file not found: {path}")
    return _problem(record, f"file is not a decodable image: {path} ({exc})")


def size_problem(record: Record, size: ImageSize, path: Path) -> DataProblem | None:
    """``images[0]: file is 640x427, record says 640x416; resolved path: <path>`` or None."""
    if (size.width, size.height) == (record.width, record.height):
        return None
    return _problem(
        record, f"file is {size.width}x{size.height}, record says {record.width}x{record.height}; resolved path: {path}"
    )


def record_image_problem(record: Record, root: Path, store: ImageStore) -> DataProblem | None:
    """Header check of one record's image: missing, undecodable header, or size mismatch."""
    path = resolve_image_path(record.image, root)
    try:
        header = store.read_header(path)
    except ImageFileError as exc:
        return _file_problem(record, exc, path)
    return size_problem(record, header.size, path)


def image_problems(
    records: Sequence[Record] | RecordSet, root: Path, store: ImageStore, *, workers: int = DEFAULT_CHECK_WORKERS
) -> tuple[DataProblem, ...]:
    """Every image problem of ``records`` (header reads in a thread pool), in record order."""
    items = list(records)
    if workers <= 1 or len(items) <= 1:
        found = [record_image_problem(r, root, store) for r in items]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-check") as pool:
            found = list(pool.map(lambda r: record_image_problem(r, root, store), items))
    return tuple(p for p in found if p is not None)


def check_images_eager(
    records: Sequence[Record] | RecordSet, root: Path, store: ImageStore, *, workers: int = DEFAULT_CHECK_WORKERS
) -> None:
    """``check_image_sizes: eager``: raise one DataContractError listing the first 20 image problems."""
    problems = image_problems(records, root, store, workers=workers)
    if problems:
        raise DataContractError(problems)


class CheckedImageLoader:
    """Decodes a record's image (RGB, as stored) and checks it against the record on every decode.

    Under ``on_load`` this is where a bad image is found (the first decode of the sample); under
    ``eager`` the headers were already checked and the comparison is a cheap guard. Thread-safe.
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
