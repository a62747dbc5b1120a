"""Finding 2 (issue 11): two runs with one run.name are refused while the first one lives; a lock left by
a killed run is taken over; the error names the holder. Real processes hold and contend for the lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from adapters.storage.run_lock import FileRunLock, lock_path_of
from domain.errors import ArtifactError

PROJECT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HF": "1", "TOKENIZERS_PARALLELISM": "false"}

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from adapters.storage.run_lock import FileRunLock
    with FileRunLock().hold(Path(sys.argv[1]), sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def start_holder(run_dir: Path, entry_point: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), entry_point],
        cwd=PROJECT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


@pytest.fixture()
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def evaluate_config(tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "out" / "run"
    run_dir.mkdir(parents=True)
    record = {
        "index": 0, "image": "images/0.jpg", "width": 64, "height": 48, "coord_mode": "pixel",
        "gt": [{"type": "bbox_2d", "points": [1, 2, 30, 40], "desc": "cat"}],
        "pred": [{"type": "bbox_2d", "points": [1, 2, 30, 40], "desc": "cat", "score": 0.9}],
        "raw_output": "", "raw_ends_with_im_end": True, "num_generated_tokens": 1, "errors": [],
    }  # fmt: skip
    (run_dir / "gt_vs_pred.jsonl").write_text(json.dumps(record) + "\n")
    config = tmp_path / "evaluate.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "run", "output_dir": str(tmp_path / "out")},
        "eval": {"metrics": "f1ish", "overlay": False},
    }))  # fmt: skip
    return config, run_dir


def run_module(module: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, "--config", str(config)], cwd=PROJECT, env=ENV, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip


def test_a_second_process_is_refused_then_a_killed_holder_is_taken_over(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    config, run_dir = evaluate_config(tmp_path)
    holder = start_holder(run_dir, "application.infer")
    holders.append(holder)

    refused = run_module("application.evaluate", config)
    assert refused.returncode == 1, refused.stderr
    assert f"is in use by application.infer (pid {holder.pid} on host" in refused.stderr, refused.stderr
    assert "choose another 'run.name'" in refused.stderr
    assert not (run_dir / "eval").exists()  # nothing written by the refused run

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads(lock_path_of(run_dir).read_text())["pid"] == holder.pid  # the dead holder's record stays

    taken = run_module("application.evaluate", config)
    assert taken.returncode == 0, taken.stderr
    assert "taking over the stale lock" in taken.stderr and str(holder.pid) in taken.stderr
    assert (run_dir / "eval" / "metrics.json").is_file()
    assert not lock_path_of(run_dir).exists()  # released at the end


def test_train_and_infer_entry_points_are_refused_before_writing_anything(
    tmp_path: Path, holders: list[subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    from application.infer import main as infer_main
    from application.train import main as train_main

    run_dir = tmp_path / "out" / "run"
    holders.append(holder := start_holder(run_dir, "application.train"))
    train_config = tmp_path / "train.yaml"
    train_config.write_text(yaml.safe_dump({
        "run": {"name": "run", "output_dir": str(tmp_path / "out")},
        "model": {"tiny": {"seed": 0}}, "data": {"train_jsonl": str(tmp_path / "train.jsonl")},
    }))  # fmt: skip
    infer_config = tmp_path / "infer.yaml"
    infer_config.write_text(yaml.safe_dump({
        "run": {"name": "run", "output_dir": str(tmp_path / "out")}, "model": {"tiny": {"seed": 0}},
        "data": {"val_jsonl": str(tmp_path / "val.jsonl")}, "stages": {"infer": True, "eval": False, "vis": False},
    }))  # fmt: skip
    for main, config in ((train_main, train_config), (infer_main, infer_config)):
        assert main(["--config", str(config)]) == 1
        err = capsys.readouterr().err
        assert f"in use by application.train (pid {holder.pid} on host" in err, err
    assert not run_dir.exists()


def test_a_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lock = lock_path_of(run_dir)
    lock.write_text(json.dumps({"pid": 4242, "host": "gpu-node-7", "entry_point": "application.train",
                                "started_at": "2026-01-01T00:00:00Z"}))  # fmt: skip
    lock_of_this_host = FileRunLock(host="this-host").hold(run_dir, "application.infer")
    with pytest.raises(ArtifactError, match=r"locked by application\.train \(pid 4242 on host gpu-node-7.*delete"), lock_of_this_host:
        pass
    assert json.loads(lock.read_text())["host"] == "gpu-node-7"  # not overwritten


def test_only_rank_zero_takes_the_lock(
    tmp_path: Path, holders: list[subprocess.Popen[str]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from application.train import main as train_main

    run_dir = tmp_path / "out" / "run"
    holders.append(start_holder(run_dir, "application.train"))  # rank 0 of the same job
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "run", "output_dir": str(tmp_path / "out")},
        "model": {"tiny": {"seed": 0}}, "data": {"train_jsonl": str(tmp_path / "missing.jsonl")},
    }))  # fmt: skip
    monkeypatch.setenv("RANK", "1")
    assert train_main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "in use" not in err and "missing.jsonl" in err, err  # got past the lock to the data check
