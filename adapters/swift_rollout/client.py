"""The ``swift rollout`` server client as a :class:`ports.rollout.RolloutBackend` (stage2.md §16.3, §17; D11).

Pinned to ms-swift 4.6 (``swift/pipelines/infer/rollout.py`` server, ``swift/rlhf_trainers/vllm_client.py`` client).
Payloads are built and replies read with ms-swift's own protocol classes
(``swift.infer_engine.protocol.{RolloutInferRequest, RequestConfig, RolloutOutput, ChatCompletionResponse}``,
``swift.rlhf_trainers.utils.{FlattenedTensorBucket, FlattenedTensorMetadata}``); this module owns the transport:

- endpoints ``/health/``, ``/get_engine_type/``, ``/get_world_size/``, ``/infer/`` and the weight-sync routes;
- chunking over data-parallel servers (``domain.rollout_plan``), one thread per server, results written back by
  global index; one POST per run of equal decoding settings inside a chunk, its seed the run's first request's seed
  (``seed_base + chunk_start`` under the §2.3 plan);
- timeouts (``timeout_s`` for control routes; ``infer_timeout_s`` null / <= 0 -> no timeout, else
  ``(min(10, t), t)``), a connection error or timeout replaces the server's session and retries once, then the
  chunk is halved and each half retried the same way, a single failing request raises naming server and request;
  a non-200 answer raises with status and body (no retry);
- bearer auth from the environment variable ``api_key_env`` names (header present iff configured); the secret is
  kept in a :class:`BearerAuth` whose ``repr`` hides it and is never logged, stored or put in an error;
- weight sync by policy version: full = buckets of ``bucket_size_mib`` MiB (``FlattenedTensorBucket`` byte layout),
  ``/update_flattened_params/`` + broadcast per bucket, ``/process_weights_after_loading/`` once; adapter =
  ``/update_adapter_flattened_param/`` + broadcast (needs the server's ``enable_lora``); then
  ``/reset_prefix_cache/``, ``/reset_encoder_cache/``, ``/reset_mm_cache/``. The broadcast itself is NCCL
  (``adapters.swift_rollout.nccl``, needs vLLM and a GPU); the client takes it as a :class:`WeightBroadcaster`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeGuard
from urllib.parse import urlsplit

import attrs
import requests

from domain.errors import ConfigError, GenerationError, InvariantViolation, SetupError
from domain.rollout_plan import Chunk, chunk_plan
from ports.rollout import (
    RolloutDecoding,
    RolloutRequest,
    RolloutResult,
    RolloutSample,
    SyncKind,
    WeightSyncReport,
    WeightSyncRequest,
)
from ports.tokenizer import TokenizerPort

logger = logging.getLogger(__name__)

SERVERS_KEY = "rollout.vllm.server.servers"
API_KEY_ENV_KEY = "rollout.vllm.server.api_key_env"
IM_END = "<|im_end|>"
CONNECT_TIMEOUT_CAP_S = 10.0
HEALTH_POLL_S = 1.0
RESET_ROUTES = ("/reset_prefix_cache/", "/reset_encoder_cache/", "/reset_mm_cache/")
BODY_EXCERPT = 500


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def normalize_server_url(url: str, where: str) -> str:
    """``http(s)://host:port`` without a trailing ``/``; user info, a path, a query or no port is a config error.

    The error never repeats the URL when it carries user info (it may hold a password).
    """
    text = str(url).strip().rstrip("/")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: not a valid http(s)://host:port URL ({exc})") from exc
    if "@" in parts.netloc:
        raise ConfigError(
            f"{where}: base_url carries user info ('user:password@'), which is refused so no secret sits in a "
            f"config or a log; write http(s)://host:port and put the key in the variable {API_KEY_ENV_KEY} names"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ConfigError(f"{where}: expected http(s)://host:port, got {text!r}")
    if parts.path or parts.query or parts.fragment:
        raise ConfigError(f"{where}: expected http(s)://host:port with no path, got {text!r}")
    return text


@attrs.frozen
class ServerEndpoint:
    """One ``swift rollout`` process (its data parallelism is internal to it)."""

    base_url: str
    group_port: int


def _check_servers(
    instance: object, attribute: attrs.Attribute[Any], value: tuple[ServerEndpoint, ...]
) -> None:
    if not value:
        raise ConfigError(f"{SERVERS_KEY}: at least one server is required in server mode")
    seen: dict[str, int] = {}
    for i, server in enumerate(value):
        where = f"{SERVERS_KEY}[{i}]"
        url = normalize_server_url(server.base_url, f"{where}.base_url")
        if url in seen:
            raise ConfigError(
                f"{where}.base_url: {url} is already {SERVERS_KEY}[{seen[url]}]; base URLs must be unique"
            )
        seen[url] = i
        if not 0 < server.group_port <= 65535:
            raise ConfigError(f"{where}.group_port: must be in 1..65535, got {server.group_port}")


@attrs.frozen
class SwiftRolloutSettings:
    """The client's typed settings (``rollout.vllm.server.*``, ``rollout.vllm.sync.bucket_size_mib``)."""

    servers: tuple[ServerEndpoint, ...] = attrs.field(validator=_check_servers)
    timeout_s: float = 240.0
    infer_timeout_s: float | None = None
    api_key_env: str | None = None
    repeat_terminate: bool = False
    bucket_size_mib: int = 512

    def __attrs_post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"rollout.vllm.server.timeout_s: must be > 0, got {self.timeout_s}")
        if self.bucket_size_mib < 1:
            raise ConfigError(f"rollout.vllm.sync.bucket_size_mib: must be >= 1, got {self.bucket_size_mib}")

    @property
    def base_urls(self) -> tuple[str, ...]:
        return tuple(normalize_server_url(s.base_url, SERVERS_KEY) for s in self.servers)


def infer_timeout(infer_timeout_s: float | None) -> tuple[float, float] | None:
    """§16.3.1: null or <= 0 -> no timeout; t > 0 -> ``(connect=min(10, t), read=t)``."""
    if infer_timeout_s is None or infer_timeout_s <= 0:
        return None
    return (min(CONNECT_TIMEOUT_CAP_S, float(infer_timeout_s)), float(infer_timeout_s))


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <key>`` on every request; the key is not in ``repr``, ``str`` or pickles."""

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._key}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("BearerAuth holds a secret and is not picklable")


def bearer_auth_from_env(
    api_key_env: str | None, environ: Mapping[str, str] | None = None
) -> BearerAuth | None:
    """None when no variable is configured; a configured variable that is unset or empty is a config error."""
    if api_key_env is None:
        return None
    value = (environ if environ is not None else os.environ).get(api_key_env, "")
    if not value:
        raise ConfigError(
            f"{API_KEY_ENV_KEY}: names the environment variable {api_key_env!r}, which is not set or empty; "
            "export it with the server's --api_key value, or set api_key_env: null for an unauthenticated server"
        )
    return BearerAuth(value)


# --------------------------------------------------------------------------------------------
# Payloads (ms-swift's protocol classes)
# --------------------------------------------------------------------------------------------


def _protocol() -> Any:
    from swift.infer_engine import protocol

    return protocol


def rollout_messages(request: RolloutRequest) -> list[dict[str, str]]:
    """§2.1: the explicit system string, then the user string with one ``<image>`` per image before the text."""
    return [
        {"role": "system", "content": request.system},
        {"role": "user", "content": "<image>" * len(request.images) + request.user},
    ]


def infer_request_json(request: RolloutRequest) -> dict[str, Any]:
    """One ``infer_requests`` element: exactly ``messages`` and ``images`` (omitted without images), §16.3.3.

    Built as ms-swift's ``RolloutInferRequest``; messages are JSON round-tripped, a non-serialisable message or a
    non-string image raises before anything is sent.
    """
    for position, image in enumerate(request.images):
        if not isinstance(image, str):
            raise GenerationError(
                f"{request.where}: images[{position}] is a {type(image).__name__}, not a path or URL string (§2.1)",
                index=request.index,
            )
    try:
        messages = json.loads(json.dumps(rollout_messages(request)))
    except (TypeError, ValueError) as exc:
        raise GenerationError(
            f"{request.where}: messages are not JSON-serialisable ({exc})", index=request.index
        ) from exc
    infer_request = _protocol().RolloutInferRequest(messages=messages, images=list(request.images))
    out: dict[str, Any] = {"messages": infer_request.messages}
    if infer_request.images:
        out["images"] = list(infer_request.images)
    return out


def request_config_json(decoding: RolloutDecoding, seed: int) -> dict[str, Any]:
    """All fields of ms-swift's ``RequestConfig`` (``dataclasses.asdict``) with the values of §2.2 / §16.3.3."""
    if decoding.decode_mode != "greedy":
        raise SetupError(
            "the swift rollout server decodes with decode_mode: greedy only (vLLM has no beam search here)"
        )
    config = _protocol().RequestConfig(
        n=int(decoding.n),
        max_tokens=int(decoding.max_new_tokens),
        temperature=float(decoding.temperature),
        top_p=float(decoding.top_p),
        top_k=int(decoding.top_k),
        repetition_penalty=float(decoding.repetition_penalty),
        num_beams=1,
        stop=[IM_END],
        seed=int(seed),
        stream=False,
        logprobs=False,
        return_details=True,
    )
    return dataclasses.asdict(config)


def infer_body(requests_: Sequence[RolloutRequest], seed: int) -> dict[str, Any]:
    """The ``/infer/`` body: exactly ``infer_requests, request_config, metrics, template, use_tqdm, adapter_request``."""
    decodings = {r.decoding for r in requests_}
    if len(decodings) != 1:
        raise SetupError(
            "one /infer/ POST carries one request_config: its requests must share decoding settings"
        )
    return {
        "infer_requests": [infer_request_json(r) for r in requests_],
        "request_config": request_config_json(requests_[0].decoding, seed),
        "metrics": None,
        "template": None,
        "use_tqdm": None,
        "adapter_request": None,
    }


@functools.lru_cache(maxsize=1)
def _completion_adapter() -> Any:
    """A pydantic validator for ms-swift's ``ChatCompletionResponse`` dataclass (built once)."""
    from pydantic import TypeAdapter

    return TypeAdapter(_protocol().ChatCompletionResponse)


def _int_list(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


@attrs.frozen
class ParsedItem:
    prompt_ids: tuple[int, ...]
    samples: tuple[
        tuple[tuple[int, ...], str, bool], ...
    ]  # (token ids, finish reason, repeat-terminate flag)


def parse_infer_item(item: Any, *, where: str, n: int, repeat_terminate: bool) -> ParsedItem:
    """One reply element (§16.3.3): ms-swift's ``RolloutOutput`` wrapper, a bare ``ChatCompletionResponse``, or an
    error object; anything else raises naming ``where``. Trigger flags come only from ``rollout_infos``."""
    from pydantic import ValidationError

    protocol = _protocol()
    if not isinstance(item, dict):
        raise GenerationError(f"{where}: reply element is a {type(item).__name__}, not a JSON object")
    if item.get("object") == "error":
        raise GenerationError(
            f"{where}: the server answered an error: {str(item.get('message'))[:BODY_EXCERPT]}"
        )
    try:
        if "response" in item:
            protocol.RolloutOutput.model_validate(item)
            response, infos = item["response"], item.get("rollout_infos")
        else:
            _completion_adapter().validate_python(item)
            response, infos = item, None
    except ValidationError as exc:
        raise GenerationError(
            f"{where}: reply element does not match ms-swift's reply classes: {exc}"
        ) from exc
    prompt_ids = response.get("prompt_token_ids")
    if not _int_list(prompt_ids) or not prompt_ids:
        raise GenerationError(f"{where}: prompt_token_ids is missing or not a non-empty list of ints")
    choices = response.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no"
        raise GenerationError(f"{where}: expected {n} choice(s), got {got}")
    triggered = False
    if repeat_terminate:
        flag = infos.get("repeat_terminate_triggered") if isinstance(infos, dict) else None
        if flag not in (0, 1) or isinstance(flag, float):
            raise GenerationError(
                f"{where}: repeat-terminate is enabled but rollout_infos.repeat_terminate_triggered is missing "
                "(is the project's server plugin loaded with --external_plugins?)"
            )
        triggered = bool(flag)
    elif isinstance(infos, dict) and infos.get("repeat_terminate_triggered") in (1, True):
        triggered = True
    samples = []
    for k, choice in enumerate(choices):
        ids = choice.get("token_ids") if isinstance(choice, dict) else None
        if not _int_list(ids):
            raise GenerationError(f"{where}: choices[{k}].token_ids is missing or not a list of ints")
        finish = choice.get("finish_reason")
        samples.append((tuple(ids), "length" if finish == "length" else "stop", triggered))
    return ParsedItem(tuple(prompt_ids), tuple(samples))


# --------------------------------------------------------------------------------------------
# Weight buckets (FlattenedTensorBucket byte layout) and the broadcast seam
# --------------------------------------------------------------------------------------------


def weight_buckets(named_tensors: Iterable[tuple[str, Any]], bucket_size_mib: int) -> list[Any]:
    """ms-swift's buckets of at most ``bucket_size_mib`` MiB (a larger tensor gets its own), each a
    ``FlattenedTensorBucket``: tensors flattened and viewed as ``uint8``; ``start_idx``/``end_idx``/``numel`` are
    byte offsets and byte counts in that buffer. Inside a bucket tensors are ordered by element size (widest first)
    so every offset is aligned for the server's reconstruction."""
    from swift.rlhf_trainers.utils import FlattenedTensorBucket, _create_parameter_buckets

    named = [(str(name), tensor.detach().contiguous()) for name, tensor in named_tensors]
    if not named:
        return []
    buckets = []
    for group in _create_parameter_buckets(named, bucket_size_mib):
        # Widest elements first: every offset is then a multiple of its tensor's element size, which the server's
        # ``byte_slice.view(dtype)`` needs (ms-swift's own order breaks on a bf16 tensor of odd numel before fp32).
        ordered = sorted(group, key=lambda item: -item[1].element_size())
        bucket = FlattenedTensorBucket(named_tensors=ordered)
        for meta, (_, tensor) in zip(bucket.get_metadata(), ordered):
            if meta.start_idx % tensor.element_size():
                raise InvariantViolation(
                    f"weight bucket: {meta.name} starts at byte {meta.start_idx}, misaligned"
                )
        buckets.append(bucket)
    return buckets


def metadata_json(bucket: Any) -> list[dict[str, Any]]:
    """``{"name", "shape", "dtype", "start_idx", "end_idx", "numel"}`` per tensor, as ms-swift's client sends it."""
    return [m.model_dump() for m in bucket.get_metadata()]


class WeightBroadcaster(Protocol):
    """Sends one flat ``uint8`` tensor to every worker of one server (NCCL in production) and waits for them."""

    def broadcast(self, flat_tensor: Any) -> None: ...

    def close(self) -> None: ...


# (server index, server host, group port, server world size) -> a broadcaster joined as the last rank
BroadcasterFactory = Callable[[int, str, int, int], WeightBroadcaster]


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ServerFacts:
    """What a server reported: ``/get_engine_type/`` and ``/get_world_size/`` answers."""

    base_url: str
    group_port: int
    engine_type: str
    enable_lora: bool
    world_size: int
    engine: Mapping[str, object]


class _TransportFailure(Exception):
    """A connection error or timeout on a POST (retried per §16.3.5)."""


class SwiftRolloutClient:
    """Rollouts and weight sync through one or more ``swift rollout`` servers."""

    name = "swift_rollout"

    def __init__(
        self,
        settings: SwiftRolloutSettings,
        tokenizer: TokenizerPort,
        *,
        stop_ids: Iterable[int],
        broadcaster_factory: BroadcasterFactory | None = None,
        initial_version: int = 0,
        environ: Mapping[str, str] | None = None,
        health_poll_s: float = HEALTH_POLL_S,
    ) -> None:
        self.settings = settings
        self._urls = settings.base_urls
        self._auth = bearer_auth_from_env(settings.api_key_env, environ)
        self._tokenizer = tokenizer
        self._stop_ids = frozenset(int(i) for i in stop_ids)
        self._broadcaster_factory = broadcaster_factory
        self._broadcasters: list[WeightBroadcaster] | None = None
        self._version = int(initial_version)
        self._health_poll_s = health_poll_s
        self._sessions = [self._new_session() for _ in self._urls]
        self._facts: tuple[ServerFacts, ...] | None = None
        self._closed = False
        self.session_replacements = 0

    def __repr__(self) -> str:
        return f"SwiftRolloutClient(servers={list(self._urls)}, auth={'bearer' if self._auth else 'none'})"

    # ---- plumbing --------------------------------------------------------------------------------

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxy and no netrc credentials on the way to the servers
        if self._auth is not None:
            session.auth = self._auth
        return session

    def _replace_session(self, server: int) -> None:
        old, self._sessions[server] = self._sessions[server], self._new_session()
        old.close()
        self.session_replacements += 1

    def _server(self, server: int) -> str:
        return f"server {server} ({self._urls[server]})"

    def _control(self, server: int, method: str, route: str, payload: Any = None) -> Any:
        """A control-route call with ``timeout_s``; any failure raises ``SetupError`` with status and body."""
        url = f"{self._urls[server]}{route}"
        try:
            answer = self._sessions[server].request(
                method, url, json=payload, timeout=self.settings.timeout_s
            )
        except requests.RequestException as exc:
            raise SetupError(
                f"{self._server(server)}: {method} {route} failed ({type(exc).__name__})"
            ) from None
        if answer.status_code != 200:
            raise SetupError(
                f"{self._server(server)}: {method} {route} answered HTTP {answer.status_code}: "
                f"{answer.text[:BODY_EXCERPT]}"
            )
        try:
            return answer.json()
        except ValueError:
            return None

    # ---- start-up ----------------------------------------------------------------------------------

    def wait_until_healthy(self) -> None:
        """Poll ``GET /health/`` until every server answers ``{"status": "ok"}`` or ``timeout_s`` passes."""
        deadline = time.monotonic() + self.settings.timeout_s
        pending = list(range(len(self._urls)))
        while True:
            for server in list(pending):
                left = deadline - time.monotonic()
                try:
                    answer = self._sessions[server].get(
                        f"{self._urls[server]}/health/", timeout=max(0.05, min(self._health_poll_s, left))
                    )
                    if answer.status_code == 200 and answer.json().get("status") == "ok":
                        pending.remove(server)
                except (requests.RequestException, ValueError, AttributeError):
                    pass
            left = deadline - time.monotonic()
            if not pending:
                return
            if left <= 0:
                raise SetupError(
                    f"swift rollout server(s) not healthy within timeout_s={self.settings.timeout_s:g} s: "
                    f"{[self._urls[i] for i in pending]} (GET /health/); start them "
                    "(python -m application.stage2_server_launch) or fix rollout.vllm.server.servers"
                )
            time.sleep(max(0.0, min(self._health_poll_s, left)))

    def connect(self) -> tuple[ServerFacts, ...]:
        """Health, then ``/get_engine_type/`` and ``/get_world_size/`` of every server (once, before any infer)."""
        if self._facts is not None:
            return self._facts
        self.wait_until_healthy()
        facts = []
        for server, endpoint in enumerate(self.settings.servers):
            engine = self._control(server, "POST", "/get_engine_type/")
            world = self._control(server, "GET", "/get_world_size/")
            if not isinstance(engine, dict) or not isinstance(engine.get("engine_type"), str):
                raise SetupError(
                    f"{self._server(server)}: /get_engine_type/ did not answer an engine_type: {engine!r:.200}"
                )
            size = world.get("world_size") if isinstance(world, dict) else None
            if not isinstance(size, int) or size < 1:
                raise SetupError(
                    f"{self._server(server)}: /get_world_size/ did not answer a world_size: {world!r:.200}"
                )
            facts.append(
                ServerFacts(
                    self._urls[server],
                    endpoint.group_port,
                    engine["engine_type"],
                    bool(engine.get("enable_lora", False)),
                    size,
                    dict(engine),
                )
            )
        self._facts = tuple(facts)
        return self._facts

    # ---- rollouts ----------------------------------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return self._version

    def generate(self, requests_: Sequence[RolloutRequest]) -> list[RolloutResult]:
        if self._closed:
            raise SetupError("the swift rollout client was closed")
        if not requests_:
            return []
        self.connect()
        plan = chunk_plan(len(requests_), len(self._urls))
        logger.info(
            "swift rollout: %d request(s) over %s; seed plan %s",
            len(requests_),
            list(self._urls),
            [(c.server, c.start, c.stop, requests_[c.start].seed) for c in plan],
        )
        slots: list[RolloutResult | None] = [None] * len(requests_)
        version = self._version
        with ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="swift-rollout") as pool:
            futures = [pool.submit(self._run_chunk, chunk, requests_, version) for chunk in plan]
            for future in futures:
                for position, result in future.result():
                    slots[position] = result
        missing = [i for i, r in enumerate(slots) if r is None]
        if missing:
            raise GenerationError(f"swift rollout: no result for request position(s) {missing}")
        return [r for r in slots if r is not None]

    def _run_chunk(
        self, chunk: Chunk, requests_: Sequence[RolloutRequest], version: int
    ) -> list[tuple[int, RolloutResult]]:
        """Runs of equal decoding inside the chunk, one POST each (with retry and halving)."""
        out: list[tuple[int, RolloutResult]] = []
        start = chunk.start
        while start < chunk.stop:
            stop = start + 1
            while stop < chunk.stop and requests_[stop].decoding == requests_[start].decoding:
                stop += 1
            out.extend(self._post_with_retry(Chunk(chunk.server, start, stop), requests_, version))
            start = stop
        return out

    def _post_with_retry(
        self, chunk: Chunk, requests_: Sequence[RolloutRequest], version: int
    ) -> list[tuple[int, RolloutResult]]:
        """§16.3.5: fail -> new session, retry once; fail again -> halves (each with its own start seed)."""
        try:
            return self._post_infer(chunk, requests_, version)
        except _TransportFailure:
            self._replace_session(chunk.server)
        try:
            return self._post_infer(chunk, requests_, version)
        except _TransportFailure as exc:
            if chunk.size > 1:
                first, second = chunk.halves()
                logger.warning("%s: /infer/ failed twice on [%d, %d); retrying as halves",
                               self._server(chunk.server), chunk.start, chunk.stop)  # fmt: skip
                return self._post_with_retry(first, requests_, version) + self._post_with_retry(
                    second, requests_, version
                )
            request = requests_[chunk.start]
            raise GenerationError(
                f"{self._server(chunk.server)}: /infer/ for {request.where} failed twice ({exc}); "
                "check the server log, or raise rollout.vllm.server.infer_timeout_s",
                index=request.index,
            ) from None

    def _post_infer(
        self, chunk: Chunk, requests_: Sequence[RolloutRequest], version: int
    ) -> list[tuple[int, RolloutResult]]:
        batch = requests_[chunk.start : chunk.stop]
        seed = batch[0].seed
        body = infer_body(batch, seed)
        where = f"{self._server(chunk.server)}, chunk [{chunk.start}, {chunk.stop})"
        try:
            answer = self._sessions[chunk.server].post(
                f"{self._urls[chunk.server]}/infer/",
                json=body,
                timeout=infer_timeout(self.settings.infer_timeout_s),
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _TransportFailure(type(exc).__name__) from None
        if answer.status_code != 200:
            raise GenerationError(
                f"{where}: /infer/ answered HTTP {answer.status_code}: {answer.text[:BODY_EXCERPT]}",
                index=batch[0].index,
            )
        try:
            items = answer.json()
        except ValueError:
            raise GenerationError(
                f"{where}: /infer/ answered non-JSON: {answer.text[:BODY_EXCERPT]}"
            ) from None
        if not isinstance(items, list) or len(items) != len(batch):
            got = len(items) if isinstance(items, list) else type(items).__name__
            raise GenerationError(f"{where}: /infer/ answered {got} element(s) for {len(batch)} request(s)")
        out = []
        for offset, (request, item) in enumerate(zip(batch, items)):
            parsed = parse_infer_item(
                item, where=f"{where}, item {offset} ({request.where})", n=request.decoding.n,
                repeat_terminate=self.settings.repeat_terminate,
            )  # fmt: skip
            samples = tuple(self._sample(ids, finish, flag) for ids, finish, flag in parsed.samples)
            result = RolloutResult(
                index=request.index,
                prompt_ids=parsed.prompt_ids,
                samples=samples,
                policy_version=version,
                decode_mode=request.decoding.decode_mode,
                seed=seed,
            )
            out.append((chunk.start + offset, result))
        return out

    def _sample(self, ids: tuple[int, ...], finish: str, triggered: bool) -> RolloutSample:
        return RolloutSample.from_server(
            ids, finish, self._stop_ids, self._tokenizer.piece, repeat_terminate_triggered=triggered
        )

    # ---- weight sync --------------------------------------------------------------------------------

    def supports_sync(self, kind: SyncKind) -> bool:
        if self._broadcaster_factory is None:
            return False
        if kind == "adapter":
            return all(f.enable_lora for f in self.connect())
        return True

    def _ensure_communicators(self) -> list[WeightBroadcaster]:
        if self._broadcasters is not None:
            return self._broadcasters
        if self._broadcaster_factory is None:
            raise SetupError(
                "weight sync to swift rollout servers needs the NCCL broadcast (vLLM and a GPU on the learner); "
                "this client was built without one"
            )
        broadcasters = []
        for server, facts in enumerate(self.connect()):
            bind_host = "::" if ":" in (urlsplit(facts.base_url).hostname or "") else "0.0.0.0"
            self._control(server, "POST", "/init_communicator/",
                          {"host": bind_host, "port": facts.group_port, "world_size": facts.world_size + 1})  # fmt: skip
            host = urlsplit(facts.base_url).hostname or "127.0.0.1"
            broadcasters.append(self._broadcaster_factory(server, host, facts.group_port, facts.world_size))
        self._broadcasters = broadcasters
        return broadcasters

    def sync_weights(self, update: WeightSyncRequest) -> WeightSyncReport:
        """Push ``update.version``; skipped when the servers already hold it (sync is by ``global_step``)."""
        if self._closed:
            raise SetupError("the swift rollout client was closed")
        if update.version == self._version:
            return WeightSyncReport(version=update.version, kind=update.kind, skipped=True)
        if update.source is None:
            raise SetupError(f"weight sync to version {update.version}: no weight source given")
        facts = self.connect()
        if update.kind == "adapter" and not all(f.enable_lora for f in facts):
            raise SetupError(
                f"adapter weight sync needs servers started with --vllm_enable_lora true; "
                f"{[f.base_url for f in facts if not f.enable_lora]} report enable_lora: false "
                "(use rollout.vllm.sync.mode: full, or relaunch with rollout.vllm.enable_lora: true)"
            )
        broadcasters = self._ensure_communicators()
        if update.kind == "full":
            buckets = weight_buckets(update.source.full_state(), self.settings.bucket_size_mib)
            for bucket in buckets:
                metadatas = metadata_json(bucket)
                for server, broadcaster in enumerate(broadcasters):
                    self._control(server, "POST", "/update_flattened_params/", {"metadatas": metadatas})
                    broadcaster.broadcast(bucket.get_flattened_tensor())
            for server in range(len(broadcasters)):
                self._control(server, "POST", "/process_weights_after_loading/")
        else:
            buckets = weight_buckets(
                update.source.adapter_state(), 1 << 30
            )  # one bucket, as ms-swift sends it
            peft_config = json.loads(json.dumps(dict(update.source.adapter_config())))
            for bucket in buckets:
                payload = {"peft_config": peft_config, "metadatas": metadata_json(bucket)}
                for server, broadcaster in enumerate(broadcasters):
                    self._control(server, "POST", "/update_adapter_flattened_param/", payload)
                    broadcaster.broadcast(bucket.get_flattened_tensor())
        for server in range(len(broadcasters)):
            for route in RESET_ROUTES:
                self._control(server, "POST", route)
        self._version = int(update.version)
        metas = [m for b in buckets for m in b.get_metadata()]
        return WeightSyncReport(
            version=self._version, kind=update.kind, buckets=len(buckets), tensors=len(metas),
            bytes=sum(int(m.numel) for m in metas),
        )  # fmt: skip

    # ---- lifecycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        broadcasters, self._broadcasters = self._broadcasters, None
        if broadcasters is not None:
            for server, broadcaster in enumerate(broadcasters):
                try:
                    self._control(server, "POST", "/close_communicator/")
                except SetupError as exc:
                    logger.warning("%s", exc)
                broadcaster.close()
        for session in self._sessions:
            session.close()

    def describe(self) -> Mapping[str, object]:
        facts = self._facts or ()
        return {
            "backend": "vllm",
            "mode": "server",
            "servers": [
                {
                    "base_url": f.base_url,
                    "group_port": f.group_port,
                    "engine_type": f.engine_type,
                    "enable_lora": f.enable_lora,
                    "world_size": f.world_size,
                    "engine": dict(f.engine),
                }
                for f in facts
            ]
            or [
                {"base_url": u, "group_port": s.group_port} for u, s in zip(self._urls, self.settings.servers)
            ],
            "timeout_s": self.settings.timeout_s,
            "infer_timeout_s": self.settings.infer_timeout_s,
            "auth": "bearer" if self._auth is not None else "none",
            "policy_version": self._version,
        }
