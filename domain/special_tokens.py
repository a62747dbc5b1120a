"""The Qwen3-VL chat special tokens the project relies on (their ids are always looked up, never hard-coded)."""

from __future__ import annotations

# The 14 special tokens of the Qwen3-VL tokenizer, in their id order (151643..151656 on the real one).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
