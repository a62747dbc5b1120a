"""The vLLM OpenAI-compatible server as a :class:`ports.generation.GenerationBackend` (infer-eval-config.md §2.6).

Speaks HTTP with ``requests`` only (vLLM itself is never imported here):

- preflight ``GET <base>/v1/models`` with ``preflight_timeout_s``; a connection error or HTTP >= 400 fails
  fast naming ``infer.backend: hf`` as the alternative;
- ``POST <base>/v1/chat/completions`` per sample with exactly the body of §2.6 (special tokens kept, no
  spaces between them, log-probs on, token ids in the log-prob entries, ``seed = run.seed + index``);
- a pool of ``client_concurrency`` workers; answers are placed back by input position;
- a non-200 answer, no choices or missing log-probs make that sample's ``Generation.error``;
- the first answer's ``usage.prompt_tokens`` is compared with the locally rendered prompt length
  (template drift or silent resizing fails the run);
- auto-launch (:class:`LaunchedServer`): the server in its own process group, logging to a file, probed
  every second until ``startup_timeout_s``; an early exit fails with the last 50 log lines; at the end
  terminate, then kill after 10 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import requests

from adapters.vllm.messages import cut_answer, no_resize_processor_kwargs, openai_messages
from domain.errors import GenerationError, InvariantViolation, SetupError
from ports.generation import DecodingSettings, Generation, GenerationRequest

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "0.0.0.0"})
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
LOG_TAIL_LINES = 50
STOP_GRACE_S = 10.0
PROBE_INTERVAL_S = 1.0
TOKEN_ID_PREFIX = "token_id:"
ALTERNATIVE = "start it, enable infer.vllm.auto_launch, or set infer.backend: hf"


def normalize_base_url(url: str | None) -> str:
    """``http(s)://host:port`` without a trailing ``/`` or ``/v1`` (null -> ``http://127.0.0.1:8000``)."""
    if url is None:
        return DEFAULT_BASE_URL
    return url.rstrip("/").removesuffix("/v1")


def is_local_url(url: str | None) -> bool:
    """Auto-launch may start a server for this URL (its host is this machine, or no URL was given)."""
    return url is None or (urlsplit(normalize_base_url(url)).hostname or "") in LOCAL_HOSTS


def probe_url(base_url: str) -> str:
    """Where to probe a server bound to ``base_url`` (``0.0.0.0`` is reached through ``127.0.0.1``)."""
    parts = urlsplit(base_url)
    if parts.hostname == "0.0.0.0":
        return base_url.replace("0.0.0.0", "127.0.0.1", 1)
    return base_url


@attrs.frozen
class ServerSettings:
    """Everything the client needs; ``logprobs_mode`` is ``raw`` for a server we launched in raw mode."""

    base_url: str = attrs.field(converter=normalize_base_url)
    served_model_name: str
    request_timeout_s: float
    preflight_timeout_s: float
    concurrency: int
    logprobs_mode: str = "unverified"


def request_body(
    request: GenerationRequest, decoding: DecodingSettings, served_model_name: str
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/chat/completions`` (§2.6), exactly these keys."""
    return {
        "model": served_model_name,
        "messages": openai_messages(request),
        "temperature": float(decoding.temperature),
        "top_p": float(decoding.top_p),
        "max_tokens": int(decoding.max_new_tokens),
        "repetition_penalty": float(decoding.repetition_penalty),
        "seed": int(request.seed),
        "stream": False,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "logprobs": True,
        "return_tokens_as_token_ids": True,
    }


@attrs.frozen
class ParsedAnswer:
    generation: Generation
    prompt_tokens: int | None


def parse_answer(
    index: int, status: int, payload: Any, end_of_turn: Mapping[int, str], body_text: str = ""
) -> ParsedAnswer:
    """A chat-completions answer -> :class:`Generation` (``error`` set for a failed sample)."""

    def failed(reason: str) -> ParsedAnswer:
        return ParsedAnswer(Generation(index=index, error=reason), None)

    if status != 200:
        return failed(f"HTTP {status}: {body_text[:300]}")
    if not isinstance(payload, dict):
        return failed(f"answer is not a JSON object: {body_text[:300]}")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return failed("answer has no choices")
    choice = choices[0]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is not None and not isinstance(content, str):
        return failed(f"choices[0].message.content is not a string: {content!r:.100}")
    logprobs = choice.get("logprobs")
    entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(entries, list):
        return failed(
            "answer has no log-probs (choices[0].logprobs.content); the server must honour logprobs: true"
        )
    ids: list[int] = []
    values: list[float] = []
    for position, entry in enumerate(entries):
        token = entry.get("token") if isinstance(entry, dict) else None
        value = entry.get("logprob") if isinstance(entry, dict) else None
        if not isinstance(token, str) or not token.startswith(TOKEN_ID_PREFIX):
            return failed(
                f"log-prob entry {position} has token {token!r}; the server must honour return_tokens_as_token_ids"
            )
        try:
            ids.append(int(token[len(TOKEN_ID_PREFIX) :]))
        except ValueError:
            return failed(f"log-prob entry {position}: token {token!r} is not 'token_id:<int>'")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return failed(f"log-prob entry {position} has no numeric logprob")
        values.append(float(value))
    kept_ids, kept_logprobs, text, stopped = cut_answer(ids, values, content or "", end_of_turn)
    usage = payload.get("usage")
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    finish = "stop" if stopped else str(choice.get("finish_reason") or "length")
    return ParsedAnswer(
        Generation(
            index=index,
            token_ids=kept_ids,
            text=text,
            token_logprobs=kept_logprobs,
            finish_reason=finish,
            ended_with_stop=stopped,
        ),
        prompt_tokens if isinstance(prompt_tokens, int) and not isinstance(prompt_tokens, bool) else None,
    )


def preflight(base_url: str, timeout_s: float, session: requests.Session | None = None) -> list[str]:
    """``GET <base>/v1/models``: the served model ids; unreachable or HTTP >= 400 raises :class:`SetupError`."""
    url = f"{probe_url(base_url)}/v1/models"
    getter = session.get if session is not None else requests.get
    try:
        answer = getter(url, timeout=timeout_s)
    except requests.RequestException as exc:
        raise SetupError(
            f"vLLM server at {base_url} is not reachable ({type(exc).__name__}: {exc}); {ALTERNATIVE}"
        ) from exc
    if answer.status_code >= 400:
        raise SetupError(
            f"vLLM server at {base_url} is not reachable (GET /v1/models answered HTTP {answer.status_code}); "
            f"{ALTERNATIVE}"
        )
    try:
        data = answer.json().get("data", [])
        return [str(m.get("id")) for m in data if isinstance(m, dict)]
    except (ValueError, AttributeError) as exc:
        raise SetupError(
            f"vLLM server at {base_url}: GET /v1/models did not answer a model list ({exc})"
        ) from exc


# --------------------------------------------------------------------------------------------
# Auto-launch
# --------------------------------------------------------------------------------------------


def vllm_server_argv(
    *,
    model_path: str,
    base_url: str | None,
    dtype: str,
    served_model_name: str,
    launch: Any,
    max_pixels: int,
    trust_remote_code: bool,
    python: str = sys.executable,
) -> list[str]:
    """The OpenAI server command for ``model.path`` with the ``infer.vllm.launch.*`` flags (raw log-probs);
    ``--trust-remote-code`` only with ``infer.vllm.trust_remote_code: true``."""
    parts = urlsplit(normalize_base_url(base_url))
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--host", parts.hostname or "127.0.0.1",
        "--port", str(parts.port or 8000),
        "--dtype", dtype,
        "--served-model-name", served_model_name,
        "--tensor-parallel-size", str(launch.tensor_parallel_size),
        "--data-parallel-size", str(launch.data_parallel_size),
        "--gpu-memory-utilization", str(launch.gpu_memory_utilization),
        "--logprobs-mode", "raw_logprobs",
        "--limit-mm-per-prompt", json.dumps({"image": 1}),
        "--mm-processor-kwargs", json.dumps(no_resize_processor_kwargs(max_pixels)),
        "--enable-prefix-caching" if launch.enable_prefix_caching else "--no-enable-prefix-caching",
    ]  # fmt: skip
    for flag, value in (
        ("--max-model-len", launch.max_model_len),
        ("--max-num-batched-tokens", launch.max_num_batched_tokens),
        ("--max-num-seqs", launch.max_num_seqs),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if launch.enforce_eager:
        argv.append("--enforce-eager")
    if trust_remote_code:
        argv.append("--trust-remote-code")
    return argv


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class LaunchedServer:
    """A server process started by the pipeline: own process group, log file, bounded start-up."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        base_url: str,
        log_path: Path,
        startup_timeout_s: float,
        probe_interval_s: float = PROBE_INTERVAL_S,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.base_url = normalize_base_url(base_url)
        self.log_path = Path(log_path)
        self.startup_timeout_s = float(startup_timeout_s)
        self.probe_interval_s = probe_interval_s
        self.stop_grace_s = stop_grace_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start and wait until ``GET /v1/models`` answers; raise with the log tail on failure."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "no probe yet"
        while True:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise SetupError(
                    f"the vLLM server exited with code {code} during start-up ({' '.join(self.argv[:4])} ...); "
                    f"last {LOG_TAIL_LINES} lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise SetupError(
                    f"the vLLM server did not answer GET /v1/models within {self.startup_timeout_s:g} s "
                    f"(infer.vllm.launch.startup_timeout_s; last probe: {last_error}); "
                    f"last {LOG_TAIL_LINES} lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                preflight(self.base_url, max(0.05, min(self.probe_interval_s, left)))
                return
            except SetupError as exc:
                last_error = str(exc).split(";")[0]
            time.sleep(max(0.0, min(self.probe_interval_s, deadline - time.monotonic())))

    def stop(self) -> None:
        """Terminate the process group, then kill it after the grace period (idempotent)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            process.wait(timeout=self.stop_grace_s)


def _argv_strings(values: Sequence[object]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


@attrs.frozen
class LaunchPlan:
    """How to start a server when the preflight fails and auto-launch applies."""

    argv: tuple[str, ...] = attrs.field(converter=_argv_strings)
    log_path: Path
    startup_timeout_s: float


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class VllmServerBackend:
    """Generation through a vLLM OpenAI-compatible server (external or launched by us)."""

    name = "vllm"

    def __init__(
        self,
        settings: ServerSettings,
        *,
        end_of_turn: Mapping[int, str],
        expected_prompt_tokens: Callable[[GenerationRequest], int] | None = None,
        launched: LaunchedServer | None = None,
        session: requests.Session | None = None,
    ) -> None:
        if settings.concurrency < 1:
            raise SetupError(f"infer.vllm.client_concurrency must be >= 1, got {settings.concurrency}")
        self.settings = settings
        self._end_of_turn = dict(end_of_turn)
        self._expected_prompt_tokens = expected_prompt_tokens
        self._prompt_checked = expected_prompt_tokens is None
        self._launched = launched
        self._session = session if session is not None else requests.Session()
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="vllm-client"
        )

    def _post(self, request: GenerationRequest, decoding: DecodingSettings) -> ParsedAnswer:
        try:
            body = request_body(request, decoding, self.settings.served_model_name)
        except GenerationError as exc:
            return ParsedAnswer(Generation(index=request.index, error=str(exc)), None)
        url = f"{probe_url(self.settings.base_url)}/v1/chat/completions"
        try:
            answer = self._session.post(url, json=body, timeout=self.settings.request_timeout_s)
        except requests.RequestException as exc:
            return ParsedAnswer(Generation(index=request.index, error=f"{type(exc).__name__}: {exc}"), None)
        try:
            payload: Any = answer.json()
        except ValueError:
            payload = None
        return parse_answer(request.index, answer.status_code, payload, self._end_of_turn, answer.text)

    def generate(
        self, requests_: Sequence[GenerationRequest], decoding: DecodingSettings
    ) -> list[Generation]:
        if self._pool is None:
            raise SetupError("the vLLM server backend was closed")
        answers = list(self._pool.map(lambda r: self._post(r, decoding), requests_))
        if len(answers) != len(requests_) or [a.generation.index for a in answers] != [
            r.index for r in requests_
        ]:
            raise InvariantViolation("vLLM client: answers are not in request order")
        if not self._prompt_checked:
            for request, answer in zip(requests_, answers):
                if answer.generation.error is None and answer.prompt_tokens is not None:
                    self._check_prompt_length(request, answer.prompt_tokens)
                    break
        return [a.generation for a in answers]

    def _check_prompt_length(self, request: GenerationRequest, reported: int) -> None:
        assert self._expected_prompt_tokens is not None
        expected = self._expected_prompt_tokens(request)
        self._prompt_checked = True
        if reported != expected:
            raise SetupError(
                f"vLLM server at {self.settings.base_url} reports {reported} prompt tokens for sample "
                f"{request.index} ({request.source}:{request.line}) but the checkpoint's chat template and "
                f"processor give {expected}: the server renders a different template or resizes the image (D5)"
            )

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._session.close()
        if self._launched is not None:
            self._launched.stop()

    def describe(self) -> Mapping[str, object]:
        launched = self._launched is not None
        return {
            "vllm": {
                "mode": "server",
                "base_url": self.settings.base_url,
                "served_model_name": self.settings.served_model_name,
                "request_timeout_s": self.settings.request_timeout_s,
                "client_concurrency": self.settings.concurrency,
                "auto_launched": launched,
                "logprobs_mode": self.settings.logprobs_mode,
            },
            "launch_argv": list(self._launched.argv) if self._launched is not None else None,
        }


def connect(
    settings: ServerSettings,
    *,
    end_of_turn: Mapping[int, str],
    launch: LaunchPlan | None = None,
    expected_prompt_tokens: Callable[[GenerationRequest], int] | None = None,
) -> VllmServerBackend:
    """Preflight the server; when it fails and ``launch`` is given (auto-launch applies), start one.

    A launched server is asked for raw log-probs, so its ``logprobs_mode`` is ``raw``; an external
    server's stays ``unverified``.
    """
    try:
        served = preflight(settings.base_url, settings.preflight_timeout_s)
        launched = None
    except SetupError:
        if launch is None:
            raise
        launched = LaunchedServer(
            launch.argv,
            base_url=settings.base_url,
            log_path=launch.log_path,
            startup_timeout_s=launch.startup_timeout_s,
        )
        launched.start()
        settings = attrs.evolve(settings, logprobs_mode="raw")
        try:
            served = preflight(settings.base_url, settings.preflight_timeout_s)
        except SetupError:
            launched.stop()
            raise
    if served and settings.served_model_name not in served:
        if launched is not None:
            launched.stop()
        raise SetupError(
            f"vLLM server at {settings.base_url} serves {served}, not {settings.served_model_name!r}; "
            "set infer.vllm.served_model_name to one of them"
        )
    return VllmServerBackend(
        settings, end_of_turn=end_of_turn, expected_prompt_tokens=expected_prompt_tokens, launched=launched
    )
