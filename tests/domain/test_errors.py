"""The exception taxonomy's shared behaviour (D15): bounded problem lists, best-effort diagnostics."""

from __future__ import annotations

import warnings

import pytest

from domain.errors import BestEffortDiagnostics, ConfigError, DataContractError, DataProblem


def test_data_contract_error_lists_twenty_problems_then_the_rest_count() -> None:
    problems = [DataProblem("a.jsonl", i, "width", "must be a positive multiple of 32; got 427") for i in range(1, 26)]
    text = str(DataContractError(problems))
    lines = text.splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 5 more"
    assert lines[0] == "a.jsonl:1: width: must be a positive multiple of 32; got 427"
    assert len(DataContractError(problems).problems) == 25


def test_config_error_keeps_every_message() -> None:
    err = ConfigError(["'a.b' must be an int, got str '2'", "Unknown config key 'c'"])
    assert err.messages == ("'a.b' must be an int, got str '2'", "Unknown config key 'c'")


def test_a_failing_diagnostic_warns_once_and_switches_off() -> None:
    diagnostics = BestEffortDiagnostics()
    calls = {"n": 0}

    def boom() -> int:
        calls["n"] += 1
        raise ValueError("bad shape")

    with pytest.warns(RuntimeWarning, match=r"Diagnostic 'coord_monitor' failed \(best-effort\): ValueError: bad shape; "
                                            r"disabled for the rest of the run"):
        assert diagnostics.run("coord_monitor", boom) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert diagnostics.run("coord_monitor", boom) is None  # no second warning, not called again
    assert calls["n"] == 1 and diagnostics.is_disabled("coord_monitor")
    assert diagnostics.run("other", lambda: 7) == 7
