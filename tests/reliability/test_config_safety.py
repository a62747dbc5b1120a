"""Findings 8 and 9 (issue 11): credentials in a server URL are refused without being echoed; remote
model code runs only when the config says so, and the run records it."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
from fake_pipeline import ScriptedDeps, write_infer_config, write_split

from adapters.vllm.local import engine_kwargs
from adapters.vllm.server_client import vllm_server_argv
from application.config import load_config
from application.infer import run_pipeline
from domain.errors import ConfigError

SECRET = "hunter2secret"

URL_CASES = [
    ("infer: {backend: vllm, vllm: {mode: server, base_url: 'http://alice:%s@gpu-host:8000/v1'}}",
     "infer.vllm.base_url"),
    # Without a password the old pattern took the user name for the host and stored the URL as given.
    ("infer: {backend: vllm, vllm: {mode: server, base_url: 'http://%s@gpu-host:8000'}}", "infer.vllm.base_url"),
    (("objective: {trainer_variant: stage2_ab}\nstage2_ab: {schedule: {b_ratio: 0.5}}\n"
      "rollout: {backend: vllm, vllm: {max_model_len: 64, mode: server, server: {servers: "
      "[{base_url: 'http://127.0.0.1:8000', group_port: 1}, {base_url: 'https://bob:%s@10.0.0.2:8001', group_port: 2}]}}}"),
     "rollout.vllm.server.servers[1].base_url"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key"), URL_CASES, ids=["infer-user-password", "infer-user", "rollout-server"])
def test_a_base_url_with_user_info_is_refused_without_echoing_it(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text % SECRET)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"'{key}'" in message and "user info" in message, message
    assert SECRET not in message
    assert not list(tmp_path.rglob("resolved_config.json"))


def test_a_plain_base_url_is_still_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("infer: {backend: vllm, vllm: {mode: server, base_url: 'http://gpu-host:8000/v1'}}")
    assert load_config(path).config.infer.vllm.base_url == "http://gpu-host:8000/v1"


# --- finding 9: trust_remote_code --------------------------------------------------------------------


LAUNCH = types.SimpleNamespace(
    tensor_parallel_size=1, data_parallel_size=1, gpu_memory_utilization=0.9, max_model_len=None,
    max_num_batched_tokens=None, max_num_seqs=None, enable_prefix_caching=True, enforce_eager=False,
)  # fmt: skip


@pytest.mark.parametrize("allowed", [False, True])
def test_remote_code_runs_only_when_the_config_says_so_and_the_run_records_it(tmp_path: Path, allowed: bool) -> None:
    infer: dict[str, Any] = {"backend": "vllm", "vllm": {"mode": "local"}}
    if allowed:
        infer["vllm"]["trust_remote_code"] = True
    config_path = write_infer_config(tmp_path, write_split(tmp_path, 2), **infer)
    loaded = load_config(config_path, entry_point="infer")
    vllm = loaded.config.infer.vllm
    assert vllm.trust_remote_code is allowed  # default false
    kwargs = engine_kwargs(model_path="m", dtype="float32", seed=1, launch=LAUNCH, image_root="/", max_pixels=1024,
                           trust_remote_code=vllm.trust_remote_code)  # fmt: skip
    assert kwargs["trust_remote_code"] is allowed
    argv = vllm_server_argv(model_path="m", base_url=None, dtype="float32", served_model_name="m", launch=LAUNCH,
                            max_pixels=1024, trust_remote_code=vllm.trust_remote_code)  # fmt: skip
    assert ("--trust-remote-code" in argv) is allowed
    outcome = run_pipeline(loaded, ScriptedDeps().deps())
    metadata = json.loads((outcome.run_dir / "run_metadata.json").read_text())
    assert metadata["inference"]["trust_remote_code"] is allowed
