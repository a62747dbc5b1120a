"""The one command-line contract of every entry point: ``--config FILE`` (and ``-h/--help``) only (D13).

Anything else is a usage error: argparse prints the usage and exits with code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


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
