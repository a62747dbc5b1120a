"""ms-swift's INFO lines and trust_remote_code warnings go to the run's swift.log, not to the console."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapters.swift.console import RUN_LOG_MARK, route_swift_logs


def test_swift_chatter_goes_to_the_log_file_and_errors_still_reach_the_console(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from swift.utils import get_logger

    import sys

    logger = get_logger()
    before = list(logger.handlers)
    levels = {id(h): h.level for h in before}
    # swift's console handler holds the stderr of whoever imported swift first (maybe another test's capture):
    # point it at this test's stderr so what reaches "the console" is what this test captures.
    streams = {id(h): h.setStream(sys.stderr) for h in before if type(h) is logging.StreamHandler}
    try:
        log_file = tmp_path / "swift.log"
        route_swift_logs(log_file)
        route_swift_logs(log_file)  # a second call adds no second file handler
        logger.info("Setting max_ratio: 200. You can adjust this hyperparameter through MAX_RATIO")
        logger.warning("Loading model from '/x' with trust_remote_code=True")
        logger.error("a real problem")
        for handler in logger.handlers:
            handler.flush()
        err = capfd.readouterr().err
        assert "max_ratio" not in err and "trust_remote_code" not in err
        assert "a real problem" in err
        text = log_file.read_text(encoding="utf-8")
        assert "max_ratio" in text and "trust_remote_code" in text and "a real problem" in text
        ours = [h.baseFilename for h in logger.handlers if getattr(h, RUN_LOG_MARK, False)]
        assert ours == [str(log_file.absolute())]  # an earlier run's log (another test's training) was closed
    finally:
        for handler in list(logger.handlers):
            if handler not in before:
                logger.removeHandler(handler)
                handler.close()
        for handler in before:
            handler.setLevel(levels[id(handler)])
            if id(handler) in streams:  # never back to a capture stream that may be closed by now
                handler.setStream(sys.__stderr__)  # type: ignore[attr-defined]


def test_routing_to_a_new_run_log_closes_the_previous_one(tmp_path: Path) -> None:
    from swift.utils import get_logger

    logger = get_logger()
    before = list(logger.handlers)
    try:
        route_swift_logs(tmp_path / "a" / "swift.log")
        logger.warning("first run")
        route_swift_logs(tmp_path / "b" / "swift.log")
        logger.warning("second run")
        for handler in logger.handlers:
            handler.flush()
        first = (tmp_path / "a" / "swift.log").read_text(encoding="utf-8")
        second = (tmp_path / "b" / "swift.log").read_text(encoding="utf-8")
        assert "first run" in first and "second run" not in first
        assert "second run" in second and "first run" not in second
        ours = [h.baseFilename for h in logger.handlers if getattr(h, RUN_LOG_MARK, False)]
        assert ours == [str((tmp_path / "b" / "swift.log").absolute())]
    finally:
        for handler in list(logger.handlers):
            if handler not in before:
                logger.removeHandler(handler)
                handler.close()
