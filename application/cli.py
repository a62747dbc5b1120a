"""The one command-line contract of every entry point: ``--config FILE`` (and ``-h/--help``) only (D13).

Anything else is a usage error: argparse prints the usage and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from domain.errors import CoordExpError, InvariantViolation


def parse_config_argument(argv: Sequence[str], prog: str) -> Path:
    """Return the path given with ``--config``; exit with code 2 on any other argument."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}" if not prog.startswith("python") else prog,
        description="All settings live in the YAML config file (docs/configuration.md).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the YAML config file")
    args = list(argv)
    given = [a for a in args if a == "--config" or a.startswith("--config=")]
    if len(given) > 1:
        parser.error("--config may be given only once")
    namespace = parser.parse_args(args)
    if not namespace.config:
        parser.error("--config needs a file path")
    return Path(namespace.config)


def describe_os_error(exc: OSError) -> str:
    """One located line for an operating-system error: what failed, on which path, and why."""
    reason = exc.strerror or type(exc).__name__
    hint = {
        errno.ENOSPC: " (the disk is full: free space or choose another 'run.output_dir')",
        errno.EROFS: " (read-only file system: choose a writable 'run.output_dir')",
        errno.EACCES: " (permission denied: choose a writable location)",
        errno.EPERM: " (operation not permitted: choose a writable location)",
        errno.EISDIR: " (a directory was given where a file is expected)",
        errno.ENOTDIR: " (a file stands where a directory is expected)",
    }.get(exc.errno or -1, "")
    where = ": ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{where}: {reason}{hint}" if where else f"{reason}{hint}"


def run_entry_point(argv: Sequence[str] | None, prog: str, body: Callable[[Path], int]) -> int:
    """The one way every entry point fails (D15): parse ``--config``, run ``body``, and turn a
    :class:`CoordExpError` (config, data, artifact) or an OS error (read-only or full output directory, a
    directory given as a file) into one ``error: ...`` line on stderr and exit status 1. An
    :class:`InvariantViolation` is a bug in this project and keeps its traceback."""
    config_path = parse_config_argument(list(sys.argv[1:] if argv is None else argv), prog)
    try:
        return body(config_path)
    except InvariantViolation:
        raise
    except CoordExpError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
    return 1
