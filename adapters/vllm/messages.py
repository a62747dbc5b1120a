"""What both vLLM modes send and how they read answers back (infer-eval-config.md §2.5-§2.6, D11).

- OpenAI-style messages from the one message builder's order: system content a plain string, user
  content = image first, then text. The image is a data URL of the unchanged file bytes (base64, MIME
  type from the file type), in local and server mode alike.
- Processor kwargs that make the image processor's resize a no-op for contract images (sides multiples
  of 32, at most ``data.max_pixels`` pixels): the pixel bounds are widened to the data contract's.
- Answers are cut after the first end-of-turn id; when the engine did not detokenize that id into the
  text (vLLM leaves a stop token out of ``content``), its text is appended, so ``raw_output`` ends with
  ``<|im_end|>`` exactly as on the HF backend.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from domain.errors import GenerationError
from ports.generation import GenerationRequest

CONTRACT_MIN_PIXELS = 32 * 32

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_mime_type(path: Path, data: bytes) -> str:
    """MIME type from the file's leading bytes, else from its suffix; an unknown type raises."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed, _ = mimetypes.guess_type(path.name)
    if guessed is not None and guessed.startswith("image/"):
        return guessed
    raise GenerationError(
        f"{path}: cannot tell the image type for the data URL (not JPEG, PNG, GIF, BMP or WebP)"
    )


def image_data_url(path: str | Path) -> str:
    """``data:<mime>;base64,<unchanged file bytes>``."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise GenerationError(f"cannot read image {file}: {exc}") from exc
    return f"data:{image_mime_type(file, data)};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """System string, then the user turn with the image first and the text second."""
    return [
        {"role": "system", "content": request.system},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(request.image_path)}},
                {"type": "text", "text": request.user},
            ],
        },
    ]


def no_resize_processor_kwargs(max_pixels: int) -> dict[str, Any]:
    """Pixel bounds wide enough that Qwen-VL's smart resize keeps every contract image as it is (D5)."""
    return {"size": {"shortest_edge": CONTRACT_MIN_PIXELS, "longest_edge": int(max_pixels)}}


def cut_answer(
    token_ids: Sequence[int],
    token_logprobs: Sequence[float],
    text: str,
    end_of_turn: Mapping[int, str],
) -> tuple[tuple[int, ...], tuple[float, ...], str, bool]:
    """Keep ids (and their log-probs) up to and including the first end-of-turn id; align the text.

    Returns ``(ids, logprobs, text, ended_with_stop)``.
    """
    ids = [int(i) for i in token_ids]
    logprobs = [float(v) for v in token_logprobs]
    stop_at = next((p for p, i in enumerate(ids) if i in end_of_turn), None)
    cut_text = text
    hits = [(text.find(m), -len(m), m) for m in set(end_of_turn.values()) if m and m in text]
    if hits:
        at, _, marker = min(hits)  # the earliest end-of-turn text (the longest at a tie)
        cut_text = text[: at + len(marker)]
    if stop_at is None:
        return tuple(ids), tuple(logprobs), cut_text, False
    ids, logprobs = ids[: stop_at + 1], logprobs[: stop_at + 1]
    marker = end_of_turn[ids[-1]]
    if not cut_text.endswith(marker):
        cut_text += marker
    return tuple(ids), tuple(logprobs), cut_text, True
