"""One run at a time per run directory (issue 11 item 2): an exclusive lock held by train, infer, evaluate
and visualize for as long as they write into it.

The lock is ``<run_dir>.lock`` beside the directory (so a config error never creates the run directory).
The kernel's ``flock`` decides who holds it, and it is freed when the holder dies, even by ``kill -9``; the
file also names its holder (pid, host, entry point, start time) for the error message and for hosts that
do not share ``flock`` (a network file system): a lock left by another host is refused with the file to
delete, a lock left by a dead process on this host is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from adapters.storage.atomic import naming
from domain.errors import ArtifactError

LOCK_SUFFIX = ".lock"


def lock_path_of(target: Path) -> Path:
    """``output/run`` -> ``output/run.lock``."""
    target = Path(target).absolute()
    return target.with_name(target.name + LOCK_SUFFIX)


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return {"unreadable": raw[:200].decode("utf-8", "replace")}
    return holder if isinstance(holder, dict) else {"unreadable": str(holder)[:200]}


def describe_holder(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "an unnamed holder"
    if "unreadable" in holder:
        return f"an unreadable holder record {holder['unreadable']!r}"
    return (
        f"{holder.get('entry_point', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"since {holder.get('started_at', '?')})"
    )


def _running_here(pid: int, entry_point: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process of this host running ``entry_point``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return True  # no /proc: trust the pid
    state = stat.rpartition(")")[2].split()[:1]
    if state == ["Z"]:
        return False
    return entry_point in cmdline  # a reused pid runs something else


class FileRunLock:
    """``hold(target, entry_point)``: the run-directory lock of :mod:`ports.storage` on a local file system."""

    def __init__(self, *, host: str | None = None) -> None:
        self.host = host if host is not None else socket.gethostname()

    @contextlib.contextmanager
    def hold(self, target: Path, entry_point: str) -> Iterator[None]:
        path = lock_path_of(target)
        fd = self._acquire(path, Path(target).absolute(), entry_point)
        try:
            yield
        finally:
            # Unlink first, then unlock: a waiter that opened the old file sees it is no longer the lock.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)

    def _acquire(self, path: Path, target: Path, entry_point: str) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ArtifactError(
                    f"{target} is in use by {describe_holder(holder)} (lock {path}); two runs with one "
                    "'run.name' would overwrite each other: wait for it to finish or choose another 'run.name'"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and our flock: start again
                os.close(fd)
                continue
            try:
                self._check_stale(fd, path, target)
            except BaseException:
                os.close(fd)
                raise
            try:
                self._write_holder(fd, target, entry_point)
            except BaseException as exc:  # e.g. a full disk: leave no half-written holder record behind
                with contextlib.suppress(OSError):
                    path.unlink()
                os.close(fd)
                if isinstance(exc, OSError):
                    raise naming(exc, path) from exc
                raise
            return fd

    def _check_stale(self, fd: int, path: Path, target: Path) -> None:
        holder = _read_holder(fd)
        if holder is None:
            return
        host, pid = holder.get("host"), holder.get("pid")
        if host != self.host:
            raise ArtifactError(
                f"{target} is locked by {describe_holder(holder)}, which this host cannot check (lock {path}); "
                f"if that run is no longer alive, delete {path} and start again"
            )
        if pid == os.getpid():
            return  # an earlier hold of this very process that could not clean up (its with-block raised)
        if isinstance(pid, int) and _running_here(pid, str(holder.get("entry_point", ""))):
            raise ArtifactError(
                f"{target} is in use by {describe_holder(holder)} (lock {path}): wait for it to finish or "
                "choose another 'run.name'"
            )
        warnings.warn(
            f"{path}: taking over the stale lock of {describe_holder(holder)}, which is no longer running",
            RuntimeWarning,
            stacklevel=4,
        )

    def _write_holder(self, fd: int, target: Path, entry_point: str) -> None:
        record = {
            "pid": os.getpid(),
            "host": self.host,
            "entry_point": entry_point,
            "run_dir": str(target),
            "started_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
