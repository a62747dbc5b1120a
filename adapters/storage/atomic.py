"""Atomic file writes (D16): a temporary file in the destination's directory, fsync, then ``os.replace``.

A reader sees either the old file or the complete new one, never a partial write; an interrupted
writer leaves at most a ``.<name>.*.tmp`` file behind, which the next write does not depend on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def naming(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name when it names none: a failed ``write`` or ``fsync`` (a full
    disk) reports no path, and the error line must say which artifact could not be written (D15)."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def new_file_mode(*, directory: bool = False) -> int:
    """The mode ``open`` / ``mkdir`` would give a new file or directory under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def give_umask_modes(root: Path) -> None:
    """Widen ``root`` and everything under it to the modes the umask gives new files and directories.

    Some writers are stricter than the umask (safetensors writes 0600, ``mkdtemp`` makes 0700); a checkpoint
    or an expanded model must be readable by whoever may read the output directory. Bits are only added.
    """
    file_mode, dir_mode = new_file_mode(), new_file_mode(directory=True)
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        current = path.stat().st_mode & 0o7777
        wanted = current | (dir_mode if path.is_dir() else file_mode)
        if wanted != current:
            os.chmod(path, wanted)


def make_staging_directory(parent: Path, *, prefix: str, suffix: str = "") -> Path:
    """A fresh uniquely named directory in ``parent`` that is later renamed into place as a whole.

    ``mkdtemp`` creates it 0700; it gets the umask's usual mode instead, so a checkpoint or an evaluation
    renamed from it is readable by whoever may read the rest of the output directory.
    """
    Path(parent).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(staging, new_file_mode(directory=True))
    return staging


def write_atomically(path: Path, produce: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` by calling ``produce`` on a temporary binary file, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            produce(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the artifact the usual permissions of a new file.
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise naming(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    def produce(handle: BinaryIO) -> None:
        handle.write(data)

    write_atomically(path, produce)


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def write_lines_atomically(path: Path, lines: Iterable[str]) -> None:
    def produce(handle: BinaryIO) -> None:
        for line in lines:
            handle.write(line.encode("utf-8"))
            handle.write(b"\n")

    write_atomically(path, produce)


def copy_atomically(source: Path, destination: Path) -> None:
    """Copy ``source``'s bytes to ``destination`` (atomically at the destination)."""

    def produce(handle: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, handle, length=1 << 20)

    write_atomically(destination, produce)


def replace_atomically(source: Path, destination: Path) -> None:
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, destination)
    _fsync_directory(Path(destination).parent)
