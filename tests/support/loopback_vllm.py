"""A loopback HTTP server that speaks the parts of vLLM's OpenAI-compatible API the client uses (D11).

- ``GET /v1/models`` -> ``{"object": "list", "data": [{"id": <model>, "object": "model"}]}``
- ``POST /v1/chat/completions`` -> one choice whose ``logprobs.content`` entries carry
  ``"token": "token_id:<id>"`` (vLLM's ``return_tokens_as_token_ids``), plus ``usage.prompt_tokens``.

Answers are scripted per request body (a callable returning :class:`Reply`); every body is recorded.
The server binds ``127.0.0.1`` on a free port, runs in a daemon thread, and stops by itself after
``lifetime_s`` seconds or ``max_requests`` requests (it can never outlive a test run).

Run as a script (``python tests/support/loopback_vllm.py --port P``) it serves a fixed reply: the
stand-in for an auto-launched server.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
from typing_extensions import Self


@attrs.frozen
class Reply:
    """One scripted answer: ``token_ids`` with ``logprobs`` (same length) and ``content``; or a raw override."""

    content: str | None = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    prompt_tokens: int = 7
    status: int = 200
    raw: Any = None  # a JSON value sent as is (overrides everything else)
    omit_logprobs: bool = False
    delay_s: float = 0.0
    finish_reason: str = "stop"


Script = Callable[[dict[str, Any]], Reply]


def completion_payload(reply: Reply, model: str) -> Any:
    if reply.raw is not None:
        return reply.raw
    entries: list[dict[str, Any]] = [
        {"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
        for t, lp in zip(reply.token_ids, reply.logprobs)
    ]
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": reply.content},
        "finish_reason": reply.finish_reason,
    }
    if not reply.omit_logprobs:
        choice["logprobs"] = {"content": entries}
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": len(reply.token_ids),
            "total_tokens": reply.prompt_tokens + len(reply.token_ids),
        },
    }


class LoopbackVllm:
    """Context manager: ``with LoopbackVllm(script) as server: server.base_url ...``."""

    def __init__(
        self,
        script: Script,
        *,
        model: str = "loopback-model",
        lifetime_s: float = 60.0,
        max_requests: int = 500,
        port: int = 0,
        models_status: int = 200,
    ) -> None:
        self.script = script
        self.model = model
        self.lifetime_s = lifetime_s
        self.max_requests = max_requests
        self.models_status = models_status
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self._served = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _count(self) -> None:
                with owner._lock:
                    owner._served += 1
                    owner.paths.append(self.path)
                    if owner._served >= owner.max_requests:
                        threading.Thread(target=owner.stop, daemon=True).start()

            def do_GET(self) -> None:
                self._count()
                if self.path.rstrip("/") == "/v1/models":
                    self._send(
                        owner.models_status,
                        {"object": "list", "data": [{"id": owner.model, "object": "model"}]},
                    )
                else:
                    self._send(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:
                self._count()
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length).decode("utf-8"))
                with owner._lock:
                    owner.bodies.append(body)
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": f"no route {self.path}"})
                    return
                reply = owner.script(body)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                self._send(reply.status, completion_payload(reply, owner.model))

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackVllm:
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
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description="loopback stand-in for an auto-launched vLLM server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="loopback-model")
    parser.add_argument("--lifetime", type=float, default=30.0)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.startup_delay)
    print(f"loopback vLLM on 127.0.0.1:{args.port}", flush=True)
    server = LoopbackVllm(
        lambda _body: Reply(content='{"objects": []}', token_ids=(5, 6), logprobs=(-0.1, -0.2)),
        model=args.model,
        lifetime_s=args.lifetime,
        port=args.port,
    )
    server.start()
    server._thread.join(args.lifetime + 5)


if __name__ == "__main__":
    main()
