"""The detector model as Stage-1, Stage-2 and inference use it.

Stage-1 (stage1.md) needs teacher-forced logits over the full vocabulary. Stage-2 Channel A
(stage2.md §13) needs the same forward fed with ``inputs_embeds`` built by *calling* the input
embedding module, the multimodal tensors and position ids unchanged between iterations. Channel B
and inference (stage2.md §2, infer-eval-config.md §2.6) need ``generate`` with the log-probability
of every emitted token under the model's unprocessed distribution. Checkpoints are saved in the
framework's own format so the loader reads them back like any local checkpoint.

Tensors are typed ``Any``: this module stays framework free; adapters document the concrete type
(torch tensors for the HF adapter).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from ports.generation import DecodingSettings
from ports.tokenizer import EncodedPrompt


@attrs.frozen
class GeneratedSequence:
    """One generation, in input order.

    ``prompt_ids``: the ids the model was conditioned on (no padding). ``token_ids``: the generated
    ids, cut after the first end-of-turn id (``<|im_end|>`` or a generation-config EOS id, kept as the
    last id when present), padding removed. ``token_logprobs[i]``: log-probability of
    ``token_ids[i]`` under the unprocessed distribution (temperature 1, no top-p/top-k, no penalty).
    ``finish_reason``: ``"stop"`` when an end-of-turn id ended it, else ``"length"``.
    """

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    finish_reason: str


@runtime_checkable
class DetectorModelPort(Protocol):
    """A vision-language detector behind one interface for training, rollout and inference."""

    @property
    def logits_vocab_size(self) -> int:
        """Size of the logits' last dimension (may exceed ``len(tokenizer)``); sizes the coord mask."""
        ...

    @property
    def device(self) -> str:
        """Where the parameters live, e.g. ``"cpu"`` or ``"cuda:0"``."""
        ...

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        inputs_embeds: Any | None = None,
        use_cache: bool = False,
    ) -> Any:
        """Logits ``[B, L, V]`` for every position (teacher forcing).

        ``batch`` carries ``input_ids``, ``attention_mask`` (padded batches only), ``position_ids``
        (``[4, B, L]`` under packing, data.md §8.4), ``pixel_values`` and ``image_grid_thw``; side data
        (stage1.md §4.1) has been removed before the call. With ``inputs_embeds`` given, the ids are
        NOT passed to the model (never both); the image placeholder rows of ``inputs_embeds`` must equal
        ``input_embeddings()(input_ids)`` bitwise so the model can place the image features there.
        """
        ...

    def input_embeddings(self) -> Callable[[Any], Any]:
        """The input-embedding module itself (call it; never index its weight, so hooks and adapters apply)."""
        ...

    def generate(
        self,
        prompts: Sequence[EncodedPrompt],
        decoding: DecodingSettings,
        seed: int | None = None,
    ) -> list[GeneratedSequence]:
        """One micro-batch of generations (left-padded internally), one result per prompt, in input order.

        ``seed`` seeds the sampling RNG for this call only; the caller's RNG streams are restored after
        it (stage2.md §2.3). Generated tokens start at the padded input length.
        """
        ...

    def save(self, directory: str) -> None:
        """Write the weights and config so the checkpoint loader reads the directory back."""
        ...

    @property
    def module(self) -> Any:
        """The framework module (e.g. the ``torch.nn.Module``) for the training engine adapter."""
        ...
