"""What the core and the use cases need from a tokenizer / processor (data.md §4, §6; stage2.md §2.1, §8).

Two ports:
- :class:`TokenizerPort`: text <-> ids with special tokens kept (coord tokens are special, D7).
- :class:`SampleEncoderPort`: one detection conversation -> model-ready ids, labels and image tensors,
  rendered with the checkpoint's own chat template.

Arrays are numpy arrays (``IntArray`` / ``FloatArray``; numpy keeps this module framework free); adapters
convert to framework tensors at the collator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs
import numpy as np
import numpy.typing as npt

from domain.coord_tokens import CoordIdTable
from domain.prompts import PromptTexts

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

IGNORE_INDEX = -100


@runtime_checkable
class TokenizerPort(Protocol):
    """A tokenizer seen the way the project uses it.

    Every decode keeps special tokens and does no clean-up of tokenization spaces (D11), so
    ``<|coord_k|>`` and ``<|im_end|>`` survive and ``"".join(piece(i) for i in ids) == decode(ids)``
    wherever no multi-byte character is split across ids.
    """

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without inserting any special token (no BOS/EOS)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens kept, no clean-up."""
        ...

    def piece(self, token_id: int) -> str:
        """Text of one id on its own (special tokens kept, no clean-up); the scanner's character offsets."""
        ...

    def id_of(self, token: str) -> int:
        """Id of one vocabulary entry (e.g. ``"<|im_end|>"``); raises if it is not in the vocabulary."""
        ...

    @property
    def coord_ids(self) -> CoordIdTable:
        """The validated ids of ``<|coord_0|>``..``<|coord_999|>`` (stage1.md §0.3)."""
        ...

    @property
    def im_end_id(self) -> int:
        """Id of the assistant-turn terminator ``<|im_end|>`` (supervised, D10)."""
        ...

    @property
    def pad_id(self) -> int:
        """Id used to pad batches (the tokenizer's pad token, else its EOS)."""
        ...

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``: every id the tokenizer can emit, added tokens included.

        Not HF's ``tokenizer.vocab_size`` (which excludes added tokens), and not the logits
        dimension (which may be larger, padded to a multiple of 64).
        """
        ...


@attrs.frozen
class SampleOrigin:
    """Where a sample came from: JSONL path, 1-based physical line, 0-based record index (data.md §6.4)."""

    source: str
    line: int
    record_index: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"


@attrs.frozen
class ChatSample:
    """One single-turn detection conversation before encoding.

    ``image_path`` is the resolved image file; ``width``/``height`` are the record's (multiples of
    32, D5). ``target`` is the CoordJSON assistant text, or None for a generation prompt.
    """

    prompt: PromptTexts
    image_path: str
    width: int
    height: int
    target: str | None
    origin: SampleOrigin


@attrs.frozen(eq=False)
class EncodedPrompt:
    """A generation prompt: everything up to and including ``<|im_start|>assistant\\n`` (stage2.md §8).

    ``input_ids`` int64 ``[L]``; ``pixel_values`` float ``[patches, dim]``; ``image_grid_thw``
    int64 ``[1, 3]`` = ``[1, H/16, W/16]``; ``mm_token_type_ids`` int ``[L]``, 1 at image placeholders
    (Qwen3-VL's M-RoPE needs it whenever ``input_ids`` and images are passed together).
    """

    input_ids: IntArray
    pixel_values: FloatArray
    image_grid_thw: IntArray
    mm_token_type_ids: IntArray
    origin: SampleOrigin

    @property
    def length(self) -> int:
        return len(self.input_ids)


@attrs.frozen(eq=False)
class EncodedSample:
    """A training sample (data.md §6.4).

    ``input_ids`` / ``labels`` int64 ``[length]``; labels are ``-100`` through
    ``<|im_start|>assistant\\n`` and after ``<|im_end|>``, and the ids themselves on the assistant
    text and its ``<|im_end|>`` (§6.3). ``length`` includes the image placeholders.
    ``prompt_length`` is the number of tokens before the assistant content (stage2.md §0
    ``prompt_len``). ``mm_token_type_ids`` int ``[length]``, 1 at image placeholders, as the processor
    returns it (Qwen3-VL's M-RoPE input). ``record_index``, ``line``, ``source`` are metadata never
    fed to the model.
    """

    input_ids: IntArray
    labels: IntArray
    length: int
    pixel_values: FloatArray
    image_grid_thw: IntArray
    mm_token_type_ids: IntArray
    prompt_length: int
    record_index: int
    line: int
    source: str

    @property
    def origin(self) -> SampleOrigin:
        return SampleOrigin(source=self.source, line=self.line, record_index=self.record_index)


@runtime_checkable
class SampleEncoderPort(Protocol):
    """Encodes detection conversations with the checkpoint's own chat template (data.md §6.2-§6.5).

    The generate-mode and the train-mode encodings are separate, immutable code paths: nothing
    toggles shared template state (stage2.md §2.1.5). Images are never resized (D5).
    """

    @property
    def tokenizer(self) -> TokenizerPort: ...

    def encode_sample(self, sample: ChatSample) -> EncodedSample:
        """Train mode: prompt + ``target`` + the template's turn terminator, labels per §6.3."""
        ...

    def encode_prompt(self, sample: ChatSample) -> EncodedPrompt:
        """Generate mode: the prompt cut after ``<|im_start|>assistant\\n`` (the target is ignored)."""
        ...

    def teacher_forced(self, prompt: EncodedPrompt, assistant_ids: Sequence[int]) -> EncodedSample:
        """``prompt_ids ⊕ assistant_ids ⊕ terminator_ids`` with §6.3 labels (stage2.md §8.1)."""
        ...

    @property
    def terminator_ids(self) -> tuple[int, ...]:
        """The template's assistant-turn end (Qwen: ``<|im_end|>``, ``\\n``); only ``<|im_end|>`` is labelled."""
        ...

    def sample_length(self, sample: ChatSample) -> int:
        """Encoded length without decoding the image (data.md §6.5): text ids with one placeholder - 1 + N."""
        ...

    def lengths(self, samples: Sequence[ChatSample]) -> list[int]:
        """:meth:`sample_length` of every sample, in order (batched where the backend can)."""
        ...

    def checked_lengths(self, samples: Sequence[ChatSample], max_length: int) -> list[int]:
        """Lengths of all samples; a sample above ``max_length`` is a ``DataContractError`` listing
        ``<file>:<line> length=L`` (``domain.packing.check_sample_lengths``, data.md §6.5)."""
        ...
