"""Keep ms-swift's chatter off the console: its INFO lines (environment-variable settings, template
fields) and its repeated ``trust_remote_code`` warnings go to a log file in the run directory instead.

Errors still reach the console. The trainer's own per-step lines and progress bar are not affected.
"""

from __future__ import annotations

import logging
from pathlib import Path

SWIFT_LOG_FILENAME = "swift.log"
RUN_LOG_MARK = "_coordexp_run_log"  # marks the file handler this module installed


def route_swift_logs(log_file: Path | None) -> None:
    """Raise the console threshold of ms-swift's logger to ERROR and, when ``log_file`` is given, write
    everything it logs at INFO and above there (appended, so a resumed run keeps the earlier lines).

    One run log at a time: routing to another file closes the handler of the previous run (a process that
    trains twice writes each run's lines to its own ``swift.log``)."""
    from swift.utils import get_logger

    logger = get_logger()
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    if log_file is None:
        return
    target = str(Path(log_file).absolute())
    for handler in list(logger.handlers):
        if getattr(handler, RUN_LOG_MARK, False) and isinstance(handler, logging.FileHandler):
            if handler.baseFilename == target:
                return
            logger.removeHandler(handler)
            handler.close()
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(target, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s:%(name)s] %(message)s"))
    file_handler.setLevel(logging.INFO)
    setattr(file_handler, RUN_LOG_MARK, True)
    logger.addHandler(file_handler)
