"""run_metadata.json builder (infer-eval-config.md §6, acceptance test 50) with a fake collector."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from adapters.fakes.provenance import FakeProvenanceCollector
from adapters.provenance.collector import SystemProvenanceCollector
from application.provenance import ENV_WHITELIST, PACKAGES, build_run_metadata, mark_finished


def _build(collector: FakeProvenanceCollector, **overrides: object) -> dict:
    kwargs: dict = dict(
        kind="train",
        collector=collector,
        entry_point="application.train",
        argv=["--config", "configs/stage1/smoke.yaml"],
        config_path="configs/stage1/smoke.yaml",
        extends_chain=["configs/base/common.yaml", "configs/stage1/smoke.yaml"],
        resolved_config_sha256="ab" * 32,
        run_name="smoke",
        output_dir="output",
        run_dir="output/smoke",
        seed=17,
        project_dir="/repo",
    )
    kwargs.update(overrides)
    return build_run_metadata(**kwargs)


def test_every_package_has_version_and_location_or_error() -> None:
    fake = FakeProvenanceCollector(packages={"torch": {"version": "2.14.1", "location": "/site"}})
    meta = _build(fake)
    packages = meta["upstream"]["packages"]
    assert set(packages) == set(PACKAGES)
    assert packages["torch"] == {"version": "2.14.1", "location": "/site"}
    for name, entry in packages.items():
        assert ("version" in entry and "location" in entry) or "error" in entry, name
    assert "error" in packages["vllm"]


def test_git_dirty_with_untracked_file(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=n",
                    "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    real = SystemProvenanceCollector()
    clean = real.git(str(tmp_path))
    assert clean["dirty"] is False and len(clean["sha"]) == 40
    (tmp_path / "untracked.txt").write_text("x")
    dirty = real.git(str(tmp_path))
    assert dirty["dirty"] is True
    assert any("untracked.txt" in line for line in dirty["status_porcelain"])


def test_git_outside_checkout_gives_nulls_and_error(tmp_path: Path) -> None:
    info = SystemProvenanceCollector().git(str(tmp_path))
    assert info["sha"] is None and info["dirty"] is None and "error" in info


def test_ms_swift_checkout_filled_when_module_lives_in_a_checkout() -> None:
    fake = FakeProvenanceCollector(
        module_dirs={"swift": "/src/ms-swift/swift"},
        checkouts=["/src/ms-swift"],
        git_result={"sha": "c" * 40, "branch": "dev", "dirty": True, "status_porcelain": [" M x"]},
    )
    meta = _build(fake)
    assert meta["ms_swift"]["install_path"] == "/src/ms-swift/swift"
    assert meta["ms_swift"]["checkout"] == {
        "checkout_root": "/src/ms-swift", "sha": "c" * 40, "branch": "dev", "dirty": True,
    }
    plain = _build(FakeProvenanceCollector(module_dirs={"swift": "/site/swift"}))
    assert plain["ms_swift"] == {"install_path": "/site/swift", "checkout": None}


def test_env_is_whitelisted_and_redacted() -> None:
    fake = FakeProvenanceCollector(env={"CUDA_VISIBLE_DEVICES": "0,1", "HF_TOKEN": "secret", "PATH": "/bin"})
    meta = _build(fake)
    assert meta["env"] == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert set(meta["env"]) <= set(ENV_WHITELIST)


def test_argv_must_be_config_only() -> None:
    with pytest.raises(ValueError, match="--config"):
        _build(FakeProvenanceCollector(), argv=["--config", "a.yaml", "--out", "b"])


def test_finished_at_null_until_marked_and_json_serialisable() -> None:
    fake = FakeProvenanceCollector(clock="2026-01-01T00:00:00.000000Z")
    meta = _build(fake, rollout_server={"source": "launcher"})
    assert meta["finished_at"] is None and meta["schema_version"] == 1
    assert meta["created_at"].endswith("Z")
    fake.clock = "2026-01-01T01:00:00.000000Z"
    done = mark_finished(meta, fake)
    assert done["finished_at"] == "2026-01-01T01:00:00.000000Z" and meta["finished_at"] is None
    assert meta["rollout_server"] == {"source": "launcher"}
    json.dumps(done)


def test_real_collector_reads_metadata_without_importing() -> None:
    real = SystemProvenanceCollector()
    assert "version" in real.package("attrs")
    assert "error" in real.package("definitely-not-a-distribution-xyz")
