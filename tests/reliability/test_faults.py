"""Faults (issue 11, "the suite that stays"): kill -9 and resume, a full or read-only output directory.

Every case asserts what D15/D16 promise: a clear, located error (or a clean resume), nothing half-written
(no temporary file left, every JSON artifact parses, an artifact holds only complete lines), and a rerun
that ends where an uninterrupted run ends. Killed runs are real processes killed with SIGKILL; a full disk
and a read-only file system are an ``OSError`` (ENOSPC / EROFS) injected at the k-th durable write, for
every k the run performs.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_pipeline import ScriptedDeps, write_infer_config, write_split
from training_runs import PROJECT, convert_shapes3, logged_losses, write_train_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HF": "1", "TOKENIZERS_PARALLELISM": "false"}
SEED = int(os.environ.get("COORDEXP_FAULT_SEED", "11"))  # the "random" step is drawn from this seed


def leftovers(root: Path) -> list[Path]:
    """Temporary files or staging directories an interrupted writer left behind."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name or p.name.endswith(".partial") and p.is_dir()]


def json_files_parse(root: Path) -> None:
    for path in root.rglob("*.json"):
        json.loads(path.read_text())  # a half-written JSON artifact would raise here


# --- kill -9 --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_training_at_a_random_step_resumes_with_the_same_losses(tmp_path: Path) -> None:
    """Reference: 4 steps in one go (4 samples, one per step: the kill lands mid-epoch). Faulted: the same run killed with SIGKILL right after a random step
    was logged (often inside that step's checkpoint save), then ``resume_from_checkpoint: latest``."""
    from application.config import load_config
    from train_runner import run_train

    data = convert_shapes3(tmp_path, records=4)
    training = {"max_steps": 4, "save_strategy": "steps", "save_steps": 1, "packing": False}
    reference_cfg = write_train_config(tmp_path / "reference", data, run={"name": "r", "output_dir": str(tmp_path / "ref")},
                                       training=training)  # fmt: skip
    reference = list(run_train(load_config(reference_cfg, entry_point="train")).step_losses)
    assert len(reference) == 4

    kill_after = random.Random(SEED).randint(2, 3)
    run_dir = tmp_path / "faulted" / "f"
    faulted_cfg = write_train_config(tmp_path / "faulted_cfg", data, run={"name": "f", "output_dir": str(tmp_path / "faulted")},
                                     training=training)  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "application.train", "--config", str(faulted_cfg)],
                               cwd=PROJECT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while process.poll() is None:
            log = run_dir / "logging.jsonl"
            if log.is_file() and max(logged_losses(log.parent) or {0: 0.0}) >= kill_after:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself before step {kill_after}"
    assert len(logged_losses(run_dir)) < 4

    resumed_cfg = write_train_config(tmp_path / "resumed_cfg", data, run={"name": "f", "output_dir": str(tmp_path / "faulted")},
                                     training={**training, "resume_from_checkpoint": "latest"})  # fmt: skip
    run_train(load_config(resumed_cfg, entry_point="train"))
    losses = logged_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4]  # lines past the resumed checkpoint were cut, then appended
    assert [losses[s] for s in range(1, 5)] == pytest.approx(reference, abs=1e-6)
    assert not leftovers(run_dir)
    json_files_parse(run_dir)
    marker = json.loads((run_dir / "checkpoint-4" / "checkpoint_complete.json").read_text())
    assert all(len(entry["sha256"]) == 64 for entry in marker["files"])


KILLED_INFER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from fake_pipeline import ScriptedDeps
    from application.config import load_config
    from application.infer import run_pipeline

    kill_after = int(sys.argv[2])

    def kill_9(written, partial):
        if written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    run_pipeline(load_config(sys.argv[1], entry_point="infer"), ScriptedDeps().deps(after_batch=kill_9))
    """
)


def test_kill_9_inference_resumes_byte_identical(tmp_path: Path) -> None:
    from application.config import load_config
    from application.infer import run_pipeline

    val = write_split(tmp_path, 9)
    reference = run_pipeline(load_config(write_infer_config(tmp_path, val, name="ref"), entry_point="infer"),
                             ScriptedDeps().deps())  # fmt: skip
    config = write_infer_config(tmp_path, val, name="faulted")
    kill_after = 2 * random.Random(SEED).randint(1, 4)  # after a micro-batch of 2
    killed = subprocess.run([sys.executable, "-c", KILLED_INFER, str(config), str(kill_after), str(Path(__file__).parent)],
                            cwd=PROJECT, env=ENV, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = tmp_path / "out" / "faulted" / "gt_vs_pred.jsonl.partial"
    assert partial.read_bytes().count(b"\n") == kill_after and not partial.with_suffix("").exists()

    deps = ScriptedDeps()
    outcome = run_pipeline(load_config(config, entry_point="infer"), deps.deps())
    assert outcome.paths.artifact.read_bytes() == reference.paths.artifact.read_bytes()
    assert json.loads(outcome.paths.summary.read_text())["resumed_from_index"] == kill_after


# --- a full or read-only output directory -----------------------------------------------------------


class DiskFault:
    """``os.fsync`` of a regular file raises ``OSError(code)`` from the ``fail_at``-th call on; every durable
    write of the project fsyncs its file (the atomic writer, appends, the run lock), so this fails each write
    in turn. (A directory's fsync after a rename is best-effort by design and is left alone.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, code: int, fail_at: int) -> None:
        self.calls = 0
        self.code = code
        self.fail_at = fail_at
        self.fired = False
        real = os.fsync

        def fsync(fd: int) -> None:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return real(fd)
            self.calls += 1
            if self.calls >= self.fail_at:
                self.fired = True
                raise OSError(self.code, os.strerror(self.code), os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


FAULTS = [pytest.param(errno.ENOSPC, "No space left on device", id="full-disk"),
          pytest.param(errno.EROFS, "Read-only file system", id="read-only")]  # fmt: skip


def each_write_fails(
    monkeypatch: pytest.MonkeyPatch, code: int, run: Callable[[int], int], check: Callable[[int], None]
) -> int:
    """Run the use case with the k-th durable write failing, k = 1, 2, ... until a run needs no write past
    the last; ``check(k)`` inspects the directory after each failed run. Returns the number of faults."""
    k = 0
    while True:
        k += 1
        with monkeypatch.context() as patch:
            fault = DiskFault(patch, code, k)
            status = run(k)
        if not fault.fired:
            assert status == 0
            return k - 1
        assert status == 1, f"write {k}: the run did not fail cleanly"
        check(k)
        assert k < 100


@pytest.mark.parametrize(("code", "reason"), FAULTS)
def test_inference_on_a_failing_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                     code: int, reason: str) -> None:  # fmt: skip
    from application.cli import run_entry_point
    from application.config import load_config
    from application.infer import run_pipeline
    from application.run_lock import hold_run_directory

    val = write_split(tmp_path, 6)
    reference = run_pipeline(load_config(write_infer_config(tmp_path, val, name="ref"), entry_point="infer"),
                             ScriptedDeps().deps()).paths.artifact.read_bytes()  # fmt: skip
    config = write_infer_config(tmp_path, val, name="faulted")
    run_dir = tmp_path / "out" / "faulted"

    def body(path: Path) -> int:
        loaded = load_config(path, entry_point="infer")
        with hold_run_directory(loaded.config, "application.infer"):
            run_pipeline(loaded, ScriptedDeps().deps())
        return 0

    def run(_k: int) -> int:
        return run_entry_point(["--config", str(config)], "application.infer", body)

    def check(k: int) -> None:
        err = capsys.readouterr().err
        assert err.startswith("error: /") and reason in err, (k, err)  # names the file that failed
        assert not leftovers(run_dir) if run_dir.exists() else True
        if run_dir.exists():
            json_files_parse(run_dir)
        partial = run_dir / "gt_vs_pred.jsonl.partial"
        if partial.exists():
            for line in partial.read_bytes().splitlines():
                json.loads(line)

    faults = each_write_fails(monkeypatch, code, run, check)
    assert faults >= 5
    assert (run_dir / "gt_vs_pred.jsonl").read_bytes() == reference  # the reruns ended where one run ends
    FIGURES.setdefault("infer", {})[reason] = faults


@pytest.mark.parametrize(("code", "reason"), FAULTS)
def test_evaluate_and_visualize_on_a_failing_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], code: int, reason: str) -> None:  # fmt: skip
    from application.config import load_config
    from application.evaluate import main as evaluate_main
    from application.infer import run_pipeline
    from application.visualize import main as visualize_main

    val = write_split(tmp_path, 3)
    run_pipeline(load_config(write_infer_config(tmp_path, val, name="run"), entry_point="infer"), ScriptedDeps().deps())
    run_dir = tmp_path / "out" / "run"
    config = tmp_path / "post.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "run", "output_dir": str(tmp_path / "out")},
                                      "data": {"image_root": str(tmp_path)},
                                      "eval": {"metrics": "f1ish", "overlay": False}, "vis": {"limit": 2}}))  # fmt: skip
    for name, main in (("evaluate", evaluate_main), ("visualize", visualize_main)):
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

        def check(k: int, name: str = name, before: dict[Path, bytes] = before) -> None:
            err = capsys.readouterr().err
            assert err.startswith("error: /") and reason in err, (name, k, err)
            assert not leftovers(tmp_path / "out"), (name, k)
            assert {p: p.read_bytes() for p in before} == before  # earlier artifacts untouched
            assert not (run_dir / ("eval" if name == "evaluate" else "vis")).exists() or name == "visualize"

        faults = each_write_fails(monkeypatch, code, lambda _k, main=main: main(["--config", str(config)]), check)
        assert faults >= 1, name
        FIGURES.setdefault(name, {})[reason] = faults
    json.loads((run_dir / "eval" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("code", "reason"), [FAULTS[0]])
def test_training_on_a_failing_disk_reruns_to_the_same_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int, reason: str
) -> None:
    """A clean run counts its durable writes (N) and gives the reference losses. Then one run directory
    goes through a chain of runs, each failing at its k-th write (k = 1: the lock, 2: resolved_config.json,
    then two random writes of 3..N, among them logging lines and checkpoint files), each rerun with
    ``resume_from_checkpoint: latest``; a last clean rerun must end with the reference losses."""
    from application.train import main as train_main

    data = convert_shapes3(tmp_path, records=2)
    training = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1, "packing": False,
                "resume_from_checkpoint": "latest"}  # fmt: skip
    reference_cfg = write_train_config(tmp_path / "reference", data, run={"name": "r", "output_dir": str(tmp_path / "ref")},
                                       training=training)  # fmt: skip
    with monkeypatch.context() as patch:
        counter = DiskFault(patch, code, fail_at=10**9)
        assert train_main(["--config", str(reference_cfg)]) == 0
    writes = counter.calls
    reference = logged_losses(tmp_path / "ref" / "r")
    capsys.readouterr()

    config = write_train_config(tmp_path / "faulted", data, run={"name": "f", "output_dir": str(tmp_path / "out")},
                                training=training)  # fmt: skip
    run_dir = tmp_path / "out" / "f"
    chain = [1, 2, *sorted(random.Random(SEED).sample(range(3, writes + 1), 2))]
    survived = 0
    for k in chain:
        with monkeypatch.context() as patch:
            fault = DiskFault(patch, code, fail_at=k)
            status = train_main(["--config", str(config)])
        if not fault.fired:  # a resumed run needed fewer than k writes: it finished
            assert status == 0, k
            break
        survived += 1
        assert status == 1, k
        err = capsys.readouterr().err
        assert "error: /" in err and reason in err, (k, err)
        assert not leftovers(tmp_path / "out"), k
        if run_dir.exists():
            json_files_parse(run_dir)
    else:
        assert train_main(["--config", str(config)]) == 0
    assert logged_losses(run_dir) == pytest.approx(reference, abs=1e-6)
    FIGURES.setdefault("train", {})[reason] = survived
    FIGURES["train"]["durable writes of a clean 2-step run"] = writes


def test_a_write_that_fails_without_a_path_is_named(tmp_path: Path) -> None:
    """A full disk fails ``write()`` with an OSError that names no file; the writers name the artifact."""
    from adapters.storage.atomic import write_atomically
    from adapters.storage.jsonl import FileArtifactStore
    from adapters.storage.metric_log import JsonlMetricSink
    from application.cli import describe_os_error

    def full(_handle: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "summary.json"
    with pytest.raises(OSError) as info:
        write_atomically(target, full)
    assert info.value.filename == str(target) and info.value.errno == errno.ENOSPC
    assert describe_os_error(info.value).startswith(f"{target}: No space left on device (the disk is full")
    assert list(tmp_path.iterdir()) == []  # no temporary file left

    class FullHandle:
        closed = False

        def write(self, _text: Any) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        writelines = write

    sink = JsonlMetricSink(tmp_path / "logging.jsonl")
    sink._handle.close()
    sink._handle = FullHandle()  # type: ignore[assignment]
    with pytest.raises(OSError) as info:
        sink.log({"global_step": 1, "loss": 1.0})
    assert info.value.filename == str(tmp_path / "logging.jsonl")
    with pytest.raises(OSError) as info, mock_open_append(FullHandle()):
        FileArtifactStore().append_lines(tmp_path / "gt_vs_pred.jsonl.partial", ["{}"])
    assert info.value.filename == str(tmp_path / "gt_vs_pred.jsonl.partial")


def mock_open_append(handle: Any) -> Any:
    import contextlib
    from unittest import mock

    @contextlib.contextmanager
    def opened(*_args: Any, **_kwargs: Any) -> Iterator[Any]:
        yield handle

    return mock.patch("builtins.open", opened)


@pytest.fixture()
def small_tmpfs(mount_tmpfs: Callable[[str], Path]) -> Path:
    """A real 64 KiB tmpfs (needs the right to mount: root in a container); skipped elsewhere."""
    return mount_tmpfs("size=64k")


def test_inference_on_a_real_full_then_read_only_tmpfs(
    tmp_path: Path, small_tmpfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No injection: a tmpfs filled by a ballast file, then remounted read-only. Each run fails with a clear
    error; after space is freed and the mount made writable the run resumes and ends byte-identical."""
    from application.cli import run_entry_point
    from application.config import load_config
    from application.infer import run_pipeline
    from application.run_lock import hold_run_directory

    val = write_split(tmp_path, 40)
    reference = run_pipeline(load_config(write_infer_config(tmp_path, val, name="ref"), entry_point="infer"),
                             ScriptedDeps().deps()).paths.artifact.read_bytes()  # fmt: skip
    config_dict = yaml.safe_load(write_infer_config(tmp_path, val, name="faulted").read_text())
    config_dict["run"]["output_dir"] = str(small_tmpfs)
    config = tmp_path / "on_tmpfs.yaml"
    config.write_text(yaml.safe_dump(config_dict))

    def body(path: Path) -> int:
        loaded = load_config(path, entry_point="infer")
        with hold_run_directory(loaded.config, "application.infer"):
            run_pipeline(loaded, ScriptedDeps().deps())
        return 0

    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\0" * (64 * 1024 - 12 * 1024))  # leaves room for the run files, not the artifact
    assert run_entry_point(["--config", str(config)], "application.infer", body) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {small_tmpfs}") and "No space left on device" in err, err
    run_dir = small_tmpfs / "faulted"
    assert not leftovers(small_tmpfs)

    ballast.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert run_entry_point(["--config", str(config)], "application.infer", body) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {small_tmpfs}") and "Read-only file system" in err, err

    subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert run_entry_point(["--config", str(config)], "application.infer", body) == 0
    assert (run_dir / "gt_vs_pred.jsonl").read_bytes() == reference
    assert not leftovers(small_tmpfs)

    # evaluate on the full disk: the path of the file that could not be written, the run left as it was
    from application.evaluate import main as evaluate_main

    evaluate_config = tmp_path / "evaluate.yaml"
    evaluate_config.write_text(yaml.safe_dump({"run": {"name": "faulted", "output_dir": str(small_tmpfs)},
                                               "eval": {"metrics": "f1ish", "overlay": False}}))  # fmt: skip
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    ballast.write_bytes(b"\0" * max(0, free - 4096))
    assert evaluate_main(["--config", str(evaluate_config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir}") and "No space left on device" in err, err
    assert {p: p.read_bytes() for p in before} == before and not (run_dir / "eval").exists()
    assert not leftovers(small_tmpfs)


FIGURES: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="module", autouse=True)
def report_figures() -> Iterator[None]:
    yield
    if FIGURES:
        print(f"\nfault figures (faults injected and survived per use case): {json.dumps(FIGURES, sort_keys=True)}")
