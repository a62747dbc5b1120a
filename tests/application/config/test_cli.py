"""The entry-point argument contract (infer-eval-config.md §1.1, acceptance test 1): only ``--config``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from application.cli import parse_config_argument

REPO = Path(__file__).resolve().parents[3]


def test_config_alone_is_accepted() -> None:
    assert parse_config_argument(["--config", "x.yaml"], "application.infer") == Path("x.yaml")
    assert parse_config_argument(["--config=configs/a b.yaml"], "application.infer") == Path("configs/a b.yaml")


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "x.yaml", "--out", "y"],
        [],
        ["x.yaml"],
        ["--config"],
        ["--config", ""],
        ["--conf", "x.yaml"],
        ["--config", "a.yaml", "--config", "b.yaml"],
        ["--config", "x.yaml", "training.max_steps=3"],
    ],
)
def test_anything_else_is_a_usage_error_with_exit_code_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config_argument(argv, "application.infer")
    assert info.value.code == 2
    assert "usage: python -m application.infer" in capsys.readouterr().err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config_argument(["-h"], "application.train")
    assert info.value.code == 0
    assert "--config FILE" in capsys.readouterr().out


def test_usage_error_from_a_real_process(tmp_path: Path) -> None:
    code = (
        "import sys; from application.cli import parse_config_argument; "
        "print(parse_config_argument(sys.argv[1:], 'application.infer'))"
    )
    bad = subprocess.run([sys.executable, "-c", code, "--config", "x.yaml", "--out", "y"], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --out y" in bad.stderr
    good = subprocess.run([sys.executable, "-c", code, "--config", "x.yaml"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert good.returncode == 0 and good.stdout.strip() == "x.yaml"
