"""vLLM colocate rollouts through ms-swift's ``GRPOVllmEngine`` (stage2.md §16.2, §17; D11).

The engine lives on the training GPUs, built lazily on the first rollout or sync with the keyword arguments of
:func:`colocate_engine_kwargs` (custom all-reduce off, ``load_format`` ``dummy`` when weights are pushed and
``auto`` with LoRA, executor ``mp`` for one process else ``external_launcher``, the whitelisted
``rollout.vllm.engine_kwargs``). Requests and replies use the same ms-swift protocol classes as the server client
(``adapters.swift_rollout.client``): ``RolloutInferRequest`` / ``RequestConfig`` in, ``RolloutOutput`` out.

- Tensor parallel groups of consecutive ranks: the group gathers every rank's requests (``all_gather_object``),
  every rank infers the concatenation in chunks of ``infer_batch_size`` and keeps its own slice.
- One ``RequestConfig`` per run of equal decoding settings; its seed is the run's first request's seed (§2.3 passes
  ``seed_base`` to colocate).
- Weight sync once per policy version: full = ``inner_model.load_weights`` of the normalised merged state dict,
  then ms-swift's ``finish_vllm_weight_reload``; adapter (``enable_lora``) = an in-memory ``TensorLoRARequest``
  (``add_lora``); then the prefix cache (and the encoder cache where the engine has one) is reset.

Needs vLLM and a GPU; nothing is imported from vLLM or ms-swift's engine until the engine is built. On a CPU-only
machine only :func:`colocate_engine_kwargs` runs (it is pure); the rest is covered by contract tests that skip.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from adapters.swift_rollout.client import infer_request_json, parse_infer_item, request_config_json
from domain.errors import ConfigError, InvariantViolation, SetupError
from ports.rollout import (
    RolloutRequest,
    RolloutResult,
    RolloutSample,
    SyncKind,
    WeightSyncReport,
    WeightSyncRequest,
)
from ports.tokenizer import TokenizerPort

ENGINE_KWARGS_KEY = "rollout.vllm.engine_kwargs"
ENGINE_KWARGS_WHITELIST = frozenset({
    "max_num_batched_tokens", "enable_chunked_prefill", "disable_chunked_mm_input", "kv_cache_dtype",
    "cpu_offload_gb", "swap_space", "limit_mm_per_prompt", "mm_encoder_tp_mode", "skip_mm_profiling",
})  # fmt: skip


@attrs.frozen
class ColocateSettings:
    """``rollout.vllm.*`` for colocate mode, plus the learner's rank layout."""

    model_path: str
    dtype: str
    max_model_len: int | None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.45
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    enable_lora: bool = False
    max_lora_rank: int = 16
    load_format: str | None = None
    sleep_level: int | None = None
    engine_kwargs: Mapping[str, object] = attrs.field(factory=dict)
    world_size: int = 1
    rank: int = 0
    infer_batch_size: int | None = None
    repeat_terminate: bool = False


def colocate_engine_kwargs(settings: ColocateSettings) -> dict[str, Any]:
    """Keyword arguments of ms-swift's ``GRPOVllmEngine`` (besides the model path and ``torch_dtype``)."""
    problems = []
    if settings.max_model_len is None:
        problems.append("rollout.vllm.max_model_len: required in colocate mode")
    if settings.world_size % settings.tensor_parallel_size != 0:
        problems.append(
            f"rollout.vllm.tensor_parallel_size: {settings.tensor_parallel_size} does not divide the learner world "
            f"size {settings.world_size}"
        )
    if settings.repeat_terminate:
        problems.append("rollout.repeat_terminate.enabled: not available in colocate mode (use hf or server)")
    for key in sorted(set(settings.engine_kwargs) - ENGINE_KWARGS_WHITELIST):
        problems.append(
            f"{ENGINE_KWARGS_KEY}.{key}: not allowed (allowed: {sorted(ENGINE_KWARGS_WHITELIST)})"
        )
    if problems:
        raise ConfigError(problems)
    engine_kwargs = {
        k: v for k, v in settings.engine_kwargs.items() if k != "limit_mm_per_prompt" and v is not None
    }
    return {
        "use_async_engine": False,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "enforce_eager": settings.enforce_eager,
        "disable_custom_all_reduce": True,
        "load_format": settings.load_format or ("auto" if settings.enable_lora else "dummy"),
        "distributed_executor_backend": "mp" if settings.world_size == 1 else "external_launcher",
        "enable_lora": settings.enable_lora,
        "max_loras": 1,
        "max_lora_rank": settings.max_lora_rank,
        "enable_sleep_mode": bool(settings.sleep_level),
        "limit_mm_per_prompt": settings.engine_kwargs.get("limit_mm_per_prompt"),
        "seed": settings.rank // settings.tensor_parallel_size,
        "engine_kwargs": engine_kwargs,
    }


class VllmColocateBackend:
    """:class:`ports.rollout.RolloutBackend` on an in-process ms-swift vLLM engine."""

    name = "vllm_colocate"

    def __init__(
        self,
        settings: ColocateSettings,
        tokenizer: TokenizerPort,
        *,
        stop_ids: Iterable[int],
        tp_group: Any = None,
        initial_version: int = 0,
    ) -> None:
        self.settings = settings
        self._kwargs = colocate_engine_kwargs(settings)  # config errors before any engine exists
        self._tokenizer = tokenizer
        self._stop_ids = frozenset(int(i) for i in stop_ids)
        self._tp_group = tp_group
        self._engine: Any = None
        self._version = int(initial_version)
        self._closed = False

    # ---- engine ----------------------------------------------------------------------------------------

    def _engine_or_build(self) -> Any:
        if self._closed:
            raise SetupError("the vLLM colocate backend was closed")
        if self._engine is None:
            try:
                import torch
                from swift.infer_engine import GRPOVllmEngine
            except ImportError as exc:
                raise SetupError(
                    f"rollout.vllm.mode: colocate needs vLLM ({exc}); install coordexp[vllm]"
                ) from exc
            self._engine = GRPOVllmEngine(
                self.settings.model_path, torch_dtype=getattr(torch, self.settings.dtype), **self._kwargs
            )
        return self._engine

    @property
    def policy_version(self) -> int:
        return self._version

    # ---- rollouts ----------------------------------------------------------------------------------------

    def _gathered(self, requests: Sequence[RolloutRequest]) -> tuple[list[RolloutRequest], int, int]:
        """All requests of the TP group and this rank's ``[start, stop)`` in that list."""
        if self.settings.tensor_parallel_size == 1:
            return list(requests), 0, len(requests)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.settings.tensor_parallel_size
        dist.all_gather_object(parts, list(requests), group=self._tp_group)
        local = self.settings.rank % self.settings.tensor_parallel_size
        start = sum(len(p) for p in parts[:local])
        return [r for part in parts for r in part], start, start + len(requests)

    def _runs(self, requests: Sequence[RolloutRequest]) -> list[tuple[int, int]]:
        size = self.settings.infer_batch_size
        limit = len(requests) if size is None or size <= 0 else size
        runs, start = [], 0
        while start < len(requests):
            stop = start + 1
            while (
                stop < len(requests)
                and stop - start < limit
                and requests[stop].decoding == requests[start].decoding
            ):
                stop += 1
            runs.append((start, stop))
            start = stop
        return runs

    def generate(self, requests: Sequence[RolloutRequest]) -> list[RolloutResult]:
        # Every TP rank joins the gather, even with no local requests (equal collective counts, §17).
        everything, mine_start, mine_stop = self._gathered(requests)
        if not everything:
            return []
        engine = self._engine_or_build()
        from swift.infer_engine.protocol import RequestConfig, RolloutInferRequest

        results: list[RolloutResult] = []
        for start, stop in self._runs(everything):
            batch = everything[start:stop]
            seed = batch[0].seed
            infer_requests = [RolloutInferRequest(**infer_request_json(r)) for r in batch]
            config = RequestConfig(**request_config_json(batch[0].decoding, seed))
            outputs = engine.infer(infer_requests, config, use_tqdm=False)
            if len(outputs) != len(batch):
                raise InvariantViolation(
                    f"vLLM colocate returned {len(outputs)} outputs for {len(batch)} requests"
                )
            for request, output in zip(batch, outputs):
                item = output.model_dump(mode="json") if hasattr(output, "model_dump") else output
                parsed = parse_infer_item(item, where=f"vLLM colocate, {request.where}", n=request.decoding.n,
                                          repeat_terminate=False)  # fmt: skip
                results.append(
                    RolloutResult(
                        index=request.index,
                        prompt_ids=parsed.prompt_ids,
                        samples=tuple(self._sample(ids, finish) for ids, finish, _ in parsed.samples),
                        policy_version=self._version,
                        decode_mode=request.decoding.decode_mode,
                        seed=seed,
                    )
                )
        return results[mine_start:mine_stop]

    def _sample(self, ids: Sequence[int], finish: str) -> RolloutSample:
        return RolloutSample.from_server(ids, finish, self._stop_ids, self._tokenizer.piece)

    # ---- weight sync ----------------------------------------------------------------------------------------

    def supports_sync(self, kind: SyncKind) -> bool:
        return kind == "full" or self.settings.enable_lora

    def sync_weights(self, update: WeightSyncRequest) -> WeightSyncReport:
        if update.version == self._version:
            return WeightSyncReport(version=update.version, kind=update.kind, skipped=True)
        if update.source is None:
            raise SetupError(f"weight sync to version {update.version}: no weight source given")
        if update.kind == "adapter" and not self.settings.enable_lora:
            raise SetupError("adapter weight sync needs rollout.vllm.enable_lora: true in colocate mode")
        engine = self._engine_or_build()
        import torch

        if update.kind == "full":
            from swift.rlhf_trainers.utils import finish_vllm_weight_reload

            state = list(update.source.full_state())
            engine.inner_model.load_weights(iter(state))
            device = torch.device("cuda", torch.cuda.current_device())
            finish_vllm_weight_reload(
                engine.inner_model, model_config=engine.engine.model_config, target_device=device
            )
        else:
            from swift.rlhf_trainers.utils import (
                VLLM_LORA_INT_ID,
                VLLM_LORA_NAME,
                VLLM_LORA_PATH,
                TensorLoRARequest,
            )

            state = list(update.source.adapter_state())
            engine.engine.add_lora(
                TensorLoRARequest(
                    lora_name=VLLM_LORA_NAME,
                    lora_int_id=VLLM_LORA_INT_ID,
                    lora_path=VLLM_LORA_PATH,
                    peft_config=dict(update.source.adapter_config()),
                    lora_tensors=dict(state),
                )
            )
        engine.engine.reset_prefix_cache()
        if hasattr(engine.engine, "reset_encoder_cache"):
            engine.engine.reset_encoder_cache()
        self._version = int(update.version)
        return WeightSyncReport(version=self._version, kind=update.kind, tensors=len(state))

    def close(self) -> None:
        self._closed = True
        self._engine = None

    def describe(self) -> Mapping[str, object]:
        return {
            "backend": "vllm",
            "mode": "colocate",
            "engine_kwargs": dict(self._kwargs),
            "policy_version": self._version,
        }
