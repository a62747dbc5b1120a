"""vLLM's offline engine (``LLM(...).chat``) as a :class:`ports.generation.GenerationBackend` (§2.6, D11).

One engine per run: ``model.path``, ``infer.vllm.trust_remote_code``, ``seed = run.seed``, dtype, the
``infer.vllm.launch.*`` knobs the offline engine supports, one image per prompt, raw log-probs, the
image processor's resize made a no-op, worker start method ``spawn``. Per request
``SamplingParams(temperature, top_p, max_tokens, repetition_penalty, seed = run.seed + index,
logprobs = 0, skip_special_tokens = False, spaces_between_special_tokens = False)``.

vLLM is imported lazily, when the engine is built; it is an optional extra (``coordexp[vllm]``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapters.vllm.messages import cut_answer, no_resize_processor_kwargs, openai_messages
from domain.errors import GenerationError, InvariantViolation, SetupError
from ports.generation import DecodingSettings, Generation, GenerationRequest


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def engine_kwargs(
    *,
    model_path: str,
    dtype: str,
    seed: int,
    launch: Any,
    image_root: str,
    max_pixels: int,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` (data parallelism is a server feature and is not passed).

    ``trust_remote_code`` is ``infer.vllm.trust_remote_code``: code inside a checkpoint runs only when asked.
    """
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "trust_remote_code": bool(trust_remote_code),
        "seed": int(seed),
        "dtype": dtype,
        "tensor_parallel_size": int(launch.tensor_parallel_size),
        "gpu_memory_utilization": float(launch.gpu_memory_utilization),
        "enable_prefix_caching": bool(launch.enable_prefix_caching),
        "enforce_eager": bool(launch.enforce_eager),
        "limit_mm_per_prompt": {"image": 1},
        "logprobs_mode": "raw_logprobs",
        "allowed_local_media_path": str(image_root),
        "mm_processor_kwargs": no_resize_processor_kwargs(max_pixels),
    }
    for key in ("max_model_len", "max_num_batched_tokens", "max_num_seqs"):
        value = getattr(launch, key)
        if value is not None:
            kwargs[key] = int(value)
    return kwargs


class VllmLocalBackend:
    """Generation with an in-process vLLM engine."""

    name = "vllm"

    def __init__(
        self,
        engine_settings: Mapping[str, Any],
        *,
        end_of_turn: Mapping[int, str],
        expected_prompt_tokens: Callable[[GenerationRequest], int] | None = None,
    ) -> None:
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # vLLM's own knob (§2.6)
        try:
            import vllm
        except ImportError as exc:
            raise SetupError(
                f"infer.vllm.mode: local needs the vllm package ({exc}); install coordexp[vllm] or set infer.backend: hf"
            ) from exc
        self._vllm = vllm
        self._settings = dict(engine_settings)
        self._end_of_turn = dict(end_of_turn)
        self._expected_prompt_tokens = expected_prompt_tokens
        self._llm: Any = vllm.LLM(**self._settings)

    def _sampling_params(self, request: GenerationRequest, decoding: DecodingSettings) -> Any:
        return self._vllm.SamplingParams(
            temperature=float(decoding.temperature),
            top_p=float(decoding.top_p),
            max_tokens=int(decoding.max_new_tokens),
            repetition_penalty=float(decoding.repetition_penalty),
            seed=int(request.seed),
            logprobs=0,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
        )

    def generate(self, requests: Sequence[GenerationRequest], decoding: DecodingSettings) -> list[Generation]:
        if self._llm is None:
            raise SetupError("the vLLM local backend was closed")
        if not requests:
            return []
        conversations = [openai_messages(r) for r in requests]
        params = [self._sampling_params(r, decoding) for r in requests]
        outputs = self._llm.chat(conversations, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise InvariantViolation(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        if self._expected_prompt_tokens is not None:  # the first request of the run (§2.5)
            expected = self._expected_prompt_tokens(requests[0])
            self._expected_prompt_tokens = None
            reported = len(outputs[0].prompt_token_ids or ())
            if reported != expected:
                raise SetupError(
                    f"vLLM renders {reported} prompt tokens for sample {requests[0].index} "
                    f"({requests[0].source}:{requests[0].line}) but the checkpoint's chat template and processor "
                    f"give {expected}: a different template or a resized image (D5)"
                )
        return [self._generation(r, out) for r, out in zip(requests, outputs)]

    def _generation(self, request: GenerationRequest, output: Any) -> Generation:
        completion = output.outputs[0]
        ids = [int(i) for i in completion.token_ids]
        entries = completion.logprobs
        if entries is None or len(entries) != len(ids):
            raise GenerationError(
                f"sample {request.index}: vLLM returned no log-prob per generated token", index=request.index
            )
        logprobs = [float(entry[token_id].logprob) for entry, token_id in zip(entries, ids)]
        kept, kept_logprobs, text, stopped = cut_answer(
            ids, logprobs, str(completion.text or ""), self._end_of_turn
        )
        return Generation(
            index=request.index,
            token_ids=kept,
            text=text,
            token_logprobs=kept_logprobs,
            prompt_ids=tuple(int(i) for i in (output.prompt_token_ids or ())),
            finish_reason="stop" if stopped else str(completion.finish_reason or "length"),
            ended_with_stop=stopped,
        )

    def close(self) -> None:
        self._llm = None

    def describe(self) -> Mapping[str, object]:
        return {
            "vllm": {
                "mode": "local",
                "base_url": None,
                "served_model_name": None,
                "request_timeout_s": None,
                "client_concurrency": None,
                "auto_launched": False,
                "logprobs_mode": "raw",
            },
            "engine": {k: v for k, v in self._settings.items() if k != "model"},
            "model_dir": str(Path(self._settings["model"])),
        }
