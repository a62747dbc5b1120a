"""vLLM backends (infer-eval-config.md §2.6; spec tests 29-30) against a loopback server that speaks the protocol.

vLLM itself is not installed here: the server client only needs HTTP, the local engine is checked with a
stand-in ``vllm`` module (call shapes) and, when the real package exists, against its signatures.
"""

from __future__ import annotations

import base64
import importlib.util
import inspect
import itertools
import json
import math
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from adapters.vllm.local import VllmLocalBackend, engine_kwargs
from adapters.vllm.messages import cut_answer, image_data_url, openai_messages
from adapters.vllm.server_client import (
    LaunchPlan,
    ServerSettings,
    VllmServerBackend,
    connect,
    is_local_url,
    normalize_base_url,
    parse_answer,
    preflight,
    request_body,
    vllm_server_argv,
)
from domain.errors import InvariantViolation, SetupError
from ports.generation import DecodingSettings, GenerationRequest

LOOPBACK_FILE = Path(__file__).resolve().parents[1] / "support" / "loopback_vllm.py"
_spec = importlib.util.spec_from_file_location("loopback_vllm", LOOPBACK_FILE)
assert _spec is not None and _spec.loader is not None
loopback = importlib.util.module_from_spec(_spec)
sys.modules["loopback_vllm"] = loopback
_spec.loader.exec_module(loopback)
Reply = loopback.Reply

IM_END, COORD_12, COORD_40 = 2, 1100, 1128
END_OF_TURN = {IM_END: "<|im_end|>"}
DECODING = DecodingSettings(max_new_tokens=64, temperature=0.0, top_p=0.95, repetition_penalty=1.05)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.jpg"
    Image.new("RGB", (64, 32), "red").save(path, quality=90)
    return path


def req(image: Path, index: int = 0, seed: int = 17) -> GenerationRequest:
    return GenerationRequest(
        index, "system text", "user text", str(image), seed + index, 64, 32, "val.jsonl", index + 1
    )


def settings(base_url: str, concurrency: int = 2, model: str = "loopback-model") -> ServerSettings:
    return ServerSettings(
        base_url, model, request_timeout_s=10.0, preflight_timeout_s=2.0, concurrency=concurrency
    )


@pytest.fixture()
def echo_server() -> Iterator[Any]:
    """Answers each request with a coord-token box; the seed goes into the text so order is checkable."""

    def script(body: dict[str, Any]) -> Any:
        seed = body["seed"]
        content = f'{{"objects": [{{"desc": "s{seed}", "bbox_2d": [<|coord_12|>, <|coord_40|>]}}]}}'
        ids = (500 + seed, COORD_12, COORD_40, IM_END)
        delay = 0.15 if seed % 2 == 0 else 0.0  # later requests finish first
        return Reply(content=content, token_ids=ids, logprobs=(-0.5, -0.1, -0.2, -0.01), prompt_tokens=11,
                     delay_s=delay)  # fmt: skip

    with loopback.LoopbackVllm(script, lifetime_s=30) as server:
        yield server


# --- request body and messages ------------------------------------------------------------------------


def test_29_request_body_has_exactly_the_spec_keys(image: Path) -> None:
    body = request_body(req(image, index=3, seed=17), DECODING, "served")
    assert set(body) == {
        "model", "messages", "temperature", "top_p", "max_tokens", "repetition_penalty", "seed", "stream",
        "skip_special_tokens", "spaces_between_special_tokens", "logprobs", "return_tokens_as_token_ids",
    }  # fmt: skip
    assert body["seed"] == 20
    assert body["max_tokens"] == 64
    assert (body["skip_special_tokens"], body["spaces_between_special_tokens"]) == (False, False)
    assert (body["logprobs"], body["return_tokens_as_token_ids"], body["stream"]) == (True, True, False)


def test_messages_image_first_as_data_url_of_the_unchanged_bytes(image: Path) -> None:
    system, user = openai_messages(req(image))
    assert system == {"role": "system", "content": "system text"}
    assert [part["type"] for part in user["content"]] == ["image_url", "text"]
    url = user["content"][0]["image_url"]["url"]
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    assert base64.b64decode(url[len(prefix) :]) == image.read_bytes()


def test_png_mime_type(tmp_path: Path) -> None:
    path = tmp_path / "b.data"
    Image.new("RGB", (32, 32)).save(path, format="PNG")
    assert image_data_url(path).startswith("data:image/png;base64,")


# --- answers --------------------------------------------------------------------------------------------


def test_cut_answer_appends_the_end_of_turn_text_vllm_leaves_out() -> None:
    ids, lps, text, stopped = cut_answer([7, 2, 9], [-1.0, -2.0, -3.0], '{"objects": []}', END_OF_TURN)
    assert (ids, lps, text, stopped) == ((7, 2), (-1.0, -2.0), '{"objects": []}<|im_end|>', True)
    assert cut_answer([7, 8], [-1.0, -2.0], "ab<|im_end|>cd", END_OF_TURN)[2] == "ab<|im_end|>"
    assert cut_answer([7, 8], [-1.0, -2.0], "ab", END_OF_TURN)[3] is False


@pytest.mark.parametrize(
    ("status", "payload", "reason"),
    [
        (500, {"error": "boom"}, "HTTP 500"),
        (200, {"choices": []}, "no choices"),
        (200, {"choices": [{"message": {"content": "x"}}]}, "no log-probs"),
        (200, {"choices": [{"message": {"content": "x"}, "logprobs": {"content": [{"token": "x", "logprob": -1}]}}]},
         "return_tokens_as_token_ids"),
        (200, [1, 2], "not a JSON object"),
    ],
)  # fmt: skip
def test_failed_answers_become_sample_errors(status: int, payload: Any, reason: str) -> None:
    parsed = parse_answer(4, status, payload, END_OF_TURN, json.dumps(payload))
    assert parsed.generation.index == 4
    assert parsed.generation.error is not None and reason in parsed.generation.error


# --- against the loopback server ---------------------------------------------------------------------------


def test_29_generate_through_the_server_keeps_order_tokens_and_coord_text(
    image: Path, echo_server: Any
) -> None:
    backend = VllmServerBackend(settings(echo_server.base_url, concurrency=2), end_of_turn=END_OF_TURN)
    try:
        out = backend.generate([req(image, i) for i in range(4)], DECODING)
    finally:
        backend.close()
    assert [g.index for g in out] == [0, 1, 2, 3]
    for i, g in enumerate(out):
        assert g.error is None
        assert g.token_ids == (500 + 17 + i, COORD_12, COORD_40, IM_END)
        assert g.token_logprobs == (-0.5, -0.1, -0.2, -0.01)
        assert f'"desc": "s{17 + i}"' in g.text
        assert "<|coord_12|>, <|coord_40|>" in g.text  # coord tokens survive
        assert g.text.endswith("<|im_end|>") and g.ended_with_stop
    assert sorted(b["seed"] for b in echo_server.bodies) == [17, 18, 19, 20]
    assert all(
        b["skip_special_tokens"] is False and b["model"] == "loopback-model" for b in echo_server.bodies
    )


def test_concurrency_really_overlaps_requests(image: Path) -> None:
    with loopback.LoopbackVllm(lambda b: Reply(content="", delay_s=0.4)) as server:
        backend = VllmServerBackend(settings(server.base_url, concurrency=4), end_of_turn=END_OF_TURN)
        start = time.monotonic()
        backend.generate([req(image, i) for i in range(4)], DECODING)
        elapsed = time.monotonic() - start
        backend.close()
    assert elapsed < 1.2  # four 0.4 s requests in parallel, not 1.6 s in sequence


def test_server_errors_are_per_sample(image: Path) -> None:
    def script(body: dict[str, Any]) -> Any:
        if body["seed"] == 18:
            return Reply(status=500, raw={"error": "overloaded"})
        if body["seed"] == 19:
            return Reply(content="x", token_ids=(5,), logprobs=(-1.0,), omit_logprobs=True)
        return Reply(content="ok", token_ids=(5,), logprobs=(-1.0,))

    with loopback.LoopbackVllm(script) as server:
        backend = VllmServerBackend(settings(server.base_url), end_of_turn=END_OF_TURN)
        out = backend.generate([req(image, i) for i in range(3)], DECODING)
        backend.close()
    assert out[0].error is None and out[0].text == "ok"
    assert out[1].error is not None and "HTTP 500" in out[1].error
    assert out[2].error is not None and "log-probs" in out[2].error


def test_transport_failure_is_a_sample_error(image: Path) -> None:
    port = loopback.free_port()
    backend = VllmServerBackend(settings(f"http://127.0.0.1:{port}"), end_of_turn=END_OF_TURN)
    (out,) = backend.generate([req(image)], DECODING)
    backend.close()
    assert out.error is not None and "ConnectionError" in out.error


def test_prompt_length_mismatch_fails_the_run(image: Path, echo_server: Any) -> None:
    ok = VllmServerBackend(
        settings(echo_server.base_url), end_of_turn=END_OF_TURN, expected_prompt_tokens=lambda r: 11
    )
    ok.generate([req(image)], DECODING)
    ok.close()
    bad = VllmServerBackend(
        settings(echo_server.base_url), end_of_turn=END_OF_TURN, expected_prompt_tokens=lambda r: 12
    )
    with pytest.raises(SetupError, match="reports 11 prompt tokens .* give 12"):
        bad.generate([req(image)], DECODING)
    bad.close()


def test_describe_records_an_external_server_as_unverified(echo_server: Any) -> None:
    backend = connect(settings(echo_server.base_url + "/v1/"), end_of_turn=END_OF_TURN)
    facts = backend.describe()
    backend.close()
    assert facts["vllm"] == {  # type: ignore[comparison-overlap]
        "mode": "server", "base_url": echo_server.base_url, "served_model_name": "loopback-model",
        "request_timeout_s": 10.0, "client_concurrency": 2, "auto_launched": False, "logprobs_mode": "unverified",
    }  # fmt: skip
    assert facts["launch_argv"] is None


# --- preflight and auto-launch (spec test 30) ----------------------------------------------------------------


def test_30_preflight_to_a_closed_port_fails_fast_naming_the_hf_backend() -> None:
    port = loopback.free_port()
    start = time.monotonic()
    with pytest.raises(SetupError, match=r"not reachable .*infer\.backend: hf"):
        connect(settings(f"http://127.0.0.1:{port}"), end_of_turn=END_OF_TURN)
    assert time.monotonic() - start < 2.5  # bounded by preflight_timeout_s, no retries


def test_preflight_http_error_and_wrong_model() -> None:
    with (
        loopback.LoopbackVllm(lambda b: Reply(), models_status=503) as server,
        pytest.raises(SetupError, match="HTTP 503"),
    ):
        preflight(server.base_url, 2.0)
    with (
        loopback.LoopbackVllm(lambda b: Reply(), model="other") as server,
        pytest.raises(SetupError, match="served_model_name"),
    ):
        connect(settings(server.base_url, model="mine"), end_of_turn=END_OF_TURN)


def test_30_auto_launch_that_exits_early_reports_its_log_tail(tmp_path: Path) -> None:
    port = loopback.free_port()
    script = (
        "import sys\nfor i in range(60): print(f'line {i}')\nprint('CUDA out of memory (fake)')\nsys.exit(3)"
    )
    plan = LaunchPlan((sys.executable, "-c", script), tmp_path / "vllm_server.log", startup_timeout_s=20.0)
    with pytest.raises(SetupError) as info:
        connect(settings(f"http://127.0.0.1:{port}"), end_of_turn=END_OF_TURN, launch=plan)
    message = str(info.value)
    assert "exited with code 3" in message
    assert "CUDA out of memory (fake)" in message and "line 59" in message
    assert "line 10\n" not in message  # only the last 50 lines


def test_auto_launch_starts_probes_and_stops_the_server(tmp_path: Path, image: Path) -> None:
    port = loopback.free_port()
    argv = (
        sys.executable,
        str(LOOPBACK_FILE),
        "--port",
        str(port),
        "--lifetime",
        "60",
        "--startup-delay",
        "1.2",
    )
    plan = LaunchPlan(argv, tmp_path / "vllm_server.log", startup_timeout_s=30.0)
    backend = connect(settings(f"http://127.0.0.1:{port}"), end_of_turn=END_OF_TURN, launch=plan)
    launched = backend._launched
    assert launched is not None and launched.pid is not None
    process = launched._process
    try:
        facts = backend.describe()
        assert facts["vllm"]["auto_launched"] is True  # type: ignore[index]
        assert facts["vllm"]["logprobs_mode"] == "raw"  # type: ignore[index]
        assert facts["launch_argv"] == list(argv)
        (out,) = backend.generate([req(image)], DECODING)
        assert out.text == '{"objects": []}' and out.token_ids == (5, 6)
    finally:
        backend.close()
    assert process is not None and process.poll() is not None  # terminated with its process group
    assert "loopback vLLM on" in (tmp_path / "vllm_server.log").read_text()


def test_auto_launch_startup_timeout_kills_the_process(tmp_path: Path) -> None:
    port = loopback.free_port()
    plan = LaunchPlan(
        (sys.executable, "-c", "import time; time.sleep(60)"), tmp_path / "log", startup_timeout_s=1.5
    )
    with pytest.raises(SetupError, match="did not answer GET /v1/models within 1.5 s"):
        connect(settings(f"http://127.0.0.1:{port}"), end_of_turn=END_OF_TURN, launch=plan)


def test_launch_argv_asks_for_raw_logprobs_and_the_configured_knobs() -> None:
    launch = types.SimpleNamespace(
        tensor_parallel_size=2, data_parallel_size=1, gpu_memory_utilization=0.8, max_model_len=4096,
        max_num_batched_tokens=None, max_num_seqs=8, enable_prefix_caching=False, enforce_eager=True,
    )  # fmt: skip
    argv = vllm_server_argv(
        model_path="ckpt", base_url=None, dtype="bfloat16", served_model_name="ckpt", launch=launch,
        max_pixels=786432, trust_remote_code=True, python="py",
    )  # fmt: skip
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(itertools.pairwise(argv[3:]))
    assert pairs["--model"] == "ckpt" and pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8000"
    assert pairs["--logprobs-mode"] == "raw_logprobs"
    assert pairs["--tensor-parallel-size"] == "2" and pairs["--max-num-seqs"] == "8"
    assert "--max-num-batched-tokens" not in argv
    assert {"--trust-remote-code", "--enforce-eager", "--no-enable-prefix-caching"} <= set(argv)
    assert json.loads(pairs["--mm-processor-kwargs"])["size"]["longest_edge"] == 786432


def test_base_url_forms() -> None:
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"
    assert normalize_base_url(None) == "http://127.0.0.1:8000"
    assert is_local_url(None) and is_local_url("http://localhost:9/v1") and is_local_url("http://0.0.0.0:9")
    assert not is_local_url("http://10.0.0.5:8000")


# --- local engine ------------------------------------------------------------------------------------------


class _FakeLLM:
    instances: ClassVar[list[_FakeLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[Any, Any]] = []
        self.drop_one = False
        _FakeLLM.instances.append(self)

    def chat(self, conversations: Any, params: Any, use_tqdm: bool = True) -> list[Any]:
        self.calls.append((conversations, params))
        outs = []
        for p in params:
            ids = [p.kwargs["seed"], COORD_12, IM_END, 0]
            entries = [{t: types.SimpleNamespace(logprob=-0.25 * (k + 1))} for k, t in enumerate(ids)]
            completion = types.SimpleNamespace(
                token_ids=ids, logprobs=entries, text="x<|coord_12|>", finish_reason="stop"
            )
            outs.append(types.SimpleNamespace(outputs=[completion], prompt_token_ids=[1, 2, 3]))
        return outs[:-1] if self.drop_one else outs


class _FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@pytest.fixture()
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = _FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    _FakeLLM.instances.clear()
    return module


LAUNCH = types.SimpleNamespace(
    tensor_parallel_size=1, data_parallel_size=1, gpu_memory_utilization=0.9, max_model_len=None,
    max_num_batched_tokens=None, max_num_seqs=None, enable_prefix_caching=True, enforce_eager=False,
)  # fmt: skip


def test_local_engine_call_shapes(fake_vllm: Any, image: Path) -> None:
    kwargs = engine_kwargs(model_path="ckpt", dtype="bfloat16", seed=17, launch=LAUNCH, image_root="/data",
                           max_pixels=786432, trust_remote_code=True)  # fmt: skip
    backend = VllmLocalBackend(kwargs, end_of_turn=END_OF_TURN)
    (llm,) = _FakeLLM.instances
    assert llm.kwargs["seed"] == 17 and llm.kwargs["trust_remote_code"] is True
    assert llm.kwargs["limit_mm_per_prompt"] == {"image": 1} and llm.kwargs["logprobs_mode"] == "raw_logprobs"
    out = backend.generate([req(image, 0), req(image, 1)], DECODING)
    conversations, params = llm.calls[0]
    assert [p.kwargs["seed"] for p in params] == [17, 18]
    assert all(
        p.kwargs["logprobs"] == 0 and p.kwargs["skip_special_tokens"] is False
        and p.kwargs["spaces_between_special_tokens"] is False and p.kwargs["max_tokens"] == 64
        for p in params
    )  # fmt: skip
    assert conversations[0][1]["content"][0]["type"] == "image_url"
    assert out[1].token_ids == (18, COORD_12, IM_END)  # cut after <|im_end|>
    assert out[1].token_logprobs == (-0.25, -0.5, -0.75)
    assert out[1].text == "x<|coord_12|><|im_end|>"
    llm.drop_one = True
    with pytest.raises(InvariantViolation, match="1 outputs for 2 requests"):
        backend.generate([req(image, 0), req(image, 1)], DECODING)


def test_local_engine_checks_the_first_prompt_length(fake_vllm: Any, image: Path) -> None:
    kwargs = engine_kwargs(model_path="ckpt", dtype="bfloat16", seed=17, launch=LAUNCH, image_root="/data",
                           max_pixels=786432, trust_remote_code=True)  # fmt: skip
    VllmLocalBackend(kwargs, end_of_turn=END_OF_TURN, expected_prompt_tokens=lambda r: 3).generate(
        [req(image)], DECODING
    )
    drifting = VllmLocalBackend(kwargs, end_of_turn=END_OF_TURN, expected_prompt_tokens=lambda r: 4)
    with pytest.raises(SetupError, match="renders 3 prompt tokens .* give 4"):
        drifting.generate([req(image)], DECODING)


def test_local_engine_without_vllm_names_the_hf_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(SetupError, match="infer.backend: hf"):
        VllmLocalBackend({"model": "x"}, end_of_turn=END_OF_TURN)


def test_real_vllm_accepts_our_arguments() -> None:
    vllm = pytest.importorskip("vllm")
    params = vllm.SamplingParams(
        temperature=0.0, top_p=0.95, max_tokens=8, repetition_penalty=1.05, seed=17, logprobs=0,
        skip_special_tokens=False, spaces_between_special_tokens=False,
    )  # fmt: skip
    assert params.skip_special_tokens is False
    accepted = set(inspect.signature(vllm.EngineArgs).parameters)
    kwargs = engine_kwargs(
        model_path="m", dtype="bfloat16", seed=1, launch=LAUNCH, image_root="/", max_pixels=1024,
        trust_remote_code=False,
    )
    assert set(kwargs) - {"model"} <= accepted
    assert math.isfinite(params.top_p)
