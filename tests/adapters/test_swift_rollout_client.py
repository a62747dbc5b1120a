"""The ``swift rollout`` client against a loopback server speaking ms-swift 4.6's protocol (stage2.md §16.3;
spec tests 54-61), and end to end with the tiny Qwen3-VL serving it on CPU."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.fakes.tokenizer import FakeTokenizer
from adapters.swift_rollout.client import (
    ServerEndpoint,
    SwiftRolloutClient,
    SwiftRolloutSettings,
    infer_timeout,
)
from domain.errors import ConfigError, GenerationError, SetupError
from domain.rollout_plan import request_seed, seed_base
from ports.rollout import RolloutDecoding, RolloutRequest, WeightSyncRequest

LOOPBACK_FILE = Path(__file__).resolve().parents[1] / "support" / "loopback_swift_rollout.py"
_spec = importlib.util.spec_from_file_location("loopback_swift_rollout", LOOPBACK_FILE)
assert _spec is not None and _spec.loader is not None
loopback = importlib.util.module_from_spec(_spec)
sys.modules["loopback_swift_rollout"] = loopback
_spec.loader.exec_module(loopback)

TOK = FakeTokenizer()
IM_END = TOK.im_end_id
DECODING = RolloutDecoding(max_new_tokens=16)
SECRET = "s3cr3t-rollout-key"
SHAPES3 = Path(__file__).resolve().parents[2] / "data" / "shapes3"


def coord(k: int) -> int:
    return TOK.id_of(f"<|coord_{k}|>")


def echo_responder(infer_requests: list[Any], config: Any) -> list[Any]:
    """Token ids carry the POST's seed and the item position; the prompt ids carry the user text's length."""
    out = []
    for position, request in enumerate(infer_requests):
        user = request.messages[-1]["content"]
        samples = [
            ([coord(config.seed % 1000), coord(position), coord(k), IM_END], "stop") for k in range(config.n)
        ]
        out.append(loopback.completion_json([1, 2, len(user)], samples))
    return out


def make_requests(
    n: int, *, base: int = 3000051, decoding: RolloutDecoding = DECODING
) -> list[RolloutRequest]:
    return [
        RolloutRequest(
            i,
            "sys",
            f"u{'x' * i}",
            ("/data/img.jpg",),
            decoding,
            request_seed(base, i),
            64,
            64,
            "t.jsonl",
            i + 1,
        )
        for i in range(n)
    ]


def client_for(urls: list[str], **settings: Any) -> SwiftRolloutClient:
    extra = {k: settings.pop(k) for k in ("environ", "broadcaster_factory") if k in settings}
    config = SwiftRolloutSettings(tuple(ServerEndpoint(u, 51216 + i) for i, u in enumerate(urls)), **settings)
    return SwiftRolloutClient(config, TOK, stop_ids={IM_END}, health_poll_s=0.05, **extra)


@pytest.fixture()
def servers(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    count = getattr(request, "param", 2)
    started = [loopback.LoopbackSwiftRollout(echo_responder).start() for _ in range(count)]
    try:
        yield started
    finally:
        for s in started:
            s.stop()


# ---- chunking, order, seeds (spec tests 54, 56) ---------------------------------------------------------------


@pytest.mark.parametrize("n_servers", [1, 2, 3, 4])
def test_chunking_keeps_order_and_seeds(n_servers: int) -> None:
    started = [loopback.LoopbackSwiftRollout(echo_responder).start() for _ in range(n_servers)]
    try:
        client = client_for([s.base_url for s in started])
        batch = make_requests(5)
        results = client.generate(batch)
        size = -(-5 // n_servers)
        assert [r.index for r in results] == [0, 1, 2, 3, 4]
        for i, result in enumerate(results):
            start = (i // size) * size
            seed = request_seed(3000051, start)
            assert result.seed == seed
            assert result.response_ids == (coord(seed % 1000), coord(i - start), coord(0))  # IM_END stripped
            assert result.prompt_ids == (1, 2, len(f"<image>u{'x' * i}"))
        posts = [len(s.calls) and [c for c in s.calls if c.path == "/infer/"] for s in started]
        sizes = [sum(len(c.body["infer_requests"]) for c in p) if p else 0 for p in posts]
        assert sizes == [min(size, max(0, 5 - k * size)) for k in range(n_servers)]
        client.close()
    finally:
        for s in started:
            s.stop()


def test_spec_seed_example(servers: list[Any]) -> None:
    """run.seed 42, step 3, S = 2, N = 5 -> seeds 3000051 and 3000054 (spec test 56)."""
    client = client_for([s.base_url for s in servers])
    client.generate(make_requests(5, base=seed_base(42, 3)))
    seeds = [[c.body["request_config"]["seed"] for c in s.calls if c.path == "/infer/"] for s in servers]
    assert seeds == [[3000051], [3000054]]


@pytest.mark.parametrize("servers", [3], indirect=True)
def test_no_requests_no_io_and_empty_chunks_send_nothing(servers: list[Any]) -> None:
    client = client_for([s.base_url for s in servers])
    assert client.generate([]) == []
    assert all(s.calls == [] for s in servers)
    client.generate(make_requests(4))  # (4, 3) -> [(0, 2), (2, 4), none]
    assert [len([c for c in s.calls if c.path == "/infer/"]) for s in servers] == [1, 1, 0]


def test_n_samples_and_mixed_decoding(servers: list[Any]) -> None:
    client = client_for([servers[0].base_url])
    sampled = RolloutDecoding(max_new_tokens=8, temperature=0.9, n=3)
    batch = make_requests(2) + make_requests(3, decoding=sampled)[2:]
    results = client.generate(batch)
    assert [len(r.samples) for r in results] == [1, 1, 3]
    posts = [c.body for c in servers[0].calls if c.path == "/infer/"]
    assert [(len(p["infer_requests"]), p["request_config"]["n"], p["request_config"]["seed"]) for p in posts] == [
        (2, 1, 3000051), (1, 3, 3000053)
    ]  # fmt: skip
    assert results[2].samples[2].response_ids[-1] == coord(2)


# ---- request body (spec test 55) --------------------------------------------------------------------------------


def test_body_shape(servers: list[Any]) -> None:
    client = client_for([servers[0].base_url])
    client.generate(
        make_requests(2, decoding=RolloutDecoding(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=20))
    )
    [body] = [c.body for c in servers[0].calls if c.path == "/infer/"]
    assert list(body) == [
        "infer_requests",
        "request_config",
        "metrics",
        "template",
        "use_tqdm",
        "adapter_request",
    ]
    assert [sorted(r) for r in body["infer_requests"]] == [["images", "messages"]] * 2
    assert body["infer_requests"][1]["messages"] == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "<image>ux"}
    ]  # fmt: skip
    config = body["request_config"]
    assert (config["n"], config["stop"], config["return_details"], config["max_tokens"]) == (
        1,
        ["<|im_end|>"],
        True,
        7,
    )
    assert (config["temperature"], config["top_p"], config["top_k"], config["stream"]) == (
        0.5,
        0.9,
        20,
        False,
    )
    assert "logits_processors" not in json_text(body)


def json_text(value: Any) -> str:
    import json

    return json.dumps(value)


def test_no_images_omits_images_and_non_string_image_raises_before_sending(servers: list[Any]) -> None:
    client = client_for([servers[0].base_url])
    bare = RolloutRequest(0, "s", "u", (), DECODING, 1)
    client.generate([bare])
    [body] = [c.body for c in servers[0].calls if c.path == "/infer/"]
    assert list(body["infer_requests"][0]) == ["messages"]
    before = len(servers[0].calls)
    bad = RolloutRequest(3, "s", "u", (Path("/x.jpg"),), DECODING, 1, source="t.jsonl", line=4)  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match=r"request 3 \(t.jsonl:4\): images\[0\] is a PosixPath"):
        client.generate([bad])
    assert len(servers[0].calls) == before


# ---- replies (spec tests 57, 58) ----------------------------------------------------------------------------------


def scripted(reply: Any) -> Any:
    return loopback.LoopbackSwiftRollout(lambda reqs, cfg: reply(reqs, cfg)).start()


def test_bare_completion_form_parses() -> None:
    server = scripted(
        lambda reqs, cfg: [loopback.completion_json([5], [([coord(1), IM_END], "stop")], wrapped=False)]
    )
    try:
        [result] = client_for([server.base_url]).generate(make_requests(1))
        assert result.response_ids == (coord(1),) and result.samples[0].finish_reason == "stop"
        assert result.samples[0].pieces == ("<|coord_1|>",)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (lambda r, c: [{"object": "error", "message": "engine died"}], "answered an error: engine died"),
        (lambda r, c: [loopback.completion_json([], [([1], "stop")])], "prompt_token_ids"),
        (lambda r, c: [_without_token_ids()], r"choices\[0\].token_ids"),
        (lambda r, c: [loopback.completion_json([5], [([1], "stop")])] * 2, "2 element"),
        (lambda r, c: {"not": "a list"}, "dict element"),
    ],
)
def test_bad_replies_raise_located(reply: Any, message: str) -> None:
    server = scripted(reply)
    try:
        with pytest.raises(GenerationError, match=message) as caught:
            client_for([server.base_url]).generate(make_requests(1))
        assert server.base_url in str(caught.value) and "chunk [0, 1)" in str(caught.value)
    finally:
        server.stop()


def _without_token_ids() -> Any:
    item = loopback.completion_json([5], [([1], "stop")])
    del item["response"]["choices"][0]["token_ids"]
    return item


def test_non_200_raises_with_status_and_body_without_retry() -> None:
    server = loopback.LoopbackSwiftRollout(
        echo_responder, fault=lambda path, body, attempt: 503 if path == "/infer/" else None
    ).start()
    try:
        with pytest.raises(GenerationError, match="HTTP 503.*scripted failure"):
            client_for([server.base_url]).generate(make_requests(2))
        assert server.attempts["/infer/"] == 1
    finally:
        server.stop()


def test_trigger_flag_from_rollout_infos_only() -> None:
    def reply(reqs: Any, cfg: Any) -> Any:
        return [loopback.completion_json([5], [([1, 2], "length")], rollout_infos={"repeat_terminate_triggered": 1}),
                loopback.completion_json([5], [([1, 2], "length")], rollout_infos={})]  # fmt: skip

    server = scripted(reply)
    try:
        results = client_for([server.base_url]).generate(make_requests(2))
        assert [r.samples[0].repeat_terminate_triggered for r in results] == [True, False]
        assert results[1].samples[0].finish_reason == "length"
        with pytest.raises(GenerationError, match=r"item 1 .*repeat_terminate_triggered is missing"):
            client_for([server.base_url], repeat_terminate=True).generate(make_requests(2))
    finally:
        server.stop()


# ---- timeouts, retries, halving (spec tests 59, 60) ------------------------------------------------------------


def test_infer_timeout_mapping() -> None:
    assert infer_timeout(None) is None and infer_timeout(0) is None and infer_timeout(-3) is None
    assert infer_timeout(30) == (10.0, 30.0) and infer_timeout(4) == (4.0, 4.0)


def test_one_failure_then_success_replaces_session_once() -> None:
    server = loopback.LoopbackSwiftRollout(
        echo_responder,
        fault=lambda path, body, attempt: "drop" if path == "/infer/" and attempt == 0 else None,
    ).start()
    try:
        client = client_for([server.base_url])
        results = client.generate(make_requests(3))
        assert [r.index for r in results] == [0, 1, 2] and client.session_replacements == 1
        assert [len(c.body["infer_requests"]) for c in server.calls if c.path == "/infer/"] == [3, 3]
    finally:
        server.stop()


def test_persistent_failure_halves_then_raises_on_the_single_request() -> None:
    def fault(path: str, body: Any, attempt: int) -> Any:
        users = [r["messages"][-1]["content"] for r in body["infer_requests"]] if path == "/infer/" else []
        return "drop" if "<image>uxx" in users else None  # request 2 always fails

    server = loopback.LoopbackSwiftRollout(echo_responder, fault=fault).start()
    try:
        client = client_for([server.base_url])
        with pytest.raises(GenerationError, match=r"request 2 \(t.jsonl:3\) failed twice") as caught:
            client.generate(make_requests(4))
        assert caught.value.index == 2
        posted = [
            (len(c.body["infer_requests"]), c.body["request_config"]["seed"])
            for c in server.calls
            if c.path == "/infer/"
        ]
        base = 3000051
        # [0,4) twice -> halves [0,2) twice, [0,1) ok, [1,2) ok ... the failing one is [2,4) -> [2,3) twice
        assert posted[:2] == [(4, base), (4, base)]
        assert (2, base) in posted and (1, base + 2) in posted and posted.count((1, base + 2)) == 2
    finally:
        server.stop()


def test_timeout_counts_as_transport_failure() -> None:
    server = loopback.LoopbackSwiftRollout(
        echo_responder, fault=lambda path, body, attempt: 1.5 if path == "/infer/" and attempt == 0 else None
    ).start()
    try:
        client = client_for([server.base_url], infer_timeout_s=0.5)
        assert len(client.generate(make_requests(1))) == 1 and client.session_replacements == 1
    finally:
        server.stop()


def test_unreachable_servers_listed() -> None:
    server = loopback.LoopbackSwiftRollout(echo_responder).start()
    dead = server.base_url
    server.stop()
    live = loopback.LoopbackSwiftRollout(echo_responder).start()
    try:
        with pytest.raises(SetupError, match="not healthy") as caught:
            client_for([live.base_url, dead], timeout_s=0.3).generate(make_requests(1))
        assert dead in str(caught.value) and live.base_url not in str(caught.value)
    finally:
        live.stop()


# ---- auth and secrets (§16.3.2) --------------------------------------------------------------------------------------


def test_bearer_header_present_iff_configured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    guarded = loopback.LoopbackSwiftRollout(echo_responder, api_key=SECRET).start()
    try:
        with pytest.raises(SetupError, match="HTTP 401"):
            client_for([guarded.base_url]).generate(make_requests(1))
        assert all(c.authorization is None for c in guarded.calls)
        client = client_for([guarded.base_url], api_key_env="ROLLOUT_KEY", environ={"ROLLOUT_KEY": SECRET})
        assert len(client.generate(make_requests(2))) == 2
        authed = [c for c in guarded.calls if c.authorization is not None]
        assert authed and all(c.authorization == f"Bearer {SECRET}" for c in authed)
        assert {c.path for c in authed} >= {"/get_engine_type/", "/get_world_size/", "/infer/"}
        texts = [repr(client), str(client.describe()), repr(client.settings), caplog.text, repr(client._auth)]
        assert not any(SECRET in t for t in texts)
        wrong = client_for([guarded.base_url], api_key_env="ROLLOUT_KEY", environ={"ROLLOUT_KEY": "nope"})
        with pytest.raises(SetupError) as caught:
            wrong.generate(make_requests(1))
        assert (
            "401" in str(caught.value) and "nope" not in str(caught.value) and SECRET not in str(caught.value)
        )
    finally:
        guarded.stop()


def test_missing_key_variable_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="'ROLLOUT_KEY', which is not set"):
        client_for(["http://127.0.0.1:9"], api_key_env="ROLLOUT_KEY", environ={})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://user:hunter2@127.0.0.1:8000", "user info"),
        ("http://user@127.0.0.1:8000", "user info"),
        ("http://127.0.0.1", "host:port"),
        ("ftp://127.0.0.1:8000", "host:port"),
        ("http://127.0.0.1:8000/v1", "no path"),
    ],
)
def test_bad_base_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        SwiftRolloutSettings((ServerEndpoint(url, 51216),))
    assert "rollout.vllm.server.servers[0].base_url" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_settings_checks() -> None:
    with pytest.raises(ConfigError, match="at least one server"):
        SwiftRolloutSettings(())
    with pytest.raises(ConfigError, match=r"servers\[1\].base_url: .* already"):
        SwiftRolloutSettings((ServerEndpoint("http://h:1/", 1), ServerEndpoint("http://h:1", 2)))
    with pytest.raises(ConfigError, match="timeout_s"):
        SwiftRolloutSettings((ServerEndpoint("http://h:1", 1),), timeout_s=0)


# ---- weight sync over HTTP (the NCCL part is adapters.swift_rollout.nccl, skipped here) -------------------------


class _Source:
    def __init__(self, tensors: dict[str, Any], config: dict[str, Any] | None = None) -> None:
        self.tensors, self.config = (
            tensors,
            config or {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
        )

    def full_state(self) -> Any:
        return iter(self.tensors.items())

    def adapter_state(self) -> Any:
        return iter(self.tensors.items())

    def adapter_config(self) -> Any:
        return self.config


def _tensors() -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return {
        "model.a.weight": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
        "model.b.bias": torch.randn(5, generator=gen),
        "lm_head.weight": torch.randn(300, 1000, generator=gen).to(torch.float16),  # 600,000 bytes
    }


def test_full_sync_sequence_layout_and_version() -> None:
    tensors = _tensors()
    server = loopback.LoopbackSwiftRollout(echo_responder, expected_tensors=tensors, world_size=2).start()
    try:
        broadcasters: list[Any] = []

        def factory(index: int, host: str, port: int, world: int) -> Any:
            assert (index, host, port, world) == (0, "127.0.0.1", 51216, 2)
            broadcasters.append(loopback.LoopbackBroadcaster(server))
            return broadcasters[-1]

        client = client_for([server.base_url], broadcaster_factory=factory, bucket_size_mib=1)
        assert client.supports_sync("full") and not client.supports_sync("adapter")
        report = client.sync_weights(WeightSyncRequest(version=3, kind="full", source=_Source(tensors)))
        assert (report.version, report.buckets, report.tensors) == (3, 1, 3)
        assert report.bytes == 12 + 20 + 600_000
        assert server.layout_errors == [] and set(server.received) == set(tensors)
        routes = [p for p in server.paths("POST") if p not in {"/get_engine_type/"}]
        assert routes == ["/init_communicator/", "/update_flattened_params/", "/process_weights_after_loading/",
                          "/reset_prefix_cache/", "/reset_encoder_cache/", "/reset_mm_cache/"]  # fmt: skip
        init = next(c.body for c in server.calls if c.path == "/init_communicator/")
        assert init == {"host": "0.0.0.0", "port": 51216, "world_size": 3}
        metas = {m["name"]: m for m in server.metadatas[0]}
        meta = metas["model.a.weight"]  # 2x3 bf16: 12 bytes
        assert (meta["dtype"], meta["end_idx"] - meta["start_idx"], meta["numel"]) == (
            "torch.bfloat16",
            12,
            12,
        )
        assert metas["model.b.bias"]["start_idx"] == 0  # widest elements first (aligned offsets)
        assert client.sync_weights(WeightSyncRequest(version=3, kind="full", source=_Source(tensors))).skipped
        assert client.generate(make_requests(1))[0].policy_version == 3
        client.close()
        assert broadcasters[0].closed and server.paths("POST")[-1] == "/close_communicator/"
    finally:
        server.stop()


def test_full_sync_buckets_split_at_the_size_limit() -> None:
    import torch

    tensors = {f"w{i}": torch.full((256, 1024), float(i)) for i in range(3)}  # 1 MiB each in float32
    server = loopback.LoopbackSwiftRollout(echo_responder, expected_tensors=tensors).start()
    try:
        client = client_for([server.base_url], broadcaster_factory=lambda *a: loopback.LoopbackBroadcaster(server),
                            bucket_size_mib=2)  # fmt: skip
        report = client.sync_weights(WeightSyncRequest(version=1, kind="full", source=_Source(tensors)))
        assert report.buckets == 2 and [len(m) for m in server.metadatas] == [2, 1]
        assert server.metadatas[1][0]["start_idx"] == 0 and server.layout_errors == []
        assert all(torch.equal(server.received[k], v) for k, v in tensors.items())
    finally:
        server.stop()


def test_adapter_sync_needs_server_lora() -> None:
    tensors = {"base_model.model.q_proj.lora_A.weight": _tensors()["model.a.weight"]}
    plain = loopback.LoopbackSwiftRollout(echo_responder).start()
    lora = loopback.LoopbackSwiftRollout(echo_responder, enable_lora=True, expected_tensors=tensors).start()
    try:
        client = client_for(
            [plain.base_url], broadcaster_factory=lambda *a: loopback.LoopbackBroadcaster(plain)
        )
        with pytest.raises(SetupError, match="--vllm_enable_lora true"):
            client.sync_weights(WeightSyncRequest(version=1, kind="adapter", source=_Source(tensors)))
        assert client.policy_version == 0
        good = client_for([lora.base_url], broadcaster_factory=lambda *a: loopback.LoopbackBroadcaster(lora))
        assert good.supports_sync("adapter")
        good.sync_weights(WeightSyncRequest(version=2, kind="adapter", source=_Source(tensors)))
        body = next(c.body for c in lora.calls if c.path == "/update_adapter_flattened_param/")
        assert body["peft_config"]["r"] == 8 and body["metadatas"][0]["numel"] == 12
        assert lora.layout_errors == [] and "/process_weights_after_loading/" not in lora.paths()
        assert lora.paths()[-3:] == ["/reset_prefix_cache/", "/reset_encoder_cache/", "/reset_mm_cache/"]
    finally:
        plain.stop()
        lora.stop()


def test_sync_without_broadcaster_refuses_clearly(servers: list[Any]) -> None:
    client = client_for([servers[0].base_url])
    assert not client.supports_sync("full")
    with pytest.raises(SetupError, match="NCCL broadcast"):
        client.sync_weights(WeightSyncRequest(version=1, kind="full", source=_Source(_tensors())))


# ---- end to end on CPU: the tiny model serves the loopback server --------------------------------------------------


@pytest.mark.slow
def test_tiny_model_rollout_through_server_equals_hf_adapter(tiny_loaded: Any) -> None:
    from adapters.hf.encoding import HFSampleEncoder
    from adapters.hf.generation import end_of_turn_ids
    from adapters.hf.rollout import HFRolloutBackend
    from domain.prompts import build_prompt

    prompt = build_prompt("default", "tokens", "sorted", "desc_first")
    stop_ids = end_of_turn_ids(tiny_loaded)
    encoder = HFSampleEncoder(tiny_loaded.processor, tiny_loaded.tokenizer)
    hf = HFRolloutBackend(tiny_loaded.model, encoder, stop_ids=stop_ids)
    image = str(SHAPES3 / "img_1.jpg")  # 256 x 256: a contract image as stored (D5)
    decoding = RolloutDecoding(max_new_tokens=12)
    requests_ = [
        RolloutRequest(0, prompt.system, prompt.user, (image,), decoding, seed_base(17, 0), 256, 256)
    ]
    with loopback.LoopbackSwiftRollout(loopback.hf_responder(hf, tiny_loaded.tokenizer.im_end_id)) as server:
        client = SwiftRolloutClient(
            SwiftRolloutSettings((ServerEndpoint(server.base_url, 51216),), infer_timeout_s=120),
            tiny_loaded.tokenizer, stop_ids=stop_ids, health_poll_s=0.05,
        )  # fmt: skip
        [via_server] = client.generate(requests_)
        client.close()
    [direct] = hf.generate(requests_)
    assert via_server.response_ids == direct.response_ids and len(direct.response_ids) > 0
    assert via_server.prompt_ids == direct.prompt_ids
    assert via_server.samples[0].pieces == direct.samples[0].pieces
    assert via_server.samples[0].finish_reason == direct.samples[0].finish_reason


@pytest.mark.slow
def test_server_rollout_through_channel_b_targets_and_a_teacher_forced_forward(tiny_loaded: Any) -> None:
    """shapes3 img_1 rolled out through the loopback server, scanned and matched into Channel-B targets and a
    mask plan (``domain.stage2_targets``), teacher-forced through the tiny model: finite, non-zero losses."""
    import json

    import numpy as np
    import torch

    from adapters.hf.encoding import HFSampleEncoder
    from adapters.hf.generation import _left_padded, end_of_turn_ids
    from adapters.hf.rollout import HFRolloutBackend
    from domain.codec import bbox_pixels_to_bins
    from domain.objects import DetObject, GeometryKind
    from domain.prompts import PromptTexts, build_prompt
    from domain.stage2_targets import SampleRef, Stage2Variant, TargetSettings, build_channel_b_targets
    from ports.tokenizer import ChatSample, SampleOrigin

    coco = json.loads((SHAPES3 / "gt_dataset.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    image_id = next(i["id"] for i in coco["images"] if i["file_name"] == "img_1.jpg")
    gts = [
        DetObject(
            names[a["category_id"]],
            GeometryKind.BBOX,
            bbox_pixels_to_bins(
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
                256,
                256,
            )[0],
        )
        for a in coco["annotations"]
        if a["image_id"] == image_id
    ]
    prompt = build_prompt("default", "tokens", "sorted", "desc_first")
    tok = tiny_loaded.tokenizer
    stop_ids = end_of_turn_ids(tiny_loaded)
    encoder = HFSampleEncoder(tiny_loaded.processor, tok)
    hf = HFRolloutBackend(tiny_loaded.model, encoder, stop_ids=stop_ids)
    image = str(SHAPES3 / "img_1.jpg")
    request = RolloutRequest(
        0, prompt.system, prompt.user, (image,), RolloutDecoding(max_new_tokens=16), 1, 256, 256
    )
    with loopback.LoopbackSwiftRollout(loopback.hf_responder(hf, tok.im_end_id)) as server:
        client = SwiftRolloutClient(
            SwiftRolloutSettings((ServerEndpoint(server.base_url, 51216),)),
            tok,
            stop_ids=stop_ids,
            health_poll_s=0.05,
        )
        [rollout] = client.generate([request])
        client.close()
    sample = SampleRef("shapes3/gt_dataset.json", 1, 0)
    origin = SampleOrigin("shapes3/gt_dataset.json", 1, 0)
    encoded_prompt = encoder.encode_prompt(
        ChatSample(PromptTexts(prompt.system, prompt.user), image, 256, 256, None, origin)
    )
    assert rollout.prompt_ids == tuple(
        int(i) for i in encoded_prompt.input_ids
    )  # backend and encoder agree (§2.1)
    targets = build_channel_b_targets(
        rollout.response_ids, encoded_prompt.length, gts, TargetSettings(Stage2Variant.STAGE2_AB), tok, sample,
        pieces=rollout.samples[0].pieces,
    )  # fmt: skip
    assert len(targets.fn_gt_indices) + len(targets.matched_for_supervision) == len(gts)
    encoded = encoder.teacher_forced(encoded_prompt, targets.y_train)
    labels = targets.mask.labels_row(targets.y_train, targets.terminator_id, encoded.length)
    weights = np.zeros(encoded.length)
    weights[targets.prompt_len : targets.prompt_len + targets.mask.train_len] = targets.mask.ce_weights
    inputs = _left_padded([encoded], tok.pad_id, "cpu")  # one row: no padding
    with torch.no_grad():
        logits = tiny_loaded.model(**inputs).logits[0].float()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)  # position p is predicted by logits at p - 1
    target = torch.from_numpy(labels[1:])
    on = target != -100
    assert int(on.sum()) > 0
    picked = log_probs[on].gather(-1, target[on].unsqueeze(-1)).squeeze(-1)
    ce = -(picked * torch.from_numpy(weights[1:])[on].float()).sum() / torch.from_numpy(weights[1:])[on].sum()
    coord_ids = torch.tensor(tok.coord_ids.ids)
    geometry = [
        -torch.log_softmax(logits[p - 1, coord_ids], dim=-1)[b]
        for g in targets.groups
        for p, b in zip(g.positions, g.target_bins)
    ]
    coord_ce = torch.stack(geometry).mean()
    assert len(geometry) == 4 * len(gts)
    assert torch.isfinite(ce) and ce > 0 and torch.isfinite(coord_ce) and coord_ce > 0
