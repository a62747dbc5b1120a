"""``run_metadata.rollout_server`` (infer-eval-config.md §6, §7.4): the servers' launch flags and their
``/get_engine_type/`` answers, from a real client talking to the loopback ``swift rollout`` server."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from adapters.fakes.provenance import FakeProvenanceCollector
from adapters.fakes.tokenizer import FakeTokenizer
from adapters.swift_rollout.client import ServerEndpoint, SwiftRolloutClient, SwiftRolloutSettings
from application.provenance import RolloutServerProvenance, build_run_metadata

LOOPBACK_FILE = Path(__file__).resolve().parents[1] / "support" / "loopback_swift_rollout.py"
_spec = importlib.util.spec_from_file_location("loopback_swift_rollout", LOOPBACK_FILE)
assert _spec is not None and _spec.loader is not None
loopback = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("loopback_swift_rollout", loopback)
_spec.loader.exec_module(loopback)


def _meta(rollout_server: Any) -> dict[str, Any]:
    return build_run_metadata(
        kind="train", collector=FakeProvenanceCollector(), entry_point="application.train",
        argv=["--config", "c.yaml"], config_path="c.yaml", extends_chain=["c.yaml"], resolved_config_sha256="0" * 64,
        run_name="r", output_dir="o", run_dir="o/r", seed=1, project_dir="/repo", rollout_server=rollout_server,
    )  # fmt: skip


def test_engine_answer_and_launch_flags_land_in_run_metadata() -> None:
    with loopback.LoopbackSwiftRollout(
        lambda r, c: [], world_size=4, engine_type="AsyncLLMEngine", enable_lora=True
    ) as server:
        tok = FakeTokenizer()
        client = SwiftRolloutClient(
            SwiftRolloutSettings((ServerEndpoint(server.base_url, 51300),)), tok, stop_ids={tok.im_end_id}
        )
        client.connect()
        described = client.describe()
        client.close()
    argv = ["swift", "rollout", "--model", "/m", "--vllm_data_parallel_size", "2", "--api_key", "TOPSECRET",
            "--api-key=ALSOSECRET"]  # fmt: skip
    record = {"servers": [{"base_url": server.base_url, "argv": argv}], "flags": {"data_parallel_size": 2}}
    typed = RolloutServerProvenance.from_backend(described, record)
    section = _meta(typed)["rollout_server"]
    assert section["source"] == "launcher" and section["flags"] == {"data_parallel_size": 2}
    [entry] = section["servers"]
    assert (entry["base_url"], entry["group_port"], entry["reported_world_size"]) == (
        server.base_url,
        51300,
        4,
    )
    assert entry["engine"]["engine_type"] == "AsyncLLMEngine" and entry["engine"]["enable_lora"] is True
    assert entry["argv"][:6] == argv[:6] and "--vllm_data_parallel_size" in entry["argv"]
    text = json.dumps(section)
    assert "TOPSECRET" not in text and "ALSOSECRET" not in text and "<redacted>" in text

    external = _meta(RolloutServerProvenance.from_backend(described))["rollout_server"]
    assert external["source"] == "external" and external["flags"] is None
    assert external["servers"][0]["argv"] is None and external["servers"][0]["reported_world_size"] == 4
    assert _meta({"source": "launcher"})["rollout_server"] == {
        "source": "launcher"
    }  # untyped callers still work
