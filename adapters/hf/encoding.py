"""HF implementation of :class:`ports.tokenizer.SampleEncoderPort` (data.md §6.2-§6.5, stage2.md §2.1, §8).

One message builder (:func:`domain.prompts.chat_messages`), the checkpoint's own chat template
through the processor, images used as stored (``do_resize=False``, D5).

Two immutable renderers: generate mode (conversation without the assistant turn, plus the
generation header) and train mode (the whole conversation). Nothing toggles shared state.

A training sample is assembled exactly like a Stage-2 teacher-forced sequence:
``prompt_ids ⊕ tokenizer(target) ⊕ terminator_ids``. That this equals the template's own rendering
of the whole conversation is checked once at construction on a probe conversation (text only) and
proved per sample by the tests (parity with ``processor.apply_chat_template(tokenize=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapters.hf.tokenizer import HFTokenizer
from domain.errors import DataContractError, DataProblem, InvariantViolation, SetupError
from domain.packing import check_sample_lengths
from domain.prompts import PromptTexts, chat_messages
from ports.tokenizer import IGNORE_INDEX, ChatSample, EncodedPrompt, EncodedSample

_PROBE_TARGET = '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}]}'


class ChatRenderer:
    """Renders messages to text with the processor's chat template; the mode is fixed at construction."""

    def __init__(self, processor: Any, *, add_generation_prompt: bool) -> None:
        self._processor = processor
        self.add_generation_prompt = add_generation_prompt

    def render(self, messages: list[dict[str, Any]]) -> str:
        return str(
            self._processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=self.add_generation_prompt
            )
        )


class HFSampleEncoder:
    """Encodes detection conversations for training (train mode) and for rollout / inference (generate mode)."""

    def __init__(self, processor: Any, tokenizer: HFTokenizer | None = None) -> None:
        self._processor = processor
        self._tokenizer = tokenizer if tokenizer is not None else HFTokenizer(processor.tokenizer)
        self._generate_mode = ChatRenderer(processor, add_generation_prompt=True)
        self._train_mode = ChatRenderer(processor, add_generation_prompt=False)
        image_processor = processor.image_processor
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.image_factor = self.patch_size * self.merge_size
        self.image_token: str = processor.image_token
        self.image_token_id = int(processor.image_token_id)
        self._terminator_ids, self._labelled_terminator = self._probe_terminator()

    # --- port surface ----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    @property
    def terminator_ids(self) -> tuple[int, ...]:
        return self._terminator_ids

    def encode_prompt(self, sample: ChatSample) -> EncodedPrompt:
        text = self._generate_mode.render(chat_messages(sample.prompt, sample.image_path))
        image = self._load_image(sample)
        out = self._processor(text=[text], images=[image], do_resize=False, return_tensors="pt")
        input_ids = out["input_ids"][0].numpy().astype(np.int64)
        grid = out["image_grid_thw"].numpy().astype(np.int64)
        expected_grid = [[1, sample.height // self.patch_size, sample.width // self.patch_size]]
        placeholders = int((input_ids == self.image_token_id).sum())
        expected = self.placeholder_count(sample.width, sample.height)
        if grid.tolist() != expected_grid or placeholders != expected:
            raise InvariantViolation(
                f"{sample.origin}: image {sample.width}x{sample.height} gave image_grid_thw {grid.tolist()} and "
                f"{placeholders} placeholders; expected {expected_grid} and {expected} (was the image resized? D5)"
            )
        mm = out.get("mm_token_type_ids")
        mm_types = (
            mm[0].numpy().astype(np.int64) if mm is not None else (input_ids == self.image_token_id).astype(np.int64)
        )
        return EncodedPrompt(
            input_ids=input_ids,
            pixel_values=out["pixel_values"].numpy(),
            image_grid_thw=grid,
            mm_token_type_ids=mm_types,
            origin=sample.origin,
        )

    def teacher_forced(self, prompt: EncodedPrompt, assistant_ids: Sequence[int]) -> EncodedSample:
        assistant = np.asarray([int(i) for i in assistant_ids], dtype=np.int64)
        terminator = np.asarray(self._terminator_ids, dtype=np.int64)
        input_ids = np.concatenate([prompt.input_ids, assistant, terminator])
        labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        start = prompt.length
        supervised_end = start + len(assistant) + self._labelled_terminator
        labels[start:supervised_end] = input_ids[start:supervised_end]
        mm_types = np.concatenate(
            [prompt.mm_token_type_ids, np.zeros(len(assistant) + len(terminator), dtype=np.int64)]
        )
        return EncodedSample(
            input_ids=input_ids,
            labels=labels,
            length=len(input_ids),
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
            mm_token_type_ids=mm_types,
            prompt_length=start,
            record_index=prompt.origin.record_index,
            line=prompt.origin.line,
            source=prompt.origin.source,
        )

    def encode_sample(self, sample: ChatSample) -> EncodedSample:
        if sample.target is None:
            raise InvariantViolation(f"{sample.origin}: a training sample needs a target (assistant text)")
        return self.teacher_forced(self.encode_prompt(sample), self._tokenizer.encode(sample.target))

    def sample_length(self, sample: ChatSample) -> int:
        return self._lengths([sample])[0]

    def lengths(self, samples: Sequence[ChatSample]) -> list[int]:
        """data.md §6.5 token lengths of training samples, in order, without image I/O (batches of 256)."""
        lengths: list[int] = []
        for start in range(0, len(samples), 256):
            lengths += self._lengths(samples[start : start + 256])
        return lengths

    def checked_lengths(self, samples: Sequence[ChatSample], max_length: int) -> list[int]:
        lengths = self.lengths(samples)
        # The one owner of the over-length rule and its message (data.md §6.5, §8.2.2).
        check_sample_lengths(lengths, max_length, [str(s.origin) for s in samples])
        return lengths

    # --- helpers ---------------------------------------------------------------------------------

    def placeholder_count(self, width: int, height: int) -> int:
        """``N = (H/32) * (W/32)`` image placeholders for a contract-valid image (data.md §6.2)."""
        return (height // self.image_factor) * (width // self.image_factor)

    def _lengths(self, samples: Sequence[ChatSample]) -> list[int]:
        """data.md §6.5: ids of the rendered text (one placeholder per image) - placeholders + N; no image I/O."""
        if not samples:
            return []
        texts = []
        for sample in samples:
            self._check_size(sample)
            texts.append(self._train_mode.render(chat_messages(sample.prompt, sample.image_path, sample.target)))
        batch = self._tokenizer.hf(texts, add_special_tokens=False)["input_ids"]
        out = []
        for sample, ids in zip(samples, batch):
            singles = sum(1 for i in ids if i == self.image_token_id)
            if singles != 1:
                raise InvariantViolation(f"{sample.origin}: the rendered conversation holds {singles} image placeholders")
            out.append(len(ids) - singles + self.placeholder_count(sample.width, sample.height))
        return out

    def _check_size(self, sample: ChatSample) -> None:
        f = self.image_factor
        if sample.width <= 0 or sample.height <= 0 or sample.width % f or sample.height % f:
            raise DataContractError(
                [
                    DataProblem(
                        sample.origin.source,
                        sample.origin.line,
                        "width" if sample.width <= 0 or sample.width % f else "height",
                        f"image {sample.width}x{sample.height} is not a positive multiple of {f} on both sides; "
                        "images are never resized at load time (D5): re-run the converter",
                    )
                ]
            )

    def _load_image(self, sample: ChatSample) -> Any:
        from PIL import Image

        self._check_size(sample)
        origin = sample.origin
        try:
            with Image.open(sample.image_path) as handle:
                handle.load()
                image = handle.convert("RGB") if handle.mode != "RGB" else handle.copy()
        except (OSError, ValueError) as exc:
            raise DataContractError(
                [DataProblem(origin.source, origin.line, "images[0]", f"cannot read {sample.image_path}: {exc}")]
            ) from exc
        if image.size != (sample.width, sample.height):
            raise DataContractError(
                [
                    DataProblem(
                        origin.source,
                        origin.line,
                        "images[0]",
                        f"file is {image.size[0]}x{image.size[1]}, record says {sample.width}x{sample.height} "
                        f"({sample.image_path})",
                    )
                ]
            )
        return image

    def _probe_terminator(self) -> tuple[tuple[int, ...], int]:
        """The template's assistant-turn end, read off a probe conversation; checks §6.2's span invariant."""
        texts = PromptTexts(system="probe system", user="probe user")
        prompt = self._generate_mode.render(chat_messages(texts, "probe.png"))
        full = self._train_mode.render(chat_messages(texts, "probe.png", _PROBE_TARGET))
        if not full.startswith(prompt):
            raise SetupError(
                "chat template: the generation prompt is not a prefix of the rendered conversation; "
                "prompt ids would differ between rollout and training (stage2.md §8.1)"
            )
        rest = full[len(prompt) :]
        if not rest.startswith(_PROBE_TARGET):
            raise SetupError(
                "chat template: the assistant turn does not start with its content (e.g. it inserts a reasoning "
                f"block); it renders {rest[:80]!r}. data.md §6.2 needs the assistant turn to start with '{{'"
            )
        terminator = self._tokenizer.encode(rest[len(_PROBE_TARGET) :])
        im_end = self._tokenizer.im_end_id
        if im_end not in terminator:
            raise SetupError(f"chat template: the assistant turn does not end with <|im_end|>; it ends {rest!r}")
        tok = self._tokenizer
        if tok.encode(full) != tok.encode(prompt) + tok.encode(_PROBE_TARGET) + terminator:
            raise SetupError(
                "tokenizer: the assistant span of the rendered conversation does not tokenize as "
                "tokenizer(target) + terminator (data.md §6.2 invariant)"
            )
        return tuple(terminator), terminator.index(im_end) + 1


def sample_encoder_loader() -> Callable[[Path], HFSampleEncoder]:
    """Sample encoders (the processor of a checkpoint: tokenizer, chat template, image processor; no model),
    each checkpoint path loaded once: the use case's length pre-pass and the engine's datasets share it."""
    from adapters.hf.checkpoint import load_processor

    loaded: dict[Path, HFSampleEncoder] = {}

    def open_encoder(model_path: Path) -> HFSampleEncoder:
        key = Path(model_path)
        if key not in loaded:
            loaded[key] = HFSampleEncoder(load_processor(key))
        return loaded[key]

    return open_encoder
