"""Generation for inference and rollouts (infer-eval-config.md §2.6, stage2.md §2.4, §16).

One request shape serves the inference pipeline and Stage-2 rollouts: the prompt messages (system text, user
text, one image path), decoding settings and a per-request seed. Every backend decodes with special tokens
kept (D11) and reports the ids it generated, so parsers work on ids and scores come from log-probs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import attrs

from ports.tokenizer import TokenizerPort


@attrs.frozen
class DecodingSettings:
    """What a backend needs to decode; ``temperature == 0`` means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    num_beams: int = 1


@attrs.frozen
class GenerationRequest:
    """One sample to generate for; ``index`` is its position in the input (artifact order, seeds).

    ``image_path`` is the resolved image file (absolute); ``width`` / ``height`` are the record's size
    (the image is used as stored, D5; 0 = unknown, backends that need it raise). ``seed`` is
    ``run.seed + index`` (infer-eval-config.md §2.7). ``source`` / ``line`` name the input record for
    error messages (``<file>:<line>``).
    """

    index: int
    system: str
    user: str
    image_path: str
    seed: int
    width: int = 0
    height: int = 0
    source: str = ""
    line: int = 0


@attrs.frozen
class Generation:
    """One backend answer, in input order.

    ``token_ids`` are the generated ids cut after the first end-of-turn id (stop ids removed for rollouts);
    ``text`` is their decode with special tokens kept; ``token_logprobs[i]`` is the log-probability of
    ``token_ids[i]`` under the unprocessed distribution; ``error`` is set when the sample failed.
    """

    index: int
    token_ids: tuple[int, ...] = ()
    text: str | None = None
    token_logprobs: tuple[float, ...] = ()
    prompt_ids: tuple[int, ...] = ()
    finish_reason: str = "stop"
    ended_with_stop: bool = False
    repeat_terminate_triggered: bool = False
    error: str | None = None


class GenerationBackend(Protocol):
    """HF ``generate``, vLLM local (colocate) or a vLLM / ``swift rollout`` server."""

    name: str

    def generate(
        self, requests: Sequence[GenerationRequest], decoding: DecodingSettings
    ) -> list[Generation]:
        """One :class:`Generation` per request, in request order."""
        ...

    def close(self) -> None:
        """Release the model, engine, sessions or launched server (idempotent)."""
        ...

    def describe(self) -> Mapping[str, object]:
        """JSON-ready facts for the run summary, e.g. ``device``, ``attn_implementation_selected``,
        ``base_url``, ``auto_launched``, ``logprobs_mode``, ``launch_argv`` (what applies to the backend)."""
        ...


# --------------------------------------------------------------------------------------------
# Opening an engine for the infer stage (infer-eval-config.md §2.6): what wiring needs, what it returns
# --------------------------------------------------------------------------------------------


@attrs.frozen
class VllmLaunchSettings:
    """``infer.vllm.launch``: how the in-process engine or an auto-launched server is started."""

    tensor_parallel_size: int
    data_parallel_size: int
    gpu_memory_utilization: float
    max_model_len: int | None
    max_num_batched_tokens: int | None
    max_num_seqs: int | None
    enable_prefix_caching: bool
    enforce_eager: bool
    startup_timeout_s: float


@attrs.frozen
class VllmEngineSettings:
    """``infer.vllm`` with its fallbacks applied (``served_model_name``, ``client_concurrency``)."""

    mode: Literal["local", "server"]
    base_url: str | None
    served_model_name: str
    request_timeout_s: float
    preflight_timeout_s: float
    client_concurrency: int
    auto_launch: bool
    trust_remote_code: bool
    launch: VllmLaunchSettings


@attrs.frozen(eq=False)
class EngineRequest:
    """What opening a backend needs: the checkpoint directory, the image root, the run dir, and the settings
    the application read from the config (``model``, ``infer``, ``data.max_pixels``, ``run.seed``).

    ``model_path`` is the path a vLLM engine or server loads (``model.path``, else the checkpoint).
    """

    backend: Literal["hf", "vllm"]
    checkpoint: Path
    image_root: Path
    run_dir: Path
    model_path: str
    dtype: str
    attn_implementation: str
    device: str
    seed: int
    max_pixels: int
    vllm: VllmEngineSettings


@attrs.frozen(eq=False)
class GenerationEngine:
    """A ready backend plus what per-sample processing needs from the checkpoint's tokenizer."""

    backend: GenerationBackend
    tokenizer: TokenizerPort
    stop_ids: frozenset[int]
