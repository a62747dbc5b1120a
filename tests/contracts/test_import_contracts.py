"""The import contracts are real only if they can fail: mutate a copy of the tree and watch lint-imports break."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("domain", "ports", "adapters", "application")


def _copy_tree(dst: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", dst / ".importlinter")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_contracts_hold_on_the_real_tree() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


MUTATIONS = [
    # (file to create, or an existing module to append to; the text; contract name fragment that must break)
    ("domain/_mutant.py", "import torch\n", "1. domain"),
    ("domain/_mutant.py", "import yaml\n", "1. domain"),
    ("domain/_mutant.py", "from ports import provenance\n", "1. domain"),
    ("ports/_mutant.py", "import transformers\n", "2. ports"),
    ("ports/_mutant.py", "import adapters.provenance.collector\n", "2. ports"),
    ("application/_mutant.py", "import adapters.provenance.collector\n", "3. application"),
    ("adapters/provenance/_mutant.py", "import application.provenance\n", "4. adapters"),
    ("adapters/coco/_mutant.py", "import adapters.vis\n", "6. adapter"),
    # the config package importing the composition root again: application.config <-> application.wiring
    ("application/config/_mutant.py", "import application.wiring\n", "7. no import cycles"),
    # ports.generation imports ports.tokenizer; the way back closes a cycle inside ports
    ("ports/tokenizer.py", "import ports.generation\n", "7. no import cycles"),
    ("application/wiring.py", "import application.infer\n", "8. the composition root"),
    ("application/wiring.py", "from application.evaluate import run_evaluation\n", "8. the composition root"),
]


@pytest.mark.parametrize(("path", "text", "contract"), MUTATIONS, ids=[m[0] + ":" + m[1].strip() for m in MUTATIONS])
def test_each_contract_can_fail(tmp_path: Path, path: str, text: str, contract: str) -> None:
    _copy_tree(tmp_path)
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    # an existing module gets the import appended (still valid Python); a new file holds only the import
    target.write_text((target.read_text() + "\n" if target.exists() else "") + text)
    result = _lint(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # lint-imports wraps long contract names; join the summary lines before matching
    summary = " ".join(output.split())
    assert f"{contract}" in summary and "BROKEN" in summary, output
    start = summary.index(contract)
    assert "BROKEN" in summary[start:start + 160].split("KEPT")[0], output
