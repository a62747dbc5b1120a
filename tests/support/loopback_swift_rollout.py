"""A loopback stand-in for ms-swift 4.6's ``swift rollout`` server (stage2.md §16.3; D11).

Routes (as ``SwiftRolloutDeploy`` registers them): ``GET /health/``, ``GET /get_world_size/``,
``POST /get_engine_type/``, ``POST /infer/``, ``POST /init_communicator/``, ``/update_flattened_params/``,
``/update_adapter_flattened_param/``, ``/process_weights_after_loading/``, ``/reset_prefix_cache/``,
``/reset_encoder_cache/``, ``/reset_mm_cache/``, ``/close_communicator/``.

- With ``api_key`` set, every route but ``/health/`` needs ``Authorization: Bearer <api_key>`` (401 otherwise),
  like ms-swift's ``_require_api_key``.
- ``/infer/`` bodies are read with ms-swift's ``RolloutInferRequest`` / ``RequestConfig``; the ``responder`` answers
  them; :func:`hf_responder` runs the HF rollout engine on a model and replies in ms-swift's ``RolloutOutput`` shape.
- ``fault(path, body, attempt)`` may script a failure: ``"drop"`` closes the connection without an answer, a number
  sleeps that many seconds first (a read timeout on the client), an int >= 400 is an HTTP status.
- The sync routes record what they were sent; given ``expected_tensors`` the bucket metadata is checked against
  them (name, shape, dtype, byte offsets contiguous from 0, byte count = ``numel * element_size``).
  :class:`LoopbackBroadcaster` hands the flat ``uint8`` bucket to the server in-process (this stand-in has no NCCL),
  which rebuilds the tensors with ms-swift's ``FlattenedTensorBucket`` and compares them bytewise.

Binds ``127.0.0.1`` on a free port, serves from a daemon thread, and stops by itself after ``lifetime_s`` seconds
or ``max_requests`` requests; tests stop it with ``with LoopbackSwiftRollout(...) as server``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
from typing_extensions import Self

Responder = Callable[[list[Any], Any], list[Any]]
Fault = Callable[[str, Any, int], Any]


@attrs.define
class Call:
    method: str
    path: str
    authorization: str | None
    body: Any


class LoopbackSwiftRollout:
    """Context manager: ``with LoopbackSwiftRollout(responder) as server: server.base_url ...``."""

    def __init__(
        self,
        responder: Responder,
        *,
        api_key: str | None = None,
        world_size: int = 1,
        engine_type: str = "LLMEngine",
        enable_lora: bool = False,
        fault: Fault | None = None,
        expected_tensors: Mapping[str, Any] | None = None,
        lifetime_s: float = 120.0,
        max_requests: int = 500,
    ) -> None:
        self.responder = responder
        self.api_key = api_key
        self.world_size = world_size
        self.engine_type = engine_type
        self.enable_lora = enable_lora
        self.fault = fault
        self.expected_tensors = dict(expected_tensors or {})
        self.calls: list[Call] = []
        self.metadatas: list[list[dict[str, Any]]] = []
        self.layout_errors: list[str] = []
        self.received: dict[str, Any] = {}
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._served = 0
        self.max_requests = max_requests
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length", "0") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw.decode("utf-8")) if raw else None
                path = self.path
                auth = self.headers.get("Authorization")
                with owner._lock:
                    owner._served += 1
                    owner.calls.append(Call(method, path, auth, body))
                    attempt = owner.attempts.get(path, 0)
                    owner.attempts[path] = attempt + 1
                    if owner._served >= owner.max_requests:
                        threading.Thread(target=owner.stop, daemon=True).start()
                if path.rstrip("/") != "/health" and owner.api_key is not None:
                    if not auth or not auth.startswith("Bearer "):
                        self._send(401, {"detail": "Missing bearer token"})
                        return
                    if auth[7:] != owner.api_key:
                        self._send(401, {"detail": "Invalid API key"})
                        return
                if owner.fault is not None:
                    action = owner.fault(path, body, attempt)
                    if action == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if isinstance(action, int) and not isinstance(action, bool) and action >= 400:
                        self._send(action, {"detail": "scripted failure"})
                        return
                    if isinstance(action, (int, float)) and not isinstance(action, bool) and action > 0:
                        time.sleep(float(action))
                try:
                    status, payload = owner.route(method, path, body)
                except Exception as exc:  # noqa: BLE001 - reported to the client as a 500, like FastAPI
                    status, payload = 500, {"detail": f"{type(exc).__name__}: {exc}"}
                try:
                    self._send(status, payload)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    # ---- routes -------------------------------------------------------------------------------------

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        from swift.infer_engine.protocol import RequestConfig, RolloutInferRequest
        from swift.rlhf_trainers.utils import UpdateFlattenedParamsRequest

        key = (method, path)
        if key in {("GET", "/health/"), ("GET", "/health")}:
            return 200, {"status": "ok"}
        if key == ("GET", "/get_world_size/"):
            return 200, {"world_size": self.world_size}
        if key == ("POST", "/get_engine_type/"):
            return 200, {"engine_type": self.engine_type, "enable_multi_turn": False, "use_gym_env": False,
                         "enable_lora": self.enable_lora}  # fmt: skip
        if key == ("POST", "/infer/"):
            requests_ = [RolloutInferRequest(**r) for r in body["infer_requests"]]
            config = (
                RequestConfig(**body["request_config"]) if body.get("request_config") is not None else None
            )
            return 200, self.responder(requests_, config)
        if key == ("POST", "/update_flattened_params/"):
            parsed = UpdateFlattenedParamsRequest.model_validate(body)
            self._record_metadatas([m.model_dump() for m in parsed.metadatas])
            return 200, {"message": "ok"}
        if key == ("POST", "/update_adapter_flattened_param/"):
            if not self.enable_lora:
                return 500, {"detail": "LoRA is not enabled"}
            if not isinstance(body.get("peft_config"), dict):
                return 422, {"detail": "peft_config missing"}
            self._record_metadatas(body["metadatas"])
            return 200, {"message": "ok"}
        if method == "POST" and path in {"/init_communicator/", "/process_weights_after_loading/",
                                         "/reset_prefix_cache/", "/reset_encoder_cache/", "/reset_mm_cache/",
                                         "/close_communicator/"}:  # fmt: skip
            return 200, {"message": "ok"}
        return 404, {"detail": f"no route {method} {path}"}

    def _record_metadatas(self, metadatas: list[dict[str, Any]]) -> None:
        with self._lock:
            self.metadatas.append(metadatas)
            self.layout_errors.extend(self.layout_problems(metadatas))

    def layout_problems(self, metadatas: Sequence[Mapping[str, Any]]) -> list[str]:
        """The bucket's metadata against the expected tensors: FlattenedTensorBucket's byte layout."""
        problems = []
        cursor = 0
        for m in metadatas:
            name = m["name"]
            if m["start_idx"] != cursor:
                problems.append(f"{name}: start_idx {m['start_idx']} != {cursor}")
            if m["end_idx"] - m["start_idx"] != m["numel"]:
                problems.append(f"{name}: end_idx - start_idx != numel")
            cursor = m["end_idx"]
            tensor = self.expected_tensors.get(name)
            if tensor is None:
                if self.expected_tensors:
                    problems.append(f"{name}: not an expected tensor")
                continue
            if tuple(m["shape"]) != tuple(tensor.shape):
                problems.append(f"{name}: shape {m['shape']} != {tuple(tensor.shape)}")
            if m["dtype"] != str(tensor.dtype):
                problems.append(f"{name}: dtype {m['dtype']} != {tensor.dtype}")
            if m["numel"] != tensor.numel() * tensor.element_size():
                problems.append(
                    f"{name}: numel {m['numel']} != {tensor.numel() * tensor.element_size()} bytes"
                )
        return problems

    def receive_bucket(self, flat_tensor: Any) -> None:
        """The stand-in for the server workers' NCCL receive: rebuild with ms-swift's class, compare bytes."""
        import torch
        from swift.rlhf_trainers.utils import FlattenedTensorBucket, FlattenedTensorMetadata

        with self._lock:
            metadatas = [FlattenedTensorMetadata(**m) for m in self.metadatas[-1]]
        if flat_tensor.dtype != torch.uint8 or flat_tensor.dim() != 1:
            self.layout_errors.append(
                f"broadcast tensor is {flat_tensor.dtype} {tuple(flat_tensor.shape)}, not flat uint8"
            )
            return
        if metadatas and flat_tensor.numel() != metadatas[-1].end_idx:
            self.layout_errors.append(
                f"broadcast has {flat_tensor.numel()} bytes, metadata says {metadatas[-1].end_idx}"
            )
        rebuilt = FlattenedTensorBucket(
            flattened_tensor=flat_tensor.clone(), metadata=metadatas
        ).reconstruct_tensors()
        for name, tensor in rebuilt.items():
            self.received[name] = tensor
            expected = self.expected_tensors.get(name)
            if expected is not None and not torch.equal(tensor, expected.detach().cpu()):
                self.layout_errors.append(f"{name}: rebuilt bytes differ from the trained tensor")

    # ---- lifecycle ----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def paths(self, method: str | None = None) -> list[str]:
        return [c.path for c in self.calls if method is None or c.method == method]

    def start(self) -> LoopbackSwiftRollout:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LoopbackBroadcaster:
    """In-process delivery of a bucket to the loopback server (the stand-in has no NCCL workers)."""

    def __init__(self, server: LoopbackSwiftRollout) -> None:
        self.server = server
        self.closed = False
        self.broadcasts = 0

    def broadcast(self, flat_tensor: Any) -> None:
        self.broadcasts += 1
        self.server.receive_bucket(flat_tensor)

    def close(self) -> None:
        self.closed = True


# ---- replies ---------------------------------------------------------------------------------------------


def completion_json(
    prompt_ids: Sequence[int],
    samples: Sequence[tuple[Sequence[int], str]],
    *,
    content: str = "",
    wrapped: bool = True,
    rollout_infos: Mapping[str, Any] | None = None,
) -> Any:
    """A reply element built with ms-swift's classes: ``RolloutOutput`` (``wrapped``) or a bare chat completion."""
    from swift.infer_engine.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
        RolloutOutput,
        UsageInfo,
    )

    choices = [
        ChatCompletionResponseChoice(index=k, message=ChatMessage(role="assistant", content=content),
                                     finish_reason=finish, token_ids=[int(i) for i in ids])  # type: ignore[arg-type]
        for k, (ids, finish) in enumerate(samples)
    ]  # fmt: skip
    generated = sum(len(ids) for ids, _ in samples)
    response = ChatCompletionResponse(
        model="loopback", choices=choices, usage=UsageInfo(len(prompt_ids), generated, len(prompt_ids) + generated),
        prompt_token_ids=[int(i) for i in prompt_ids],
    )  # fmt: skip
    if not wrapped:
        return json.loads(json.dumps(dataclasses.asdict(response)))
    output = RolloutOutput(
        response=response,
        rollout_infos=dict({"repeat_terminate_triggered": 0} if rollout_infos is None else rollout_infos),
    )
    return output.model_dump(mode="json")


def hf_responder(backend: Any, im_end_id: int) -> Responder:
    """Answer ``/infer/`` with an HF rollout backend (one seed per POST, as a vLLM server applies it)."""
    from PIL import Image

    from ports.rollout import RolloutDecoding, RolloutRequest

    def respond(infer_requests: list[Any], config: Any) -> list[Any]:
        decoding = RolloutDecoding(
            max_new_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, repetition_penalty=config.repetition_penalty, n=config.n,
        )  # fmt: skip
        ours = []
        for position, request in enumerate(infer_requests):
            system = next(m["content"] for m in request.messages if m["role"] == "system")
            user = next(m["content"] for m in request.messages if m["role"] == "user")
            images = tuple(request.images)
            text = user.removeprefix("<image>" * len(images))
            with Image.open(images[0]) as image:
                width, height = image.size
            ours.append(
                RolloutRequest(position, system, text, images, decoding, int(config.seed or 0), width, height)
            )
        replies = []
        for result in backend.generate(ours):
            samples = [
                (list(s.response_ids) + ([im_end_id] if s.finish_reason == "stop" else []), s.finish_reason)
                for s in result.samples
            ]
            replies.append(
                completion_json(result.prompt_ids, samples, content="".join(result.samples[0].pieces))
            )
        return replies

    return respond
