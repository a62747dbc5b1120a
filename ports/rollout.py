"""The Stage-2 rollout port (stage2.md §2, §16, §17; D11).

A rollout backend turns prompts into sampled continuations of the current policy, and can be told about a
new policy (weight sync). Three adapters implement it: HF ``generate`` on the live training module
(``adapters.hf.rollout``), the ``swift rollout`` server client (``adapters.swift_rollout.client``) and the vLLM
colocate engine (``adapters.vllm.colocate``).

- Requests carry their own decoding settings, sample count ``n`` and seed (§2.2, §2.3). A backend applies a
  seed where its engine lets it: HF seeds each ``generate`` call with its first request's seed; a server applies
  one seed per POST (the first request's; under the §2.3 plan that is ``seed_base + chunk_start``). Every
  result records the seed that was applied.
- Results come back one per request, in request order (§2.4): the prompt ids the backend conditioned on, then per
  sample the generated ids with trailing stop ids removed, their text pieces (one decode per id, special tokens
  kept, D11), the finish reason and the repeat-terminate flag; plus the policy version (``global_step`` of the
  weights) that generated them.
- Weight sync (§16.2, §16.3.2, §17) is by policy version: ``kind`` ``full`` (merged state dict, keys normalised)
  or ``adapter`` (LoRA tensors and their PEFT config). A backend that cannot do a kind says so in
  :meth:`RolloutBackend.supports_sync` and raises :class:`domain.errors.SetupError` when asked anyway.

Tensors are typed ``object`` here: this module stays framework free; adapters document the concrete type
(``torch.Tensor``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Literal, Protocol

import attrs

DecodeMode = Literal["greedy", "beam"]
FinishReason = Literal["stop", "length"]
SyncKind = Literal["full", "adapter"]


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class RolloutDecoding:
    """Decoding settings of one request (§2.2): sampling iff ``temperature > 0``; ``top_k = -1`` disables it.

    ``n`` is the number of samples drawn for the prompt (``n > 1`` needs sampling to differ); ``num_beams > 1``
    with ``decode_mode: beam`` is HF only and returns the best beam (``n`` must then be 1).
    """

    max_new_tokens: int = attrs.field(validator=_positive)
    decode_mode: DecodeMode = "greedy"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    num_beams: int = attrs.field(default=1, validator=_positive)
    n: int = attrs.field(default=1, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.decode_mode == "greedy" and self.num_beams != 1:
            raise ValueError(f"decode_mode greedy takes num_beams = 1, got {self.num_beams}")
        if self.decode_mode == "beam" and self.n != 1:
            raise ValueError(f"decode_mode beam returns the best beam only (n = 1), got n = {self.n}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@attrs.frozen
class RolloutRequest:
    """One prompt (§2.1): explicit system text, user text, the images as path strings, no GT objects.

    ``index`` is the request's global position (results and seeds follow it); ``seed`` is the seed for this
    request (§2.3: ``(seed_base + index) & 0x7FFFFFFF``). ``width`` / ``height`` are the record's image size (the
    image is used as stored, D5). ``source`` / ``line`` name the record in errors.
    """

    index: int
    system: str
    user: str
    images: tuple[str, ...]
    decoding: RolloutDecoding
    seed: int
    width: int = 0
    height: int = 0
    source: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"request {self.index} ({self.source}:{self.line})" if self.source else f"request {self.index}"


@attrs.frozen
class RolloutSample:
    """One sample: generated ids (trailing stop ids removed), one text piece per id, why it ended."""

    response_ids: tuple[int, ...]
    pieces: tuple[str, ...]
    finish_reason: FinishReason
    repeat_terminate_triggered: bool = False

    def __attrs_post_init__(self) -> None:
        if len(self.pieces) != len(self.response_ids):
            raise ValueError(f"{len(self.pieces)} pieces for {len(self.response_ids)} ids")

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @classmethod
    def from_server(
        cls,
        ids: Sequence[int],
        finish: str,
        stop_ids: Collection[int],
        piece: Callable[[int], str],
        *,
        repeat_terminate_triggered: bool = False,
    ) -> RolloutSample:
        """A server engine's answer (ms-swift's ``RolloutOutput`` / vLLM's completion): trailing stop ids removed,
        one piece per kept id, ``finish`` ``"length"`` kept and any other reason read as ``"stop"``."""
        kept = list(ids)
        while kept and kept[-1] in stop_ids:
            kept.pop()
        return cls(
            response_ids=tuple(int(i) for i in kept),
            pieces=tuple(piece(i) for i in kept),
            finish_reason="length" if finish == "length" else "stop",
            repeat_terminate_triggered=repeat_terminate_triggered,
        )


@attrs.frozen
class RolloutResult:
    """The answer to one request, in request order.

    ``policy_version`` is the ``global_step`` of the weights that generated it; ``seed`` the seed the backend
    applied (None for greedy decoding when the backend ignores it). ``error`` is set (and ``samples`` empty) when
    the backend failed on this request alone (§2.4: the scanner then falls back).
    """

    index: int
    prompt_ids: tuple[int, ...]
    samples: tuple[RolloutSample, ...]
    policy_version: int
    decode_mode: DecodeMode
    seed: int | None
    error: str | None = None

    @property
    def response_ids(self) -> tuple[int, ...]:
        """The first sample's ids (empty for a failed request), the usual ``n = 1`` case."""
        return self.samples[0].response_ids if self.samples else ()


class WeightSource(Protocol):
    """Where the weights of a sync come from (the training side; stage2.md §17).

    ``full_state`` yields the merged state dict with keys normalised (no ``base_model.model.``, ``.base_layer``,
    ``modules_to_save.default.``; no ``original_module`` or ``lora_`` entries); ``adapter_state`` yields the LoRA
    tensors; ``adapter_config`` is the PEFT config as JSON-ready data.
    """

    def full_state(self) -> Iterable[tuple[str, object]]: ...

    def adapter_state(self) -> Iterable[tuple[str, object]]: ...

    def adapter_config(self) -> Mapping[str, object]: ...


@attrs.frozen
class WeightSyncRequest:
    """Push the policy of ``version`` (the trainer's ``global_step``) to the rollout engine."""

    version: int
    kind: SyncKind
    source: WeightSource | None = None


@attrs.frozen
class WeightSyncReport:
    """What a sync did; ``skipped`` when the backend already held ``version``."""

    version: int
    kind: SyncKind
    skipped: bool = False
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0


class RolloutBackend(Protocol):
    """HF generate (live module), vLLM colocate, or ``swift rollout`` servers."""

    name: str

    @property
    def policy_version(self) -> int:
        """The ``global_step`` of the weights the next rollout is generated with."""
        ...

    def generate(self, requests: Sequence[RolloutRequest]) -> list[RolloutResult]:
        """One result per request, in request order; ``[]`` for no requests, without any I/O (§16)."""
        ...

    def supports_sync(self, kind: SyncKind) -> bool:
        """Whether :meth:`sync_weights` can do ``kind`` (e.g. adapter sync needs a LoRA-enabled server)."""
        ...

    def sync_weights(self, update: WeightSyncRequest) -> WeightSyncReport:
        """Make the engine generate with ``update.version``; a kind it cannot do raises ``SetupError``."""
        ...

    def close(self) -> None:
        """Release sessions, communicators or the engine (idempotent)."""
        ...

    def describe(self) -> Mapping[str, object]:
        """JSON-ready facts for ``run_metadata.json`` (backend, servers, engine type, ...)."""
        ...
