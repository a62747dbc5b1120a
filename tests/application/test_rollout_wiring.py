"""``application.wiring.make_rollout_backend``: the ``rollout`` block picks and configures the backend (stage2.md §20)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from adapters.fakes.tokenizer import FakeTokenizer
from application import wiring
from application.config.schema import (
    CoordExpConfig,
    DecodingConfig,
    ModelConfig,
    RolloutConfig,
    RolloutServerEntry,
    VllmRolloutConfig,
    VllmServerConfig,
    WeightSyncConfig,
)
from domain.errors import ConfigError


@attrs.frozen
class _Encoder:
    tokenizer: Any = attrs.field(factory=FakeTokenizer)


def _config(rollout: RolloutConfig) -> CoordExpConfig:
    return CoordExpConfig(model=ModelConfig(path=Path("/models/ckpt"), dtype="bfloat16"), rollout=rollout)


def test_decoding_from_the_rollout_block() -> None:
    rollout = RolloutConfig(
        max_new_tokens=77,
        decoding=DecodingConfig(temperature=0.7, top_p=0.9, top_k=5),
        repetition_penalty=1.1,
    )
    decoding = wiring.make_rollout_decoding(rollout, n=2)
    assert (decoding.max_new_tokens, decoding.temperature, decoding.top_p, decoding.top_k) == (
        77,
        0.7,
        0.9,
        5,
    )
    assert (decoding.repetition_penalty, decoding.n, decoding.decode_mode) == (1.1, 2, "greedy")


def test_server_mode_builds_the_swift_rollout_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLOUT_KEY_FOR_TEST", "k")
    server = VllmServerConfig(
        servers=(
            RolloutServerEntry("http://127.0.0.1:8000/", 51216),
            RolloutServerEntry("http://10.0.0.2:8000", 51217),
        ),
        timeout_s=12.0,
        infer_timeout_s=30.0,
        api_key_env="ROLLOUT_KEY_FOR_TEST",
    )
    rollout = RolloutConfig(
        backend="vllm",
        vllm=VllmRolloutConfig(mode="server", server=server, sync=WeightSyncConfig(bucket_size_mib=64)),
    )
    backend: Any = wiring.make_rollout_backend(
        _config(rollout), module=None, encoder=_Encoder(), stop_ids=frozenset({2})
    )
    try:
        assert backend.name == "swift_rollout"
        settings = backend.settings
        assert settings.base_urls == ("http://127.0.0.1:8000", "http://10.0.0.2:8000")
        assert (settings.timeout_s, settings.infer_timeout_s, settings.bucket_size_mib) == (12.0, 30.0, 64)
        assert backend.describe()["auth"] == "bearer" and not backend.supports_sync("full")  # no NCCL on CPU
    finally:
        backend.close()
    monkeypatch.delenv("ROLLOUT_KEY_FOR_TEST")
    with pytest.raises(ConfigError, match="ROLLOUT_KEY_FOR_TEST"):
        wiring.make_rollout_backend(
            _config(rollout), module=None, encoder=_Encoder(), stop_ids=frozenset({2})
        )


def test_hf_backend_takes_the_live_module_and_batch_size() -> None:
    rollout = RolloutConfig(backend="hf", generate_batch_size=3)
    module = object()
    backend: Any = wiring.make_rollout_backend(
        _config(rollout), module=module, encoder=_Encoder(), stop_ids=frozenset({2})
    )
    assert backend.name == "hf" and backend.describe()["hf_batch_size"] == 3 and backend._module is module
    with pytest.raises(ConfigError, match="live training module"):
        wiring.make_rollout_backend(
            _config(rollout), module=None, encoder=_Encoder(), stop_ids=frozenset({2})
        )


def test_colocate_settings_checked_before_any_engine() -> None:
    rollout = RolloutConfig(
        backend="vllm", vllm=VllmRolloutConfig(mode="colocate", max_model_len=4096, enable_lora=True)
    )
    backend: Any = wiring.make_rollout_backend(
        _config(rollout), module=None, encoder=_Encoder(), stop_ids=frozenset({2}), world_size=2, rank=1
    )
    kwargs = backend.describe()["engine_kwargs"]
    assert (kwargs["load_format"], kwargs["distributed_executor_backend"], kwargs["max_model_len"]) == (
        "auto",
        "external_launcher",
        4096,
    )
    assert backend.supports_sync("adapter") and backend._engine is None
    missing = RolloutConfig(backend="vllm", vllm=VllmRolloutConfig(mode="colocate"))
    with pytest.raises(ConfigError, match="max_model_len"):
        wiring.make_rollout_backend(
            _config(missing), module=None, encoder=_Encoder(), stop_ids=frozenset({2})
        )


def test_yaml_rollout_server_block_with_api_key_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from application.config.loader import load_config

    path = tmp_path / "r.yaml"
    path.write_text(
        "rollout:\n  backend: vllm\n  vllm:\n    mode: server\n    server:\n"
        '      servers: [{base_url: "http://127.0.0.1:8000", group_port: 51216}]\n'
        "      api_key_env: ROLLOUT_KEY_FOR_TEST\n      infer_timeout_s: 30\n"
    )
    config = load_config(path).config
    assert config.rollout is not None and config.rollout.vllm.server.api_key_env == "ROLLOUT_KEY_FOR_TEST"
    monkeypatch.setenv("ROLLOUT_KEY_FOR_TEST", "k")
    backend: Any = wiring.make_rollout_backend(
        attrs.evolve(config, model=ModelConfig(path=Path("/m"))),
        module=None,
        encoder=_Encoder(),
        stop_ids=frozenset({2}),
    )
    assert backend.settings.infer_timeout_s == 30 and backend.describe()["auth"] == "bearer"
    backend.close()
    path.write_text(path.read_text().replace("api_key_env: ROLLOUT_KEY_FOR_TEST", "api_key_env: ''"))
    with pytest.raises(ConfigError, match="api_key_env"):
        load_config(path)


def test_hf_backend_gets_the_repeat_terminate_block() -> None:
    from application.config.schema import RepeatTerminateConfig
    from domain.repeat_terminate import RepeatTerminateSettings

    off: Any = wiring.make_rollout_backend(
        _config(RolloutConfig(backend="hf")), module=object(), encoder=_Encoder(), stop_ids=frozenset({2})
    )
    assert off._repeat_terminate is None and off.describe()["repeat_terminate"] is False
    block = RepeatTerminateConfig(
        enabled=True,
        min_new_tokens=10,
        max_consecutive_token_repeats=5,
        ngram_size=4,
        ngram_repeats=3,
        max_objects=7,
    )
    on: Any = wiring.make_rollout_backend(
        _config(RolloutConfig(backend="hf", repeat_terminate=block)),
        module=object(), encoder=_Encoder(), stop_ids=frozenset({2}),
    )  # fmt: skip
    assert on._repeat_terminate == RepeatTerminateSettings(10, 5, 4, 3, 7)
    assert on.describe()["repeat_terminate"] is True
